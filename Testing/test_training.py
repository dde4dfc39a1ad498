"""Training of the learned update operator (PPCRegistrationLib.training) and ``ppcreg train``, on the tiny data set
of the real sample chest CT (Testing/tiny_data.py): every method learns, gradients pass through the PPC solve,
resume continues exactly, ``--init`` copies the flow network, the command line runs end to end, and a 2-process
``torchrun`` (gloo, CPU) trains like a single process.
"""

from __future__ import annotations

import csv
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tiny_data
from PPCRegistrationLib.cli import main
from PPCRegistrationLib.errors import InputError
from PPCRegistrationLib.geometry import Projection, centred_update, invert_rigid, se3_exp, transform_points
from PPCRegistrationLib.metrics import mtre
from PPCRegistrationLib.networks import LearnedOperator, operator_from_file, save_model
from PPCRegistrationLib.ppc import solve_ppc
from PPCRegistrationLib.dataset import ShardDataset
from PPCRegistrationLib.training import TrainConfig, _collate, _init_from, compute_loss, operator_step, train

ROOT = Path(__file__).resolve().parents[1]
PIXEL_MM = 380.0 / 128  # the tiny data set's network pixel


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory, chest_ct_paths) -> Path:
    return tiny_data.tiny_dataset(tmp_path_factory, chest_ct_paths)


