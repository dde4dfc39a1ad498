"""The browser app: one page that drives ``PPCRegistrationLogic`` (the Slicer module's Qt-free logic) on the
MRML scene of a trame-slicer ``SlicerApp`` whose views are streamed to the page.

One user session at a time: the first tab to connect owns it; another tab shows a "busy" page until the owner's
tab has been closed for ``OWNER_TIMEOUT_S``.  Each tab sends a heartbeat every 2 s with a token kept in its
``sessionStorage`` (so a reload keeps the session).  When the owner leaves, the session ends: the uploads are
deleted and the scene is cleared.

Run performs one registration update at a time in a worker thread (the library's ``Registration.step``, pure
torch) and shows each result on the event loop's thread (MRML and VTK stay on one thread): the page keeps
answering, Stop takes effect after the current update.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from . import plots, views

LOG = logging.getLogger("PPCRegistrationWeb")
OWNER_TIMEOUT_S = 8.0
DEFAULT_UPLOAD_LIMIT_BYTES = 1024 ** 3
GEOMETRY_KEYS = ("spacing", "sdd", "sid", "primary", "secondary")
POSE_KEYS = ("rx", "ry", "rz", "tx", "ty", "tz")
#: the page's state of a session without a case (at start, and when a session ends)
NO_CASE_STATE = {
    "ct_desc": "", "case_desc": "", "vertebrae": [], "vertebra": None, "has_case": False, "has_result": False,
    "status": {}, "plot_svg": "", "hist_svg": "", "ranked": [], "info": "Load the sample CT or upload a CT.",
    "error": "", "running": False, "busy": False, "progress": 0, "stop_at": -1,
}

HEARTBEAT_JS = """
(function () {
  function start() {
    if (!window.trame || !window.trame.state || !window.trame.trigger) { setTimeout(start, 100); return; }
    var token = sessionStorage.getItem("ppcreg-token");
    if (!token) {
      token = Math.random().toString(36).slice(2) + Date.now().toString(36);
      sessionStorage.setItem("ppcreg-token", token);
    }
    window.trame.state.set("me", token);
    var hello = function () { window.trame.trigger("ppcreg_hello", [token]); };
    hello();
    setInterval(hello, 2000);
  }
  start();
})();
"""


def _safe_name(name: str) -> str:
    """A file name from the client reduced to a harmless base name (never a path)."""
    base = re.sub(r"[^A-Za-z0-9._-]", "_", Path(str(name)).name)[-120:]
    return base.lstrip(".") or "upload"


class PPCRegistrationApp:
    """The page and its callbacks.  ``server``: a trame server (``trame.app.get_server()``)."""

    def __init__(self, server, upload_limit_bytes: int = DEFAULT_UPLOAD_LIMIT_BYTES, device: str = "cpu") -> None:
        from trame_slicer import module as trame_slicer_module
        from trame_slicer.core import LayoutManager, SlicerApp
        from trame_slicer.rca_view import register_rca_factories

        from PPCRegistrationLogic import core

        self.server = server
        self.state, self.ctrl = server.state, server.controller
        server.enable_module(trame_slicer_module)
        self.slicer_app = SlicerApp()
        register_rca_factories(self.slicer_app.view_manager, server)
        self.layout_manager = LayoutManager(self.slicer_app.scene, self.slicer_app.view_manager, server)
        views.register_layout(self.layout_manager)
        self.views = views.SceneViews(self.slicer_app)
        self.upload_limit = int(upload_limit_bytes)
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ppcreg-update")
        self.owner: str | None = None
        self.owner_seen = 0.0
        self.work_dir: Path | None = None
        self.workflow = None
        self.history: list = []
        self._run_task = None
        self._pose_check = None

        s = self.state
        s.client_only("me")
        s.update({
            **NO_CASE_STATE, "me": "", "owner": None,
            "sim_mtre": 10.0, "sim_primary": 20.0, "sim_secondary": 5.0, "sim_seed": 0,
            **{k: 0.0 for k in POSE_KEYS}, "method": "classic",
            "methods": [{"title": label, "value": name} for name, label in core.METHODS.items()],
            "device": device, "devices": list(core.DEVICES), "refine": True, "opacity": 0.5,
            # flat keys: the page's v-model on a nested value would not reach the server
            **{f"box_{i}": v for i, v in enumerate((0.0, 0.0, 0.0, 60.0, 60.0, 60.0))},
            **{f"geo_{k}": "" for k in GEOMETRY_KEYS},
        })
        # what the page's JavaScript calls by name (the heartbeat, the file inputs, the downloads)
        server.trigger("ppcreg_hello")(self.hello)
        server.trigger("ppcreg_upload")(self.upload)
        server.trigger("ppcreg_download")(self.download_transform)
        server.trigger("ppcreg_screenshot")(self.download_screenshot)
        self.ctrl.on_server_ready.add(self._on_ready)
        s.change("opacity")(self._on_opacity)
        s.change("vertebra")(self._on_vertebra)
        s.change(*POSE_KEYS)(self._on_pose)
        from .page import build_page

        self.ui = build_page(self)

    # ------------------------------------------------------------------ session ownership
    def hello(self, token: str) -> None:
        """A tab's heartbeat: the first (or the owner) gets the session."""
        now = time.monotonic()
        if self.owner is not None and self.owner != token and now - self.owner_seen > OWNER_TIMEOUT_S:
            self._end_session()
        if self.owner is None:
            self.owner = token
            self._begin_session()
        if self.owner == token:
            self.owner_seen = now
        if self.state.owner != self.owner:
            self.state.owner = self.owner

    def _on_ready(self, **_):
        asyncio.get_event_loop().create_task(self._watch_owner())

    async def _watch_owner(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(2.0)
            now = time.monotonic()
            if now - last > 3.0 or self.state.busy or self.state.running:
                # this thread was busy (loading, rendering): the heartbeats are still queued, not missing
                self.owner_seen = max(self.owner_seen, now)
            last = now
            if self.owner is not None and now - self.owner_seen > OWNER_TIMEOUT_S:
                with self.state:
                    self._end_session()
                    self.state.owner = None

    def _begin_session(self) -> None:
        from PPCRegistrationLogic.workflow import Workflow

        self.work_dir = Path(tempfile.mkdtemp(prefix="ppcreg-app-"))  # mode 0700: private to this user
        self.workflow = Workflow(self.slicer_app.scene, self.work_dir)
        self.history = []

    def _end_session(self) -> None:
        """The owner left: stop, delete the uploads, clear the scene."""
        if self.workflow is not None and self.workflow.started:
            self.workflow.session.stop()
        if self.work_dir is not None:
            shutil.rmtree(self.work_dir, ignore_errors=True)
        self.work_dir, self.workflow, self.owner = None, None, None
        self.slicer_app.scene.Clear(False)
        self.views = views.SceneViews(self.slicer_app)
        self.state.update(NO_CASE_STATE)

    # ------------------------------------------------------------------ helpers
    async def _guarded(self, what: str, fn, *args, shown_as: tuple[str, str] | None = None):
        """Run ``fn`` (on this thread: it touches the scene) with the page showing ``what``; a failure is shown
        as a message and leaves the previous state.  ``shown_as``: (server path, name for the page): messages
        never show the server's folders."""
        from PPCRegistrationLogic.workflow import WorkflowError

        if self.workflow is None or self.state.busy:
            return None
        with self.state:
            self.state.busy, self.state.error, self.state.info = True, "", what
        await asyncio.sleep(0.05)  # let the page show it before this thread is busy
        try:
            result = fn(*args)
        except (WorkflowError, ValueError, RuntimeError, OSError) as exc:
            LOG.info("%s failed: %s", what, exc)
            message = str(exc)
            if shown_as is not None:
                message = message.replace(shown_as[0], shown_as[1])
            if self.work_dir is not None:
                message = message.replace(str(self.work_dir) + os.sep, "")
            with self.state:
                self.state.error = message
                self.state.info = ""
                self.state.busy = False
            return None
        with self.state:
            self.state.busy = False
        return result

    def _refresh_inputs(self) -> None:
        wf = self.workflow
        self.state.update({"ct_desc": wf.ctDescription, "vertebrae": wf.vertebrae(), "vertebra": wf.vertebra,
                           "case_desc": wf.case.description if wf.case else "", "has_case": wf.case is not None})

    # ------------------------------------------------------------------ inputs
    async def load_sample(self) -> None:
        if await self._guarded("Loading the sample CT ...", self.workflow.loadSample) is not None:
            with self.state:
                self._refresh_inputs()
                self.state.info = "Sample CT loaded. Simulate an X-ray, or upload one."

    async def upload(self, kind: str, files) -> None:
        """An uploaded CT / label map / X-ray (the client sends the file's bytes; its name is only used for the
        file type)."""
        from trame.app.file_upload import ClientFile

        if self.workflow is None or not files:
            return
        file = ClientFile(files[0] if isinstance(files, list) else files)
        size = len(file.content or b"")
        if size > self.upload_limit:
            with self.state:
                self.state.error = (f"{file.name}: {size / 1024 ** 2:.0f} MB is over the upload limit of "
                                    f"{self.upload_limit / 1024 ** 2:.0f} MB (PPCREG_UPLOAD_LIMIT_MB)")
            return
        if size == 0:
            with self.state:
                self.state.error = f"{file.name} is empty"
            return
        folder = self.work_dir / f"{kind}-{time.monotonic_ns()}"  # one folder an upload, the file's own name
        folder.mkdir()
        path = folder / _safe_name(file.name)
        path.write_bytes(file.content)
        wf = self.workflow
        action = {"ct": wf.loadCT, "labels": wf.loadLabels, "xray": self._load_xray}.get(kind)
        if action is None:
            return
        if await self._guarded(f"Reading {file.name} ...", action, path, shown_as=(str(path), file.name)) \
                is not None:
            with self.state:
                self._refresh_inputs()
                self.state.info = f"Loaded {file.name}."
                self._show_initial()

    def _load_xray(self, path: Path) -> str:
        """An uploaded X-ray with the page's geometry fields (blank: from the file's DICOM tags)."""
        from PPCRegistrationLogic.workflow import WorkflowError

        values = {}
        for key, name in (("spacing", "pixelSpacingMM"), ("sdd", "sddMM"), ("sid", "sidMM"),
                          ("primary", "primaryDeg"), ("secondary", "secondaryDeg")):
            text = str(self.state[f"geo_{key}"] or "").strip()
            if text:
                try:
                    values[name] = float(text)
                except ValueError:
                    raise WorkflowError(f"the X-ray geometry field '{key}' must be a number, got {text!r}") from None
        spacing = values.pop("pixelSpacingMM", None)
        try:
            return self.workflow.loadXray(path, spacing, **values)
        except WorkflowError as exc:
            if "lacks the C-arm geometry" in str(exc) or "pixel spacing" in str(exc):
                raise WorkflowError(f"{exc} (in this page: fill in 'X-ray geometry' before uploading)") from None
            raise

    async def simulate(self) -> None:
        s = self.state
        done = await self._guarded("Simulating the X-ray ...", self.workflow.simulate, float(s.sim_mtre),
                                   float(s.sim_primary), float(s.sim_secondary), int(s.sim_seed))
        if done is not None:
            with self.state:
                for k in POSE_KEYS:
                    s[k] = 0.0
                self._refresh_inputs()
                s.info = "X-ray simulated. Press Run (or Step)."
                self._show_initial()

    def use_box(self) -> None:
        from PPCRegistrationLogic.workflow import WorkflowError

        if self.workflow is None:
            return
        try:
            b = [float(self.state[f"box_{i}"]) for i in range(6)]
            self.workflow.setBox(b[:3], b[3:])
            self.state.info, self.state.error = "Region of interest: the box.", ""
        except (WorkflowError, ValueError, TypeError) as exc:
            self.state.error = str(exc)

    def box_from_vertebra(self) -> None:
        if self.workflow is None or self.workflow.ctNode is None:
            return
        for i, v in enumerate(self.workflow.roiCentreWorld()):
            self.state[f"box_{i}"] = round(float(v), 1)

    # ------------------------------------------------------------------ pose and display
    def _on_pose(self, **_) -> None:
        wf = self.workflow
        if wf is None or wf.case is None or self.state.running:
            return
        try:
            wf.setOffsets([float(self.state[k]) for k in POSE_KEYS])
        except ValueError as exc:
            self.state.error = str(exc)
            return
        if wf.session.transformNode is not None:
            self._show_drr_at(wf.initialPose())
            self._status_initial()

    def _on_vertebra(self, vertebra, **_) -> None:
        """A vertebra chosen in the page is the region of interest from the next Step or Run."""
        from PPCRegistrationLogic.workflow import WorkflowError

        wf = self.workflow
        if wf is None or not vertebra or vertebra == wf.vertebra or self.state.running:
            return
        try:
            wf.setVertebra(vertebra)
            self.state.info = f"Region of interest: {vertebra}."
        except WorkflowError as exc:
            self.state.error = str(exc)

    def _on_opacity(self, opacity, **_) -> None:
        if self.workflow is not None and self.workflow.session.drrNode is not None:
            self.workflow.session.setOverlayOpacity(float(opacity))

    def _show_initial(self) -> None:
        """After a new case: a session at the initial pose with the DRR there, shown in the views."""
        wf = self.workflow
        if wf is None or wf.case is None:
            return
        if self._start() is None:
            return
        self._show_drr_at(wf.session.registration.T)
        self.views.show_session(wf.session, float(self.state.opacity))
        self._watch_pose(wf.session.transformNode)
        self._status_initial()

    def _show_drr_at(self, T) -> None:
        """The estimate ``T (4, 4)`` and the DRR there in the views (one render, ~0.1 s), with no contour points:
        a new case, or an initial pose moved with the sliders or the handles."""
        from types import SimpleNamespace

        import torch

        reg = self.workflow.session.registration
        if reg is None:
            return
        T = torch.as_tensor(np.asarray(T), dtype=torch.float64)
        drr = reg.renderer.render(reg.projection, T[None].to(reg.T.device))[0].detach().cpu().float()
        self.workflow.session.updateOutputs(SimpleNamespace(T=T, drr=drr))

    def _watch_pose(self, transformNode) -> None:
        """Slicer's transform handles on the estimate (in the X-ray view: drag the disk to move the pose in the
        detector plane); a drag outside a Run becomes the initial pose."""
        import slicer

        self.views.show_pose_handles(transformNode, self.workflow.roiCentreWorld(), True)
        if getattr(transformNode, "_ppcreg_observed", False):
            return
        transformNode.AddObserver(slicer.vtkMRMLTransformNode.TransformModifiedEvent, self._on_transform_modified)
        transformNode._ppcreg_observed = True

    def _on_transform_modified(self, *_) -> None:
        if self._pose_check is not None:
            self._pose_check.cancel()
        self._pose_check = asyncio.get_event_loop().call_later(0.3, self._check_pose_moved)  # after the drag

    def _check_pose_moved(self) -> None:
        """If the estimate in the views is not the one the session holds, the user moved it: it becomes the
        initial pose (its six offsets go to the sliders) and the next Step or Run starts from it."""
        from PPCRegistrationLogic.core import transformToWorldArray
        from PPCRegistrationLogic.workflow import WorkflowError

        self._pose_check = None
        wf = self.workflow
        if wf is None or wf.case is None or self.state.running or self.state.busy \
                or wf.session.transformNode is None or wf.session.registration is None:
            return
        T = transformToWorldArray(wf.session.transformNode)
        expected = wf.session.registration.T.numpy() if wf.started else wf.initialPose()
        if np.allclose(T, expected, atol=1e-6):
            return
        try:
            offsets = wf.setInitialPose(T)
        except WorkflowError as exc:
            with self.state:
                self.state.error = str(exc)
            return
        with self.state:
            for key, value in zip(POSE_KEYS, offsets):
                self.state[key] = round(float(value), 2)
            self.state.info = "Initial pose moved in the X-ray view: Step or Run starts from it."
            self._show_drr_at(wf.initialPose())
            self._status_initial()

    def _status_initial(self) -> None:
        wf = self.workflow
        T = wf.initialPose()
        m = wf.mtre(T)
        self.history = []
        self.state.update({"status": {"iteration": 0, "mtre": "-" if m is None else f"{m:.2f} mm",
                                      "state": "initial estimate"}, "plot_svg": "", "hist_svg": "",
                           "ranked": [], "progress": 0, "has_result": True})

    def _start(self):
        from PPCRegistrationLogic.workflow import WorkflowError

        s, wf = self.state, self.workflow
        try:
            return wf.start(s.method, s.device, bool(s.refine))
        except WorkflowError as exc:
            s.error = str(exc)
            return None

    # ------------------------------------------------------------------ Step / Run / Stop / Reset
    def _ensure_started(self):
        wf = self.workflow
        if wf is None or wf.case is None:
            self.state.error = "Load or simulate an X-ray first."
            return None
        if not wf.started:
            self.history = []
            return self._start()
        return wf.session.registration

    def step(self) -> None:
        """One update, in a task of its own (as :meth:`run`)."""
        if self.state.running or self.state.busy:
            return
        reg = self._ensure_started()
        if reg is None:
            return
        self.state.busy, self.state.error = True, ""
        asyncio.get_event_loop().create_task(self._step_task(reg))

    async def _step_task(self, reg) -> None:
        try:
            st = await asyncio.get_running_loop().run_in_executor(self.executor, reg.step)
            if self.workflow is None or self.workflow.session.registration is not reg:
                return  # the session ended during the update
            with self.state:
                self._show_state(st)
        except Exception as exc:  # noqa: BLE001 - shown to the user, the estimate is kept
            with self.state:
                self.state.error = f"The update failed: {exc}"
        finally:
            with self.state:
                self.state.busy = False

    def run(self) -> None:
        """Start the registration loop as a task of its own and return: the websocket handles one message at a
        time, so a Run that awaited its loop here would hold back Stop (and the heartbeats) until the end."""
        if self.state.running or self.state.busy or (self._run_task is not None and not self._run_task.done()):
            return
        reg = self._ensure_started()
        if reg is None:
            return
        self.state.running = True  # at once: a second Run before the task starts is refused
        self.views.show_pose_handles(self.workflow.session.transformNode, self.workflow.roiCentreWorld(), False)
        self._run_task = asyncio.get_event_loop().create_task(self._run_loop(reg))

    async def _run_loop(self, reg) -> None:
        reg.stop_requested = False
        with self.state:
            self.state.running, self.state.error, self.state.info = True, "", "Registering ..."
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        status = "stopped"
        compute = show = 0.0
        try:
            while not (reg.stop_requested or reg.budget_spent):
                t_step = time.perf_counter()
                st = await loop.run_in_executor(self.executor, reg.step)
                if self.workflow is None or self.workflow.session.registration is not reg:
                    return  # the session ended (its tab closed) during the update: nothing to show
                t_show = time.perf_counter()
                compute += t_show - t_step
                with self.state:
                    self._show_state(st)
                show += time.perf_counter() - t_show
                with self.state:
                    budget = max(1, reg.config.guards.max_iterations)
                    self.state.progress = min(100, int(100 * reg.ppc_iterations / budget))
                if st.status != "running":
                    status = st.status
                    break
                await asyncio.sleep(0)
            else:
                status = "stopped" if reg.stop_requested else "max_iterations"
        except Exception as exc:  # noqa: BLE001 - shown to the user, the estimate is kept
            status = "failed"
            with self.state:
                self.state.error = f"The update failed: {exc}; the last good estimate is kept"
        finally:
            seconds = time.perf_counter() - t0
            self._run_finished(reg, status, seconds, compute, show)

    def _run_finished(self, reg, status: str, seconds: float, compute: float, show: float) -> None:
        """The end of a Run: status, plots and handles (only the running flag when its session has ended)."""
        with self.state:
            self.state.running = False
            if self.workflow is None or self.workflow.session.registration is not reg:
                return
            self.views.show_pose_handles(self.workflow.session.transformNode, self.workflow.roiCentreWorld())
            if status == "converged":
                self.state.progress = 100
            self.state.info = f"Finished: {status} after {reg.iteration} updates in {seconds:.1f} s."
            LOG.info("run: %s after %d updates in %.1f s (updates %.1f s, display %.1f s)", status, reg.iteration,
                     seconds, compute, show)
            status_now = dict(self.state.status)
            status_now.update({"state": status, "run_seconds": f"{seconds:.1f} s"})
            self.state.status = status_now

    def stop(self) -> None:
        """Stop a Run after the update in progress (the page says how many were done when Stop arrived)."""
        if self.workflow is not None and self.workflow.started:
            self.workflow.session.stop()
            if self.state.running:
                done = self.workflow.session.registration.iteration
                self.state.info = f"Stopping after the current update ({done} done when Stop arrived) ..."
                self.state.stop_at = done

    def reset(self) -> None:
        wf = self.workflow
        if wf is None or not wf.started or self.state.running or self.state.busy:
            return
        wf.session.reset()
        self.history = []
        self._status_initial()
        self.state.info = "Reset to the initial estimate."

    def _show_state(self, st) -> None:
        """One update's result: output nodes (the views re-render), status, plots, ranked points."""
        from PPCRegistrationLogic.core import stateSummary

        wf = self.workflow
        wf.session.applyState(st)
        self.history.append(st)
        s = stateSummary(st)
        m = st.mtre_mm
        self.state.status = {
            "iteration": f"{s['iteration']}" + (f" ({s['operator']})" if s.get("operator") else ""),
            "update": f"{s['update_mm']:.3f} mm, {s['update_deg']:.3f}°",
            "contour": str(s["n_contour"]), "weight": f"{s['mean_weight']:.3f}",
            "time": f"{1000 * s['seconds']:.0f} ms", "similarity": f"{st.similarity:.4f}",
            "mtre": "-" if m is None else f"{m:.2f} mm", "state": st.status,
            "message": st.message or "",
        }
        self._show_plots()  # inline SVG: ~10 ms an update

    def _show_plots(self) -> None:
        """The mTRE / similarity plot, and the weights of the last update that had correspondences (the
        intensity refinement has none; the views keep showing that update's points too)."""
        hist = self.history
        if not hist:
            return
        self.state.plot_svg = plots.history_plot([h.mtre_mm for h in hist], [h.similarity for h in hist],
                                                 [h.operator for h in hist])
        last = next((h for h in reversed(hist) if h.weights is not None and h.weights.numel()), None)
        if last is None:
            return
        w = last.weights.reshape(-1).numpy()
        self.state.hist_svg = plots.weight_histogram(w)
        order = np.argsort(-w)
        shown = np.concatenate([order[:8], order[-4:]]) if w.size > 12 else order
        ranks = np.empty(w.size, dtype=int)
        ranks[order] = np.arange(1, w.size + 1)
        uv, uvm = last.uv.reshape(-1, 2).numpy(), last.uv_matched.reshape(-1, 2).numpy()
        self.state.ranked = [{"rank": int(ranks[i]), "weight": f"{w[i]:.3f}", "u": f"{uv[i, 0]:.1f}",
                              "v": f"{uv[i, 1]:.1f}", "shift": f"{np.hypot(*(uvm[i] - uv[i])):.2f}"} for i in shown]

    # ------------------------------------------------------------------ downloads
    def download_transform(self, kind: str):
        """The current estimate's transform file (bytes, for the browser to save)."""
        from PPCRegistrationLogic.workflow import WorkflowError

        if self.workflow is None:
            return None
        try:
            paths = self.workflow.exportTransform(self.work_dir / "download")
        except WorkflowError as exc:
            self.state.error = str(exc)
            return None
        data = paths[kind].read_bytes()
        return data.decode("utf-8") if kind == "json" else self.server.protocol.addAttachment(data)

    def download_screenshot(self):
        if self.workflow is None:
            return None
        path = self.views.screenshot(self.work_dir / "screenshot.png")
        return self.server.protocol.addAttachment(path.read_bytes())


def serve(host: str = "127.0.0.1", port: int = 8080, upload_limit_mb: float | None = None,
          open_browser: bool = False) -> None:
    """Start the app (blocking) and print its address."""
    from trame.app import get_server

    limit = upload_limit_mb if upload_limit_mb is not None else float(os.environ.get("PPCREG_UPLOAD_LIMIT_MB",
                                                                                     "1024"))
    server = get_server(client_type="vue3")
    app = PPCRegistrationApp(server, upload_limit_bytes=int(limit * 1024 ** 2))

    def announce(**_):
        print(f"[app] PPCRegistration is served at http://{host}:{server.port}/", flush=True)

    server.controller.on_server_ready.add(announce)
    try:
        server.start(host=host, port=port, open_browser=open_browser, show_connection_info=False)
    finally:
        app.executor.shutdown(wait=False, cancel_futures=True)
        if app.work_dir is not None:
            shutil.rmtree(app.work_dir, ignore_errors=True)
