"""The learned 2D part of the update operator (docs/design.md §3): :class:`LearnedOperator` (FlowNetC
correspondences plus, for ``ppc-flow-attention``, PointNet weights) and :func:`network_inputs`, the gradient
images its flow network sees; with the names of the learned methods and the CPU-sized FlowNetC.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import EVIDENCE_FEATURES, POINT_FEATURES, PointNetAttention, match_evidence
from .gradients import image_gradient
from .errors import InputError
from .flownet import FlowNetC, mirror_averaged_flow
from .flow_ops import sample_flow

__all__ = ["LearnedOperator", "network_inputs", "LEARNED_METHODS", "CPU_FLOW_HPARAMS"]

#: the three learned models of docs/design.md §3 (one code path, :class:`LearnedOperator`).
LEARNED_METHODS = ("flow", "ppc-flow", "ppc-flow-attention")
#: a FlowNetC small enough to train on a CPU (0.30 s per batch of 16 at 128 x 128 on one core; 0.14 M
#: parameters); its correlation reaches +-32 network pixels.
CPU_FLOW_HPARAMS = {"stride": 8, "max_disp": 4, "channels": 32, "decoder_channels": [64, 48, 32],
                    "first_channels": 16, "soft_argmax": True}


def network_inputs(drr: torch.Tensor, xray: torch.Tensor, factor: float = 1.0,
                   sigma_px: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient images the flow network sees, from a DRR and an X-ray on the same pixel grid.

    The images are first reduced by ``factor`` (area averaging: ``factor`` registration pixels make one network
    pixel), then differentiated with a Gaussian of ``sigma_px`` network pixels. Training (data already on the
    network grid, ``factor = 1``) and registration (finer detectors) share this function, so the network
    always sees the same kind of input.

    Args:
        drr: ``(B, H, W)`` DRR (line integrals, any scale).
        xray: ``(B, H, W)`` X-ray, attenuation-positive (bone bright).
        factor: network pixel size / image pixel size (>= 1; 1 = no reduction).
        sigma_px: gradient smoothing (network pixels).
    Returns:
        ``(drr_grad, xray_grad)``, each ``(B, 2, ceil(H / factor), ceil(W / factor))``.
    """
    if drr.shape != xray.shape or drr.ndim != 3:
        raise InputError(f"network_inputs needs a DRR and an X-ray of equal shape (B, H, W), got "
                         f"{tuple(drr.shape)} and {tuple(xray.shape)}")
    if not factor >= 1.0:
        raise InputError(f"the reduction factor must be >= 1 (network pixel / image pixel), got {factor}")
    x = torch.stack([drr, xray], 1).to(torch.float32)  # (B, 2, H, W)
    if factor > 1.0 + 1e-6:
        h, w = x.shape[-2:]
        k = int(round(factor))
        if abs(factor - k) < 1e-3:
            x = F.pad(x, (0, (-w) % k, 0, (-h) % k), mode="replicate")
            x = F.avg_pool2d(x, k)
        else:
            x = F.interpolate(x, size=(math.ceil(h / factor), math.ceil(w / factor)), mode="bilinear",
                              align_corners=False, antialias=True)
    b = x.shape[0]
    g = image_gradient(x.reshape(2 * b, *x.shape[-2:]) if b else x[:, 0], sigma_px=sigma_px)
    g = g.reshape(b, 2, 2, *g.shape[-2:])
    return g[:, 0], g[:, 1]