def _cfg(method: str, **kw) -> TrainConfig:
    base = dict(method=method, iterations=4, batch_size=4, lr=1e-3, val_every=2, val_samples=2, checkpoint_every=2,
                device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def _curves(path: Path) -> list[dict]:
    with (path / "curves.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def _quiet(*_a, **_k) -> None:
    return None


# ----------------------------------------------------------------------------- the PPC layer passes gradients


def test_gradcheck_ppc_solve_to_mtre():
    """d mTRE(T_est, T_gt) / d (matched points, weights) through solve_ppc, in double precision."""
    gen = torch.Generator().manual_seed(0)
    n = 10
    dirs = torch.nn.functional.normalize(torch.randn(n, 3, generator=gen, dtype=torch.float64), dim=-1)
    points = (30.0 * dirs)[None]  # a 30 mm sphere around the isocentre
    grads = (dirs + 0.2 * torch.randn(n, 3, generator=gen, dtype=torch.float64))[None]
    K = torch.tensor([[[800.0, 0, 32], [0, 800.0, 32], [0, 0, 1]]], dtype=torch.float64)
    proj = Projection(K, torch.eye(3, dtype=torch.float64)[None], torch.tensor([[0, 0, 750.0]], dtype=torch.float64),
                      64, 64, torch.tensor([[1.5, 1.5]], dtype=torch.float64))
    T_init = torch.eye(4, dtype=torch.float64)[None]
    T_gt = se3_exp(torch.tensor([[0.03, -0.02, 0.05, 2.0, -1.0, 3.0]], dtype=torch.float64))
    uv_true = proj.project(transform_points(T_gt @ invert_rigid(T_init), points))
    # nearly exact matches: with one view the depth is weakly observed, and match noise would swamp it
    uv = (uv_true + 0.01 * torch.randn(uv_true.shape, generator=gen, dtype=torch.float64)).requires_grad_(True)
    weights = (0.5 + torch.rand(1, n, generator=gen, dtype=torch.float64)).requires_grad_(True)
    targets = points[0]

    def f(uv_m, w):
        sol = solve_ppc(points, grads, proj.source, proj.ray_directions(uv_m), w, regularization=1e-5)
        return mtre(centred_update(sol.dv, sol.centre, T_init), T_gt, targets)

    assert not bool(solve_ppc(points, grads, proj.source, proj.ray_directions(uv), weights).rank_deficient.any())
    before = float(mtre(T_init, T_gt, targets))
    assert float(f(uv, weights).detach()) < 0.5 * before  # the solve does move towards T_gt
    assert torch.autograd.gradcheck(f, (uv, weights), eps=1e-6, atol=1e-6, rtol=1e-4)
    g_uv, g_w = torch.autograd.grad(f(uv, weights).sum(), (uv, weights))
    assert float(g_uv.abs().max()) > 0 and float(g_w.abs().max()) > 0


# ----------------------------------------------------------------------------- every method learns


@pytest.mark.parametrize("method", ["flow", "ppc-flow", "ppc-flow-attention"])
def test_each_method_overfits_the_tiny_set(root, tmp_path, method):
    """40 steps at lr 1e-3 on the 4 training samples: the loss over those samples drops by more than 10 %."""
    data = ShardDataset(root, "train")
    batch = _collate([data[i] for i in range(len(data))])

    def loss(op) -> float:
        with torch.no_grad():
            return float(compute_loss(method, operator_step(op, batch, solve=method != "flow")))

    torch.manual_seed(0)  # the initialisation train() makes with seed 0
    before = loss(LearnedOperator(method, network_pixel_mm=PIXEL_MM))
    cfg = _cfg(method, iterations=40, val_every=40, checkpoint_every=40, val_samples=4)
    res = train(cfg, root, tmp_path, val_split="train", progress=False, log=_quiet)
    op, meta = operator_from_file(tmp_path / "model_last.pt", method=method)
    after = loss(op)
    assert math.isfinite(before) and math.isfinite(after)
    assert after < 0.9 * before, (method, before, after)
    assert meta["method"] == method and meta["iterations"] == 40 and meta["train_vertebrae"] == ["T8"]
    rows = _curves(tmp_path)
    assert [int(r["iteration"]) for r in rows] == [40] and math.isfinite(float(rows[0]["train_loss"]))
    assert res["best"]["iteration"] == 40 and res["world_size"] == 1
    assert (tmp_path / "model.pt").is_file()
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- resume, --init


def test_resume_continues_at_the_checkpoint_like_an_uninterrupted_run(root, tmp_path):
    straight, parts = tmp_path / "straight", tmp_path / "parts"
    train(_cfg("ppc-flow-attention", iterations=6, val_every=3, checkpoint_every=3), root, straight,
          progress=False, log=_quiet)
    train(_cfg("ppc-flow-attention", iterations=3, val_every=3, checkpoint_every=3), root, parts,
          progress=False, log=_quiet)
    assert torch.load(parts / "checkpoint.pt", weights_only=False)["iteration"] == 3
    with (parts / "curves.csv").open("a", newline="") as fh:  # a validation written after the checkpoint
        fh.write("5,1,1,1,1,1,1,1,0,1\n")
    lines: list[str] = []
    train(_cfg("ppc-flow-attention", iterations=6, val_every=3, checkpoint_every=3), root, parts, progress=False,
          log=lambda m: lines.append(str(m)))
    assert any(f"resumed from {parts / 'checkpoint.pt'} at iteration 3" in m for m in lines), lines
    assert torch.load(parts / "checkpoint.pt", weights_only=False)["iteration"] == 6
    assert [int(r["iteration"]) for r in _curves(parts)] == [3, 6]
    a, _ = operator_from_file(straight / "model_last.pt")
    b, _ = operator_from_file(parts / "model_last.pt")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(pa, pb, atol=1e-6), f"{name}: the resumed run differs from the uninterrupted one"
    # a checkpoint of another method is refused
    with pytest.raises(InputError, match="checkpoint of 'ppc-flow-attention'"):
        train(_cfg("flow", iterations=8), root, parts, progress=False, log=_quiet)


def test_init_copies_the_flow_network(root, tmp_path):
    torch.manual_seed(1)
    flow = LearnedOperator("flow", network_pixel_mm=PIXEL_MM)
    save_model(tmp_path / "flow.pt", flow, {"method": "flow"})
    torch.manual_seed(2)
    op = LearnedOperator("ppc-flow-attention", network_pixel_mm=PIXEL_MM)
    attention_before = {k: v.clone() for k, v in op.attention.state_dict().items()}
    copied = _init_from(op, str(tmp_path / "flow.pt"), torch.device("cpu"))
    assert sorted(copied) == sorted(f"flow_net.{k}" for k in flow.flow_net.state_dict())
    for k, v in flow.flow_net.state_dict().items():
        assert torch.equal(op.flow_net.state_dict()[k], v), k
    for k, v in op.attention.state_dict().items():
        assert torch.equal(v, attention_before[k]), k


def test_init_matches_refinement_levels_by_stride(tmp_path):
    """A stride-16 network with refinement levels at 8 and 4, started from a stride-8 model with one refinement level
    at 4: the shared encoder stages and the stride-4 level are copied (the latter from position 0 to position 1), the
    new stride-8 level and the new stride-16 stage keep their own initialisation."""
    small = {"max_disp": 2, "channels": 16, "decoder_channels": [16], "first_channels": 8, "soft_argmax": True}
    torch.manual_seed(1)
    src = LearnedOperator("flow", network_pixel_mm=PIXEL_MM, flow={**small, "stride": 8, "refine_strides": [4]})
    save_model(tmp_path / "s8.pt", src, {})
    torch.manual_seed(2)
    dst = LearnedOperator("flow", network_pixel_mm=PIXEL_MM, flow={**small, "stride": 16, "refine_strides": [8, 4]})
    fresh = {k: v.clone() for k, v in dst.state_dict().items()}
    copied = set(_init_from(dst, str(tmp_path / "s8.pt"), torch.device("cpu")))
    theirs, mine = src.flow_net.state_dict(), dst.flow_net.state_dict()
    for k, v in src.flow_net.refinements[0].state_dict().items():
        assert torch.equal(dst.flow_net.refinements[1].state_dict()[k], v), k
        assert f"flow_net.refinements.1.{k}" in copied
    for k in dst.flow_net.refinements[0].state_dict():
        assert torch.equal(mine[f"refinements.0.{k}"], fresh[f"flow_net.refinements.0.{k}"]), k
    for layer in range(6):  # encoder stages up to stride 8 are shared
        assert torch.equal(mine[f"encoder.{layer}.0.weight"], theirs[f"encoder.{layer}.0.weight"])
    for layer in (6, 7):
        assert torch.equal(mine[f"encoder.{layer}.0.weight"], fresh[f"flow_net.encoder.{layer}.0.weight"])


# ----------------------------------------------------------------------------- ppcreg train


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_cli_train_end_to_end_with_init_and_resume(capsys, root, tmp_path):
    common = ["--data", root, "--batch-size", "2", "--val-every", "2", "--val-samples", "2", "--device", "cpu",
              "--quiet", "--threads", "1"]
    code, out, err = run(capsys, "train", "--method", "flow", "--out", tmp_path / "flow", "--iterations", "2",
                         "--lr", "1e-3", *common)
    assert code == 0, err
    assert "trained flow for 2 iterations" in out and "best validation at iteration 2" in out
    for name in ("model.pt", "model_last.pt", "checkpoint.pt", "curves.csv", "curves.png", "config.json"):
        assert (tmp_path / "flow" / name).is_file(), name
    n_flow = len(LearnedOperator("flow").flow_net.state_dict())
    code, out, err = run(capsys, "train", "--method", "ppc-flow-attention", "--out", tmp_path / "pfa",
                         "--iterations", "2", "--init", tmp_path / "flow" / "model.pt", "--lambda-epe", "0.5",
                         "--weight-decay", "0", "--seed", "3", *common)
    assert code == 0, err
    assert f"initialised {n_flow} parameter tensors from" in out
    op, meta = operator_from_file(tmp_path / "pfa" / "model.pt", method="ppc-flow-attention")
    assert meta["lambda_epe"] == 0.5 and meta["batch_size"] == 2
    code, out, err = run(capsys, "train", "--method", "ppc-flow-attention", "--out", tmp_path / "pfa",
                         "--iterations", "3", *common)
    assert code == 0, err
    assert "at iteration 2" in out and "trained ppc-flow-attention for 3 iterations" in out
    code, out, err = run(capsys, "train", "--method", "ppc-flow-attention", "--out", tmp_path / "pfa",
                         "--iterations", "1", "--no-resume", *common)
    assert code == 0 and "resumed" not in out
    assert [int(r["iteration"]) for r in _curves(tmp_path / "pfa")] == [1]


@pytest.mark.parametrize("args, fragment", [
    (["--data", "{tmp}/nothing"], "no manifest.json"),
    (["--data", "{root}", "--init", "{tmp}/missing.pt"], "--init model file not found"),
    (["--data", "{root}", "--val-split", "test"], "has no split 'test'"),
    (["--data", "{root}", "--lr", "0"], "learning rate must be positive"),
])
def test_cli_train_errors(capsys, root, tmp_path, args, fragment):
    argv = [a.format(tmp=tmp_path, root=root) for a in args]
    code, out, err = run(capsys, "train", "--method", "ppc-flow", "--out", tmp_path / "o", "--device", "cpu",
                         "--iterations", "1", "--quiet", *argv)
    assert code == 2, (out, err)
    assert err.startswith("error: ") and fragment in err and "Traceback" not in err


# ----------------------------------------------------------------------------- torchrun, 2 processes (gloo)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_torchrun_two_processes_train_like_one(root, tmp_path):
    """``torchrun --nproc_per_node 2`` on the CPU (gloo): finishes with rc 0, rank 0 writes the model, and the
    2-process run from the same seed gives the single-process losses (the global batch is split over the ranks)."""
    runner = Path(sys.executable).with_name("torchrun")
    launcher = [str(runner)] if runner.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    args = ["train", "--method", "flow", "--data", str(root), "--iterations", "4", "--batch-size", "4",
            "--lr", "1e-3", "--val-every", "2", "--val-samples", "2", "--device", "cpu", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([*launcher, "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                           "--master_port", str(_free_port()), "-m", "PPCRegistrationLib.cli", *args,
                           "--out", str(tmp_path / "ddp")], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "distributed training: 2 processes (gloo)" in proc.stdout
    assert proc.stdout.count("trained flow for 4 iterations") == 1, "only rank 0 reports"
    op, meta = operator_from_file(tmp_path / "ddp" / "model.pt", method="flow")
    assert meta["world_size"] == 2
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == sorted(
        ["checkpoint.pt", "config.json", "curves.csv", "curves.png", "model.pt", "model_last.pt"])
    single = tmp_path / "single"
    train(_cfg("flow", iterations=4, val_every=2, val_samples=2, checkpoint_every=2), root, single,
          progress=False, log=_quiet)
    two, one = _curves(tmp_path / "ddp"), _curves(single)
    assert [r["iteration"] for r in two] == [r["iteration"] for r in one] == ["2", "4"]
    for r2, r1 in zip(two, one):
        l2, l1 = float(r2["train_loss"]), float(r1["train_loss"])
        assert math.isfinite(l2) and math.isfinite(l1)
        assert l2 == pytest.approx(l1, rel=1e-3), (two, one)


def test_cli_train_help(capsys):
    code, out, _ = run(capsys, "train", "--help")
    assert code == 0 and "usage: ppcreg train" in out and "torchrun --nproc_per_node" in out
    for opt in ("--method", "--data", "--iterations", "--batch-size", "--lr", "--weight-decay", "--lambda-epe",
                "--val-every", "--val-samples", "--checkpoint-every", "--init", "--seed", "--device", "--no-resume"):
        assert opt in out, opt


# ----------------------------------------------------------------------------- augmentation, refinement levels


def test_flipped_samples_keep_their_geometry_exact(root):
    """Mirrored samples (real chest CT): the contour points still project to their (mirrored) pixels, the images
    are mirrored, the input is untouched, and a PPC update from the ground-truth correspondences gives the same pose
    as on the original samples."""
    from PPCRegistrationLib.dataset import flip_samples, sample_projection
    data = ShardDataset(root, "train")
    batch = _collate([data[j] for j in range(4)])
    before = {k: v.clone() for k, v in batch.items()}
    fu, fv = torch.tensor([True, False, True, False]), torch.tensor([False, True, True, False])
    flipped = flip_samples(batch, fu, fv)
    for k in batch:
        assert torch.equal(batch[k], before[k]), f"flip_samples modified its input {k}"
    h, w = batch["xray"].shape[-2:]
    assert torch.equal(flipped["xray"][0], batch["xray"][0].flip(1))
    assert torch.equal(flipped["drr"][1], batch["drr"][1].flip(0))
    assert torch.equal(flipped["xray"][2], batch["xray"][2].flip(0).flip(1))
    assert torch.equal(flipped["drr"][3], batch["drr"][3])
    m = batch["mask"]
    for b in (batch, flipped):
        uv = sample_projection(b, h, w).project(b["points"].to(torch.float64))
        assert (uv - b["uv"].to(torch.float64)).abs()[m].max() < 1e-3
    assert torch.allclose(flipped["uv"][0, :, 0][m[0]], (w - 1) - batch["uv"][0, :, 0][m[0]])
    assert torch.allclose(flipped["flow_gt"][1, :, 1], -batch["flow_gt"][1, :, 1])

    class Oracle(torch.nn.Module):  # the ground-truth correspondences of the batch it is given
        def __init__(self, b):
            super().__init__()
            self.b = b

        def forward(self, drr, xray, uv, mask, *rest):
            return {"uv_matched": uv + self.b["flow_gt"], "weights": mask.to(torch.float64)}

    a = operator_step(Oracle(batch), batch)
    b = operator_step(Oracle(flipped), flipped)
    assert torch.allclose(a["T_est"], b["T_est"], atol=1e-6)
    assert (a["mtre_after"] < a["mtre_before"]).all()


def test_zoomed_samples_keep_their_geometry_exact(root):
    """Magnified samples (real chest CT): contour points still project to their pixels, points leaving the window
    are masked out, the flow scales with the zoom, and the ground-truth PPC update is unchanged."""
    from PPCRegistrationLib.dataset import sample_projection, zoom_samples
    data = ShardDataset(root, "train")
    batch = _collate([data[j] for j in range(4)])
    zoom = torch.tensor([1.0, 1.25, 1.5, 4.0])
    zoomed = zoom_samples(batch, zoom)
    h, w = batch["xray"].shape[-2:]
    assert torch.equal(zoomed["xray"][0], batch["xray"][0])
    m = zoomed["mask"]
    assert (m <= batch["mask"]).all() and m[3].sum() < batch["mask"][3].sum()  # 4x zoom drops the outer points
    uv = sample_projection(zoomed, h, w).project(zoomed["points"].to(torch.float64))
    assert (uv - zoomed["uv"].to(torch.float64)).abs()[m].max() < 1e-3
    assert torch.allclose(zoomed["flow_gt"][3], 4 * batch["flow_gt"][3])
    c = (w - 1) / 2  # the centre pixel keeps its value; an off-centre feature moves outwards
    assert zoomed["xray"][3][int(c), int(c)] == pytest.approx(float(batch["xray"][3][int(c), int(c)]), rel=0.05)

    class Oracle(torch.nn.Module):
        def __init__(self, b):
            super().__init__()
            self.b = b

        def forward(self, drr, xray, uv, mask, *rest):
            return {"uv_matched": uv + self.b["flow_gt"], "weights": mask.to(torch.float64)}

    full = {**batch, "mask": m}  # the same contour points on both sides
    a, b = operator_step(Oracle(full), full), operator_step(Oracle(zoomed), zoomed)
    assert torch.allclose(a["T_est"], b["T_est"], atol=1e-6)
    with pytest.raises(InputError, match=">= 1"):
        zoom_samples(batch, torch.tensor([1.0, 0.9, 1.0, 1.0]))
    with pytest.raises(InputError, match="zoom"):
        TrainConfig(method="flow", zoom=0.5)


def test_cli_train_with_refinement_levels_and_augmentation(capsys, root, tmp_path):
    common = ["--data", root, "--batch-size", "2", "--val-every", "2", "--val-samples", "2", "--device", "cpu",
              "--quiet", "--threads", "1", "--iterations", "2", "--lr", "1e-3"]
    code, out, err = run(capsys, "train", "--method", "flow", "--out", tmp_path / "flow", "--refine-strides", "4,2",
                         "--zoom", "1.3", *common)
    assert code == 0, err
    op, meta = operator_from_file(tmp_path / "flow" / "model.pt", method="flow")
    assert op.flow_net.hparams["refine_strides"] == [4, 2]
    assert op.window_px == 64  # the tiny data set's windows: the registration renders the same for it
    config = json_load(tmp_path / "flow" / "config.json")
    assert config["augment"] is True and config["zoom"] == 1.3
    # fine-tuning keeps the --init model's architecture (all its tensors are copied) ...
    code, out, err = run(capsys, "train", "--method", "ppc-flow", "--out", tmp_path / "pf", "--init",
                         tmp_path / "flow" / "model.pt", "--pose-loss", "mrpd", *common)
    assert code == 0, err
    assert operator_from_file(tmp_path / "pf" / "model.pt", method="ppc-flow")[1]["pose_loss"] == "mrpd"
    assert f"initialised {len(op.flow_net.state_dict())} parameter tensors" in out
    assert operator_from_file(tmp_path / "pf" / "model.pt", method="ppc-flow")[0].flow_net.hparams[
        "refine_strides"] == [4, 2]
    # ... unless --refine-strides says otherwise; a bad value is a clear error
    code, out, err = run(capsys, "train", "--method", "flow", "--out", tmp_path / "f2", "--init",
                         tmp_path / "flow" / "model.pt", "--refine-strides", "none", *common)
    assert code == 0, err
    assert "refine_strides" not in operator_from_file(tmp_path / "f2" / "model.pt", method="flow")[0].flow_net.hparams
    for bad, fragment in (("4;2", "comma-separated"), ("8", "refine_strides")):
        code, out, err = run(capsys, "train", "--method", "flow", "--out", tmp_path / "f3", "--refine-strides", bad,
                             *common)
        assert code == 2 and fragment in err and "Traceback" not in err, (bad, err)
    # a coarser correlation level from the same model: --stride 16 with levels at 8 and 4
    code, out, err = run(capsys, "train", "--method", "flow", "--out", tmp_path / "f16", "--init",
                         tmp_path / "flow" / "model.pt", "--stride", "16", "--refine-strides", "8,4", *common)
    assert code == 0, err
    hp = operator_from_file(tmp_path / "f16" / "model.pt", method="flow")[0].flow_net.hparams
    assert hp["stride"] == 16 and hp["refine_strides"] == [8, 4]
    # resuming needs no architecture options: the checkpoint's is kept
    code, out, err = run(capsys, "train", "--method", "flow", "--out", tmp_path / "f16", *common[:-4], "--iterations",
                         "4", "--lr", "1e-3")
    assert code == 0, err
    assert "resumed from" in out and "keeps the checkpoint's architecture" in out
    assert operator_from_file(tmp_path / "f16" / "model_last.pt", method="flow")[1]["iterations"] == 4
    # the attention sees the matching evidence unless --no-evidence
    for extra, evidence in (([], True), (["--no-evidence"], False)):
        code, out, err = run(capsys, "train", "--method", "ppc-flow-attention", "--out", tmp_path / f"pfa{evidence}",
                             "--init", tmp_path / "f16" / "model.pt", *extra, *common)
        assert code == 0, err
        op, meta = operator_from_file(tmp_path / f"pfa{evidence}" / "model.pt", method="ppc-flow-attention")
        assert op.evidence is evidence and meta["evidence"] is evidence


def test_match_evidence_prefers_the_true_correspondences_on_real_data(root):
    """On the real chest CT's samples, the ground-truth matches have more image support (patch correlation, gradient
    agreement) than the uncorrected positions (zero flow), where the displacement is a few pixels or more."""
    from PPCRegistrationLib.networks import match_evidence, network_inputs

    data = ShardDataset(root, "train")
    batch = _collate([data[j] for j in range(len(data))])
    dg, xg = network_inputs(batch["drr"], batch["xray"])
    m = batch["mask"] & (batch["flow_gt"].norm(dim=-1) > 3)
    assert int(m.sum()) > 20
    true = match_evidence(dg, xg, batch["uv"], batch["uv"] + batch["flow_gt"], batch["mask"])
    none = match_evidence(dg, xg, batch["uv"], batch["uv"], batch["mask"])
    for channel in (0, 3):  # gradient cosine, patch NCC
        assert true[..., channel][m].mean() > none[..., channel][m].mean() + 0.1, channel


def test_pose_losses_through_the_ppc_layer(root):
    """The mRPD loss is the re-projection part of the error: below the mTRE, and it passes gradients too."""
    data = ShardDataset(root, "train")
    batch = _collate([data[j] for j in range(4)])
    torch.manual_seed(0)
    op = LearnedOperator("ppc-flow", network_pixel_mm=PIXEL_MM)
    st = operator_step(op, batch)
    assert (st["mrpd_after"] <= st["mtre_after"] + 1e-9).all()
    for pose in ("mtre", "mrpd"):
        op.zero_grad()
        loss = compute_loss("ppc-flow", operator_step(op, batch), lambda_epe=0.0, pose_loss=pose)
        loss.backward()
        g = sum(float(p.grad.abs().sum()) for p in op.parameters() if p.grad is not None)
        assert math.isfinite(float(loss.detach())) and g > 0, pose
    with pytest.raises(InputError, match="pose loss"):
        compute_loss("ppc-flow", st, pose_loss="depth")
    with pytest.raises(InputError, match="pose loss"):
        TrainConfig(method="ppc-flow", pose_loss="depth")


def json_load(path: Path) -> dict:
    import json
    return json.loads(path.read_text())
