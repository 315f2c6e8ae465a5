#!/usr/bin/env python
"""Variance accounting under stratified timesteps, measured exactly on a closed-form problem.

The problem: a linear teacher ε̂(x_t, t) = a(t)·x_t + b(t)·c on a D-dimensional upstream
x = m + s·z (z ~ N(0, I): the between-render spread is s² per dimension), the SD noise schedule
(T = 1000) and carv3d's timestep tables. One draw is f = (p/q)(t)·w(t)·(ε̂ − ε); its mean over a
set π of timesteps is A_π·x + B_π·c with A_π = Σ_t π (p/q) w a √ᾱ_t and B_π = Σ_t π (p/q) w b, and
its second moment is a finite sum too, so every variance below is exact (no Monte Carlo):

* σ_b² = Var_x E[f | x] = A²·s²·D, and v̄(K) = E_x K·Var(ḡ | x), the within-render variance of one
  draw as the K-stratum average sees it;
* what the ANOVA of carv3d.estimator.AnovaSplit reads on average, one-way (the estimator before
  issue 21) and with collapsed strata (``AnovaSplit(stratified=True)``), from the formulas in its
  docstring; ``--check`` also runs AnovaSplit on simulated draws to confirm them;
* where auto-K settles with each (the fixed point of best_integer_noise_draws on the expected σ²),
  against the K that minimises the exact variance × cost (σ_b² + v̄(K)/K)(α + K);
* K = 1 with the strata spread across R renders against independent draws, given three fixed
  renders and averaged over random ones.

    python scripts/stratified_accounting.py --out stratified_accounting.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # runs from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from carv3d.estimator import (AnovaSplit, TimestepDistribution, add_noise, best_integer_noise_draws,  # noqa: E402
                              collapsed_strata)

T = 1000


def sd_alphas_cumprod() -> torch.Tensor:
    """Stable Diffusion's scaled-linear ᾱ: (T,) float32."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


@dataclass
class Upstream:
    """x = m + s·z in D dimensions, summarised by the moments the formulas need.

    xx = E‖x‖² = ‖m‖² + s²D, xc = E⟨x, c⟩ = ⟨m, c⟩, cc = ‖c‖², spread = s²·D = tr Cov(x).
    A fixed render is spread = 0 with its own xx, xc.
    """

    D: int
    xx: float
    xc: float
    cc: float
    spread: float


@dataclass
class Teacher:
    """ε̂ = a(t)·x_t + b(t)·c: a, b: (T,) float64."""

    a: torch.Tensor
    b: torch.Tensor


def strata(dist: TimestepDistribution, K: int) -> list[torch.Tensor]:
    """π_k(t) = K·|[C(t−1), C(t)) ∩ [k/K, (k+1)/K)|: the law of t in stratum k, each (T,)."""
    upper = dist.cdf
    lower = torch.cat([torch.zeros(1, dtype=torch.float64), upper[:-1]])
    return [K * (upper.clamp(max=(k + 1) / K) - lower.clamp(min=k / K)).clamp_min(0) for k in range(K)]


def moments(dist: TimestepDistribution, teacher: Teacher, pi: torch.Tensor) -> dict[str, float]:
    """A_π, B_π and the second-moment sums of one draw with t ~ π.

    f = c(t)(α_t x + β_t c + σ_t ε) with c(t) = (p/q)w, α = a√ᾱ, β = b, σ = a√(1 − ᾱ) − 1, so
    E‖f‖² = Σ π c²(α²‖x‖² + 2αβ⟨x, c⟩ + β²‖c‖² + σ²D).
    """
    a64 = dist.alphas_cumprod.double()
    coef = dist.ratio * dist.w.double()
    alpha, beta, sigma = teacher.a * a64.sqrt(), teacher.b, teacher.a * (1 - a64).sqrt() - 1
    w2 = pi * coef**2
    return {"A": float((pi * coef * alpha).sum()), "B": float((pi * coef * beta).sum()),
            "aa": float((w2 * alpha**2).sum()), "ab": float((w2 * alpha * beta).sum()),
            "bb": float((w2 * beta**2).sum()), "ss": float((w2 * sigma**2).sum())}


