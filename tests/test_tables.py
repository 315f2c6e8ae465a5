"""scripts/tables.py's variance table against hand-computed ECM, variance ratios and proposal counts."""

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "tables.py"


@pytest.fixture(scope="module")
def tables():
    spec = importlib.util.spec_from_file_location("tables", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _row(method, r, k, variance, cost):
    return {"method": method, "upstream_samples": r, "noise_draws": k, "variance": variance, "cost_seconds": cost}


def _report():
    plain = [_row("uniform", 2, 1, 100.0, 0.010), _row("is+stratified", 1, 16, 25.0, 0.020),
             _row("adaptive", 1, 16, 20.0, 0.020)]
    strat = [_row("uniform", 2, 1, 50.0, 0.010), _row("is+stratified", 1, 16, 10.0, 0.010),
             _row("adaptive", 1, 16, 12.5, 0.010)]
    return {"draws": 8, "device": "test", "phases": {"early": {"step": 100, "rows": plain},
                                                       "early_camera_stratified": {"step": 100, "rows": strat}}}


def test_variance_table_cells_are_ecm_and_variance_ratio_against_the_plain_baseline(tables):
    text = tables.variance_table(_report())
    # plain: adaptive ECM = 100·0.01 / (20·0.02) = 2.5, ratio 0.2; is+stratified 2.0, ratio 0.25
    assert "| early (100) | 1 × 16 | — | 2.00 (0.25) | 2.50 (0.20) |" in text
    # stratified cameras, against the *plain* baseline: is+stratified 100·0.01 / (10·0.01) = 10, ratio 0.1
    assert "| early_camera_stratified (100) | 1 × 16 | — | 10.00 (0.10) | 8.00 (0.12) |" in text
    assert "| early_camera_stratified (100) | 2 × 1 | 2.00 (0.50) |" in text


def test_proposal_comparison_counts_pairs_and_takes_the_median(tables):
    # pairs: 20/25 = 0.8 (adaptive lower), 12.5/10 = 1.25 (higher) → 1 of 2, median 1.025
    line = tables.proposal_comparison(_report())
    assert "lower variance in 1 of 2 pairs" in line and "median 1.02" in line and "range 0.80–1.25" in line
