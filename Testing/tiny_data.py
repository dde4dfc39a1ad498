"""A tiny data set of the learned operator, generated once per test session from the real sample chest CT.

Used by ``test_dataset.py`` and ``test_training.py`` (not a test module itself). Small on purpose, so that the
tests stay fast on a shared 2-core machine:

* the CT is the sample chest CT cropped to a box around vertebra T8 (its label-map bounding box plus 40 mm
  in-plane and 25 mm along the spine): real HU values and a real label map, ~30x fewer voxels to render;
* 64-pixel windows of a 128-pixel detector (2.97 mm pixels), 64 contour points and 64 targets per sample;
* splits ``train`` (4 samples, 2 shards) and ``val`` (2 samples).
"""

from __future__ import annotations

import math
from pathlib import Path

TINY_VERTEBRAE = ("T8",)
TINY_SPLITS = {"train": (4, 0, 2), "val": (2, 1, 2)}  # name: (samples, seed, shard size)
MARGIN_MM = (40.0, 40.0, 25.0)  # crop margin around the vertebra along i, j, k

_CACHE: dict = {}


def tiny_config():
    from PPCRegistrationLib.dataset import DatasetConfig

    return DatasetConfig(detector_px=128, crop_px=64, max_points=64, n_targets=64, surface_points=600)


def _crop_box(labels, label_id: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    import torch

    idx = torch.nonzero(labels.data == label_id)  # (n, 3) as (k, j, i)
    lo = idx.min(0).values.tolist()[::-1]
    hi = idx.max(0).values.tolist()[::-1]
    spacing = labels.spacing.tolist()
    shape = labels.shape[::-1]
    box_lo = tuple(max(0, int(lo[a] - math.ceil(MARGIN_MM[a] / spacing[a]))) for a in range(3))
    box_hi = tuple(min(shape[a], int(hi[a] + 1 + math.ceil(MARGIN_MM[a] / spacing[a]))) for a in range(3))
    return box_lo, box_hi


def chest_ct(paths: dict) -> dict:
    """The cropped sample chest CT (``ct``), its label map (``labels``), the ROI of T8 (``rois``), a renderer and
    T8's surface points with the tiny configuration (``surface``); computed once."""
    if "ct" not in _CACHE:
        from PPCRegistrationLib import io, roi
        from PPCRegistrationLib.drr import DRRRenderer
        from PPCRegistrationLib.features import extract_surface_points
        from PPCRegistrationLib.sample_data import vertebra_label_id

        ct_full = io.read_volume(str(paths["ct"]))
        labels_full = io.read_label_map(str(paths["labels"]), reference=ct_full)
        lo, hi = _crop_box(labels_full, vertebra_label_id("T8"))
        ct, labels = ct_full.crop(lo, hi), labels_full.crop(lo, hi)
        rois = {v: roi.roi_from_vertebra(labels, v) for v in TINY_VERTEBRAE}
        cfg = tiny_config()
        surface = extract_surface_points(ct, rois["T8"], bone_threshold_hu=cfg.bone_threshold_hu,
                                         budget=cfg.surface_points, seed=0)
        _CACHE["ct"] = {"ct": ct, "labels": labels, "renderer": DRRRenderer(ct), "rois": rois, "surface": surface}
    return _CACHE["ct"]


def chest_ct_files(tmp_path_factory, paths: dict) -> dict:
    """The cropped CT and label map as NRRD files (for the command line): ``{"ct": Path, "labels": Path}``."""
    if "files" not in _CACHE:
        from PPCRegistrationLib import io

        c = chest_ct(paths)
        folder = tmp_path_factory.mktemp("chest_t8")
        _CACHE["files"] = {"ct": io.write_volume(folder / "ct_t8.nrrd", c["ct"]),
                           "labels": io.write_volume(folder / "labels_t8.nrrd", c["labels"])}
    return _CACHE["files"]


def tiny_dataset(tmp_path_factory, paths: dict) -> Path:
    """The folder of the tiny data set (splits ``train`` and ``val``), generated on first use."""
    if "root" not in _CACHE:
        from PPCRegistrationLib.dataset import generate_split

        c = chest_ct(paths)
        root = tmp_path_factory.mktemp("tiny_ds")
        for split, (n, seed, shard) in TINY_SPLITS.items():
            generate_split(root, split, c["ct"], c["rois"], n, seed=seed, shard_size=shard, config=tiny_config(),
                           source={"ct": f"{paths['ct']} (cropped to T8)", "labels": str(paths["labels"])},
                           progress=False, renderer=c["renderer"])
        _CACHE["root"] = root
    return _CACHE["root"]