class LearnedOperator(nn.Module):
    """The learned 2D part of the update operator: FlowNetC correspondences and, for
    ``ppc-flow-attention``, PointNet weights. The PPC solve that follows is :func:`~PPCRegistrationLib.ppc.solve_ppc`.

    Args:
        method: ``"flow"``, ``"ppc-flow"`` or ``"ppc-flow-attention"`` (the first two differ only in training).
        network_pixel_mm: detector pixel size (mm) of the network grid (the training data's detector); a
            registration on a finer detector reduces its images by ``network_pixel_mm / its pixel size``.
        sigma_px: gradient smoothing (network pixels), see :func:`network_inputs`.
        flow: :class:`FlowNetC` hyper-parameters (default :data:`CPU_FLOW_HPARAMS`).
        attention: :class:`PointNetAttention` hyper-parameters (used by ``ppc-flow-attention`` only).
        evidence: the attention also sees the local matching evidence of each correspondence
            (:func:`match_evidence`: gradient agreement, patch correlation, consistency with the other points'
            motion), not only the geometry of :func:`point_features` (``ppc-flow-attention`` only; model files
            written before it existed have none).
        window_px: side (network pixels) of the square window around the region of interest the operator was trained
            on (the data set's ``crop_px``); the registration renders the same window for it. None: not recorded
            (model files written before it was), the registration then renders the region with a margin.
    Attributes:
        hparams: the constructor arguments (stored in model files).
    """

    def __init__(self, method: str = "ppc-flow-attention", network_pixel_mm: float = 380.0 / 256,
                 sigma_px: float = 1.0, flow: dict | None = None, attention: dict | None = None,
                 evidence: bool = False, window_px: int | None = None) -> None:
        super().__init__()
        if method not in LEARNED_METHODS:
            raise InputError(f"unknown learned method {method!r}: use one of {', '.join(LEARNED_METHODS)}")
        if not network_pixel_mm > 0:
            raise InputError(f"network_pixel_mm must be positive (mm), got {network_pixel_mm}")
        flow = dict(CPU_FLOW_HPARAMS if flow is None else flow)
        if "decoder_channels" in flow:
            flow["decoder_channels"] = tuple(flow["decoder_channels"])
        self.method = method
        self.network_pixel_mm = float(network_pixel_mm)
        self.sigma_px = float(sigma_px)
        self.flow_net = FlowNetC(**flow)
        self.evidence = bool(evidence) and method == "ppc-flow-attention"
        att = dict(attention or {})
        if self.evidence:
            att.setdefault("in_features", POINT_FEATURES + EVIDENCE_FEATURES)
            if int(att["in_features"]) != POINT_FEATURES + EVIDENCE_FEATURES:
                raise InputError(f"attention with matching evidence needs in_features = "
                                 f"{POINT_FEATURES + EVIDENCE_FEATURES}, got {att['in_features']}")
        self.attention = PointNetAttention(**att) if method == "ppc-flow-attention" else None
        self.hparams = {"method": method, "network_pixel_mm": self.network_pixel_mm, "sigma_px": self.sigma_px,
                        "flow": dict(self.flow_net.hparams),
                        "attention": None if self.attention is None else dict(self.attention.hparams)}
        if self.evidence:  # absent (False) in the files of models without it
            self.hparams["evidence"] = True
        if window_px is not None and int(window_px) < 8:
            raise InputError(f"window_px must be at least 8 network pixels, got {window_px}")
        self.window_px = None if window_px is None else int(window_px)
        if self.window_px is not None:
            self.hparams["window_px"] = self.window_px

    def factor_for(self, pixel_spacing_mm: float | None) -> float:
        """Reduction factor for images of ``pixel_spacing_mm`` detector pixels (1 when unknown or coarser)."""
        if pixel_spacing_mm is None or not pixel_spacing_mm > 0:
            return 1.0
        return max(1.0, self.network_pixel_mm / float(pixel_spacing_mm))

    def forward(self, drr: torch.Tensor, xray: torch.Tensor, uv: torch.Tensor, mask: torch.Tensor | None = None,
                points_3d: torch.Tensor | None = None, gradients_3d: torch.Tensor | None = None,
                source: torch.Tensor | None = None, centre: torch.Tensor | None = None,
                factor: float = 1.0, flips: int = 1) -> dict[str, torch.Tensor]:
        """Correspondences and weights for the projected contour points.

        Args:
            drr: ``(B, H, W)`` DRR at the current estimate; xray: ``(B, H, W)`` X-ray on the same grid.
            uv: ``(B, N, 2)`` projected contour points p_i (image pixels of that grid).
            mask: ``(B, N)`` bool, valid (non-padding) points; default all.
            points_3d, gradients_3d: ``(B, N, 3)`` moved contour points (mm) and rotated gradients; source
                ``(B, 3)`` (mm); centre ``(B, 3)`` optional. Needed by ``ppc-flow-attention`` only.
            factor: image pixel / network pixel reduction (see :meth:`factor_for`).
            flips: mirrorings of the images the flow is averaged over (:func:`mirror_averaged_flow`): 1 as in
                training, 4 in the registration (``RegistrationConfig.flow_flips``).
        Returns:
            ``{"uv_matched": (B, N, 2), "flow": (B, N, 2), "weights": (B, N)}`` in image pixels; weights are
            1 (times the mask) without attention.
        """
        if uv.ndim != 3 or uv.shape[0] != drr.shape[0] or uv.shape[-1] != 2:
            raise InputError(f"uv must be (B, N, 2) with B = {drr.shape[0]}, got {tuple(uv.shape)}")
        p = next(self.flow_net.parameters())
        f = float(factor)
        dg, xg = network_inputs(drr.to(p.device), xray.to(p.device), f, self.sigma_px)
        flow = mirror_averaged_flow(self.flow_net, xg, dg, int(flips))
        uv_n = (uv.to(p.device, p.dtype) - (f - 1) / 2) / f  # image pixel -> network pixel (area reduction)
        dp_n = sample_flow(flow, uv_n)
        dp = dp_n * f
        m = torch.ones(uv.shape[:2], dtype=torch.bool, device=p.device) if mask is None else mask.to(p.device,
                                                                                                      torch.bool)
        if self.attention is None:
            weights = m.to(p.dtype)
        else:
            if points_3d is None or gradients_3d is None or source is None:
                raise InputError("ppc-flow-attention needs the contour points, their gradients and the source "
                                 "(points_3d, gradients_3d, source)")
            extra = match_evidence(dg, xg, uv_n, uv_n + dp_n, m) if self.evidence else None
            weights = self.attention.weigh(uv_n, uv_n + dp_n, points_3d, gradients_3d, source, centre,
                                           m, extra).to(p.device, p.dtype)
        return {"uv_matched": uv.to(p.device, p.dtype) + dp, "flow": dp, "weights": weights}
