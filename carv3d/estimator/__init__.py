"""CARV: a compute-aware, variance-reduced estimator of expectations over a frozen diffusion teacher.

Score distillation needs g(x) = E_{t,ε}[w(t)·(ε̂(x_t, t) − ε)] for an expensive upstream x (a render
encoded by a VAE, a generator's sample, ...). This package estimates it with K cheap teacher draws per
upstream sample in one batched call, importance-sampled and stratified timesteps, and measures what
each part costs and buys. It imports torch only and knows nothing about 3D. Outside 3D, on a latent::

    import torch
    from carv3d.estimator import ScoreDistillationEstimator, TimestepDistribution

    alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)  # the teacher's ᾱ: (T,)
    unet = lambda x_t, t, upstream_index: 0.9 * x_t                           # your frozen ε̂(x_t, t)
    decoder = torch.nn.Linear(16, 4 * 8 * 8)                                  # θ: any differentiable upstream
    estimator = ScoreDistillationEstimator(TimestepDistribution(alphas_cumprod, proposal="teacher-weight"),
                                           noise_draws=8, stratified=True)
    optimizer, generator = torch.optim.Adam(decoder.parameters(), 1e-3), torch.Generator().manual_seed(0)
    for step in range(20):
        latents = decoder(torch.randn(2, 16, generator=generator)).view(2, 4, 8, 8)  # x: (R, C, h, w)
        result = estimator.estimate(latents, unet, generator, step)  # one teacher call of R·K rows
        optimizer.zero_grad(); result.surrogate.backward(); optimizer.step()

``build_estimator(cfg.estimator, alphas_cumprod, device)`` builds the same from carv3d's config.
"""

from carv3d.estimator.accounting import (
    AutoNoiseDraws,
    Welford,
    best_integer_noise_draws,
    ecm,
    optimal_noise_draws,
    relative_efficiency,
    variance_cost_product,
)
from carv3d.estimator.adaptive import AdaptiveSecondMoment, defensive_mixture
from carv3d.estimator.anova import AnovaSplit, collapsed_strata
from carv3d.estimator.estimator import (
    EstimateResult,
    ScoreDistillationEstimator,
    add_noise,
    build_estimator,
    piecewise_linear,
)
from carv3d.estimator.guidance import (
    GUIDANCES,
    ClassifierScoreDistillation,
    Draws,
    Guidance,
    NoisePredictor,
    ParticleModel,
    ParticlePredictor,
    PredictNoise,
    ScoreDistillation,
    VariationalScoreDistillation,
    build_guidance,
)
from carv3d.estimator.timesteps import (
    PROPOSALS,
    WEIGHTINGS,
    TimestepDistribution,
    build_proposal,
    nominal_distribution,
    step_range,
    timestep_weighting,
)
from carv3d.estimator.timing import StepTimer

__all__ = [
    "AdaptiveSecondMoment",
    "ClassifierScoreDistillation",
    "Draws",
    "GUIDANCES",
    "Guidance",
    "NoisePredictor",
    "ParticleModel",
    "ParticlePredictor",
    "ScoreDistillation",
    "VariationalScoreDistillation",
    "build_guidance",
    "AnovaSplit",
    "AutoNoiseDraws",
    "EstimateResult",
    "PROPOSALS",
    "PredictNoise",
    "ScoreDistillationEstimator",
    "StepTimer",
    "TimestepDistribution",
    "WEIGHTINGS",
    "Welford",
    "add_noise",
    "best_integer_noise_draws",
    "build_estimator",
    "build_proposal",
    "collapsed_strata",
    "defensive_mixture",
    "ecm",
    "nominal_distribution",
    "optimal_noise_draws",
    "piecewise_linear",
    "relative_efficiency",
    "step_range",
    "timestep_weighting",
    "variance_cost_product",
]
