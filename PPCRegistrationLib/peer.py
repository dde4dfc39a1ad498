"""``ppcreg bench --peer diffdrr``: DiffDRR 0.6.1 side by side with our renderer and registration, in one run.

DiffDRR is never a dependency of this project: :func:`~.peer_env.ensure_peer_env` installs it once into its own
environment (:mod:`.peer_env`, whose names this module offers too).  The DiffDRR side runs
there, in ``peer_diffdrr_worker.py``; the two sides talk through files in a temporary folder (``task.json`` with
the geometry and poses, ``.npy`` volumes and X-rays; ``result.json`` and ``.npy`` DRRs back).

Conventions (docs/design.md §2 on our side; DiffDRR's from its source):

* DiffDRR reads the CT in RAS (``diag(-1, -1, 1)`` of the LPS world of our files) and moves its centre to the
  origin; :func:`diffdrr_frames` gives that affine and the map from our world to DiffDRR's.
* Its camera looks along +z from the source like ours, but its detector x and y run opposite to our u, v
  (``diag(-1, -1, 1)``, a rotation by 180 degrees about the beam); its pose maps camera -> world after the
  ``orientation="AP"`` re-orientation.  :func:`camera_pose` / :func:`transform_from_camera_pose` convert our
  ``(projection, T)`` to its camera pose and back; the principal point becomes its ``x0, y0`` (mm).
* Attenuation: DiffDRR is given our renderer's attenuation volume (1/mm, after ``hu_to_mu`` with the bone
  boost), so both integrate the same values; DiffDRR's own HU -> density mapping (with
  ``bone_attenuation_multiplier`` = our bone boost) is rendered too and its correlation reported.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .errors import InputError
from .geometry import Projection, invert_rigid, rigid, translation_matrix
from .peer_env import (DIFFDRR_VERSION, REQUIREMENTS, PeerEnv, PeerError, ensure_peer_env, log, peer_env_dir,
                       pin_mismatches, read_pins, run_streaming)

__all__ = ["PEERS", "DIFFDRR_VERSION", "REQUIREMENTS", "DiffDRRRecipe", "PeerEnv", "PeerError", "read_pins",
           "pin_mismatches", "peer_env_dir", "ensure_peer_env", "diffdrr_frames", "detector_params", "camera_pose",
           "transform_from_camera_pose", "ncc", "write_task", "benchmark", "format_table"]

PEERS = ("diffdrr",)
WORKER = Path(__file__).with_name("peer_diffdrr_worker.py")
#: DiffDRR's ``orientation="AP"`` re-orientation of its C-arm (``diffdrr.data.read``), camera -> world
AP_REORIENT = torch.tensor([[1, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.float64)
#: diag(-1, -1, 1, 1): LPS <-> RAS, and our camera axes <-> DiffDRR's (a rotation by pi about z in both cases)
_FLIP = torch.diag(torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=torch.float64))

# ============================================================================= conventions


def diffdrr_frames(ijk_to_world: torch.Tensor, shape_kji: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """DiffDRR's frames of a volume with our ``ijk_to_world`` (LPS mm) and data shape ``(K, J, I)``.

    Returns:
        ``affine_ras``: voxel -> RAS (what DiffDRR is given), ``affine_centred``: voxel -> DiffDRR's world (RAS
        with the volume centre at the origin, ``diffdrr.data.read(center_volume=True)``), ``world_from_ct``: our
        world (mm) -> DiffDRR's world (mm).  All ``(4, 4)`` float64.
    """
    a = torch.as_tensor(ijk_to_world, dtype=torch.float64)
    affine_ras = _FLIP @ a
    k, j, i = (int(s) for s in shape_kji)
    centre = affine_ras @ torch.tensor([(i - 1) / 2, (j - 1) / 2, (k - 1) / 2, 1.0], dtype=torch.float64)
    shift = translation_matrix(-centre[:3])
    return affine_ras, shift @ affine_ras, shift @ _FLIP


def detector_params(projection: Projection) -> dict[str, float]:
    """DiffDRR's ``DRR`` detector arguments of a batch-1 geometry: ``sdd`` (mm), ``height``, ``width`` (px),
    ``delx``, ``dely`` (mm / px), ``x0``, ``y0`` (principal point offset from the detector centre, mm)."""
    K, ps = projection.K[0].double(), projection.pixel_spacing[0].double()
    if projection.batch != 1:
        raise InputError("detector_params needs one geometry (batch 1)")
    if abs(float(K[0, 1])) > 1e-9:
        raise InputError("DiffDRR's detector has no skew: the intrinsics must have K[0, 1] = 0")
    sdd_u, sdd_v = float(K[0, 0] * ps[0]), float(K[1, 1] * ps[1])
    if abs(sdd_u - sdd_v) > 1e-6 * sdd_u:
        raise InputError(f"the focal length differs along u and v ({sdd_u:.3f} vs {sdd_v:.3f} mm)")
    h, w = projection.height, projection.width
    return {"sdd": sdd_u, "height": h, "width": w, "delx": float(ps[0]), "dely": float(ps[1]),
            "x0": float(ps[0] * (K[0, 2] - (w - 1) / 2)), "y0": float(ps[1] * (K[1, 2] - (h - 1) / 2))}


def camera_pose(projection: Projection, T: torch.Tensor, world_from_ct: torch.Tensor,
                reorient: torch.Tensor = AP_REORIENT) -> torch.Tensor:
    """DiffDRR's camera pose ``(4, 4)`` float64 (camera -> its world, before ``reorient``) that renders what our
    ``projection`` shows of the CT moved by ``T`` (``x' = T x``, mm)."""
    ext = rigid(projection.R[0].double(), projection.t[0].double())  # world -> camera
    T = torch.as_tensor(T, dtype=torch.float64).reshape(4, 4)
    return world_from_ct.double() @ invert_rigid(T) @ invert_rigid(ext) @ _FLIP @ invert_rigid(reorient.double())


def transform_from_camera_pose(pose: torch.Tensor, projection: Projection, world_from_ct: torch.Tensor,
                               reorient: torch.Tensor = AP_REORIENT) -> torch.Tensor:
    """Inverse of :func:`camera_pose`: our ``T (4, 4)`` float64 from DiffDRR's camera pose."""
    ext = rigid(projection.R[0].double(), projection.t[0].double())
    pose = torch.as_tensor(pose, dtype=torch.float64).reshape(4, 4)
    return invert_rigid(ext) @ _FLIP @ invert_rigid(reorient.double()) @ invert_rigid(pose) @ world_from_ct.double()


def ncc(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Normalised cross-correlation of two images of the same shape (1 = equal up to scale and offset)."""
    x = torch.as_tensor(np.asarray(a), dtype=torch.float64).flatten()
    y = torch.as_tensor(np.asarray(b), dtype=torch.float64).flatten()
    if x.shape != y.shape:
        raise InputError(f"images of different sizes: {tuple(np.shape(a))} vs {tuple(np.shape(b))}")
    x, y = x - x.mean(), y - y.mean()
    den = float(torch.linalg.norm(x) * torch.linalg.norm(y))
    return float((x @ y) / den) if den > 0 else math.nan


# ============================================================================= the task for the worker


@dataclass(frozen=True)
class DiffDRRRecipe:
    """DiffDRR's registration recipe: as in its registration tutorial, ``diffdrr.registration.Registration`` with
    Euler angles (ZXY) and Adam maximising the similarity with its learning rates (0.1 rad for the rotation, 5 mm
    for the translation); coarse to fine over detector down-sampling ``scales`` (``DRR.set_intrinsics_``; the
    learning rates halve at each finer scale), as its authors' DiffPose / xvr pipelines do, with their multi-scale
    NCC (``MultiscaleNormalizedCrossCorrelation2d``: global + 13-pixel patches, equal weights), a fixed number of
    iterations per scale and DiffDRR's default renderer.  The full-resolution scale is left out by default: one
    256 x 256 iteration takes about 25 s on one CPU thread."""

    parameterization: str = "euler_angles"
    convention: str = "ZXY"
    lr_rotation: float = 1e-1
    lr_translation: float = 5.0
    scales: tuple[int, ...] = (4, 2)
    iterations_per_scale: int = 50
    patch_sizes: tuple[int | None, ...] = (None, 13)
    patch_weights: tuple[float, ...] = (0.5, 0.5)
    renderer: str = "siddon"

    def __post_init__(self) -> None:
        if self.iterations_per_scale < 1 or not self.scales or any(int(s) < 1 for s in self.scales):
            raise InputError("the DiffDRR recipe needs >= 1 iteration per scale and scales >= 1")
        if self.renderer not in ("siddon", "trilinear"):
            raise InputError(f"DiffDRR's renderer is 'siddon' or 'trilinear', not {self.renderer!r}")


def _mat(t: torch.Tensor) -> list:
    return t.detach().cpu().double().tolist()


def write_task(folder: str | Path, *, mu_volume, ct, bone_boost: float, detector: dict, cases: Sequence[dict],
               checks: Sequence[tuple[str, Projection]], recipe: DiffDRRRecipe, threads: int,
               timing_repeats: int = 5) -> dict:
    """Write the worker's task (``task.json``, volumes and X-rays as ``.npy``) into ``folder``; returns the task.

    Args:
        mu_volume: our renderer's attenuation volume (1/mm, :class:`~.volume.Volume`): DiffDRR's ``"matched"``
            subject; ct: the CT in HU: its ``"native"`` subject (DiffDRR's own density, ``bone_boost``).
        detector: :func:`detector_params` of the (shared) detector.
        cases: ``{"seed", "xray" (H, W) tensor, "projection", "T_init"}`` per registration case.
        checks: ``(name, projection)`` views rendered at the CT's own pose (T = identity): the matched subject at
            each, the native one at the first.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    subjects, frames = {}, {}
    for name, vol, density in (("matched", mu_volume, "given"), ("native", ct, "hu")):
        np.save(folder / f"{name}.npy", vol.data.detach().cpu().float().permute(2, 1, 0).contiguous().numpy())
        ras, centred, w_from_ct = diffdrr_frames(vol.ijk_to_world.cpu(), vol.shape)
        frames[name] = w_from_ct
        subjects[name] = {"npy": f"{name}.npy", "affine_ras": _mat(ras), "expected_affine": _mat(centred),
                          "density": density, "bone_attenuation_multiplier": float(bone_boost),
                          "orientation": "AP", "reorient": _mat(AP_REORIENT)}
    eye = torch.eye(4, dtype=torch.float64)
    # the matched subject at every check view, DiffDRR's own density at the first one
    renders = [{"subject": s, "pose": _mat(camera_pose(p, eye, frames[s])), "out": f"drr_{s}_{name}.npy"}
               for k, (name, p) in enumerate(checks) for s in subjects if s == "matched" or k == 0]
    reg_cases = []
    for c in cases:
        fname = f"xray_{int(c['seed'])}.npy"
        np.save(folder / fname, c["xray"].detach().cpu().float().numpy())
        reg_cases.append({"seed": int(c["seed"]), "xray": fname,
                          "pose_init": _mat(camera_pose(c["projection"], c["T_init"], frames["matched"]))})
    task = {"threads": int(threads), "detector": {**detector, "renderer": recipe.renderer}, "subjects": subjects,
            "renders": renders,
            "timing": {"subject": "matched", "pose": renders[0]["pose"], "repeats": int(timing_repeats),
                       "warmup": 1} if renders else None,
            "registration": {"subject": "matched", "recipe": asdict(recipe), "cases": reg_cases} if reg_cases
            else None,
            "world_from_ct": {k: _mat(v) for k, v in frames.items()}}
    (folder / "task.json").write_text(json.dumps(task), encoding="utf-8")
    return task


def run_worker(env: PeerEnv, folder: Path, progress: bool = True) -> dict:
    """Run the DiffDRR worker on a task folder in the peer environment; its ``result.json``."""
    sub_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    threads = json.loads((folder / "task.json").read_text(encoding="utf-8"))["threads"]
    sub_env.update(OMP_NUM_THREADS=str(threads), PYTHONNOUSERSITE="1", PYTHONWARNINGS="ignore")
    rc, tail = run_streaming([str(env.python), str(WORKER), str(folder)], progress, env=sub_env,
                              show=("[diffdrr]",), prefix="[ppcreg peer] ")
    if rc != 0:
        raise PeerError("the DiffDRR worker failed (exit code " + str(rc) + "): " + " | ".join(tail[-8:])
                        + f". Its files are in {folder}")
    return json.loads((folder / "result.json").read_text(encoding="utf-8"))


# ============================================================================= the side-by-side benchmark


def _median_s(fn, repeats: int) -> float:
    fn()  # warm-up (the renderer's slab cache for this view)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _json_safe(obj: Any) -> Any:  # NaN / infinities -> None (standard JSON)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _median(values: Sequence[float]) -> float:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(vals) if vals else math.nan


def benchmark(ct, roi, *, out_dir: str | Path, peer: str = "diffdrr", n_cases: int = 10, seed: int = 0,
              mtre_range: tuple[float, float] = (0.0, 20.0), recipe: DiffDRRRecipe | None = None,
              surface=None, renderer=None, cache_dir: str | Path | None = None, check_views: int = 3,
              timing_repeats: int = 3, description: dict | None = None, progress: bool = True) -> dict:
    """Run the side-by-side benchmark against ``peer`` and write ``<out_dir>/peer.json``; returns its content.

    On the same CT, poses and simulated cases (:func:`~.simulation.make_case`, seeds ``seed .. seed+n_cases-1``,
    initial mTRE uniform in ``mtre_range`` mm, as ``ppcreg evaluate``): the normalised cross-correlation of
    both DRRs at the ground-truth views of the first ``check_views`` cases (``drr_ncc``: the lowest), the median
    time of one DRR of the detector (s, after a warm-up, ``timing_repeats`` runs each; ``drr_speed_ratio`` =
    theirs / ours), and both registrations from the same initial estimates to the same X-rays: ours
    (:class:`~.registration.Registration` with the default settings) and DiffDRR's recipe (``recipe``); their
    final mTRE (mm) over the surface points, success below 2 mm and seconds per case (medians).

    Raises:
        InputError: an unknown peer or bad parameters; PeerError: the peer environment or the worker failed.
    """
    from .drr import DRRRenderer
    from .metrics import mtre
    from .registration import Registration, RegistrationConfig, registration_surface
    from .simulation import ViewSampler, make_case

    if peer not in PEERS:
        raise InputError(f"unknown peer {peer!r}: available peers are {', '.join(PEERS)}")
    if int(n_cases) < 1:
        raise InputError(f"the number of cases must be at least 1, got {n_cases}")
    lo, hi = float(mtre_range[0]), float(mtre_range[1])
    if not (0 <= lo <= hi) or not math.isfinite(hi):
        raise InputError(f"the initial mTRE range must satisfy 0 <= lo <= hi (mm), got {lo:g} {hi:g}")
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    recipe = recipe or DiffDRRRecipe()
    env = ensure_peer_env(cache_dir, progress=progress)

    cfg = RegistrationConfig()
    renderer = renderer or DRRRenderer(ct)
    if surface is None:
        surface = registration_surface(ct, roi, cfg)
    targets = surface.points.detach().cpu().to(torch.float64)
    views = ViewSampler()
    cases = [make_case(renderer, targets, int(seed) + i, (lo, hi), views) for i in range(int(n_cases))]
    detector = detector_params(cases[0].projection)
    for c in cases[1:]:
        if detector_params(c.projection) != detector:
            raise InputError("the simulated cases do not share one detector (DiffDRR's DRR module has one)")
    threads = torch.get_num_threads()
    eye = torch.eye(4, dtype=torch.float64)

    # ours: DRRs of the check views, one timed DRR, and the registrations
    checks = [(f"case{i}", cases[i].projection) for i in range(min(int(check_views), len(cases)))]
    ours_drr = {name: renderer.render(p, eye[None])[0].cpu() for name, p in checks}
    ours_drr_s = _median_s(lambda: renderer.render(checks[0][1], eye[None]), int(timing_repeats))
    log(progress, f"our {detector['height']}x{detector['width']} DRR: median {1000 * ours_drr_s:.0f} ms")
    rows: list[dict[str, Any]] = []
    for i, c in enumerate(cases):
        t0 = time.perf_counter()
        res = Registration(ct, c.xray, c.projection, c.T_init, roi, cfg, surface=surface, renderer=renderer).run()
        sec = time.perf_counter() - t0
        err = float(mtre(res.T.double().cpu(), c.T_gt, targets))
        rows.append({"seed": c.seed, "initial_mtre_mm": c.initial_mtre_mm, "ours_mtre_mm": err,
                     "ours_seconds": sec, "ours_status": res.status})
        log(progress, f"ours case {i + 1}/{len(cases)} (seed {c.seed}): {c.initial_mtre_mm:.2f} -> {err:.2f} mm "
                       f"in {sec:.1f} s")

    # theirs, in the peer environment
    folder = Path(tempfile.mkdtemp(prefix="ppcreg-peer-"))
    write_task(folder, mu_volume=renderer.mu_volume, ct=ct, bone_boost=renderer.bone_boost, detector=detector,
               cases=[{"seed": c.seed, "xray": c.xray, "projection": c.projection, "T_init": c.T_init}
                      for c in cases], checks=checks, recipe=recipe, threads=threads,
               timing_repeats=int(timing_repeats))
    log(progress, f"running DiffDRR in {env.path} on {len(cases)} cases (task folder {folder})")
    result = run_worker(env, folder, progress)
    w_from_ct = torch.tensor(json.loads((folder / "task.json").read_text())["world_from_ct"]["matched"],
                             dtype=torch.float64)
    nccs = [ncc(np.load(folder / f"drr_matched_{name}.npy"), ours_drr[name]) for name, _ in checks]
    native = ncc(np.load(folder / f"drr_native_{checks[0][0]}.npy"), ours_drr[checks[0][0]])
    mean_ratio = float(np.load(folder / f"drr_matched_{checks[0][0]}.npy").mean() / ours_drr[checks[0][0]].mean())
    for row, c, pr in zip(rows, cases, result["cases"]):
        T_peer = transform_from_camera_pose(torch.tensor(pr["pose_final"]), c.projection, w_from_ct) \
            if pr["finite"] else None
        row.update(peer_mtre_mm=float(mtre(T_peer, c.T_gt, targets)) if T_peer is not None else math.nan,
                   peer_seconds=float(pr["seconds"]), peer_similarity=pr["final_similarity"],
                   peer_error=pr.get("error"))
    shutil.rmtree(folder, ignore_errors=True)

    peer_drr_s = float(result["timing"]["median_s"])
    ok = lambda key: [r[key] < 2.0 for r in rows]  # noqa: E731  (NaN counts as a failure)
    report = {
        "peer": peer, "versions": result["versions"],
        "install": {"env": str(env.path), "installed_now": env.installed_now, "seconds": env.seconds,
                    "requirements": str(REQUIREMENTS), "pins": len(env.versions)},
        "ct": description or {}, "roi": repr(roi) if roi is not None else "whole CT", "threads": threads,
        "detector": detector, "recipe": asdict(recipe), "seed": int(seed), "n_cases": len(rows),
        "mtre_range": [lo, hi],
        "drr_ncc": min(nccs), "drr_ncc_views": nccs, "drr_ncc_native_density": native,
        "drr_mean_ratio": mean_ratio,
        "drr_seconds_ours": ours_drr_s, "drr_seconds_peer": peer_drr_s, "drr_speed_ratio": peer_drr_s / ours_drr_s,
        "ours_success_2mm": float(np.mean(ok("ours_mtre_mm"))), "peer_success_2mm": float(np.mean(ok("peer_mtre_mm"))),
        "ours_seconds_per_case": _median([r["ours_seconds"] for r in rows]),
        "peer_seconds_per_case": _median([r["peer_seconds"] for r in rows]),
        "initial_mtre_median_mm": _median([r["initial_mtre_mm"] for r in rows]),
        "ours_mtre_median_mm": _median([r["ours_mtre_mm"] for r in rows]),
        "peer_mtre_median_mm": _median([r["peer_mtre_mm"] for r in rows]),
        "cases": rows,
    }
    (out / "peer.json").write_text(json.dumps(_json_safe(report), indent=2), encoding="utf-8")
    return report


def format_table(report: dict) -> str:
    """The side-by-side table of a :func:`benchmark` report (plain text)."""
    v = report.get("versions", {})
    rec = report.get("recipe", {})
    lines = [f"DiffDRR {v.get('diffdrr')} (torch {v.get('torch')}) vs PPCRegistration, {report['threads']} "
             f"thread(s), {report['n_cases']} cases (seeds {report['seed']}..{report['seed'] + report['n_cases'] - 1},"
             f" initial mTRE {report['mtre_range'][0]:g}-{report['mtre_range'][1]:g} mm)",
             f"DRR convention check: NCC {report['drr_ncc']:.4f} (lowest of {len(report['drr_ncc_views'])} views, "
             f"same attenuation; DiffDRR's own HU->density: {report['drr_ncc_native_density']:.4f}; mean ratio "
             f"{report['drr_mean_ratio']:.3f})",
             f"one {report['detector']['height']}x{report['detector']['width']} DRR: ours "
             f"{1000 * report['drr_seconds_ours']:.0f} ms, DiffDRR ({rec.get('renderer')}) "
             f"{1000 * report['drr_seconds_peer']:.0f} ms: ratio {report['drr_speed_ratio']:.1f}x",
             f"DiffDRR recipe: Adam lr {rec.get('lr_rotation'):g} rad / {rec.get('lr_translation'):g} mm, scales "
             f"{', '.join(f'1/{s}' for s in rec.get('scales', []))}, {rec.get('iterations_per_scale')} iterations "
             "each, multi-scale NCC",
             "",
             f"{'seed':>5} {'initial [mm]':>13} {'ours [mm]':>10} {'ours [s]':>9} {'DiffDRR [mm]':>13} "
             f"{'DiffDRR [s]':>12}"]
    f = lambda x, d=2: "-" if x is None or not math.isfinite(x) else f"{x:.{d}f}"  # noqa: E731
    for r in report["cases"]:
        lines.append(f"{r['seed']:>5} {f(r['initial_mtre_mm']):>13} {f(r['ours_mtre_mm']):>10} "
                     f"{f(r['ours_seconds'], 1):>9} {f(r.get('peer_mtre_mm')):>13} {f(r.get('peer_seconds'), 1):>12}")
    lines.append(f"{'median':>5} {f(report['initial_mtre_median_mm']):>13} {f(report['ours_mtre_median_mm']):>10} "
                 f"{f(report['ours_seconds_per_case'], 1):>9} {f(report['peer_mtre_median_mm']):>13} "
                 f"{f(report['peer_seconds_per_case'], 1):>12}")
    lines.append(f"success < 2 mm: ours {100 * report['ours_success_2mm']:.0f} %, DiffDRR "
                 f"{100 * report['peer_success_2mm']:.0f} %")
    return "\n".join(lines)
