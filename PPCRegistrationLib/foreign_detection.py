"""What the CT cannot explain: the pixels of an X-ray more attenuating than the CT could make them near a pose
(metal screws, K-wires, instruments, collimator shadows), found by comparison with the DRR at that pose.

The X-ray and the DRR of the CT at a pose ``T`` are related by a monotone, slowly varying imaging chain (scatter,
heel effect, beam hardening, the log or not, the display window).  :func:`unexplained_mask` models it as a local
linear map ``x ~ a(u, v) + b(u, v) p`` fitted in sliding windows (robustly: pixels found are left out and the fit
repeated), and flags a pixel when the X-ray exceeds the map of the largest DRR value within ``tolerance_px`` (the
CT may lie that far from where ``T`` projects it) by more than ``threshold_sd`` robust standard deviations of the
fit's residual.  Only excess attenuation counts: an object that is not in the CT can only add to it.  Small
specks (fewer than ``min_px`` pixels) are noise.  Pure torch (the specks' labelling on the CPU with scipy).
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F

from .errors import InputError

__all__ = ["unexplained_mask", "TOLERANCE_PX", "FIT_PX", "THRESHOLD_SD", "MIN_CONTRAST"]

#: the detection's defaults (also ``RegistrationConfig.foreign``'s): see :func:`unexplained_mask`
TOLERANCE_PX = 2.0
FIT_PX = 31
THRESHOLD_SD = 6.0
MIN_CONTRAST = 0.1


def _box(x: torch.Tensor, size: int) -> torch.Tensor:
    """Mean over ``size x size`` windows of ``x (H, W)`` (reflected borders)."""
    r = size // 2
    y = F.pad(x[None, None], (r, r, r, r), mode="reflect")
    return F.avg_pool2d(F.avg_pool2d(y, (1, size), stride=1), (size, 1), stride=1)[0, 0]  # separable


def unexplained_mask(xray: torch.Tensor, drr: torch.Tensor, *, tolerance_px: float = TOLERANCE_PX,
                     fit_px: int = FIT_PX, threshold_sd: float = THRESHOLD_SD, min_contrast: float = MIN_CONTRAST,
                     min_px: int = 8, iterations: int = 3) -> torch.Tensor:
    """``(H, W)`` bool: the pixels of ``xray (H, W)`` (attenuation-positive) that the CT, whose DRR at the pose is
    ``drr (H, W)`` (line integrals on the same detector), cannot explain (see the module docstring).

    Args:
        tolerance_px: how far (detector pixels) the CT's structures may lie from where the pose projects them.
        fit_px: side (pixels, odd) of the windows of the local linear map.
        threshold_sd: excess over the mapped DRR, in robust standard deviations of the map's residual.
        min_contrast: ... and at least this fraction of the X-ray's 1-99 % range (in a smooth, low-noise image the
            s.d. is tiny and a slight misfit of the imaging chain would pass the first test).
        min_px: smallest connected region kept (pixels).
        iterations: fits, each without the pixels found by the previous one.
    Raises:
        InputError: images of other shapes or not 2D, NaN values, or a bad setting.
    """
    if xray.ndim != 2 or tuple(xray.shape) != tuple(drr.shape):
        raise InputError(f"the X-ray and the DRR must be 2D images of one shape, got {tuple(xray.shape)} and "
                         f"{tuple(drr.shape)}")
    if not (bool(torch.isfinite(xray).all()) and bool(torch.isfinite(drr).all())):
        raise InputError("the X-ray or the DRR has NaN or infinite values")
    fit_px = int(fit_px) | 1
    if fit_px < 3 or fit_px > min(xray.shape) or not threshold_sd > 0 or tolerance_px < 0 or iterations < 1:
        raise InputError(f"bad settings: fit_px {fit_px} (3 .. image side), threshold_sd {threshold_sd} (> 0), "
                         f"tolerance_px {tolerance_px} (>= 0), iterations {iterations} (>= 1)")
    x = xray.to(torch.float64)
    p = drr.to(x)
    r = int(round(float(tolerance_px)))
    p_max = F.max_pool2d(F.pad(p[None, None], (r, r, r, r), mode="replicate"), 2 * r + 1, stride=1)[0, 0] \
        if r > 0 else p
    step = x.flatten()[:: max(1, x.numel() // 100_000)]
    lo, hi = (float(v) for v in torch.quantile(step, torch.tensor([0.01, 0.99], dtype=x.dtype)))
    floor = float(min_contrast) * max(hi - lo, 1e-12)
    keep = torch.ones_like(x)
    found = torch.zeros_like(x, dtype=torch.bool)
    for _ in range(int(iterations)):
        n = _box(keep, fit_px).clamp_min(1e-9)
        mp, mx = _box(keep * p, fit_px) / n, _box(keep * x, fit_px) / n
        vp = _box(keep * p * p, fit_px) / n - mp * mp
        cxp = _box(keep * x * p, fit_px) / n - mx * mp
        b = (cxp / (vp + 1e-4 * float(p.var()) + 1e-12)).clamp_min(0.0)  # monotone: more CT, more attenuation
        a = mx - b * mp
        res = (x - (a + b * p))[keep > 0.5]
        sd = 1.4826 * float((res - res.median()).abs().median())
        if not sd > 0:
            break
        found = (x - (a + b * p_max)) > max(threshold_sd * sd, floor)
        grown = F.max_pool2d(found[None, None].to(x), 5, stride=1, padding=2)[0, 0] > 0
        keep = (~grown).to(x)
    m = found.cpu().numpy()
    if int(min_px) > 1 and m.any():
        lab, n_lab = ndi.label(m)
        sizes = np.bincount(lab.ravel())
        m = (sizes >= int(min_px))[lab] & m
    return torch.from_numpy(m).to(xray.device)
