"""Patient adaptation from the Slicer module ("Adapt to this CT"), Qt-free: the CT and its vertebra label map are
written to a work folder and ``ppcreg adapt`` runs in a separate process (:class:`AdaptJob`), so the GUI never
waits on it; the widget polls :meth:`AdaptJob.poll` from a timer and Cancel stops the process after its current
step (the previous model file is kept, the checkpoint resumes the run).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from PPCRegistrationLib.volume import Volume

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
_STEP = re.compile(r"step (\d+)")


def exportVolumes(ctVolume: Volume, labelVolume: Volume, folder: str | os.PathLike) -> tuple[Path, Path]:
    """Write the CT and its label map (volumes in the RAS frame of :func:`~.core.volumeFromNode`) as LPS NIfTI files
    ``ct.nii.gz`` and ``labels.nii.gz`` in ``folder``; returns their paths."""
    from PPCRegistrationLib.io import write_volume

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, vol, dtype in (("ct", ctVolume, torch.float32), ("labels", labelVolume, torch.int16)):
        m = torch.from_numpy(_RAS_TO_LPS) @ vol.ijk_to_world.to(torch.float64).cpu()
        data = vol.data.cpu().round().to(dtype) if dtype != torch.float32 else vol.data.cpu().to(dtype)
        paths.append(write_volume(folder / f"{name}.nii.gz", Volume(data, m)))
    return paths[0], paths[1]


class AdaptJob:
    """``ppcreg adapt`` in a child process.

    Args:
        ctPath, labelsPath: the CT and its TotalSegmentator label map (files).
        vertebra: e.g. ``"L3"``.  outDir: where ``learned.pt`` is written.  model: the model to adapt (default the
        shipped one).  budgetS: time budget (s).  python: the interpreter (default ``sys.executable``).
    """

    def __init__(self, ctPath, labelsPath, vertebra: str, outDir, *, model: str | None = None,
                 budgetS: float = 900.0, python: str | None = None, valCases: int | None = None) -> None:
        self.outDir = Path(outDir)
        self.budgetS = float(budgetS)
        self.cmd = [python or sys.executable, "-m", "PPCRegistrationLib.cli", "adapt", "--ct", str(ctPath),
                    "--labels", str(labelsPath), "--vertebra", vertebra, "--out", str(self.outDir),
                    "--budget", f"{self.budgetS:g}"]
        if model:
            self.cmd += ["--model", str(model)]
        if valCases:
            self.cmd += ["--val-cases", str(int(valCases))]
        self.process: subprocess.Popen | None = None
        self.cancelled = False
        self.started = 0.0
        self.step = 0
        self._log = None

    @property
    def modelPath(self) -> Path:
        return self.outDir / "learned.pt"

    @property
    def logPath(self) -> Path:
        return self.outDir / "adapt.log"

    def start(self) -> None:
        """Start the child process (its output goes to ``<outDir>/adapt.log``)."""
        self.outDir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.logPath, "w")
        env = dict(os.environ)
        lib = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = lib + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.process = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.started = time.monotonic()

    def cancel(self) -> None:
        """Ask the child to stop after its current step (SIGTERM; it keeps the previous model file)."""
        if self.process is not None and self.process.poll() is None:
            self.cancelled = True
            self.process.send_signal(signal.SIGTERM)

    def _tail(self) -> str:
        try:
            text = self.logPath.read_text(errors="replace")
        except OSError:
            return ""
        for m in _STEP.finditer(text):
            self.step = int(m.group(1))
        lines = [ln.strip() for ln in re.split(r"[\r\n]", text) if ln.strip()]
        return lines[-1] if lines else ""

    def poll(self) -> dict:
        """``{"state": "running" | "done" | "cancelled" | "failed", "fraction": 0..1, "message": str, "step": int}``;
        the fraction is the time spent over the budget (the run ends on its budget)."""
        if self.process is None:
            return {"state": "idle", "fraction": 0.0, "message": "", "step": 0}
        last = self._tail()
        rc = self.process.poll()
        elapsed = time.monotonic() - self.started
        if rc is None:
            return {"state": "running", "fraction": min(0.99, elapsed / max(self.budgetS, 1e-9)), "message": last,
                    "step": self.step}
        if self._log is not None:
            self._log.close()
            self._log = None
        last = self._tail()
        if rc == 0 and self.cancelled:
            return {"state": "cancelled", "fraction": 1.0, "message": last, "step": self.step}
        if rc == 0:
            return {"state": "done", "fraction": 1.0, "message": last, "step": self.step}
        return {"state": "failed", "fraction": 1.0, "message": last or f"ppcreg adapt exited with {rc}",
                "step": self.step}

    def wait(self, timeout: float | None = None) -> dict:
        """Block until the child ends (tests, scripts) and return :meth:`poll`."""
        if self.process is not None:
            self.process.wait(timeout)
        return self.poll()


def startAdaptation(ctNode, labelsNode, vertebra: str, *, budgetS: float = 900.0, model: str | None = None,
                    folder: str | os.PathLike | None = None, valCases: int | None = None) -> AdaptJob:
    """Write the CT node and its vertebra label map node to a work folder and start ``ppcreg adapt`` on them in a
    child process; returns the :class:`AdaptJob` (poll it from a timer; its cancel keeps the previous model)."""
    from PPCRegistrationLogic import core

    if ctNode is None:
        raise ValueError("select the CT volume first")
    if labelsNode is None:
        raise ValueError("select the label map of the CT's vertebrae (TotalSegmentator ids) to adapt to")
    if not (vertebra or "").strip():
        raise ValueError("name the vertebra to adapt to, e.g. L3")
    folder = Path(folder) if folder is not None else defaultWorkFolder()
    ctPath, labelsPath = exportVolumes(core.volumeFromNode(ctNode), core.volumeFromNode(labelsNode), folder)
    job = AdaptJob(ctPath, labelsPath, vertebra.strip(), folder / "model", model=model or None, budgetS=budgetS,
                   valCases=valCases)
    job.start()
    return job


def defaultWorkFolder() -> Path:
    """A new folder for one adaptation's files."""
    return Path(tempfile.mkdtemp(prefix="ppcreg-adapt-"))
