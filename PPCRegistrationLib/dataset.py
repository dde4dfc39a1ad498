"""Training data for the learned update operator (docs/design.md §3, §6): simulated samples cached on disk.

A *sample* is one update problem: a random C-arm view of one vertebra, the X-ray simulated at the ground truth
``T_gt`` (with the realistic variation of :mod:`PPCRegistrationLib.simulation`), the DRR rendered at a random
initial estimate ``T_init`` (initial mTRE uniform in a range, [0, 45] mm by default), the contour points at
``T_init`` and their ground-truth flow. Everything is on the *network grid*: a window of ``crop_px`` pixels of a
detector of ``detector_px`` pixels over ``detector_width_mm`` (128 of 256 px over 380 mm = 1.48 mm pixels by
default) around the vertebra, as the registration renders it; training never renders.

On-disk format (version 1, documented in docs/dataset.md)::

    ROOT/manifest.json            {"format", "version", "splits": {split: {...}}}
    ROOT/<split>/split.json       the split's settings (checked when generation resumes)
    ROOT/<split>/shard_00000.pt   torch.save of a dict of stacked tensors (samples i*S .. i*S+S-1)

Sample fields (shapes for one sample; a shard stacks them along a new first dimension):

=============== ============== ====================================================================
``xray``        (H, W) f32     simulated X-ray at T_gt, attenuation-positive
``drr``         (H, W) f32     DRR at T_init (same renderer, no variation)
``K``           (3, 3) f64     intrinsics of the network grid (pixels)
``R``, ``t``    (3, 3), (3,)   world -> camera (mm)
``T_init``      (4, 4) f64     initial estimate (moves the CT, mm)
``T_gt``        (4, 4) f64     ground truth
``points``      (N, 3) f64     contour points at T_init (moved, world mm), padded
``gradients``   (N, 3) f64     their rotated 3D gradients (HU/mm), padded
``uv``          (N, 2) f32     projections of ``points`` (network pixels)
``flow_gt``     (N, 2) f32     projection under T_gt T_init^-1 minus ``uv`` (network pixels)
``mask``        (N,) bool      real (non-padding) contour points
``targets``     (M, 3) f64     mTRE target points in CT coordinates (surface points of the vertebra)
``initial_mtre`` () f64        mTRE(T_init, T_gt) over the vertebra's surface points (mm)
``vertebra``    () int64       index into the split's ``vertebrae`` list in the manifest
=============== ============== ====================================================================

Generation is deterministic (sample ``j`` of a split uses seed ``seed * 1_000_003 + j``), shows a progress bar,
writes each shard atomically and resumes: shards already on disk are kept.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from .drr import DRRRenderer
from .errors import InputError
from .features import SurfacePoints, contour_mask, extract_surface_points
from .geometry import Projection, invert_rigid, transform_points
from .metrics import mtre
from .geometry import crop_projection
from .simulation import ViewSampler, XRayVariation, _uniform, random_initial_transform, simulate_xray
from .volume import Volume

__all__ = ["DATASET_FORMAT", "DATASET_VERSION", "DatasetConfig", "make_sample", "generate_split",
           "ShardDataset", "read_manifest", "sample_projection", "FIELDS", "flip_samples", "zoom_samples"]

DATASET_FORMAT = "PPCRegistrationLib.dataset"
DATASET_VERSION = 1
FIELDS = ("xray", "drr", "K", "R", "t", "T_init", "T_gt", "points", "gradients", "uv", "flow_gt", "mask",
          "targets", "initial_mtre", "vertebra")


@dataclass
class DatasetConfig:
    """How samples are drawn (units in the names).

    detector_px, detector_width_mm: the simulated C-arm's detector (square); its pixel is the network grid's.
    crop_px: the sample's window: crop_px x crop_px detector pixels centred on the projection of the
        vertebra at T_init (clamped to the detector), as the registration renders a window around the region.
    mtre_range_mm: initial mTRE drawn uniformly in it.
    max_points: contour points kept per sample (a random subset when there are more; padding when fewer).
    n_targets: mTRE target points stored per sample (a fixed subset of the vertebra's surface points).
    contour_theta_deg: contour angle (as the registration's).
    surface_points: budget of surface points per vertebra (as the registration's ``n_points``).
    primary_deg, secondary_deg: ranges of the C-arm angles.
    """

    detector_px: int = 256
    detector_width_mm: float = 380.0
    crop_px: int = 128
    mtre_range_mm: tuple[float, float] = (0.0, 45.0)
    max_points: int = 384
    n_targets: int = 256
    contour_theta_deg: float = 6.0
    surface_points: int = 2000
    bone_threshold_hu: float = 150.0
    primary_deg: tuple[float, float] = (-90.0, 90.0)
    secondary_deg: tuple[float, float] = (-30.0, 30.0)

    def views(self) -> ViewSampler:
        return ViewSampler(primary_deg=tuple(self.primary_deg), secondary_deg=tuple(self.secondary_deg),
                           detector_size_px=int(self.detector_px), detector_width_mm=float(self.detector_width_mm))


def sample_projection(sample: Mapping[str, torch.Tensor], height: int, width: int) -> Projection:
    """The :class:`Projection` (batch B) of a sample or a batch of samples (``K (B,3,3)`` or ``(3,3)``)."""
    K, R, t = sample["K"], sample["R"], sample["t"]
    if K.ndim == 2:
        K, R, t = K[None], R[None], t[None]
    K = K.to(torch.float64)
    # spacing / SDD: only ratios matter here (abs: a mirrored sample, see flip_samples, has a negative focal length)
    ps = torch.stack([1.0 / K[:, 0, 0].abs(), 1.0 / K[:, 1, 1].abs()], -1)
    return Projection(K, R.to(torch.float64), t.to(torch.float64), int(height), int(width), ps)


def flip_samples(batch: Mapping[str, torch.Tensor], flip_u: torch.Tensor, flip_v: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mirror samples on the detector (data augmentation), keeping their geometry exact.

    Mirroring the images left-right maps pixel u to ``W - 1 - u``; the same rays then belong to the intrinsics
    ``K`` with ``f_u -> -f_u`` and ``c_u -> W - 1 - c_u`` (likewise for v), so the contour points, their flow, the
    3D data and the PPC solve stay consistent (a mirrored detector). A left-right plus up-down flip is a rotation of
    the detector by 180 degrees.

    Args:
        batch: stacked samples (fields of this module; ``xray``/``drr`` ``(B, H, W)``, ``uv``/``flow_gt``
            ``(B, N, 2)``, ``K`` ``(B, 3, 3)``); other fields are passed through.
        flip_u, flip_v: ``(B,)`` bool, which samples to mirror left-right / up-down.
    Returns:
        A new dict (the input is not modified).
    """
    out = dict(batch)
    h, w = batch["xray"].shape[-2:]
    K = batch["K"].clone()
    uv = batch["uv"].clone()
    flow = batch["flow_gt"].clone()
    for axis, flip, size in ((0, flip_u, w), (1, flip_v, h)):
        f = flip.to(torch.bool).to(K.device)
        if not bool(f.any()):
            continue
        img_dim = 2 if axis == 0 else 1
        for name in ("xray", "drr"):
            img = out[name]
            out[name] = torch.where(f[:, None, None], img.flip(img_dim), img)
        K[f, axis, axis] = -K[f, axis, axis]
        K[f, axis, 2] = (size - 1) - K[f, axis, 2]
        uv[f, :, axis] = (size - 1) - uv[f, :, axis]
        flow[f, :, axis] = -flow[f, :, axis]
    out.update(K=K, uv=uv, flow_gt=flow)
    return out


def zoom_samples(batch: Mapping[str, torch.Tensor], scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """Magnify samples about the window centre (data augmentation), keeping their geometry exact.

    Pixel u maps to ``c + s (u - c)`` (c the window centre, s >= 1): the rays then belong to the intrinsics
    ``A K`` with ``A = [[s, 0, (1 - s) c_u], [0, s, (1 - s) c_v], [0, 0, 1]]``, as if the detector pixels were
    ``s`` times smaller (or the anatomy larger). Images are resampled bilinearly; the flow is scaled by ``s``;
    contour points that leave the window are masked out.

    Args:
        batch: stacked samples (fields of this module); other fields are passed through.
        scale: ``(B,)`` magnification factors, each >= 1 (1 = unchanged).
    Returns:
        A new dict (the input is not modified).
    """
    s_ = scale.to(torch.float64).reshape(-1)
    if bool((s_ < 1).any()) or not bool(torch.isfinite(s_).all()):
        raise InputError("zoom factors must be finite and >= 1 (a smaller image would need padding)")
    out = dict(batch)
    h, w = batch["xray"].shape[-2:]
    c = torch.tensor([(w - 1) / 2.0, (h - 1) / 2.0], dtype=torch.float64)
    b = s_.shape[0]
    # output pixel p samples the input at c + (p - c) / s; grid_sample's [-1, 1] coordinates of that are
    # (p - c) / (s c), c being also the half-size of the window (align_corners=True)
    v, u = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    pix = torch.stack([u, v], -1)[None]  # (1, H, W, 2)
    grid = (pix - c) / (s_[:, None, None, None] * c)
    for name in ("xray", "drr"):
        img = batch[name]
        z = torch.nn.functional.grid_sample(img[:, None].to(torch.float64), grid, mode="bilinear",
                                            padding_mode="border", align_corners=True)[:, 0].to(img.dtype)
        out[name] = torch.where((s_ != 1)[:, None, None], z, img)
    A = torch.zeros(b, 3, 3, dtype=torch.float64)
    A[:, 0, 0] = s_
    A[:, 1, 1] = s_
    A[:, 0, 2] = (1 - s_) * c[0]
    A[:, 1, 2] = (1 - s_) * c[1]
    A[:, 2, 2] = 1
    out["K"] = (A @ batch["K"].to(torch.float64)).to(batch["K"].dtype)
    uv = c + (batch["uv"].to(torch.float64) - c) * s_[:, None, None]
    out["uv"] = uv.to(batch["uv"].dtype)
    out["flow_gt"] = (batch["flow_gt"].to(torch.float64) * s_[:, None, None]).to(batch["flow_gt"].dtype)
    inside = (uv[..., 0] >= 0) & (uv[..., 0] <= w - 1) & (uv[..., 1] >= 0) & (uv[..., 1] <= h - 1)
    out["mask"] = batch["mask"] & inside
    return out


def make_sample(renderer: DRRRenderer, surface: SurfacePoints, seed: int, config: DatasetConfig,
                variation: XRayVariation | None = None, vertebra: int = 0) -> dict[str, torch.Tensor]:
    """One training sample (see the module docstring for the fields) of the vertebra whose surface points are
    ``surface``; reproducible from ``seed``."""
    cfg = config
    pts = surface.points.detach().cpu().to(torch.float64)
    grads = surface.gradients.detach().cpu().to(torch.float64)
    gen = torch.Generator().manual_seed(int(seed))
    full, view = cfg.views().sample(pts.mean(0), gen)
    T_gt = torch.eye(4, dtype=torch.float64)
    T_init = random_initial_transform(T_gt, pts, _uniform(gen, *cfg.mtre_range_mm), gen)
    # the window the registration renders: crop_px x crop_px detector pixels around the region at T_init
    c = int(cfg.crop_px)
    uv0 = full.project(transform_points(T_init, pts)[None])[0].mean(0)
    u0 = int(min(max(round(float(uv0[0]) - c / 2), 0), full.width - c))
    v0 = int(min(max(round(float(uv0[1]) - c / 2), 0), full.height - c))
    proj = crop_projection(full, u0, v0, c, c)
    dev = renderer.device
    xray = simulate_xray(renderer, proj.to(dev), T_gt.to(dev), seed=int(torch.randint(0, 2**31 - 1, (), generator=gen)),
                         variation=variation)
    drr = renderer.render(proj.to(dev), T_init[None].to(dev))[0].detach().cpu().float()
    gen = torch.Generator().manual_seed(int(seed) + 17)
    mask = contour_mask(pts[None], grads[None], proj.source, T_init[None], theta_deg=cfg.contour_theta_deg)[0]
    w = transform_points(T_init, pts)
    g = grads @ T_init[:3, :3].T
    uv = proj.project(w[None])[0]
    h = wd = c
    inside = (uv[:, 0] >= 1) & (uv[:, 0] <= wd - 2) & (uv[:, 1] >= 1) & (uv[:, 1] <= h - 2)
    idx = torch.nonzero(mask & inside).flatten()
    n = int(cfg.max_points)
    if idx.numel() > n:
        idx = idx[torch.randperm(idx.numel(), generator=gen)[:n]]
    k = int(idx.numel())
    w_gt = transform_points(T_gt @ invert_rigid(T_init), w[idx])
    flow = proj.project(w_gt[None])[0] - uv[idx]
    out_pts = torch.zeros(n, 3, dtype=torch.float64)
    out_g = torch.zeros(n, 3, dtype=torch.float64)
    out_uv = torch.zeros(n, 2, dtype=torch.float32)
    out_flow = torch.zeros(n, 2, dtype=torch.float32)
    out_mask = torch.zeros(n, dtype=torch.bool)
    out_pts[:k], out_g[:k], out_uv[:k], out_flow[:k], out_mask[:k] = w[idx], g[idx], uv[idx].float(), \
        flow.float(), True
    if 0 < k < n:  # padding repeats a real point (finite, non-degenerate), masked out
        out_pts[k:], out_g[k:], out_uv[k:] = out_pts[0], out_g[0], out_uv[0]
    t_idx = torch.linspace(0, pts.shape[0] - 1, min(int(cfg.n_targets), pts.shape[0])).round().long()
    targets = pts[t_idx]
    if targets.shape[0] < cfg.n_targets:
        targets = torch.cat([targets, targets[: cfg.n_targets - targets.shape[0]]])
    return {"xray": xray.float().reshape(h, wd), "drr": drr.reshape(h, wd), "K": proj.K[0], "R": proj.R[0],
            "t": proj.t[0], "T_init": T_init, "T_gt": T_gt, "points": out_pts, "gradients": out_g, "uv": out_uv,
            "flow_gt": out_flow, "mask": out_mask, "targets": targets,
            "initial_mtre": mtre(T_init, T_gt, pts).to(torch.float64),
            "vertebra": torch.tensor(int(vertebra), dtype=torch.int64)}


def read_manifest(root: str | Path) -> dict:
    """The manifest of a data set directory (``{"format", "version", "splits": {...}}``)."""
    p = Path(root) / "manifest.json"
    if not p.is_file():
        raise InputError(f"{root} is not a PPCRegistration data set (no manifest.json): create it with "
                         "`ppcreg make-dataset`")
    try:
        man = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{p} is not readable JSON ({exc}): regenerate the data set") from exc
    if man.get("format") != DATASET_FORMAT:
        raise InputError(f"{p} is not a {DATASET_FORMAT} manifest")
    if man.get("version") != DATASET_VERSION:
        raise InputError(f"{p} has data set version {man.get('version')!r}; this library reads version "
                         f"{DATASET_VERSION}: regenerate the data set")
    return man


def generate_split(root: str | Path, split: str, ct: Volume, rois: Mapping[str, Any], n_samples: int, *,
                   seed: int = 0, shard_size: int = 200, config: DatasetConfig | None = None,
                   variation: XRayVariation | None = None, source: Mapping[str, Any] | None = None,
                   progress: bool = True, renderer: DRRRenderer | None = None,
                   part: tuple[int, int] = (0, 1)) -> dict:
    """Generate (or resume) one split of a data set.

    Args:
        root: data set directory (created).
        split: split name (``train``, ``val``, ``test``...), a folder of ``root``.
        ct: the CT (HU).
        rois: vertebra name -> region of interest; sample ``j`` uses vertebra ``j % len(rois)``.
        n_samples: number of samples of the split.
        seed: the split's seed (sample ``j`` uses ``seed * 1_000_003 + j``).
        shard_size: samples per shard file.
        config: :class:`DatasetConfig` (must equal the one of shards already on disk).
        variation: X-ray appearance variation (default :class:`XRayVariation`).
        source: free description of the data (paths of the CT and labels), stored in the manifest.
        progress: tqdm progress bar (stderr).
        renderer: a DRR renderer of ``ct`` (default: built here).
        part: ``(k, m)``: this process makes only the shards ``i`` with ``i % m == k``, so that ``m`` processes
            can generate one split side by side (the samples do not depend on who makes them).
    Returns:
        the split's manifest entry.
    Raises:
        InputError: bad arguments, or a split already on disk generated with other settings.
    """
    if n_samples < 1:
        raise InputError(f"the number of samples must be at least 1, got {n_samples}")
    if shard_size < 1:
        raise InputError(f"the shard size must be at least 1, got {shard_size}")
    if not rois:
        raise InputError("give at least one vertebra (region of interest) to sample")
    if not split or "/" in split or split.startswith("."):
        raise InputError(f"bad split name {split!r}")
    cfg = config or DatasetConfig()
    root = Path(root)
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    if (root / "manifest.json").exists():
        read_manifest(root)  # a foreign or newer manifest is an error, not something to overwrite
    names = list(rois)
    entry = {"n_samples": int(n_samples), "shard_size": int(shard_size), "seed": int(seed), "vertebrae": names,
             "config": _json(asdict(cfg)), "variation": _json(asdict(variation or XRayVariation())),
             "source": _json(dict(source or {})), "shards": []}
    keys = ("n_samples", "shard_size", "seed", "vertebrae", "config", "variation")
    settings = folder / "split.json"
    if settings.is_file():
        old = json.loads(settings.read_text())
        if {k: old.get(k) for k in keys} != {k: entry[k] for k in keys}:
            raise InputError(f"split {split!r} of {root} was generated with other settings "
                             f"({ {k: old.get(k) for k in keys} }); use another folder or split name, or delete "
                             f"{folder} to regenerate it")
    else:
        settings.write_text(json.dumps({k: v for k, v in entry.items() if k != "shards"}, indent=2))
    renderer = renderer or DRRRenderer(ct)
    surfaces = {}
    for name in names:
        s = extract_surface_points(ct, rois[name], bone_threshold_hu=cfg.bone_threshold_hu,
                                   budget=cfg.surface_points, seed=0)
        if len(s) < 6:
            raise InputError(f"vertebra {name}: only {len(s)} surface points; is it in the CT?")
        surfaces[name] = s
    n_shards = math.ceil(n_samples / shard_size)
    from tqdm.auto import tqdm

    def shard_name(i: int) -> str:
        return f"shard_{i:05d}.pt"

    k_part, m_part = int(part[0]), int(part[1])
    if not 0 <= k_part < m_part:
        raise InputError(f"part must be (k, m) with 0 <= k < m, got {part}")
    todo = [i for i in range(n_shards)  # resume: shards are written atomically, a finished one is kept
            if i % m_part == k_part and not (folder / shard_name(i)).is_file()]
    total = sum(min(shard_size, n_samples - i * shard_size) for i in todo)
    bar = tqdm(total=total, desc=f"make-dataset {split}", unit="sample", disable=not progress)

    def publish() -> None:
        entry["shards"] = [shard_name(i) for i in range(n_shards) if (folder / shard_name(i)).is_file()]
        _update_manifest(root, split, entry)

    publish()
    for i in todo:
        samples = []
        for j in range(i * shard_size, min(n_samples, (i + 1) * shard_size)):
            v = j % len(names)
            samples.append(make_sample(renderer, surfaces[names[v]], seed * 1_000_003 + j, cfg, variation, v))
            bar.update(1)
        shard = {k: torch.stack([s[k] for s in samples]) for k in FIELDS}
        tmp = folder / (shard_name(i) + f".tmp{os.getpid()}")
        torch.save(shard, str(tmp))
        os.replace(tmp, folder / shard_name(i))
        publish()
    bar.close()
    return entry


def _update_manifest(root: Path, split: str, entry: dict) -> None:
    """Re-read the manifest and set one split's entry (several splits may be generated side by side)."""
    p = root / "manifest.json"
    try:
        man = json.loads(p.read_text()) if p.is_file() else None
    except json.JSONDecodeError:
        man = None
    if not isinstance(man, dict) or man.get("format") != DATASET_FORMAT:
        man = {"format": DATASET_FORMAT, "version": DATASET_VERSION, "splits": {}}
    man.setdefault("splits", {})[split] = entry
    tmp = root / f"manifest.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(man, indent=2))
    os.replace(tmp, p)


def _json(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


class ShardDataset(torch.utils.data.Dataset):
    """A split of a data set on disk, as a map-style torch Dataset of sample dicts (fields: :data:`FIELDS`).

    All shards are loaded into memory at construction (a 128 px sample is ~0.15 MB).

    Args:
        root: data set directory.
        split: split name, or several comma-separated splits of the same detector and window (e.g.
            ``train,train2``: more samples generated later with another seed), used as one.
        limit: use only the first ``limit`` samples (None = all).
    Raises:
        InputError: no manifest, unknown or incomplete split, unreadable shard, splits that do not fit together.
    """

    def __init__(self, root: str | Path, split: str, limit: int | None = None) -> None:
        self.root = Path(root)
        names = [s.strip() for s in str(split).split(",") if s.strip()]
        if len(names) > 1:
            self._join(names, limit)
            return
        man = read_manifest(self.root)
        if split not in man["splits"]:
            raise InputError(f"{root} has no split {split!r}; it has {sorted(man['splits'])}")
        self.entry = man["splits"][split]
        self.split = split
        shards = sorted(self.entry.get("shards", []))
        if not shards:
            raise InputError(f"split {split!r} of {root} has no finished shard yet: run `ppcreg make-dataset`")
        data: dict[str, list[torch.Tensor]] = {k: [] for k in FIELDS}
        count = 0
        for s in shards:
            p = self.root / split / s
            try:
                shard = torch.load(str(p), map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001
                raise InputError(f"cannot read {p} ({type(exc).__name__}: {exc}); delete it and run "
                                 "`ppcreg make-dataset` again to regenerate it") from exc
            missing = [k for k in FIELDS if k not in shard]
            if missing:
                raise InputError(f"{p} lacks fields {missing}: regenerate the data set")
            for k in FIELDS:
                data[k].append(shard[k])
            count += int(shard["xray"].shape[0])
            if limit is not None and count >= limit:
                break
        self.data = {k: torch.cat(v) for k, v in data.items()}
        n = int(self.data["xray"].shape[0])
        self.n = n if limit is None else min(n, int(limit))
        self.complete = len(shards) * int(self.entry["shard_size"]) >= int(self.entry["n_samples"])

    def _join(self, names: list[str], limit: int | None) -> None:
        parts = [ShardDataset(self.root, n) for n in names]
        keys = ("detector_px", "detector_width_mm", "crop_px")
        first = parts[0].entry["config"]
        for n, part in zip(names[1:], parts[1:]):
            if any(part.entry["config"].get(k) != first.get(k) for k in keys) or part.image_size != parts[0].image_size:
                raise InputError(f"split {n!r} of {self.root} has another detector or window than {names[0]!r} "
                                 f"({', '.join(keys)}): it cannot be used together with it")
        vertebrae: list[str] = []
        for part in parts:
            vertebrae += [v for v in part.vertebrae if v not in vertebrae]
        data: dict[str, list[torch.Tensor]] = {k: [] for k in FIELDS}
        for part in parts:
            remap = torch.tensor([vertebrae.index(v) for v in part.vertebrae], dtype=torch.int64)
            for k in FIELDS:
                v = part.data[k][:part.n]
                data[k].append(remap[v] if k == "vertebra" else v)
        self.data = {k: torch.cat(v) for k, v in data.items()}
        self.entry = {**parts[0].entry, "vertebrae": vertebrae, "n_samples": sum(p.n for p in parts),
                      "splits": names}
        self.split = ",".join(names)
        n = int(self.data["xray"].shape[0])
        self.n = n if limit is None else min(n, int(limit))
        self.complete = all(p.complete for p in parts)

    @property
    def vertebrae(self) -> list[str]:
        return list(self.entry["vertebrae"])

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.data["xray"].shape[-2:])  # type: ignore[return-value]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return {k: v[i] for k, v in self.data.items()}
