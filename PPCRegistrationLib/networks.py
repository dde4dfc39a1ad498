"""The learned operator of docs/design.md §3: a small FlowNetC for the 2D matching, PointNet attention for the
weights, a :class:`~PPCRegistrationLib.registration.Matcher` built from them, and a checked model file format.

Conventions used throughout:

* Images are gradient images ``(B, 2, H, W)`` with channels (d/du, d/dv); u = column, v = row, pixel centres
  at integer coordinates.
* The flow is defined on the DRR grid and points from the DRR to the X-ray, in pixels:
  a DRR pixel p corresponds to the X-ray position ``p' = p + flow(p)``.
* Everything is plain torch (no custom kernels), works on any device and is differentiable end to end, so
  the networks can be trained through :func:`~PPCRegistrationLib.ppc.solve_ppc`.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .drr import image_gradient
from .errors import InputError, ModelFileError

__all__ = [
    "FlowNetC", "PointNetAttention", "LearnedMatcher", "correlation", "correlation_displacements",
    "sample_flow", "point_features", "POINT_FEATURES", "robust_normalise", "save_model", "load_model",
    "state_dict_sha256", "MODEL_FORMAT", "MODEL_VERSION", "LearnedOperator", "LEARNED_METHODS", "network_inputs",
    "CPU_FLOW_HPARAMS", "operator_from_file", "FlowRefinement", "warp", "match_evidence", "EVIDENCE_FEATURES",
    "mirror_averaged_flow", "MIRRORINGS",
]

#: the three learned models of docs/design.md §3 (one code path, :class:`LearnedOperator`).
LEARNED_METHODS = ("flow", "ppc-flow", "ppc-flow-attention")
#: a FlowNetC small enough to train on a CPU (0.30 s per batch of 16 at 128 x 128 on one core; 0.14 M
#: parameters); its correlation reaches +-32 network pixels.
CPU_FLOW_HPARAMS = {"stride": 8, "max_disp": 4, "channels": 32, "decoder_channels": [64, 48, 32],
                    "first_channels": 16, "soft_argmax": True}

MODEL_FORMAT = "PPCRegistrationLib.model"
MODEL_VERSION = 1
#: number of channels produced by :func:`point_features` (without extra match features).
POINT_FEATURES = 14
#: number of channels produced by :func:`match_evidence` (the attention's local matching evidence).
EVIDENCE_FEATURES = 5


# ----------------------------------------------------------------------------- building blocks

def robust_normalise(grad: torch.Tensor, quantile: float = 0.98, eps: float = 1e-12) -> torch.Tensor:
    """Divide each gradient image by its own robust scale.

    The scale is the ``quantile`` of the gradient magnitude over the image, but at least 5 % of the maximum
    magnitude (so that sparse gradient images, mostly zero, are not blown up). Differentiable.

    Args:
        grad: ``(B, 2, H, W)`` gradient image (any unit).
        quantile: which quantile of the magnitude is mapped to ~1.
        eps: floor of the scale (a constant image stays zero).
    Returns:
        ``(B, 2, H, W)`` dimensionless gradients, typically within [-1, 1] for edges.
    """
    b = grad.shape[0]
    mag = torch.sqrt((grad * grad).sum(1) + 1e-20).reshape(b, -1)  # (B, HW)
    if mag.shape[1] > 2 ** 22:  # torch.quantile size limit: subsample regularly
        mag_q = mag[:, :: math.ceil(mag.shape[1] / 2 ** 22)]
    else:
        mag_q = mag
    q = torch.quantile(mag_q, quantile, dim=1)
    scale = torch.maximum(q, 0.05 * mag.amax(1)).clamp_min(eps)
    return grad / scale[:, None, None, None]


def correlation_displacements(max_disp: int) -> torch.Tensor:
    """``((2d+1)^2, 2)`` integer displacements (du, dv) in the channel order of :func:`correlation`.

    Channel ``k = (dv + d) * (2d + 1) + (du + d)``.
    """
    r = torch.arange(-max_disp, max_disp + 1)
    dv, du = torch.meshgrid(r, r, indexing="ij")
    return torch.stack([du.reshape(-1), dv.reshape(-1)], -1)


def correlation(f1: torch.Tensor, f2: torch.Tensor, max_disp: int) -> torch.Tensor:
    """Cost volume: channel-mean products of ``f1(p)`` and ``f2(p + d)`` for all ``|du|, |dv| <= max_disp``.

    ``f2`` is zero-padded, so displacements leaving the image correlate with zeros.

    Args:
        f1: ``(B, C, h, w)`` features of the first image (the DRR).
        f2: ``(B, C, h, w)`` features of the second image (the X-ray).
        max_disp: d, the largest displacement (feature pixels).
    Returns:
        ``(B, (2d+1)^2, h, w)``; channel order as :func:`correlation_displacements`.
    """
    if f1.shape != f2.shape:
        raise InputError(f"correlation needs features of equal shape, got {tuple(f1.shape)} and {tuple(f2.shape)}")
    d = int(max_disp)
    _, _, h, w = f1.shape
    f2p = F.pad(f2, (d, d, d, d))
    out = []
    for dv in range(-d, d + 1):
        for du in range(-d, d + 1):
            shifted = f2p[:, :, d + dv:d + dv + h, d + du:d + du + w]
            out.append((f1 * shifted).mean(1))
    return torch.stack(out, 1)


def sample_flow(flow: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of a flow field at pixel positions.

    Positions outside the image take the value of the nearest border pixel.

    Args:
        flow: ``(B, 2, H, W)`` flow (pixels).
        uv: ``(B, N, 2)`` positions (u = column, v = row; pixel centres at integers).
    Returns:
        ``(B, N, 2)`` flow vectors (pixels), in ``flow``'s dtype; differentiable in ``flow`` and ``uv``.
    """
    if flow.ndim != 4 or flow.shape[1] != 2:
        raise InputError(f"flow must be (B, 2, H, W), got {tuple(flow.shape)}")
    if uv.ndim != 3 or uv.shape[-1] != 2 or uv.shape[0] != flow.shape[0]:
        raise InputError(f"uv must be (B, N, 2) with B = {flow.shape[0]}, got {tuple(uv.shape)}")
    return _bilinear(flow, uv, "border")


