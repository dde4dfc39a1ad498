"""The registration's settings and what it reports (docs/design.md §4): :class:`RegistrationConfig` (one place for
every default of the loop, in one section per stage: ``matching``, ``solver``, ``guards``, ``prealign``, ``refine``,
``restart``, ``learned``; the command line, ``evaluate()``, the Slicer module and the tests read them from here),
the per-update :class:`IterationState`, the final :class:`RegistrationResult` and the :class:`Status` of an update."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from enum import Enum

import torch

from .devices import resolve_device
from .errors import InputError
from .foreign_detection import FIT_PX, MIN_CONTRAST, THRESHOLD_SD, TOLERANCE_PX
from .refine import (APPEARANCE, DEFAULT_APPEARANCE, DEFAULT_GRIDS_PX, DEFAULT_ITERATIONS, DEFAULT_SIGMAS_PX,
                     DEFAULT_SOLVERS, SOLVERS)
from .similarity import LOCAL_CONTRAST_PX

__all__ = ["REFINE", "STATUSES", "Status", "MatchingSettings", "SolverSettings", "GuardSettings", "PrealignSettings",
           "RefineSettings", "RestartSettings", "LearnedSettings", "ForeignSettings", "RegistrationConfig",
           "IterationState", "RegistrationResult"]


class Status(str, Enum):
    """The state of a registration after an update (a ``str``: ``Status.CONVERGED == "converged"``)."""

    RUNNING = "running"
    CONVERGED = "converged"
    MAX_ITERATIONS = "max_iterations"
    DIVERGED = "diverged"
    STOPPED = "stopped"
    RANK_DEFICIENT = "rank_deficient"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


#: the ``operator`` of the intensity refinement's updates in the history
REFINE = "refine"

#: the statuses' names, in the order of :class:`Status`
STATUSES = tuple(s.value for s in Status)


@dataclass(frozen=True)
class MatchingSettings:
    """What a PPC update renders and matches (docs/design.md §3 steps 1-5).

    n_points: budget of surface points extracted from the region of interest.
    bone_threshold_hu: surface points need the CT above this next to the edge.
    contour_theta_deg: a point is on the contour when its gradient is within this angle of perpendicular to the ray.
    search_px: initial half-length of the search along the 2D normal (detector pixels); it then adapts to the size
        of the observed displacements, between ``min_search_px`` and ``search_px``.
    gradient_sigma_px: Gaussian smoothing of the image gradients at the finest level (pixels).
    xray_blur_px: Gaussian blur (pixels, the imaging chain's point-spread function) applied to the DRR in addition,
        so that DRR and X-ray edges have the same profile.
    window_margin_px: margin around the projected region of interest rendered for matching.
    window_px: side of a square detector window centred on the projected region of interest, rendered for matching
        instead (the learned operators: the window they were trained on, see :func:`~PPCRegistrationLib.methods.
        learned_window_px`); 0 = the region's bounding box plus ``window_margin_px`` and the search range.
    """

    n_points: int = 2000
    bone_threshold_hu: float = 150.0
    contour_theta_deg: float = 6.0
    search_px: float = 24.0
    min_search_px: float = 4.0
    gradient_sigma_px: float = 2.0
    xray_blur_px: float = 0.0
    window_margin_px: int = 24
    window_px: int = 0

    def __post_init__(self) -> None:
        if int(self.window_px) < 0 or int(self.window_px) != self.window_px:
            raise InputError(f"window_px must be a non-negative whole number of pixels (0 = around the region of "
                             f"interest), got {self.window_px}")


@dataclass(frozen=True)
class SolverSettings:
    """The PPC solve of an update (docs/design.md §3 steps 6-8, §4.2).

    kind: ``"robust"`` (RANSAC consensus, Tukey re-weighting, damping: the classic pipeline) or ``"plain"`` (one
        weighted PPC solve with the matcher's weights, as the learned operator is trained).
    robust_iterations: iteratively re-weighted PPC solves (Tukey on point-to-plane residuals).
    ransac_hypotheses, ransac_sample, ransac_threshold_px: consensus step before the re-weighted solve: that many
        minimal sets of that many correspondences; inliers within that many detector pixels (0 = off).
    damping_initial, damping_min, damping_offset_px: damping of the PPC solve (relative to the mean eigenvalue of the
        scaled normal matrix): ``damping_initial * min(1, (median displacement / damping_offset_px)^2)``, at least
        ``damping_min``.  Far from the solution the displacements are large and unreliable and the update is damped;
        near it the damping vanishes.
    out_of_plane_damping: extra damping of the weakly observable directions of a single view (translation along the
        beam, rotations about the detector axes), scaled by the fourth power of the same ratio: they are held while
        the in-plane alignment is coarse and released near the solution.
    out_of_plane_min, out_of_plane_noise_px: floor of that damping, scaled by (spread of the point-to-plane residuals
        in pixels / out_of_plane_noise_px)^2: noisy correspondences cannot drag the pose along the weak directions
        (measured on 30 lumbar cases: success < 2 mm 27 % without the floor, 47 % with it), exact ones still
        converge to the exact pose.
    plain_out_of_plane: damping of the out-of-plane directions in the ``"plain"`` solve (the learned operator's known
        operator is trained with the same value, ``TrainConfig.out_of_plane``): without it a single view's noisy
        correspondences throw the depth off (mean one-update mTRE 65 mm on 160 validation samples, 17 mm with it,
        from 23 mm).
    lm: Levenberg–Marquardt control of the robust updates (docs/design.md §4.2): every damping above is multiplied by
        a factor that falls (/3, down to ``lm_min``) when the re-measured re-projection cost of the next update fell
        as the solve predicted, rises (x2, up to ``lm_max``) when it fell much less, and a step that made the
        correspondences fit worse is taken back (x4).  Off, the fixed schedules alone crawl along the weak depth
        direction (demo case: 30 updates from 8.4 to 3.6 mm; with it 0.17 mm after 6).
    lm_cap_px: the re-projection cost is a truncated quadratic of the point-to-plane residuals, capped here (px).
    """

    kind: str = "robust"
    robust_iterations: int = 2
    ransac_hypotheses: int = 256
    ransac_sample: int = 12
    ransac_threshold_px: float = 1.5
    damping_initial: float = 0.05
    damping_min: float = 1e-5
    damping_offset_px: float = 2.0
    out_of_plane_damping: float = 10.0
    out_of_plane_min: float = 0.1
    out_of_plane_noise_px: float = 0.5
    plain_out_of_plane: float = 1.0
    lm: bool = True
    lm_min: float = 1e-3
    lm_max: float = 100.0
    lm_cap_px: float = 3.0

    def __post_init__(self) -> None:
        if self.kind not in ("robust", "plain"):
            raise InputError(f"the solver must be 'robust' or 'plain', got {self.kind!r}")


@dataclass(frozen=True)
class GuardSettings:
    """When the PPC updates stop, and what they may not do (docs/design.md §4.2).

    max_iterations: maximum number of PPC updates of an attempt (the refinement's updates not counted).
    tolerance_mm: converged when an update moves the target points by less than this (mean, mm).
    settle_mm, settle_updates: the updates have reached the loop's fixed point, and stop as converged, when
        ``settle_updates`` updates in a row each moved the estimate by less than ``settle_mm`` (mean target motion):
        on noisy X-rays the correspondences' noise keeps the updates above ``tolerance_mm`` (0 = off).
    max_update_mm: an update larger than this is a divergence (the estimate reverts to the best one).
    max_drift_mm: so is an estimate farther than this from the initial estimate (a refinement that far is refused).
    patience: stop as diverged when the similarity has stayed below the best for this many updates (0 = off: the
        gradient correlation barely reacts to the depth error, so it is off by default).
    """

    max_iterations: int = 30
    tolerance_mm: float = 0.05
    settle_mm: float = 0.5
    settle_updates: int = 3
    max_update_mm: float = 30.0
    max_drift_mm: float = 75.0
    patience: int = 0


@dataclass(frozen=True)
class PrealignSettings:
    """The global 2D pre-alignment before an attempt's first update (docs/design.md §4.1).

    search_px: half-range (px) of the translation search (0 = off); angles_deg: in-plane rotations tried;
    min_gain: the pre-aligned pose is taken only when it raises the gradient correlation by at least this much.
    """

    search_px: float = 32.0
    min_gain: float = 0.02
    angles_deg: tuple[float, ...] = (-8.0, -4.0, 0.0, 4.0, 8.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "angles_deg", tuple(float(a) for a in self.angles_deg))


@dataclass(frozen=True)
class RefineSettings:
    """The intensity refinement after the PPC updates (docs/design.md §4.3, :mod:`PPCRegistrationLib.refine`).

    iterations: iterations per scale (gradient correlation of DRR and X-ray maximised over the pose, one update per
        scale of ``sigmas_px``); 0 = off.  It runs when the PPC updates converged, diverged (from the best estimate)
        or used up ``guards.max_iterations``.
    sigmas_px, grids_px, solvers, highpass_px, blur_px: its gradient scales (coarse to fine), the detector pixels per
        rendered pixel and the optimiser at each scale, high-pass filter and DRR blur (pixels), see
        :func:`~PPCRegistrationLib.refine.refine_pose`.
    iterations_per_update: iterations of one refinement update (0 = a whole scale): the Slicer module uses a few, so
        that each timer tick stays short and the views show the progress.
    thorough_iterations: a poorly correlating result of an attempt that allows it (``Attempt.thorough``) is refined
        once more, thoroughly: L-BFGS on every scale at full detector resolution, this many iterations per scale
        (0 = off); the registration keeps the best-correlating result.  The fast schedule's coarse grids cost
        capture on hard cases: on 15 lumbar cases the fast refinement lost, full-resolution L-BFGS rescued 4.
    appearance: the imaging chain's parameters the Levenberg-Marquardt scale estimates with the pose
        (:data:`~PPCRegistrationLib.refine.APPEARANCE`: ``"blur"``, the X-ray's point-spread function, ``"gamma"``,
        its contrast curve, ``"response"``, the detector's output curve from logarithmic to linear, and ``"scatter"``,
        a uniform scatter added to the transmitted intensity (a fraction of the window's mean); see
        :class:`~PPCRegistrationLib.refine.PoseRefiner`).
    local_contrast_px: the scale (pixels) over which both gradient images are divided by their local RMS magnitude
        before they are correlated (:func:`~PPCRegistrationLib.similarity.local_contrast`; 0 = off): scatter and
        beam hardening lower the X-ray's contrast behind thick anatomy, a smooth gain the DRR does not have, and the
        correlation pulls the pose towards where that gain is high (on 12 chest physics X-rays started at the true
        pose, the refinement's median error fell from 1.4 to 0.6 mm with it).
    mask_saturated: leave the X-ray's saturated pixels (clipped at its minimum or maximum: burnt-out lung, direct
        beam, collimator shadow) out of the image similarity (:class:`~PPCRegistrationLib.similarity.SimilarityWindow`).
    """

    iterations: int = DEFAULT_ITERATIONS
    sigmas_px: tuple[float, ...] = DEFAULT_SIGMAS_PX
    grids_px: tuple[int, ...] = DEFAULT_GRIDS_PX
    solvers: tuple[str, ...] = DEFAULT_SOLVERS
    highpass_px: float = 4.0
    blur_px: float = 0.75
    iterations_per_update: int = 0
    thorough_iterations: int = 20
    appearance: tuple[str, ...] = DEFAULT_APPEARANCE
    mask_saturated: bool = True
    local_contrast_px: float = LOCAL_CONTRAST_PX

    def __post_init__(self) -> None:
        object.__setattr__(self, "appearance", tuple(str(x) for x in self.appearance))
        if not (float(self.local_contrast_px) >= 0 and math.isfinite(float(self.local_contrast_px))):
            raise InputError(f"the refinement's local_contrast_px must be >= 0 pixels (0 = off), got "
                             f"{self.local_contrast_px}")
        object.__setattr__(self, "local_contrast_px", float(self.local_contrast_px))
        if not set(self.appearance) <= set(APPEARANCE):
            raise InputError(f"the refinement can estimate {', '.join(APPEARANCE)} of the imaging chain with the pose, "
                             f"got {self.appearance}")
        if self.iterations < 0 or (self.iterations and (not self.sigmas_px or any(
                not (float(x) > 0) for x in self.sigmas_px))):
            raise InputError("the refinement's iterations must be >= 0 and its sigmas_px positive scales (pixels), "
                             f"got {self.iterations} and {self.sigmas_px}")
        object.__setattr__(self, "sigmas_px", tuple(float(x) for x in self.sigmas_px))
        object.__setattr__(self, "grids_px", tuple(int(x) for x in self.grids_px))
        object.__setattr__(self, "solvers", tuple(str(x) for x in self.solvers))
        if len(self.grids_px) != len(self.sigmas_px) or min(self.grids_px, default=1) < 1:
            raise InputError(f"the refinement's grids_px needs one whole number >= 1 per scale, got {self.grids_px} "
                             f"for the scales {self.sigmas_px}")
        if len(self.solvers) != len(self.sigmas_px) or not set(self.solvers) <= set(SOLVERS):
            raise InputError(f"the refinement's solvers needs one of {SOLVERS} per scale, got {self.solvers}")

    @property
    def enabled(self) -> bool:
        return int(self.iterations) > 0

    def pose_kwargs(self) -> dict:
        """These settings as the keyword arguments of :func:`~PPCRegistrationLib.refine.refine_pose` (all but the
        window margin, which is ``matching.window_margin_px``), so that a whole refinement outside the registration
        runs as the registration's does."""
        return {"sigmas_px": self.sigmas_px, "grids_px": self.grids_px, "solvers": self.solvers,
                "iterations": self.iterations, "highpass_px": self.highpass_px, "blur_px": self.blur_px,
                "appearance": self.appearance, "mask_saturated": self.mask_saturated,
                "local_contrast_px": self.local_contrast_px}


@dataclass(frozen=True)
class RestartSettings:
    """The restart policy's thresholds (docs/design.md §4.4; the attempts themselves are the method's schedule).

    below_similarity: after the refinement, a result whose gradient correlation by the refinement's own measure
        is below this value, or whose plain image similarity is not above that of the initial estimate, is poor:
        the schedule's next attempt starts from the initial estimate, and the registration keeps whichever result
        (or the initial estimate) has the highest plain image similarity
        (0 = only when worse than the initial estimate; needs the refinement).  Measured on 10 lumbar failures of
        the first attempt: the retry rescued 5.
    patience: ``guards.patience`` of an attempt that stops on a falling similarity (the retry: it stops and reverts
        to its best estimate when the image similarity has not improved for that many updates).
    tilt_deg: when the retry is poor too, up to four more attempts start from the initial estimate tilted by this
        angle (degrees) about the detector's u, then v axis (+, then -) through the region's centre: the
        out-of-plane rotations a single view sees worst, where a PPC loop from a wrong tilt locks onto the wrong
        edges (often a neighbouring vertebra).  Each is pre-aligned, not refined thoroughly; the first that
        correlates well ends the registration (0 = off).  Measured on the 11 failures of 100 lumbar cases
        (0-20 mm): a 10 degree tilt solved 8 of them, each at a gradient correlation >= 0.92 (the failed attempts
        <= 0.60).
    """

    below_similarity: float = 0.7
    patience: int = 5
    tilt_deg: float = 10.0

    def __post_init__(self) -> None:
        if not (0.0 <= float(self.tilt_deg) < 90.0):
            raise InputError(f"the restarts' tilt_deg must be in [0, 90) degrees (0 = no tilted restarts), got "
                             f"{self.tilt_deg}")


@dataclass(frozen=True)
class LearnedSettings:
    """How a learned operator's matching runs (docs/design.md §5).

    flow_flips: the flow is averaged over this many mirrorings of the window (1, 2 or 4, see
        :func:`~PPCRegistrationLib.flownet.mirror_averaged_flow`): it cancels the network's mirror-dependent bias
        (validation EPE 9.22 -> 8.46 px with 4; 1 = the network once, as in training).
    """

    flow_flips: int = 4

    def __post_init__(self) -> None:
        if self.flow_flips not in (1, 2, 4):
            raise InputError(f"flow_flips must be 1, 2 or 4 (mirrorings the learned flow is averaged over), got "
                             f"{self.flow_flips}")


@dataclass(frozen=True)
class ForeignSettings:
    """Foreign objects (metal not in the CT) out of the X-ray (docs/design.md §4.6).

    passes: when the registration would end, the X-ray is compared with the DRR at its result
        (:func:`~PPCRegistrationLib.foreign_detection.unexplained_mask`); when at least ``min_px`` pixels of the
        region's window are more attenuating than the CT can explain, they are inpainted
        (:func:`~PPCRegistrationLib.inpainting.inpaint`) and the schedule runs again from the initial estimate on
        that X-ray; the results so far stay candidates, scored on it.  At most this many times (0 = off).
    tolerance_px, fit_px, threshold_sd, min_contrast: the detection's settings (see ``unexplained_mask``).
    min_px: foreign pixels inside the region's window that make a pass worth its time.
    mask_inpainted: leave the inpainted pixels (and those within two gradient scales of them) out of the
        refinement's image similarity, as the saturated ones (``refine.mask_saturated``): the inpainted X-ray is
        smooth there while the DRR shows the bone behind the object.
    """

    passes: int = 1
    tolerance_px: float = TOLERANCE_PX
    fit_px: int = FIT_PX
    threshold_sd: float = THRESHOLD_SD
    min_contrast: float = MIN_CONTRAST
    min_px: int = 40
    mask_inpainted: bool = True

    def __post_init__(self) -> None:
        if int(self.passes) < 0 or int(self.min_px) < 1:
            raise InputError(f"foreign.passes must be >= 0 and foreign.min_px >= 1, got {self.passes} and "
                             f"{self.min_px}")


_SECTIONS = {"matching": MatchingSettings, "solver": SolverSettings, "guards": GuardSettings,
             "prealign": PrealignSettings, "refine": RefineSettings, "restart": RestartSettings,
             "learned": LearnedSettings, "foreign": ForeignSettings}


@dataclass(frozen=True)
class RegistrationConfig:
    """The settings of a registration, one section per stage (units in the names; each section documents its own).

    method: the method's name (:mod:`PPCRegistrationLib.methods` builds learned and chained registrations).
    matching (:class:`MatchingSettings`), solver (:class:`SolverSettings`), guards (:class:`GuardSettings`),
    prealign (:class:`PrealignSettings`), refine (:class:`RefineSettings`), restart (:class:`RestartSettings`),
    learned (:class:`LearnedSettings`), foreign (:class:`ForeignSettings`).
    device: ``"cpu"``, ``"cuda"``, or ``"auto"``; seed: of the surface points' subsampling and the RANSAC draws.

    Change a copy with :meth:`updated` (``cfg.updated({"refine.iterations": 0, "guards.max_iterations": 10})``) or
    build sections directly (``RegistrationConfig(refine=RefineSettings(iterations=0))``).
    """

    method: str = "classic"
    matching: MatchingSettings = field(default_factory=MatchingSettings)
    solver: SolverSettings = field(default_factory=SolverSettings)
    guards: GuardSettings = field(default_factory=GuardSettings)
    prealign: PrealignSettings = field(default_factory=PrealignSettings)
    refine: RefineSettings = field(default_factory=RefineSettings)
    restart: RestartSettings = field(default_factory=RestartSettings)
    learned: LearnedSettings = field(default_factory=LearnedSettings)
    foreign: ForeignSettings = field(default_factory=ForeignSettings)
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        for name, kind in _SECTIONS.items():
            value = getattr(self, name)
            if isinstance(value, dict):  # (from to_dict / a JSON file)
                object.__setattr__(self, name, kind(**value))
            elif not isinstance(value, kind):
                raise InputError(f"RegistrationConfig.{name} must be a {kind.__name__}, got {type(value).__name__}")

    def updated(self, changes: dict) -> "RegistrationConfig":
        """A copy with ``changes``: ``{"section.field": value}`` (e.g. ``"refine.iterations"``) or top-level names
        (``"method"``, ``"device"``, ``"seed"``).

        Raises:
            InputError: an unknown section or setting (the message lists the section's settings).
        """
        top: dict = {}
        per: dict[str, dict] = {}
        for key, value in dict(changes).items():
            section, _, name = str(key).rpartition(".")
            if not section:
                if name not in ("method", "device", "seed"):
                    raise InputError(f"unknown registration setting {key!r}: use 'section.setting' with a section "
                                     f"of {', '.join(_SECTIONS)}, or method, device, seed")
                top[name] = value
                continue
            if section not in _SECTIONS:
                raise InputError(f"unknown settings section {section!r} in {key!r}; sections: {', '.join(_SECTIONS)}")
            known = [f.name for f in fields(_SECTIONS[section])]
            if name not in known:
                raise InputError(f"unknown setting {key!r}; {section} has: {', '.join(known)}")
            per.setdefault(section, {})[name] = value
        return replace(self, **top, **{s: replace(getattr(self, s), **kw) for s, kw in per.items()})

    def resolved_device(self) -> torch.device:
        return resolve_device(self.device)

    def to_dict(self) -> dict:
        """Nested plain values (sections as dicts): ``RegistrationConfig(**d)`` rebuilds it."""
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
