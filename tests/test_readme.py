"""The README's library example runs as printed and trains its upstream."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_estimator_example_outside_3d_runs():
    text = README.read_text()
    match = re.search(r"### The estimator outside 3D.*?```python\n(.*?)```", text, re.S)
    assert match, "README lost its estimator example"
    namespace: dict = {}
    exec(compile(match.group(1), "README example", "exec"), namespace)  # noqa: S102 - our own README
    import torch

    # With the example's teacher ε̂ = 0.9·x_t, E_ε[ε̂ − ε] = 0.9·√ᾱ_t·x: every weighted draw points
    # along +x on average, so the latent gradient (8 stratified draws) must be well aligned with the
    # latents. A flipped residual (ε − ε̂) or missing weights would give a cosine ≤ 0; seeded run,
    # measured 0.86; the bound 0.5 leaves room for other torch builds' random streams.
    gradient = namespace["result"].latent_gradient
    latents = namespace["latents"].detach()
    assert gradient.shape == latents.shape == (2, 4, 8, 8)
    assert torch.nn.functional.cosine_similarity(gradient.flatten(), latents.flatten(), dim=0) > 0.5


# ------------------------------------------------------------------ marked blocks
# A ```python block right after a line `<!-- readme-test: NAME -->` is run by the test of that NAME;
# the blocks of one NAME run in order in one namespace (a later block uses an earlier one's names),
# in a temporary folder that links the repository's configs/ (the examples use relative paths).
MARKED = re.compile(r"<!-- readme-test: ([\w-]+) -->\n```python\n(.*?)```", re.S)


def marked_blocks() -> dict[str, list[str]]:
    blocks: dict[str, list[str]] = {}
    for name, code in MARKED.findall(README.read_text()):
        blocks.setdefault(name, []).append(code)
    return blocks


def run_marked(name: str, tmp_path: Path, monkeypatch) -> dict:
    blocks = marked_blocks()[name]
    (tmp_path / "configs").symlink_to(README.parent / "configs", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"readme_{name}"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"README {name} block {i + 1}", "exec"), namespace)  # noqa: S102 - our own README
    return namespace


def test_every_marked_block_has_a_test():
    assert set(marked_blocks()) == {"api", "tiny-sd"}
    assert len(marked_blocks()["api"]) == 2


def test_python_api_example_trains_and_exports(tmp_path, monkeypatch):
    import json

    namespace = run_marked("api", tmp_path, monkeypatch)
    run_dir = namespace["run_dir"]
    assert run_dir.parent == Path("runs") or run_dir.parent.resolve() == (tmp_path / "runs").resolve()
    status = json.loads((run_dir / "run.json").read_text())
    assert status["status"] == "finished" and status["step"] == 20
    assert namespace["saved"].step == 20
    files = namespace["files"]
    assert files["glb"].is_file() and files["ply"].is_file() and files["glb"].parent.name == "mesh_64"


def test_offline_tiny_stable_diffusion_recipe_runs_an_sd_config_on_cpu(tmp_path, monkeypatch, capsys):
    import json

    namespace = run_marked("tiny-sd", tmp_path, monkeypatch)
    cfg = namespace["cfg"]
    assert cfg.teacher.resolution == 64 and cfg.estimator.upstream_samples == 1  # sd21.yaml, scaled down
    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    status = json.loads((tmp_path / run_dir / "run.json").read_text() if not run_dir.is_absolute()
                        else (run_dir / "run.json").read_text())
    assert status["status"] == "finished" and status["step"] == 3
    assert (tmp_path / "tiny_sd" / "vae").is_dir() and (tmp_path / "tiny_sd" / "unet").is_dir()
