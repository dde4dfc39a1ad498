"""The registration loop (DESIGN.md §3): iterate the PPC update operator from T_init.

Every iteration renders the DRR at the current estimate (only in a detector window around the region of
interest), selects contour points, finds their correspondences in the X-ray (classic matching, or a learned
operator plugged in through :class:`Matcher`), solves the weighted PPC system with robust re-weighting and
applies the centred rigid update.  The loop keeps the history and the best estimate, stops on convergence,
on a stop request, or on divergence (then it falls back to the best estimate), and can be reset.

When the PPC updates are done, the intensity refinement (:mod:`PPCRegistrationLib.refine`, one update per
scale) optimises the pose on the images.  If the result then correlates with the X-ray less than the initial
estimate does, or less than ``retry_below_similarity``, a second attempt starts from the initial estimate (no
2D pre-alignment, stopping when the similarity stops improving), and the registration keeps whichever of the
two results and the initial estimate correlates best: a registration never ends further from the X-ray, by
its own measure, than it started.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Protocol

import torch

from .devices import resolve_device
from .drr import DRRRenderer, image_gradient
from .errors import InputError, PPCError
from .features import SurfacePoints, contour_mask, extract_surface_points, project_normals
from .geometry import (Projection, centred_update, invert_rigid, rotation_angle_deg, so3_exp, transform_points,
                       translation_matrix)
from .matching import match_along_normals
from .metrics import mtre as mtre_fn
from .ppc import out_of_plane_damping, solve_ppc
from .refine import PoseRefiner, gradient_correlation, pose_similarity
from .volume import Volume

#: the ``operator`` of the intensity refinement's updates in the history
REFINE = "refine"

STATUSES = ("running", "converged", "max_iterations", "diverged", "stopped", "rank_deficient", "failed")


@dataclass
class RegistrationConfig:
    """Parameters of the registration (units in the names).

    method: the method's name (:mod:`PPCRegistrationLib.methods` builds learned and chained registrations).
    max_iterations: maximum number of updates.
    tolerance_mm: stop when an update moves the target points by less than this (mean, mm).
    n_points: budget of surface points extracted from the region of interest.
    bone_threshold_hu: surface points need the CT above this next to the edge.
    contour_theta_deg: a point is on the contour when its gradient is within this angle of perpendicular to
        the viewing ray.
    search_px: initial half-length of the search along the 2D normal (detector pixels); it then adapts to
        the size of the observed displacements, between ``min_search_px`` and ``search_px``.
    gradient_sigma_px: Gaussian smoothing of the image gradients at the finest level (pixels).
    xray_blur_px: Gaussian blur (pixels, the imaging chain's point-spread function) applied to the DRR in
        addition, so that DRR and X-ray edges have the same profile.
    robust_iterations: iteratively re-weighted PPC solves (Tukey on point-to-plane residuals).
    ransac_hypotheses, ransac_sample, ransac_threshold_px: consensus step before the re-weighted solve: that
        many minimal sets of that many correspondences; inliers within that many detector pixels (0 = off).
    damping_initial, damping_min, damping_offset_px: damping of the PPC solve (relative to the mean eigenvalue
        of the scaled normal matrix): ``damping_initial * min(1, (median displacement / damping_offset_px)^2)``,
        at least ``damping_min``.  Far from the solution the displacements are large and unreliable and the
        update is damped; near it the damping vanishes.
    out_of_plane_damping: extra damping of the weakly observable directions of a single view (translation along
        the beam, rotations about the detector axes), scaled by the fourth power of the same ratio: they are
        held while the in-plane alignment is coarse and released near the solution.
    out_of_plane_min, out_of_plane_noise_px: floor of that damping, scaled by (spread of the point-to-plane
        residuals in pixels / out_of_plane_noise_px)^2: noisy correspondences cannot drag the pose along the
        weak directions (measured on 30 lumbar cases: success < 2 mm 27 % without the floor, 47 % with it),
        exact ones still converge to the exact pose.
    patience: stop as diverged when the similarity has stayed below the best for this many iterations
        (0 = off: the gradient correlation barely reacts to the depth error, so it is off by default).
    window_margin_px: margin around the projected region of interest rendered for matching.
    window_px: side of a square detector window centred on the projected region of interest, rendered for matching
        instead (the learned operators: the window they were trained on, see :func:`~PPCRegistrationLib.methods.
        learned_window_px`); 0 = the region's bounding box plus ``window_margin_px`` and the search range.
    solver: ``"robust"`` (RANSAC consensus, Tukey re-weighting, damping: the classic pipeline) or ``"plain"``
        (one weighted PPC solve with the matcher's weights, as the learned operator is trained).
    plain_out_of_plane: damping of the out-of-plane directions in the ``"plain"`` solve (the learned operator's
        known operator is trained with the same value, ``TrainConfig.out_of_plane``): without it a single view's
        noisy correspondences throw the depth off (mean one-update mTRE 65 mm on 160 validation samples,
        17 mm with it, from 23 mm).
    flow_flips: the learned operators' flow is averaged over this many mirrorings of the window (1, 2 or 4, see
        :func:`~PPCRegistrationLib.networks.mirror_averaged_flow`): it cancels the network's mirror-dependent bias
        (validation EPE 9.22 -> 8.46 px with 4; 1 = the network once, as in training).
    coarse_search_px: half-range (px) of the global 2D pre-alignment before the first update (0 = off).
    refine_iterations: L-BFGS iterations per scale of the intensity refinement that follows the PPC updates
        (:mod:`PPCRegistrationLib.refine`: gradient correlation of DRR and X-ray maximised over the pose, one
        update per scale of ``refine_sigmas_px``); 0 = off.  It runs when the PPC updates converged, diverged (from
        the best estimate) or used up ``max_iterations``.
    refine_sigmas_px, refine_highpass_px, refine_blur_px: its gradient scales (coarse to fine), high-pass filter
        and DRR blur (pixels), see :func:`~PPCRegistrationLib.refine.refine_pose`.
    refine_iterations_per_update: L-BFGS iterations of one refinement update (0 = a whole scale): the Slicer module
        uses a few, so that each timer tick stays short and the views show the progress.
    retry_below_similarity: after the refinement, when the result's gradient correlation (the refinement's measure)
        is below this value or not above that of the initial estimate, the registration starts again from the
        initial estimate without the 2D pre-alignment and with ``retry_patience``, and keeps whichever of the two
        results and the initial estimate correlates best with the X-ray (0 = only when worse than the initial
        estimate; needs the refinement).  Measured on 10 lumbar failures of the first attempt: 5 rescued.
    retry_patience: ``patience`` of that second attempt (it stops and reverts to its best estimate when the image
        similarity has not improved for that many updates).
    device: ``"cpu"``, ``"cuda"``, or ``"auto"``.
    """

    method: str = "classic"
    max_iterations: int = 30
    tolerance_mm: float = 0.05
    n_points: int = 2000
    bone_threshold_hu: float = 150.0
    contour_theta_deg: float = 6.0
    search_px: float = 24.0
    min_search_px: float = 4.0
    gradient_sigma_px: float = 2.0
    xray_blur_px: float = 0.0
    robust_iterations: int = 2
    damping_initial: float = 0.05
    damping_min: float = 1e-5
    damping_offset_px: float = 2.0
    out_of_plane_damping: float = 10.0
    out_of_plane_min: float = 0.1
    out_of_plane_noise_px: float = 0.5
    ransac_hypotheses: int = 256
    ransac_sample: int = 12
    ransac_threshold_px: float = 1.5
    max_update_mm: float = 30.0
    coarse_search_px: float = 32.0
    coarse_min_gain: float = 0.02
    coarse_angles_deg: tuple[float, ...] = (-8.0, -4.0, 0.0, 4.0, 8.0)
    max_drift_mm: float = 75.0
    patience: int = 0
    window_margin_px: int = 24
    window_px: int = 0
    solver: str = "robust"
    plain_out_of_plane: float = 1.0
    flow_flips: int = 4
    refine_iterations: int = 20
    refine_sigmas_px: tuple[float, ...] = (6.0, 3.0, 1.5)
    refine_highpass_px: float = 4.0
    refine_blur_px: float = 0.75
    refine_iterations_per_update: int = 0
    retry_below_similarity: float = 0.7
    retry_patience: int = 5
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.solver not in ("robust", "plain"):
            raise InputError(f"solver must be 'robust' or 'plain', got {self.solver!r}")
        if self.refine_iterations < 0 or (self.refine_iterations and (not self.refine_sigmas_px or any(
                not (float(x) > 0) for x in self.refine_sigmas_px))):
            raise InputError("refine_iterations must be >= 0 and refine_sigmas_px positive scales (pixels), got "
                             f"{self.refine_iterations} and {self.refine_sigmas_px}")
        self.refine_sigmas_px = tuple(float(x) for x in self.refine_sigmas_px)
        if self.flow_flips not in (1, 2, 4):
            raise InputError(f"flow_flips must be 1, 2 or 4 (mirrorings the learned flow is averaged over), got "
                             f"{self.flow_flips}")
        if int(self.window_px) < 0 or int(self.window_px) != self.window_px:
            raise InputError(f"window_px must be a non-negative whole number of pixels (0 = around the region of "
                             f"interest), got {self.window_px}")

    def resolved_device(self) -> torch.device:
        return resolve_device(self.device)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class IterationState:
    """What one update did (tensors on the CPU).

    points_3d ``(N, 3)`` contour points in the CT frame (mm, before T); uv ``(N, 2)`` their projections at the
    estimate used for this update and uv_matched ``(N, 2)`` their correspondences (pixels, u = column);
    weights ``(N,)`` in [0, 1]; drr ``(H, W)`` the DRR at that estimate (full detector, zero outside the
    rendered window); T ``(4, 4)`` the estimate after the update; operator: the method of the configuration
    that made the update (a chained pipeline switches from a learned one to ``classic``).
    """

    iteration: int
    T: torch.Tensor
    update_mm: float
    update_deg: float
    n_contour: int
    mean_weight: float
    seconds: float
    similarity: float
    mtre_mm: float | None
    points_3d: torch.Tensor
    uv: torch.Tensor
    uv_matched: torch.Tensor
    weights: torch.Tensor
    drr: torch.Tensor
    status: str = "running"
    message: str = ""
    operator: str = ""

    def summary(self) -> dict:
        """Scalars only (for JSON and logs)."""
        return {"iteration": self.iteration, "update_mm": self.update_mm, "update_deg": self.update_deg,
                "n_contour": self.n_contour, "mean_weight": self.mean_weight, "seconds": self.seconds,
                "similarity": self.similarity, "mtre_mm": self.mtre_mm, "status": self.status,
                "operator": self.operator}


@dataclass
class RegistrationResult:
    """Final outcome of :meth:`Registration.run`."""

    T: torch.Tensor
    best_T: torch.Tensor
    status: str
    iterations: int
    seconds: float
    history: list[IterationState] = field(default_factory=list)
    message: str = ""


class Matcher(Protocol):
    """The 2D matching step of the update operator (classic or learned).

    Given the DRR and X-ray gradient images of the rendered window ``(1, 2, h, w)``, the X-ray window
    ``(1, h, w)`` and DRR window ``(1, h, w)``, the projected contour points ``uv (1, N, 2)`` (window pixels),
    their 2D normals ``(1, N, 2)``, the contour mask ``(1, N)`` and the search range (px), return the matched
    positions ``(1, N, 2)`` (window pixels) and weights ``(1, N)`` in [0, 1] (0 = no correspondence).
    """

    def __call__(self, drr: torch.Tensor, xray: torch.Tensor, drr_grad: torch.Tensor, xray_grad: torch.Tensor,
                 uv: torch.Tensor, normals: torch.Tensor, mask: torch.Tensor, search_px: float,
                 context: dict) -> tuple[torch.Tensor, torch.Tensor]: ...


class ClassicMatcher:
    """Search along the 2D normal for the best normalised correlation of gradient profiles (classic PPC)."""

    def __call__(self, drr, xray, drr_grad, xray_grad, uv, normals, mask, search_px, context):
        res = match_along_normals(drr_grad, xray_grad, uv, normals, mask, search_px=search_px)
        w = res.score * res.valid.to(res.score.dtype) * mask.to(res.score.dtype)
        return res.uv_matched, w


class OracleMatcher:
    """The ground-truth correspondences (simulation only): each contour point is matched to the projection of the
    same CT point at the ground truth, ``p'_i = P(T_gt T^-1 w_i)``, weight 1.

    It measures what the PPC solve itself can do (the ceiling of one update with perfect 2D matching); it needs
    the registration's ``T_gt``.
    """

    def __call__(self, drr, xray, drr_grad, xray_grad, uv, normals, mask, search_px, context):
        T_gt = context.get("T_gt")
        if T_gt is None:
            raise InputError("the oracle matcher needs the ground-truth transform (T_gt): it is for simulations only")
        T = context["T"].to(torch.float64)
        moved = transform_points(T_gt.to(torch.float64) @ invert_rigid(T), context["points_3d"].to(torch.float64))
        uv_true = context["window_projection"].project(moved)
        return uv_true.to(uv.dtype), mask.to(uv.dtype)


def crop_projection(proj: Projection, u0: int, v0: int, width: int, height: int) -> Projection:
    """The same C-arm restricted to the detector window starting at pixel (u0, v0) of size width x height."""
    K = proj.K.clone()
    K[:, 0, 2] -= u0
    K[:, 1, 2] -= v0
    return replace(proj, K=K, width=int(width), height=int(height))


def gradient_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Gradient correlation of two gradient images ``(1, 2, h, w)``: mean NCC of the two components."""
    return float(gradient_correlation(a, b)[0])


