"""The learned operator: FlowNetC shapes, correlation, end-to-end gradients through the PPC solve, a few
training steps, model files and the LearnedMatcher."""

import pytest
import torch
import torch.nn.functional as F

from PPCRegistrationLib.errors import ModelFileError
from PPCRegistrationLib.geometry import Projection, carm_pose, centred_update, se3_exp
from PPCRegistrationLib.metrics import mtre
from PPCRegistrationLib.networks import (POINT_FEATURES, FlowNetC, LearnedMatcher, PointNetAttention, correlation,
                                         correlation_displacements, load_model, point_features, sample_flow,
                                         save_model, state_dict_sha256)
from PPCRegistrationLib.ppc import solve_ppc

torch.set_num_threads(1)


def _smooth_image(h, w, seed=0, sigma=2.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 1, h, w, generator=g)
    r = int(3 * sigma)
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="circular"), k.reshape(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="circular"), k.reshape(1, 1, -1, 1))
    return x[0, 0]


def _grad(img):
    """(H, W) -> (1, 2, H, W) central differences (d/du, d/dv)."""
    p = F.pad(img[None, None], (1, 1, 1, 1), mode="replicate")[0, 0]
    gu = (p[1:-1, 2:] - p[1:-1, :-2]) / 2
    gv = (p[2:, 1:-1] - p[:-2, 1:-1]) / 2
    return torch.stack([gu, gv])[None]


def test_flownetc_shapes_odd_window_and_size():
    torch.manual_seed(0)
    net = FlowNetC()
    assert sum(p.numel() for p in net.parameters()) < 1_500_000
    x = torch.randn(2, 2, 97, 131)
    d = torch.randn(2, 2, 97, 131) * 100.0  # different scales: normalised inside
    flow, coarse = net(x, d)
    assert flow.shape == (2, 2, 97, 131)
    assert coarse.shape == (2, 2, 25, 33)
    assert torch.isfinite(flow).all() and torch.isfinite(coarse).all()
    net8 = FlowNetC(stride=8, max_disp=4)
    flow8, coarse8 = net8(x[:1], d[:1])
    assert flow8.shape == (1, 2, 97, 131) and coarse8.shape == (1, 2, 13, 17)
    # a constant (all-zero gradient) image stays finite
    flow0, _ = net(torch.zeros(1, 2, 33, 35), torch.zeros(1, 2, 33, 35))
    assert torch.isfinite(flow0).all()


def test_upsampled_flow_is_coarse_flow_times_stride():
    net = FlowNetC()
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.copy_(torch.tensor([1.5, -0.5]))
    flow, coarse = net(torch.randn(1, 2, 41, 50), torch.randn(1, 2, 41, 50))
    assert torch.allclose(coarse[0, 0], torch.full_like(coarse[0, 0], 1.5))
    assert torch.allclose(flow[0, 0], torch.full_like(flow[0, 0], 6.0))
    assert torch.allclose(flow[0, 1], torch.full_like(flow[0, 1], -2.0))


@pytest.mark.parametrize("shift", [(2, -1), (0, 3), (-3, -3)])
def test_correlation_peaks_at_true_shift(shift):
    du, dv = shift
    g = torch.Generator().manual_seed(3)
    f1 = torch.randn(1, 16, 24, 28, generator=g)
    f2 = torch.roll(f1, shifts=(dv, du), dims=(2, 3))  # f2(p + s) = f1(p)
    corr = correlation(f1, f2, max_disp=4)
    assert corr.shape == (1, 81, 24, 28)
    k = int(corr[0, :, 5:-5, 5:-5].mean((1, 2)).argmax())
    assert correlation_displacements(4)[k].tolist() == [du, dv]
    # per pixel too, in the interior
    kk = corr[0, :, 5:-5, 5:-5].argmax(0)
    assert (kk == k).float().mean() > 0.95


def test_sample_flow_bilinear_and_border():
    v, u = torch.meshgrid(torch.arange(6.0), torch.arange(8.0), indexing="ij")
    flow = torch.stack([2 * u + 1, -v])[None]  # linear in u and v: bilinear sampling is exact
    uv = torch.tensor([[[0.0, 0.0], [3.25, 2.5], [7.0, 5.0], [20.0, -3.0]]])
    out = sample_flow(flow, uv)
    assert out.shape == (1, 4, 2)
    assert torch.allclose(out[0, :3], torch.tensor([[1.0, 0.0], [7.5, -2.5], [15.0, -5.0]]))
    assert torch.allclose(out[0, 3], torch.tensor([15.0, 0.0]))  # clamped to the border pixel (7, 0)


