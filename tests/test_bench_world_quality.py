"""The quality bar's verdict in scripts/bench_world_quality.py against hand-computed cases."""

from pathlib import Path

import pytest
from carv3d.testing.scripts import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_world_quality.py"


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_world_quality")


def row(iou, prompted=True, front=None):
    return {"silhouette_iou": iou, "best_match_is_prompted": prompted, "front_matches_front": front}


def test_bar_met_when_every_part_holds(bench):
    verdict = bench.bar_verdict([row(0.9), row(0.8, front=True), row(0.88, front=True)], 0.85)
    assert verdict["mean_silhouette_iou"] == pytest.approx(0.86)
    assert verdict["iou_met"] and verdict["best_match_all_prompted"] and verdict["fronts_all_right"]
    assert verdict["fronts_right"] == "2/2"


def test_bar_fails_on_each_part(bench):
    assert not bench.bar_verdict([row(0.9), row(0.79)], 0.85)["iou_met"]  # mean 0.845
    assert not bench.bar_verdict([row(0.95, prompted=False)], 0.85)["best_match_all_prompted"]
    verdict = bench.bar_verdict([row(0.95, front=True), row(0.95, front=False)], 0.85)
    assert not verdict["fronts_all_right"] and verdict["fronts_right"] == "1/2"
