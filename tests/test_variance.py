"""`carv3d variance`: the statistics against direct computations, and the command end to end."""

from __future__ import annotations

import json

import pytest
import torch

from carv3d.cli import main
from carv3d.variance import GradientStats, variance_split


def test_gradient_stats_match_torch():
    g = torch.Generator().manual_seed(0)
    draws = torch.randn(40, 7, generator=g, dtype=torch.float64) * torch.arange(1, 8)
    stats = GradientStats()
    for i, row in enumerate(draws):
        stats.update(row, seconds=float(i))
    assert torch.allclose(stats.mean, draws.mean(0))
    assert torch.allclose(stats.variance, draws.var(0, unbiased=True))
    assert stats.trace == pytest.approx(float(draws.var(0).sum()))
    assert stats.cost == 20.0  # median of seconds 1..39 (the first draw is warm-up)


def test_variance_split_recovers_two_level_model():
    """Var(R=1, K) = σ_b² + σ_w²/K exactly → the least-squares fit returns both."""
    sigma_b2, sigma_w2 = 2.0, 12.0
    rows = [{"method": "uniform", "upstream_samples": 1, "noise_draws": k, "variance": sigma_b2 + sigma_w2 / k}
            for k in (1, 2, 4, 8, 16)]
    split = variance_split(rows)
    assert split["sigma_b2"] == pytest.approx(sigma_b2)
    assert split["sigma_w2"] == pytest.approx(sigma_w2)
    assert split["ecm_bound_from_reuse"] == pytest.approx(1 + sigma_w2 / sigma_b2)


def test_variance_split_uses_every_upstream_count():
    """Var(R, K) = σ_b²/R + σ_w²/(R·K): (2, 1) and (1, 16) alone determine both (other methods'
    rows are ignored); rows with K = 1 only cannot separate them (1/R = 1/(R·K))."""
    sigma_b2, sigma_w2 = 3.0, 20.0
    model = lambda r, k: {"method": "uniform", "upstream_samples": r, "noise_draws": k,  # noqa: E731
                          "variance": sigma_b2 / r + sigma_w2 / (r * k)}
    split = variance_split([model(2, 1), model(1, 16), {**model(1, 16), "method": "adaptive", "variance": 1.0}])
    assert split["sigma_b2"] == pytest.approx(sigma_b2) and split["sigma_w2"] == pytest.approx(sigma_w2)
    assert variance_split([model(1, 1), model(2, 1)]) == {}  # both rows have 1/R = 1/(R·K): not separable


def test_variance_command_writes_report_and_plot(capsys, tmp_path, tiny_sd_path):
    out = tmp_path / "variance.json"
    code = main(["variance", "--prompt", "a red cube", "--draws", "4", "--pilot", "2", "--rk", "2x1,1x2",
                 "--methods", "uniform,adaptive", "--out", str(out), "--device", "cpu",
                 f"teacher.pretrained={tiny_sd_path}", "scene.grid.n_levels=2", "scene.grid.log2_hashmap_size=10",
                 "render.width=8", "render.height=8", "render.samples_per_ray=6"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(out.read_text())
    assert out.with_suffix(".png").is_file()
    rows = {(r["method"], r["upstream_samples"], r["noise_draws"]): r for r in report["rows"]}
    assert set(rows) == {(m, r, k) for m in ("uniform", "adaptive") for r, k in ((2, 1), (1, 2))}
    base = rows[("uniform", 2, 1)]
    assert base["ecm"] == pytest.approx(1.0)
    for r in report["rows"]:
        assert r["variance"] > 0 and r["cost_seconds"] > 0 and r["draws"] == 4
        assert r["ecm"] == pytest.approx(base["variance"] * base["cost_seconds"] / (r["variance"] * r["cost_seconds"]))
        uniform = rows[("uniform", r["upstream_samples"], r["noise_draws"])]
        assert r["relative_efficiency"] == pytest.approx(uniform["variance"] / r["variance"])
    assert "| method |" in captured.out
    # The report is never overwritten by accident.
    code = main(["variance", "--prompt", "a red cube", "--out", str(out), f"teacher.pretrained={tiny_sd_path}"])
    assert code == 2 and "already exists" in capsys.readouterr().err
