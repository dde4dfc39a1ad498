"""The image similarity of the intensity refinement (docs/design.md §4.3): the gradient correlation of DRRs with the
X-ray in the detector window around a region (:class:`SimilarityWindow`), the high-pass filter of both gradient
images and their local contrast normalisation, and the similarity of one pose (:func:`pose_similarity`).  The DRR
passes through the same imaging chain the detector applies to the X-ray: its transmitted intensity is blurred, then
the logarithm taken again, and an optional contrast exponent.  Pure torch, CPU or CUDA."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .drr import DRRRenderer
from .errors import InputError
from .geometry import Projection, coarsen_projection, crop_projection, transform_points
from .gradients import gaussian_blur, image_gradient

__all__ = ["gradient_correlation", "highpass", "SimilarityWindow", "refine_window", "pose_similarity",
           "BLUR_RANGE_PX", "RESPONSE_RANGE", "SCATTER_RANGE", "saturated", "SATURATION_MIN_PX", "local_contrast",
           "LOCAL_CONTRAST_PX"]

#: the bounds of the DRR's blur (detector pixels) when it is estimated (:class:`~PPCRegistrationLib.refine.PoseRefiner`)
BLUR_RANGE_PX = (0.0, 3.0)
#: the bounds of the detector's output curve (:meth:`SimilarityWindow.drr_gradient`: 0 = log, 1 = linear)
RESPONSE_RANGE = (-0.5, 1.5)
#: the bounds of the scatter added to the DRR's transmitted intensity, as a fraction of its window mean
SCATTER_RANGE = (0.0, 2.0)
#: the share of a window that must stay when the saturated pixels are left out; below it the whole window is used
#: (a window almost all saturated has too little left to compare)
MIN_UNSATURATED = 0.25


def highpass(grad: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """Remove the smooth part of images ``(B, C, H, W)``: ``x - G_sigma * x`` (replicated borders).

    ``sigma_px <= 0`` returns the input."""
    if sigma_px <= 0:
        return grad
    r = max(1, int(math.ceil(3 * sigma_px)))
    x = torch.arange(-r, r + 1, dtype=grad.dtype, device=grad.device)
    k = torch.exp(-0.5 * (x / sigma_px) ** 2)
    k = k / k.sum()
    b, c, h, w = grad.shape
    y = F.pad(grad.reshape(b * c, 1, h, w), (r, r, r, r), mode="replicate")
    y = F.conv2d(F.conv2d(y, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))
    return grad - y.reshape(b, c, h, w)


#: an image value held by at least this many pixels at the image's minimum or maximum is a saturation plateau
#: (:func:`saturated`); a continuous image holds its extremes in a pixel or two
SATURATION_MIN_PX = 16


def saturated(image: torch.Tensor, min_px: int = SATURATION_MIN_PX) -> torch.Tensor:
    """``(H, W)`` bool: the pixels of ``image (H, W)`` clipped at its minimum or maximum value, where at least
    ``min_px`` pixels share that value (a detector or display window that saturated: burnt-out lung or direct
    beam, a collimator shadow held at the window's end).  Such pixels carry no image of the anatomy, so the
    gradient correlation leaves them out (:class:`SimilarityWindow`)."""
    x = image.detach()
    lo, hi = x.amin(), x.amax()
    tol = 1e-6 * float(hi - lo) if float(hi - lo) > 0 else 0.0
    out = torch.zeros_like(x, dtype=torch.bool)
    for at in (x <= lo + tol, x >= hi - tol):
        if int(at.sum()) >= int(min_px):
            out |= at
    return out


def gradient_correlation(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient correlation of gradient images ``a, b (B, 2, H, W)``: ``(B,)`` in [-1, 1], differentiable.

    The mean over the two components of their normalised cross-correlation over the image, or over the pixels
    where ``mask (1 or B, 1, H, W)`` (0/1) is 1."""
    if a.shape != b.shape or a.ndim != 4 or a.shape[1] != 2:
        raise InputError(f"gradient images must both be (B, 2, H, W), got {tuple(a.shape)} and {tuple(b.shape)}")
    if mask is not None:
        m = mask.to(a.dtype)
        n = m.sum(dim=(2, 3), keepdim=True).clamp_min(1.0)
        x = (a - (a * m).sum(dim=(2, 3), keepdim=True) / n) * m
        y = (b - (b * m).sum(dim=(2, 3), keepdim=True) / n) * m
    else:
        x = a - a.mean(dim=(2, 3), keepdim=True)
        y = b - b.mean(dim=(2, 3), keepdim=True)
    num = (x * y).sum(dim=(2, 3))
    den = torch.sqrt((x * x).sum(dim=(2, 3)) * (y * y).sum(dim=(2, 3))).clamp_min(1e-20)
    return (num / den).mean(-1)



def refine_window(projection: Projection, points_world: torch.Tensor, margin_px: int) -> tuple[int, int, int, int]:
    """Detector window ``(u0, v0, width, height)`` around the projection of ``points_world (N, 3)`` plus
    ``margin_px``, clipped to the detector.

    Raises:
        InputError: the points project outside the detector (nothing to compare)."""
    uv = projection.project(points_world[None].to(projection.K.dtype))[0]
    if not torch.isfinite(uv).all():
        raise InputError("the region of interest does not project onto the detector: cannot refine")
    h, w = projection.height, projection.width
    u0 = int(max(0, math.floor(float(uv[:, 0].min())) - margin_px))
    v0 = int(max(0, math.floor(float(uv[:, 1].min())) - margin_px))
    u1 = int(min(w - 1, math.ceil(float(uv[:, 0].max())) + margin_px))
    v1 = int(min(h - 1, math.ceil(float(uv[:, 1].max())) + margin_px))
    if u1 - u0 < 8 or v1 - v0 < 8:
        raise InputError("the region of interest projects (almost) outside the detector: cannot refine")
    return u0, v0, u1 - u0 + 1, v1 - v0 + 1




#: the scale (detector pixels) of the local contrast normalisation of both gradient images (:func:`local_contrast`;
#: 0 = off): ``refine.local_contrast_px``
LOCAL_CONTRAST_PX = 6.0
#: the floor of the local normalisation, as a share of the window's mean squared gradient magnitude
LOCAL_CONTRAST_FLOOR = 0.25
#: a gradient image whose mean squared magnitude is below this is flat (rounding; real ones are above 1e-8)
FLAT_MEAN_SQUARE = 1e-16


def local_contrast(g: torch.Tensor, scale_px: float, mask: torch.Tensor | None = None,
                   floor: float = LOCAL_CONTRAST_FLOOR) -> torch.Tensor:
    """Gradient images ``g (B, 2, h, w)`` divided by their local RMS magnitude (Gaussian of ``scale_px`` pixels,
    over the pixels where ``mask (1, 1, h, w)`` is 1), floored at ``floor`` times the window's mean square.

    A smooth gain on the X-ray's gradients (scatter or beam hardening lowering the contrast behind thick anatomy)
    cancels; without it the gradient correlation pulls the pose towards where the gain is high.
    ``scale_px <= 0`` returns ``g``."""
    if scale_px <= 0:
        return g
    e = (g * g).sum(1)
    m = torch.ones_like(e[:1]) if mask is None else mask[:, 0].to(e.dtype)
    local = gaussian_blur(e * m, scale_px) / gaussian_blur(m, scale_px).clamp_min(1e-6)
    mean = (e * m).sum(dim=(-2, -1), keepdim=True) / m.sum(dim=(-2, -1), keepdim=True).clamp_min(1.0)
    out = g / torch.sqrt(local + float(floor) * mean).clamp_min(1e-20)[:, None]
    # an image flat but for rounding (an empty DRR: the CT left the window) stays flat, not noise scaled up
    return torch.where(mean[:, None] > FLAT_MEAN_SQUARE, out, torch.zeros_like(out))


def _normalised(g: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient images ``(B, 2, h, w)`` -> ``(B, 2, h w)`` with each component centred and scaled to unit norm, and
    ``(B, 2, 1)`` whether the component is flat (then 0); with ``mask (1, 1, h, w)`` (0/1) over its pixels only
    (the others 0)."""
    if mask is None:
        x = (g - g.mean(dim=(2, 3), keepdim=True)).flatten(2)
    else:
        m = mask.to(g.dtype)
        x = ((g - (g * m).sum(dim=(2, 3), keepdim=True) / m.sum().clamp_min(1.0)) * m).flatten(2)
    n = torch.sqrt((x * x).sum(-1, keepdim=True))
    flat = ~(n > 1e-20)
    return torch.where(flat, torch.zeros_like(x), x / n.clamp_min(1e-20)), flat


class SimilarityWindow:
    """The gradient correlation of DRRs with the X-ray in the detector window around a region, at one scale.

    The window is the projection of ``points`` at ``T`` plus ``margin_px``; it is rendered with a padding and the
    gradients are cropped after smoothing, like the X-ray's (docs/design.md §4.3: no border bias), on a detector
    grid ``grid_px`` times coarser than the X-ray's (smoothing ``sigma_px / grid_px`` rendered pixels).  The X-ray's
    gradients are computed once at full resolution and sampled at the rendered pixels.

    Args:
        projection: C-arm geometry, batch 1; xray: ``(H, W)`` its image (attenuation-positive).
        T: ``(4, 4)`` the pose that places the window; points: ``(N, 3)`` region points (CT frame, mm).
        sigma_px, highpass_px, blur_px, margin_px: scale, high-pass filter, DRR blur (of its transmitted
            intensity) and margin (detector pixels).
        grid_px: detector pixels per rendered pixel (1 = full resolution).
        mask_saturated: leave the X-ray's saturated pixels (:func:`saturated`) and those within two gradient
            scales of them out of the correlation (of the X-ray and of every DRR): a window that clipped burnt-out
            lung or direct beam has no edges there while the DRR has (on chest physics X-rays started at the true
            pose, the finest scale's optimum moved 2-7 mm along the beam in 4 of 8 cases without it, at most
            2.4 mm in 1 of 8 with it; docs/design.md §4.3).
        ignore: ``(H, W)`` bool, X-ray pixels that carry no image of the CT (the inpainted foreign objects of
            :class:`~PPCRegistrationLib.registration.Registration`): left out, with the same margin, as the
            saturated ones; None = none.
        local_contrast_px: both gradient images are divided by their local RMS magnitude at this scale (detector
            pixels; :func:`local_contrast`; 0 = off) before they are correlated, so that a smooth gain on the
            X-ray's contrast (scatter, beam hardening) does not pull the pose (docs/design.md §4.3).
    Raises:
        InputError: a bad X-ray or scale, or the region projects outside the detector.
    """

    def __init__(self, projection: Projection, xray: torch.Tensor, T: torch.Tensor, points: torch.Tensor, *,
                 sigma_px: float, highpass_px: float, blur_px: float, margin_px: int, grid_px: int = 1,
                 mask_saturated: bool = True, ignore: torch.Tensor | None = None,
                 local_contrast_px: float = LOCAL_CONTRAST_PX) -> None:
        if xray.ndim != 2 or tuple(xray.shape) != (projection.height, projection.width):
            raise InputError(f"the X-ray must be (H, W) = {(projection.height, projection.width)}, got "
                             f"{tuple(xray.shape)}")
        if not (sigma_px > 0) or int(grid_px) < 1:
            raise InputError("refinement needs a positive scale (pixels) and a grid of at least one detector pixel")
        dev = xray.device
        proj = projection.to(dev, torch.float64)
        u0, v0, ww, wh = refine_window(proj, transform_points(T.to(dev, torch.float64), points.to(dev, torch.float64)),
                                       int(margin_px))
        f = int(grid_px)
        self.sigma, self.blur, self.highpass, self.grid = float(sigma_px), float(blur_px), float(highpass_px), f
        pad = int(math.ceil(3 * math.sqrt(self.sigma ** 2 + max(self.blur, BLUR_RANGE_PX[1]) ** 2
                                          + self.highpass ** 2))) + 2
        pc = -(-pad // f)  # the padding in rendered pixels
        wc, hc = -(-ww // f), -(-wh // f)
        self.projection = coarsen_projection(
            crop_projection(proj, u0 - pc * f, v0 - pc * f, (wc + 2 * pc) * f, (hc + 2 * pc) * f), f)
        self._crop = (pc, hc, wc)
        self.window = (u0, v0, ww, wh)
        # the X-ray's gradients at full resolution on a padded crop (borders replicated), sampled at the rendered
        # pixels (detector pixel f * j of the window).  (Sampling the X-ray first and filtering it as the DRRs, so
        # that both alias alike, rescued 1 of 4 lumbar cases the coarse grids lose and lost another.)
        x = xray.to(torch.float32)
        H, W = x.shape
        rows = torch.arange(v0 - pad, v0 + hc * f + pad, device=dev).clamp(0, H - 1)
        cols = torch.arange(u0 - pad, u0 + wc * f + pad, device=dev).clamp(0, W - 1)
        crop = x[rows][:, cols]
        g = highpass(image_gradient(crop[None], sigma_px=self.sigma), self.highpass)
        self.xray_gradient = g[:, :, pad:pad + hc * f:f, pad:pad + wc * f:f]  # (1, 2, hc, wc)
        # saturated pixels (a clipped window: burnt-out lung, direct beam, collimator shadow), the ignored ones and
        # those whose gradient they reach (2 sigma) are left out of the correlation, in the X-ray and the DRRs alike
        #: ``(1, 1, hc, wc)`` 1 where the correlation looks, or None (everywhere)
        self.mask: torch.Tensor | None = None
        left_out = saturated(x)[rows][:, cols] if mask_saturated else None
        if ignore is not None:
            if tuple(ignore.shape) != (H, W):
                raise InputError(f"the mask of X-ray pixels to ignore must be (H, W) = {(H, W)}, got "
                                 f"{tuple(ignore.shape)}")
            ignored = ignore.to(dev, torch.bool)[rows][:, cols]
            left_out = ignored if left_out is None else (left_out | ignored)
        if left_out is not None and bool(left_out.any()):
            r = int(math.ceil(2 * self.sigma)) + 1
            grown = F.max_pool2d(left_out[None, None].float(), 2 * r + 1, stride=1, padding=r)
            keep = (grown < 0.5)[:, :, pad:pad + hc * f:f, pad:pad + wc * f:f]
            if float(keep.float().mean()) >= MIN_UNSATURATED:
                self.mask = keep.to(torch.float32)
        if not (local_contrast_px >= 0 and math.isfinite(local_contrast_px)):
            raise InputError(f"the local contrast scale must be >= 0 pixels, got {local_contrast_px}")
        self.local_px = float(local_contrast_px)
        self.xray_gradient = local_contrast(self.xray_gradient, self.local_px / f, self.mask)
        self._xn = _normalised(self.xray_gradient, self.mask)[0]

    def drr_gradient(self, drr: torch.Tensor, blur_px: float | None = None, gamma: float = 1.0,
                     response: float = 0.0, scatter: float = 0.0) -> torch.Tensor:
        """``(B, h, w)`` DRRs of :attr:`projection` -> their cropped, filtered gradients ``(B, 2, hc, wc)``.

        The nuisance parameters :class:`~PPCRegistrationLib.refine.PoseRefiner` can estimate: ``blur_px``
        (detector pixels) replaces the window's blur of the transmitted intensity ``I = exp(-DRR)``; ``response``
        is the detector's output curve ``(1 - I^response) / response`` (0 = the logarithm ``-log I``, 1 = an image
        linear in the intensity); ``scatter`` adds that fraction of the window's mean intensity to ``I`` before
        (scatter: nearly uniform over a window, it lowers the contrast behind dense bone most); ``gamma`` raises
        the result to that power (a contrast curve)."""
        pc, hc, wc = self._crop
        f = self.grid
        blur = self.blur if blur_px is None else float(blur_px)
        lam = float(response)
        if blur > 0 or lam != 0.0 or scatter > 0:  # the detector blurs the transmitted intensity, not its log
            inten = torch.exp(-drr)
            if scatter > 0:
                inten = inten + float(scatter) * inten.mean(dim=(-2, -1), keepdim=True)
            if blur > 0:
                inten = gaussian_blur(inten, blur / f)
            inten = inten.clamp_min(1e-30)
            drr = -torch.log(inten) if abs(lam) < 1e-6 else (1.0 - inten ** lam) / lam
        if gamma != 1.0:
            drr = drr.clamp_min(0) ** gamma
        g = image_gradient(drr, sigma_px=self.sigma / f)
        g = highpass(g, self.highpass / f)[:, :, pc:pc + hc, pc:pc + wc]
        return local_contrast(g, self.local_px / f, self.mask)

    def residual(self, drr: torch.Tensor, blur_px: float | None = None, gamma: float = 1.0,
                 response: float = 0.0, scatter: float = 0.0) -> torch.Tensor:
        """``(B, M)`` normalised-gradient differences of DRRs ``(B, h, w)`` and the X-ray, ``|r|^2 = 4 (1 - GC)``; a
        flat DRR component (the CT out of the window) counts as uncorrelated (NCC 0).  ``blur_px``, ``gamma``,
        ``response``: see :meth:`drr_gradient`."""
        d, flat = _normalised(self.drr_gradient(drr, blur_px, gamma, response, scatter), self.mask)
        return torch.where(flat, -math.sqrt(2.0) * self._xn, d - self._xn).flatten(1)

    def similarity(self, drr: torch.Tensor) -> torch.Tensor:
        """``(B,)`` gradient correlation of DRRs ``(B, h, w)`` with the X-ray (differentiable)."""
        g = self.drr_gradient(drr)
        flat = ~(g.detach().abs().flatten(1).amax(-1) > 0)
        return torch.where(flat, torch.zeros(g.shape[0], dtype=g.dtype, device=g.device),
                           gradient_correlation(g, self.xray_gradient.expand_as(g), self.mask))



@torch.no_grad()
def pose_similarity(renderer: DRRRenderer, xray: torch.Tensor, projection: Projection, T: torch.Tensor,
                    points: torch.Tensor, *, sigma_px: float = 1.5, highpass_px: float = 4.0, blur_px: float = 0.75,
                    margin_px: int = 24, grid_px: int = 1, mask_saturated: bool = True,
                    ignore: torch.Tensor | None = None, local_contrast_px: float = 0.0) -> float:
    """The gradient correlation :func:`refine_pose` maximises, of one pose ``T (4, 4)`` (window around the
    projected ``points (N, 3)``): comparable between poses of the same X-ray.  One render.  Without the local
    contrast normalisation by default: the registration chooses among its attempts' results by this plain
    correlation, which tells a gross miss from the right pose better (docs/design.md §4.4).

    Raises:
        InputError: the points project outside the detector."""
    dev = renderer.device
    T = torch.as_tensor(T, dtype=torch.float64, device=dev)
    win = SimilarityWindow(projection, xray.to(dev), T, points, sigma_px=sigma_px, highpass_px=highpass_px,
                           blur_px=blur_px, margin_px=margin_px, grid_px=grid_px, mask_saturated=mask_saturated,
                           ignore=ignore, local_contrast_px=local_contrast_px)
    return float(win.similarity(renderer.render(win.projection, T[None]))[0])
