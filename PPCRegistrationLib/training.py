"""Training of the learned update operator (DESIGN.md §3): ``flow``, ``ppc-flow`` and ``ppc-flow-attention``.

* ``flow``: FlowNetC trained on the end-point error (EPE, network pixels) of the flow at the contour points.
* ``ppc-flow``: the same network trained end to end through the PPC solve (the *known operator*):
  loss = mTRE(T_est, T_gt) (mm) + ``lambda_epe`` * EPE.
* ``ppc-flow-attention``: as ``ppc-flow``, with PointNet attention predicting the PPC weights.

:func:`operator_step` is the differentiable update of a batch of data set samples (the same computation the
registration does with :class:`~PPCRegistrationLib.networks.LearnedMatcher` and ``solver="plain"``);
:func:`compute_loss` the losses; :func:`train` the loop (Adam, checkpoints with resume, validation curves as
CSV, progress bar, deterministic seeds).
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from .dataset import ShardDataset, sample_projection
from .errors import InputError
from .geometry import centred_update
from .metrics import mtre, reduction_factor
from .networks import CPU_FLOW_HPARAMS, LEARNED_METHODS, LearnedOperator, operator_from_file, save_model
from .ppc import solve_ppc

__all__ = ["TrainConfig", "operator_step", "compute_loss", "validate", "train", "LEARNED_REGULARIZATION"]

#: Tikhonov regularisation of the learned operator's PPC solve (relative to the mean eigenvalue); the
#: registration's ``solver="plain"`` uses ``RegistrationConfig.damping_min``, which has the same value.
LEARNED_REGULARIZATION = 1e-5


@dataclass
class TrainConfig:
    """Training settings (defaults: the paper's optimiser; sizes for a CPU).

    method: one of ``flow``, ``ppc-flow``, ``ppc-flow-attention``.
    iterations: optimiser steps.
    batch_size, lr, weight_decay: Adam on mini-batches (the paper: 16, 1e-4, 1e-6).
    lambda_epe: weight of the EPE (pixels) in the PPC losses (mTRE in mm + lambda * EPE).
    mtre_clip_mm: per-sample mTRE loss is capped there (a wildly wrong update should not dominate a batch).
    grad_clip: gradient-norm clipping (0 = off).
    val_every, val_samples: validation period (steps) and number of validation samples.
    checkpoint_every: checkpoint period (steps).
    init: operator file to start from (fine-tuning, e.g. ``ppc-flow`` from a ``flow`` model): the parameters
        that exist in both are copied.
    flow: FlowNetC hyper-parameters.
    seed: seed of the initialisation and of the batch order.
    device: ``auto``, ``cpu`` or ``cuda``.
    """

    method: str = "ppc-flow-attention"
    iterations: int = 10000
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 1e-6
    lambda_epe: float = 1.0
    mtre_clip_mm: float = 100.0
    grad_clip: float = 10.0
    val_every: int = 250
    val_samples: int = 400
    checkpoint_every: int = 250
    init: str | None = None
    flow: dict = field(default_factory=lambda: dict(CPU_FLOW_HPARAMS))
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.method not in LEARNED_METHODS:
            raise InputError(f"unknown method {self.method!r}: use one of {', '.join(LEARNED_METHODS)}")
        for name in ("iterations", "batch_size", "val_every", "checkpoint_every", "val_samples"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "weight_decay", "lambda_epe", "mtre_clip_mm", "grad_clip"):
            v = float(getattr(self, name))
            if not (v >= 0 and math.isfinite(v)):
                raise InputError(f"{name} must be a non-negative number, got {v}")
        if self.lr <= 0:
            raise InputError("the learning rate must be positive")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise InputError("device 'cuda' was requested but no CUDA GPU is available: use 'cpu' or 'auto'")
        return torch.device(self.device)


def _to(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def operator_step(op: LearnedOperator, batch: Mapping[str, torch.Tensor], *, solve: bool = True,
                  regularization: float = LEARNED_REGULARIZATION) -> dict[str, torch.Tensor]:
    """One learned update of a batch of samples (fields of :mod:`PPCRegistrationLib.dataset`).

    Args:
        op: the operator (on the batch's device).
        batch: stacked samples: ``xray``/``drr`` ``(B, H, W)``, ``uv`` ``(B, N, 2)``, ``mask`` ``(B, N)``, ...
        solve: also solve the PPC system and update the pose (differentiably).
        regularization: of the PPC solve.
    Returns:
        ``uv_matched (B, N, 2)``, ``weights (B, N)``, ``epe (B,)`` (network pixels, mean over the contour
        points) and, when solving, ``T_est (B, 4, 4)``, ``mtre_before (B,)``, ``mtre_after (B,)`` (mm) and
        ``rank_deficient (B,)``.
    """
    mask = batch["mask"]
    pts, grads = batch["points"], batch["gradients"]
    h, w = batch["xray"].shape[-2:]
    proj = sample_projection(batch, h, w)
    src = proj.source
    out = op(batch["drr"], batch["xray"], batch["uv"], mask, pts, grads, src)
    uv_m = out["uv_matched"]
    target = batch["uv"] + batch["flow_gt"]
    mf = mask.to(uv_m.dtype)
    err = torch.linalg.norm(uv_m - target.to(uv_m.dtype), dim=-1)
    epe = (err * mf).sum(-1) / mf.sum(-1).clamp_min(1.0)
    res: dict[str, torch.Tensor] = {"uv_matched": uv_m, "weights": out["weights"], "epe": epe}
    if not solve:
        return res
    rays = proj.ray_directions(uv_m.to(torch.float64))
    wts = out["weights"].to(torch.float64) * mask.to(torch.float64)
    sol = solve_ppc(pts.to(torch.float64), grads.to(torch.float64), src, rays, wts, regularization=regularization)
    T_init = batch["T_init"].to(torch.float64)
    T_est = centred_update(sol.dv, sol.centre, T_init)
    targets = batch["targets"].to(torch.float64)
    res.update(T_est=T_est, mtre_before=mtre(T_init, batch["T_gt"].to(torch.float64), targets),
               mtre_after=mtre(T_est, batch["T_gt"].to(torch.float64), targets), rank_deficient=sol.rank_deficient)
    return res


def compute_loss(method: str, step: Mapping[str, torch.Tensor], lambda_epe: float = 1.0,
                 mtre_clip_mm: float = 100.0) -> torch.Tensor:
    """The training loss of a batch: EPE (``flow``) or mTRE + ``lambda_epe`` * EPE (the PPC models).

    Samples whose PPC system is rank deficient contribute their EPE only; each sample's mTRE is capped at
    ``mtre_clip_mm``.
    """
    epe = step["epe"].mean()
    if method == "flow":
        return epe
    ok = ~step["rank_deficient"]
    m = step["mtre_after"].clamp(max=float(mtre_clip_mm))
    m = torch.where(ok, m, torch.zeros_like(m))
    return m.sum() / ok.sum().clamp_min(1) + float(lambda_epe) * epe.to(m.dtype)


@torch.no_grad()
def validate(op: LearnedOperator, data: ShardDataset, n: int, batch_size: int, device: torch.device) -> dict:
    """Validation numbers over the first ``n`` samples: EPE (network px) and one update's mTRE (mm)."""
    was = op.training
    op.eval()
    epe, before, after = [], [], []
    n = min(n, len(data))
    for i in range(0, n, batch_size):
        batch = _to(_collate([data[j] for j in range(i, min(n, i + batch_size))]), device)
        st = operator_step(op, batch)
        epe.append(st["epe"].cpu())
        before.append(st["mtre_before"].cpu())
        after.append(st["mtre_after"].cpu())
    op.train(was)
    e, b, a = torch.cat(epe).double(), torch.cat(before), torch.cat(after)
    rf = reduction_factor(b, a)
    return {"val_epe": float(e.mean()), "val_mtre_before_mean": float(b.mean()),
            "val_mtre_p50": float(a.median()), "val_mtre_mean": float(a.mean()),
            "val_reduction_factor": float(rf.mean())}


def _collate(samples: list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, str(tmp))
    os.replace(tmp, path)


def _init_from(op: LearnedOperator, path: str, device: torch.device) -> list[str]:
    """Copy the parameters ``op`` shares (same name and shape) with the operator file ``path``."""
    src, _ = operator_from_file(path, device)
    theirs = src.state_dict()
    mine = op.state_dict()
    copied = [k for k in mine if k in theirs and theirs[k].shape == mine[k].shape]
    op.load_state_dict({**mine, **{k: theirs[k] for k in copied}})
    return copied


def train(config: TrainConfig, data_root: str | Path, out_dir: str | Path, *, train_split: str = "train",
          val_split: str = "val", resume: bool = True, progress: bool = True,
          log: Any = print) -> dict:
    """Train one learned operator.

    Writes to ``out_dir``: ``checkpoint.pt`` (every ``checkpoint_every`` steps and at the end; resumed from
    when ``resume``), ``model.pt`` (the operator with the best validation score: mean mTRE after one update for
    the PPC models, EPE for ``flow``), ``model_last.pt``, ``curves.csv`` (one row per validation) and
    ``config.json``.

    Returns:
        ``{"iterations", "best": {...validation numbers...}, "model": path, "seconds"}``.
    """
    cfg = config
    device = cfg.resolved_device()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    train_data = ShardDataset(data_root, train_split)
    val_data = ShardDataset(data_root, val_split, limit=cfg.val_samples)
    h, w = train_data.image_size
    pixel_mm = float(train_data.entry["config"]["detector_width_mm"]) / int(train_data.entry["config"]["detector_px"])
    op = LearnedOperator(cfg.method, network_pixel_mm=pixel_mm, flow=cfg.flow).to(device)
    opt = torch.optim.Adam(op.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    best: dict | None = None
    ckpt_path = out / "checkpoint.pt"
    if resume and ckpt_path.is_file():
        ck = torch.load(str(ckpt_path), map_location=device, weights_only=False)
        if ck.get("config", {}).get("method") != cfg.method:
            raise InputError(f"{ckpt_path} is a checkpoint of {ck.get('config', {}).get('method')!r}, not "
                             f"{cfg.method!r}: use another output folder")
        op.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start = int(ck["iteration"])
        best = ck.get("best")
        log(f"resumed from {ckpt_path} at iteration {start}")
    elif cfg.init:
        copied = _init_from(op, cfg.init, device)
        log(f"initialised {len(copied)} parameter tensors from {cfg.init}")
    (out / "config.json").write_text(json.dumps({**asdict(cfg), "data": str(data_root), "train_split": train_split,
                                                 "val_split": val_split, "train_samples": len(train_data)},
                                                indent=2))
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + start)
    n = len(train_data)
    meta_common = {"method": cfg.method, "data": str(data_root), "train_samples": n,
                   "train_vertebrae": train_data.vertebrae, "val_vertebrae": val_data.vertebrae,
                   "batch_size": cfg.batch_size, "lr": cfg.lr, "weight_decay": cfg.weight_decay,
                   "lambda_epe": cfg.lambda_epe, "device": str(device),
                   "hardware": f"{platform.processor() or platform.machine()} x{os.cpu_count()} "
                               f"torch {torch.__version__} threads {torch.get_num_threads()}"}
    csv_path = out / "curves.csv"
    fields = ["iteration", "train_loss", "train_epe", "train_mtre", "val_epe", "val_mtre_before_mean",
              "val_mtre_p50", "val_mtre_mean", "val_reduction_factor", "seconds"]
    if not csv_path.is_file() or start == 0:
        with csv_path.open("w", newline="") as fh:
            csv.writer(fh).writerow(fields)
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    run_loss = run_epe = run_mtre = 0.0
    run_n = 0
    op.train()
    bar = tqdm(range(start, cfg.iterations), desc=f"train {cfg.method}", unit="it", disable=not progress,
               initial=start, total=cfg.iterations)
    it = start
    for it in bar:
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen).tolist()
        batch = _to(_collate([train_data[j] for j in idx]), device)
        st = operator_step(op, batch, solve=cfg.method != "flow")
        loss = compute_loss(cfg.method, st, cfg.lambda_epe, cfg.mtre_clip_mm)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(op.parameters(), cfg.grad_clip)
        opt.step()
        run_loss += float(loss.detach())
        run_epe += float(st["epe"].mean())
        run_mtre += float(st["mtre_after"].mean()) if "mtre_after" in st else math.nan
        run_n += 1
        if progress:
            bar.set_postfix(loss=f"{run_loss / run_n:.3f}", epe=f"{run_epe / run_n:.2f}px")
        step = it + 1
        if step % cfg.val_every == 0 or step == cfg.iterations:
            v = validate(op, val_data, cfg.val_samples, cfg.batch_size, device)
            row = {"iteration": step, "train_loss": run_loss / run_n, "train_epe": run_epe / run_n,
                   "train_mtre": run_mtre / run_n, **v, "seconds": time.perf_counter() - t0}
            with csv_path.open("a", newline="") as fh:
                csv.writer(fh).writerow([row[f] for f in fields])
            run_loss = run_epe = run_mtre = 0.0
            run_n = 0
            score = v["val_epe"] if cfg.method == "flow" else v["val_mtre_mean"]
            if best is None or score < best["score"]:
                best = {"score": score, "iteration": step, **v}
                save_model(out / "model.pt", op, {**meta_common, "iterations": step, "validation": v})
            log(f"[{step}] loss {row['train_loss']:.3f} val EPE {v['val_epe']:.2f}px mTRE "
                f"{v['val_mtre_before_mean']:.2f} -> {v['val_mtre_mean']:.2f} mm (p50 {v['val_mtre_p50']:.2f})")
        if step % cfg.checkpoint_every == 0 or step == cfg.iterations:
            _atomic_save({"model": op.state_dict(), "optimizer": opt.state_dict(), "iteration": step,
                          "config": asdict(cfg), "best": best}, ckpt_path)
    bar.close()
    save_model(out / "model_last.pt", op, {**meta_common, "iterations": cfg.iterations})
    return {"iterations": cfg.iterations, "best": best, "model": str(out / "model.pt"),
            "seconds": time.perf_counter() - t0}