def _scene(seed=0, n=120):
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(n, 3, generator=g, dtype=torch.float64)
    d = d / d.norm(dim=-1, keepdim=True)
    scale = torch.tensor([1.0, 0.7, 1.3], dtype=torch.float64)
    pts = d * 30.0 * scale
    grads = d / scale
    proj = Projection.from_carm(carm_pose(20.0, 10.0, 780.0, torch.zeros(3)), 1200.0, 64, 72, 4.0)
    return pts, grads, proj


def test_gradients_flow_end_to_end_through_ppc():
    torch.manual_seed(0)
    pts, grads, proj = _scene()
    net, att = FlowNetC(), PointNetAttention()
    T_gt = se3_exp(torch.tensor([[0.02, -0.01, 0.015, 1.0, -2.0, 0.5]], dtype=torch.float64))
    uv = proj.project(pts[None])  # DRR positions (1, N, 2)
    assert (uv[..., 0] > 0).all() and (uv[..., 0] < 71).all() and (uv[..., 1] > 0).all() and (uv[..., 1] < 63).all()
    img = _smooth_image(64, 72, seed=1)
    flow, _ = net(_grad(torch.roll(img, 1, 1)), _grad(img))
    uv_m = uv + sample_flow(flow, uv.float()).double()
    mask = torch.ones(1, uv.shape[1], dtype=torch.bool)
    feats = point_features(uv, uv_m, pts[None], grads[None], proj.source, None, mask)
    assert feats.shape == (1, uv.shape[1], POINT_FEATURES) and torch.isfinite(feats).all()
    w = att(feats.float(), mask).double()
    sol = solve_ppc(pts[None], grads[None], proj.source, proj.ray_directions(uv_m), w)
    T_est = centred_update(sol.dv, sol.centre, torch.eye(4, dtype=torch.float64)[None])
    loss = mtre(T_est, T_gt, pts[::10]).mean() + 0.1 * (uv_m - uv).norm(dim=-1).mean()
    loss.backward()
    for name, mod in (("flow", net), ("attention", att)):
        gnorm = sum(float(p.grad.abs().sum()) for p in mod.parameters() if p.grad is not None)
        assert gnorm > 0 and torch.isfinite(torch.tensor(gnorm)), name
    assert net.encoder[0][0].weight.grad.abs().sum() > 0  # reaches the first encoder layer
    assert att.local[0].weight.grad.abs().sum() > 0


def test_pointnet_mask_excludes_padding():
    torch.manual_seed(1)
    att = PointNetAttention(in_features=5)
    x = torch.randn(2, 10, 5)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[:, 7:] = False
    w = att(x, mask)
    assert w.shape == (2, 10) and (w[:, :7] > 0).all() and (w[:, :7] < 1).all() and (w[:, 7:] == 0).all()
    x2 = x.clone()
    x2[:, 7:] = 1e3 * torch.randn(2, 3, 5)  # padding content does not change the valid points' weights
    assert torch.allclose(att(x2, mask)[:, :7], w[:, :7])
    assert torch.allclose(att(x[:, :7]), w[:, :7], atol=1e-6)
    w0 = att(x, torch.zeros(2, 10, dtype=torch.bool))
    assert torch.isfinite(w0).all() and (w0 == 0).all()


def test_few_adam_steps_reduce_endpoint_error():
    torch.manual_seed(0)
    img = _smooth_image(48, 48, seed=2)
    drr_g, xray_g = _grad(img), _grad(torch.roll(img, shifts=(0, 2), dims=(0, 1)))
    gt = torch.tensor([2.0, 0.0]).reshape(1, 2, 1, 1)
    net = FlowNetC()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    def epe():
        flow, _ = net(xray_g, drr_g)
        return (flow - gt)[:, :, 6:-6, 6:-6].norm(dim=1).mean()

    with torch.no_grad():
        e0 = float(epe())
    for _ in range(25):
        opt.zero_grad()
        loss = epe()
        loss.backward()
        opt.step()
    with torch.no_grad():
        e1 = float(epe())
    assert e1 < 0.5 * e0, (e0, e1)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    net, att = FlowNetC(stride=8, max_disp=3, channels=32, decoder_channels=(64, 32)), PointNetAttention(hidden=32)
    save_model(tmp_path / "f.pt", net, {"epochs": 3, "note": "test"})
    save_model(tmp_path / "a.pt", att, {})
    net2, meta = load_model(tmp_path / "f.pt", "flownetc")
    att2, _ = load_model(tmp_path / "a.pt", "pointnet_attention")
    assert meta == {"epochs": 3, "note": "test"}
    assert net2.hparams == net.hparams
    x, d = torch.randn(1, 2, 37, 45), torch.randn(1, 2, 37, 45)
    with torch.no_grad():
        assert torch.equal(net(x, d)[0], net2(x, d)[0])
        f = torch.randn(1, 9, POINT_FEATURES)
        assert torch.equal(att(f), att2(f))


