"""Registration error measures (docs/design.md §2 and §6): mTRE, mRPD, reduction factor, summaries."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .geometry import Projection, transform_points


def mtre(T_est: torch.Tensor, T_gt: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean target registration error (mm).

    Args:
        T_est: ``(B, 4, 4)`` or ``(4, 4)`` estimates.
        T_gt: same shape, ground truth.
        targets: ``(M, 3)`` target points x_j in the CT frame (mm).
    Returns:
        ``(B,)`` (or scalar) mean over j of ``|T_est x_j - T_gt x_j|``.
    """
    x = targets.to(T_est.dtype)
    return torch.linalg.norm(transform_points(T_est, x) - transform_points(T_gt, x), dim=-1).mean(-1)


def mrpd(T_est: torch.Tensor, T_gt: torch.Tensor, targets: torch.Tensor, proj: Projection) -> torch.Tensor:
    """Mean re-projection distance (mm): the distance of each ground-truth target point ``T_gt x_j`` from the
    ray through the projection of ``T_est x_j`` (the source-to-pixel line), averaged over j.

    Args:
        T_est, T_gt: ``(B, 4, 4)``.
        targets: ``(M, 3)`` (mm), or ``(B, M, 3)``: each sample's own targets.
        proj: geometry with batch 1 or B.
    Returns:
        ``(B,)`` mm; differentiable.
    """
    if T_est.ndim == 2:
        T_est, T_gt = T_est[None], T_gt[None]
    b = T_est.shape[0]
    proj = proj.expand(b)
    x = targets.to(T_est.dtype)
    if x.ndim == 2:
        x = x.expand(b, *x.shape)
    est = transform_points(T_est, x)
    gt = transform_points(T_gt, x)
    rays = proj.ray_directions(proj.project(est))
    v = gt - proj.source.to(gt.dtype)[:, None, :]
    dist = torch.linalg.norm(torch.linalg.cross(v, rays, dim=-1), dim=-1)
    return dist.mean(-1)


def reduction_factor(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """``1 - after / before`` where the error decreased, 0 where it grew (docs/design.md §1)."""
    rf = 1 - after / before.clamp_min(1e-12)
    return torch.where(after < before, rf, torch.zeros_like(rf))


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    t = torch.tensor(list(values), dtype=torch.float64)
    return float(torch.quantile(t, q / 100.0))


def summarize(initial: Sequence[float], final: Sequence[float], *, mrpd_final: Sequence[float] | None = None,
              seconds: Sequence[float] | None = None, iterations: Sequence[int] | None = None) -> dict:
    """Summary numbers of one method over cases (the JSON keys of ``ppcreg evaluate``).

    Returns a dict with ``n``, ``mtre_initial_mean``, ``mtre_p50``, ``mtre_p75``, ``mtre_p95``, ``mtre_mean``,
    ``mtre_sd``, ``reduction_factor_mean``, ``reduction_factor_sd``, ``success_2mm``, ``success_5mm``
    (fractions), ``mrpd_mean``, ``mrpd_sd``, ``seconds_per_case`` (median), ``iterations_mean``.
    """
    fin = torch.tensor(list(final), dtype=torch.float64)
    ini = torch.tensor(list(initial), dtype=torch.float64)
    rf = reduction_factor(ini, fin) if len(fin) else torch.zeros(0, dtype=torch.float64)
    n = len(fin)
    out = {
        "n": n,
        "mtre_initial_mean": float(ini.mean()) if n else math.nan,
        "mtre_p50": _percentile(final, 50),
        "mtre_p75": _percentile(final, 75),
        "mtre_p95": _percentile(final, 95),
        "mtre_mean": float(fin.mean()) if n else math.nan,
        "mtre_sd": float(fin.std(unbiased=False)) if n else math.nan,
        "reduction_factor_mean": float(rf.mean()) if n else math.nan,
        "reduction_factor_sd": float(rf.std(unbiased=False)) if n else math.nan,
        "success_2mm": float((fin < 2).double().mean()) if n else math.nan,
        "success_5mm": float((fin < 5).double().mean()) if n else math.nan,
    }
    if mrpd_final is not None and len(mrpd_final):
        m = torch.tensor(list(mrpd_final), dtype=torch.float64)
        out["mrpd_mean"] = float(m.mean())
        out["mrpd_sd"] = float(m.std(unbiased=False))
    else:
        out["mrpd_mean"] = math.nan
        out["mrpd_sd"] = math.nan
    out["seconds_per_case"] = _percentile(seconds, 50) if seconds else math.nan
    out["iterations_mean"] = float(torch.tensor(list(iterations), dtype=torch.float64).mean()) \
        if iterations else math.nan
    return out


def paired_comparison(a_one: Sequence[float], b_one: Sequence[float], a_final: Sequence[float] | None = None,
                      b_final: Sequence[float] | None = None, success_mm: float = 2.0) -> dict:
    """Method A against method B on the same cases.

    After one update: the mean of the per-case differences ``mTRE_A - mTRE_B`` (mm; negative = A better), its
    95 % confidence interval (normal approximation, ``1.96 sd / sqrt(n)``) and how many cases A has lower. After the
    iterative registration (when given): the cases only A and only B bring below ``success_mm`` and the two-sided
    exact sign-test (McNemar) p-value of that split.

    Returns:
        ``{"n", "one_update_diff_mean", "one_update_diff_ci95", "one_update_a_lower", "final_only_a",
        "final_only_b", "final_p_value"}`` (the last three None without final values).
    """
    a = torch.tensor(list(a_one), dtype=torch.float64)
    b = torch.tensor(list(b_one), dtype=torch.float64)
    if a.shape != b.shape:
        raise ValueError("paired_comparison needs values of the same cases for both methods")
    n = int(a.numel())
    d = a - b
    half = 1.96 * float(d.std(unbiased=True)) / math.sqrt(n) if n > 1 else math.nan
    mean = float(d.mean()) if n else math.nan
    out = {"n": n, "one_update_diff_mean": mean, "one_update_diff_ci95": [mean - half, mean + half],
           "one_update_a_lower": int((d < 0).sum()), "final_only_a": None, "final_only_b": None,
           "final_p_value": None}
    if a_final is not None and b_final is not None:
        sa = torch.tensor(list(a_final), dtype=torch.float64) < success_mm
        sb = torch.tensor(list(b_final), dtype=torch.float64) < success_mm
        only_a, only_b = int((sa & ~sb).sum()), int((sb & ~sa).sum())
        k, m = min(only_a, only_b), only_a + only_b
        p = min(1.0, 2 * sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m) if m else 1.0
        out.update(final_only_a=only_a, final_only_b=only_b, final_p_value=p)
    return out
