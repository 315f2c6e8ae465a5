"""NonFiniteGuard on its own: the sync-free skip equals the synchronous one, counters, the stop rule."""

from __future__ import annotations

import pytest
import torch

from carv3d.errors import TrainingDivergedError
from carv3d.guard import NonFiniteGuard, gradient_norm

NAN_STEPS = {2, 3, 6}  # the steps whose gradient is not finite


def _train(sync_free: bool, steps: int = 9, max_in_a_row: int = 5):
    """Adam (fused, as sync-free steps need) on ½‖θ − c‖² with NaN gradients at NAN_STEPS."""
    theta = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    optimizer = torch.optim.Adam([theta], lr=0.1, fused=True)
    guard = NonFiniteGuard(torch.device("cpu"), sync_free=sync_free, max_in_a_row=max_in_a_row)
    in_a_row = []
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = 0.5 * (theta - torch.tensor([0.3, 0.3, 0.3])).pow(2).sum()
        if step in NAN_STEPS:
            loss = loss * float("nan")
        loss.backward()
        finite = torch.isfinite(loss) & torch.isfinite(gradient_norm(optimizer))
        guard.step(optimizer, finite)
        in_a_row.append(guard.in_a_row(step))
    return theta.detach(), optimizer, guard, in_a_row


def test_sync_free_skip_equals_the_synchronous_skip_bit_for_bit():
    sync_theta, sync_opt, sync_guard, sync_runs = _train(sync_free=False)
    free_theta, free_opt, free_guard, free_runs = _train(sync_free=True)
    assert torch.equal(sync_theta, free_theta)
    s, f = sync_opt.state[sync_opt.param_groups[0]["params"][0]], free_opt.state[free_opt.param_groups[0]["params"][0]]
    assert torch.equal(s["exp_avg"], f["exp_avg"]) and float(s["step"]) == float(f["step"]) == 9 - len(NAN_STEPS)
    assert sync_runs == free_runs == [0, 0, 1, 2, 0, 0, 1, 0, 0]
    assert sync_guard.total() == free_guard.total() == len(NAN_STEPS)


def test_a_skipped_step_leaves_parameters_and_moments_untouched():
    theta, optimizer, _, _ = _train(sync_free=True, steps=3)  # steps 0, 1 finite; 2 not
    reference, ref_optimizer, _, _ = _train(sync_free=True, steps=2)
    assert torch.equal(theta, reference)
    p, q = optimizer.param_groups[0]["params"][0], ref_optimizer.param_groups[0]["params"][0]
    assert torch.equal(optimizer.state[p]["exp_avg_sq"], ref_optimizer.state[q]["exp_avg_sq"])


def _skips(sync_free: bool, nan_steps: set, steps: int = 5, max_in_a_row: int = 2, check_every_step: bool = False):
    theta = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.Adam([theta], lr=0.1, fused=True)
    guard = NonFiniteGuard(torch.device("cpu"), sync_free=sync_free, max_in_a_row=max_in_a_row)
    for step in range(steps):
        optimizer.zero_grad()
        loss = theta.sum() * (float("nan") if step in nan_steps else 1.0)
        loss.backward()
        guard.step(optimizer, torch.isfinite(loss))
        if check_every_step:
            guard.check(step, "step_0000001.pt")
    return guard


def test_the_synchronous_guard_stops_at_the_skip_that_reaches_the_limit():
    with pytest.raises(TrainingDivergedError, match="2 non-finite steps in a row at step 3.*step_0000001.pt, is intact"):
        _skips(sync_free=False, nan_steps={2, 3}, check_every_step=True)


def test_the_sync_free_guard_stops_for_a_run_of_skips_that_ended_before_the_check():
    """The sync-free guard reads its counters only when checked: a run of 2 skips (steps 2, 3) that
    ended before the check at step 5 still stops the run, as the synchronous one would have."""
    guard = _skips(sync_free=True, nan_steps={2, 3})
    with pytest.raises(TrainingDivergedError, match="2 non-finite steps in a row"):
        guard.check(5, "step_0000001.pt")
    assert _skips(sync_free=True, nan_steps={1, 3}).check(5, None) is None  # never 2 in a row


def test_the_stop_message_never_claims_a_checkpoint_that_does_not_exist():
    guard = NonFiniteGuard(torch.device("cpu"), sync_free=False, max_in_a_row=1)
    guard.load_state_dict({"nonfinite_total": 4, "nonfinite_in_a_row": 1})
    with pytest.raises(TrainingDivergedError, match="No checkpoint had been written yet"):
        guard.check(7, None)
    assert guard.state_dict() == {"nonfinite_total": 4, "nonfinite_in_a_row": 1}


def test_match_optimizer_moves_a_saved_state_to_the_step_mode():
    theta = torch.nn.Parameter(torch.ones(2))
    plain = torch.optim.Adam([theta], lr=0.1)
    theta.grad = torch.ones(2)
    plain.step()
    fused = torch.optim.Adam([theta], lr=0.1, fused=True)
    fused.load_state_dict(plain.state_dict())
    NonFiniteGuard(torch.device("cpu"), sync_free=True, max_in_a_row=3).match_optimizer(fused)
    assert fused.param_groups[0]["fused"] is True
    assert fused.state[theta]["step"].dtype == torch.float32
    fused.found_inf = torch.ones(())  # a fused step that must be skipped works after the move
    before = theta.detach().clone()
    fused.step()
    assert torch.equal(theta.detach(), before)