def test_bad_model_files_raise(tmp_path):
    torch.manual_seed(0)
    net = FlowNetC(channels=16, decoder_channels=(32,))
    good = tmp_path / "good.pt"
    save_model(good, net, {})
    with pytest.raises(ModelFileError, match="not found"):
        load_model(tmp_path / "missing.pt", "flownetc")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(ModelFileError, match="not a readable model file"):
        load_model(junk, "flownetc")
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(ModelFileError):
        load_model(truncated, "flownetc")
    with pytest.raises(ModelFileError, match="expected 'pointnet_attention'"):
        load_model(good, "pointnet_attention")
    payload = torch.load(good, weights_only=True)
    # wrong checksum: a parameter changed after saving
    tampered = dict(payload, state_dict=dict(payload["state_dict"]))
    key = "head.bias"
    tampered["state_dict"][key] = tampered["state_dict"][key] + 1.0
    torch.save(tampered, tmp_path / "tampered.pt")
    with pytest.raises(ModelFileError, match="SHA-256"):
        load_model(tmp_path / "tampered.pt", "flownetc")
    # shapes that do not fit the stored architecture (with a consistent checksum)
    wrong = dict(payload, state_dict=dict(payload["state_dict"]))
    wrong["state_dict"]["head.weight"] = torch.zeros(2, 7, 3, 3)
    wrong["sha256"] = state_dict_sha256(wrong["state_dict"])
    torch.save(wrong, tmp_path / "shapes.pt")
    with pytest.raises(ModelFileError, match="mismatched shapes"):
        load_model(tmp_path / "shapes.pt", "flownetc")
    # another format / a newer version
    torch.save(dict(payload, format="something else"), tmp_path / "fmt.pt")
    with pytest.raises(ModelFileError, match="not a"):
        load_model(tmp_path / "fmt.pt", "flownetc")
    torch.save(dict(payload, version=99), tmp_path / "ver.pt")
    with pytest.raises(ModelFileError, match="version"):
        load_model(tmp_path / "ver.pt", "flownetc")


def test_learned_matcher_on_small_window():
    torch.manual_seed(0)
    pts, grads, proj = _scene(n=40)
    h, w = 64, 72
    img = _smooth_image(h, w, seed=4)
    drr_g, xray_g = _grad(img), _grad(torch.roll(img, 1, 0))
    uv = proj.project(pts[None]).float()
    n = uv.shape[1]
    normals = torch.nn.functional.normalize(torch.randn(1, n, 2), dim=-1)
    mask = torch.ones(1, n, dtype=torch.bool)
    mask[0, ::5] = False
    net = FlowNetC()
    ctx = {"iteration": 0, "sigma_px": 1.0, "points_3d": pts[None], "gradients_3d": grads[None],
           "source": proj.source}
    for att in (None, PointNetAttention()):
        matcher = LearnedMatcher(net, att)
        uv_m, wts = matcher(img[None], img[None], drr_g, xray_g, uv, normals, mask, 20.0, ctx)
        assert uv_m.shape == (1, n, 2) and wts.shape == (1, n)
        assert uv_m.dtype == uv.dtype and torch.isfinite(uv_m).all()
        assert (wts >= 0).all() and (wts <= 1).all()
        assert (wts[~mask] == 0).all() and (wts[mask] > 0).all()
        assert not uv_m.requires_grad
    # with a zero search range every displaced match is dropped
    _, w0 = LearnedMatcher(net)(img[None], img[None], drr_g, xray_g, uv, normals, mask, 1e-9, ctx)
    assert (w0 == 0).all()
    # the attention needs the 3D context
    with pytest.raises(Exception, match="points_3d"):
        LearnedMatcher(net, PointNetAttention())(img[None], img[None], drr_g, xray_g, uv, normals, mask, 20.0,
                                                 {"iteration": 0})


