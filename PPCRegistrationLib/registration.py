"""The registration loop (docs/design.md §4): the stages of a registration from T_init, one update at a time.

The stages: the 2D pre-alignment (:mod:`.prealign`) before the first update; PPC updates (every one renders the DRR
at the current estimate in a detector window around the region of interest, selects contour points and calls the
update operator :func:`~.update.ppc_update` with a matcher of :mod:`.matchers` or a learned one and a solver of
:mod:`.solvers`, under Levenberg–Marquardt control); the intensity refinement; restarts.  The loop keeps the history and the best estimate, stops on convergence,
on a stop request, or on divergence (then it falls back to the best estimate), and can be reset.

When the PPC updates are done, the intensity refinement (:mod:`PPCRegistrationLib.refine`, one update per
scale) optimises the pose on the images.  If the result then correlates with the X-ray less than the initial
estimate does, or its refinement's own figure is below ``restart.below_similarity``, the schedule's next attempt
starts from the initial estimate (first a retry with no 2D pre-alignment, stopping when the similarity stops
improving), and the registration keeps whichever of the results and the initial estimate correlates best: a
registration never ends further from the X-ray, by its own measure, than it started.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch

from .attempts import RefineAndRestart
from .config import (REFINE, STATUSES, IterationState, RegistrationConfig, RegistrationResult,  # noqa: F401
                     Status)
from .drr import DRRRenderer
from .errors import InputError, PPCError
from .features import SurfacePoints, contour_mask, extract_surface_points, project_normals
from .geometry import Projection, crop_projection, invert_rigid, rotation_angle_deg, transform_points
from .gradients import image_gradient
from .inputs import checked_rigid, checked_xray
from .matchers import ClassicMatcher, Matcher, OracleMatcher  # noqa: F401 (re-exported)
from .metrics import mtre as mtre_fn
from .prealign import PREALIGN_SIGMA_PX, prealign
from .refine import PoseRefiner, gradient_correlation
from .schedule import Attempt, PPCPhase, Schedule, single_schedule
from .solvers import PlainSolver, RobustSolver, reprojection_cost
from .update import UpdateState, match, ppc_update
from .volume import Volume

__all__ = ["Registration", "RegistrationConfig", "RegistrationResult", "IterationState", "Status", "STATUSES",
           "REFINE", "Matcher", "ClassicMatcher", "OracleMatcher", "crop_projection", "gradient_similarity",
           "registration_surface"]


def registration_surface(ct: Volume, roi=None, config: RegistrationConfig | None = None) -> SurfacePoints:
    """The surface points (and mTRE targets) a registration with ``config`` extracts from the region of interest
    (``matching.bone_threshold_hu``, ``matching.n_points``, ``seed``; docs/design.md §3 step 1)."""
    cfg = config or RegistrationConfig()
    return extract_surface_points(ct, roi, bone_threshold_hu=cfg.matching.bone_threshold_hu,
                                  budget=cfg.matching.n_points, seed=cfg.seed)


def gradient_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Gradient correlation of two gradient images ``(1, 2, h, w)``: mean NCC of the two components."""
    return float(gradient_correlation(a, b)[0])


