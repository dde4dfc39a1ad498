"""The DiffDRR side of ``ppcreg bench --peer diffdrr``: runs INSIDE the peer environment (DiffDRR 0.6.1).

A standalone script: it imports only DiffDRR, torch, numpy and the standard library (PPCRegistrationLib and its
dependencies are not in that environment).  :mod:`PPCRegistrationLib.peer` writes a task folder and runs
``<peer python> peer_diffdrr_worker.py <folder>``; this script reads ``<folder>/task.json``, does the work with
DiffDRR's own API and writes ``<folder>/result.json`` (plus the DRRs it rendered as ``.npy``).  Progress lines go
to stdout, prefixed ``[diffdrr]``.

What it does (all poses are given in DiffDRR's convention, computed by ``peer.py``):

* ``subjects``: the CT volumes to build DiffDRR subjects from with :func:`diffdrr.data.read` (``orientation``,
  volume centred on the world origin as DiffDRR does by default).  Each gives a ``.npy`` of voxel values in
  (I, J, K) order and its voxel -> RAS affine.  ``"density": "given"`` replaces DiffDRR's HU -> density mapping
  by the voxel values themselves (attenuation in 1/mm: the same attenuation our renderer integrates);
  ``"density": "hu"`` keeps DiffDRR's own mapping with ``bone_attenuation_multiplier``.  The worker checks that
  DiffDRR's centred affine and its detector re-orientation are the ones ``peer.py`` assumed.
* ``renders``: DRRs of a subject at camera poses (4x4 camera -> DiffDRR world), saved as ``(H, W)`` float32.
* ``timing``: the median wall time (s) of one DRR (no gradient), after warm-up.
* ``cases``: DiffDRR's registration recipe from each initial pose to the given X-ray (the same detector
  pixels): :class:`diffdrr.registration.Registration` with its Euler-angle parameterisation, the multi-scale
  normalised cross-correlation, Adam with separate learning rates for rotation (rad) and translation (mm),
  coarse-to-fine over detector scales (the learning rates halve at each finer scale), a fixed number of
  iterations per scale.  The final pose matrix is written back.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def _say(msg: str) -> None:
    print(f"[diffdrr] {msg}", flush=True)


def _import_torchvision() -> None:
    """Import torchvision, working around its CUDA build next to the CPU torch.

    PyPI's torchvision wheels are CUDA builds: next to the CPU torch wheel their C operators cannot load, and
    torchvision 0.28 then fails on import, registering fake kernels of ``torchvision::nms`` / ``qnms`` without
    checking that the operators exist.  DiffDRR needs only torchvision's pure-Python parts (``gaussian_blur`` in
    ``diffdrr.metrics``, and ``timm``, imported by ``diffdrr.registration``), so when that happens the two operator
    schemas are declared (never called) and the import is retried.
    """
    try:
        import torchvision  # noqa: F401
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
        for name in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[name]
        for op in ("nms", "qnms"):
            torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import torchvision  # noqa: F401,F811
        _say(f"torchvision {torchvision.__version__}: its C operators do not load with this torch (unused here)")


def _versions() -> dict:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for name in ("diffdrr", "torch", "torchvision", "torchio", "numpy", "kornia"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _subject(spec: dict, folder: Path):
    """A DiffDRR subject from a task's subject spec (see the module docstring)."""
    from diffdrr.data import read
    from torchio import ScalarImage

    data = torch.from_numpy(np.load(folder / spec["npy"]).astype(np.float32))[None]  # (1, I, J, K)
    affine = np.asarray(spec["affine_ras"], dtype=np.float64)
    image = ScalarImage(tensor=data, affine=affine)
    subject = read(image, orientation=spec.get("orientation", "AP"),
                   bone_attenuation_multiplier=float(spec.get("bone_attenuation_multiplier", 1.0)))
    if spec.get("density") == "given":
        subject.density.set_data(data.clone())
    centred = np.asarray(subject.volume.affine, dtype=np.float64)
    expected = np.asarray(spec["expected_affine"], dtype=np.float64)
    if np.abs(centred - expected).max() > 1e-3:
        raise RuntimeError(f"DiffDRR centred the volume differently than assumed: affine\n{centred}\nexpected\n"
                           f"{expected}")
    reorient = subject.reorient.numpy().astype(np.float64)
    if np.abs(reorient - np.asarray(spec["reorient"], dtype=np.float64)).max() > 1e-6:
        raise RuntimeError(f"DiffDRR's re-orientation matrix is {reorient.tolist()}, not the assumed one")
    return subject


def _drr(subject, det: dict):
    from diffdrr.drr import DRR

    return DRR(subject, sdd=float(det["sdd"]), height=int(det["height"]), width=int(det["width"]),
               delx=float(det["delx"]), dely=float(det["dely"]), x0=float(det["x0"]), y0=float(det["y0"]),
               renderer=det.get("renderer", "siddon"))


def _pose(matrix) -> "object":
    from diffdrr.pose import RigidTransform

    return RigidTransform(torch.as_tensor(np.asarray(matrix, dtype=np.float32))[None])


def _render(drr, matrix) -> np.ndarray:
    with torch.no_grad():
        img = drr(_pose(matrix))
    return img[0, 0].numpy().astype(np.float32)