def test_matcher_odd_window_pads_inside():
    net = FlowNetC()
    g = torch.randn(1, 2, 45, 61)
    uv = torch.tensor([[[3.0, 4.0], [60.0, 44.0], [30.5, 22.5]]])
    uv_m, wts = LearnedMatcher(net)(None, None, g, g, uv, torch.zeros_like(uv), torch.ones(1, 3, dtype=torch.bool),
                                    20.0, {})
    assert uv_m.shape == (1, 3, 2) and wts.shape == (1, 3) and ((wts >= 0) & (wts <= 1)).all()


def test_learned_operator_round_trip(tmp_path):
    """The CPU operator (soft-argmax cost volume) saves and loads exactly, and a wrong method is refused."""
    from PPCRegistrationLib.networks import LearnedOperator, operator_from_file

    torch.manual_seed(0)
    op = LearnedOperator("ppc-flow").eval()
    assert op.flow_net.hparams["soft_argmax"] is True
    img = _smooth_image(96, 96, seed=3, sigma=3.0)
    shift = 8  # pixels along u: the X-ray is the DRR moved right
    xray = torch.roll(img, shifts=shift, dims=1)
    uv = torch.tensor([[[48.0, 48.0], [40.0, 52.0], [56.0, 44.0]]])
    with torch.no_grad():
        out = op(img[None], xray[None], uv)
    assert out["flow"].shape == (1, 3, 2) and torch.isfinite(out["flow"]).all()
    assert float(out["flow"].abs().max()) <= 4 * 8 + 1e-3 + float(op.flow_net.head.bias.detach().abs().max()) * 8 + 1
    path = tmp_path / "op.pt"
    save_model(path, op, {"note": "test"})
    op2, meta = operator_from_file(path, method="ppc-flow")
    with torch.no_grad():
        out2 = op2(img[None], xray[None], uv)
    assert torch.equal(out["flow"], out2["flow"]) and meta["note"] == "test"
    with pytest.raises(ModelFileError):
        operator_from_file(path, method="flow")


# ----------------------------------------------------------------------------- refinement levels (PWC-style)

def test_warp_shifts_features_by_the_flow():
    from PPCRegistrationLib.networks import warp
    f = torch.randn(1, 3, 20, 24)
    flow = torch.zeros(1, 2, 20, 24)
    flow[:, 0] = 2.0  # sample 2 pixels to the right
    flow[:, 1] = -1.0  # and 1 up
    out = warp(f, flow)
    assert torch.allclose(out[..., 1:, :-2], f[..., :-1, 2:], atol=1e-5)
    assert out[..., :, -2:].abs().max() < 1e-5 and out[..., 0, :].abs().max() < 1e-5  # zero outside


def test_refinement_levels_shapes_hparams_and_round_trip(tmp_path):
    from PPCRegistrationLib.errors import InputError
    torch.manual_seed(0)
    for strides in ([4], [4, 2]):
        net = FlowNetC(stride=8, max_disp=3, channels=16, decoder_channels=(32,), first_channels=8,
                       soft_argmax=True, refine_strides=strides, refine_disp=2)
        assert net.hparams["refine_strides"] == strides and len(net.refinements) == len(strides)
        x, d = torch.randn(2, 2, 45, 38), torch.randn(2, 2, 45, 38)
        flow, coarse = net(x, d)
        assert flow.shape == (2, 2, 45, 38) and coarse.shape == (2, 2, 6, 5)
        flow.square().mean().backward()  # the refinement levels get gradients
        for r in net.refinements:
            assert r.head.weight.grad is not None and r.head.weight.grad.abs().sum() > 0
        save_model(tmp_path / "r.pt", net, {})
        net2, _ = load_model(tmp_path / "r.pt", "flownetc")
        with torch.no_grad():
            assert torch.equal(net(x, d)[0], net2(x, d)[0])
    assert "refine_strides" not in FlowNetC().hparams  # files of models without refinement are unchanged
    for bad in ([8], [2, 4], [4, 4], [3]):
        with pytest.raises(InputError, match="refine_strides"):
            FlowNetC(stride=8, refine_strides=bad)
    for bad in ([16], [4, 8], [8, 8]):
        with pytest.raises(InputError, match="refine_strides"):
            FlowNetC(stride=16, refine_strides=bad)
    with pytest.raises(InputError, match="stride"):
        FlowNetC(stride=32)


