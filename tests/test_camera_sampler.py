"""Training cameras: uniform ranges, and azimuth stratification that keeps every camera's marginal uniform."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from carv3d.cameras import CameraSampler

STRATA = 8


def _sampler(stratified: bool) -> CameraSampler:
    return CameraSampler((0.0, 30.0), (-180.0, 180.0), (1.55, 1.55), (50.0, 50.0), stratified=stratified,
                         n_azimuth_strata=STRATA)


def _azimuth_deg(cameras) -> torch.Tensor:
    """Azimuth of each camera about the vertical axis, recovered from its position (independent of the sampler)."""
    position = cameras.c2w[:, :3, 3]
    return torch.rad2deg(torch.atan2(position[:, 0], position[:, 2]))


def _stratum(azimuth: torch.Tensor) -> torch.Tensor:
    return ((azimuth + 180.0) // (360.0 / STRATA)).long().clamp(0, STRATA - 1)


def test_one_camera_per_step_visits_every_stratum_once_per_cycle() -> None:
    sampler, generator = _sampler(True), torch.Generator().manual_seed(0)
    azimuths = torch.cat([sampler._azimuth_strata(1, generator) for _ in range(5 * STRATA)])
    for cycle in azimuths.view(5, STRATA):
        assert sorted(cycle.tolist()) == list(range(STRATA))


@pytest.mark.parametrize("per_step", [2, 4])
def test_cameras_of_a_step_sit_evenly_around_the_object(per_step: int) -> None:
    sampler, generator = _sampler(True), torch.Generator().manual_seed(1)
    for _ in range(50):
        strata = sampler._azimuth_strata(per_step, generator).long()
        gaps = torch.diff(torch.cat([strata, strata[:1] + STRATA])) % STRATA
        assert torch.all(gaps == STRATA // per_step), strata


@pytest.mark.parametrize("per_step", [1, 2, 3])
def test_every_camera_azimuth_is_uniform(per_step: int) -> None:
    """Chi-square of each camera slot's stratum over 4,000 steps against uniform (p > 0.001 per slot),
    and Kolmogorov-Smirnov of the jitter inside the stratum against U(0, 1) (p > 0.001)."""
    sampler, generator = _sampler(True), torch.Generator().manual_seed(2)
    steps = 4000
    azimuth = torch.stack([_azimuth_deg(sampler.sample(per_step, generator)) for _ in range(steps)])  # (steps, B)
    for slot in range(per_step):
        counts = torch.bincount(_stratum(azimuth[:, slot]), minlength=STRATA).double()
        assert stats.chisquare(counts.numpy()).pvalue > 1e-3
        width = 360.0 / STRATA
        jitter = ((azimuth[:, slot] + 180.0) % width) / width
        assert stats.kstest(jitter.numpy(), "uniform").pvalue > 1e-3


def test_plain_sampler_is_uniform_and_stratified_state_round_trips() -> None:
    plain, generator = _sampler(False), torch.Generator().manual_seed(3)
    azimuth = torch.cat([_azimuth_deg(plain.sample(4, generator)) for _ in range(1000)])
    assert stats.kstest(((azimuth + 180.0) / 360.0).numpy(), "uniform").pvalue > 1e-3

    sampler = _sampler(True)
    sampler._azimuth_strata(1, torch.Generator().manual_seed(4))  # part-way through a cycle
    restored = _sampler(True)
    restored.load_state_dict(sampler.state_dict())
    a = sampler.sample(2, torch.Generator().manual_seed(5))
    b = restored.sample(2, torch.Generator().manual_seed(5))
    assert torch.allclose(_azimuth_deg(a), _azimuth_deg(b))
    assert math.isclose(len(restored.state_dict()["cycle"]), STRATA - 2)
