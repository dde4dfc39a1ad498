"""The learned operator of docs/design.md §3 as the registration uses it: :class:`LearnedMatcher`, the
:class:`~PPCRegistrationLib.registration.Matcher` built from a learned operator or a bare flow network. The
operator's public names are importable from here too; they live in one module per part:

* :mod:`.flow_ops`: robust normalisation, correlation cost volume, bilinear flow sampling and warping;
* :mod:`.flownet`: the small FlowNetC of the 2D matching, and its flow averaged over mirrorings;
* :mod:`.attention`: the PointNet attention for the weights, and its per-point features;
* :mod:`.learned_operator`: :class:`LearnedOperator` (flow network + attention) and its network inputs;
* :mod:`.model_files`: the checked model file format (:func:`save_model`, :func:`load_model`,
  :func:`operator_from_file`).

Conventions used throughout:

* Images are gradient images ``(B, 2, H, W)`` with channels (d/du, d/dv); u = column, v = row, pixel centres
  at integer coordinates.
* The flow is defined on the DRR grid and points from the DRR to the X-ray, in pixels:
  a DRR pixel p corresponds to the X-ray position ``p' = p + flow(p)``.
* Everything is plain torch (no custom kernels), works on any device and is differentiable end to end, so
  the networks can be trained through :func:`~PPCRegistrationLib.ppc.solve_ppc`.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import (EVIDENCE_FEATURES, POINT_FEATURES, PointNetAttention, match_evidence,
                        point_features)
from .errors import InputError
from .flow_ops import correlation, correlation_displacements, robust_normalise, sample_flow, warp
from .flownet import MIRRORINGS, FlowNetC, FlowRefinement, mirror_averaged_flow
from .learned_operator import CPU_FLOW_HPARAMS, LEARNED_METHODS, LearnedOperator, network_inputs
from .model_files import MODEL_FORMAT, MODEL_VERSION, load_model, operator_from_file, save_model, state_dict_sha256

__all__ = [
    "FlowNetC", "PointNetAttention", "LearnedMatcher", "correlation", "correlation_displacements",
    "sample_flow", "point_features", "POINT_FEATURES", "robust_normalise", "save_model", "load_model",
    "state_dict_sha256", "MODEL_FORMAT", "MODEL_VERSION", "LearnedOperator", "LEARNED_METHODS", "network_inputs",
    "CPU_FLOW_HPARAMS", "operator_from_file", "FlowRefinement", "warp", "match_evidence", "EVIDENCE_FEATURES",
    "mirror_averaged_flow", "MIRRORINGS",
]


# ----------------------------------------------------------------------------- the Matcher

class LearnedMatcher:
    """The learned 2D matching step: a :class:`~PPCRegistrationLib.registration.Matcher`.

    Built from a :class:`LearnedOperator` (the normal case: it reduces the DRR and X-ray windows to its network
    grid using ``context["pixel_spacing_mm"]`` and computes its own gradients), or from a bare
    :class:`FlowNetC` (and optional :class:`PointNetAttention`), which then runs on the registration's gradient
    images as they are.

    ``p'_i = p_i + flow(p_i)``; weights from the attention (all ones without it), times the contour mask, and 0 for
    matches leaving the window or farther than ``search_px`` (when ``limit_to_search``).

    With attention, ``context`` must hold ``"points_3d"`` ``(1, N, 3)`` (moved contour points, mm),
    ``"gradients_3d"`` ``(1, N, 3)`` (rotated gradients), ``"source"`` ``(1, 3)`` (mm) and optionally
    ``"centre"`` ``(1, 3)`` (mm); :class:`~PPCRegistrationLib.registration.Registration` passes them.

    Args:
        model: a :class:`LearnedOperator`, or a :class:`FlowNetC`.
        attention: optional :class:`PointNetAttention` (only with a bare FlowNetC).
        limit_to_search: drop (weight 0) matches displaced by more than the registration's search range.
        enable_grad: keep the autograd graph (training); the default runs under ``torch.no_grad``.
    """

    def __init__(self, model: nn.Module, attention: PointNetAttention | None = None, *,
                 limit_to_search: bool = True, enable_grad: bool = False) -> None:
        if isinstance(model, LearnedOperator):
            if attention is not None:
                raise InputError("a LearnedOperator carries its own attention: do not pass another one")
            self.operator: LearnedOperator | None = model
            self.flow_net = model.flow_net
            self.attention = model.attention
        elif isinstance(model, FlowNetC):
            self.operator = None
            self.flow_net = model
            self.attention = attention
        else:
            raise InputError(f"LearnedMatcher needs a LearnedOperator or a FlowNetC, got {type(model).__name__}")
        self.limit_to_search = limit_to_search
        self.enable_grad = enable_grad

    @property
    def method(self) -> str:
        if self.operator is not None:
            return self.operator.method
        return "ppc-flow-attention" if self.attention is not None else "ppc-flow"

    def __call__(self, drr: torch.Tensor, xray: torch.Tensor, drr_grad: torch.Tensor, xray_grad: torch.Tensor,
                 uv: torch.Tensor, normals: torch.Tensor, mask: torch.Tensor, search_px: float,
                 context: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """See :class:`~PPCRegistrationLib.registration.Matcher`: returns ``uv_matched (1, N, 2)`` (window
        pixels, ``uv``'s dtype and device) and weights ``(1, N)`` in [0, 1]."""
        with torch.set_grad_enabled(self.enable_grad and torch.is_grad_enabled()):
            return self._match(drr, xray, drr_grad, xray_grad, uv, mask, search_px, context or {})

    def _match(self, drr, xray, drr_grad, xray_grad, uv, mask, search_px, context):
        p = next(self.flow_net.parameters())
        dev = p.device
        m = mask.to(dev, torch.bool)
        flips = int(context.get("flow_flips", 1))
        if self.attention is not None:
            missing = [k for k in ("points_3d", "gradients_3d", "source") if k not in context]
            if missing:
                raise InputError(f"LearnedMatcher with attention needs {missing} in the matcher context "
                                 "(moved contour points, rotated gradients, source); the registration loop "
                                 "must pass them")
        if self.operator is not None:
            if drr is None or xray is None:
                raise InputError("a LearnedOperator matches the DRR and X-ray images: pass both windows")
            f = self.operator.factor_for(context.get("pixel_spacing_mm"))
            out = self.operator(drr.reshape(1, *drr.shape[-2:]), xray.reshape(1, *xray.shape[-2:]), uv, m,
                                context.get("points_3d"), context.get("gradients_3d"), context.get("source"),
                                context.get("centre"), factor=f, flips=flips)
            h, w = drr.shape[-2:]
            uv_m, dp, weights = out["uv_matched"], out["flow"], out["weights"]
        else:
            h, w = drr_grad.shape[-2:]
            flow = mirror_averaged_flow(self.flow_net, xray_grad.to(dev), drr_grad.to(dev), flips)
            uv_n = uv.to(dev, p.dtype)
            dp = sample_flow(flow, uv_n)
            uv_m = uv_n + dp
            if self.attention is None:
                weights = torch.ones_like(uv_m[..., 0])
            else:
                weights = self.attention.weigh(uv_n, uv_m, context["points_3d"], context["gradients_3d"],
                                               context["source"], context.get("centre"), m).to(dev, p.dtype)
        valid = m & (uv_m[..., 0] >= 0) & (uv_m[..., 0] <= w - 1) & (uv_m[..., 1] >= 0) & (uv_m[..., 1] <= h - 1)
        if self.limit_to_search and search_px is not None and search_px > 0:
            valid = valid & (torch.linalg.norm(dp, dim=-1) <= float(search_px))
        weights = (weights * valid.to(weights.dtype)).clamp(0, 1)
        return uv_m.to(uv.device, uv.dtype), weights.to(uv.device, uv.dtype)
