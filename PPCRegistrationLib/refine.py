"""Intensity-based refinement of a registration: maximise the gradient correlation of DRR and X-ray.

The PPC updates stop where the contour correspondences stop moving.  From there, :func:`refine_pose` optimises
the six pose parameters directly on the images: the differentiable DRR of the region's detector window is
compared with the X-ray by gradient correlation (GC, the mean normalised cross-correlation of the two
gradient components) and L-BFGS follows its gradient (autograd through the renderer), coarse to fine over the
Gaussian scales ``sigmas_px``.  Three details remove biases that would otherwise move the estimate along the
weakly observable beam direction (measured on the lumbar CT, DESIGN.md §4 cases):

* the window is rendered with a margin and the gradients are cropped after smoothing, so DRR and X-ray
  gradients are computed the same way up to the window's border (without it the GC optimum sits 0.5-1 mm
  away from the true depth even for a noise-free X-ray);
* the DRR is blurred by ``blur_px`` like the imaging chain blurs the X-ray (a sharper DRR biases the depth by
  +0.4 to +1.2 mm for a 1 px detector blur);
* the gradient images are high-pass filtered (``highpass_px``), so the smooth gradient of scatter does not
  correlate (scatter of 15 % biased the depth by up to 2.9 mm, at most 0.4 mm with the filter).

The result of each scale is accepted only when it raises the GC at that scale; otherwise the pose is kept.
Pure torch, CPU or CUDA (where the renderer lives).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .drr import DRRRenderer, image_gradient
from .errors import InputError
from .geometry import Projection, se3_exp, transform_points, translation_matrix

__all__ = ["gradient_correlation", "highpass", "RefineResult", "PoseRefiner", "refine_pose", "refine_window",
           "pose_similarity"]

#: scale of the optimised parameters: one unit = 0.02 rad of rotation or 2 mm of translation, so that a unit
#: step moves the points of a vertebra-sized region by about as much in either
_PARAM_SCALE = (0.02, 0.02, 0.02, 2.0, 2.0, 2.0)


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


def gradient_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Gradient correlation of gradient images ``a, b (B, 2, H, W)``: ``(B,)`` in [-1, 1], differentiable.

    The mean over the two components of their normalised cross-correlation over the image."""
    if a.shape != b.shape or a.ndim != 4 or a.shape[1] != 2:
        raise InputError(f"gradient images must both be (B, 2, H, W), got {tuple(a.shape)} and {tuple(b.shape)}")
    x = a - a.mean(dim=(2, 3), keepdim=True)
    y = b - b.mean(dim=(2, 3), keepdim=True)
    num = (x * y).sum(dim=(2, 3))
    den = torch.sqrt((x * x).sum(dim=(2, 3)) * (y * y).sum(dim=(2, 3))).clamp_min(1e-20)
    return (num / den).mean(-1)


@dataclass
class RefineResult:
    """Outcome of :func:`refine_pose`.

    T: ``(4, 4)`` the refined pose (the input pose when not accepted); accepted: whether the refinement raised
    the GC; similarity_before / similarity_after: GC at the finest scale (after = of the returned pose);
    evaluations: renders with gradients; seconds: wall time; message: why it was not accepted, if so.
    """

    T: torch.Tensor
    accepted: bool
    similarity_before: float
    similarity_after: float
    evaluations: int
    seconds: float
    message: str = ""


class _Stopped(Exception):
    pass


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


