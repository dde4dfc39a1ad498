"""The learned operator alone (method ``learned``, docs/design.md §5.4): the normal matcher network, its training on
its own unrolled trajectories through the PPC solve, the patient adaptation, and the method on the real lumbar CT."""

from __future__ import annotations

import hashlib
import random

import pytest
import torch

from PPCRegistrationLib.errors import InputError, ModelFileError
from PPCRegistrationLib.learned_recipe import PatientSpec, adapt, load_scenes
from PPCRegistrationLib.model_files import load_model, save_model
from PPCRegistrationLib.normal_matcher import NormalMatcher, NormalMatcherNet, gradient_profiles
from PPCRegistrationLib.simulation import random_initial_transform
from PPCRegistrationLib.trajectory_training import (TrajectoryConfig, make_training_case, train_trajectories,
                                                    unrolled_loss)


@pytest.fixture(scope="module")
def popi_scene(shared_data, one_torch_thread):
    spec = PatientSpec("popi_thorax", str(shared_data / "popi_thorax" / "ct.nii.gz"),
                       str(shared_data / "popi_thorax" / "labels.nii.gz"), ("T8",))
    return spec, load_scenes([spec])[0]


def test_profiles_sample_the_gradient_along_the_normal_and_across_it():
    # a vertical edge at u = 20: the gradient is along +u; a normal (1, 0) sees it at offset +5 from u = 15
    img = torch.zeros(1, 2, 40, 40)
    img[0, 0, :, 20] = 1.0
    prof = gradient_profiles(img, torch.tensor([[15.0, 20.0]]), torch.tensor([[1.0, 0.0]]),
                             torch.arange(-8, 9, dtype=torch.float32), torch.tensor([0.0]))
    assert prof.shape == (1, 2, 17)
    assert int(prof[0, 0].argmax()) == 8 + 5 and float(prof[0, 0].max()) == pytest.approx(1.0, abs=1e-4)
    assert float(prof[0, 1].abs().max()) == 0.0  # nothing along the tangent
    # turned by 90 degrees the same edge is seen only by the tangent channel
    prof = gradient_profiles(img, torch.tensor([[20.0, 20.0]]), torch.tensor([[0.0, 1.0]]),
                             torch.arange(-2, 3, dtype=torch.float32), torch.tensor([0.0]))
    assert float(prof[0, 0].abs().max()) == 0.0 and float(prof[0, 1].abs().max()) == pytest.approx(1.0, abs=1e-4)


def test_the_network_outputs_one_displacement_and_weight_per_point_and_respects_the_mask():
    torch.manual_seed(0)
    net = NormalMatcherNet()
    n = 7
    dp, xp = torch.randn(n, 10, 25), torch.randn(n, 10, 73)
    mask = torch.tensor([True] * 5 + [False] * 2)
    out = net(dp, xp, mask)
    assert out["logits"].shape == (n, 49) and out["displacement"].shape == (n,)
    assert bool((out["displacement"].abs() <= 24).all())
    assert bool((out["weight"][5:] == 0).all()) and bool((out["weight"][:5] > 0).all())
    # the weights' PointNet pools only over the masked points: changing an unmasked point changes nothing
    xp2 = xp.clone()
    xp2[6] = 100 * torch.randn(10, 73)
    assert torch.allclose(net(dp, xp2, mask)["weight"][:5], out["weight"][:5])


def test_a_matcher_refuses_what_it_cannot_use():
    with pytest.raises(InputError):
        NormalMatcher(torch.nn.Linear(2, 2))
    m = NormalMatcher(NormalMatcherNet())
    with pytest.raises(InputError, match="normals"):
        m(torch.zeros(1, 30, 30), torch.zeros(1, 30, 30), None, None, torch.zeros(1, 3, 2), None,
          torch.ones(1, 3, dtype=torch.bool), 8.0, {})


def test_unrolled_training_lowers_its_loss_and_every_unrolled_solve_passes_gradients(popi_scene):
    _, scene = popi_scene
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    case = make_training_case(scene, gen)
    T0 = random_initial_transform(torch.eye(4, dtype=torch.float64), scene.targets, 4.0, gen)
    net = NormalMatcherNet()
    cfg = TrajectoryConfig(unroll=2, max_points=100000, out_of_plane=1.0, regularization=0.1)  # damped: small steps

    # gradients: the mTRE after the 2nd update reaches the network's displacements of the 1st update (through the
    # 1st solve, the pose, and the 2nd update's points, normals and profile positions) and of the 2nd
    trace: list = []
    loss, visited, info = unrolled_loss(net, case, T0, cfg, random.Random(0), trace=trace)
    assert len(trace) == 2 and len(visited) == 2
    d1, d2 = trace[0]["outputs"]["displacement"], trace[1]["outputs"]["displacement"]
    g1, g2 = torch.autograd.grad(trace[1]["mtre"], [d1, d2], retain_graph=True)
    assert float(g1.abs().sum()) > 0 and float(g2.abs().sum()) > 0
    loss.backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in net.parameters())
    assert float(net.enc_xray[0].weight.grad.abs().sum()) > 0 and float(net.weight_head[0].weight.grad.abs().sum()) > 0

    # a few steps on this one case lower the loss
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss, _, _ = unrolled_loss(net, case, T0, cfg, random.Random(0))
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert min(losses[-3:]) < 0.8 * losses[0], losses


