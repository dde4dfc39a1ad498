"""Benchmarks of the library's hot paths.  Functions return plain dicts and print nothing (the CLI prints).

DRR benchmark geometry (docs/design.md §2 typical C-arm): SDD 1,200 mm, source-to-isocentre 800 mm, a square
detector 400 mm wide, the isocentre at the volume centre, AP and lateral views from
:func:`~.geometry.carm_pose`.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import torch

from .drr import DRRRenderer, render_reference
from .errors import InputError
from .geometry import Projection, carm_pose
from .volume import Volume

#: (name, LAO/RAO primary angle [deg], CRA/CAU secondary angle [deg]) of the benchmark views
DRR_VIEWS: tuple[tuple[str, float, float], ...] = (("ap", 0.0, 0.0), ("lateral", 90.0, 0.0))


def _timed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, torch.Tensor]:
    """Wall-clock seconds of ``fn()`` (synchronising the GPU) and its result."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, out


def bench_drr(volume: Volume, sizes: Sequence[int] = (128, 256), repeats: int = 5,
              device: torch.device | str = "cpu", *, reference_repeats: int = 1, reference_step_mm: float = 0.5,
              detector_width_mm: float = 400.0, sdd_mm: float = 1200.0, sid_mm: float = 800.0,
              views: Sequence[tuple[str, float, float]] = DRR_VIEWS, num_threads: int | None = None,
              renderer_kwargs: dict | None = None) -> dict:
    """Time :class:`~.drr.DRRRenderer` against :func:`~.drr.render_reference` on one CT, and compare images.

    Args:
        volume: CT in HU.
        sizes: square detector sizes (pixels) to time.
        repeats: timed calls of ``DRRRenderer.render`` per size and view (after one untimed warm-up call, which
            builds the renderer's cache for that view); the median is reported.
        device: where to render.
        reference_repeats: timed calls of the (slow) reference per size and view.
        reference_step_mm: ray-marching step of the reference (mm).
        detector_width_mm, sdd_mm, sid_mm: C-arm geometry (mm).
        views: ``(name, primary_deg, secondary_deg)`` C-arm angles.
        num_threads: if given, ``torch.set_num_threads`` for the run (restored afterwards).
        renderer_kwargs: extra keyword arguments of :class:`~.drr.DRRRenderer`.
    Returns:
        ``{"device", "threads", "volume_shape" (K, J, I), "spacing_mm" (i, j, k), "setup_s" (renderer
        construction), "rows": [...]}`` with one row per (size, view): ``size``, ``view``, ``render_s``
        (median seconds), ``render_first_s`` (the warm-up call), ``reference_s`` (median seconds), ``speedup``,
        ``rel_diff_median`` / ``rel_diff_p95`` (|fast - reference| / reference over pixels where the reference
        exceeds 10 % of its maximum), ``rel_l1`` (sum |fast - reference| / sum reference) and ``max_value``.
    """
    if not isinstance(volume, Volume):
        raise InputError(f"bench_drr needs a volume.Volume (CT in HU), got {type(volume).__name__}")
    if repeats < 1 or reference_repeats < 0:
        raise InputError("repeats must be >= 1 and reference_repeats >= 0")
    dev = torch.device(device)
    old_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(int(num_threads))
    try:
        vol = volume.to(dev)
        setup_s, renderer = _timed(lambda: DRRRenderer(vol, device=dev, **(renderer_kwargs or {})), dev)
        iso = vol.center_world().cpu()
        T = torch.eye(4, dtype=torch.float64, device=dev)[None]
        rows = []
        for size in sizes:
            for name, prim, sec in views:
                pose = carm_pose(prim, sec, sid_mm, iso)
                proj = Projection.from_carm(pose, sdd_mm, size, size, detector_width_mm / size).to(dev)
                first_s, img = _timed(lambda: renderer.render(proj, T), dev)
                times = [_timed(lambda: renderer.render(proj, T), dev)[0] for _ in range(repeats)]
                row = {"size": int(size), "view": name, "render_s": statistics.median(times),
                       "render_first_s": first_s, "max_value": float(img.max())}
                if reference_repeats > 0:
                    ref_times = []
                    for _ in range(reference_repeats):
                        dt, ref = _timed(lambda: render_reference(vol, proj, T, step_mm=reference_step_mm), dev)
                        ref_times.append(dt)
                    body = ref > 0.1 * ref.max()
                    rel = ((img - ref).abs() / ref.clamp_min(1e-12))[body].double()
                    row.update({
                        "reference_s": statistics.median(ref_times),
                        "speedup": statistics.median(ref_times) / max(row["render_s"], 1e-12),
                        "rel_diff_median": float(rel.median()) if rel.numel() else float("nan"),
                        "rel_diff_p95": float(torch.quantile(rel, 0.95)) if rel.numel() else float("nan"),
                        "rel_l1": float((img - ref).abs().sum() / ref.abs().sum().clamp_min(1e-12)),
                    })
                rows.append(row)
        return {"device": str(dev), "threads": torch.get_num_threads(), "volume_shape": tuple(vol.shape),
                "spacing_mm": tuple(float(x) for x in vol.spacing), "setup_s": setup_s, "rows": rows}
    finally:
        torch.set_num_threads(old_threads)