def test_stride_16_correlation_level_with_two_refinement_levels(tmp_path):
    """A stride-16 correlation level (reach 16 x max_disp pixels) refined at strides 8 and 4: shapes for a window
    that is no multiple of 16, gradients in every level, exact save/load."""
    torch.manual_seed(0)
    net = FlowNetC(stride=16, max_disp=2, channels=16, decoder_channels=(32,), first_channels=8, soft_argmax=True,
                   refine_strides=[8, 4], refine_disp=2)
    assert len(net.encoder) == 8 and net.hparams["stride"] == 16 and net.hparams["refine_strides"] == [8, 4]
    x, d = torch.randn(2, 2, 50, 37), torch.randn(2, 2, 50, 37)
    flow, coarse = net(x, d)
    assert flow.shape == (2, 2, 50, 37) and coarse.shape == (2, 2, 4, 3)
    flow.square().mean().backward()
    assert net.encoder[7][0].weight.grad.abs().sum() > 0  # the stride-16 stage learns
    for r in net.refinements:
        assert r.head.weight.grad.abs().sum() > 0
    save_model(tmp_path / "s16.pt", net, {})
    net2, _ = load_model(tmp_path / "s16.pt", "flownetc")
    with torch.no_grad():
        assert torch.equal(net(x, d)[0], net2(x, d)[0])


def test_refinement_level_corrects_the_flow_it_is_given():
    """A refinement level, untrained, on X-ray features that are the DRR features moved by one pixel: from a zero
    flow its local cost volume (soft-argmax) moves the flow towards the shift; given the right flow, the warped
    features align and it leaves the flow as it is. (Replaces a 40-step training comparison whose outcome
    depended on the CPU's floating-point path.)"""
    from PPCRegistrationLib.networks import FlowRefinement

    torch.manual_seed(0)
    feats = torch.stack([_smooth_image(32, 32, seed=10 + c, sigma=1.5) for c in range(8)])[None]  # (1, 8, 32, 32)
    xray = torch.roll(feats, shifts=1, dims=3)  # X-ray feature at p + (1, 0) = DRR feature at p
    level = FlowRefinement(8, max_disp=2)
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4))
    with torch.no_grad():
        from_zero = level(feats, xray, torch.zeros(1, 2, 32, 32))
        from_right = level(feats, xray, torch.tensor([1.0, 0.0]).reshape(1, 2, 1, 1).expand(1, 2, 32, 32))
    mean_zero, mean_right = from_zero[inner].mean((0, 2, 3)), from_right[inner].mean((0, 2, 3))  # (u, v) pixels
    assert mean_zero[0] > 0.6 and abs(float(mean_zero[1])) < 0.1
    assert abs(float(mean_right[0]) - 1) < 0.1 and abs(float(mean_right[1])) < 0.1


# ----------------------------------------------------------------------------- matching evidence for the attention


def test_match_evidence_separates_right_from_wrong_matches():
    """Right matches of a shifted image pair: gradients agree (cosine ~ 1), patches correlate (NCC ~ 1) and they fit
    the common (affine) motion; wrong matches (moved 7 px off) correlate less and stand out of the motion. Masked
    points are zero and do not change the others' evidence."""
    from PPCRegistrationLib.networks import EVIDENCE_FEATURES, match_evidence

    img = _smooth_image(64, 64, seed=4, sigma=2.0)
    xray = torch.roll(img, shifts=(0, 3), dims=(0, 1))  # the X-ray is the DRR moved 3 px right
    g = torch.Generator().manual_seed(0)
    uv = 12 + 40 * torch.rand(1, 60, 2, generator=g)
    right = uv + torch.tensor([3.0, 0.0])
    wrong = right.clone()
    wrong[:, ::4] += torch.tensor([0.0, 7.0])
    is_wrong = torch.zeros(60, dtype=torch.bool)
    is_wrong[::4] = True
    ev = match_evidence(_grad(img), _grad(xray), uv, wrong)
    assert ev.shape == (1, 60, EVIDENCE_FEATURES) and torch.isfinite(ev).all()
    cos, ncc, resid = ev[0, :, 0], ev[0, :, 3], ev[0, :, 4]
    assert cos[~is_wrong].mean() > 0.95 and ncc[~is_wrong].mean() > 0.95
    assert ncc[is_wrong].mean() < ncc[~is_wrong].mean() - 0.3
    assert resid[is_wrong].mean() > 3 * resid[~is_wrong].mean()
    ok = match_evidence(_grad(img), _grad(xray), uv, right)
    assert ok[0, :, 4].max() < 0.05  # a pure shift is an affine motion: no point stands out
    mask = torch.ones(1, 60, dtype=torch.bool)
    mask[:, :10] = False
    garbage = right.clone()
    garbage[:, :10] += 30.0
    a = match_evidence(_grad(img), _grad(xray), uv, right, mask)
    b = match_evidence(_grad(img), _grad(xray), uv, garbage, mask)
    assert (a[0, :10] == 0).all() and torch.allclose(a[0, 10:], b[0, 10:], atol=1e-5)


