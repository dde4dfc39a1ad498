"""Gaussian-smoothed image derivatives of DRR and X-ray batches (docs/design.md §3, step 2): the gradient images that the
matching, the pre-alignment and the refinement's gradient correlation compare."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import InputError

__all__ = ["image_gradient", "gaussian_blur"]


def _gaussian_kernels(sigma: float, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """1D smoothing and derivative kernels (odd length).  The derivative kernel ``k`` satisfies
    ``sum k = 0`` and ``sum x k(x) = 1`` so that correlation with it returns the exact slope of a linear ramp."""
    if sigma <= 0:
        x = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
        smooth = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
        deriv = x / 2
    else:
        r = max(1, int(math.ceil(3 * sigma)))
        x = torch.arange(-r, r + 1, dtype=torch.float64)
        gauss = torch.exp(-0.5 * (x / sigma) ** 2)
        smooth = gauss / gauss.sum()
        deriv = x * gauss / (x * x * gauss).sum()
    return smooth.to(dtype=dtype, device=device), deriv.to(dtype=dtype, device=device)


def image_gradient(img: torch.Tensor, sigma_px: float = 1.0) -> torch.Tensor:
    """Gaussian-smoothed image derivatives.

    Args:
        img: ``(B, H, W)`` images (any units), float.
        sigma_px: standard deviation (pixels) of the Gaussian; 0 gives plain central differences.
    Returns:
        ``(B, 2, H, W)``: channel 0 = d/du (along columns, i.e. left -> right), channel 1 = d/dv (along rows,
        top -> bottom), in image units per pixel.  Borders are replicated (the derivative is damped there).
    """
    if not isinstance(img, torch.Tensor) or img.ndim != 3:
        shape = tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
        raise InputError(f"image_gradient expects a (B, H, W) image batch, got {shape}")
    if not (sigma_px >= 0 and math.isfinite(sigma_px)):
        raise InputError(f"sigma_px must be >= 0 (pixels), got {sigma_px}")
    x = img if img.is_floating_point() else img.to(torch.float32)
    smooth, deriv = _gaussian_kernels(float(sigma_px), x.dtype, x.device)
    r = smooth.numel() // 2
    xp = F.pad(x[:, None], (r, r, r, r), mode="replicate")  # (B, 1, H+2r, W+2r)
    n = smooth.numel()
    # d/du: derivative along columns (W), smoothing along rows (H)
    du = F.conv2d(F.conv2d(xp, deriv.view(1, 1, 1, n)), smooth.view(1, 1, n, 1))
    dv = F.conv2d(F.conv2d(xp, smooth.view(1, 1, 1, n)), deriv.view(1, 1, n, 1))
    return torch.cat([du, dv], 1)


def gaussian_blur(img: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """``(B, H, W)`` images blurred by a separable Gaussian of ``sigma_px`` pixels (replicated borders; 0 returns
    the input)."""
    if not (sigma_px >= 0 and math.isfinite(sigma_px)):
        raise InputError(f"sigma_px must be >= 0 (pixels), got {sigma_px}")
    if sigma_px == 0:
        return img
    smooth, _ = _gaussian_kernels(float(sigma_px), img.dtype, img.device)
    n = smooth.numel()
    r = n // 2
    xp = F.pad(img[:, None], (r, r, r, r), mode="replicate")
    return F.conv2d(F.conv2d(xp, smooth.view(1, 1, 1, n)), smooth.view(1, 1, n, 1))[:, 0]