def mean_norm2(A: float, B: float, up: Upstream) -> float:
    """E_x‖A·x + B·c‖²."""
    return A * A * up.xx + 2 * A * B * up.xc + B * B * up.cc


def within_variance(mo: dict[str, float], up: Upstream) -> float:
    """E_x Var(f | x) under the stratum law the moments came from."""
    second = mo["aa"] * up.xx + 2 * mo["ab"] * up.xc + mo["bb"] * up.cc + mo["ss"] * up.D
    return second - mean_norm2(mo["A"], mo["B"], up)


def split_at(dist: TimestepDistribution, teacher: Teacher, up: Upstream, K: int) -> dict[str, float]:
    """Exact σ_b², v̄(K), and the expected readings of both ANOVAs at K stratified draws."""
    whole = moments(dist, teacher, dist.q)
    sigma_b2 = whole["A"] ** 2 * up.spread
    per = [moments(dist, teacher, pi) for pi in strata(dist, K)]
    v_bar = sum(within_variance(mo, up) for mo in per) / K
    # one-way: E[MS_W] = v̄ + K/(K−1)·B, B = (1/K)Σ_k E‖m_k(x) − m̄(x)‖²
    spread_profile = sum(mean_norm2(mo["A"] - whole["A"], mo["B"] - whole["B"], up) for mo in per) / K
    old_w = v_bar + K / (K - 1) * spread_profile
    # collapsed strata: E[v̂] = v̄ + (1/K)Σ_g n_g/(n_g − 1) Σ_{k∈g} Var_x(m_k − m̄_g), Var_x((A_k − A_g)x) = (A_k − A_g)²s²D
    excess = 0.0
    for group in collapsed_strata(K):
        n = len(group)
        a_g = sum(per[k]["A"] for k in group) / n
        excess += n / (n - 1) * sum((per[k]["A"] - a_g) ** 2 * up.spread for k in group)
    new_w = v_bar + excess / K
    between = K * sigma_b2 + v_bar  # E[MS_B], exact for both
    return {"K": K, "sigma_b2": sigma_b2, "v_bar": v_bar, "sigma_w2_iid": within_variance(whole, up),
            "one_way_sigma_b2": (between - old_w) / K, "one_way_sigma_w2": old_w,
            "collapsed_sigma_b2": (between - new_w) / K, "collapsed_sigma_w2": new_w}


def settle(rows: dict[int, dict[str, float]], alpha: float, which: str, k_max: int, start: int = 4) -> int:
    """The K auto-K settles on when every window reads the expected σ² of ``which`` at the current K."""
    K, seen = start, []
    while K not in seen:
        seen.append(K)
        r = rows[K]
        K = best_integer_noise_draws(alpha, r[f"{which}_sigma_w2"], max(r[f"{which}_sigma_b2"], 0.0), 2, k_max)
    return K


def auto_k_report(rows: dict[int, dict[str, float]], alpha: float, k_max: int) -> dict[str, float]:
    """Exact optimum against where each accounting settles; costs as excess variance × cost."""
    product = {k: (r["sigma_b2"] + r["v_bar"] / k) * (alpha + k) for k, r in rows.items()}
    best = min(product, key=product.get)
    out: dict[str, float] = {"alpha": alpha, "optimal_K": best}
    for which in ("one_way", "collapsed"):
        k = settle(rows, alpha, which, k_max)
        out[f"{which}_K"] = k
        out[f"{which}_excess_percent"] = 100 * (product[k] / product[best] - 1)
    return out


