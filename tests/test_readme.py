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
