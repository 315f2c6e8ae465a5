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
    # The example's teacher ε̂ = 0.9·x_t pulls the latents towards 0; its decoder must have moved.
    assert namespace["result"].latent_gradient.shape == (2, 4, 8, 8)
    assert namespace["step"] == 19
