"""Evaluate a run directory against the embedded world's ground truth (`carv3d evaluate RUN_DIR`).

The run-level half of evaluation: open the run, load its scene, call
:func:`carv3d.world.evaluate.evaluate_scene` and write the JSON. The world package itself never
opens a run directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

from carv3d.devices import resolve_device
from carv3d.errors import OutputPathError
from carv3d.io import atomic_write_text, check_output_file
from carv3d.run_dir import load_run_config, require_run_dir
from carv3d.saved_scene import load_scene
from carv3d.world.evaluate import (EVALUATION_FILE, check_options, evaluate_scene, to_json, truth_lighting_for,
                                   world_prompt)


def evaluate_run(run_dir: Union[str, Path], views: int = 16, resolution: int = 64,
                 out: Optional[Union[str, Path]] = None, overwrite: bool = False,
                 device: str = "auto") -> tuple[dict[str, Any], Path]:
    """Evaluate a run directory and write the JSON (atomically) to ``out`` (default RUN_DIR/evaluation.json).

    The prompt, options and output path are checked before the scene is loaded. The mesh is
    RUN_DIR/mesh/mesh.ply; without it, or when it cannot be read or measured (no faces, no area,
    non-finite vertices), ``chamfer`` is null and ``surface.mesh`` says why and what to do.

    Raises:
        RunDirError / CheckpointError: not a run, or no usable checkpoint.
        NotAWorldPromptError: the run's prompt is not a world prompt (the message lists the unknown words).
        EvaluationOptionError: bad views or resolution.
        ConfigError: a bad --device.
        OutputPathError: ``out`` is a folder, exists and ``overwrite`` is False, or cannot be written
            (checked before the scene is loaded, and again when writing).
    """
    run = require_run_dir(run_dir)
    prompt = str(load_run_config(run).prompt)
    world_prompt(prompt)
    check_options(views, resolution)
    target = Path(out) if out else run / EVALUATION_FILE
    check_output_file(target, overwrite)
    scene = load_scene(run, resolve_device(device, option="--device"))
    lighting = truth_lighting_for(str(load_run_config(run).render.shading))
    result = evaluate_scene(scene.scene, prompt, mesh=run / "mesh" / "mesh.ply", views=views,
                            resolution=resolution, truth_lighting=lighting)
    result = {"run_dir": str(run), "step": scene.step, **result}
    try:
        atomic_write_text(target, to_json(result))
    except OSError as err:
        raise OutputPathError(f"could not write '{target}': {err.strerror or err}; pass --out with a file in a "
                              f"writable folder.") from None
    return result, target