class PoseRefiner:
    """The refinement of a pose at one gradient scale, run in pieces (:meth:`advance`) so that a GUI can show
    progress and stay responsive between them; :func:`refine_pose` runs it in one go.

    Args: as :func:`refine_pose`, with one scale ``sigma_px`` (pixels) and ``iterations`` L-BFGS iterations in all.

    Attributes:
        before: the gradient correlation at the starting pose; best: the best found so far;
        best_T: ``(4, 4)`` the pose with ``best``; evaluations: renders so far; done: nothing left to do;
        message: why it ended early (stop request, non-finite similarity), else "".
    """

    def __init__(self, renderer: DRRRenderer, xray: torch.Tensor, projection: Projection, T: torch.Tensor,
                 points: torch.Tensor, *, sigma_px: float = 1.5, iterations: int = 20, highpass_px: float = 4.0,
                 blur_px: float = 0.75, margin_px: int = 24) -> None:
        if xray.ndim != 2 or tuple(xray.shape) != (projection.height, projection.width):
            raise InputError(f"the X-ray must be (H, W) = {(projection.height, projection.width)}, got "
                             f"{tuple(xray.shape)}")
        if not (sigma_px > 0) or iterations < 1:
            raise InputError("refinement needs a positive scale (pixels) and at least one iteration")
        from .registration import crop_projection  # (registration imports this module)

        self.t0 = time.perf_counter()
        self.renderer = renderer
        dev = renderer.device
        proj = projection.to(dev, torch.float64)
        self.T0 = torch.as_tensor(T, dtype=torch.float64, device=dev).clone()
        pts = points.to(dev, torch.float64)
        u0, v0, ww, wh = refine_window(proj, transform_points(self.T0, pts), int(margin_px))
        # render a padded window: the gradients are cropped after smoothing, like the X-ray's
        self.sigma, self.blur, self.highpass = float(sigma_px), float(blur_px), float(highpass_px)
        pad = int(math.ceil(3 * math.sqrt(self.sigma ** 2 + self.blur ** 2 + self.highpass ** 2))) + 2
        self._crop = (pad, wh, ww)
        self._sub = crop_projection(proj, u0 - pad, v0 - pad, ww + 2 * pad, wh + 2 * pad)
        x = xray.to(dev, torch.float32)
        # the X-ray's gradients on a padded crop too (the detector border is replicated by image_gradient)
        y0, x0 = max(0, v0 - pad), max(0, u0 - pad)
        g = image_gradient(x[y0:v0 + wh + pad, x0:u0 + ww + pad][None], sigma_px=self.sigma)
        self._xg = highpass(g, self.highpass)[:, :, v0 - y0:v0 - y0 + wh, u0 - x0:u0 - x0 + ww]
        self._scale = torch.tensor(_PARAM_SCALE, dtype=torch.float64, device=dev)
        self._centre = transform_points(self.T0, pts).mean(0)
        self.iterations = int(iterations)
        self.evaluations = 0
        self.iterations_done = 0
        self.message = ""
        self.done = False
        with torch.no_grad():
            self.before = float(self._sim(self.T0))
        self.best, self.best_T = self.before, self.T0
        self._dv = torch.zeros(6, dtype=torch.float64, device=dev, requires_grad=True)
        self._opt = torch.optim.LBFGS([self._dv], lr=1.0, max_iter=self.iterations, line_search_fn="strong_wolfe",
                                      tolerance_grad=1e-10, tolerance_change=1e-12)

    def _sim(self, Tp: torch.Tensor) -> torch.Tensor:
        self.evaluations += 1
        pad, wh, ww = self._crop
        drr = self.renderer.render(self._sub, Tp[None])
        g = image_gradient(drr, sigma_px=math.sqrt(self.sigma ** 2 + self.blur ** 2))
        g = highpass(g, self.highpass)[:, :, pad:pad + wh, pad:pad + ww]
        if not bool(g.detach().abs().amax() > 0):
            # the CT does not project into the window: a flat DRR correlates with nothing, and its normalisation
            # has no gradient (0 / 0); see objective
            return g.new_zeros(())
        return gradient_correlation(g, self._xg)[0]

    def _pose(self, d: torch.Tensor) -> torch.Tensor:
        c = self._centre
        return translation_matrix(c) @ se3_exp(d * self._scale) @ translation_matrix(-c) @ self.T0

    def objective(self, d: torch.Tensor) -> torch.Tensor:
        """The minimised loss at the pose increment ``d (6,)`` (scaled se(3) about the points' centre): minus
        the gradient correlation, differentiable in ``d``. A trial pose of the line search that moves the CT out of
        the window renders an empty, flat DRR: its loss is then 0 (no correlation) with a zero gradient, so the line
        search steps back instead of failing."""
        sim = self._sim(self._pose(d))
        if not sim.requires_grad and d.requires_grad:
            sim = sim + 0.0 * d.sum()
        return -sim

    def advance(self, iterations: int | None = None, should_stop: Callable[[], bool] | None = None) -> bool:
        """Run up to ``iterations`` more L-BFGS iterations (default: all that are left); returns :attr:`done`."""
        if self.done:
            return True
        k = self.iterations - self.iterations_done if iterations is None else \
            min(int(iterations), self.iterations - self.iterations_done)
        opt = self._opt
        opt.param_groups[0]["max_iter"] = max(1, k)
        n_before = opt.state[self._dv].get("n_iter", 0) if self._dv in opt.state else 0

        def closure() -> torch.Tensor:
            if should_stop is not None and should_stop():
                raise _Stopped
            opt.zero_grad()
            loss = self.objective(self._dv)
            if not torch.isfinite(loss):
                raise FloatingPointError("the gradient correlation is not finite")
            loss.backward()
            value = -float(loss.detach())
            if value > self.best:
                with torch.no_grad():
                    self.best, self.best_T = value, self._pose(self._dv.detach())
            return loss

        try:
            opt.step(closure)
        except _Stopped:
            self.message = "stopped on request"
        except FloatingPointError as exc:
            self.message = str(exc)
        n_after = opt.state[self._dv].get("n_iter", n_before) if self._dv in opt.state else n_before
        ran = n_after - n_before
        self.iterations_done += max(ran, 1)
        # L-BFGS returns early (fewer iterations than asked) when it has converged
        if self.message or self.iterations_done >= self.iterations or ran < k:
            self.done = True
        return self.done

    def result(self) -> RefineResult:
        """The outcome so far: the best pose when it raised the gradient correlation, else the starting pose."""
        accepted = self.best > self.before and bool(torch.isfinite(self.best_T).all())
        message = self.message
        if not accepted:
            message = message or f"the gradient correlation did not improve ({self.before:.4f})"
        return RefineResult(T=(self.best_T if accepted else self.T0).detach().clone(), accepted=accepted,
                            similarity_before=self.before, similarity_after=self.best if accepted else self.before,
                            evaluations=self.evaluations, seconds=time.perf_counter() - self.t0, message=message)