def test_learned_operator_with_evidence_round_trip_and_old_files(tmp_path):
    """An attention operator with matching evidence records it in its file and loads exactly; one without (the
    files written before it existed) still loads and has none; an inconsistent attention width is refused."""
    from PPCRegistrationLib.errors import InputError
    from PPCRegistrationLib.networks import EVIDENCE_FEATURES, LearnedOperator, operator_from_file

    pts, grads, proj = _scene()
    uv = proj.project(pts[None]).float()
    img = _smooth_image(64, 72, seed=1)
    xray = torch.roll(img, 2, 1)
    for evidence in (True, False):
        torch.manual_seed(0)
        op = LearnedOperator("ppc-flow-attention", evidence=evidence).eval()
        assert op.attention.hparams["in_features"] == POINT_FEATURES + (EVIDENCE_FEATURES if evidence else 0)
        assert ("evidence" in op.hparams) is evidence
        with torch.no_grad():
            out = op(img[None], xray[None], uv, None, pts[None], grads[None], proj.source)
        assert out["weights"].shape == uv.shape[:2] and ((out["weights"] > 0) & (out["weights"] < 1)).all()
        save_model(tmp_path / f"op{evidence}.pt", op, {})
        op2, _ = operator_from_file(tmp_path / f"op{evidence}.pt")
        assert op2.evidence is evidence
        with torch.no_grad():
            assert torch.equal(op2(img[None], xray[None], uv, None, pts[None], grads[None], proj.source)["weights"],
                               out["weights"])
    assert LearnedOperator("ppc-flow", evidence=True).evidence is False  # only the attention uses it
    with pytest.raises(InputError, match="in_features"):
        LearnedOperator("ppc-flow-attention", attention={"in_features": POINT_FEATURES}, evidence=True)


def test_mirror_averaged_flow_undoes_each_mirroring():
    """The mirror-averaged flow equals the mean of four single passes over mirrored *images* (gradients computed
    after mirroring), each flow mirrored back; one "flip" is the network itself; other counts are refused."""
    from PPCRegistrationLib.errors import InputError
    from PPCRegistrationLib.networks import MIRRORINGS, mirror_averaged_flow, network_inputs

    torch.manual_seed(0)
    net = FlowNetC(stride=8, max_disp=2, channels=8, decoder_channels=(8,), first_channels=4, soft_argmax=True,
                   refine_strides=(4,)).eval()
    drr, xray = _smooth_image(40, 48, 1)[None], _smooth_image(40, 48, 2)[None]
    with torch.no_grad():
        dg, xg = network_inputs(drr, xray)
        assert torch.equal(mirror_averaged_flow(net, xg, dg, 1), net(xg, dg)[0])
        got = mirror_averaged_flow(net, xg, dg, 4)
        ref = []
        for fu, fv in MIRRORINGS:
            dims = [d for d, f in ((2, fu), (1, fv)) if f]
            d_m, x_m = network_inputs(drr.flip(dims), xray.flip(dims))
            f = net(x_m, d_m)[0]
            f = f.flip([d + 1 for d in dims])  # back to the original pixels
            f = f * torch.tensor([-1.0 if fu else 1.0, -1.0 if fv else 1.0]).view(1, 2, 1, 1)  # and directions
            ref.append(f)
        ref = torch.stack(ref).mean(0)
    # the Gaussian derivative's borders differ by rounding only
    assert torch.allclose(got, ref, atol=1e-4), float((got - ref).abs().max())
    assert not torch.allclose(got, net(xg, dg)[0], atol=1e-4)
    with pytest.raises(InputError, match="flips"):
        mirror_averaged_flow(net, xg, dg, 3)
