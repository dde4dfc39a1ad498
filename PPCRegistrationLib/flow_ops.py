"""Tensor operations of the flow networks: robust gradient normalisation, the correlation cost volume, bilinear
sampling of flow fields and feature warping (used by :mod:`.flownet`, :mod:`.attention` and :mod:`.networks`).

Conventions (as in :mod:`PPCRegistrationLib.networks`): images are ``(B, C, H, W)``, u = column, v = row, pixel
centres at integer coordinates; a flow ``(B, 2, H, W)`` is in pixels and points from the DRR to the X-ray
(``p' = p + flow(p)``). Plain torch, differentiable, any device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import InputError

__all__ = ["robust_normalise", "correlation_displacements", "correlation", "sample_flow", "warp"]


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
