"""The solve step of the PPC update operator (docs/design.md §3.7-3.9): small objects that turn weighted 2D/3D
correspondences into the rigid update and return what they used, instead of writing into shared state.

* :class:`PlainSolver`: one weighted, damped PPC solve with the matcher's weights (the learned operators' known
  operator, in training and in the loop).
* :class:`RobustSolver`: the classic pipeline's solve: RANSAC consensus over minimal sets, Tukey re-weighting of the
  point-to-plane residuals, a noise-scaled floor of the out-of-plane damping, all scaled by the Levenberg–Marquardt
  factor of the loop.

Both are called as ``solver(points, gradients, projection, rays, weights) -> SolveResult`` on batches
(``RobustSolver``: batch 1).  Pure torch, device-agnostic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .geometry import Projection
from .ppc import PPCSolution, out_of_plane_damping, ppc_system, solve_ppc

__all__ = ["SolveResult", "PlainSolver", "RobustSolver", "point_residuals", "reprojection_cost", "tukey_weights"]


@dataclass
class SolveResult:
    """What a solver did: ``solution`` (:class:`~PPCRegistrationLib.ppc.PPCSolution`, the twist ``dv (B, 6)`` about
    ``centre``) and the final weights ``(B, N)`` of the correspondences (after consensus and re-weighting)."""

    solution: PPCSolution
    weights: torch.Tensor


def point_residuals(points: torch.Tensor, gradients: torch.Tensor, source: torch.Tensor, rays: torch.Tensor,
                    sol: PPCSolution) -> torch.Tensor:
    """Point-to-plane residuals ``(B, N)`` (mm) of correspondences after the solve ``sol``."""
    a, b = ppc_system(points, gradients, source, rays, sol.centre)
    return (a @ sol.dv[..., None])[..., 0] - b


def _mm_per_px(projection: Projection, points: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` millimetres per detector pixel at the depth of ``points (B, N, 3)``."""
    return projection.depth(points) * projection.pixel_spacing[:, :1] / projection.sdd[:, None]


def tukey_weights(res: torch.Tensor, valid: torch.Tensor, c: float = 4.685) -> torch.Tensor:
    """Tukey biweight ``(B, N)`` of residuals scaled by their robust spread (1.4826 MAD, at least 0.3 mm)."""
    out = torch.zeros_like(res)
    for b in range(res.shape[0]):
        r = res[b][valid[b]]
        if r.numel() < 6:
            out[b] = valid[b].to(res.dtype)
            continue
        med = r.median()
        sigma = max(1.4826 * float((r - med).abs().median()), 0.3)
        u = (res[b] - med) / (c * sigma)
        out[b] = torch.where(u.abs() < 1, (1 - u * u) ** 2, torch.zeros_like(u)) * valid[b].to(res.dtype)
    return out


def reprojection_cost(points: torch.Tensor, gradients: torch.Tensor, projection: Projection, rays: torch.Tensor,
                      weights: torch.Tensor, sol: PPCSolution | None = None, cap_px: float = 3.0) -> float:
    """Weighted mean truncated quadratic (px^2) of the point-to-plane residuals of one system (batch 1), in detector
    pixels at the points' depth: at its linearisation point (``sol`` None) or as predicted after ``sol``.  The
    Levenberg–Marquardt loop compares the predicted and the re-measured cost (docs/design.md §4.2)."""
    w = weights[0]
    if sol is None:
        centre = (w[:, None] * points[0]).sum(0, keepdim=True) / w.sum().clamp_min(1e-12)
        r = -ppc_system(points, gradients, projection.source, rays, centre)[1][0]
    else:
        r = point_residuals(points, gradients, projection.source, rays, sol)[0]
    px = r / _mm_per_px(projection, points)[0]
    return float((w * torch.clamp(px * px, max=cap_px ** 2)).sum() / w.sum().clamp_min(1e-12))


class PlainSolver:
    """One weighted PPC solve with the matcher's weights, the out-of-plane directions damped by ``out_of_plane``
    (relative to the mean eigenvalue; 0 = none) and Tikhonov ``regularization``: the learned operator's known
    operator, differentiable, batched."""

    def __init__(self, out_of_plane: float = 1.0, regularization: float = 1e-5) -> None:
        self.out_of_plane, self.regularization = float(out_of_plane), float(regularization)

    def __call__(self, points: torch.Tensor, gradients: torch.Tensor, projection: Projection, rays: torch.Tensor,
                 weights: torch.Tensor) -> SolveResult:
        damp = out_of_plane_damping(projection.R, self.out_of_plane) if self.out_of_plane > 0 else None
        if damp is not None and damp.shape[0] != points.shape[0]:
            damp = damp.expand(points.shape[0], 6, 6)
        sol = solve_ppc(points, gradients, projection.source.expand(points.shape[0], 3), rays, weights,
                        regularization=self.regularization, damping=damp)
        return SolveResult(sol, weights)


