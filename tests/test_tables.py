"""scripts/tables.py: markdown tables from benchmark JSON, checked cell by cell on hand-made reports."""

from __future__ import annotations

from carv3d.testing.scripts import load_script

tables = load_script("tables")
bench = load_script("bench_quality")


def _run(prompt, seed, arm, ious):
    return {"prompt": prompt, "seed": seed, "method": arm,
            "evaluations": [{"silhouette_iou": iou, "best_match_is_prompted": iou > 0.6, "masked_colour_error": 1 - iou,
                             "psnr": 10 * iou, "front_matches_front": None, "chamfer": None, "step": 10 * i}
                            for i, iou in enumerate(ious)]}


def test_quality_table_of_an_arms_report_has_one_column_group_per_arm_against_the_baseline():
    arms = {"preset_sds-guidance_type_sds": ["estimator.preset=sds"],
            "preset_carv-guidance_type_sds": ["estimator.preset=carv"],
            "preset_carv-guidance_type_vsd": ["estimator.preset=carv", "guidance.type=vsd"]}
    runs = [_run("a", 0, "preset_sds-guidance_type_sds", [0.5, 0.7, 0.8]),
            _run("a", 0, "preset_carv-guidance_type_sds", [0.5, 0.8, 0.9]),
            _run("a", 0, "preset_carv-guidance_type_vsd", [0.5, 0.55, 0.6])]
    report = {"settings": {"checkpoint_seconds": [0.0, 10.0, 20.0], "prompts": ["a"], "budget_seconds": 20.0,
                           "arms": arms, "baseline": "preset_sds-guidance_type_sds"},
              "runs": {str(i): run for i, run in enumerate(runs)}}
    report["summary"] = bench.summarize(report)
    lines = tables.quality_table(report).splitlines()
    assert lines[0].startswith("| prompt | sds sds IoU at 20 s | carv sds IoU at 20 s | carv vsd IoU at 20 s | "
                               "carv sds reaches sds sds's final IoU at |")
    overall = lines[-1].split(" | ")
    # carv sds: 0.8 at t = 10 s → reaches 0.8 at 10 s (50 %); ahead at both checkpoints; vsd never
    assert overall[1:4] == ["0.800", "0.900", "0.600"]
    assert overall[4:8] == ["10.0 s (50%)", "yes / yes", "never", "no / no"]
    assert overall[8].startswith("100% / 100% / 0%")


def test_quality_table_still_reads_a_report_from_before_arms():
    point = lambda mean: {"mean": mean, "std": None, "n": 1}  # noqa: E731
    curves = {m: {"silhouette_iou": [point(0.5), point(v)], "best_match_is_prompted": [point(1.0), point(1.0)]}
              for m, v in (("sds", 0.8), ("carv", 0.9))}
    row = {"curves": curves, "carv_seconds_to_baseline_final_iou": 5.0, "carv_fraction_of_budget": 0.5,
           "carv_ahead_on_iou": {"every_checkpoint": True}}
    report = {"settings": {"budget_seconds": 10.0}, "summary": {"per_prompt": {"a": row}, "overall": row}}
    last = tables.quality_table(report).splitlines()[-1]
    assert last == "| **all prompts** | 0.800 | 0.900 | 5.0 s (50%) | yes / — | 100% / 100% |"


def test_full_run_table_shows_how_far_a_timed_out_run_got():
    run = {"cache": "cold", "status": "timed out", "steps_done": 253, "wall_s": 157.4, "startup_s": 86.8,
           "time_to_first_step_s": 122.2, "steps_per_s_steady": 8.117, "projection": {"projected_s": 1375.2}}
    report = {"full_run": {"config": "c.yaml", "steps": 1000, "projected_steps": 10000, "runs": [run]},
              "device_name": "GPU", "torch": "2", "date": "d"}
    row = tables.full_run_table(report).splitlines()[2].split(" | ")
    assert row[1:5] == ["253 of 1000 (timed out)", "cold", "157.4", "86.8"]
    assert row[6] == "8.12" and row[7] == "— (—)" and row[-1] == "1375 |"  # no settled split: an old JSON
    report["full_run"]["runs"] = [{"cache": "warm", "status": "failed", "reason": "exit 1"}]
    assert "| warm | failed: exit 1 |" in tables.full_run_table(report)


def test_checkpoints_table_gives_each_arm_over_time_overall_and_per_prompt():
    arms = {"preset_sds": ["estimator.preset=sds"], "preset_carv": ["estimator.preset=carv"]}
    runs = [_run("a", 0, "preset_sds", [0.5, 0.7]), _run("a", 1, "preset_sds", [0.5, 0.5]),
            _run("a", 0, "preset_carv", [0.4, 0.9]), _run("b", 0, "preset_sds", [0.2, 0.3]),
            _run("b", 0, "preset_carv", [0.3, 0.8])]
    report = {"settings": {"checkpoint_seconds": [0.0, 10.0], "prompts": ["a", "b"], "budget_seconds": 10.0,
                           "arms": arms, "baseline": "preset_sds"},
              "runs": {str(i): run for i, run in enumerate(runs)}}
    report["summary"] = bench.summarize(report)
    lines = tables.checkpoints_table(report).splitlines()
    assert lines[2] == "| arm | 0 s | 10 s |"
    # bench_quality's overall curve: the mean over seeds of each seed's mean over prompts. sds at 0 s:
    # seed 0 (0.5 + 0.2) / 2 = 0.35, seed 1 0.5 → 0.425; at 10 s (0.7 + 0.3) / 2 = 0.5 and 0.5 → 0.5
    assert "| sds | 0.425 | 0.500 |" in lines and "| carv | 0.350 | 0.850 |" in lines
    # best match = prompt when IoU > 0.6 (the fixture): sds at 10 s, seed 0 (1 + 0) / 2, seed 1 0 → 25 %
    assert "| sds | 0% | 25% |" in lines and "| carv | 0% | 100% |" in lines
    assert "| sds | — | — |" in lines  # no run with a front: no share to give
    assert "| carv | 0 | 10 |" in lines  # mean steps: the fixture's step is 10 × the checkpoint index
    per_a = lines[lines.index("Mean IoU, a:"):]
    assert "| sds | 0.500 | 0.600 |" in per_a and "| carv | 0.400 | 0.900 |" in per_a
