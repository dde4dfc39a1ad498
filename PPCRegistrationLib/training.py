"""Training of the learned update operator (docs/design.md §3): ``flow``, ``ppc-flow`` and ``ppc-flow-attention``.

* ``flow``: FlowNetC trained on the end-point error (EPE, network pixels) of the flow at the contour points.
* ``ppc-flow``: the same network trained end to end through the PPC solve (the *known operator*):
  loss = mTRE(T_est, T_gt) (mm) + ``lambda_epe`` * EPE.
* ``ppc-flow-attention``: as ``ppc-flow``, with PointNet attention predicting the PPC weights.

:func:`operator_step` is the differentiable update of a batch of data set samples (the same computation the
registration does with :class:`~PPCRegistrationLib.networks.LearnedMatcher` and ``solver="plain"``);
:func:`compute_loss` the losses; :func:`train` the loop (Adam, checkpoints with resume, validation curves as
CSV and PNG, progress bar, deterministic seeds).

The parts of a run live in their own modules: :mod:`.train_config` (:class:`TrainConfig`), :mod:`.losses`
(:func:`compute_loss`), :mod:`.checkpoints` (checkpoint files, starting from an operator file), :mod:`.curves`
(``curves.csv`` and :func:`plot_curves`) and :mod:`.distributed` (torchrun); their public names are importable
from here too.

**Several GPUs / nodes.** Launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment), :func:`train` joins
the process group (``nccl`` on CUDA, ``gloo`` on the CPU), wraps the operator in DistributedDataParallel and
gives every rank its own slice of each batch: all ranks draw the same ``batch_size`` sample indices from the
same seeded generator and rank r trains on indices ``r, r + W, r + 2W, ...`` (W = world size). The effective
(global) batch is therefore ``batch_size`` whatever the number of processes (each rank computes about
``batch_size / W`` samples); the gradients are averaged over the ranks. Only rank 0 validates and writes files
(checkpoint, CSV, PNG, models); a checkpoint is read by rank 0 and broadcast, so the ranks of several nodes
need no shared folder. On CUDA, rank r uses the GPU ``LOCAL_RANK``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Mapping

import torch

from .checkpoints import _atomic_save, _init_from, _load_checkpoint
from .curves import CURVE_FIELDS, _truncate_curves, plot_curves
from .dataset import ShardDataset, flip_samples, sample_projection, zoom_samples
from .distributed import DistInfo, _all_sum, _on_main, distributed_env, init_distributed
from .errors import InputError
from .learned_operator import LearnedOperator
from .losses import compute_loss
from .metrics import mrpd, mtre, reduction_factor
from .model_files import save_model
from .solvers import PlainSolver
from .train_config import TrainConfig
from .update import UpdateState, match, ppc_update

__all__ = ["TrainConfig", "operator_step", "compute_loss", "validate", "train", "LEARNED_REGULARIZATION",
           "plot_curves", "DistInfo", "distributed_env", "init_distributed", "CURVE_FIELDS"]

#: Tikhonov regularisation of the learned operator's PPC solve (relative to the mean eigenvalue); the
#: registration's ``solver="plain"`` uses ``RegistrationConfig.damping_min``, which has the same value.
LEARNED_REGULARIZATION = 1e-5


def _to(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def operator_step(op: LearnedOperator, batch: Mapping[str, torch.Tensor], *, solve: bool = True,
                  regularization: float = LEARNED_REGULARIZATION,
                  out_of_plane: float = 1.0) -> dict[str, torch.Tensor]:
    """One learned update of a batch of samples (fields of :mod:`PPCRegistrationLib.dataset`).

    Args:
        op: the operator (on the batch's device).
        batch: stacked samples: ``xray``/``drr`` ``(B, H, W)``, ``uv`` ``(B, N, 2)``, ``mask`` ``(B, N)``, ...
        solve: also solve the PPC system and update the pose (differentiably).
        regularization: of the PPC solve.
        out_of_plane: damping of the out-of-plane directions in the PPC solve (0 = none).
    Returns:
        ``uv_matched (B, N, 2)``, ``weights (B, N)``, ``epe (B,)`` (network pixels, mean over the contour
        points) and, when solving, ``T_est (B, 4, 4)``, ``mtre_before (B,)``, ``mtre_after (B,)`` (mm) and
        ``rank_deficient (B,)``.
    """
    mask = batch["mask"]
    h, w = batch["xray"].shape[-2:]
    state = UpdateState(T=batch["T_init"].to(torch.float64), points=batch["points"], gradients=batch["gradients"],
                        uv=batch["uv"], mask=mask, projection=sample_projection(batch, h, w), drr=batch["drr"],
                        xray=batch["xray"])
    matcher = OperatorMatcher(op)
    if solve:  # the same update operator as the registration loop's (update.ppc_update), with the plain solve
        upd = ppc_update(state, matcher, PlainSolver(out_of_plane, regularization))
        uv_m, weights = upd.uv_matched, upd.match_weights
    else:
        uv_m, weights = match(state, matcher)
    target = batch["uv"] + batch["flow_gt"]
    mf = mask.to(uv_m.dtype)
    err = torch.linalg.norm(uv_m - target.to(uv_m.dtype), dim=-1)
    epe = (err * mf).sum(-1) / mf.sum(-1).clamp_min(1.0)
    res: dict[str, torch.Tensor] = {"uv_matched": uv_m, "weights": weights, "epe": epe}
    if not solve:
        return res
    T_init, T_est = state.T, upd.T
    targets = batch["targets"].to(torch.float64)
    T_gt = batch["T_gt"].to(torch.float64)
    res.update(T_est=T_est, mtre_before=mtre(T_init, T_gt, targets), mtre_after=mtre(T_est, T_gt, targets),
               mrpd_after=mrpd(T_est, T_gt, targets, state.projection),
               rank_deficient=upd.solve.solution.rank_deficient)
    return res


class OperatorMatcher:
    """A :class:`~PPCRegistrationLib.networks.LearnedOperator` as the matcher of :func:`~.update.ppc_update` in
    training: the data set's windows are already on the network's grid, the flow is the network's single pass, and
    the attention weighs every point of the mask (the registration loop uses
    :class:`~PPCRegistrationLib.networks.LearnedMatcher`, which reduces its windows and averages mirrorings)."""

    def __init__(self, op: LearnedOperator) -> None:
        self.op = op

    def __call__(self, drr, xray, drr_grad, xray_grad, uv, normals, mask, search_px, context):
        out = self.op(drr, xray, uv, mask, context["points_3d"], context["gradients_3d"], context["source"])
        return out["uv_matched"], out["weights"]


@torch.no_grad()
def validate(op: LearnedOperator, data: ShardDataset, n: int, batch_size: int, device: torch.device,
             out_of_plane: float = 1.0) -> dict:
    """Validation numbers over the first ``n`` samples: EPE (network px) and one update's mTRE (mm)."""
    was = op.training
    op.eval()
    epe, before, after = [], [], []
    n = min(n, len(data))
    for i in range(0, n, batch_size):
        batch = _to(_collate([data[j] for j in range(i, min(n, i + batch_size))]), device)
        st = operator_step(op, batch, out_of_plane=out_of_plane)
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


# ----------------------------------------------------------------------------- the loop


def train(config: TrainConfig, data_root: str | Path, out_dir: str | Path, *, train_split: str = "train",
          val_split: str = "val", resume: bool = True, progress: bool = True,
          log: Any = print) -> dict:
    """Train one learned operator (in one process, or as one rank of a ``torchrun`` launch: see the module
    docstring).

    Writes to ``out_dir`` (rank 0 only): ``checkpoint.pt`` (every ``checkpoint_every`` steps and at the end;
    resumed from when ``resume``, with the batch order continuing exactly), ``model.pt`` (the operator with the
    best validation score: mean mTRE after one update for the PPC models, EPE for ``flow``), ``model_last.pt``,
    ``curves.csv`` (one row per validation), ``curves.png`` (redrawn after each validation) and ``config.json``.

    Returns:
        ``{"iterations", "best": {...validation numbers...}, "model": path, "seconds", "rank", "world_size"}``
        (``best`` is None on the ranks other than 0).
    """
    dinfo, device = init_distributed(config)
    try:
        return _train(config, dinfo, device, data_root, out_dir, train_split, val_split, resume, progress, log)
    finally:
        if dinfo.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _train(cfg: TrainConfig, dinfo: DistInfo, device: torch.device, data_root: str | Path, out_dir: str | Path,
           train_split: str, val_split: str, resume: bool, progress: bool, log: Any) -> dict:
    main = dinfo.is_main
    if not main:
        progress = False

        def log(*_a: Any, **_k: Any) -> None:  # noqa: F811 - only rank 0 talks
            return None

    world = dinfo.world_size
    if cfg.batch_size < world:
        raise InputError(f"the batch size ({cfg.batch_size}) must be at least the number of processes ({world}): "
                         "every rank trains on its own part of each batch")
    out = Path(out_dir)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    train_data = ShardDataset(data_root, train_split)
    val_data = ShardDataset(data_root, val_split, limit=cfg.val_samples)
    h, w = train_data.image_size
    pixel_mm = float(train_data.entry["config"]["detector_width_mm"]) / int(train_data.entry["config"]["detector_px"])
    start = 0
    best: dict | None = None
    ckpt_path = out / "checkpoint.pt"
    ck = _on_main(dinfo, lambda: _load_checkpoint(ckpt_path, cfg.method)) if resume else None
    if ck is not None:
        # a resumed run keeps the architecture of its checkpoint, whatever the defaults or --init of this call say
        arch = {k: ck["config"][k] for k in ("flow", "evidence") if k in ck["config"]}
        arch.setdefault("evidence", False)  # checkpoints written before the matching evidence existed
        if arch != {"flow": cfg.flow, "evidence": cfg.evidence}:
            log(f"resuming keeps the checkpoint's architecture: {arch}")
        cfg = replace(cfg, **arch)
    op = LearnedOperator(cfg.method, network_pixel_mm=pixel_mm, flow=cfg.flow, evidence=cfg.evidence,
                         window_px=max(h, w)).to(device)
    opt = torch.optim.Adam(op.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator()
    if ck is not None:
        op.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        for group in opt.param_groups:  # a resumed run takes the learning rate it is given (e.g. a lower one)
            group["lr"] = cfg.lr
        start = int(ck["iteration"])
        best = ck.get("best")
        if isinstance(ck.get("generator"), torch.Tensor):
            gen.set_state(ck["generator"])  # the batch order continues exactly where it stopped
        else:
            gen.manual_seed(cfg.seed * 7919 + start)  # checkpoints written before the generator was stored
        log(f"resumed from {ckpt_path} at iteration {start}")
    else:
        gen.manual_seed(cfg.seed * 7919 + start)
        if cfg.init:
            copied = _on_main(dinfo, lambda: _init_from(op, cfg.init, device))  # DDP then copies rank 0's weights
            log(f"initialised {len(copied)} parameter tensors from {cfg.init}")
    del ck
    model: torch.nn.Module = op
    if dinfo.distributed:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(op, device_ids=[device.index] if device.type == "cuda" else None)
    n = len(train_data)
    csv_path = out / "curves.csv"
    png_path = out / "curves.png"
    fields = CURVE_FIELDS
    if main:
        (out / "config.json").write_text(json.dumps(
            {**asdict(cfg), "data": str(data_root), "train_split": train_split, "val_split": val_split,
             "train_samples": n, "world_size": world, "effective_batch_size": cfg.batch_size,
             "device_type": device.type}, indent=2))
        if not csv_path.is_file() or start == 0:
            with csv_path.open("w", newline="") as fh:
                csv.writer(fh).writerow(fields)
        else:
            _truncate_curves(csv_path, start)
    meta_common = {"method": cfg.method, "data": str(data_root), "train_samples": n,
                   "train_vertebrae": train_data.vertebrae, "val_vertebrae": val_data.vertebrae,
                   "batch_size": cfg.batch_size, "lr": cfg.lr, "weight_decay": cfg.weight_decay,
                   "lambda_epe": cfg.lambda_epe, "pose_loss": cfg.pose_loss, "evidence": op.evidence,
                   "augment": cfg.augment,
                   "zoom": cfg.zoom, "train_split": train_split, "device": str(device), "world_size": world,
                   "hardware": f"{platform.processor() or platform.machine()} x{os.cpu_count()} "
                               f"torch {torch.__version__} threads {torch.get_num_threads()}"
                               + (f" x {world} processes ({dinfo.backend})" if world > 1 else "")}
    if world > 1:
        log(f"distributed training: {world} processes ({dinfo.backend}), {cfg.batch_size} samples per step in "
            f"all (about {cfg.batch_size / world:g} per process)")
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    run_loss = run_epe = run_mtre = 0.0
    run_n = 0
    op.train()
    bar = tqdm(range(start, cfg.iterations), desc=f"train {cfg.method}", unit="it", disable=not progress,
               initial=start, total=cfg.iterations)
    title = f"{cfg.method}: {n} training samples ({', '.join(train_data.vertebrae)}), batch {cfg.batch_size}, " \
            f"lr {cfg.lr:g}"
    for it in bar:
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen).tolist()
        mine = idx[dinfo.rank::world]  # this rank's part of the (global) batch
        batch = _collate([train_data[j] for j in mine])
        if cfg.augment:
            r = torch.rand(cfg.batch_size, 3, generator=gen)[dinfo.rank::world]
            batch = flip_samples(batch, r[:, 0] < 0.5, r[:, 1] < 0.5)
            if cfg.zoom > 1:
                batch = zoom_samples(batch, 1 + (cfg.zoom - 1) * r[:, 2])
        batch = _to(batch, device)
        st = operator_step(model, batch, solve=cfg.method != "flow", out_of_plane=cfg.out_of_plane)
        loss = compute_loss(cfg.method, st, cfg.lambda_epe, cfg.mtre_clip_mm, cfg.pose_loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(op.parameters(), cfg.grad_clip)
        opt.step()
        k = len(mine)
        run_loss += float(loss.detach()) * k
        run_epe += float(st["epe"].detach().mean()) * k
        run_mtre += (float(st["mtre_after"].detach().mean()) if "mtre_after" in st else math.nan) * k
        run_n += k
        if progress:
            bar.set_postfix(loss=f"{run_loss / run_n:.3f}", epe=f"{run_epe / run_n:.2f}px")
        step = it + 1
        if step % cfg.val_every == 0 or step == cfg.iterations:
            tot_loss, tot_epe, tot_mtre, tot_n = _all_sum(dinfo, [run_loss, run_epe, run_mtre, float(run_n)], device)
            run_loss = run_epe = run_mtre = 0.0
            run_n = 0
            if main:
                v = validate(op, val_data, cfg.val_samples, cfg.batch_size, device, cfg.out_of_plane)
                row = {"iteration": step, "train_loss": tot_loss / tot_n, "train_epe": tot_epe / tot_n,
                       "train_mtre": tot_mtre / tot_n, **v, "seconds": time.perf_counter() - t0}
                with csv_path.open("a", newline="") as fh:
                    csv.writer(fh).writerow([row[f] for f in fields])
                try:
                    plot_curves(csv_path, png_path, title)
                except Exception as exc:  # noqa: BLE001 - a picture must not stop a long training run
                    log(f"warning: could not draw {png_path}: {type(exc).__name__}: {exc}")
                score = v["val_epe"] if cfg.method == "flow" else v["val_mtre_mean"]
                if best is None or score < best["score"]:
                    best = {"score": score, "iteration": step, **v}
                    save_model(out / "model.pt", op, {**meta_common, "iterations": step, "validation": v})
                log(f"[{step}] loss {row['train_loss']:.3f} val EPE {v['val_epe']:.2f}px mTRE "
                    f"{v['val_mtre_before_mean']:.2f} -> {v['val_mtre_mean']:.2f} mm (p50 {v['val_mtre_p50']:.2f})")
        if main and (step % cfg.checkpoint_every == 0 or step == cfg.iterations):
            _atomic_save({"model": op.state_dict(), "optimizer": opt.state_dict(), "iteration": step,
                          "config": asdict(cfg), "best": best, "generator": gen.get_state(),
                          "world_size": world}, ckpt_path)
    bar.close()
    if main:
        save_model(out / "model_last.pt", op, {**meta_common, "iterations": cfg.iterations})
    if dinfo.distributed:
        import torch.distributed as dist

        dist.barrier()  # every rank leaves after rank 0 has written its files
    return {"iterations": cfg.iterations, "best": best if main else None, "model": str(out / "model.pt"),
            "seconds": time.perf_counter() - t0, "rank": dinfo.rank, "world_size": world}