def test_a_fine_tuning_that_validates_worse_returns_the_starting_weights(popi_scene):
    _, scene = popi_scene
    torch.manual_seed(2)
    net = NormalMatcherNet()
    start = {k: v.clone() for k, v in net.state_dict().items()}
    scores = iter([0.5, 0.9, 0.7])  # the starting weights, step 2, the end (step 3): none beats the start

    res = train_trajectories(net, [scene], TrajectoryConfig(steps=3, batch=1, unroll=1, pool=1, refresh_every=0,
                                                            max_points=64),
                             validate=lambda _n: next(scores), validate_every=2, validate_start=True)
    assert res["best_step"] == 0 and res["best_score"] == 0.5 and res["curves"]["val_step"] == [0, 2, 3]
    assert all(torch.equal(res["best_state"][k], start[k]) for k in start)
    assert any(not torch.equal(v, start[k]) for k, v in net.state_dict().items())  # the steps did change it


def _file_sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_adapt_writes_a_model_that_loads_and_a_cancelled_adaptation_keeps_the_previous_one(
        popi_scene, tmp_path):
    spec, _ = popi_scene
    init = tmp_path / "init.pt"
    torch.manual_seed(1)
    save_model(init, NormalMatcherNet(), {"solver": {"out_of_plane": 0.1, "regularization": 1e-5}})
    out = tmp_path / "adapted"
    res = adapt(spec.ct, spec.labels, "T8", out, init=init, budget_s=60, steps=2, neighbours=0, val_cases=2,
                config=TrajectoryConfig(batch=1, unroll=1, pool=2, refresh_every=0, max_points=64))
    assert res["status"] == "done" and res["steps"] == 2
    net, meta = load_model(out / "learned.pt", "normal_matcher")
    assert isinstance(net, NormalMatcherNet) and meta["steps"] == 2 and list(meta["train_patients"][0]["vertebrae"]) == ["T8"]
    # it keeps the solve its starting model was trained through (the loop runs the model with meta["solver"])
    assert meta["solver"] == {"out_of_plane": 0.1, "regularization": 1e-5}
    assert (out / "learned.md").is_file() and "train_seconds" in (out / "learned.md").read_text()
    before = _file_sha(out / "learned.pt")

    # cancelled after one step: the model file is untouched, the checkpoint resumes at that step
    calls = {"n": 0}

    def stop_after_one():
        calls["n"] += 1
        return calls["n"] > 1

    res = adapt(spec.ct, spec.labels, "T8", out, init=init, budget_s=60, steps=5, neighbours=0, resume=False, val_cases=2,
                should_stop=stop_after_one,
                config=TrajectoryConfig(batch=1, unroll=1, pool=2, refresh_every=0, max_points=64))
    assert res["status"] == "cancelled" and res["steps"] == 1
    assert _file_sha(out / "learned.pt") == before
    ck = torch.load(str(out / "learned.ckpt.pt"), weights_only=True)
    assert ck["step"] == 1


def test_adapt_refuses_bad_inputs(popi_scene, tmp_path):
    spec, _ = popi_scene
    with pytest.raises(ModelFileError):
        adapt(spec.ct, spec.labels, "T8", tmp_path, init=tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelFileError):
        adapt(spec.ct, spec.labels, "T8", tmp_path, init=bad, budget_s=5, steps=1)
    good = tmp_path / "good.pt"
    save_model(good, NormalMatcherNet(), {})
    with pytest.raises(InputError, match="L3"):
        adapt(spec.ct, spec.labels, "L3", tmp_path, init=good, budget_s=5)  # POPI holds T1-T10 only
    with pytest.raises(InputError, match="budget"):
        adapt(spec.ct, spec.labels, "T8", tmp_path, init=good, budget_s=0)


def test_ppcreg_train_learned_trains_on_one_patient_validates_on_another_and_refuses_the_same(shared_data, tmp_path):
    from PPCRegistrationLib.cli import main

    popi = f"popi={shared_data / 'popi_thorax' / 'ct.nii.gz'},{shared_data / 'popi_thorax' / 'labels.nii.gz'},T8"
    lidc = f"lidc={shared_data / 'lidc0314_chest' / 'ct.nii.gz'},{shared_data / 'lidc0314_chest' / 'labels.nii.gz'},T6"
    out = tmp_path / "run"
    assert main(["train-learned", "--train", popi, "--val", popi, "--out", str(out), "--steps", "1"]) == 2
    assert main(["train-learned", "--train", popi, "--val", lidc, "--out", str(out), "--steps", "2", "--val-cases",
                 "2", "--quiet"]) == 0
    net, meta = load_model(out / "learned.pt", "normal_matcher")
    assert meta["steps"] == 2 and meta["validation_patients"][0]["name"] == "lidc"
    assert meta["validation"]["cases"] == 2 and (out / "learned.curves.csv").is_file()
    assert main(["methods"]) == 0
