"""The training recipe of the learned operator alone (``learned``, docs/design.md §5.4) and its patient adaptation.

:func:`train_learned` trains a :class:`~.normal_matcher.NormalMatcherNet` on the vertebrae of training patients
(:func:`~.trajectory_training.train_trajectories`), validates it on held-out cases of *other* patients (never the
test patient), keeps the best validated weights, and writes the model file, its model card and its curves.  It
checkpoints after every validation, resumes from the checkpoint, and stops on a time budget or a cancel request
without touching an existing model file.  :func:`adapt` is the same recipe on one pre-operative CT (its own
vertebrae, random views and poses), starting from a trained model, validated on cases of that CT drawn from seeds
disjoint from the evaluation's.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from .drr import DRRRenderer
from .errors import InputError, ModelFileError
from .file_checks import suffix
from .model_files import load_model, save_model
from .normal_matcher import NORMAL_HPARAMS, NormalMatcherNet
from .simulation import random_initial_transform
from .trajectory_training import Scene, TrajectoryConfig, iterate, make_training_case, train_trajectories

__all__ = ["PatientSpec", "load_scenes", "held_out_cases", "score", "train_learned", "adapt", "SUCCESS_MM",
           "ADAPT_SEED", "DEFAULT_ADAPT_BUDGET_S", "ADAPT_LR", "ADAPT_VAL_CASES"]

#: success: final mTRE below this (mm), as in the evaluation protocol
SUCCESS_MM = 2.0
#: the random stream of the adaptation's cases (views, X-rays, starts) and of its validation; the evaluation's
#: cases are drawn from generators seeded with their case seed (0, 1, ...), so the two never share a draw
ADAPT_SEED = 7_000_003
#: default time budget of a patient adaptation (s): 15 minutes on one CPU core
DEFAULT_ADAPT_BUDGET_S = 900.0
#: learning rate of a patient adaptation: a tenth of training's, small steps from a trained model (the measured
#: adaptation, README "The learned operator alone", ran with it)
ADAPT_LR = 3e-5
#: validation cases of a patient adaptation (8 could not tell a better model from a lucky one: 2 of 8 against 1)
ADAPT_VAL_CASES = 16


@dataclass(frozen=True)
class PatientSpec:
    """A patient: a name, its CT and label map files, and the vertebrae to use (names such as ``T8``)."""

    name: str
    ct: str
    labels: str
    vertebrae: tuple[str, ...]


def load_scenes(patients: Sequence[PatientSpec], log: Callable[[str], None] | None = None) -> list[Scene]:
    """One :class:`~.trajectory_training.Scene` per vertebra of each patient (one renderer per CT)."""
    from . import io, roi as roi_mod
    from .registration import registration_surface

    scenes = []
    for p in patients:
        ct = io.read_volume(p.ct)
        labels = io.read_label_map(p.labels, reference=ct)
        renderer = DRRRenderer(ct)
        for v in p.vertebrae:
            surface = registration_surface(ct, roi_mod.roi_from_vertebra(labels, v))
            if len(surface) < 12:
                raise InputError(f"vertebra {v} of {p.name} has only {len(surface)} bone surface points")
            scenes.append(Scene(f"{p.name}:{v}", renderer, surface, surface.points))
        if log:
            log(f"  {p.name}: {', '.join(p.vertebrae)} ({p.ct})")
    return scenes


def held_out_cases(scenes: Sequence[Scene], n: int, seed: int, mtre_range: tuple[float, float] = (0.0, 20.0)):
    """``n`` validation cases ``(TrainingCase, T_init)`` over ``scenes``, initial mTRE spread evenly over the
    range (mm)."""
    gen = torch.Generator().manual_seed(int(seed))
    out = []
    lo, hi = mtre_range
    for i in range(n):
        case = make_training_case(scenes[i % len(scenes)], gen)
        T0 = random_initial_transform(torch.eye(4, dtype=torch.float64), case.scene.targets,
                                      lo + (hi - lo) * (i + 0.5) / n, gen)
        out.append((case, T0))
    return out


def score(net: NormalMatcherNet, cases, updates: int = 15, out_of_plane: float = 0.0,
          regularization: float = 1e-5) -> dict:
    """The operator iterated alone on validation cases: success rate (< 2 mm), median final mTRE (mm) and the
    score to minimise, ``-success + 0.01 min(median, 50)``."""
    finals = []
    for case, T0 in cases:
        errs = iterate(net, case, T0, updates, out_of_plane=out_of_plane, regularization=regularization)
        finals.append(errs[-1] if errs else math.inf)
    s = sorted(finals)
    success = sum(f < SUCCESS_MM for f in finals) / max(len(finals), 1)
    median = s[len(s) // 2] if s else math.inf
    return {"success": success, "median_mm": median, "finals_mm": finals,
            "score": -success + 0.01 * min(median, 50.0)}


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, str(tmp))
    os.replace(tmp, path)


def _write_curves(curves: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    val = dict(zip(curves["val_step"], curves["val"]))
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["step", "seconds", "loss", "ce", "mtre_last_mm", "val_score"])
        for i, st in enumerate(curves["step"]):
            w.writerow([st, f"{curves['seconds'][i]:.1f}", f"{curves['loss'][i]:.4f}", f"{curves['ce'][i]:.4f}",
                        f"{curves['mtre_last'][i]:.3f}", f"{val[st]:.4f}" if st in val else ""])
    os.replace(tmp, path)


def _model_card(path: Path, meta: dict) -> None:
    lines = [f"# Model card: `{path.name}` (method `learned`, the learned normal matcher)", "",
             "The learned 2D part of the update operator that runs alone (docs/design.md §5.4): per contour point the",
             "displacement of its edge along its 2D normal and a weight, from gradient profiles of the DRR and the",
             "X-ray; the PPC solve it is trained through is the differentiable known operator.", "",
             "| | |", "|---|---|"]
    for key in ("kind", "parameters", "hparams", "solver", "train_patients", "validation_patients", "init",
                "steps", "stopped", "train_seconds", "device", "machine", "trajectory_config", "best_step",
                "validation", "created"):
        if key in meta:
            v = meta[key]
            lines.append(f"| {key} | {json.dumps(v) if not isinstance(v, str) else v} |")
    lines += ["", "Validation: the operator iterated alone (15 updates, its own solve) from [0, 20] mm on held-out "
              "cases of the validation patients; success = final mTRE < 2 mm. The test patient (`lumbar_ct`) is never "
              "trained or validated on, except by a patient adaptation, which says so in `train_patients`.", ""]
    path.write_text("\n".join(lines))


def train_learned(train: Sequence[PatientSpec], val: Sequence[PatientSpec], out: str | Path, *,
                  config: TrajectoryConfig | None = None, init: str | Path | None = None, val_cases: int = 12,
                  val_every: int = 150, val_seed: int = 12345, resume: bool = True, name: str = "learned",
                  same_patient: bool = False,
                  should_stop: Callable[[], bool] | None = None,
                  progress: Callable[[int, dict], None] | None = None,
                  log: Callable[[str], None] | None = None, device: str = "cpu") -> dict:
    """Train (or fine-tune from ``init``) the learned operator alone and write ``<out>/<name>.pt`` (best validated
    weights), ``<name>.md`` (model card), ``<name>.curves.csv``; ``<name>.ckpt.pt`` holds the last checkpoint.

    A run stopped by ``should_stop`` or that validated nothing keeps the previous model file (only the checkpoint
    is written); the next call with ``resume`` continues from the checkpoint (weights, optimiser, step, curves).
    Returns ``{"status": "done" | "cancelled", "model": path or None, "best": validation, "steps": ...}``.
    """
    log = log or (lambda _m: None)
    cfg = config or TrajectoryConfig()
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    model_path, ckpt_path = out / f"{name}.pt", out / f"{name}.ckpt.pt"
    if not train:
        raise InputError("training needs at least one training patient")
    names_train = {p.name for p in train}
    if any(p.name in names_train for p in val) and not same_patient:
        raise InputError("validate on a patient that is not trained on (split by patient); only a patient "
                         "adaptation validates on its own CT, with disjoint seeds")
    hparams = dict(NORMAL_HPARAMS)
    init_meta: dict = {}
    if init is not None:
        net, init_meta = load_model(init, "normal_matcher", "cpu")
    else:
        net = NormalMatcherNet(**hparams)
    ckpt = None
    if resume and ckpt_path.is_file():
        try:
            ckpt = torch.load(str(ckpt_path), map_location="cpu", weights_only=True)
            net = NormalMatcherNet(**ckpt["hparams"])
            net.load_state_dict(ckpt["state"])
            log(f"resuming from {ckpt_path} at step {ckpt['step']}")
        except Exception as exc:  # noqa: BLE001 - a bad checkpoint: say so and start afresh
            raise ModelFileError(f"{ckpt_path} is not a readable checkpoint ({type(exc).__name__}: {exc}); delete it "
                                 "or pass resume=False (--no-resume) to start afresh") from exc
    net.to(device)
    log("training patients:")
    scenes = load_scenes(train, log)
    log("validation patients:")
    vscenes = load_scenes(val, log) if val else []
    vcases = held_out_cases(vscenes, val_cases, val_seed) if vscenes else []
    solver = {"out_of_plane": cfg.out_of_plane, "regularization": cfg.regularization}

    def validate(n: NormalMatcherNet) -> float:
        r = score(n, vcases, out_of_plane=cfg.out_of_plane, regularization=cfg.regularization)
        log(f"  validation: {100 * r['success']:.0f} % below 2 mm, median {r['median_mm']:.2f} mm")
        validate.last = r
        return r["score"]

    validate.last = None
    start = int(ckpt["step"]) if ckpt else 0
    best = ckpt.get("best") if ckpt else None

    def on_ckpt(step, n, opt_state, curves):
        _atomic_save({"state": n.state_dict(), "hparams": n.hparams, "step": step, "optimizer": opt_state,
                      "best": best_so_far(step), "curves": curves}, ckpt_path)
        _write_curves(curves, out / f"{name}.curves.csv")

    def best_so_far(step):
        return {"score": validate.last["score"], "step": step, "success": validate.last["success"],
                "median_mm": validate.last["median_mm"]} if validate.last else best

    t0 = time.perf_counter()
    res = train_trajectories(net, scenes, cfg, validate=validate if vcases else None, validate_every=val_every,
                             progress=progress, should_stop=should_stop,
                             optimizer_state=ckpt.get("optimizer") if ckpt else None, start_step=start,
                             validate_start=init is not None and ckpt is None, on_checkpoint=on_ckpt)
    seconds = time.perf_counter() - t0 + (float(ckpt.get("seconds", 0.0)) if ckpt else 0.0)
    if res["stopped"] == "cancelled":
        _atomic_save({"state": net.state_dict(), "hparams": net.hparams, "step": res["steps_done"],
                      "optimizer": res["optimizer_state"], "best": best, "curves": res["curves"],
                      "seconds": seconds}, ckpt_path)
        log(f"cancelled at step {res['steps_done']}: {model_path} left as it was; resume from {ckpt_path}")
        return {"status": "cancelled", "model": None, "checkpoint": ckpt_path, "steps": res["steps_done"]}
    if vcases and math.isfinite(res["best_score"]):
        net.load_state_dict(res["best_state"])
    validation = score(net, vcases, out_of_plane=cfg.out_of_plane,
                       regularization=cfg.regularization) if vcases else None
    meta = {"kind": "normal_matcher", "parameters": sum(p.numel() for p in net.parameters()),
            "hparams": net.hparams, "solver": solver,
            "train_patients": [asdict(p) for p in train], "validation_patients": [asdict(p) for p in val],
            "init": str(init) if init else None, "init_meta_steps": init_meta.get("steps"),
            "steps": res["steps_done"], "stopped": res["stopped"], "best_step": res["best_step"],
            "train_seconds": round(seconds, 1), "device": device,
            "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, "
                       f"{torch.get_num_threads()} thread(s)",
            "trajectory_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
            "validation": None if validation is None else
            {"success": validation["success"], "median_mm": validation["median_mm"], "cases": len(vcases)},
            "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    tmp = model_path.with_name(model_path.name + ".tmp")
    save_model(tmp, net.cpu(), meta)
    os.replace(tmp, model_path)
    _model_card(out / f"{name}.md", meta)
    _write_curves(res["curves"], out / f"{name}.curves.csv")
    log(f"wrote {model_path} (best validation at step {res['best_step']}"
        + (": the starting weights, no step validated better)" if init is not None and res["best_step"] == start
           and vcases else ")"))
    return {"status": "done", "model": model_path, "best": meta["validation"], "steps": res["steps_done"],
            "meta": meta}


def adapt(ct: str, labels: str, vertebra: str, out: str | Path, *, init: str | Path,
          budget_s: float = DEFAULT_ADAPT_BUDGET_S, neighbours: int = 1, steps: int = 100000,
          val_cases: int = ADAPT_VAL_CASES,
          config: TrajectoryConfig | None = None, resume: bool = True,
          should_stop: Callable[[], bool] | None = None, progress: Callable[[int, dict], None] | None = None,
          log: Callable[[str], None] | None = None, device: str = "cpu") -> dict:
    """Patient adaptation: fine-tune the model ``init`` on DRRs of this CT (the vertebra and ``neighbours`` labelled
    vertebrae on each side, random views and poses) for at most ``budget_s`` seconds, validated on cases of the
    same CT (``val_cases`` of them) drawn from :data:`ADAPT_SEED` (disjoint from the evaluation's case seeds).  Writes
    ``<out>/learned.pt`` and its model card; a cancelled run leaves an existing one intact (see
    :func:`train_learned`).  It trains through the PPC solve ``init`` was trained through (its ``meta.solver``;
    ``config``'s solve settings are ignored).  The model ``init`` itself is validated first: when no fine-tuned state
    validates better, the written model has its weights (``best_step`` 0 in the card), so an adaptation never returns
    a model that does worse on its validation cases than the one it started from."""
    from . import io
    from .sample_data import vertebra_label_id

    if not Path(init).expanduser().is_file():
        raise ModelFileError(f"the model to adapt was not found: {init}")
    if not budget_s > 0:
        raise InputError(f"the adaptation's time budget must be > 0 s, got {budget_s}")
    names = _neighbouring_vertebrae(io.read_label_map(labels), vertebra, neighbours)
    vertebra_label_id(vertebra)
    spec = PatientSpec(_ct_name(ct), str(ct), str(labels), tuple(names))
    # the adapted model keeps the PPC solve its starting model was trained through (and the loop runs it with)
    _, init_meta = load_model(init, "normal_matcher", "cpu")
    solve = dict(init_meta.get("solver") or {})
    cfg = replace(config or TrajectoryConfig(lr=ADAPT_LR, pool=24, refresh_every=2, max_points=256, unroll=2),
                  steps=steps, time_budget_s=float(budget_s), seed=ADAPT_SEED,
                  out_of_plane=float(solve.get("out_of_plane", 0.0)),
                  regularization=float(solve.get("regularization", 1e-5)))
    return train_learned([spec], [spec], out, config=cfg, init=init, val_cases=val_cases, val_every=50,
                         val_seed=ADAPT_SEED + 1, resume=resume, name="learned", same_patient=True,
                         should_stop=should_stop,
                         progress=progress, log=log, device=device)


def _ct_name(ct: str | Path) -> str:
    """A readable name of a CT file for the model card: its folder and file name without the image extensions
    (``lumbar_ct/ct`` for ``.../lumbar_ct/ct.nii.gz``)."""
    p = Path(ct).expanduser()
    name = p.name[: len(p.name) - len(suffix(p))]
    return f"{p.parent.name}/{name}" if p.parent.name else name


_ORDER = ["C1", "C2", "C3", "C4", "C5", "C6", "C7"] + [f"T{i}" for i in range(1, 13)] + \
         [f"L{i}" for i in range(1, 6)] + ["S1"]


def _neighbouring_vertebrae(labels, vertebra: str, k: int) -> list[str]:
    """The vertebra and up to ``k`` neighbours on each side that the label map holds."""
    from .sample_data import vertebra_label_id

    key = vertebra.strip().upper().replace("VERTEBRAE_", "")
    present = set(int(v) for v in torch.unique(labels.data).tolist())
    if vertebra_label_id(key) not in present:
        raise InputError(f"vertebra {vertebra} is not in the label map")
    if key not in _ORDER:
        return [key]
    i = _ORDER.index(key)
    out = [key]
    for j in list(range(i - k, i)) + list(range(i + 1, i + k + 1)):
        if 0 <= j < len(_ORDER) and vertebra_label_id(_ORDER[j]) in present:
            out.append(_ORDER[j])
    return out
