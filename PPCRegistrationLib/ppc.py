"""The Point-to-Plane Correspondence solve (docs/design.md §3 step 6): a differentiable, batched weighted least
squares for the rigid update, usable as a *known operator* inside a network.

For every contour point w_i (moved by the current estimate, mm) with 3D gradient g_i and its matched detector
position p'_i, the ray r_i from the source c through p'_i and the plane normal n_i (the component of g_i
perpendicular to r_i, normalised) give one linear equation in the twist dv = (omega, t) (rad, mm):

    n_i . (w_i + omega x w_i + t - c) = 0   <=>   [(w_i x n_i)^T, n_i^T] dv = n_i^T (c - w_i)

with all coordinates centred on the (weighted) centroid of the points, which keeps the 6x6 system well
conditioned.  The weighted solution is the Tikhonov-regularised normal equation
``(A^T W^2 A + lambda D) dv = A^T W^2 b`` in a column-scaled (dimensionless) basis; a system whose smallest
scaled eigenvalue is tiny relative to the largest is reported as rank deficient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InputError, RankDeficientError


@dataclass
class PPCSolution:
    """Result of :func:`solve_ppc` for a batch of B systems.

    Attributes:
        dv: ``(B, 6)`` twist (rad, mm) in coordinates centred on ``centre``.
        centre: ``(B, 3)`` world point (mm) the twist is centred on.
        rank_deficient: ``(B,)`` bool, the system did not determine all six parameters.
        condition: ``(B,)`` ratio of largest to smallest eigenvalue of the scaled normal matrix.
        residual_mm: ``(B,)`` weighted RMS point-to-plane distance after the update (mm, linearised).
        n_effective: ``(B,)`` number of correspondences with non-negligible weight.
    """

    dv: torch.Tensor
    centre: torch.Tensor
    rank_deficient: torch.Tensor
    condition: torch.Tensor
    residual_mm: torch.Tensor
    n_effective: torch.Tensor


def ppc_system(points: torch.Tensor, gradients: torch.Tensor, source: torch.Tensor, ray_dirs: torch.Tensor,
               centre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the PPC system.

    Args:
        points: ``(B, N, 3)`` moved contour points w_i (world, mm).
        gradients: ``(B, N, 3)`` their (rotated) 3D gradients g_i (any scale).
        source: ``(B, 3)`` X-ray source c (world, mm).
        ray_dirs: ``(B, N, 3)`` unit directions of the rays from c through the matched pixels p'_i.
        centre: ``(B, 3)`` centring point (mm).
    Returns:
        A ``(B, N, 6)`` and b ``(B, N)`` (mm) such that A dv = b for the exact twist.
    """
    w = points - centre[:, None, :]
    c = (source - centre)[:, None, :]
    g = gradients
    n = g - (g * ray_dirs).sum(-1, keepdim=True) * ray_dirs
    n = n / torch.linalg.norm(n, dim=-1, keepdim=True).clamp_min(1e-12)
    a = torch.cat([torch.linalg.cross(w, n, dim=-1), n], -1)
    b = (n * (c - w)).sum(-1)
    return a, b


