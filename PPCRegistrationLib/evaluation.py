"""The evaluation protocol of docs/design.md §6 (Table 1 and Fig. 2 of the paper, plus the iterated registration).

:func:`evaluate` simulates ``n_cases`` reproducible cases of one CT (case ``i`` uses the seed ``seed + i``:
a random C-arm view, an X-ray simulated at the ground truth with appearance variation, a random initial
estimate with an initial mTRE uniform in ``mtre_range``) and runs every method on *the same* cases.  For each
case and method it records the initial mTRE, the mTRE and mRPD after ONE update, the final mTRE and mRPD after
the iterative registration, the number of iterations, the wall time and the final status.

:func:`write_report` writes what ``ppcreg evaluate`` produces: ``cases.json``, ``cases.csv``,
``summary.json``, ``summary.md`` and the scatter plots ``scatter_one_update.png`` / ``scatter_final.png``.

The mTRE targets are the surface points of the region of interest (the same point set for "before" and
"after", docs/design.md §2).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from .drr import DRRRenderer
from .errors import InputError
from .features import SurfacePoints
from .inpainting import inpaint
from .metrics import mrpd, mtre, paired_comparison, summarize
from .methods import ALL_METHODS, DEFAULT_LEARNED_STEPS, DEFAULT_SWITCH_MM, Method, method_config, \
    models_from_mapping, normalize_method, resolve_method
from .physics_simulation import XRAY_MODELS, PhysicsSimulator
from .physics_simulation import describe as describe_physics
from .registration import REFINE, Matcher, OracleMatcher, Registration, RegistrationConfig, registration_surface
from .simulation import ViewSampler, XRayVariation, make_case
from .volume import Volume
from .xray_field import detect_field, fill_outside
from .evaluation_report import summary_markdown, write_report  # noqa: F401  (re-exported)

__all__ = ["evaluate", "write_report", "summary_markdown", "summarize_cases", "SUMMARY_KEYS", "AVAILABLE_METHODS",
           "ORACLE", "join_results", "read_result"]

#: the ground-truth correspondences (simulation only, :class:`~PPCRegistrationLib.registration.OracleMatcher`)
#: through the learned operators' plain PPC solve, without the registration's limits on the update size: the
#: ceiling of what one update can do with perfect 2D matching
ORACLE = "oracle"
#: method names :func:`evaluate` knows (learned and chained ones need their model files, see
#: :mod:`PPCRegistrationLib.methods`); any other 2D matching step can be passed in through ``matchers``
AVAILABLE_METHODS = (*ALL_METHODS, ORACLE)

#: keys every per-method summary has (from :func:`metrics.summarize`), for "one_update" and "final"
SUMMARY_KEYS = ("mtre_p50", "mtre_p75", "mtre_p95", "mtre_mean", "mtre_sd", "reduction_factor_mean",
                "success_2mm", "success_5mm", "mrpd_mean", "seconds_per_case")

#: detector pixels: the oracle's window margin (its matches are never dropped as too far below this)
ORACLE_SEARCH_PX = 96.0
#: what :func:`evaluate` does with the metal of the physics X-rays: leave it, or inpaint the simulator's own mask
INPAINT_METAL = ("none", "truth")

def evaluate(ct: Volume, roi, methods: Sequence[str] = ("classic",), n_cases: int = 100, seed: int = 0,
             mtre_range: tuple[float, float] = (0.0, 20.0), iterations: int = 30, *, detector_px: int = 256,
             tolerance_mm: float = 0.05, device: str = "cpu", variation: XRayVariation | None = None,
             views: ViewSampler | None = None, matchers: Mapping[str, Matcher] | None = None,
             models: Mapping[str, str | Path] | None = None, models_dir: str | Path | None = None,
             learned_steps: int = DEFAULT_LEARNED_STEPS, switch_mm: float = DEFAULT_SWITCH_MM,
             classic_fallback: bool = True, config: RegistrationConfig | None = None,
             renderer: DRRRenderer | None = None,
             surface: SurfacePoints | None = None, progress: bool = True,
             on_case: Callable[[dict], None] | None = None, xray_models: Sequence[str] = ("drr",),
             metal: bool = False, mask_field: bool = False, inpaint_metal: str = "none",
             linear_intake: bool = True) -> dict:
    """Run the evaluation protocol (docs/design.md §6) on one CT.

    Args:
        ct: the CT (HU).
        roi: region of interest (``BoxROI`` / ``LabelROI``) or None (whole CT); its surface points are the
            mTRE targets and the registration features.
        methods: method names, evaluated on the same cases: any of :data:`AVAILABLE_METHODS` (``classic``,
            ``flow``, ``ppc-flow``, ``ppc-flow-attention`` and the chained ``<learned>+classic``), or a key of
            ``matchers``.
        n_cases: number of simulated cases (seeds ``seed`` .. ``seed + n_cases - 1``).
        seed: seed of the first case.
        mtre_range: ``(lo, hi)`` mm, initial mTRE drawn uniformly in it.
        iterations: maximum number of updates of the iterative registration; 1 = one update only (Table 1 of
            the paper, cheap enough for hundreds of cases; the report then leaves out the iterated table).
        detector_px: detector size (pixels, square) of the simulated C-arm (ignored when ``views`` is given).
        tolerance_mm: convergence tolerance of the registration (mm).
        device: "cpu", "cuda" or "auto".
        variation: appearance variation of the simulated X-rays (default :class:`XRayVariation`).
        views: the random C-arm views (default ``ViewSampler(detector_size_px=detector_px)``).
        matchers: method name -> 2D matching step of a custom method (run with the base settings).
        models: method (or learned operator) name -> model file; default ``<models_dir>/<learned>.pt``.
        models_dir: folder of the default model files (default ``Resources/Models`` of the repository).
        learned_steps, switch_mm: when the chained methods switch to classic refinement.
        classic_fallback: chained methods fall back on the classic registration when their result correlates
            poorly with the X-ray (:meth:`~PPCRegistrationLib.methods.Method.schedule`).
        config: base registration settings (``max_iterations``, ``tolerance_mm``, ``device`` are overridden).
        renderer, surface: precomputed DRR renderer / surface points of this CT and ROI.
        progress: show a tqdm progress bar over the cases (on stderr).
        on_case: called with each case's record when it is done.
        xray_models: the X-ray simulators each case is made with, on the same geometry, ground truth and initial
            estimate: ``"drr"`` (the training simulator, :mod:`.simulation`) and/or ``"physics"``
            (:mod:`.physics_simulation`, for testing only).  Methods on the physics X-ray are reported as
            ``<method>@physics`` and compared with the same method on the DRR X-ray, paired.
        metal: the physics X-rays have metal in the field in a random half of the cases.
        inpaint_metal: ``"none"``, or ``"truth"``: inpaint (:func:`.inpainting.inpaint`) the metal of each
            physics X-ray over the simulator's own mask of it before registering, the ceiling of a perfect metal
            detector.
        linear_intake: physics X-rays without the detector's log transform go through the intake's logarithm
            (as a DICOM marked ``LIN`` does, :class:`.physics_simulation.PhysicsSimulator`); False registers them
            linear.
        mask_field: find collimator blades in every X-ray (:func:`.xray_field.detect_field`, from the image alone)
            and fill the outside with the field's border (:func:`.xray_field.fill_outside`) before registering.
    Returns:
        ``{"config": {...}, "cases": [per-case records], "summary": {...}}``; the summary has ``"initial"``
        (statistics of the initial mTRE) and ``"methods"``: for each method ``"one_update"`` and ``"final"``
        (the dicts of :func:`metrics.summarize`: ``mtre_p50`` ... ``seconds_per_case``) and
        ``"status_counts"``.
    Raises:
        InputError: bad parameters or an unknown method.  ModelFileError: a missing or damaged model file
            (checked before any case is simulated).
    """
    matchers = dict(matchers or {})
    names: list[str] = []
    for m in methods:
        if m not in matchers and m != ORACLE:
            try:
                m = normalize_method(m)
            except InputError:
                raise InputError(f"unknown method {m!r}; available: "
                                 f"{', '.join(list(AVAILABLE_METHODS) + list(matchers))}") from None
        if m not in names:
            names.append(m)
    methods = names
    if not methods:
        raise InputError("give at least one method to evaluate")
    if n_cases < 1:
        raise InputError(f"the number of cases must be at least 1, got {n_cases}")
    xray_models = list(dict.fromkeys(xray_models))
    if not xray_models or any(x not in XRAY_MODELS for x in xray_models):
        raise InputError(f"unknown X-ray model in {xray_models}; available: {', '.join(XRAY_MODELS)}")
    if inpaint_metal not in INPAINT_METAL:
        raise InputError(f"unknown metal inpainting {inpaint_metal!r}; available: {', '.join(INPAINT_METAL)}")
    if inpaint_metal != "none" and not metal:
        raise InputError("inpainting the metal needs metal in the field (--metal)")
    if metal and "physics" not in xray_models:
        raise InputError("metal in the field needs the physics X-ray model (--xray-model physics or both)")
    if iterations < 1:
        raise InputError(f"the number of iterations must be at least 1, got {iterations}")
    lo, hi = float(mtre_range[0]), float(mtre_range[1])
    if not (0 <= lo <= hi) or not math.isfinite(hi):
        raise InputError(f"the initial mTRE range must satisfy 0 <= lo <= hi (mm), got {lo} {hi}")
    base = config or RegistrationConfig()
    cfg = base.updated({"guards.max_iterations": int(iterations), "guards.tolerance_mm": float(tolerance_mm),
                        "device": device})
    if int(iterations) == 1:  # one update only (Table 1): no intensity refinement after it
        cfg = cfg.updated({"refine.iterations": 0})
    dev = cfg.resolved_device()
    # the learned operators are loaded (and their files checked) once, before any case is simulated
    model_files = models_from_mapping(models)
    resolved: dict[str, Method | Matcher] = {}
    for m in methods:
        if m in matchers:
            resolved[m] = matchers[m]
        elif m == ORACLE:
            resolved[m] = OracleMatcher()
        else:
            learned = m.split("+")[0]
            resolved[m] = resolve_method(m, model_path=model_files.get(learned), models_dir=models_dir, device=dev,
                                         learned_steps=learned_steps, switch_mm=switch_mm,
                                         classic_fallback=classic_fallback)
    model_info = {m: {"file": str(r.model_path), "meta": r.model_meta or {}} for m, r in resolved.items()
                  if isinstance(r, Method) and r.model_path is not None}
    views = views or ViewSampler(detector_size_px=int(detector_px))
    if surface is None:
        surface = registration_surface(ct, roi, cfg)
    if len(surface) < 6:
        raise InputError(f"only {len(surface)} surface points in the region of interest: enlarge the region")
    renderer = renderer or DRRRenderer(ct, device=dev)
    targets = surface.points.detach().cpu().to(torch.float64)
    physics = (PhysicsSimulator(ct, anchor=targets, metal=metal, device=dev, linear_intake=linear_intake)
               if "physics" in xray_models else None)
    runs = [(m, x) for x in xray_models for m in methods]
    keys = [m if x == "drr" else f"{m}@{x}" for m, x in runs]

    from tqdm.auto import tqdm

    records: list[dict] = []
    t_start = time.perf_counter()
    bar = tqdm(range(n_cases), desc="evaluate", unit="case", disable=not progress, leave=False)
    for i in bar:
        case_seed = int(seed) + i
        case = make_case(renderer, targets, case_seed, (lo, hi), views, variation)
        rec: dict[str, Any] = {"case": i, "seed": case_seed, "initial_mtre_mm": case.initial_mtre_mm,
                               "view": case.view, "methods": {}}
        cases = {"drr": case}
        if physics is not None:
            img, info = physics.simulate(case.projection, case.T_gt, case.xray_seed)
            if inpaint_metal == "truth" and info["metal"]:
                img = inpaint(img, info["metal_mask"])
            cases["physics"] = dataclasses.replace(case, xray=img)
            rec["physics"] = describe_physics(info)
        if mask_field:
            for x, c in cases.items():
                box = detect_field(c.xray)
                cases[x] = dataclasses.replace(c, xray=fill_outside(c.xray, box))
                rec.setdefault("field_box", {})[x] = list(box)
        for (m, x), key in zip(runs, keys):
            rec["methods"][key] = _run_method(ct, cases[x], roi, cfg, resolved[m], surface, renderer)
        records.append(rec)
        if progress:
            bar.set_postfix({k: f"{rec['methods'][k]['mtre_final_mm']:.2f}mm" for k in keys[:2]})
        if on_case is not None:
            on_case(rec)
    bar.close()

    summary = summarize_cases(records, keys)
    return {
        "config": {"methods": keys, "xray_models": xray_models, "metal": bool(metal), "mask_field": bool(mask_field),
                   "inpaint_metal": inpaint_metal, "linear_intake": bool(linear_intake),
                   "n_cases": n_cases, "seed": int(seed), "mtre_range": [lo, hi],
                   "iterations": int(iterations), "tolerance_mm": float(tolerance_mm), "device": str(dev),
                   "detector_px": int(views.detector_size_px), "n_targets": int(targets.shape[0]),
                   "flow_flips": int(cfg.learned.flow_flips),
                   "roi": repr(roi) if roi is not None else "whole CT", "one_update_only": int(iterations) == 1,
                   "models": {m: v["file"] for m, v in model_info.items()},
                   "learned_steps": int(learned_steps), "switch_mm": float(switch_mm),
                   "classic_fallback": bool(classic_fallback),
                   "seconds_total": time.perf_counter() - t_start},
        "cases": records,
        "summary": summary,
    }


def summarize_cases(records: Sequence[Mapping], methods: Sequence[str]) -> dict:
    """The ``"summary"`` of an :func:`evaluate` result from its per-case records (e.g. of several runs on the same
    cases joined): ``{"n_cases", "initial", "methods": {m: {"one_update", "final", "status_counts"}}}``."""
    initial = [r["initial_mtre_mm"] for r in records]
    summary: dict[str, Any] = {"n_cases": len(records), "initial": summarize(initial, initial), "methods": {}}
    for m in methods:
        rows = [r["methods"][m] for r in records]
        one = summarize(initial, [r["mtre_one_update_mm"] for r in rows],
                        mrpd_final=[r["mrpd_one_update_mm"] for r in rows],
                        seconds=[r["seconds_one_update"] for r in rows], iterations=[1 for _ in rows])
        fin = summarize(initial, [r["mtre_final_mm"] for r in rows], mrpd_final=[r["mrpd_final_mm"] for r in rows],
                        seconds=[r["seconds"] for r in rows], iterations=[r["iterations"] for r in rows])
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        summary["methods"][m] = {"one_update": one, "final": fin, "status_counts": counts}
    # every method against each one listed before it, on the same cases
    paired = []
    for i, a in enumerate(methods):
        for b in methods[:i]:
            ra, rb = [r["methods"][a] for r in records], [r["methods"][b] for r in records]
            c = paired_comparison([r["mtre_one_update_mm"] for r in ra], [r["mtre_one_update_mm"] for r in rb],
                                  [r["mtre_final_mm"] for r in ra], [r["mtre_final_mm"] for r in rb])
            paired.append({"a": a, "b": b, **c})
    summary["paired"] = paired
    return summary


#: settings that runs must share to be joined (the same protocol on the same CT and region)
_JOIN_KEYS = ("mtre_range", "iterations", "tolerance_mm", "detector_px", "n_targets", "roi", "one_update_only")


def read_result(folder: str | Path) -> dict:
    """The result of an earlier :func:`evaluate` from its report folder (``cases.json``), summary recomputed."""
    p = Path(folder).expanduser() / "cases.json"
    if not p.is_file():
        raise InputError(f"{p} not found: give folders written by `ppcreg evaluate`")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        cfg, records = data["config"], data["cases"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{p} is not the cases.json of an evaluation ({type(exc).__name__}: {exc})") from exc
    return {"config": cfg, "cases": records, "summary": summarize_cases(records, cfg["methods"])}


def join_results(results: Sequence[Mapping]) -> dict:
    """Several :func:`evaluate` results as one: runs of other seeds (a long evaluation split over processes or
    machines) and runs of other methods on the same seeds (a method added later) are joined case by case.

    Raises:
        InputError: runs of another protocol (initial range, iterations, detector, region of interest...), a seed
            whose case differs between runs (another CT or view settings), or a case that lacks a method the joined
            result has (every method must be on every case).
    """
    if not results:
        raise InputError("nothing to join: give at least one evaluation")
    first = results[0]["config"]
    methods: list[str] = []
    models: dict[str, str] = {}
    by_seed: dict[int, dict] = {}
    for res in results:
        cfg = res["config"]
        bad = [k for k in _JOIN_KEYS if cfg.get(k) != first.get(k)]
        if bad:
            raise InputError("these evaluations ran different protocols and cannot be joined: "
                             + ", ".join(f"{k} {first.get(k)!r} vs {cfg.get(k)!r}" for k in bad))
        methods += [m for m in cfg["methods"] if m not in methods]
        models.update(cfg.get("models") or {})
        for rec in res["cases"]:
            seed = int(rec["seed"])
            if seed not in by_seed:
                by_seed[seed] = {**rec, "methods": dict(rec["methods"])}
                continue
            have = by_seed[seed]
            if abs(float(have["initial_mtre_mm"]) - float(rec["initial_mtre_mm"])) > 1e-6:
                raise InputError(f"case seed {seed} differs between the evaluations (initial mTRE "
                                 f"{have['initial_mtre_mm']:.4f} vs {rec['initial_mtre_mm']:.4f} mm): not the same "
                                 "cases")
            have["methods"].update(rec["methods"])
    seeds = sorted(by_seed)
    records = [by_seed[s] for s in seeds]
    for rec in records:
        missing = [m for m in methods if m not in rec["methods"]]
        if missing:
            raise InputError(f"case seed {rec['seed']} has no result of {', '.join(missing)}: join runs that cover the "
                             "same methods on every case")
    for i, rec in enumerate(records):
        rec["case"] = i
    config = {**first, "methods": methods, "models": models, "n_cases": len(records), "seed": seeds[0],
              "seeds": seeds if seeds != list(range(seeds[0], seeds[0] + len(seeds))) else None,
              "joined_from": len(results)}
    return {"config": config, "cases": records, "summary": summarize_cases(records, methods)}


def _run_method(ct: Volume, case, roi, cfg: RegistrationConfig, method: Method | Matcher, surface: SurfacePoints,
                renderer: DRRRenderer) -> dict:
    if isinstance(method, Method):
        reg = method.registration(ct, case.xray, case.projection, case.T_init, roi, cfg, T_gt=case.T_gt,
                                  surface=surface, renderer=renderer)
    elif isinstance(method, OracleMatcher):  # perfect matching through the learned operators' plain solve
        # no safety limits on the size of the update: the oracle's update is as large as the initial error
        ocfg = method_config("flow", cfg, search_px=ORACLE_SEARCH_PX).updated(
            {"guards.max_update_mm": math.inf, "guards.max_drift_mm": math.inf})
        reg = Registration(ct, case.xray, case.projection, case.T_init, roi, ocfg, T_gt=case.T_gt, matcher=method,
                           surface=surface, renderer=renderer)
    else:  # a custom 2D matching step
        reg = Registration(ct, case.xray, case.projection, case.T_init, roi, cfg, T_gt=case.T_gt, matcher=method,
                           surface=surface, renderer=renderer)
    res = reg.run()
    targets = case.targets.to(torch.float64)
    T_gt = case.T_gt.to(torch.float64)
    proj = case.projection.to("cpu", torch.float64)
    T_one = res.history[0].T.to(torch.float64) if res.history else case.T_init.to(torch.float64)
    T_fin = res.T.to(torch.float64)
    return {
        "mtre_one_update_mm": float(mtre(T_one, T_gt, targets)),
        "mrpd_one_update_mm": float(mrpd(T_one[None], T_gt[None], targets, proj)[0]),
        "mtre_final_mm": float(mtre(T_fin, T_gt, targets)),
        "mrpd_final_mm": float(mrpd(T_fin[None], T_gt[None], targets, proj)[0]),
        # PPC updates (learned or classic); the intensity refinement's updates are counted apart
        "iterations": sum(1 for st in res.history if st.operator != REFINE),
        "refine_updates": sum(1 for st in res.history if st.operator == REFINE),
        "seconds": float(res.seconds),
        "seconds_one_update": float(res.history[0].seconds) if res.history else 0.0,
        "status": res.status,
        "message": res.message,
    }


# ----------------------------------------------------------------------------- report