class Registration(RefineAndRestart):
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
        schedule: the method as data (:class:`~PPCRegistrationLib.schedule.Schedule`: attempts of PPC phases, each
            with its matcher and configuration), instead of ``config`` and ``matcher``; default
            :func:`~PPCRegistrationLib.schedule.single_schedule` of ``config`` and ``matcher``.
            :meth:`PPCRegistrationLib.methods.Method.schedule` builds those of the named methods.

    Attributes:
        config, matcher: those of the current PPC phase (:attr:`phase`); attempt: 1, 2, ... (see :attr:`schedule`).
    """

    def __init__(self, ct: Volume, xray: torch.Tensor, projection: Projection, T_init: torch.Tensor, roi=None,
                 config: RegistrationConfig | None = None, T_gt: torch.Tensor | None = None,
                 matcher: Matcher | None = None, surface: SurfacePoints | None = None,
                 renderer: DRRRenderer | None = None, schedule: Schedule | None = None) -> None:
        if schedule is None:
            config = config or RegistrationConfig()
            if matcher is None and config.method != "classic":
                raise InputError(f"method {config.method!r} needs a learned 2D matching model: build the "
                                 "registration with PPCRegistrationLib.methods.build_registration (or pass a matcher)")
            schedule = single_schedule(config, matcher)
        elif matcher is not None or config is not None:
            raise InputError("give a registration either a schedule or a configuration and matcher, not both")
        if not isinstance(schedule, Schedule):
            raise InputError("schedule must be a PPCRegistrationLib.schedule.Schedule")
        self.schedule = schedule
        self.config = schedule.attempts[0].phases[0].config
        self.device = self.config.resolved_device()
        if not isinstance(ct, Volume):
            raise InputError("ct must be a PPCRegistrationLib.volume.Volume")
        xray = checked_xray(xray, projection)
        T_init = checked_rigid(T_init, "initial transform")
        if T_gt is not None:
            T_gt = checked_rigid(T_gt, "ground-truth transform")
        self.ct = ct
        self.projection = projection.to(self.device, torch.float64)
        self.xray = xray.to(self.device, torch.float32)
        self._xray_input = self.xray  # (kept: a foreign-object pass registers an inpainted copy)
        self.T_init = T_init.clone().to(self.device)
        self.T_gt = None if T_gt is None else T_gt.clone().to(self.device)
        self.roi = roi
        self.renderer = renderer or DRRRenderer(ct, device=self.device)
        if surface is None:
            surface = registration_surface(ct, roi, self.config)
        if surface.points.shape[0] < 6:
            raise InputError(f"only {surface.points.shape[0]} surface points in the region of interest: "
                             "enlarge the region or lower the bone threshold")
        self.surface = SurfacePoints(surface.points.to(self.device, torch.float64),
                                     surface.gradients.to(self.device, torch.float64))
        self.targets = self.surface.points
        self._initial_sim: float | None = None  # (T_init never changes: computed once, kept over resets)
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Back to the initial transform, the schedule's first attempt and the X-ray as given; the history is
        cleared."""
        if getattr(self, "foreign_passes", 0):
            self.xray = self._xray_input
            self._initial_sim = None
        #: foreign-object passes made (``config.foreign``) and the union of the pixels inpainted, ``(H, W)`` bool
        self.foreign_passes = 0
        self.foreign_mask: torch.Tensor | None = None
        self.attempt = 1
        self._enter_phase(0)
        self._restart_from_initial()
        self.history: list[IterationState] = []
        self.status = "running"
        self.stop_requested = False
        self.refining = False
        self.refine_level = 0
        self._refiner: PoseRefiner | None = None
        self._refine_start = self.T_init.clone()
        self._ppc_outcome = "converged"
        self._attempt_start = 0
        self._candidates: list[tuple[float, torch.Tensor, str]] = []
        #: the current attempt's thorough refinement: "" (not yet), "running", "done"
        self._thorough = ""
        self._ppc_end = self.T_init.clone()
        self._xray_grad_cache: dict[float, torch.Tensor] = {}

    @property
    def current_attempt(self) -> Attempt:
        """The attempt being made (``schedule.attempts[attempt - 1]``)."""
        return self.schedule.attempts[self.attempt - 1]

    @property
    def phase(self) -> PPCPhase:
        """The current PPC phase of the current attempt."""
        return self.current_attempt.phases[self.phase_index]

    def _enter_phase(self, index: int) -> None:
        """Make phase ``index`` of the current attempt the current one (its configuration, matcher, search range)."""
        self.phase_index = int(index)
        self.phase_updates = 0
        self.config = self.phase.config
        self.matcher: Matcher = self.phase.matcher
        self.search_px = float(self.config.matching.search_px)

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
        """The 2D pre-alignment of the first update (:func:`~PPCRegistrationLib.prealign.prealign`)."""
        cfg = self.config
        return prealign(self.renderer, self.projection, self._xray_gradient(PREALIGN_SIGMA_PX), T, self.surface.points,
                        search_px=cfg.prealign.search_px, angles_deg=cfg.prealign.angles_deg,
                        min_gain=cfg.prealign.min_gain)

    def _region_window(self, T: torch.Tensor) -> tuple[int, int, int, int] | None:
        """:meth:`_window` around the region of interest projected at pose ``T (4, 4)``."""
        return self._window(self.projection.project(transform_points(T, self.surface.points)[None])[0])

    def _window(self, uv_all: torch.Tensor) -> tuple[int, int, int, int] | None:
        """Detector window (u0, v0, width, height) around the projected region of interest, or None if it
        misses the detector."""
        h, w = self.projection.height, self.projection.width
        side = int(self.config.matching.window_px)
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
        m = self.config.matching.window_margin_px + self.search_px
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
        """Whether this registration ends with the intensity refinement (``config.refine.enabled``)."""
        return self.config.refine.enabled

    @property
    def ppc_iterations(self) -> int:
        """Number of PPC updates of the current attempt so far (the refinement's updates not counted)."""
        return sum(1 for st in self.history[self._attempt_start:] if st.operator != REFINE)

    @property
    def budget_spent(self) -> bool:
        """True when :meth:`run` would stop for ``max_iterations``: the PPC updates are used up and no refinement
        is pending (the GUI's timer loop asks this before every update)."""
        return not self.refining and self.ppc_iterations >= self.config.guards.max_iterations

    def step(self) -> IterationState:
        """One update from the current estimate (a PPC update, or one scale of the intensity refinement once
        the PPC updates have converged or used up ``max_iterations``); returns what it did."""
        if self.refining:
            return self._refine_step()
        st = self._ppc_step()
        self.phase_updates += 1
        if self.phase_index < len(self.current_attempt.phases) - 1:
            failed = st.status in ("converged", "rank_deficient", "diverged")
            if failed or self.phase.ends_after(self.phase_updates, st.update_mm):
                ended = self.phase.name
                self._enter_phase(self.phase_index + 1)
                if failed and self.iteration < self.config.guards.max_iterations:
                    # the next phase goes on (from the best estimate when this one failed)
                    note = f"{st.status}: {st.message}" if st.message else st.status
                    st.message = f"{ended} phase ended ({note}); {self.phase.name} updates follow"
                    st.status = "running"
                    self.status = "running"
            return st
        if not self.refine_enabled:
            return st
        done = st.status in ("converged", "diverged") or (st.status == "running"
                                                          and self.ppc_iterations >= self.config.guards.max_iterations)
        if done:
            # after a divergence the estimate was reverted to the best one: the refinement starts from there
            self._ppc_outcome = st.status if st.status != "running" else "max_iterations"
            self._ppc_end = self.T.clone()
            self.refining = True
            self.refine_level = 0
            st.status = "running"
            self.status = "running"
            st.message = (st.message + "; " if st.message else "") + "intensity refinement follows"
        return st

    def _ppc_step(self) -> IterationState:
        """One PPC update of the operator from the current estimate; returns what it did."""
        t0 = time.perf_counter()
        cfg = self.config
        if self.ppc_iterations == 0 and self.current_attempt.prealigns:
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
        sigma = max(cfg.matching.gradient_sigma_px, min(3.0, self.search_px / 8))
        drr = self.renderer.render(sub, T[None])  # (1, wh, ww)
        # the DRR is a perfect projection: blur it like the imaging chain blurs the X-ray (detector PSF), so that
        # both gradient images have the same edge profiles (a mismatch biases the matched edge positions)
        drr_sigma = math.sqrt(sigma ** 2 + cfg.matching.xray_blur_px ** 2)
        drr_grad = image_gradient(drr, sigma_px=drr_sigma)
        xg_full = self._xray_gradient(sigma)
        xray_grad = xg_full[:, :, v0:v0 + wh, u0:u0 + ww]
        xray_win = self.xray[None, v0:v0 + wh, u0:u0 + ww]
        # the similarity is always measured at the same smoothing, so that iterations are comparable
        sim_sigma = 1.5
        similarity = gradient_similarity(
            image_gradient(drr, sigma_px=math.sqrt(sim_sigma ** 2 + cfg.matching.xray_blur_px ** 2)),
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

        mask = contour_mask(P0[None], G0[None], proj.source, T[None], theta_deg=cfg.matching.contour_theta_deg)[0]
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
        w_c, g_c = w_all[idx][None], g_all[idx][None]
        uv_c = uv_win[idx][None].float()
        state = UpdateState(T=T[None], points=w_c, gradients=g_c, uv=uv_c,
                            mask=torch.ones_like(uv_c[..., 0], dtype=torch.bool),
                            projection=sub, drr=drr, xray=xray_win, drr_grad=drr_grad, xray_grad=xray_grad,
                            normals=project_normals(proj, w_c, g_c).float(), search_px=self.search_px,
                            context={"iteration": it, "sigma_px": sigma, "T": T, "T_gt": self.T_gt,
                                     "pixel_spacing_mm": float(proj.pixel_spacing[0, 0]), "window_projection": sub,
                                     "flow_flips": cfg.learned.flow_flips})
        uv_m, weights = match(state, self.matcher)
        uv_m, weights = uv_m.double(), weights.double().clamp(0, 1)
        uv_m_full = uv_m + uv_m.new_tensor([u0, v0])
        valid = weights[0] > 0
        kw = dict(points_3d=P0[idx].cpu(), uv=(uv_c[0].double() + uv_c.new_tensor([u0, v0]).double()).cpu(),
                  uv_matched=uv_m_full[0].cpu(), drr=drr_full, similarity=similarity, n_contour=n_contour)
        if int(valid.sum()) < 6:
            self.T = self.best_T.clone()
            return finish("rank_deficient", f"only {int(valid.sum())} of {n_contour} contour points found a "
                          "match: kept the best estimate", self.T, update_mm=0.0, update_deg=0.0,
                          mean_weight=float(weights.mean()), weights=weights[0].float().cpu(), **kw)
        if cfg.solver.kind == "plain":  # the learned operator's own solve, as in training
            solver = PlainSolver(cfg.solver.plain_out_of_plane, cfg.solver.damping_min)
        else:
            rays = sub.ray_directions(uv_m)
            solver, rejected, cost = self._robust_solver(w_c, g_c, rays, weights, uv_m, uv_c, T)
            if rejected:
                return finish("running", rejected, self.T, update_mm=float(mtre_fn(self.T, T, self.targets)),
                              update_deg=float(rotation_angle_deg(self.T @ invert_rigid(T))),
                              mean_weight=float(weights.mean()), weights=weights[0].float().cpu(), **kw)
        res = ppc_update(state, self.matcher, solver, matches=(uv_m, weights))
        sol = res.solve.solution
        if cfg.solver.lm and cfg.solver.kind != "plain":
            predicted = reprojection_cost(w_c, g_c, sub, rays, weights, sol, cfg.solver.lm_cap_px)
            self._lm_prev = (cost, predicted, T.clone())
        final_w = res.weights[0].float().clamp(0, 1)
        if bool(sol.rank_deficient[0]):
            self.T = self.best_T.clone()
            return finish("rank_deficient", "the PPC system is rank deficient (degenerate contour points): kept "
                          "the best estimate", self.T, update_mm=0.0, update_deg=0.0,
                          mean_weight=float(final_w.mean()), weights=final_w.cpu(), **kw)
        T_new = res.T[0]
        if not torch.isfinite(T_new).all():
            self.T = self.best_T.clone()
            return finish("diverged", "the update is not finite: reverted to the best estimate", self.T,
                          mean_weight=float(final_w.mean()), weights=final_w.cpu(), update_mm=math.nan,
                          update_deg=math.nan, **kw)
        upd_mm = float(mtre_fn(T_new, T, self.targets))
        upd_deg = float(rotation_angle_deg(T_new @ invert_rigid(T)))
        kw.update(update_mm=upd_mm, update_deg=upd_deg, mean_weight=float(final_w.mean()), weights=final_w.cpu())
        if upd_mm > cfg.guards.max_update_mm:
            self.T = self.best_T.clone()
            return finish("diverged", f"an update of {upd_mm:.1f} mm exceeds the {cfg.guards.max_update_mm} mm limit: "
                          "reverted to the best estimate", self.T, **kw)
        drift = float(mtre_fn(T_new, self.T_init, self.targets))
        if drift > cfg.guards.max_drift_mm:
            self.T = self.best_T.clone()
            return finish("diverged", f"the estimate moved {drift:.1f} mm away from the initial transform (limit "
                          f"{cfg.guards.max_drift_mm} mm): reverted to the best estimate", self.T, **kw)
        # adapt the search range to the displacements actually seen
        disp = torch.linalg.norm(uv_m[0] - uv_c[0].double(), dim=-1)[final_w > 0]
        if disp.numel():
            s = float(torch.quantile(disp, 0.9)) * 2.0 + 2.0
            self.search_px = float(min(cfg.matching.search_px, max(cfg.matching.min_search_px, s)))
        self.T = T_new
        if upd_mm < cfg.guards.tolerance_mm:
            return finish("converged", f"update {upd_mm:.3f} mm below the tolerance", T_new, **kw)
        ppc_updates = [st.update_mm for st in self.history[self._attempt_start:] if st.operator != REFINE]
        n_settle, settle_mm = cfg.guards.settle_updates, cfg.guards.settle_mm
        recent = ppc_updates[-(n_settle - 1):]
        if n_settle > 0 and len(recent) == n_settle - 1 and max(recent + [upd_mm]) < settle_mm:
            return finish("converged", f"the last {n_settle} updates moved the estimate less than "
                          f"{settle_mm:g} mm each: at the PPC loop's fixed point", T_new, **kw)
        retrying = self.current_attempt.patience
        patience = cfg.restart.patience if retrying else cfg.guards.patience
        if patience > 0 and self.since_best >= patience:
            self.T = self.best_T.clone()
            # the retry's stopping rule (a falling similarity) is its convergence; in a first attempt it is a divergence
            return finish("converged" if retrying else "diverged",
                          f"no improvement of the image similarity for {patience} updates: "
                          "reverted to the best estimate", self.T, **kw)
        return finish("running", "", T_new, **kw)

    def _robust_solver(self, points, gradients, rays, weights, uv_m, uv_c,
                       T) -> tuple[RobustSolver | None, str, float]:
        """The classic solve of this update (docs/design.md §4.2), a message when the Levenberg–Marquardt rule
        rejects the previous step instead (the estimate is then back at the previous one), and the re-projection cost
        of this update's correspondences (px^2; nan without the Levenberg–Marquardt control).

        The damping follows the size of the observed 2D displacements (large, unreliable ones far from the solution
        are damped; near it the weak depth directions are released), times the Levenberg–Marquardt factor, which
        falls when the re-measured re-projection cost fell as the previous step predicted and rises when it did
        not; a step that made the correspondences fit worse is taken back."""
        cfg, sv = self.config, self.config.solver
        disp = torch.linalg.norm(uv_m[0] - uv_c[0].double(), dim=-1)[weights[0] > 0]
        ratio = min(1.0, (float(disp.median()) if disp.numel() else cfg.matching.search_px) / sv.damping_offset_px)
        self.damping = float(max(sv.damping_min, sv.damping_initial * ratio ** 2))
        cost = math.nan
        if cfg.solver.lm:
            cost = reprojection_cost(points, gradients, self.projection, rays, weights, None, cfg.solver.lm_cap_px)
            if self._lm_prev is not None:
                c0, cp, T_prev = self._lm_prev
                rho = (c0 - cost) / max(c0 - cp, 1e-6 * c0, 1e-12)
                if rho < 0:
                    self.lm_lambda = min(cfg.solver.lm_max, self.lm_lambda * 4.0)
                    self._lm_prev = None
                    self.T = T_prev.clone()
                    return None, (f"step rejected (re-projection cost {c0:.3f} -> {cost:.3f} px^2): back "
                                  f"to the previous estimate, damping x{self.lm_lambda:.3g}"), cost
                if rho < 0.25:
                    self.lm_lambda = min(cfg.solver.lm_max, self.lm_lambda * 2.0)
                elif rho > 0.75:
                    self.lm_lambda = max(cfg.solver.lm_min, self.lm_lambda / 3.0)
        # RANSAC seeded by the update's place in its attempt: every attempt from the initial estimate draws as a
        # registration that starts there would (a learned pipeline's classic fallback is exactly the classic one)
        return RobustSolver(damping=self.damping, out_of_plane=sv.out_of_plane_damping * ratio ** 4,
                            out_of_plane_min=sv.out_of_plane_min, out_of_plane_noise_px=sv.out_of_plane_noise_px,
                            lm=self.lm_lambda if sv.lm else 1.0, ransac_hypotheses=sv.ransac_hypotheses,
                            ransac_sample=sv.ransac_sample, ransac_threshold_px=sv.ransac_threshold_px,
                            robust_iterations=sv.robust_iterations,
                            seed=cfg.seed * 7919 + self.ppc_iterations), "", cost

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