def _downsample(img: torch.Tensor, factor: int) -> torch.Tensor:
    """``(1, 1, H, W)`` -> mean over ``factor`` x ``factor`` blocks (the pixels of the coarser detector)."""
    if factor == 1:
        return img
    h, w = img.shape[-2:]
    if h % factor == 0 and w % factor == 0:
        return F.avg_pool2d(img, factor)
    return F.interpolate(img, size=(h // factor, w // factor), mode="area")


def _register(drr, det: dict, case: dict, recipe: dict, folder: Path, label: str) -> dict:
    """DiffDRR's registration recipe from one initial pose; returns its final pose (camera -> world) and time (s)."""
    from diffdrr.metrics import MultiscaleNormalizedCrossCorrelation2d
    from diffdrr.registration import Registration

    xray = torch.from_numpy(np.load(folder / case["xray"]).astype(np.float32))[None, None]
    param, conv = recipe["parameterization"], recipe.get("convention")
    rot, xyz = _pose(case["pose_init"]).convert(param, conv)
    reg = Registration(drr, rot.clone(), xyz.clone(), parameterization=param, convention=conv)
    criterion = MultiscaleNormalizedCrossCorrelation2d(recipe["patch_sizes"], recipe["patch_weights"])
    h, w = int(det["height"]), int(det["width"])
    losses: list[float] = []
    t0 = time.perf_counter()
    for stage, factor in enumerate(recipe["scales"]):
        factor = int(factor)
        drr.set_intrinsics_(height=h // factor, width=w // factor, delx=float(det["delx"]) * factor,
                            dely=float(det["dely"]) * factor)
        target = _downsample(xray, factor)
        lr_scale = 0.5 ** stage
        optimizer = torch.optim.Adam([{"params": [reg.rotation], "lr": float(recipe["lr_rotation"]) * lr_scale},
                                      {"params": [reg.translation], "lr": float(recipe["lr_translation"]) * lr_scale}],
                                     maximize=True)
        n = int(recipe["iterations_per_scale"])
        for _ in range(n):
            optimizer.zero_grad()
            loss = criterion(target, reg())
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach().mean()))
            if not math.isfinite(losses[-1]):
                break
        _say(f"{label}: scale 1/{factor} ({h // factor}x{w // factor} px), {n} iterations, similarity "
             f"{losses[-1]:.4f}")
    seconds = time.perf_counter() - t0
    drr.set_intrinsics_(height=h, width=w, delx=float(det["delx"]), dely=float(det["dely"]))
    with torch.no_grad():
        final = reg.pose.matrix[0].double().numpy()
    return {"seed": case.get("seed"), "pose_final": final.tolist(), "seconds": seconds,
            "final_similarity": losses[-1] if losses else None, "iterations": len(losses),
            "finite": bool(np.isfinite(final).all())}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: peer_diffdrr_worker.py TASK_FOLDER", file=sys.stderr)
        return 2
    folder = Path(argv[0])
    task = json.loads((folder / "task.json").read_text(encoding="utf-8"))
    torch.set_num_threads(int(task.get("threads", 1)))
    _import_torchvision()
    det = task["detector"]
    result: dict = {"versions": _versions(), "threads": torch.get_num_threads(), "renders": {}, "timing": None,
                    "cases": []}
    _say(f"DiffDRR {result['versions']['diffdrr']}, torch {result['versions']['torch']}, "
         f"{result['threads']} threads")
    drrs = {}
    for name, spec in task["subjects"].items():
        t0 = time.perf_counter()
        drrs[name] = _drr(_subject(spec, folder), det)
        _say(f"subject {name!r}: DRR module ready in {time.perf_counter() - t0:.1f} s")
    for item in task.get("renders", []):
        img = _render(drrs[item["subject"]], item["pose"])
        np.save(folder / item["out"], img)
        result["renders"][item["out"]] = {"subject": item["subject"], "shape": list(img.shape)}
    _say(f"rendered {len(task.get('renders', []))} DRRs for the convention check")
    timing = task.get("timing")
    if timing:
        drr = drrs[timing["subject"]]
        for _ in range(int(timing.get("warmup", 1))):
            _render(drr, timing["pose"])
        times = []
        for _ in range(int(timing["repeats"])):
            t0 = time.perf_counter()
            _render(drr, timing["pose"])
            times.append(time.perf_counter() - t0)
        result["timing"] = {"median_s": float(np.median(times)), "times_s": times}
        _say(f"one {det['height']}x{det['width']} DRR: median {1000 * float(np.median(times)):.0f} ms "
             f"of {len(times)}")
    reg_task = task.get("registration")
    if reg_task:
        drr = drrs[reg_task["subject"]]
        cases = reg_task["cases"]
        for i, case in enumerate(cases):
            label = f"case {i + 1}/{len(cases)} (seed {case.get('seed')})"
            t0 = time.perf_counter()
            try:
                out = _register(drr, det, case, reg_task["recipe"], folder, label)
            except Exception as exc:  # noqa: BLE001  (one failed case is a failure of the peer, not of the run)
                out = {"seed": case.get("seed"), "pose_final": None, "seconds": time.perf_counter() - t0,
                       "final_similarity": None, "iterations": 0, "finite": False,
                       "error": f"{type(exc).__name__}: {exc}"}
                _say(f"{label} failed: {out['error']}")
                det_full = dict(height=int(det["height"]), width=int(det["width"]), delx=float(det["delx"]),
                                dely=float(det["dely"]))
                drr.set_intrinsics_(**det_full)
            result["cases"].append(out)
            _say(f"{label} done in {out['seconds']:.1f} s")
            (folder / "result.json").write_text(json.dumps(result), encoding="utf-8")  # partial results
    (folder / "result.json").write_text(json.dumps(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
