"""The matching step of the PPC update operator (docs/design.md §3.4-3.5): where each projected contour point moved
to in the X-ray, with a weight.  A matcher is any callable with the :class:`Matcher` signature; the learned one is
:class:`~PPCRegistrationLib.networks.LearnedMatcher`."""

from __future__ import annotations

from typing import Protocol

import torch

from .errors import InputError
from .geometry import invert_rigid, transform_points
from .matching import match_along_normals

__all__ = ["Matcher", "ClassicMatcher", "OracleMatcher"]


class Matcher(Protocol):
    """The 2D matching step of the update operator (classic or learned).

    Given the DRR and X-ray gradient images of the rendered window ``(1, 2, h, w)``, the X-ray window
    ``(1, h, w)`` and DRR window ``(1, h, w)``, the projected contour points ``uv (1, N, 2)`` (window pixels),
    their 2D normals ``(1, N, 2)``, the contour mask ``(1, N)`` and the search range (px), return the matched
    positions ``(1, N, 2)`` (window pixels) and weights ``(1, N)`` in [0, 1] (0 = no correspondence).
    """

    def __call__(self, drr: torch.Tensor, xray: torch.Tensor, drr_grad: torch.Tensor, xray_grad: torch.Tensor,
                 uv: torch.Tensor, normals: torch.Tensor, mask: torch.Tensor, search_px: float,
                 context: dict) -> tuple[torch.Tensor, torch.Tensor]: ...


class ClassicMatcher:
    """Search along the 2D normal for the best normalised correlation of gradient profiles (classic PPC)."""

    def __call__(self, drr, xray, drr_grad, xray_grad, uv, normals, mask, search_px, context):
        res = match_along_normals(drr_grad, xray_grad, uv, normals, mask, search_px=search_px)
        w = res.score * res.valid.to(res.score.dtype) * mask.to(res.score.dtype)
        return res.uv_matched, w


class OracleMatcher:
    """The ground-truth correspondences (simulation only): each contour point is matched to the projection of the
    same CT point at the ground truth, ``p'_i = P(T_gt T^-1 w_i)``, weight 1.

    It measures what the PPC solve itself can do (the ceiling of one update with perfect 2D matching); it needs
    the registration's ``T_gt``.
    """

    def __call__(self, drr, xray, drr_grad, xray_grad, uv, normals, mask, search_px, context):
        T_gt = context.get("T_gt")
        if T_gt is None:
            raise InputError("the oracle matcher needs the ground-truth transform (T_gt): it is for simulations only")
        T = context["T"].to(torch.float64)
        moved = transform_points(T_gt.to(torch.float64) @ invert_rigid(T), context["points_3d"].to(torch.float64))
        uv_true = context["window_projection"].project(moved)
        return uv_true.to(uv.dtype), mask.to(uv.dtype)