def _bilinear(image: torch.Tensor, uv: torch.Tensor, padding: str = "zeros") -> torch.Tensor:
    """Bilinear samples ``(B, N, C)`` of ``image (B, C, H, W)`` at pixel positions ``uv (B, N, 2)`` (u = column,
    v = row, pixel centres at integers); outside the image: ``padding`` (``"zeros"`` or ``"border"``)."""
    b, _, h, w = image.shape
    scale = torch.tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)], dtype=image.dtype, device=image.device)
    g = uv.to(image.dtype)[:, None] * scale - 1  # (B, 1, N, 2)
    out = F.grid_sample(image, g, mode="bilinear", padding_mode=padding, align_corners=True)  # (B, C, 1, N)
    return out[:, :, 0].transpose(1, 2)


def _pixel_grid(b: int, height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``(B, H*W, 2)`` pixel positions (u, v) of an ``H x W`` grid, row by row."""
    v, u = torch.meshgrid(torch.arange(height, device=device, dtype=dtype),
                          torch.arange(width, device=device, dtype=dtype), indexing="ij")
    return torch.stack([u, v], -1).reshape(1, -1, 2).expand(b, -1, -1)


def _resample_flow(flow: torch.Tensor, from_stride: int, to_stride: int, height: int, width: int) -> torch.Tensor:
    """Flow on a grid of stride ``from_stride`` (its pixel j sits at full-resolution pixel ``from_stride * j``, values
    in its own pixels) -> the same flow on a ``height x width`` grid of stride ``to_stride`` (bilinear)."""
    b = flow.shape[0]
    uv = _pixel_grid(b, height, width, flow.device, flow.dtype) * (to_stride / from_stride)
    out = sample_flow(flow, uv) * (from_stride / to_stride)  # (B, HW, 2)
    return out.transpose(1, 2).reshape(b, 2, height, width)


def _upsample_flow(coarse: torch.Tensor, stride: int, height: int, width: int) -> torch.Tensor:
    """Coarse flow (coarse pixels; coarse pixel j sits at full pixel ``stride * j``) -> full flow (pixels)."""
    return _resample_flow(coarse, stride, 1, height, width)


def warp(features: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """``features`` sampled at ``p + flow(p)`` (bilinear, zero outside): ``(B, C, h, w)`` for flow ``(B, 2, h, w)``
    in pixels of the same grid."""
    b, _, h, w = features.shape
    uv = _pixel_grid(b, h, w, flow.device, flow.dtype) + flow.flatten(2).transpose(1, 2)
    scale = torch.tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)], dtype=flow.dtype, device=flow.device)
    g = (uv * scale - 1).reshape(b, h, w, 2).to(features.dtype)
    return F.grid_sample(features, g, mode="bilinear", padding_mode="zeros", align_corners=True)


#: mirrorings averaged by :func:`mirror_averaged_flow`: (flip u, flip v) of each pass, in this order
MIRRORINGS = ((False, False), (True, True), (True, False), (False, True))


def _mirror_gradient(grad: torch.Tensor, flip_u: bool, flip_v: bool) -> torch.Tensor:
    """The gradient image ``(B, 2, H, W)`` (d/du, d/dv) of the mirrored image: mirrored, and the mirrored axes'
    components negated. Its own inverse."""
    dims = [d for d, f in ((3, flip_u), (2, flip_v)) if f]
    if not dims:
        return grad
    sign = grad.new_tensor([-1.0 if flip_u else 1.0, -1.0 if flip_v else 1.0]).view(1, 2, 1, 1)
    return grad.flip(dims) * sign


def mirror_averaged_flow(flow_net: "FlowNetC", xray_grad: torch.Tensor, drr_grad: torch.Tensor,
                         flips: int = 4) -> torch.Tensor:
    """Dense flow of ``flow_net`` averaged over mirrorings of the detector (test-time augmentation).

    The encoder samples its stride-s grid at pixels ``s * j``; mirroring a window of W pixels maps them to
    ``W - 1 - s * j``, another phase of the grid (for an even W, as the 128-pixel training windows, W - 1 is no
    multiple of s), so a network trained with mirrored samples keeps a bias of a few tenths of a pixel that changes
    sign with the mirror (measured on the chest validation samples, flows under 2 px: (-0.39, -0.24) px; mirrored
    left-right (+0.42, -0.31)). The mean over the mirrorings cancels it and averages out part of the noise
    (validation EPE 9.22 -> 8.46 px with four).

    Args:
        flow_net: a :class:`FlowNetC`.
        xray_grad, drr_grad: ``(B, 2, H, W)`` gradient images, as :meth:`FlowNetC.forward` takes them.
        flips: 1 (the network once), 2 (and its 180 degree rotation) or 4 (all four mirrorings).
    Returns:
        ``(B, 2, H, W)`` flow (pixels, p' = p + flow(p)), the mean of the un-mirrored flows of one batched pass.
    """
    if flips not in (1, 2, 4):
        raise InputError(f"flips must be 1, 2 or 4 (mirrorings averaged), got {flips}")
    if flips == 1:
        return flow_net(xray_grad, drr_grad)[0]
    b = xray_grad.shape[0]
    ways = MIRRORINGS[:flips]
    xs = torch.cat([_mirror_gradient(xray_grad, fu, fv) for fu, fv in ways])
    ds = torch.cat([_mirror_gradient(drr_grad, fu, fv) for fu, fv in ways])
    flow = flow_net(xs, ds)[0]  # a flow is a vector field: it mirrors as a gradient does
    return torch.stack([_mirror_gradient(f, fu, fv) for f, (fu, fv) in zip(flow.split(b), ways)]).mean(0)


def _cosine_cost(f1: torch.Tensor, f2: torch.Tensor, max_disp: int) -> torch.Tensor:
    """Cost volume ``(B, D, h, w)`` of cosine similarities (channel order of :func:`correlation`)."""
    cos = correlation(F.normalize(f1, dim=1), F.normalize(f2, dim=1), max_disp)
    return cos * f1.shape[1]  # correlation() averages over channels: back to cosine similarity


def _expected_displacement(cost: torch.Tensor, log_temperature: torch.Tensor,
                           displacements: torch.Tensor) -> torch.Tensor:
    """Soft-argmax: expected displacement ``(B, 2, h, w)`` (feature pixels) under a softmax of a cost volume."""
    prob = torch.softmax(cost * log_temperature.exp(), 1)  # (B, D, h, w)
    return torch.einsum("bdhw,dc->bchw", prob, displacements.to(prob.dtype))


class FlowRefinement(nn.Module):
    """One finer level of the flow pyramid (as in PWC-Net): the X-ray features are warped by the flow of the
    coarser level, a local cost volume of ``+-max_disp`` pixels is built, and a small decoder plus the soft-argmax of
    that cost volume (of cosine similarities, the decoder's input too) give a residual flow.

    Args:
        channels: feature channels at this level; max_disp: local search range (pixels of this level);
        decoder_channels: widths of the decoder's hidden convolutions.
    """

    def __init__(self, channels: int, max_disp: int = 3, decoder_channels: tuple[int, ...] = (48, 32)) -> None:
        super().__init__()
        self.max_disp = int(max_disp)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(10.0)))
        self.register_buffer("displacements", correlation_displacements(self.max_disp).float(), persistent=False)
        cin = (2 * self.max_disp + 1) ** 2 + int(channels) + 2
        dec: list[nn.Module] = []
        for cout in decoder_channels:
            dec.append(_conv(cin, int(cout)))
            cin = int(cout)
        self.decoder = nn.Sequential(*dec)
        self.head = nn.Conv2d(cin, 2, 3, padding=1)
        nn.init.zeros_(self.head.bias)
        nn.init.normal_(self.head.weight, std=1e-3)

    def forward(self, f_drr: torch.Tensor, f_xray: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        """Refined flow ``(B, 2, h, w)`` (pixels of this level) from features ``(B, C, h, w)`` and the flow of the
        coarser level resampled to this grid."""
        cos = _cosine_cost(f_drr, warp(f_xray, flow), self.max_disp)
        residual = self.head(self.decoder(torch.cat([cos, f_drr, flow], 1)))
        residual = residual + _expected_displacement(cos, self.log_temperature, self.displacements)
        return flow + residual


def _conv(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation),
                         nn.LeakyReLU(0.1, inplace=True))


# ----------------------------------------------------------------------------- FlowNetC

class FlowNetC(nn.Module):
    """A small FlowNetC: shared encoder, correlation over ±``max_disp`` coarse pixels, convolutional decoder.

    Args:
        stride: 4, 8 or 16, the encoder's downsampling at the correlation level (each stage halves the
            resolution); 16 reaches four times as far as 4 with the same ``max_disp`` and sees more context.
        max_disp: correlation range d in coarse pixels (the full-resolution range is ``d * stride``).
        channels: feature channels of the encoder's last stage.
        decoder_channels: widths of the decoder's hidden convolutions.
        first_channels: width of the encoder's first (half-resolution) stage.
        soft_argmax: add to the decoder's output the soft-argmax of the cost volume of L2-normalised features
            (expected displacement under a softmax with a learned temperature), as cost-volume networks
            (PWC-Net, RAFT) do: the flow is then meaningful from the first iteration and the decoder learns a
            residual, which trains far faster on a CPU budget.
        refine_strides: finer pyramid levels that refine the flow after the correlation level, coarse to fine,
            each a stride of the encoder smaller than ``stride`` (8, 4 and/or 2): at each, the X-ray features are warped
            by the current flow and a local cost volume of ``+-refine_disp`` pixels corrects it
            (:class:`FlowRefinement`). Empty (the default): the flow is the correlation level's, upsampled.
        refine_disp: search range of the refinement levels (pixels of each level).
    Attributes:
        hparams: the architecture hyper-parameters (stored in model files).
    """

    def __init__(self, stride: int = 4, max_disp: int = 6, channels: int = 64,
                 decoder_channels: tuple[int, ...] = (128, 96, 64, 32), first_channels: int = 32,
                 soft_argmax: bool = False, refine_strides: tuple[int, ...] | list[int] = (),
                 refine_disp: int = 3) -> None:
        super().__init__()
        if stride not in (4, 8, 16):
            raise InputError(f"FlowNetC stride must be 4, 8 or 16, got {stride}")
        if max_disp < 1:
            raise InputError("FlowNetC max_disp must be >= 1")
        self.hparams = {"stride": int(stride), "max_disp": int(max_disp), "channels": int(channels),
                        "decoder_channels": [int(c) for c in decoder_channels],
                        "first_channels": int(first_channels), "soft_argmax": bool(soft_argmax)}
        refine = [int(r) for r in refine_strides]
        if any(r not in (2, 4, 8) or r >= stride for r in refine) or refine != sorted(set(refine), reverse=True):
            raise InputError(f"FlowNetC refine_strides must be distinct strides from (8, 4, 2), coarse to fine, each "
                             f"finer than stride {stride}; got {list(refine_strides)}")
        if refine:
            if refine_disp < 1:
                raise InputError("FlowNetC refine_disp must be >= 1")
            self.hparams.update(refine_strides=refine, refine_disp=int(refine_disp))
        self.refine_strides = refine
        self.soft_argmax = bool(soft_argmax)
        if self.soft_argmax:
            self.log_temperature = nn.Parameter(torch.tensor(math.log(10.0)))
            self.register_buffer("displacements", correlation_displacements(int(max_disp)).float(), persistent=False)
        self.stride = int(stride)
        self.max_disp = int(max_disp)
        c = int(channels)
        c0 = int(first_channels)
        layers = [_conv(2, c0, 2), _conv(c0, c0), _conv(c0, c, 2), _conv(c, c)]
        for _ in range({4: 0, 8: 1, 16: 2}[stride]):
            layers += [_conv(c, c, 2), _conv(c, c)]
        self.encoder = nn.Sequential(*layers)
        cin = (2 * self.max_disp + 1) ** 2 + c
        dec: list[nn.Module] = []
        for i, cout in enumerate(decoder_channels):
            dec.append(_conv(cin, int(cout), dilation=2 if i == 1 else 1))
            cin = int(cout)
        self.decoder = nn.Sequential(*dec)
        self.head = nn.Conv2d(cin, 2, 3, padding=1)
        nn.init.zeros_(self.head.bias)
        nn.init.normal_(self.head.weight, std=1e-3)
        # encoder layer after which each stride's features are ready: stride 2 -> layer 1, 4 -> 3, 8 -> 5, 16 -> 7
        self._tap = {2: 1, 4: 3, 8: 5, 16: 7}
        self.refinements = nn.ModuleList(FlowRefinement(c0 if r == 2 else c, int(refine_disp)) for r in refine)

    def _encode(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """Encoder features by stride: ``{stride: (B, C, H / stride, W / stride)}`` (the strides in use)."""
        want = {self.stride, *self.refine_strides}
        out: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.encoder):
            x = layer(x)
            for s_, tap in self._tap.items():
                if tap == i and s_ in want:
                    out[s_] = x
        return out

    def forward(self, xray_grad: torch.Tensor, drr_grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flow from the DRR to the X-ray.

        Args:
            xray_grad: ``(B, 2, H, W)`` gradient of the X-ray (any scale; normalised inside).
            drr_grad: ``(B, 2, H, W)`` gradient of the DRR on the same grid. Any H, W >= 2 (zero-padded to a
                multiple of the stride inside).
        Returns:
            ``flow`` ``(B, 2, H, W)`` in pixels (p' = p + flow(p), p a DRR pixel), and ``coarse`` flow
            ``(B, 2, ceil(H/s), ceil(W/s))`` in coarse pixels (full-resolution pixels / stride s), coarse pixel
            j sitting at full-resolution pixel ``s * j``.
        """
        if xray_grad.shape != drr_grad.shape or xray_grad.ndim != 4 or xray_grad.shape[1] != 2:
            raise InputError("FlowNetC needs two gradient images (B, 2, H, W) of equal shape, got "
                             f"{tuple(xray_grad.shape)} and {tuple(drr_grad.shape)}")
        p = next(self.parameters())
        x = robust_normalise(xray_grad.to(p.dtype))
        d = robust_normalise(drr_grad.to(p.dtype))
        _, _, h, w = x.shape
        s = self.stride
        ph, pw = (-h) % s, (-w) % s
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
            d = F.pad(d, (0, pw, 0, ph))
        feats = self._encode(torch.cat([d, x], 0))
        f_drr, f_xray = feats[s].chunk(2, 0)
        corr = F.leaky_relu(correlation(f_drr, f_xray, self.max_disp), 0.1)
        coarse = self.head(self.decoder(torch.cat([corr, f_drr], 1)))
        if self.soft_argmax:
            coarse = coarse + _expected_displacement(_cosine_cost(f_drr, f_xray, self.max_disp), self.log_temperature,
                                                     self.displacements)
        level, level_stride = coarse, s
        for r, refinement in zip(self.refine_strides, self.refinements):
            fd, fx = feats[r].chunk(2, 0)
            level = refinement(fd, fx, _resample_flow(level, level_stride, r, fd.shape[-2], fd.shape[-1]))
            level_stride = r
        flow = _upsample_flow(level, level_stride, h, w)
        return flow, coarse


# ----------------------------------------------------------------------------- PointNet attention

def _centred(x: torch.Tensor, m: torch.Tensor, centre: torch.Tensor | None = None) -> torch.Tensor:
    """``(x - centre) / r`` for points ``x (B, N, D)`` with weights ``m (B, N)`` (1 = valid, 0 = padding): ``centre``
    ``(B, D)`` defaults to the masked mean, ``r`` is the masked RMS distance from it (at least 1e-6)."""
    cnt = m.sum(1, keepdim=True).clamp_min(1.0)  # (B, 1)
    if centre is None:
        centre = (x * m[..., None]).sum(1) / cnt
    r = x - centre[:, None]
    rad = torch.sqrt(((r * r).sum(-1) * m).sum(1, keepdim=True) / cnt).clamp_min(1e-6)  # (B, 1)
    return r / rad[..., None]


def point_features(uv: torch.Tensor, uv_matched: torch.Tensor, points_3d: torch.Tensor, gradients_3d: torch.Tensor,
                   source: torch.Tensor, centre: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised per-point features for :class:`PointNetAttention` (``POINT_FEATURES`` = 14 channels).

    Channels: 2D position relative to the (masked) centroid of ``uv``, divided by the RMS radius (2);
    displacement ``uv_matched - uv`` in pixels / 10 (2); 3D position relative to ``centre`` divided by the RMS
    radius (3); unit 3D gradient (3); unit viewing ray from the source to the point (3); the cosine between
    gradient and ray (1).

    Args:
        uv: ``(B, N, 2)`` projected contour points p_i (pixels).
        uv_matched: ``(B, N, 2)`` matched positions p'_i (pixels).
        points_3d: ``(B, N, 3)`` contour points w_i (world, mm).
        gradients_3d: ``(B, N, 3)`` their 3D gradients g_i (any scale).
        source: ``(B, 3)`` X-ray source (world, mm).
        centre: ``(B, 3)`` contour centroid (mm); default the masked mean of ``points_3d``.
        mask: ``(B, N)`` bool, valid points (used for the centroids and radii); default all.
    Returns:
        ``(B, N, 14)`` features in ``points_3d``'s dtype (float32 recommended for the network).
    """
    dt = points_3d.dtype
    b, n, _ = points_3d.shape
    m = torch.ones(b, n, dtype=dt, device=points_3d.device) if mask is None else mask.to(dt)
    uv, uv_matched, gradients_3d = uv.to(dt), uv_matched.to(dt), gradients_3d.to(dt)
    source = source.to(dt)
    rel2 = _centred(uv, m)
    rel3 = _centred(points_3d, m, None if centre is None else centre.to(dt))
    disp = (uv_matched - uv) / 10.0
    g = gradients_3d / torch.linalg.norm(gradients_3d, dim=-1, keepdim=True).clamp_min(1e-12)
    ray = points_3d - source[:, None]
    ray = ray / torch.linalg.norm(ray, dim=-1, keepdim=True).clamp_min(1e-12)
    cos = (g * ray).sum(-1, keepdim=True)
    return torch.cat([rel2, disp, rel3, g, ray, cos], -1) * m[..., None]


def match_evidence(drr_grad: torch.Tensor, xray_grad: torch.Tensor, uv: torch.Tensor, uv_matched: torch.Tensor,
                   mask: torch.Tensor | None = None, patch_radius: int = 2) -> torch.Tensor:
    """Local matching evidence of each correspondence p_i -> p'_i (``EVIDENCE_FEATURES`` = 5 channels), for the
    attention: how well the images support it and how well it agrees with the other points' motion.

    Channels: cosine of the angle between the DRR gradient at p_i and the X-ray gradient at p'_i (signed: both
    images are attenuation-positive, so a bone edge keeps its polarity); log of the two gradient magnitudes
    (2; gradients divided by their image's robust scale, :func:`robust_normalise`); normalised cross-correlation of
    the two-channel gradient patches of ``2 * patch_radius + 1`` pixels around p_i and p'_i; and the distance of
    p'_i from the best 2D affine motion of all (masked) points' displacements, in pixels / 10 (large for a match
    that disagrees with the rest). Computed without gradients (evidence, not a path for training the flow).

    Args:
        drr_grad, xray_grad: ``(B, 2, H, W)`` gradient images (any scale), on the pixel grid of ``uv``.
        uv: ``(B, N, 2)`` points p_i in the DRR; uv_matched: ``(B, N, 2)`` matches p'_i in the X-ray (pixels).
        mask: ``(B, N)`` bool, valid points (the affine fit uses only these); default all.
        patch_radius: half-size of the correlation patches (pixels).
    Returns:
        ``(B, N, 5)`` in ``drr_grad``'s dtype; zero where masked.
    """
    with torch.no_grad():
        dt = drr_grad.dtype
        b, n, _ = uv.shape
        m = torch.ones(b, n, dtype=torch.bool, device=uv.device) if mask is None else mask.to(uv.device, torch.bool)
        mf = m.to(dt)
        d = robust_normalise(drr_grad)
        x = robust_normalise(xray_grad)
        uv, uv_matched = uv.to(dt), uv_matched.to(dt)
        off = correlation_displacements(int(patch_radius)).to(uv.device, dt)  # (P, 2), (0, 0) in the middle
        k = off.shape[0]
        pd = _bilinear(d, (uv[:, :, None] + off).reshape(b, n * k, 2)).reshape(b, n, k, 2)
        px = _bilinear(x, (uv_matched[:, :, None] + off).reshape(b, n * k, 2)).reshape(b, n, k, 2)
        gd, gx = pd[:, :, k // 2], px[:, :, k // 2]  # (B, N, 2) at the points themselves
        nd, nx = torch.linalg.norm(gd, dim=-1), torch.linalg.norm(gx, dim=-1)
        cos = (gd * gx).sum(-1) / (nd * nx).clamp_min(1e-6)
        a = pd.reshape(b, n, -1)
        c = px.reshape(b, n, -1)
        a = a - a.mean(-1, keepdim=True)
        c = c - c.mean(-1, keepdim=True)
        ncc = (a * c).sum(-1) / (torch.linalg.norm(a, dim=-1) * torch.linalg.norm(c, dim=-1)).clamp_min(1e-6)
        # the best affine map of the displacements over the valid points (centred, scaled coordinates)
        rel = _centred(uv, mf)
        design = torch.cat([rel, torch.ones_like(rel[..., :1])], -1)  # (B, N, 3)
        dw = design * mf[..., None]
        normal = dw.transpose(1, 2) @ design + 1e-3 * torch.eye(3, dtype=dt, device=uv.device)
        disp = uv_matched - uv
        coef = torch.linalg.solve(normal, dw.transpose(1, 2) @ disp)  # (B, 3, 2)
        resid = torch.linalg.norm(disp - design @ coef, dim=-1) / 10.0
        feats = torch.stack([cos, torch.log(nd + 0.05), torch.log(nx + 0.05), ncc, resid], -1)
        return feats * mf[..., None]


class PointNetAttention(nn.Module):
    """Per-point weights in (0, 1) from per-point features with a PointNet (shared MLP + global pooling).

    Args:
        in_features: F, channels of the input features (``POINT_FEATURES`` for :func:`point_features`).
        hidden: width of the shared per-point MLP.
        global_features: width of the per-point feature that is max- and mean-pooled.
    Attributes:
        hparams: the architecture hyper-parameters (stored in model files).
    """

    def __init__(self, in_features: int = POINT_FEATURES, hidden: int = 64, global_features: int = 128) -> None:
        super().__init__()
        self.hparams = {"in_features": int(in_features), "hidden": int(hidden),
                        "global_features": int(global_features)}
        self.local = nn.Sequential(nn.Linear(in_features, hidden), nn.LeakyReLU(0.1),
                                   nn.Linear(hidden, global_features), nn.LeakyReLU(0.1))
        self.head = nn.Sequential(nn.Linear(3 * global_features, hidden), nn.LeakyReLU(0.1),
                                  nn.Linear(hidden, hidden // 2), nn.LeakyReLU(0.1),
                                  nn.Linear(hidden // 2, 1))

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Weights of the points.

        Args:
            features: ``(B, N, F)`` per-point features.
            mask: ``(B, N)`` bool, False for padding: those points get weight 0 and are left out of pooling.
        Returns:
            ``(B, N)`` weights in (0, 1) (exactly 0 where masked).
        """
        if features.ndim != 3 or features.shape[-1] != self.hparams["in_features"]:
            raise InputError(f"PointNetAttention expects (B, N, {self.hparams['in_features']}) features, got "
                             f"{tuple(features.shape)}")
        p = next(self.parameters())
        x = features.to(p.dtype)
        b, n, _ = x.shape
        m = torch.ones(b, n, dtype=torch.bool, device=x.device) if mask is None else mask.to(x.device, torch.bool)
        h = self.local(x)  # (B, N, G)
        mf = m[..., None].to(h.dtype)
        hmax = torch.where(m[..., None], h, torch.full_like(h, -torch.inf)).amax(1)
        hmax = torch.where(torch.isfinite(hmax), hmax, torch.zeros_like(hmax))  # all points masked
        hmean = (h * mf).sum(1) / mf.sum(1).clamp_min(1.0)
        glob = torch.cat([hmax, hmean], -1)[:, None].expand(b, n, -1)
        logits = self.head(torch.cat([h, glob], -1))[..., 0]
        return torch.sigmoid(logits) * m.to(logits.dtype)

    def weigh(self, uv: torch.Tensor, uv_matched: torch.Tensor, points_3d: torch.Tensor, gradients_3d: torch.Tensor,
              source: torch.Tensor, centre: torch.Tensor | None = None,
              mask: torch.Tensor | None = None, extra: torch.Tensor | None = None) -> torch.Tensor:
        """Weights of correspondences: :func:`point_features` (computed in float64 on this network's device),
        followed by the ``extra`` per-point features ``(B, N, E)`` when given (e.g. :func:`match_evidence`), then
        :meth:`forward`. Arguments as :func:`point_features`; returns ``(B, N)`` on this network's device and
        dtype."""
        a = next(self.parameters())

        def f64(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.to(a.device, torch.float64)

        m = None if mask is None else mask.to(a.device)
        feats = point_features(f64(uv), f64(uv_matched), f64(points_3d), f64(gradients_3d), f64(source), f64(centre),
                               m)
        if extra is not None:
            feats = torch.cat([feats, f64(extra)], -1)
        return self(feats.to(a.dtype), m)


# ----------------------------------------------------------------------------- the learned operator

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


def operator_from_file(path: str | Path, device: torch.device | str = "cpu",
                       method: str | None = None) -> tuple[LearnedOperator, dict]:
    """Load a :class:`LearnedOperator` model file (see :func:`load_model`), checking its method if given."""
    model, meta = load_model(path, "learned_operator", device)
    if method is not None and model.method != method:
        raise ModelFileError(f"{path} holds a {model.method!r} model, but method {method!r} was requested")
    return model, meta


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


# ----------------------------------------------------------------------------- model files

_KINDS: dict[str, type[nn.Module]] = {"flownetc": FlowNetC, "pointnet_attention": PointNetAttention,
                                      "learned_operator": LearnedOperator}


def _kind_of(model: nn.Module) -> str:
    for k, cls in _KINDS.items():
        if type(model) is cls:
            return k
    raise InputError(f"cannot save a {type(model).__name__}: only {sorted(_KINDS)} models are supported")


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 (hex) over the names, dtypes, shapes and raw bytes of a state dict's tensors (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_model(path: str | Path, model: nn.Module, meta: dict | None = None) -> None:
    """Write a model file: format name, version, kind, hyper-parameters, state dict and its SHA-256.

    Args:
        path: the file to write (``.pt`` by convention).
        model: a :class:`FlowNetC` or :class:`PointNetAttention`.
        meta: free information (training set, epochs, losses...): plain dicts, lists, strings and numbers.
    """
    kind = _kind_of(model)
    state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    payload = {"format": MODEL_FORMAT, "version": MODEL_VERSION, "kind": kind, "hparams": dict(model.hparams),
               "state_dict": state, "sha256": state_dict_sha256(state), "meta": dict(meta or {})}
    torch.save(payload, str(path))


def load_model(path: str | Path, kind: str, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """Read and verify a model file written by :func:`save_model`.

    Args:
        path: the model file.
        kind: the expected kind, ``"flownetc"`` or ``"pointnet_attention"``.
        device: where to put the model.
    Returns:
        ``(model, meta)``; the model is in eval mode.
    Raises:
        ModelFileError: missing or unreadable file, not a model file, wrong format/version/kind, checksum
            mismatch (damaged file), or parameters that do not fit the architecture.
    """
    if kind not in _KINDS:
        raise InputError(f"unknown model kind {kind!r}: use one of {sorted(_KINDS)}")
    p = Path(path)
    if not p.is_file():
        raise ModelFileError(f"model file not found: {p}")
    try:
        payload = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle means a bad file
        raise ModelFileError(f"{p} is not a readable model file (corrupt or not written by save_model): "
                             f"{type(exc).__name__}: {str(exc)[:200]}") from exc
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise ModelFileError(f"{p} is not a {MODEL_FORMAT} file")
    version = payload.get("version")
    if not isinstance(version, int) or version > MODEL_VERSION or version < 1:
        raise ModelFileError(f"{p} has model format version {version!r}; this library reads versions "
                             f"1..{MODEL_VERSION}: update PPCRegistrationLib")
    if payload.get("kind") != kind:
        raise ModelFileError(f"{p} holds a {payload.get('kind')!r} model, expected {kind!r}")
    state = payload.get("state_dict")
    hparams = payload.get("hparams")
    if not isinstance(state, dict) or not isinstance(hparams, dict) or \
            not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFileError(f"{p} is incomplete: no state dict or hyper-parameters")
    if state_dict_sha256(state) != payload.get("sha256"):
        raise ModelFileError(f"{p} is damaged: the SHA-256 of its parameters does not match the stored checksum")
    try:
        if kind == "flownetc" and "decoder_channels" in hparams:
            hparams = {**hparams, "decoder_channels": tuple(hparams["decoder_channels"])}
        model = _KINDS[kind](**hparams)
    except (TypeError, InputError) as exc:
        raise ModelFileError(f"{p} has hyper-parameters this library cannot build: {hparams} ({exc})") from exc
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    bad = [f"{k}: file {tuple(state[k].shape)} vs network {tuple(expected[k].shape)}"
           for k in sorted(set(expected) & set(state)) if state[k].shape != expected[k].shape]
    if missing or extra or bad:
        raise ModelFileError(f"{p} does not match the {kind} architecture {hparams}: missing {missing[:5]}, "
                             f"unexpected {extra[:5]}, mismatched shapes {bad[:5]}")
    model.load_state_dict(state)
    model.to(device).eval()
    meta: Any = payload.get("meta", {})
    return model, dict(meta) if isinstance(meta, dict) else {}