def refine_pose(renderer: DRRRenderer, xray: torch.Tensor, projection: Projection, T: torch.Tensor,
                points: torch.Tensor, *, sigmas_px: tuple[float, ...] = (6.0, 3.0, 1.5), iterations: int = 20,
                highpass_px: float = 4.0, blur_px: float = 0.75, margin_px: int = 24,
                should_stop: Callable[[], bool] | None = None) -> RefineResult:
    """Refine a pose by maximising the gradient correlation of DRR and X-ray (see the module docstring).

    Args:
        renderer: the CT's DRR renderer (its device is used).
        xray: ``(H, W)`` X-ray (attenuation-positive), the detector of ``projection``.
        projection: C-arm geometry, batch 1.
        T: ``(4, 4)`` pose to refine (moves the CT, mm); not modified.
        points: ``(N, 3)`` points of the region of interest (CT frame, mm, before ``T``): they set the
            detector window and the rotation centre.
        sigmas_px: Gaussian scales (pixels) of the gradients, coarse to fine; one L-BFGS run per scale, each
            kept only when it raises the gradient correlation at its scale.
        iterations: L-BFGS iterations per scale (each costs one or a few renders with gradients).
        highpass_px: scale (pixels) of the high-pass filter of both gradient images (0 = off).
        blur_px: extra Gaussian blur (pixels) of the DRR, the detector's point-spread function.
        margin_px: margin (pixels) of the window around the projected region.
        should_stop: polled at every evaluation; True ends the refinement with the best pose found so far.
    Returns:
        :class:`RefineResult`: ``similarity_before`` at the first scale, ``similarity_after`` at the last scale
        run; accepted when any scale was.
    """
    if not sigmas_px:
        raise InputError("refinement needs at least one positive scale (pixels) and one iteration")
    t0 = time.perf_counter()
    T_cur = torch.as_tensor(T, dtype=torch.float64)
    results: list[RefineResult] = []
    for sigma in sigmas_px:
        r = PoseRefiner(renderer, xray, projection, T_cur, points, sigma_px=sigma, iterations=iterations,
                        highpass_px=highpass_px, blur_px=blur_px, margin_px=margin_px)
        r.advance(None, should_stop)
        results.append(r.result())
        T_cur = results[-1].T
        if r.message:
            break
    return RefineResult(T=T_cur, accepted=any(x.accepted for x in results),
                        similarity_before=results[0].similarity_before, similarity_after=results[-1].similarity_after,
                        evaluations=sum(x.evaluations for x in results), seconds=time.perf_counter() - t0,
                        message=results[-1].message)


def pose_similarity(renderer: DRRRenderer, xray: torch.Tensor, projection: Projection, T: torch.Tensor,
                    points: torch.Tensor, *, sigma_px: float = 1.5, highpass_px: float = 4.0, blur_px: float = 0.75,
                    margin_px: int = 24) -> float:
    """The gradient correlation :func:`refine_pose` maximises, of one pose ``T (4, 4)`` (window around the
    projected ``points (N, 3)``), without gradients: comparable between poses of the same X-ray.

    Raises:
        InputError: the points project outside the detector."""
    return PoseRefiner(renderer, xray, projection, T, points, sigma_px=sigma_px, iterations=1,
                       highpass_px=highpass_px, blur_px=blur_px, margin_px=margin_px).before
