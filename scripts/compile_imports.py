#!/usr/bin/env python
"""Byte-compile what a carv3d run imports, by importing it once (``make install`` runs this).

``make install`` installs with ``pip install --no-compile``: pip otherwise byte-compiles every file
it installs, which is most of an install's time on a small machine (torch and transformers ship
thousands of modules carv3d never imports; 2 minutes of a 2-minute install on 2 cores). Importing
every carv3d module and the third-party modules carv3d imports lazily (export, plots, tensorboard,
the CLIP text encoder) writes ``__pycache__`` for exactly the code a run executes, so the first
``carv3d train`` starts as fast as later ones. Missing bytecode only costs time, never correctness.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

LAZY_THIRD_PARTY = (
    "diffusers.models.unets.unet_2d_condition",
    "diffusers.models.autoencoders.autoencoder_kl",
    "diffusers.schedulers",
    "transformers.models.clip.modeling_clip",
    "transformers.models.clip.tokenization_clip",
    "torch.utils.tensorboard",
    "matplotlib.pyplot",
    "mpl_toolkits.mplot3d",
    "trimesh",
    "trimesh.exchange.gltf",
    "trimesh.graph",
    "networkx",
    "skimage.measure",
    "imageio.v3",
    "imageio.plugins.ffmpeg",
    "imageio.plugins.pillow",
    "imageio_ffmpeg",
    "xatlas",
    "fast_simplification",
    "scipy.ndimage",
    "scipy.spatial",
    "PIL.Image",
)


def main() -> int:
    sys.dont_write_bytecode = False  # even where PYTHONDONTWRITEBYTECODE is set: writing it is the job
    import carv3d

    names = [info.name for info in pkgutil.walk_packages(carv3d.__path__, "carv3d.")]
    failed = []
    for name in (*names, *LAZY_THIRD_PARTY):
        try:
            importlib.import_module(name)
        except Exception as err:  # an optional backend (ray, tinycudann) may be absent: fine
            failed.append(f"{name} ({type(err).__name__})")
    print(f"compile_imports: {len(names) + len(LAZY_THIRD_PARTY) - len(failed)} modules imported"
          + (f"; skipped {', '.join(failed)}" if failed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