# ------------------------------------------------------------------------------ K = 1 across renders
def cross_render_variances(dist: TimestepDistribution, teacher: Teacher, renders: torch.Tensor,
                           c: torch.Tensor) -> dict[str, float]:
    """tr Var(ĝ | renders) for K = 1, independent t against R strata in a random order.

    Var_indep = (1/R²)Σ_r σ_r²; stratified adds Σ_{r≠r'} Cov = −Σ_{r≠r'} C(r, r')/(R²(R − 1)) with
    C(r, r') = (1/R)Σ_s ⟨h_r(s) − h̄_r, h_{r'}(s) − h̄_{r'}⟩ and h_r(s) = A_s x_r + B_s c.
    """
    R, D = renders.shape
    whole = moments(dist, teacher, dist.q)
    per = [moments(dist, teacher, pi) for pi in strata(dist, R)]
    var = []
    for x in renders:
        up = Upstream(D, float(x @ x), float(x @ c), float(c @ c), 0.0)
        var.append(within_variance(whole, up))
    dev = torch.stack([torch.stack([(mo["A"] - whole["A"]) * x + (mo["B"] - whole["B"]) * c for mo in per])
                       for x in renders])  # (R renders, R strata, D)
    gram = torch.einsum("rsd,usd->ru", dev, dev) / R  # C(r, r')
    off = float(gram.sum() - gram.diagonal().sum())
    independent = sum(var) / R**2
    return {"independent": independent, "stratified": independent - off / (R**2 * (R - 1))}


def cross_render_expected(dist: TimestepDistribution, teacher: Teacher, up: Upstream, R: int) -> dict[str, float]:
    """E over iid renders x = m + s·z of the two K = 1 variances (both include Var_x of the mean)."""
    whole = moments(dist, teacher, dist.q)
    per = [moments(dist, teacher, pi) for pi in strata(dist, R)]
    total = (within_variance(whole, up) + whole["A"] ** 2 * up.spread) / R
    # E C(x, x') for independent x, x' = (1/R)Σ_s ‖E_x(h_x(s) − h̄_x)‖² = (1/R)Σ_s ‖ΔA_s m + ΔB_s c‖²
    mean_only = Upstream(up.D, up.xx - up.spread, up.xc, up.cc, 0.0)
    e_c = sum(mean_norm2(mo["A"] - whole["A"], mo["B"] - whole["B"], mean_only) for mo in per) / R
    return {"independent": total, "stratified": total - e_c / R}


