"""The ``ppcreg bench`` sub-command and its parser: timings of the DRR renderer and of the stages of one classic
update step, or with ``--peer`` the side-by-side benchmark against another tool (:mod:`PPCRegistrationLib.peer`).
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable

from .cli_common import (EXIT_OK, _add_ct_roi_args, _load_ct_and_roi, _mtre_range, _positive_int, _say, _surface,
                         _torch)
from .errors import InputError


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
    from .drr import DRRRenderer
    from .gradients import image_gradient
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
    margin = cfg.matching.window_margin_px + cfg.matching.search_px
    u0, v0 = (max(0, int(math.floor(float(x) - margin))) for x in uv_all.min(0).values)
    u1 = min(n - 1, int(math.ceil(float(uv_all[:, 0].max()) + margin)))
    v1 = min(n - 1, int(math.ceil(float(uv_all[:, 1].max()) + margin)))
    if u1 - u0 < 8 or v1 - v0 < 8:
        raise InputError("the region of interest projects outside the simulated detector; choose another ROI")
    ww, wh = u1 - u0 + 1, v1 - v0 + 1
    sub = crop_projection(projr, u0, v0, ww, wh)
    sigma = max(cfg.matching.gradient_sigma_px, min(3.0, cfg.matching.search_px / 8))
    xray_win = reg.xray[None, v0:v0 + wh, u0:u0 + ww]
    drr = renderer.render(sub, T[None])
    drr_grad = image_gradient(drr, sigma_px=sigma)
    xray_grad = image_gradient(xray_win, sigma_px=sigma)

    def contour():
        m = contour_mask(P0[None], G0[None], projr.source, T[None], theta_deg=cfg.matching.contour_theta_deg)[0]
        idx = torch.nonzero(m).flatten()
        return idx, project_normals(projr, w_all[idx][None], g_all[idx][None])

    idx, normals = contour()
    uv_c = (uv_all[idx] - uv_all.new_tensor([u0, v0]))[None].float()
    res = match_along_normals(drr_grad, xray_grad, uv_c, normals.float(), search_px=cfg.matching.search_px)
    wts = (res.score * res.valid.to(res.score.dtype)).double()
    rays = projr.ray_directions(res.uv_matched.double() + uv_all.new_tensor([u0, v0]))
    w_c, g_c = w_all[idx][None], g_all[idx][None]

    def solve():
        for _ in range(cfg.solver.robust_iterations + 1):
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
                                                                 search_px=cfg.matching.search_px)),
        (f"solve ({cfg.solver.robust_iterations + 1} weighted PPC solves)", solve),
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
        r = refine_pose(renderer, reg.xray, reg.projection, T, P0, margin_px=cfg.matching.window_margin_px,
                        **cfg.refine.pose_kwargs())
        evals.append(r.evaluations)

    _say("")
    _say(f"intensity refinement (refine.refine_pose: at most {cfg.refine.iterations} iterations per scale, scales "
         f"{cfg.refine.sigmas_px} px on grids {cfg.refine.grids_px}, solvers {cfg.refine.solvers}, imaging chain "
         f"estimated: {', '.join(cfg.refine.appearance) or 'none'})")
    for sigma, grid in zip(cfg.refine.sigmas_px, cfg.refine.grids_px):
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


def add_parser(sub) -> None:
    """The ``bench`` subcommand."""
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
