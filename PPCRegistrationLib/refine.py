"""Intensity-based refinement of a registration: maximise the gradient correlation of DRR and X-ray.

The PPC updates stop where the contour correspondences stop moving.  From there, :func:`refine_pose` optimises
the six pose parameters directly on the images: the DRR of the region's detector window is compared with the
X-ray by gradient correlation (GC, the mean normalised cross-correlation of the two gradient components), and
Levenberg–Marquardt steps on the normalised gradient difference (Jacobian by finite differences, seven DRRs
rendered as one batch per step) maximise it, coarse to fine over the Gaussian scales ``sigmas_px``, the coarse
scales rendered on a coarser detector grid (``grids_px``).  Four details remove biases that would otherwise move
the estimate along the weakly observable beam direction (measured on the lumbar and chest CTs, docs/design.md §4.3):

* the window is rendered with a margin and the gradients are cropped after smoothing, so DRR and X-ray
  gradients are computed the same way up to the window's border (without it the GC optimum sits 0.5-1 mm
  away from the true depth even for a noise-free X-ray);
* the DRR is blurred like the imaging chain blurs the X-ray, and where the detector blurs it: the transmitted
  intensity ``exp(-DRR)``, then the logarithm again (a DRR blurred by 0.75 px where the X-ray was blurred by
  1.5 px moved the depth by 0.7-1.6 mm; blurring the line integrals instead of the intensity left 0.1-0.3 mm
  even for the right blur);
* the finest scale estimates the X-ray's blur and contrast curve with the pose (``appearance``, see
  :class:`PoseRefiner`): held at fixed values they were the depth error of every chest case that ended
  1.5-2.2 mm off;
* the gradient images are high-pass filtered (``highpass_px``), so the smooth gradient of scatter does not
  correlate (scatter of 15 % biased the depth by up to 2.9 mm, at most 0.4 mm with the filter).

The result of each scale is accepted only when it raises the GC at that scale; otherwise the pose is kept.
Pure torch, CPU or CUDA (where the renderer lives).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .drr import DRRRenderer
from .errors import InputError
from .geometry import Projection, se3_exp, transform_points, translation_matrix
from .similarity import (BLUR_RANGE_PX, LOCAL_CONTRAST_PX, RESPONSE_RANGE, SCATTER_RANGE, SimilarityWindow,
                         gradient_correlation, highpass, pose_similarity, refine_window)

__all__ = ["gradient_correlation", "highpass", "RefineResult", "SimilarityWindow", "PoseRefiner", "refine_pose",
           "refine_window", "pose_similarity", "DEFAULT_SIGMAS_PX", "DEFAULT_GRIDS_PX", "DEFAULT_ITERATIONS",
           "DEFAULT_SOLVERS", "GradientRefiner", "grid_for_scale", "make_refiner", "APPEARANCE",
           "DEFAULT_APPEARANCE", "GAMMA_RANGE"]

#: the refinement's gradient scales (detector pixels), coarse to fine
DEFAULT_SIGMAS_PX: tuple[float, ...] = (6.0, 3.0, 1.5)
#: detector pixels per rendered pixel at each scale of the registration's refinement: the coarse scales need no
#: full-resolution render, and the finest is rendered at half resolution too (on the sample chest CT a full-resolution
#: batch of seven DRRs takes ~0.47 s on one core, at half resolution ~0.06 s; 16 cases each: the same successes)
DEFAULT_GRIDS_PX: tuple[int, ...] = (4, 2, 2)


def grid_for_scale(sigma_px: float) -> int:
    """The coarsest detector grid (detector pixels per rendered pixel) that still samples a gradient scale of
    ``sigma_px`` detector pixels with at least 1.5 rendered pixels of smoothing."""
    return max(1, int(float(sigma_px) // 1.5))


#: the fractions of a Levenberg-Marquardt step tried at once (one batch of DRRs) before the step is taken
LINE_SEARCH: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
#: the optimiser of each scale: ``"lbfgs"`` (:class:`GradientRefiner`, exact gradients, wide capture) on the coarse
#: scales, ``"lm"`` (:class:`PoseRefiner`, batched Gauss-Newton steps, fast near the optimum) on the finest
DEFAULT_SOLVERS: tuple[str, ...] = ("lbfgs", "lbfgs", "lm")
SOLVERS = ("lbfgs", "lm")
#: iterations per scale (L-BFGS or Levenberg-Marquardt; each stops earlier when it has converged)
DEFAULT_ITERATIONS = 10
#: finite-difference step of the Jacobian, in scaled pose units (0.01 = 0.2 mrad or 0.02 mm): the correlation is
#: strongly curved, and a step of 0.1 biased the gradient by up to a factor of two (lumbar CT, 1.5 px scale)
DEFAULT_FD_STEP = 0.01

#: the imaging chain's parameters :class:`PoseRefiner` can estimate with the pose (``RefineSettings.appearance``)
APPEARANCE = ("blur", "gamma", "response", "scatter")
#: those the registration estimates by default: blur, gamma and scatter (with the local contrast normalisation, adding
#: scatter took chest physics X-rays refined from the true pose from a median 0.61 to 0.37 mm, the training simulator's
#: stayed at 0.18 mm; whole registrations, docs/design.md §4.3).  The response curve is left out (on 50
#: physics-simulator lumbar cases, half of them linear images, estimating it too changed nothing: 19 vs 20 below 2 mm)
DEFAULT_APPEARANCE = ("blur", "gamma", "scatter")
#: the bounds of the imaging-chain parameters that are linear in their increment (0.25 per unit)
_LINEAR_CHAIN_RANGES = {"response": RESPONSE_RANGE, "scatter": SCATTER_RANGE}
#: the bounds of the contrast exponent (the blur's: :data:`~PPCRegistrationLib.similarity.BLUR_RANGE_PX`)
GAMMA_RANGE = (0.5, 2.0)

#: scale of the optimised parameters: one unit = 0.02 rad of rotation or 2 mm of translation, so that a unit
#: step moves the points of a vertebra-sized region by about as much in either
_PARAM_SCALE = (0.02, 0.02, 0.02, 2.0, 2.0, 2.0)


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
    #: the imaging chain's parameters estimated with the pose (``{"blur_px": ..., "gamma": ...}``, see
    #: :class:`PoseRefiner`; empty when none were)
    appearance: dict = field(default_factory=dict)


class _ScaleRefiner:
    """What the refiners of one scale share: the similarity window, the pose parameterisation about the region's
    centre, the bookkeeping and the result."""

    def __init__(self, renderer: DRRRenderer, xray: torch.Tensor, projection: Projection, T: torch.Tensor,
                 points: torch.Tensor, *, sigma_px: float, iterations: int, highpass_px: float, blur_px: float,
                 margin_px: int, grid_px: int, mask_saturated: bool = True,
                 ignore: torch.Tensor | None = None, local_contrast_px: float = LOCAL_CONTRAST_PX) -> None:
        if iterations < 1:
            raise InputError("refinement needs at least one iteration")
        self.t0 = time.perf_counter()
        self.renderer = renderer
        dev = renderer.device
        self.T0 = torch.as_tensor(T, dtype=torch.float64, device=dev).clone()
        pts = points.to(dev, torch.float64)
        self.win = SimilarityWindow(projection, xray.to(dev), self.T0, pts, sigma_px=sigma_px,
                                    highpass_px=highpass_px, blur_px=blur_px, margin_px=margin_px, grid_px=grid_px,
                                    mask_saturated=mask_saturated, ignore=ignore,
                                    local_contrast_px=local_contrast_px)
        self._scale = torch.tensor(_PARAM_SCALE, dtype=torch.float64, device=dev)
        self._centre = transform_points(self.T0, pts).mean(0)
        self.iterations, self.evaluations, self.iterations_done = int(iterations), 0, 0
        self.message, self.done = "", False

    def pose(self, d: torch.Tensor) -> torch.Tensor:
        """Pose(s) ``(..., 4, 4)`` of scaled increments ``d (..., 6)`` about the region's centre."""
        c = self._centre
        return translation_matrix(c) @ se3_exp(d * self._scale) @ translation_matrix(-c) @ self.T0

    def result(self) -> RefineResult:
        """The outcome so far: the best pose when it raised the gradient correlation, else the starting pose."""
        accepted = self.best > self.before and bool(torch.isfinite(self.best_T).all())
        message = self.message
        if not accepted:
            message = message or f"the gradient correlation did not improve ({self.before:.4f})"
        return RefineResult(T=(self.best_T if accepted else self.T0).detach().clone(), accepted=accepted,
                            similarity_before=self.before, similarity_after=self.best if accepted else self.before,
                            evaluations=self.evaluations, seconds=time.perf_counter() - self.t0, message=message)