# ------------------------------------------------------------------------------ Monte Carlo check
def simulate_anova(dist: TimestepDistribution, teacher: Teacher, m: torch.Tensor, s: float, c: torch.Tensor,
                   K: int, renders: int, seed: int) -> dict[str, float]:
    """Stratified draws as the estimator makes them (public functions), read by both ANOVAs."""
    g = torch.Generator().manual_seed(seed)
    D = m.numel()
    one_way, collapsed = AnovaSplit(stratified=False), AnovaSplit(stratified=True)
    for _ in range(renders // 250):
        x = (m + s * torch.randn(250, D, generator=g, dtype=torch.float64)).repeat_interleave(K, 0)
        t = dist.sample_stratified(K, 250, g).reshape(-1)
        eps = torch.randn(x.shape, generator=g, dtype=torch.float64)
        x_t = add_noise(dist.alphas_cumprod.double(), x, eps, t)
        f = dist.coefficient(t).double()[:, None] * (teacher.a[t, None] * x_t + teacher.b[t, None] * c - eps)
        for anova in (one_way, collapsed):
            anova.update(f.view(250, K, D))
    return {"one_way_sigma_b2": float(one_way.sigma_b2), "one_way_sigma_w2": float(one_way.sigma_w2),
            "collapsed_sigma_b2": float(collapsed.sigma_b2), "collapsed_sigma_w2": float(collapsed.sigma_w2)}


# ------------------------------------------------------------------------------ the report
def toy(common: float, spread: float, D: int, a: float) -> tuple[Teacher, Upstream, torch.Tensor]:
    """ε̂ = a·x_t; x = m + s·z with ‖m‖² = common·D along (1, …, 1)/√D·‖m‖, s² = spread per dimension."""
    teacher = Teacher(torch.full((T,), a, dtype=torch.float64), torch.zeros(T, dtype=torch.float64))
    m = torch.full((D,), math.sqrt(common), dtype=torch.float64)
    up = Upstream(D, common * D + spread * D, 0.0, 0.0, spread * D)
    return teacher, up, m


def report(args: argparse.Namespace) -> dict:
    alphas = sd_alphas_cumprod()
    ks = list(range(2, args.k_max + 1))
    out: dict = {"problem": {"teacher": f"eps_hat = {args.a} * x_t", "D": args.dim, "T": T, "schedule": "SD scaled-linear",
                             "weighting": "sds", "t_range": [0.02, 0.98]}, "accounting": [], "k1_across_renders": {}}
    for proposal in ("uniform", "teacher-weight"):
        dist = TimestepDistribution(alphas, proposal=proposal)
        for common in args.common:
            teacher, up, m = toy(common, args.spread, args.dim, args.a)
            rows = {K: split_at(dist, teacher, up, K) for K in ks}
            entry = {"proposal": proposal, "common_mean_per_dim": common, "spread_per_dim": args.spread,
                     "rows": [rows[K] for K in ks if K in args.show_k],
                     "auto_k": [auto_k_report(rows, alpha, args.k_max) for alpha in args.alpha]}
            if args.check:
                entry["monte_carlo"] = [{"K": K, **simulate_anova(dist, teacher, m, math.sqrt(args.spread),
                                                                  torch.zeros(args.dim, dtype=torch.float64), K,
                                                                  args.check, seed=K)} for K in (2, 4, 8)]
            out["accounting"].append(entry)
    out["k1_across_renders"] = k1_report(alphas, args)
    return out


def k1_report(alphas: torch.Tensor, args: argparse.Namespace) -> dict:
    """K = 1, R renders sharing R strata: the tests' three fixed renders and teacher, then random renders."""
    grid = torch.arange(T, dtype=torch.float64)
    test_teacher = Teacher(0.5 + 0.3 * torch.sin(grid / 100.0), torch.cos(grid / 170.0))
    c = torch.tensor([0.7, -1.2, 0.3, 2.0, 0.1, -0.5], dtype=torch.float64)
    x3 = torch.tensor([[1.0, -2.0, 0.5, 0.0, 3.0, -1.0], [-1.5, 0.2, 2.2, 1.1, -0.7, 0.0],
                       [0.3, 0.3, -3.0, -2.0, 1.0, 1.5]], dtype=torch.float64)
    out: dict = {"fixed_renders": [], "random_renders": []}
    for proposal in ("uniform", "teacher-weight"):
        dist = TimestepDistribution(alphas, proposal=proposal)
        for name, teacher, cvec in (("tests' a(t)x_t + b(t)c", test_teacher, c),
                                    (f"{args.a}*x_t", toy(0, 0, 6, args.a)[0], torch.zeros(6, dtype=torch.float64))):
            v = cross_render_variances(dist, teacher, x3, cvec)
            out["fixed_renders"].append({"proposal": proposal, "teacher": name, "renders": "tests' X3 (R = 3)", **v,
                                         "change_percent": 100 * (v["stratified"] / v["independent"] - 1)})
        for common in args.common:
            teacher, up, _ = toy(common, args.spread, args.dim, args.a)
            for R in (2, 4):
                v = cross_render_expected(dist, teacher, up, R)
                out["random_renders"].append({"proposal": proposal, "common_mean_per_dim": common, "R": R, **v,
                                              "change_percent": 100 * (v["stratified"] / v["independent"] - 1)})
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=64, help="D, dimensions of the upstream")
    parser.add_argument("--a", type=float, default=0.9, help="the teacher's slope: eps_hat = a * x_t")
    parser.add_argument("--common", type=float, nargs="+", default=[1.0, 0.0],
                        help="squared mean of x per dimension (what all renders share), one problem each")
    parser.add_argument("--spread", type=float, default=0.25, help="between-render variance of x per dimension")
    parser.add_argument("--k-max", type=int, default=32)
    parser.add_argument("--show-k", type=int, nargs="+", default=[2, 3, 4, 8, 16])
    parser.add_argument("--alpha", type=float, nargs="+", default=[20.0, 60.0, 150.0],
                        help="cost ratios (upstream / one teacher draw) for the auto-K comparison")
    parser.add_argument("--check", type=int, default=0, metavar="RENDERS",
                        help="also simulate this many renders (a multiple of 250) per K through AnovaSplit")
    parser.add_argument("--out", default="stratified_accounting.json")
    args = parser.parse_args(argv)
    result = report(args)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({"auto_k": [{k: e[k] for k in ("proposal", "common_mean_per_dim")} | a
                                 for e in result["accounting"] for a in e["auto_k"]],
                      "k1": result["k1_across_renders"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