class RobustSolver:
    """The classic solve of one update (batch 1): RANSAC consensus, then ``robust_iterations`` Tukey re-weighted
    damped solves.

    Args:
        damping: Tikhonov damping of all six directions (relative to the mean eigenvalue).
        out_of_plane: damping of the weakly observable directions of the view (depth translation, rotations about
            the detector axes); its floor ``out_of_plane_min`` is scaled by (spread of the residuals in pixels /
            ``out_of_plane_noise_px``)^2, so noisy correspondences cannot drag the weak directions and exact ones
            still converge (docs/design.md §3.8).
        lm: the Levenberg–Marquardt factor of the loop, multiplying every damping above.
        ransac_hypotheses, ransac_sample, ransac_threshold_px: minimal sets, their size, inlier threshold (px).
        robust_iterations: re-weighted solves after the consensus.
        seed: of the consensus draws (the loop seeds it by the update's place in its attempt).
    """

    def __init__(self, *, damping: float, out_of_plane: float, out_of_plane_min: float, out_of_plane_noise_px: float,
                 lm: float = 1.0, ransac_hypotheses: int = 256, ransac_sample: int = 12,
                 ransac_threshold_px: float = 1.5, robust_iterations: int = 2, seed: int = 0) -> None:
        self.damping, self.out_of_plane, self.lm = float(damping), float(out_of_plane), float(lm)
        self.out_of_plane_min, self.noise_px = float(out_of_plane_min), float(out_of_plane_noise_px)
        self.k, self.m, self.threshold_px = int(ransac_hypotheses), int(ransac_sample), float(ransac_threshold_px)
        self.robust_iterations, self.seed = int(robust_iterations), int(seed)

    def _damping_matrix(self, projection: Projection, mu: float) -> torch.Tensor:
        return out_of_plane_damping(projection.R[:1], mu * self.lm)

    def consensus(self, points: torch.Tensor, gradients: torch.Tensor, projection: Projection, rays: torch.Tensor,
                  weights: torch.Tensor, damping_matrix: torch.Tensor) -> torch.Tensor:
        """``(1, N)`` 0/1 inlier mask of the best-supported motion over ``ransac_hypotheses`` minimal sets drawn in
        proportion to the weights; a correspondence supports a motion when its point-to-plane residual is below
        ``ransac_threshold_px`` detector pixels at its depth."""
        w = weights[0]
        n, k, m = w.shape[0], self.k, self.m
        if k <= 0 or n < 2 * m:
            return (w > 0).to(w.dtype)[None]
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        idx = torch.multinomial((w.cpu() + 1e-12).expand(k, n), m, replacement=False, generator=gen).to(w.device)
        src = projection.source
        centre = (w[:, None] * points[0]).sum(0) / w.sum().clamp_min(1e-12)
        sol = solve_ppc(points[0][idx], gradients[0][idx], src.expand(k, 3), rays[0][idx], w[idx],
                        regularization=self.damping * self.lm, centre=centre[None].expand(k, 3),
                        damping=damping_matrix.expand(k, 6, 6))
        a, b = ppc_system(points, gradients, src, rays, centre[None])
        res = (a[0] @ sol.dv.T).T - b  # (K, N) mm
        inl = (res.abs() < self.threshold_px * _mm_per_px(projection, points)[0][None]) & (w[None] > 0)
        score = (inl.to(w.dtype) * w[None]).sum(-1)
        score = torch.where(sol.rank_deficient, torch.zeros_like(score), score)
        return inl[int(score.argmax())].to(w.dtype)[None]

    def __call__(self, points: torch.Tensor, gradients: torch.Tensor, projection: Projection, rays: torch.Tensor,
                 weights: torch.Tensor) -> SolveResult:
        damp = self._damping_matrix(projection, max(self.out_of_plane, self.out_of_plane_min))
        w0 = weights * self.consensus(points, gradients, projection, rays, weights, damp)
        if int((w0 > 0).sum()) < 6:
            w0 = weights
        wts, sol = w0, None
        for r in range(self.robust_iterations + 1):
            sol = solve_ppc(points, gradients, projection.source, rays, wts, regularization=self.damping * self.lm,
                            damping=damp)
            if r == self.robust_iterations:
                break
            res = point_residuals(points, gradients, projection.source, rays, sol)
            wts = w0 * tukey_weights(res, w0 > 0)
            if r == 0:  # the noise-scaled floor of the out-of-plane damping
                valid = w0[0] > 0
                r_in = res[0][valid]
                if r_in.numel() >= 6:
                    mm_px = _mm_per_px(projection, points)[0][valid]
                    spread = float((1.4826 * (r_in - r_in.median()).abs() / mm_px).median())
                    floor = self.out_of_plane_min * min(1.0, (spread / self.noise_px) ** 2)
                    damp = self._damping_matrix(projection, max(self.out_of_plane, floor))
        return SolveResult(sol, wts)
