"""The stages after the PPC updates (docs/design.md §4.3-4.4): the intensity refinement, one scale (or a piece of
one) per update, and the restart policy: the thorough re-refinement of a poorly correlating result, the schedule's
next attempt (:class:`~PPCRegistrationLib.schedule.Schedule`) from the initial estimate, and the final choice of the result that
correlates best with the X-ray (the initial estimate included).  A mixin of
:class:`~PPCRegistrationLib.registration.Registration`, whose state it shares."""

from __future__ import annotations

import math
import time
from dataclasses import replace

import torch

from .config import REFINE, IterationState
from .errors import InputError
from .foreign_detection import unexplained_mask
from .geometry import centred_update, crop_projection, invert_rigid, rotation_angle_deg, transform_points
from .inpainting import inpaint
from .metrics import mtre as mtre_fn
from .refine import make_refiner, pose_similarity

__all__ = ["RefineAndRestart"]


class RefineAndRestart:
    """The refinement and restart stages of a registration (see the module docstring)."""

    def _refine_step(self) -> IterationState:
        """One scale of the intensity refinement (:class:`~PPCRegistrationLib.refine.PoseRefiner`), or a part of it
        (``refine_iterations_per_update``)."""
        t0 = time.perf_counter()
        cfg = self.config
        sigmas = cfg.refine.sigmas_px
        sigma = sigmas[min(self.refine_level, len(sigmas) - 1)]
        if self._refiner is None:
            self._refine_start = self.T.clone()
            # the thorough pass (see RegistrationConfig.refine_thorough_iterations): L-BFGS at full resolution
            thorough = self._thorough == "running"
            self._refiner = make_refiner("lbfgs" if thorough else cfg.refine.solvers[self.refine_level],
                                         self.renderer, self.xray, self.projection, self.T, self.surface.points,
                                         sigma_px=sigma,
                                         grid_px=1 if thorough else int(cfg.refine.grids_px[self.refine_level]),
                                         iterations=int(cfg.refine.thorough_iterations if thorough
                                                        else cfg.refine.iterations),
                                         highpass_px=cfg.refine.highpass_px, blur_px=cfg.refine.blur_px,
                                         margin_px=int(cfg.matching.window_margin_px),
                                         appearance=cfg.refine.appearance,
                                         mask_saturated=cfg.refine.mask_saturated, ignore=self._ignored(),
                                         local_contrast_px=cfg.refine.local_contrast_px)
        T = self._refine_start
        refiner = self._refiner
        done = refiner.advance(int(cfg.refine.iterations_per_update) or None, lambda: self.stop_requested)
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
        if res.accepted and drift > cfg.guards.max_drift_mm:
            # the image similarity barely constrains the depth: a refinement that wanders off is not taken
            res = replace(res, accepted=False, T=T.clone(), similarity_after=res.similarity_before,
                          message=f"it moved the estimate {drift:.1f} mm away from the initial transform (limit "
                                  f"{cfg.guards.max_drift_mm} mm)")
            T_new = T
        self.refine_level += 1
        last = self.refine_level >= len(sigmas) or res.message == "stopped on request"
        status = self._ppc_outcome if last else "running"
        if res.accepted:
            self.T = T_new
            self.best_T = T_new.clone()
            chain = "".join(f", {k.removesuffix('_px')} {v:.2f}" for k, v in res.appearance.items())
            message = (f"intensity refinement at {sigma:g} px: gradient correlation {res.similarity_before:.4f} -> "
                       f"{res.similarity_after:.4f} ({res.evaluations} renders{chain})")
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
        win = self._region_window(self.T)
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

    def _restart_from_initial(self) -> None:
        """The estimate (the current attempt's start), best estimate, search range and damping as at the start of a
        registration."""
        self.T = self._attempt_start_pose()
        self.best_T = self.T.clone()
        self.best_similarity = -math.inf
        self.since_best = 0
        self.search_px = float(self.config.matching.search_px)
        self.damping = float(self.config.solver.damping_initial)
        self.lm_lambda = 1.0
        self._lm_prev = None

    def _attempt_start_pose(self) -> torch.Tensor:
        """The initial estimate, tilted about the detector's u and v axes through the region's centre by the current
        attempt's ``tilt_deg``."""
        tilt = self.current_attempt.tilt_deg
        if not any(tilt):
            return self.T_init.clone()
        # the rotation vector about the camera's x (u) and y (v) axes, in world coordinates
        w = self.projection.world_from_camera[0, :3, :3].to(self.T_init) @ self.T_init.new_tensor(
            [math.radians(tilt[0]), math.radians(tilt[1]), 0.0])
        centre = transform_points(self.T_init, self.targets).mean(0)
        return centred_update(torch.cat([w, torch.zeros_like(w)])[None], centre[None], self.T_init[None])[0]

    def _start_attempt(self) -> None:
        """Begin the schedule's next attempt from the initial estimate, in its first phase."""
        self.attempt += 1
        self._attempt_start = len(self.history) + 1  # (the state being finished is appended after this)
        self._thorough = ""
        self._enter_phase(0)
        self._restart_from_initial()

    def _end_attempt(self, fit: float) -> tuple[str, str]:
        """After the refinement of an attempt, whose own gradient correlation (local contrast normalised, with the
        imaging chain fitted) at its result is ``fit``: the schedule's next attempt (:meth:`_next_or_final`); when
        the registration would end, a foreign-object pass (:meth:`_foreign_pass`) if the X-ray holds what the CT
        cannot explain.  Returns the status of the update and a note for its message."""
        status, note = self._next_or_final(fit)
        if status == "running" or self.stop_requested:
            return status, note
        found = self._foreign_pass()
        return ("running", note + found) if found else (status, note)

    def _foreign_pass(self) -> str:
        """If at the estimate the region's window holds at least ``foreign.min_px`` pixels more attenuating than
        the CT can explain (:func:`~PPCRegistrationLib.foreign_detection.unexplained_mask`): inpaint them in the
        X-ray as given (with those of earlier passes), score the results so far on it, and start the schedule again
        from the initial estimate.  Returns a note for the message ("" when no pass is made)."""
        cfg = self.config.foreign
        if self.foreign_passes >= int(cfg.passes):
            return ""
        win = self._region_window(self.T)
        if win is None:
            return ""
        with torch.no_grad():
            drr = self.renderer.render(self.projection, self.T[None])[0].to(self.xray)
        found = unexplained_mask(self.xray, drr, tolerance_px=cfg.tolerance_px, fit_px=cfg.fit_px,
                                 threshold_sd=cfg.threshold_sd, min_contrast=cfg.min_contrast)
        u0, v0, ww, wh = win
        n_window = int(found[v0:v0 + wh, u0:u0 + ww].sum())
        if n_window < int(cfg.min_px):
            return ""
        self.foreign_mask = found if self.foreign_mask is None else (self.foreign_mask | found)
        self.foreign_passes += 1
        self.xray = inpaint(self._xray_input, self.foreign_mask)
        self._xray_grad_cache.clear()
        self._initial_sim = None
        self._candidates = [(self._similarity_or_lowest(T), T, outcome) for _, T, outcome in self._candidates]
        self.attempt = 0
        self._start_attempt()
        return (f"; {n_window} pixels of the region's window are more attenuating than the CT can explain (metal?): "
                f"registering again from the initial estimate with {int(self.foreign_mask.sum())} pixels inpainted")

    def _next_or_final(self, fit: float) -> tuple[str, str]:
        """After the refinement of an attempt: the schedule's next attempt from the initial estimate when this
        one's result correlates poorly with the X-ray, or the final estimate (the attempt result or initial
        estimate that correlates best).

        Poses are compared by one measure, :meth:`_similarity` (the initial estimate, every attempt's result, and
        after a foreign-object pass all of them again on the inpainted X-ray); the refinement's own figure ``fit``
        reads another value at the same pose and serves only the absolute bar ``restart.below_similarity``."""
        cfg = self.config
        similarity = self._similarity_or_lowest(self.T)
        self._candidates.append((similarity, self.T.clone(), self._ppc_outcome))
        initial = self._initial_similarity()
        good = fit >= cfg.restart.below_similarity and similarity > initial
        if self._thorough == "running":
            self._thorough = "done"
        if self.attempt == 1 and self.stop_requested:
            return self._ppc_outcome, ""
        if self.attempt == 1 and good and len(self._candidates) == 1:
            return self._ppc_outcome, ""
        if not good and not self.stop_requested and self.current_attempt.thorough and not self._thorough and \
                cfg.refine.thorough_iterations > 0:
            # refine the PPC result once more, thoroughly, before starting again from the initial estimate (in an
            # attempt that starts as the classic registration does, so a chained method's classic fallback still
            # reproduces the classic registration)
            self._thorough = "running"
            self.T = self._ppc_end.clone()
            self.refining, self.refine_level = True, 0
            return "running", (f"; its fit {fit:.3f} or image similarity {similarity:.3f} is low (initial estimate "
                               f"{initial:.3f}): refining the PPC result again at full resolution")
        if not good and not self.stop_requested and self.attempt < len(self.schedule.attempts):
            self._start_attempt()
            what = self.current_attempt.description
            return "running", (f"; its fit {fit:.3f} or image similarity {similarity:.3f} is low (initial estimate "
                               f"{initial:.3f}): starting again " + (what or "from the initial estimate"))
        # the attempts' results and the initial estimate, in this order
        options = self._candidates + [(initial, self.T_init.clone(), "diverged")]
        k = max(range(len(options)), key=lambda i: options[i][0])
        sim, T, outcome = options[k]
        self.T = T.clone()
        self.best_T = T.clone()
        which = "the initial estimate" if k == len(options) - 1 else f"the result {k + 1} of {len(options) - 1}"
        return outcome, f"; kept {which} (image similarities " + ", ".join(f"{o[0]:.3f}" for o in options) + ")"

    def _similarity(self, T: torch.Tensor) -> float:
        """The image similarity of a pose, by which all poses are compared: the plain gradient correlation at the
        refinement's finest scale (saturated and left-out pixels excluded; no local contrast normalisation and no
        fitted imaging chain, unlike the refinement's own figure), without gradients."""
        cfg = self.config
        return pose_similarity(self.renderer, self.xray, self.projection, T, self.surface.points,
                               sigma_px=cfg.refine.sigmas_px[-1], highpass_px=cfg.refine.highpass_px,
                               blur_px=cfg.refine.blur_px, margin_px=int(cfg.matching.window_margin_px),
                               mask_saturated=cfg.refine.mask_saturated, ignore=self._ignored())

    def _ignored(self) -> torch.Tensor | None:
        """The X-ray pixels the image similarity leaves out: those a foreign-object pass inpainted (with
        ``foreign.mask_inpainted``), where the inpainted X-ray is smooth while the DRR has the bone behind them."""
        return self.foreign_mask if self.config.foreign.mask_inpainted else None

    def _similarity_or_lowest(self, T: torch.Tensor) -> float:
        """:meth:`_similarity`, or -inf where the pose projects the region outside the detector."""
        try:
            return self._similarity(T)
        except InputError:
            return -math.inf

    def _initial_similarity(self) -> float:
        """:meth:`_similarity` at the initial estimate (computed once per X-ray)."""
        if self._initial_sim is None:
            self._initial_sim = self._similarity_or_lowest(self.T_init)
        return float(self._initial_sim)
