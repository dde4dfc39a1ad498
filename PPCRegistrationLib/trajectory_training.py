"""Training the learned normal matcher on the states its own loop visits (docs/design.md §5.4).

Every optimisation step takes ``batch`` simulated cases (a random view of a vertebra of a training patient, an X-ray
at the ground truth ``T_gt = I``), starts each from a fresh random estimate or from a pose its earlier rollouts
reached (a DAgger-style buffer, so training sees the states a loop spends its time in, mostly near the solution),
and unrolls ``unroll`` updates of the operator :func:`~.update.ppc_update` (the same function the registration loop
calls): render the window (no gradient), select the contour points, match them with the network, solve the PPC
system (the differentiable known operator) and apply the update.  The poses stay in the autograd graph from one
update to the next (the points' projections, normals and profile positions depend on them), so the loss of a later
update reaches the network through every earlier solve.

Loss per update: the cross-entropy of the displacement along each normal against the ground truth's (the oracle's
``P(T_gt T^-1 w_i)`` projected on the normal), a binary cross-entropy of the weight against "within 1 px", and
``log(1 + mTRE_after / 1 mm)`` after the solve.

Everything is on-line (no cached data set): rendering a window costs 5-30 ms on one core.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .drr import DRRRenderer
from .errors import InputError
from .features import SurfacePoints, contour_mask, project_normals
from .geometry import Projection, crop_projection, transform_points
from .metrics import mtre
from .normal_matcher import NormalMatcher, NormalMatcherNet
from .simulation import ViewSampler, XRayVariation, random_initial_transform, simulate_xray
from .solvers import PlainSolver
from .update import UpdateState, ppc_update

__all__ = ["Scene", "TrajectoryConfig", "TrainingCase", "make_training_case", "unrolled_loss", "train_trajectories",
           "iterate", "window_around", "WINDOW_MARGIN_PX"]

#: the window is the projected surface points' bounding box plus this margin (px): the profiles reach
#: ``half_px + search_px`` = 36 network px along the normal
WINDOW_MARGIN_PX = 40


@dataclass
class Scene:
    """One vertebra of one patient: its renderer, surface points (the features) and targets (the mTRE points)."""

    name: str
    renderer: DRRRenderer
    surface: SurfacePoints
    targets: torch.Tensor


@dataclass
class TrainingCase:
    """A simulated X-ray of a scene (ground truth ``T = I``) and the poses earlier rollouts reached from it."""

    scene: Scene
    projection: Projection
    xray: torch.Tensor
    buffer: list = field(default_factory=list)


@dataclass
class TrajectoryConfig:
    """Settings of :func:`train_trajectories` (units: mm, seconds).

    mtre_ranges / range_probs: initial mTRE of fresh starts, drawn from one of the ranges with these odds.
    buffer_prob: odds of starting from a pose an earlier rollout reached instead.  pool: cases kept at once (it
    starts with one batch and grows by one case per step; once full, one case is replaced by a new one every
    ``refresh_every`` steps).  out_of_plane / regularization: the PPC solve trained
    through (:class:`~.solvers.PlainSolver`).  max_points: contour points per update (random subset).
    """

    steps: int = 1000
    batch: int = 4
    unroll: int = 2
    lr: float = 1e-3
    weight_decay: float = 1e-6
    clip: float = 10.0
    mtre_ranges: tuple = ((0.0, 3.0), (0.0, 20.0), (0.0, 45.0))
    range_probs: tuple = (0.3, 0.5, 0.2)
    buffer_prob: float = 0.5
    pool: int = 36
    refresh_every: int = 3
    out_of_plane: float = 0.0
    regularization: float = 1e-5
    max_points: int = 256
    ce_weight: float = 1.0
    weight_bce: float = 0.2
    ppc_weight: float = 1.0
    seed: int = 0
    time_budget_s: float | None = None


def window_around(proj: Projection, uv_all: torch.Tensor, margin_px: int = WINDOW_MARGIN_PX
                  ) -> tuple[int, int, int, int] | None:
    """``(u0, v0, width, height)``: the bounding box of ``uv_all (M, 2)`` plus ``margin_px``, clamped to the
    detector (None when less than 8 px of it is left)."""
    if not bool(torch.isfinite(uv_all).all()):
        return None
    lo = torch.floor(uv_all.min(0).values - margin_px)
    hi = torch.ceil(uv_all.max(0).values + margin_px)
    u0, v0 = int(max(0, lo[0])), int(max(0, lo[1]))
    u1, v1 = int(min(proj.width - 1, hi[0])), int(min(proj.height - 1, hi[1]))
    if u1 - u0 < 8 or v1 - v0 < 8:
        return None
    return u0, v0, u1 - u0 + 1, v1 - v0 + 1


def make_training_case(scene: Scene, gen: torch.Generator, views: ViewSampler | None = None,
                       variation: XRayVariation | None = None) -> TrainingCase:
    """A random view of ``scene`` and its simulated X-ray (training simulator)."""
    views = views or ViewSampler()
    proj, _ = views.sample(scene.targets.mean(0), gen)
    seed = int(torch.randint(0, 2**31 - 1, (), generator=gen))
    xray = simulate_xray(scene.renderer, proj, torch.eye(4, dtype=torch.float64), seed=seed, variation=variation)
    return TrainingCase(scene, proj, xray)


def _state(case: TrainingCase, T: torch.Tensor, net: NormalMatcherNet, max_points: int, rng: random.Random,
           theta_deg: float = 6.0):
    """The update state at ``T (4, 4)`` (in the autograd graph): rendered window (no gradient), contour points,
    and the ground-truth displacement along each normal (network px).  None when it cannot be built."""
    s = case.scene
    proj = case.projection
    P0, G0 = s.surface.points, s.surface.gradients
    with torch.no_grad():
        uv_all = proj.project(transform_points(T.detach(), P0)[None])[0]
    win = window_around(proj, uv_all)
    if win is None:
        return None
    u0, v0, ww, wh = win
    sub = crop_projection(proj, u0, v0, ww, wh)
    with torch.no_grad():
        drr = s.renderer.render(sub, T.detach()[None])
        mask = contour_mask(P0[None], G0[None], proj.source, T.detach()[None], theta_deg=theta_deg)[0]
        uvw = uv_all - uv_all.new_tensor([u0, v0])
        mask &= (uvw[:, 0] >= 2) & (uvw[:, 0] <= ww - 3) & (uvw[:, 1] >= 2) & (uvw[:, 1] <= wh - 3)
    idx = torch.nonzero(mask).flatten().tolist()
    if len(idx) < 12:
        return None
    if len(idx) > max_points:
        idx = sorted(rng.sample(idx, max_points))
    idx = torch.tensor(idx)
    w_c = transform_points(T, P0[idx])                        # (n, 3), in the graph through T
    g_c = G0[idx] @ T[:3, :3].transpose(0, 1)
    uv = sub.project(w_c[None])                               # (1, n, 2)
    normals = project_normals(sub, w_c[None], g_c[None])      # (1, n, 2)
    with torch.no_grad():
        uv_true = sub.project(P0[idx][None])                  # T_gt = I
        f = net.factor_for(float(proj.pixel_spacing[0, 0]))
        d_true = ((uv_true - uv) * normals).sum(-1)[0] / f    # network px
    state = UpdateState(T=T[None], points=w_c[None], gradients=g_c[None], uv=uv.float(),
                        mask=torch.ones(1, len(idx), dtype=torch.bool), projection=sub,
                        drr=drr, xray=case.xray[None, v0:v0 + wh, u0:u0 + ww], normals=normals.float(),
                        search_px=float(net.search),
                        context={"pixel_spacing_mm": float(proj.pixel_spacing[0, 0])})
    return state, d_true


def _ce_loss(logits: torch.Tensor, d_true: torch.Tensor, mask: torch.Tensor, search: int) -> torch.Tensor:
    """Cross-entropy of the displacement logits ``(n, D)`` against ``d_true (n,)`` (two-bin soft target), over
    ``mask`` points whose true displacement is inside the range."""
    ok = mask & (d_true.abs() <= search - 1)
    if not bool(ok.any()):
        return logits.sum() * 0
    x = d_true[ok].float() + search
    lo = x.floor().long()
    a = (x - lo.float())
    logp = logits[ok].log_softmax(-1)
    return -((1 - a) * logp.gather(1, lo[:, None])[:, 0] + a * logp.gather(1, (lo + 1)[:, None])[:, 0]).mean()


def unrolled_loss(net: NormalMatcherNet, case: TrainingCase, T0: torch.Tensor, cfg: TrajectoryConfig,
                  rng: random.Random, trace: list | None = None) -> tuple[torch.Tensor | None, list[torch.Tensor], dict]:
    """The loss of ``cfg.unroll`` updates from ``T0`` on one case, the poses visited (detached) and numbers.

    The poses stay in the graph, so the loss of update k reaches the network through the solves of updates 1..k.
    ``trace``, when given, receives per update the network's outputs and the mTRE after it (graph-carrying).
    """
    matcher = NormalMatcher(net, enable_grad=True)
    solver = PlainSolver(cfg.out_of_plane, cfg.regularization)
    T = T0.to(torch.float64)
    total, visited = None, []
    info = {"ce": 0.0, "mtre": [], "n": 0}
    for _ in range(cfg.unroll):
        built = _state(case, T, net, cfg.max_points, rng)
        if built is None:
            break
        state, d_true = built
        res = ppc_update(state, matcher, solver)
        out = matcher.outputs
        uv_m, w = res.uv_matched[0], res.match_weights[0]
        n = state.normals[0]
        f = float(out["factor"])
        disp = ((uv_m - state.uv[0]) * n).sum(-1) / f
        ce = _ce_loss(out["logits"], d_true, out["mask"], net.search)
        ok = out["mask"]
        target_w = ((disp.detach() - d_true).abs() < 1.0).float()
        bce = F.binary_cross_entropy(w[ok].float().clamp(1e-6, 1 - 1e-6), target_w[ok]) if bool(ok.any()) else ce * 0
        T_new = res.T[0]
        if bool(res.solve.solution.rank_deficient[0]) or not bool(torch.isfinite(T_new).all()):
            loss = cfg.ce_weight * ce + cfg.weight_bce * bce
            total = loss if total is None else total + loss
            break
        err = mtre(T_new, torch.eye(4, dtype=torch.float64), case.scene.targets)
        if trace is not None:
            trace.append({"outputs": out, "mtre": err, "T": T_new})
        loss = cfg.ce_weight * ce + cfg.weight_bce * bce + cfg.ppc_weight * torch.log1p(err.clamp(max=200.0))
        total = loss if total is None else total + loss
        info["ce"] += float(ce.detach())
        info["mtre"].append(float(err.detach()))
        info["n"] += 1
        T = T_new
        visited.append(T.detach().clone())
        if float(err.detach()) > 60.0:
            break
    return total, visited, info


def iterate(net: NormalMatcherNet, case: TrainingCase, T0: torch.Tensor, updates: int = 20, *,
            out_of_plane: float = 0.0, regularization: float = 1e-5, max_points: int = 100000) -> list[float]:
    """Run the operator alone for ``updates`` updates from ``T0`` (no gradient); the mTRE (mm) after each."""
    rng = random.Random(0)
    matcher = NormalMatcher(net)
    solver = PlainSolver(out_of_plane, regularization)
    T = T0.to(torch.float64)
    errs = []
    with torch.no_grad():
        for _ in range(updates):
            built = _state(case, T, net, max_points, rng)
            if built is None:
                break
            res = ppc_update(built[0], matcher, solver)
            if bool(res.solve.solution.rank_deficient[0]) or not bool(torch.isfinite(res.T).all()):
                break
            T = res.T[0]
            errs.append(float(mtre(T, torch.eye(4, dtype=torch.float64), case.scene.targets)))
            if errs[-1] > 100:
                break
    return errs


def _start(case: TrainingCase, cfg: TrajectoryConfig, gen: torch.Generator, rng: random.Random) -> torch.Tensor:
    if case.buffer and rng.random() < cfg.buffer_prob:
        return rng.choice(case.buffer)
    k = rng.choices(range(len(cfg.mtre_ranges)), weights=cfg.range_probs)[0]
    lo, hi = cfg.mtre_ranges[k]
    target = lo + (hi - lo) * rng.random()
    return random_initial_transform(torch.eye(4, dtype=torch.float64), case.scene.targets, target, gen)


def train_trajectories(net: NormalMatcherNet, scenes: Sequence[Scene], cfg: TrajectoryConfig, *,
                       validate: Callable[[NormalMatcherNet], float] | None = None, validate_every: int = 200,
                       progress: Callable[[int, dict], None] | None = None,
                       should_stop: Callable[[], bool] | None = None,
                       optimizer_state: dict | None = None, start_step: int = 0, validate_start: bool = False,
                       on_checkpoint: Callable[[int, NormalMatcherNet, dict, dict], None] | None = None) -> dict:
    """Train ``net`` in place (module docstring).  Returns the curves and the best validated weights.

    validate: a score of the network (lower is better, e.g. the median final mTRE of held-out cases), called every
    ``validate_every`` steps and at the end; the returned ``best_state`` is the best-scoring one.  validate_start:
    also score the starting weights (a fine-tuning then returns them when no step beats them, best_step = start_step).
    progress(step, numbers); should_stop() is polled before every step (a cancelled run returns what it has);
    on_checkpoint(step, net, optimizer state, curves) after every validation (for resuming).
    """
    if not scenes:
        raise InputError("training needs at least one scene (a vertebra of a training patient)")
    if cfg.batch < 1 or cfg.unroll < 1 or cfg.steps < 0:
        raise InputError("training needs batch >= 1, unroll >= 1 and steps >= 0")
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if optimizer_state:
        opt.load_state_dict(optimizer_state)
    # the pool starts with one batch of cases and grows by one case per step (a case costs a full-detector X-ray,
    # ~1 s): training starts at once; once full, one case is replaced every ``refresh_every`` steps
    pool = [make_training_case(scenes[i % len(scenes)], gen) for i in range(min(cfg.pool, cfg.batch))]
    curves: dict = {"step": [], "loss": [], "ce": [], "mtre_last": [], "val_step": [], "val": [], "seconds": []}
    best = (math.inf, copy.deepcopy(net.state_dict()), start_step)

    def validate_at(at: int) -> None:
        """Score the network, record the score, keep its weights when they are the best so far."""
        nonlocal best
        net.eval()
        score = float(validate(net))
        curves["val_step"].append(at)
        curves["val"].append(score)
        if score < best[0]:
            best = (score, copy.deepcopy(net.state_dict()), at)

    if validate is not None and validate_start:
        validate_at(start_step)
    t0 = time.perf_counter()
    step = start_step
    stopped = "steps"
    for step in range(start_step + 1, cfg.steps + 1):
        if should_stop is not None and should_stop():
            stopped = "cancelled"
            step -= 1
            break
        if cfg.time_budget_s is not None and time.perf_counter() - t0 > cfg.time_budget_s:
            stopped = "time budget"
            step -= 1
            break
        if len(pool) < cfg.pool:
            pool.append(make_training_case(scenes[len(pool) % len(scenes)], gen))
        elif cfg.refresh_every and step % cfg.refresh_every == 0:
            pool[rng.randrange(len(pool))] = make_training_case(rng.choice(list(scenes)), gen)
        net.train()
        opt.zero_grad()
        losses, ce, last = [], [], []
        for case in rng.sample(pool, min(cfg.batch, len(pool))):
            loss, visited, info = unrolled_loss(net, case, _start(case, cfg, gen, rng), cfg, rng)
            if loss is None:
                continue
            (loss / cfg.batch).backward()
            losses.append(float(loss.detach()))
            ce.append(info["ce"] / max(info["n"], 1))
            if info["mtre"]:
                last.append(info["mtre"][-1])
            for T in visited:
                if float(mtre(T, torch.eye(4, dtype=torch.float64), case.scene.targets)) < 45.0:
                    case.buffer.append(T)
            del case.buffer[:-16]
        if losses:
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.clip)
            opt.step()
        curves["step"].append(step)
        curves["loss"].append(sum(losses) / max(len(losses), 1))
        curves["ce"].append(sum(ce) / max(len(ce), 1))
        curves["mtre_last"].append(sorted(last)[len(last) // 2] if last else math.nan)
        curves["seconds"].append(time.perf_counter() - t0)
        if progress is not None:
            progress(step, {k: v[-1] for k, v in curves.items() if v and k in ("loss", "ce", "mtre_last")})
        if validate is not None and step % validate_every == 0:
            validate_at(step)
            if on_checkpoint is not None:
                on_checkpoint(step, net, opt.state_dict(), curves)
    if validate is not None and (not curves["val_step"] or curves["val_step"][-1] != step) and step > start_step:
        validate_at(step)
    return {"curves": curves, "best_state": best[1], "best_score": best[0], "best_step": best[2],
            "steps_done": step, "stopped": stopped, "seconds": time.perf_counter() - t0,
            "optimizer_state": opt.state_dict()}
