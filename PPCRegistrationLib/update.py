"""The PPC update operator (docs/design.md §3): ONE function, :func:`ppc_update`, that training, the registration
loop and the benchmark call.  Given a batch of registrations at their current estimates (the contour points, their
projections in the rendered window, the window's DRR and X-ray) it matches the points (a :class:`~.matchers.Matcher`),
turns every correspondence into a point-to-plane constraint and solves for the rigid update (a solver of
:mod:`.solvers`), and returns the new poses with everything it used.

Differentiable end to end when the matcher is (the learned operators train through it: the PPC solve is their known
operator).  Device-agnostic; the PPC solve runs in float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .geometry import Projection, centred_update
from .matchers import Matcher
from .solvers import SolveResult

__all__ = ["UpdateState", "UpdateResult", "ppc_update"]


@dataclass
class UpdateState:
    """A batch of B registrations at one update (window = the rendered part of the detector).

    T: ``(B, 4, 4)`` current estimates (move the CT).  points / gradients: ``(B, N, 3)`` contour points moved by T
    (world mm) and their rotated 3D gradients.  uv: ``(B, N, 2)`` their projections (window pixels, u = column);
    normals: ``(B, N, 2)`` their 2D normals (or None for matchers that need none); mask: ``(B, N)`` bool, real
    points.  projection: the window's C-arm (batch B or 1).  drr / xray: ``(B, h, w)`` window images;
    drr_grad / xray_grad: ``(B, 2, h, w)`` their gradients (or None).  search_px: the matching's search range
    (px).  context: extra inputs of a matcher (e.g. ``T_gt`` for the oracle, ``flow_flips``).
    """

    T: torch.Tensor
    points: torch.Tensor
    gradients: torch.Tensor
    uv: torch.Tensor
    mask: torch.Tensor
    projection: Projection
    drr: torch.Tensor | None = None
    xray: torch.Tensor | None = None
    drr_grad: torch.Tensor | None = None
    xray_grad: torch.Tensor | None = None
    normals: torch.Tensor | None = None
    search_px: float = 0.0
    context: dict = field(default_factory=dict)


@dataclass
class UpdateResult:
    """What one update did, per registration of the batch.

    T: ``(B, 4, 4)`` the updated estimates.  uv_matched: ``(B, N, 2)`` the correspondences (window pixels).
    match_weights: ``(B, N)`` the matcher's weights (times the mask); weights: ``(B, N)`` the solver's final weights.
    solve: the :class:`~.solvers.SolveResult` (its ``solution`` has ``dv``, ``centre``, ``rank_deficient``,
    ``residual_mm`` ...).
    """

    T: torch.Tensor
    uv_matched: torch.Tensor
    match_weights: torch.Tensor
    weights: torch.Tensor
    solve: SolveResult


def match(state: UpdateState, matcher: Matcher) -> tuple[torch.Tensor, torch.Tensor]:
    """The matching step alone: ``uv_matched (B, N, 2)`` and weights ``(B, N)`` (times the mask)."""
    context = {"points_3d": state.points, "gradients_3d": state.gradients, "source": state.projection.source,
               "T": state.T, **state.context}
    uv_m, w = matcher(state.drr, state.xray, state.drr_grad, state.xray_grad, state.uv, state.normals, state.mask,
                      state.search_px, context)
    return uv_m, w * state.mask.to(w.dtype)


def ppc_update(state: UpdateState, matcher: Matcher, solver: Callable[..., SolveResult], *,
               matches: tuple[torch.Tensor, torch.Tensor] | None = None) -> UpdateResult:
    """One update of the PPC operator for a batch of registrations: match, solve, apply the centred rigid update
    ``T' = C exp(dv) C^-1 T`` (docs/design.md §2, §3).

    ``matches``: the matcher's output for this state when the caller already has it (the registration loop looks at
    the correspondences before it chooses the solver's damping); the matcher is then not called again."""
    uv_m, w = match(state, matcher) if matches is None else matches
    proj = state.projection
    rays = proj.ray_directions(uv_m.to(torch.float64))
    solved = solver(state.points.to(torch.float64), state.gradients.to(torch.float64), proj, rays,
                    w.to(torch.float64).clamp(0, 1))
    T_new = centred_update(solved.solution.dv, solved.solution.centre, state.T.to(torch.float64))
    return UpdateResult(T=T_new, uv_matched=uv_m, match_weights=w, weights=solved.weights, solve=solved)