class Registration:
    """Single-view rigid 2D/3D registration of a CT to an X-ray with the PPC update operator.

    Args:
        ct: the CT (HU) with its ``ijk_to_world``.
        xray: ``(H, W)`` X-ray, attenuation-positive (bone bright, as a DRR).
        projection: the C-arm geometry (batch 1) in the CT's world frame; detector size ``H x W``.
        T_init: ``(4, 4)`` initial estimate (moves the CT; it is copied, never modified).
        roi: region of interest (:class:`~PPCRegistrationLib.roi.BoxROI` / ``LabelROI``) or None (whole CT).
        config: :class:`RegistrationConfig`.
        T_gt: optional ``(4, 4)`` ground truth, to report mTRE per iteration.
        matcher: the 2D matching step; default :class:`ClassicMatcher`.
        surface: precomputed surface points (skip the extraction, e.g. cached per case).
        renderer: precomputed :class:`~PPCRegistrationLib.drr.DRRRenderer` of this CT.
    """

    def __init__(self, ct: Volume, xray: torch.Tensor, projection: Projection, T_init: torch.Tensor, roi=None,
                 config: RegistrationConfig | None = None, T_gt: torch.Tensor | None = None,
                 matcher: Matcher | None = None, surface: SurfacePoints | None = None,
                 renderer: DRRRenderer | None = None) -> None:
        self.config = config or RegistrationConfig()
        self.device = self.config.resolved_device()
        if not isinstance(ct, Volume):
            raise InputError("ct must be a PPCRegistrationLib.volume.Volume")
        xray = torch.as_tensor(xray)
        if xray.ndim == 3 and 1 in (xray.shape[0], xray.shape[-1]):
            xray = xray.reshape(xray.shape[1:] if xray.shape[0] == 1 else xray.shape[:-1])
        if xray.ndim != 2:
            raise InputError(f"the X-ray must be a 2D image (H, W), got shape {tuple(xray.shape)}")
        if not torch.isfinite(xray).all():
            raise InputError("the X-ray image contains NaN or infinite pixels")
        if float(xray.max() - xray.min()) <= 0:
            raise InputError("the X-ray image is constant: nothing to register to")
        if projection.batch != 1:
            raise InputError("the registration takes one C-arm geometry (batch 1)")
        if (projection.height, projection.width) != tuple(xray.shape):
            raise InputError(f"the X-ray is {tuple(xray.shape)} pixels but the geometry's detector is "
                             f"{(projection.height, projection.width)} (rows, columns)")
        T_init = torch.as_tensor(T_init, dtype=torch.float64)
        _check_rigid(T_init, "initial transform")
        if T_gt is not None:
            T_gt = torch.as_tensor(T_gt, dtype=torch.float64)
            _check_rigid(T_gt, "ground-truth transform")
        self.ct = ct
        self.projection = projection.to(self.device, torch.float64)
        self.xray = xray.to(self.device, torch.float32)
        self.T_init = T_init.clone().to(self.device)
        self.T_gt = None if T_gt is None else T_gt.clone().to(self.device)
        self.roi = roi
        self.renderer = renderer or DRRRenderer(ct, device=self.device)
        if surface is None:
            surface = extract_surface_points(ct, roi, bone_threshold_hu=self.config.bone_threshold_hu,
                                             budget=self.config.n_points, seed=self.config.seed)
        if surface.points.shape[0] < 6:
            raise InputError(f"only {surface.points.shape[0]} surface points in the region of interest: "
                             "enlarge the region or lower the bone threshold")
        self.surface = SurfacePoints(surface.points.to(self.device, torch.float64),
                                     surface.gradients.to(self.device, torch.float64))
        self.targets = self.surface.points
        if matcher is None and self.config.method != "classic":
            raise InputError(f"method {self.config.method!r} needs a learned 2D matching model: build the "
                             "registration with PPCRegistrationLib.methods.build_registration (or pass a matcher)")
        self.matcher: Matcher = matcher or ClassicMatcher()
        self._initial_sim: float | None = None  # (T_init never changes: computed once, kept over resets)
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Back to the initial transform; the history is cleared."""
        self._restart_from_initial()
        self.history: list[IterationState] = []
        self.status = "running"
        self.stop_requested = False
        self.refining = False
        self.refine_level = 0
        self._refiner: PoseRefiner | None = None
        self._refine_start = self.T_init.clone()
        self._ppc_outcome = "converged"
        #: 1 for the first registration attempt, 2, 3... for the retries from the initial estimate (see
        #: ``RegistrationConfig.retry_below_similarity`` and :meth:`retry_plan`)
        self.attempt = 1
        self._attempt_start = 0
        self._attempt_prealign = True  # the current attempt starts with the 2D pre-alignment (when configured)
        self._attempt_patience = False  # the current attempt stops on a falling similarity (retry_patience)
        self._candidates: list[tuple[float, torch.Tensor, str]] = []
        self._xray_grad_cache: dict[float, torch.Tensor] = {}

    def stop(self) -> None:
        """Request the running loop to stop after the current update (keeps the last good estimate)."""
        self.stop_requested = True

    @property
    def iteration(self) -> int:
        return len(self.history)

    def mtre(self, T: torch.Tensor | None = None) -> float | None:
        """mTRE (mm) of ``T`` (default the current estimate) when a ground truth was given."""
        if self.T_gt is None:
            return None
        return float(mtre_fn(self.T if T is None else T, self.T_gt, self.targets))

    def _xray_gradient(self, sigma: float) -> torch.Tensor:
        key = round(sigma, 3)
        if key not in self._xray_grad_cache:
            self._xray_grad_cache[key] = image_gradient(self.xray[None], sigma_px=sigma)
        return self._xray_grad_cache[key]

    def _coarse_align(self, T: torch.Tensor) -> torch.Tensor:
        """Global 2D search before the first update: the in-plane rotation (``coarse_angles_deg``, about the ray
        through the region's centre) and shift of the DRR window around the region of interest that best
        correlate (normalised cross-correlation of the gradient images) with the X-ray, applied to the CT as that
        rotation and a translation parallel to the detector at the region's depth.

        Contour matching along normals is local: an initial error of half a vertebra's height lets endplates
        lock onto the neighbouring vertebra.  The window holds ribs, pedicles and soft-tissue edges as well,
        which makes the correlation peak unambiguous.
        """
        cfg = self.config
        proj = self.projection
        S = int(round(cfg.coarse_search_px))
        w_all = transform_points(T, self.surface.points)
        uv_all = proj.project(w_all[None])[0]
        h, w = proj.height, proj.width
        lo = torch.floor(uv_all.min(0).values) - 8
        hi = torch.ceil(uv_all.max(0).values) + 8
        u0, v0 = int(max(S, lo[0])), int(max(S, lo[1]))
        u1, v1 = int(min(w - 1 - S, hi[0])), int(min(h - 1 - S, hi[1]))
        if u1 - u0 < 16 or v1 - v0 < 16:
            return T  # too close to the detector border for a global search
        centre = w_all.mean(0, keepdim=True)
        uv_c = proj.project(centre[None])[0]  # (1, 2)
        # render a larger window, so that rotated templates have no empty corners
        m = int(math.ceil(0.2 * max(u1 - u0, v1 - v0)))
        big = self.renderer.render(crop_projection(proj, u0 - m, v0 - m, u1 - u0 + 1 + 2 * m, v1 - v0 + 1 + 2 * m),
                                   T[None])
        sigma = 2.0
        xg = self._xray_gradient(sigma)[0, :, v0 - S:v1 + S + 1, u0 - S:u1 + S + 1]  # (2, th+2S, tw+2S)
        th, tw = v1 - v0 + 1, u1 - u0 + 1
        ones = torch.ones(1, 2, th, tw, dtype=xg.dtype, device=xg.device)
        s1 = torch.nn.functional.conv2d(xg[None], ones)[0, 0]
        s2 = torch.nn.functional.conv2d((xg * xg)[None], ones)[0, 0]
        var = (s2 - s1 * s1 / (2 * th * tw)).clamp_min(1e-12)
        hb, wb = big.shape[1:]
        vv, uu = torch.meshgrid(torch.arange(hb, dtype=torch.float64), torch.arange(wb, dtype=torch.float64),
                                indexing="ij")
        c = (uv_c[0] - uv_c.new_tensor([u0 - m, v0 - m])).cpu()  # rotation centre in the big window
        best = (-math.inf, 0.0, 0, 0)
        here = -math.inf
        for ang in cfg.coarse_angles_deg:
            # template rotated by ang about the region's projection (from +u towards +v), as the CT rotated
            # about the ray through the region's centre would appear
            a_r = math.radians(ang)
            du_, dv_ = uu - c[0], vv - c[1]
            su = c[0] + math.cos(a_r) * du_ + math.sin(a_r) * dv_
            sv = c[1] - math.sin(a_r) * du_ + math.cos(a_r) * dv_
            grid = torch.stack([su / (wb - 1) * 2 - 1, sv / (hb - 1) * 2 - 1], -1)[None].to(big)
            rot = torch.nn.functional.grid_sample(big[None], grid, align_corners=True, padding_mode="border")[0]
            tg = image_gradient(rot, sigma_px=sigma)[0][:, m:m + th, m:m + tw]
            tg = tg - tg.mean(dim=(1, 2), keepdim=True)
            num = torch.nn.functional.conv2d(xg[None], tg[None])[0, 0]  # (2S+1, 2S+1)
            ncc = num / torch.sqrt(var * (tg * tg).sum()).clamp_min(1e-12)
            k = int(torch.argmax(ncc))
            dv_i, du_i = divmod(k, ncc.shape[1])
            if float(ncc[dv_i, du_i]) > best[0]:
                best = (float(ncc[dv_i, du_i]), ang, du_i - S, dv_i - S)
            if ang == 0:
                here = float(ncc[S, S])
        score, ang, du, dv = best
        if score < here + cfg.coarse_min_gain:
            return T
        out = T
        if ang != 0:
            axis = proj.ray_directions(uv_c[None])[0, 0]  # from the source through the region's centre
            rot3 = torch.eye(4, dtype=T.dtype, device=T.device)
            rot3[:3, :3] = so3_exp(axis * math.radians(ang))
            cm = translation_matrix(centre[0])
            out = cm @ rot3 @ translation_matrix(-centre[0]) @ out
        depth = proj.depth(centre[None])[0]
        moved = proj.backproject(uv_c + uv_c.new_tensor([float(du), float(dv)]), depth)[0]
        shift = torch.eye(4, dtype=T.dtype, device=T.device)
        shift[:3, 3] = (moved - centre)[0]
        return shift @ out

    def _window(self, uv_all: torch.Tensor) -> tuple[int, int, int, int] | None:
        """Detector window (u0, v0, width, height) around the projected region of interest, or None if it
        misses the detector."""
        h, w = self.projection.height, self.projection.width
        side = int(self.config.window_px)
        if side > 0:  # a fixed window centred on the region, clamped to the detector (as the training samples)
            centre = uv_all.mean(0)
            if not bool(torch.isfinite(centre).all()):
                return None
            cw, ch = min(side, w), min(side, h)
            u0 = int(min(max(round(float(centre[0]) - cw / 2), 0), w - cw))
            v0 = int(min(max(round(float(centre[1]) - ch / 2), 0), h - ch))
            inside = ((uv_all[:, 0] >= u0) & (uv_all[:, 0] < u0 + cw) & (uv_all[:, 1] >= v0)
                      & (uv_all[:, 1] < v0 + ch))
            return (u0, v0, cw, ch) if bool(inside.any()) else None
        m = self.config.window_margin_px + self.search_px
        lo = torch.floor(uv_all.min(0).values - m)
        hi = torch.ceil(uv_all.max(0).values + m)
        u0, v0 = int(max(0, lo[0])), int(max(0, lo[1]))
        u1, v1 = int(min(w - 1, hi[0])), int(min(h - 1, hi[1]))
        if u1 - u0 < 8 or v1 - v0 < 8:
            return None
        return u0, v0, u1 - u0 + 1, v1 - v0 + 1

    # ------------------------------------------------------------------ one update
    @property
    def refine_enabled(self) -> bool:
        """Whether this registration ends with the intensity refinement (``config.refine_iterations > 0``)."""
        return int(self.config.refine_iterations) > 0

    @property
    def ppc_iterations(self) -> int:
        """Number of PPC updates of the current attempt so far (the refinement's updates not counted)."""
        return sum(1 for st in self.history[self._attempt_start:] if st.operator != REFINE)

    @property
    def budget_spent(self) -> bool:
        """True when :meth:`run` would stop for ``max_iterations``: the PPC updates are used up and no refinement
        is pending (the GUI's timer loop asks this before every update)."""
        return not self.refining and self.ppc_iterations >= self.config.max_iterations

    def step(self) -> IterationState:
        """One update from the current estimate (a PPC update, or one scale of the intensity refinement once
        the PPC updates have converged or used up ``max_iterations``); returns what it did."""
        if self.refining:
            return self._refine_step()
        st = self._ppc_step()
        if not self.refine_enabled:
            return st
        done = st.status in ("converged", "diverged") or (st.status == "running"
                                                          and self.ppc_iterations >= self.config.max_iterations)
        if done:
            # after a divergence the estimate was reverted to the best one: the refinement starts from there
            self._ppc_outcome = st.status if st.status != "running" else "max_iterations"
            self.refining = True
            self.refine_level = 0
            st.status = "running"
            self.status = "running"
            st.message = (st.message + "; " if st.message else "") + "intensity refinement follows"
        return st

    def _refine_step(self) -> IterationState:
        """One scale of the intensity refinement (:class:`~PPCRegistrationLib.refine.PoseRefiner`), or a part of it
        (``refine_iterations_per_update``)."""
        t0 = time.perf_counter()
        cfg = self.config
        sigmas = cfg.refine_sigmas_px
        sigma = sigmas[min(self.refine_level, len(sigmas) - 1)]
        if self._refiner is None:
            self._refine_start = self.T.clone()
            self._refiner = PoseRefiner(self.renderer, self.xray, self.projection, self.T, self.surface.points,
                                        sigma_px=sigma, iterations=int(cfg.refine_iterations),
                                        highpass_px=cfg.refine_highpass_px, blur_px=cfg.refine_blur_px,
                                        margin_px=int(cfg.window_margin_px))
        T = self._refine_start
        refiner = self._refiner
        done = refiner.advance(int(cfg.refine_iterations_per_update) or None, lambda: self.stop_requested)
        res = refiner.result()
        if not done:  # part of a scale: show the best pose so far, decide at the end of the scale
            T_prev = self.T
            self.T = res.T.to(T)
            return self._refine_state(t0, T_prev, "running", res.similarity_after,
                                      f"intensity refinement at {sigma:g} px: gradient correlation "
                                      f"{res.similarity_before:.4f} -> {res.similarity_after:.4f} so far")
        self._refiner = None
        T_new = res.T.to(T)
        drift = float(mtre_fn(T_new, self.T_init, self.targets))
        if res.accepted and drift > cfg.max_drift_mm:
            # the image similarity barely constrains the depth: a refinement that wanders off is not taken
            res = replace(res, accepted=False, T=T.clone(), similarity_after=res.similarity_before,
                          message=f"it moved the estimate {drift:.1f} mm away from the initial transform (limit "
                                  f"{cfg.max_drift_mm} mm)")
            T_new = T
        self.refine_level += 1
        last = self.refine_level >= len(sigmas) or res.message == "stopped on request"
        status = self._ppc_outcome if last else "running"
        if res.accepted:
            self.T = T_new
            self.best_T = T_new.clone()
            message = (f"intensity refinement at {sigma:g} px: gradient correlation {res.similarity_before:.4f} -> "
                       f"{res.similarity_after:.4f} ({res.evaluations} renders)")
        else:
            self.T = T.clone()  # (partial updates may have shown other poses)
            message = f"intensity refinement at {sigma:g} px kept the estimate: {res.message}"
        if last:
            self.refining = False
            status, extra = self._end_attempt(res.similarity_after)
            message = message + extra
        return self._refine_state(t0, T, status, res.similarity_after, message)

    def _refine_state(self, t0: float, T_prev: torch.Tensor, status: str, similarity: float,
                      message: str) -> IterationState:
        """Append and return the IterationState of a refinement update (DRR at the new estimate, no points)."""
        proj = self.projection
        drr_full = torch.zeros(proj.height, proj.width)
        win = self._window(proj.project(transform_points(self.T, self.surface.points)[None])[0])
        if win is not None:
            u0, v0, ww, wh = win
            with torch.no_grad():
                drr = self.renderer.render(crop_projection(proj, u0, v0, ww, wh), self.T[None])
            drr_full[v0:v0 + wh, u0:u0 + ww] = drr[0].detach().cpu()
        empty = torch.zeros(0, 3, dtype=torch.float64)
        st = IterationState(iteration=self.iteration + 1, T=self.T.detach().cpu().clone(),
                            update_mm=float(mtre_fn(self.T, T_prev, self.targets)),
                            update_deg=float(rotation_angle_deg(self.T @ invert_rigid(T_prev))), n_contour=0,
                            mean_weight=0.0, seconds=time.perf_counter() - t0, similarity=similarity,
                            mtre_mm=self.mtre(self.T), points_3d=empty, uv=empty[:, :2], uv_matched=empty[:, :2],
                            weights=empty[:, 0], drr=drr_full, status=status, message=message, operator=REFINE)
        self.history.append(st)
        self.status = status
        return st

    def retry_plan(self) -> list[tuple[bool, bool, str]]:
        """The attempts that follow a first attempt whose result correlates poorly with the X-ray, in order, each from
        the initial estimate: ``(pre-align, stop on a falling similarity, description)``. Here one retry without the
        2D pre-alignment that stops when the similarity stops improving (``retry_patience``)."""
        return [(False, True, "without the 2D pre-alignment")]

    def _restart_from_initial(self) -> None:
        """The estimate, best estimate, search range and damping as at the start of a registration."""
        self.T = self.T_init.clone()
        self.best_T = self.T_init.clone()
        self.best_similarity = -math.inf
        self.since_best = 0
        self.search_px = float(self.config.search_px)
        self.damping = float(self.config.damping_initial)

    def _start_attempt(self, prealign: bool, patience: bool) -> None:
        """Begin the next attempt from the initial estimate."""
        self.attempt += 1
        self._attempt_start = len(self.history) + 1  # (the state being finished is appended after this)
        self._attempt_prealign, self._attempt_patience = prealign, patience
        self._restart_from_initial()

    def _end_attempt(self, similarity: float) -> tuple[str, str]:
        """After the refinement of an attempt: the next attempt from the initial estimate (:meth:`retry_plan`) when
        this one's result correlates poorly with the X-ray, or the final estimate (the attempt result or initial
        estimate that correlates best). Returns the status of the update and a note for its message."""
        cfg = self.config
        self._candidates.append((float(similarity), self.T.clone(), self._ppc_outcome))
        initial = self._initial_similarity()
        good = similarity >= cfg.retry_below_similarity and similarity > initial
        if self.attempt == 1 and (good or self.stop_requested):
            return self._ppc_outcome, ""
        plan = self.retry_plan()
        if not good and not self.stop_requested and self.attempt <= len(plan):
            prealign, patience, what = plan[self.attempt - 1]
            self._start_attempt(prealign, patience)
            return "running", (f"; its image similarity {similarity:.3f} is low (initial estimate {initial:.3f}): "
                               f"starting again from the initial estimate {what}")
        # the attempts' results and the initial estimate, in this order
        options = self._candidates + [(initial, self.T_init.clone(), "diverged")]
        k = max(range(len(options)), key=lambda i: options[i][0])
        sim, T, outcome = options[k]
        self.T = T.clone()
        self.best_T = T.clone()
        names = ["the first attempt", "the second attempt", "the third attempt"]
        which = "the initial estimate" if k == len(options) - 1 else (names[k] if k < 3 else f"attempt {k + 1}")
        return outcome, f"; kept {which} (image similarities " + ", ".join(f"{o[0]:.3f}" for o in options) + ")"

    def _similarity(self, T: torch.Tensor) -> float:
        """The refinement's gradient correlation (finest scale) of a pose, without gradients."""
        cfg = self.config
        return pose_similarity(self.renderer, self.xray, self.projection, T, self.surface.points,
                               sigma_px=cfg.refine_sigmas_px[-1], highpass_px=cfg.refine_highpass_px,
                               blur_px=cfg.refine_blur_px, margin_px=int(cfg.window_margin_px))

    def _initial_similarity(self) -> float:
        """The refinement's gradient correlation at the initial estimate (computed once)."""
        if self._initial_sim is None:
            try:
                self._initial_sim = self._similarity(self.T_init)
            except InputError:  # the initial estimate projects outside the detector
                self._initial_sim = -math.inf
        return float(self._initial_sim)

    def _ppc_step(self) -> IterationState:
        """One PPC update of the operator from the current estimate; returns what it did."""
        t0 = time.perf_counter()
        cfg = self.config
        if self.ppc_iterations == 0 and self._attempt_prealign and cfg.coarse_search_px > 0:
            self.T = self._coarse_align(self.T)
        T = self.T
        P0, G0 = self.surface.points, self.surface.gradients
        proj = self.projection
        it = self.iteration + 1
        w_all = transform_points(T, P0)
        g_all = G0 @ T[:3, :3].T
        uv_all = proj.project(w_all[None])[0]
        empty = torch.zeros(0, 3, dtype=torch.float64)

        def finish(status: str, message: str, T_new: torch.Tensor, **kw) -> IterationState:
            st = IterationState(iteration=it, T=T_new.detach().cpu().clone(), status=status, message=message,
                                operator=cfg.method,
                                seconds=time.perf_counter() - t0, mtre_mm=self.mtre(T_new), **kw)
            self.history.append(st)
            self.status = status
            return st

        defaults = dict(update_mm=0.0, update_deg=0.0, n_contour=0, mean_weight=0.0, similarity=math.nan,
                        points_3d=empty, uv=empty[:, :2], uv_matched=empty[:, :2], weights=empty[:, 0],
                        drr=torch.zeros(proj.height, proj.width))
        win = self._window(uv_all)
        if win is None:
            self.T = self.best_T.clone()
            return finish("diverged", "the region of interest projects outside the detector; "
                          "reverted to the best estimate", self.T, **defaults)
        u0, v0, ww, wh = win
        sub = crop_projection(proj, u0, v0, ww, wh)
        sigma = max(cfg.gradient_sigma_px, min(3.0, self.search_px / 8))
        drr = self.renderer.render(sub, T[None])  # (1, wh, ww)
        # the DRR is a perfect projection: blur it like the imaging chain blurs the X-ray (detector PSF), so that
        # both gradient images have the same edge profiles (a mismatch biases the matched edge positions)
        drr_sigma = math.sqrt(sigma ** 2 + cfg.xray_blur_px ** 2)
        drr_grad = image_gradient(drr, sigma_px=drr_sigma)
        xg_full = self._xray_gradient(sigma)
        xray_grad = xg_full[:, :, v0:v0 + wh, u0:u0 + ww]
        xray_win = self.xray[None, v0:v0 + wh, u0:u0 + ww]
        # the similarity is always measured at the same smoothing, so that iterations are comparable
        sim_sigma = 1.5
        similarity = gradient_similarity(
            image_gradient(drr, sigma_px=math.sqrt(sim_sigma ** 2 + cfg.xray_blur_px ** 2)),
            self._xray_gradient(sim_sigma)[:, :, v0:v0 + wh, u0:u0 + ww])
        drr_full = torch.zeros(proj.height, proj.width)
        drr_full[v0:v0 + wh, u0:u0 + ww] = drr[0].detach().cpu()

        # best-estimate bookkeeping uses the similarity of the estimate we just rendered
        if similarity > self.best_similarity + 1e-4:
            self.best_similarity = similarity
            self.best_T = T.clone()
            self.since_best = 0
        else:
            self.since_best += 1

        mask = contour_mask(P0[None], G0[None], proj.source, T[None], theta_deg=cfg.contour_theta_deg)[0]
        uv_win = uv_all - uv_all.new_tensor([u0, v0])
        inside = (uv_win[:, 0] >= 2) & (uv_win[:, 0] <= ww - 3) & (uv_win[:, 1] >= 2) & (uv_win[:, 1] <= wh - 3)
        mask = mask & inside
        idx = torch.nonzero(mask).flatten()
        n_contour = int(idx.numel())
        if n_contour < 6:
            self.T = self.best_T.clone()
            kw = dict(defaults, similarity=similarity, drr=drr_full, n_contour=n_contour)
            return finish("rank_deficient", f"only {n_contour} contour points: cannot solve for 6 parameters; "
                          "kept the best estimate", self.T, **kw)
        w_c, g_c = w_all[idx], g_all[idx]
        normals = project_normals(proj, w_c[None], g_c[None])
        uv_c = uv_win[idx][None].float()
        uv_m, weights = self.matcher(drr, xray_win, drr_grad, xray_grad, uv_c, normals.float(),
                                     torch.ones_like(uv_c[..., 0], dtype=torch.bool), self.search_px,
                                     {"iteration": it, "sigma_px": sigma, "points_3d": w_c[None],
                                      "gradients_3d": g_c[None], "source": proj.source,
                                      "pixel_spacing_mm": float(proj.pixel_spacing[0, 0]),
                                      "T": T, "T_gt": self.T_gt, "window_projection": sub,
                                      "flow_flips": cfg.flow_flips})
        uv_m = uv_m.double()
        weights = weights.double().clamp(0, 1)
        uv_m_full = uv_m + uv_m.new_tensor([u0, v0])
        rays = proj.ray_directions(uv_m_full)
        valid = weights[0] > 0
        kw = dict(points_3d=P0[idx].cpu(), uv=(uv_c[0].double() + uv_c.new_tensor([u0, v0]).double()).cpu(),
                  uv_matched=uv_m_full[0].cpu(), drr=drr_full, similarity=similarity, n_contour=n_contour)
        if int(valid.sum()) < 6:
            self.T = self.best_T.clone()
            return finish("rank_deficient", f"only {int(valid.sum())} of {n_contour} contour points found a "
                          "match: kept the best estimate", self.T, update_mm=0.0, update_deg=0.0,
                          mean_weight=float(weights.mean()), weights=weights[0].float().cpu(), **kw)
        system = {"w": w_c[None], "g": g_c[None], "rays": rays, "weights": weights}
        # damping from the size of the observed 2D displacements: large, unreliable displacements far from
        # the solution are damped; small ones near it let the weak (depth) directions be resolved
        disp_all = torch.linalg.norm(uv_m[0] - uv_c[0].double(), dim=-1)[weights[0] > 0]
        med = float(disp_all.median()) if disp_all.numel() else cfg.search_px
        self.damping = float(max(cfg.damping_min,
                                 cfg.damping_initial * min(1.0, (med / cfg.damping_offset_px) ** 2)))
        # the weakly observable directions of a single view (depth translation, rotations about the detector
        # axes) are held while the 2D displacements are large and released near the solution, down to a floor
        # that _solve scales with the noise of the correspondences
        system["oop"] = float(cfg.out_of_plane_damping * min(1.0, (med / cfg.damping_offset_px) ** 4))
        system["damping_matrix"] = _out_of_plane_damping(proj, max(system["oop"], cfg.out_of_plane_min))
        if cfg.solver == "plain":
            # the learned operator's own solve (as in training): weighted PPC, no consensus, no re-weighting
            sol = solve_ppc(system["w"], system["g"], proj.source, rays, weights, regularization=cfg.damping_min,
                            damping=_out_of_plane_damping(proj, cfg.plain_out_of_plane))
            system["final_weights"] = weights
        else:
            sol = self._solve(system, self.damping)
        final_w = system["final_weights"][0].float().clamp(0, 1)
        if bool(sol.rank_deficient[0]):
            self.T = self.best_T.clone()
            return finish("rank_deficient", "the PPC system is rank deficient (degenerate contour points): kept "
                          "the best estimate", self.T, update_mm=0.0, update_deg=0.0,
                          mean_weight=float(final_w.mean()), weights=final_w.cpu(), **kw)
        T_new = centred_update(sol.dv, sol.centre, T[None])[0]
        if not torch.isfinite(T_new).all():
            self.T = self.best_T.clone()
            return finish("diverged", "the update is not finite: reverted to the best estimate", self.T,
                          mean_weight=float(final_w.mean()), weights=final_w.cpu(), update_mm=math.nan,
                          update_deg=math.nan, **kw)
        upd_mm = float(mtre_fn(T_new, T, self.targets))
        upd_deg = float(rotation_angle_deg(T_new @ invert_rigid(T)))
        kw.update(update_mm=upd_mm, update_deg=upd_deg, mean_weight=float(final_w.mean()), weights=final_w.cpu())
        if upd_mm > cfg.max_update_mm:
            self.T = self.best_T.clone()
            return finish("diverged", f"an update of {upd_mm:.1f} mm exceeds the {cfg.max_update_mm} mm limit: "
                          "reverted to the best estimate", self.T, **kw)
        drift = float(mtre_fn(T_new, self.T_init, self.targets))
        if drift > cfg.max_drift_mm:
            self.T = self.best_T.clone()
            return finish("diverged", f"the estimate moved {drift:.1f} mm away from the initial transform (limit "
                          f"{cfg.max_drift_mm} mm): reverted to the best estimate", self.T, **kw)
        # adapt the search range to the displacements actually seen
        disp = torch.linalg.norm(uv_m[0] - uv_c[0].double(), dim=-1)[final_w > 0]
        if disp.numel():
            s = float(torch.quantile(disp, 0.9)) * 2.0 + 2.0
            self.search_px = float(min(cfg.search_px, max(cfg.min_search_px, s)))
        self.T = T_new
        if upd_mm < cfg.tolerance_mm:
            return finish("converged", f"update {upd_mm:.3f} mm below the tolerance", T_new, **kw)
        patience = cfg.retry_patience if self._attempt_patience else cfg.patience
        if patience > 0 and self.since_best >= patience:
            self.T = self.best_T.clone()
            # the retry's stopping rule (a falling similarity) is its convergence; in a first attempt it is a divergence
            return finish("converged" if self._attempt_patience else "diverged",
                          f"no improvement of the image similarity for {patience} updates: "
                          "reverted to the best estimate", self.T, **kw)
        return finish("running", "", T_new, **kw)

    def _consensus(self, system: dict, damping: float) -> torch.Tensor:
        """RANSAC over the correspondences: ``(1, N)`` 0/1 inlier mask of the best-supported motion.

        Minimal sets (``ransac_sample`` points, drawn in proportion to the match weights) are solved in one
        batched PPC call; a correspondence supports a motion when its point-to-plane residual is below
        ``ransac_threshold_px`` detector pixels, converted to mm at the points' depth.
        """
        cfg = self.config
        weights = system["weights"][0]
        n = weights.shape[0]
        k, m = cfg.ransac_hypotheses, cfg.ransac_sample
        if k <= 0 or n < 2 * m:
            return (weights > 0).to(weights.dtype)[None]
        # seeded by the update's place in its attempt: every attempt from the initial estimate draws as a registration
        # that starts there would (a learned pipeline's classic fallback is exactly the classic registration)
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed * 7919 + self.ppc_iterations)
        prob = (weights.cpu() + 1e-12)
        idx = torch.multinomial(prob.expand(k, n), m, replacement=False, generator=gen).to(weights.device)
        src = self.projection.source
        centre = (weights[:, None] * system["w"][0]).sum(0) / weights.sum().clamp_min(1e-12)
        sol = solve_ppc(system["w"][0][idx], system["g"][0][idx], src.expand(k, 3), system["rays"][0][idx],
                        weights[idx], regularization=damping, centre=centre[None].expand(k, 3),
                        damping=None if system.get("damping_matrix") is None
                        else system["damping_matrix"].expand(k, 6, 6))
        from .ppc import ppc_system

        a, b = ppc_system(system["w"], system["g"], src, system["rays"], centre[None])
        res = (a[0] @ sol.dv.T).T - b  # (K, N) mm
        depth = self.projection.depth(system["w"])[0]
        px_mm = depth * self.projection.pixel_spacing[0, 0] / self.projection.sdd[0]  # mm per pixel at the point
        inl = (res.abs() < cfg.ransac_threshold_px * px_mm[None]) & (weights[None] > 0)
        score = (inl.to(weights.dtype) * weights[None]).sum(-1)
        score = torch.where(sol.rank_deficient, torch.zeros_like(score), score)
        best = int(score.argmax())
        return inl[best].to(weights.dtype)[None]

    def _solve(self, system: dict, damping: float):
        """Robust (RANSAC consensus, then IRLS with Tukey) damped PPC solve of one update's correspondences."""
        src = self.projection.source
        weights = system["weights"] * self._consensus(system, damping)
        if int((weights > 0).sum()) < 6:
            weights = system["weights"]
        wts = weights
        sol = None
        cfg = self.config
        for r in range(cfg.robust_iterations + 1):
            sol = solve_ppc(system["w"], system["g"], src, system["rays"], wts, regularization=damping,
                            damping=system.get("damping_matrix"))
            if r == cfg.robust_iterations:
                break
            res = _point_residuals(system["w"], system["g"], src, system["rays"], sol)
            wts = weights * _tukey(res, weights > 0)
            if r == 0 and "oop" in system:
                # noise-scaled floor of the out-of-plane damping (a prior against drifting along the weak
                # directions): full for correspondences as noisy as cfg.out_of_plane_noise_px, vanishing for exact
                # ones, so that perfect data still converges to the exact pose
                r_in = res[0][weights[0] > 0]
                if r_in.numel() >= 6:
                    depth = self.projection.depth(system["w"])[0][weights[0] > 0]
                    mm_per_px = depth * self.projection.pixel_spacing[0, 0] / self.projection.sdd[0]
                    spread = float((1.4826 * (r_in - r_in.median()).abs() / mm_per_px).median())
                    floor = cfg.out_of_plane_min * min(1.0, (spread / cfg.out_of_plane_noise_px) ** 2)
                    system["damping_matrix"] = _out_of_plane_damping(self.projection, max(system["oop"], floor))
        system["final_weights"] = wts
        return sol

    # ------------------------------------------------------------------ loop
    def run(self, callback: Callable[[IterationState], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> RegistrationResult:
        """Iterate :meth:`step` until convergence, divergence, a stop request or ``max_iterations``.

        Args:
            callback: called after every update with its :class:`IterationState`.
            should_stop: polled before every update; True stops the loop (the estimate is kept).
        """
        t0 = time.perf_counter()
        self.stop_requested = False
        status = "max_iterations"
        message = ""
        while not self.budget_spent:
            if self.stop_requested or (should_stop is not None and should_stop()):
                status, message = "stopped", "stopped on request"
                break
            try:
                st = self.step()
            except PPCError:
                raise
            except RuntimeError as exc:  # numerical failure inside torch: keep the last good estimate
                self.T = self.best_T.clone()
                status, message = "failed", f"update failed: {exc}; kept the best estimate"
                break
            if callback is not None:
                callback(st)
            if st.status != "running":
                status, message = st.status, st.message
                break
        if status == "stopped" and self.attempt > 1 and self._candidates:
            # stopped during a retry: keep an earlier attempt's result if it correlates better with the X-ray
            now = self._similarity(self.T)
            sim, T, _ = max(self._candidates, key=lambda c: c[0])
            if sim > now:
                self.T, self.best_T = T.clone(), T.clone()
                message += "; kept an earlier attempt's result (it correlates better with the X-ray)"
        self.status = status
        return RegistrationResult(T=self.T.detach().cpu().clone(), best_T=self.best_T.detach().cpu().clone(),
                                  status=status, iterations=self.iteration, seconds=time.perf_counter() - t0,
                                  history=list(self.history), message=message)


def _out_of_plane_damping(proj: Projection, mu: float) -> torch.Tensor:
    """``(1, 6, 6)`` damping of the rotations about the detector axes and of the translation along the beam."""
    return out_of_plane_damping(proj.R[:1], mu)


def _point_residuals(points, gradients, source, rays, sol) -> torch.Tensor:
    """Point-to-plane residuals ``(B, N)`` (mm) of the correspondences after the solve."""
    from .ppc import ppc_system

    a, b = ppc_system(points, gradients, source, rays, sol.centre)
    return (a @ sol.dv[..., None])[..., 0] - b


def _tukey(res: torch.Tensor, valid: torch.Tensor, c: float = 4.685) -> torch.Tensor:
    """Tukey biweight ``(B, N)`` of residuals scaled by their robust spread (1.4826 MAD, at least 0.3 mm)."""
    out = torch.zeros_like(res)
    for b in range(res.shape[0]):
        r = res[b][valid[b]]
        if r.numel() < 6:
            out[b] = valid[b].to(res.dtype)
            continue
        med = r.median()
        sigma = max(1.4826 * float((r - med).abs().median()), 0.3)
        u = (res[b] - med) / (c * sigma)
        out[b] = torch.where(u.abs() < 1, (1 - u * u) ** 2, torch.zeros_like(u)) * valid[b].to(res.dtype)
    return out


def _check_rigid(T: torch.Tensor, name: str) -> None:
    if T.shape != (4, 4):
        raise InputError(f"the {name} must be a 4x4 matrix, got shape {tuple(T.shape)}")
    if not torch.isfinite(T).all():
        raise InputError(f"the {name} contains NaN or infinite values")
    r = T[:3, :3]
    err = float((r.T @ r - torch.eye(3, dtype=T.dtype, device=T.device)).abs().max())
    if err > 1e-4 or float(torch.linalg.det(r)) < 0 or float((T[3] - T.new_tensor([0, 0, 0, 1])).abs().max()) > 1e-9:
        raise InputError(f"the {name} is not rigid (rotation not orthonormal, a reflection, or a bad last row); "
                         "registration needs a rigid transform")