def solve_ppc(points: torch.Tensor, gradients: torch.Tensor, source: torch.Tensor, ray_dirs: torch.Tensor,
              weights: torch.Tensor | None = None, *, regularization: float = 1e-6,
              rank_tolerance: float = 1e-7, centre: torch.Tensor | None = None,
              damping: torch.Tensor | None = None) -> PPCSolution:
    """Weighted, regularised, differentiable PPC solve for a batch of systems.

    Args:
        points: ``(B, N, 3)`` moved contour points w_i (world, mm).
        gradients: ``(B, N, 3)`` their rotated 3D gradients g_i.
        source: ``(B, 3)`` source position (mm).
        ray_dirs: ``(B, N, 3)`` unit rays from the source through the matched pixels p'_i.
        weights: ``(B, N)`` non-negative weights (0 drops a correspondence); default all ones.
        regularization: Tikhonov weight relative to the mean eigenvalue of the scaled normal matrix; it keeps
            the solve finite (and differentiable) when the system is rank deficient.
        rank_tolerance: a smallest/largest scaled eigenvalue ratio below this flags the system.
        centre: ``(B, 3)`` centring point; default the weighted centroid of ``points``.
        damping: optional ``(B, 6, 6)`` positive semi-definite matrix added to the normal matrix, in the scaled
            basis (rotation rad x radius = mm, translation mm) and relative to its mean eigenvalue: damps chosen
            directions, e.g. the weakly observable depth translation and out-of-plane rotations of one view.
    Returns:
        :class:`PPCSolution`; ``dv`` is finite even for rank-deficient systems (then it is the minimum-norm
        regularised solution and ``rank_deficient`` is True).
    """
    if points.ndim != 3 or points.shape[-1] != 3:
        raise InputError(f"points must be (B, N, 3), got {tuple(points.shape)}")
    if gradients.shape != points.shape or ray_dirs.shape != points.shape:
        raise InputError("points, gradients and ray directions must all be (B, N, 3)")
    bsz, n_pts, _ = points.shape
    if weights is None:
        weights = torch.ones(bsz, n_pts, dtype=points.dtype, device=points.device)
    if weights.shape != (bsz, n_pts):
        raise InputError(f"weights must be (B, N) = {(bsz, n_pts)}, got {tuple(weights.shape)}")
    for name, v in (("points", points), ("gradients", gradients), ("source", source), ("rays", ray_dirs),
                    ("weights", weights)):
        if not torch.isfinite(v).all():
            raise InputError(f"the PPC system has NaN/infinite {name}: check the inputs of this update")
    if (weights < 0).any():
        raise InputError("PPC weights must be non-negative")
    w2 = weights * weights
    wsum = w2.sum(-1, keepdim=True)
    if centre is None:
        safe = torch.where(wsum > 0, wsum, torch.ones_like(wsum))
        wc = torch.where(wsum > 0, w2 / safe, torch.full_like(w2, 1.0 / max(n_pts, 1)))
        centre = (wc[..., None] * points).sum(1)
    a, b = ppc_system(points, gradients, source, ray_dirs, centre)
    # column scaling: rotations (rad) times a characteristic radius become mm, like translations
    radius = torch.sqrt(((points - centre[:, None]) ** 2).sum(-1).mean(-1)).clamp_min(1.0)  # (B,)
    scale = torch.cat([radius[:, None].expand(bsz, 3), torch.ones(bsz, 3, dtype=a.dtype, device=a.device)], -1)
    a_s = a / scale[:, None, :]
    aw = a_s * w2[..., None]
    m = a_s.transpose(1, 2) @ aw  # (B,6,6)
    rhs = (aw * b[..., None]).sum(1)  # (B,6)
    # conditioning of the scaled system
    evals = torch.linalg.eigvalsh(m.detach())
    lam_max = evals[:, -1].clamp_min(1e-30)
    ratio = evals[:, 0].clamp_min(0) / lam_max
    n_eff = (weights > 1e-3 * weights.amax(-1, keepdim=True).clamp_min(1e-12)).sum(-1)
    rank_def = (ratio < rank_tolerance) | (n_eff < 6) | (wsum[:, 0] <= 0)
    # trace / 6 = mean eigenvalue, kept in the graph so that gradients include the regulariser exactly
    mean_eval = (m.diagonal(dim1=-2, dim2=-1).sum(-1) / 6).clamp_min(1e-12)
    reg = regularization * mean_eval
    eye = torch.eye(6, dtype=m.dtype, device=m.device)
    lhs = m + reg[:, None, None] * eye
    if damping is not None:
        lhs = lhs + mean_eval[:, None, None] * damping.to(m.dtype)
    x = torch.linalg.solve(lhs, rhs[..., None])[..., 0]
    dv = x / scale
    res = (a @ dv[..., None])[..., 0] - b
    rms = torch.sqrt((w2 * res * res).sum(-1) / wsum[:, 0].clamp_min(1e-12))
    cond = lam_max / evals[:, 0].clamp_min(1e-30)
    return PPCSolution(dv=dv, centre=centre, rank_deficient=rank_def, condition=cond, residual_mm=rms,
                       n_effective=n_eff)


def solve_ppc_strict(*args, **kwargs) -> PPCSolution:
    """:func:`solve_ppc` that raises :class:`RankDeficientError` instead of flagging."""
    sol = solve_ppc(*args, **kwargs)
    if bool(sol.rank_deficient.any()):
        bad = int(sol.rank_deficient.sum())
        raise RankDeficientError(
            f"{bad} PPC system(s) cannot determine the 6 motion parameters (effective correspondences: "
            f"{sol.n_effective.tolist()}, condition: {[f'{c:.2g}' for c in sol.condition.tolist()]}); "
            "enlarge the region of interest, lower the bone threshold, or raise the contour angle")
    return sol


def out_of_plane_damping(R: torch.Tensor, mu: float | torch.Tensor) -> torch.Tensor:
    """Damping matrix (for :func:`solve_ppc`'s ``damping``) of the directions one view observes weakly.

    The rotations about the detector axes and the translation along the beam (the camera's z axis), for
    C-arm rotations ``R (B, 3, 3)`` (world -> camera; its rows are the camera axes in world coordinates).

    Args:
        R: ``(B, 3, 3)`` world -> camera rotations.
        mu: strength, relative to the mean eigenvalue of the scaled normal matrix (0 = no damping).
    Returns:
        ``(B, 6, 6)`` positive semi-definite matrix in ``R``'s dtype.
    """
    ex, ey, ez = R[:, 0], R[:, 1], R[:, 2]
    d = torch.zeros(R.shape[0], 6, 6, dtype=R.dtype, device=R.device)
    d[:, :3, :3] = ex[:, :, None] * ex[:, None, :] + ey[:, :, None] * ey[:, None, :]
    d[:, 3:, 3:] = ez[:, :, None] * ez[:, None, :]
    return d * mu
