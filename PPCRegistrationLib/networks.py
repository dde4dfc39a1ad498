"""The learned operator of DESIGN.md §3: a small FlowNetC for the 2D matching, PointNet attention for the
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

from .errors import InputError, ModelFileError

__all__ = [
    "FlowNetC", "PointNetAttention", "LearnedMatcher", "correlation", "correlation_displacements",
    "sample_flow", "point_features", "POINT_FEATURES", "robust_normalise", "save_model", "load_model",
    "state_dict_sha256", "MODEL_FORMAT", "MODEL_VERSION",
]

MODEL_FORMAT = "PPCRegistrationLib.model"
MODEL_VERSION = 1
#: number of channels produced by :func:`point_features` (without extra match features).
POINT_FEATURES = 14


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
    b, _, h, w = flow.shape
    scale = torch.tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)], dtype=flow.dtype, device=flow.device)
    g = uv.to(flow.dtype)[:, None] * scale - 1  # (B, 1, N, 2)
    out = F.grid_sample(flow, g, mode="bilinear", padding_mode="border", align_corners=True)  # (B, 2, 1, N)
    return out[:, :, 0].transpose(1, 2)


def _upsample_flow(coarse: torch.Tensor, stride: int, height: int, width: int) -> torch.Tensor:
    """Coarse flow (coarse pixels; coarse pixel j sits at full pixel ``stride * j``) -> full flow (pixels)."""
    b = coarse.shape[0]
    dev, dt = coarse.device, coarse.dtype
    v, u = torch.meshgrid(torch.arange(height, device=dev, dtype=dt), torch.arange(width, device=dev, dtype=dt),
                          indexing="ij")
    uv = torch.stack([u, v], -1).reshape(1, -1, 2).expand(b, -1, -1) / stride
    full = sample_flow(coarse, uv) * stride  # (B, HW, 2)
    return full.transpose(1, 2).reshape(b, 2, height, width)


def _conv(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation),
                         nn.LeakyReLU(0.1, inplace=True))


# ----------------------------------------------------------------------------- FlowNetC

class FlowNetC(nn.Module):
    """A small FlowNetC: shared encoder, correlation over ±``max_disp`` coarse pixels, convolutional decoder.

    Args:
        stride: 4 or 8, the encoder's downsampling (each stage halves the resolution).
        max_disp: correlation range d in coarse pixels (the full-resolution range is ``d * stride``).
        channels: feature channels of the encoder's last stage.
        decoder_channels: widths of the decoder's hidden convolutions.
    Attributes:
        hparams: the architecture hyper-parameters (stored in model files).
    """

    def __init__(self, stride: int = 4, max_disp: int = 6, channels: int = 64,
                 decoder_channels: tuple[int, ...] = (128, 96, 64, 32)) -> None:
        super().__init__()
        if stride not in (4, 8):
            raise InputError(f"FlowNetC stride must be 4 or 8, got {stride}")
        if max_disp < 1:
            raise InputError("FlowNetC max_disp must be >= 1")
        self.hparams = {"stride": int(stride), "max_disp": int(max_disp), "channels": int(channels),
                        "decoder_channels": [int(c) for c in decoder_channels]}
        self.stride = int(stride)
        self.max_disp = int(max_disp)
        c = int(channels)
        layers = [_conv(2, 32, 2), _conv(32, 32), _conv(32, c, 2), _conv(c, c)]
        if stride == 8:
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
        feats = self.encoder(torch.cat([d, x], 0))
        f_drr, f_xray = feats.chunk(2, 0)
        corr = F.leaky_relu(correlation(f_drr, f_xray, self.max_disp), 0.1)
        coarse = self.head(self.decoder(torch.cat([corr, f_drr], 1)))
        flow = _upsample_flow(coarse, s, h, w)
        return flow, coarse


# ----------------------------------------------------------------------------- PointNet attention

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
    cnt = m.sum(1, keepdim=True).clamp_min(1.0)  # (B, 1)
    uv, uv_matched, gradients_3d = uv.to(dt), uv_matched.to(dt), gradients_3d.to(dt)
    source = source.to(dt)

    def centred(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        r = x - c[:, None]
        rad = torch.sqrt(((r * r).sum(-1) * m).sum(1, keepdim=True) / cnt).clamp_min(1e-6)  # (B, 1)
        return r / rad[..., None]

    c2 = (uv * m[..., None]).sum(1) / cnt
    if centre is None:
        centre = (points_3d * m[..., None]).sum(1) / cnt
    rel2 = centred(uv, c2)
    rel3 = centred(points_3d, centre.to(dt))
    disp = (uv_matched - uv) / 10.0
    g = gradients_3d / torch.linalg.norm(gradients_3d, dim=-1, keepdim=True).clamp_min(1e-12)
    ray = points_3d - source[:, None]
    ray = ray / torch.linalg.norm(ray, dim=-1, keepdim=True).clamp_min(1e-12)
    cos = (g * ray).sum(-1, keepdim=True)
    return torch.cat([rel2, disp, rel3, g, ray, cos], -1) * m[..., None]


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


# ----------------------------------------------------------------------------- the Matcher

class LearnedMatcher:
    """The learned 2D matching step: a :class:`~PPCRegistrationLib.registration.Matcher`.

    ``p'_i = p_i + flow(p_i)`` with the flow of :class:`FlowNetC` on (X-ray gradient, DRR gradient) of the
    window; weights from :class:`PointNetAttention` on :func:`point_features` (all ones without it), times the
    contour mask, and 0 for matches leaving the window or farther than ``search_px`` (when
    ``limit_to_search``).

    The attention needs 3D information the 2D matcher does not receive as arguments: ``context`` must then hold
    ``"points_3d"`` ``(1, N, 3)`` (moved contour points, mm), ``"gradients_3d"`` ``(1, N, 3)`` (rotated
    gradients), ``"source"`` ``(1, 3)`` (mm) and optionally ``"centre"`` ``(1, 3)`` (mm).

    Args:
        flow_net: the trained :class:`FlowNetC`.
        attention: optional trained :class:`PointNetAttention`.
        limit_to_search: drop (weight 0) matches displaced by more than the registration's search range.
        enable_grad: keep the autograd graph (training); the default runs under ``torch.no_grad``.
    """

    def __init__(self, flow_net: FlowNetC, attention: PointNetAttention | None = None, *,
                 limit_to_search: bool = True, enable_grad: bool = False) -> None:
        self.flow_net = flow_net
        self.attention = attention
        self.limit_to_search = limit_to_search
        self.enable_grad = enable_grad

    def __call__(self, drr: torch.Tensor, xray: torch.Tensor, drr_grad: torch.Tensor, xray_grad: torch.Tensor,
                 uv: torch.Tensor, normals: torch.Tensor, mask: torch.Tensor, search_px: float,
                 context: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """See :class:`~PPCRegistrationLib.registration.Matcher`: returns ``uv_matched (1, N, 2)`` (window
        pixels, ``uv``'s dtype and device) and weights ``(1, N)`` in [0, 1]."""
        with torch.set_grad_enabled(self.enable_grad and torch.is_grad_enabled()):
            return self._match(drr_grad, xray_grad, uv, mask, search_px, context)

    def _match(self, drr_grad, xray_grad, uv, mask, search_px, context):
        p = next(self.flow_net.parameters())
        dev = p.device
        h, w = drr_grad.shape[-2:]
        flow, _ = self.flow_net(xray_grad.to(dev), drr_grad.to(dev))
        uv_n = uv.to(dev, p.dtype)
        dp = sample_flow(flow, uv_n)
        uv_m = uv_n + dp
        m = mask.to(dev, torch.bool)
        valid = m & (uv_m[..., 0] >= 0) & (uv_m[..., 0] <= w - 1) & (uv_m[..., 1] >= 0) & (uv_m[..., 1] <= h - 1)
        if self.limit_to_search and search_px is not None and search_px > 0:
            valid = valid & (torch.linalg.norm(dp, dim=-1) <= float(search_px))
        if self.attention is None:
            weights = torch.ones_like(uv_m[..., 0])
        else:
            missing = [k for k in ("points_3d", "gradients_3d", "source") if k not in (context or {})]
            if missing:
                raise InputError(f"LearnedMatcher with attention needs {missing} in the matcher context "
                                 "(moved contour points, rotated gradients, source); the registration loop "
                                 "must pass them")
            a = next(self.attention.parameters())
            feats = point_features(uv_n.to(a.device, torch.float64), uv_m.to(a.device, torch.float64),
                                   context["points_3d"].to(a.device, torch.float64),
                                   context["gradients_3d"].to(a.device, torch.float64),
                                   context["source"].to(a.device, torch.float64),
                                   None if context.get("centre") is None
                                   else context["centre"].to(a.device, torch.float64), m.to(a.device))
            weights = self.attention(feats.to(a.dtype), m.to(a.device)).to(dev, p.dtype)
        weights = (weights * valid.to(weights.dtype)).clamp(0, 1)
        return uv_m.to(uv.device, uv.dtype), weights.to(uv.device, uv.dtype)


# ----------------------------------------------------------------------------- model files

_KINDS: dict[str, type[nn.Module]] = {"flownetc": FlowNetC, "pointnet_attention": PointNetAttention}


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
