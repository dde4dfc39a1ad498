"""The module's settings -> the library's: methods, devices, the registration configuration, and the status line
of an update."""

from __future__ import annotations

from typing import Any

import torch

from PPCRegistrationLib.methods import METHOD_LABELS

# Methods offered by the module: library name -> label shown to the user (PPCRegistrationLib.methods; the
# learned ones load Resources/Models/<learned>.pt unless a model file is given).
METHODS = dict(METHOD_LABELS)
DEVICES = ("auto", "cpu", "cuda")


def resolveDevice(device: str) -> str:
    device = (device or "auto").lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("CUDA was selected but this torch has no CUDA device: choose 'auto' or 'CPU'")
    return device


def normalizeMethod(method: str) -> str:
    """The library's name of a method (``"PPC_Flow"`` -> ``"ppc-flow"``); ValueError for an unknown one."""
    from PPCRegistrationLib.methods import normalize_method

    return normalize_method(method or "classic")


def resolveMethod(method: str = "classic", modelPath: str | None = None, device: str = "auto"):
    """The library :class:`~PPCRegistrationLib.methods.Method`, with the learned operator loaded from
    ``modelPath`` (default: ``Resources/Models/<learned>.pt`` shipped with the module) on ``device``.

    Raises ValueError (unknown method, no CUDA) or ModelFileError (missing or damaged model file; the message
    names the file and how to get one)."""
    from PPCRegistrationLib.methods import resolve_method

    return resolve_method(normalizeMethod(method), model_path=modelPath or None, device=resolveDevice(device))


#: Levenberg-Marquardt iterations of the intensity refinement per timer tick of Run (seven DRRs each), so that the
#: views show its progress and the GUI stays responsive; the iterations per scale are the library's default
REFINE_ITERATIONS_PER_UPDATE = 2


def baseConfig(maxIterations: int = 30, toleranceMM: float = 0.05, device: str = "auto",
               intensityRefinement: bool = True, foreignObjects: bool = True):
    """The library RegistrationConfig of the module's settings (before a method's overrides).
    ``foreignObjects``: the library's foreign-object passes (``foreign.passes``, default one) or none."""
    from PPCRegistrationLib.registration import RegistrationConfig

    default = RegistrationConfig()
    return RegistrationConfig(device=resolveDevice(device)).updated({
        "guards.max_iterations": int(maxIterations), "guards.tolerance_mm": float(toleranceMM),
        "refine.iterations": default.refine.iterations if intensityRefinement else 0,
        "refine.iterations_per_update": REFINE_ITERATIONS_PER_UPDATE,
        "foreign.passes": default.foreign.passes if foreignObjects else 0})


def makeConfig(method: str = "classic", maxIterations: int = 30, toleranceMM: float = 0.05,
               device: str = "auto", modelPath: str | None = None, intensityRefinement: bool = True,
               foreignObjects: bool = True):
    """The library RegistrationConfig of a method (of its learned phase for a chained method).  The model file
    is not part of the settings: see :func:`resolveMethod`."""
    from PPCRegistrationLib.methods import method_config

    return method_config(normalizeMethod(method),
                         baseConfig(maxIterations, toleranceMM, device, intensityRefinement, foreignObjects))


def stateSummary(state) -> dict[str, Any]:
    """A plain dict of an IterationState's scalar fields (for the status line and the logs)."""
    out = {}
    for key in ("iteration", "update_mm", "update_deg", "n_contour", "mean_weight", "seconds", "mtre_mm", "status",
                "operator"):
        v = getattr(state, key, None)
        out[key] = float(v) if isinstance(v, torch.Tensor) else v
    return out


def formatStatus(state) -> str:
    """One line for the status label."""
    s = stateSummary(state)
    parts = [f"iteration {s['iteration']}" + (f" ({s['operator']})" if s.get("operator") else ""),
             f"update {s['update_mm']:.2f} mm / {s['update_deg']:.2f}°" if s["update_mm"] is not None else "",
             f"{s['n_contour']} contour points" if s["n_contour"] is not None else "",
             f"mean weight {s['mean_weight']:.2f}" if s["mean_weight"] is not None else "",
             f"{s['seconds']:.2f} s/update" if s["seconds"] is not None else "",
             f"mTRE {s['mtre_mm']:.2f} mm" if s["mtre_mm"] is not None else "",
             str(s["status"] or "")]
    return " | ".join(p for p in parts if p)