class PoseRefiner(_ScaleRefiner):
    """The refinement of a pose at one gradient scale: Levenberg–Marquardt (damped Gauss–Newton) steps on the
    gradient correlation, run in pieces (:meth:`advance`) so that a GUI can show progress and stay responsive;
    :func:`refine_pose` runs all scales in one go (docs/design.md §4.3).

    The residual is the difference of the normalised gradient images of DRR and X-ray (``|r|^2 = 4 (1 - GC)``);
    its Jacobian in the six scaled pose parameters (about the region's centre) comes from forward finite
    differences, the DRRs of one iteration (trial pose and six perturbations) rendered as one batch without
    autograd.  A trial that does not raise the correlation is rejected and the damping raised.

    ``appearance`` adds parameters of the imaging chain to the six of the pose, estimated with it (docs/design.md
    §4.3): ``"blur"``, the blur of the DRR's transmitted intensity (the X-ray's point-spread function, 0-3 px),
    ``"gamma"``, the exponent of a contrast curve applied to the DRR (0.5-2), and ``"response"``, the detector's
    output curve (-0.5-1.5: 0 the logarithm of the intensity, 1 an image linear in it; see
    :meth:`~PPCRegistrationLib.similarity.SimilarityWindow.drr_gradient`).  Held at fixed values they bias the
    depth: on 60 chest cases the final depth error grew by 1.1 mm per pixel of X-ray blur and 4 mm per unit of
    scatter fraction (correlations 0.47 and 0.38), and every case that ended 1.5-2.2 mm off was a depth error of a
    blurred X-ray; on noise-free lumbar X-rays blurred by 1.5 px the depth error fell from 0.7-1.6 mm to 0.0 mm.
    They cost no render: their Jacobian columns filter the same DRR differently.

    Args:
        renderer: the CT's renderer; xray: ``(H, W)``; projection: batch 1; T: ``(4, 4)`` the starting pose (not
            modified); points: ``(N, 3)`` region points (CT frame, mm: the window and rotation centre).
        sigma_px, highpass_px, blur_px, margin_px, grid_px, mask_saturated, ignore, local_contrast_px: see
            :class:`SimilarityWindow`
            (``blur_px``: the blur's starting value when it is estimated).
        iterations: Levenberg–Marquardt iterations in all (one batch of seven renders each, plus one to start).
        fd_step: finite-difference step in scaled parameter units (1 = 0.02 rad or 2 mm; 1 px^2 of blur
            variance; 0.25 of log gamma; 0.25 of the response exponent; 0.25 of the scatter fraction).
        appearance: names from :data:`APPEARANCE` to estimate with the pose.

    Attributes:
        before: GC at the starting pose; best / best_T: the best GC so far and its pose; evaluations: DRRs rendered;
        iterations_done; done; message: why it ended early (stop request, non-finite step), else "".
    """

    def __init__(self, renderer: DRRRenderer, xray: torch.Tensor, projection: Projection, T: torch.Tensor,
                 points: torch.Tensor, *, sigma_px: float = 1.5, iterations: int = DEFAULT_ITERATIONS,
                 highpass_px: float = 4.0,
                 blur_px: float = 0.75, margin_px: int = 24, grid_px: int = 1,
                 fd_step: float = DEFAULT_FD_STEP, appearance: tuple[str, ...] = (),
                 mask_saturated: bool = True,
                 ignore: torch.Tensor | None = None, local_contrast_px: float = LOCAL_CONTRAST_PX) -> None:
        super().__init__(renderer, xray, projection, T, points, sigma_px=sigma_px, iterations=iterations,
                         highpass_px=highpass_px, blur_px=blur_px, margin_px=margin_px, grid_px=grid_px,
                         mask_saturated=mask_saturated, ignore=ignore, local_contrast_px=local_contrast_px)
        self.appearance = tuple(dict.fromkeys(appearance))
        if not set(self.appearance) <= set(APPEARANCE):
            raise InputError(f"the refinement can estimate {', '.join(APPEARANCE)} with the pose, got "
                             f"{', '.join(map(str, appearance))}")
        dev = renderer.device
        self.h, self.lam = float(fd_step), 1e-3
        self._d = torch.zeros(6 + len(self.appearance), dtype=torch.float64, device=dev)
        self._alphas = torch.tensor(LINE_SEARCH, dtype=torch.float64, device=dev)
        self._r, self._J = self._linearise(self._d)
        self.before = 1.0 - float(self._r @ self._r) / 4.0
        self.best, self.best_T = self.before, self.T0
        self.best_appearance = self._chain(self._d)

    def _chain(self, d: torch.Tensor) -> dict:
        """The imaging chain's parameters of increments ``d``: ``{"blur_px", "gamma", "response", "scatter"}``
        (in the order of :meth:`SimilarityWindow.residual`'s arguments)."""
        out = {"blur_px": float(self.win.blur), "gamma": 1.0, "response": 0.0, "scatter": 0.0}
        for j, name in enumerate(self.appearance):
            x = float(d[6 + j])
            if name == "blur":
                lo, hi = BLUR_RANGE_PX
                out["blur_px"] = math.sqrt(min(max(self.win.blur ** 2 + x, lo ** 2), hi ** 2))
            elif name == "gamma":
                out["gamma"] = min(max(math.exp(0.25 * x), GAMMA_RANGE[0]), GAMMA_RANGE[1])
            else:  # linear in the increment, within bounds
                lo, hi = _LINEAR_CHAIN_RANGES[name]
                out[name] = min(max(0.25 * x, lo), hi)
        return out

    def _residuals(self, drr: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """Residuals ``(B, M)`` of DRRs ``(B, h, w)`` rendered at increments ``d (B, n)``, each with its own
        imaging-chain parameters."""
        if not self.appearance:
            return self.win.residual(drr).double()
        return torch.cat([self.win.residual(drr[i:i + 1], *self._chain(d[i]).values()).double()
                          for i in range(drr.shape[0])])

    def _linearise(self, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual ``(M,)`` at ``d`` and its forward-difference Jacobian ``(M, n)``: one batch of seven DRRs (the
        imaging chain's columns filter the first of them differently)."""
        n = d.shape[0]
        ds = d[None].repeat(7, 1)
        ds[1:, :6] += torch.eye(6, dtype=d.dtype, device=d.device) * self.h
        with torch.no_grad():
            drr = self.renderer.render(self.win.projection, self.pose(ds[:, :6]))
            r = self._residuals(drr, ds)
            if n > 6:
                dx = d[None].repeat(n - 6, 1)
                dx[:, 6:] += torch.eye(n - 6, dtype=d.dtype, device=d.device) * self.h
                r = torch.cat([r, self._residuals(drr[:1].expand(n - 6, -1, -1), dx)])
        self.evaluations += 7
        return r[0], (r[1:] - r[0]).T / self.h

    def result(self) -> RefineResult:
        res = super().result()
        if self.appearance and res.accepted:
            keys = {n: ("blur_px" if n == "blur" else n) for n in self.appearance}
            res.appearance = {keys[n]: self.best_appearance[keys[n]] for n in self.appearance}
        return res

    def advance(self, iterations: int | None = None, should_stop: Callable[[], bool] | None = None) -> bool:
        """Run up to ``iterations`` more iterations (default: all that are left); returns :attr:`done`."""
        left = self.iterations - self.iterations_done
        for _ in range(max(1, left if iterations is None else min(int(iterations), left))):
            if self.done:
                break
            if should_stop is not None and should_stop():
                self.message, self.done = "stopped on request", True
                break
            r, J = self._r, self._J
            JtJ = J.T @ J
            lhs = JtJ + self.lam * torch.diag(torch.diagonal(JtJ).clamp_min(1e-12))
            step = -torch.linalg.solve(lhs, J.T @ r)
            if not bool(torch.isfinite(step).all()):
                self.message, self.done = "the refinement's Gauss-Newton step is not finite", True
                break
            # a line search along the step, one batch: far from the optimum the Gauss-Newton model of a normalised
            # correlation under-estimates the step (measured: 10 plain steps raised the GC 0.36 -> 0.55 where the
            # optimum is 0.94), near it the full step is taken
            trial = self._d[None] + self._alphas[:, None] * step[None]
            with torch.no_grad():
                rt = self._residuals(self.renderer.render(self.win.projection, self.pose(trial[:, :6])), trial)
            self.evaluations += len(self._alphas)
            costs = (rt * rt).sum(-1)
            k = int(costs.argmin())
            self.iterations_done += 1
            if float(costs[k]) < float(r @ r):  # accepted: trust the local model more when the full step helped
                self._d = trial[k]
                self._r, self._J = self._linearise(self._d)
                if float(self._alphas[k]) >= 1.0:
                    self.lam = max(self.lam / 3.0, 1e-6)
                self.best, self.best_T = 1.0 - float(self._r @ self._r) / 4.0, self.pose(self._d[:6])
                self.best_appearance = self._chain(self._d)
                self.done = float((self._alphas[k] * step).abs().max()) < 2e-3  # below 0.04 mm / 0.04 mrad
            else:  # rejected: damp more; give up when no step along the local model helps
                self.lam *= 4.0
                self.done = self.lam > 1e4
            self.done = self.done or self.iterations_done >= self.iterations
        return self.done


class GradientRefiner(_ScaleRefiner):
    """The refinement of a pose at one gradient scale by L-BFGS on the gradient correlation, with its exact gradient
    (autograd through the renderer): slower per iteration than :class:`PoseRefiner`'s batched Gauss-Newton steps but
    with a wider capture range far from the optimum (measured on lumbar cases whose PPC updates ended 5-32 mm off:
    L-BFGS at the 6 px scale raised the GC 0.36 -> 0.94, ten Gauss-Newton steps with a line search 0.36 -> 0.59).
    Same interface as :class:`PoseRefiner`; ``iterations`` are L-BFGS iterations (each one or a few renders with
    gradients; at most 1.25 renders per iteration on average, as ``torch.optim.LBFGS`` allowed).

    The optimiser is SciPy's L-BFGS-B (strong-Wolfe line search): ``torch.optim.LBFGS`` imports ``torch._dynamo``
    on first use, 2.5 s that every fresh process paid inside its first registration.  A piece of a scale
    (:meth:`advance` with fewer iterations, the GUI's ticks) continues from the best pose so far with a fresh
    curvature memory."""

    def __init__(self, renderer: DRRRenderer, xray: torch.Tensor, projection: Projection, T: torch.Tensor,
                 points: torch.Tensor, *, sigma_px: float = 1.5, iterations: int = DEFAULT_ITERATIONS,
                 highpass_px: float = 4.0,
                 blur_px: float = 0.75, margin_px: int = 24, grid_px: int = 1, mask_saturated: bool = True,
                 ignore: torch.Tensor | None = None, local_contrast_px: float = LOCAL_CONTRAST_PX) -> None:
        super().__init__(renderer, xray, projection, T, points, sigma_px=sigma_px, iterations=iterations,
                         highpass_px=highpass_px, blur_px=blur_px, margin_px=margin_px, grid_px=grid_px,
                         mask_saturated=mask_saturated, ignore=ignore, local_contrast_px=local_contrast_px)
        with torch.no_grad():
            self.before = float(self._similarity(torch.zeros(6, dtype=torch.float64, device=renderer.device)))
        self.best, self.best_T = self.before, self.T0
        self._x = np.zeros(6)  # the scaled increments of the best pose so far

    def _similarity(self, d: torch.Tensor) -> torch.Tensor:
        self.evaluations += 1
        sim = self.win.similarity(self.renderer.render(self.win.projection, self.pose(d)[None]))[0]
        # a pose that moves the CT out of the window renders a flat DRR: GC 0 with a zero gradient
        return sim + 0.0 * d.sum() if d.requires_grad and not sim.requires_grad else sim

    def _negative_similarity(self, x: np.ndarray, should_stop: Callable[[], bool] | None) -> tuple[float, np.ndarray]:
        """``-GC`` at scaled increments ``x (6,)`` and its gradient (one render with autograd)."""
        if should_stop is not None and should_stop():
            raise _Stopped
        d = torch.tensor(x, dtype=torch.float64, device=self.renderer.device, requires_grad=True)
        sim = self._similarity(d)
        if not torch.isfinite(sim):
            raise FloatingPointError("the gradient correlation is not finite")
        (grad,) = torch.autograd.grad(-sim, d)
        value = float(sim.detach())
        if value > self.best:
            self.best, self.best_T, self._x = value, self.pose(d.detach()), np.array(x, dtype=float)
        return -value, grad.detach().cpu().numpy().astype(float)

    def advance(self, iterations: int | None = None, should_stop: Callable[[], bool] | None = None) -> bool:
        """Run up to ``iterations`` more L-BFGS iterations (default: all that are left); returns :attr:`done`."""
        if self.done:
            return True
        from scipy.optimize import minimize

        left = self.iterations - self.iterations_done
        k = max(1, left if iterations is None else min(int(iterations), left))
        ran = k
        try:
            res = minimize(self._negative_similarity, self._x.copy(), args=(should_stop,), jac=True,
                           method="L-BFGS-B", options={"maxiter": k, "maxfun": k + k // 4 + 1, "gtol": 1e-10,
                                                             "ftol": 1e-12})
            ran = int(res.nit)
        except _Stopped:
            self.message = "stopped on request"
        except FloatingPointError as exc:
            self.message = str(exc)
        self.iterations_done += max(ran, 1)
        # L-BFGS returns early (fewer iterations than asked) when it has converged
        self.done = bool(self.message) or self.iterations_done >= self.iterations or ran < k
        return self.done


class _Stopped(Exception):
    pass


def make_refiner(solver: str, *args, **kwargs) -> "PoseRefiner | GradientRefiner":
    """The refiner of one scale: ``solver`` ``"lm"`` (:class:`PoseRefiner`) or ``"lbfgs"`` (:class:`GradientRefiner`),
    with their common arguments."""
    if solver == "lm":
        return PoseRefiner(*args, **kwargs)
    if solver == "lbfgs":  # (the imaging chain's parameters are estimated by the Levenberg-Marquardt scale only)
        kwargs.pop("appearance", None)
        return GradientRefiner(*args, **kwargs)
    raise InputError(f"unknown refinement solver {solver!r}: use one of {', '.join(SOLVERS)}")


def refine_pose(renderer: DRRRenderer, xray: torch.Tensor, projection: Projection, T: torch.Tensor,
                points: torch.Tensor, *, sigmas_px: tuple[float, ...] = DEFAULT_SIGMAS_PX,
                grids_px: tuple[int, ...] | None = None, solvers: tuple[str, ...] | None = None,
                iterations: int = DEFAULT_ITERATIONS,
                highpass_px: float = 4.0, blur_px: float = 0.75, margin_px: int = 24,
                should_stop: Callable[[], bool] | None = None,
                appearance: tuple[str, ...] = DEFAULT_APPEARANCE, mask_saturated: bool = True,
                ignore: torch.Tensor | None = None, local_contrast_px: float = LOCAL_CONTRAST_PX) -> RefineResult:
    """Refine a pose by maximising the gradient correlation of DRR and X-ray (see the module docstring).

    Args:
        renderer: the CT's DRR renderer (its device is used).
        xray: ``(H, W)`` X-ray (attenuation-positive), the detector of ``projection``.
        projection: C-arm geometry, batch 1.
        T: ``(4, 4)`` pose to refine (moves the CT, mm); not modified.
        points: ``(N, 3)`` points of the region of interest (CT frame, mm, before ``T``): they set the
            detector window and the rotation centre.
        sigmas_px: Gaussian scales (detector pixels) of the gradients, coarse to fine; one run per scale, each
            kept only when it raises the gradient correlation at its scale.
        grids_px: detector pixels per rendered pixel at each scale (one per scale); default
            :func:`grid_for_scale` of each.
        solvers: the optimiser of each scale (see :data:`DEFAULT_SOLVERS`); default L-BFGS on all but the finest
            scale and Levenberg-Marquardt on the finest.
        iterations: Levenberg–Marquardt iterations per scale (seven renders each).
        highpass_px: scale (pixels) of the high-pass filter of both gradient images (0 = off).
        blur_px: extra Gaussian blur (pixels) of the DRR, the detector's point-spread function.
        margin_px: margin (pixels) of the window around the projected region.
        should_stop: polled at every iteration; True ends the refinement with the best pose found so far.
        appearance: the imaging chain's parameters the Levenberg-Marquardt scales estimate with the pose (see
            :class:`PoseRefiner`; default :data:`DEFAULT_APPEARANCE`, as the registration's
            ``RefineSettings.appearance``; ``()`` = none).
        mask_saturated: leave the X-ray's saturated pixels out of the correlation (see :class:`SimilarityWindow`).
        ignore: ``(H, W)`` bool X-ray pixels left out of the correlation as well (see :class:`SimilarityWindow`).
        local_contrast_px: scale (pixels) of the local contrast normalisation of both gradient images
            (:func:`~PPCRegistrationLib.similarity.local_contrast`; 0 = off).
    Returns:
        :class:`RefineResult`: ``similarity_before`` at the first scale, ``similarity_after`` at the last scale
        run; accepted when any scale was; ``evaluations`` counts every DRR rendered; ``appearance`` the estimate of
        the last scale that made one.
    """
    if not sigmas_px:
        raise InputError("refinement needs at least one positive scale (pixels) and one iteration")
    grids_px = tuple(grid_for_scale(s) for s in sigmas_px) if grids_px is None else tuple(grids_px)
    solvers = (("lbfgs",) * (len(sigmas_px) - 1) + ("lm",)) if solvers is None else tuple(solvers)
    if len(grids_px) != len(sigmas_px) or len(solvers) != len(sigmas_px):
        raise InputError(f"give one detector grid and one solver per refinement scale: {len(sigmas_px)} scales, "
                         f"{len(grids_px)} grids, {len(solvers)} solvers")
    t0 = time.perf_counter()
    T_cur = torch.as_tensor(T, dtype=torch.float64)
    results: list[RefineResult] = []
    for i, sigma in enumerate(sigmas_px):
        r = make_refiner(solvers[i], renderer, xray, projection, T_cur, points, sigma_px=sigma, iterations=iterations,
                        highpass_px=highpass_px, blur_px=blur_px, margin_px=margin_px,
                        grid_px=int(grids_px[i]), appearance=tuple(appearance), mask_saturated=mask_saturated,
                        ignore=ignore, local_contrast_px=local_contrast_px)
        r.advance(None, should_stop)
        results.append(r.result())
        T_cur = results[-1].T
        if r.message:
            break
    chain = next((x.appearance for x in reversed(results) if x.appearance), {})
    return RefineResult(T=T_cur, accepted=any(x.accepted for x in results),
                        similarity_before=results[0].similarity_before, similarity_after=results[-1].similarity_after,
                        evaluations=sum(x.evaluations for x in results), seconds=time.perf_counter() - t0,
                        message=results[-1].message, appearance=dict(chain))
