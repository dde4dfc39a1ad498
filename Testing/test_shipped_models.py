"""The shipped learned operators (Resources/Models): they load and verify, their model cards exist, they were
trained on the sample chest CT only, and on the held-out lumbar CT one update reduces the error."""

from __future__ import annotations

import pytest

from PPCRegistrationLib import methods
from PPCRegistrationLib.evaluation import evaluate


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("method", methods.LEARNED_METHODS)
def test_shipped_model_loads_with_its_card(method):
    path = methods.default_model_path(method)
    assert path.is_file(), f"{path} missing: run scripts/train_models.sh"
    m = methods.resolve_method(method)
    assert m.operator.method == method and not m.operator.training
    meta = m.model_meta
    assert meta["iterations"] > 0 and meta["train_samples"] >= 1000
    # split by patient: trained on the sample chest CT's vertebrae, validated on held-out ones
    assert set(meta["val_vertebrae"]).isdisjoint(meta["train_vertebrae"])
    card = path.with_suffix(".md").read_text()
    assert "lumbar" in card and "Far from convergence" in card
    assert path.stat().st_size < 5_000_000


def test_shipped_ppc_flow_attention_reduces_error_on_the_held_out_lumbar_ct(lumbar_l3):
    """One update from 20 mm on 6 cases of the lumbar CT (never seen in training): the mean error falls."""
    ct, roi, renderer, surface = lumbar_l3
    res = evaluate(ct, roi, ["ppc-flow-attention"], n_cases=6, seed=1000, mtre_range=(20.0, 20.0), iterations=1,
                   progress=False, renderer=renderer, surface=surface)
    one = res["summary"]["methods"]["ppc-flow-attention"]["one_update"]
    assert one["mtre_mean"] < 0.9 * res["summary"]["initial"]["mtre_mean"]


def test_mirror_averaged_flow_removes_the_bias_at_the_true_pose(lumbar_l3):
    """At the true pose the DRR matches the X-ray and the flow should vanish. On six lumbar views the shipped flow
    network, run once, leaves a mean displacement of its contour points; averaged over the four mirrorings it is
    smaller (the network's mirror-dependent bias cancels), and so is the update it causes."""
    import torch

    from PPCRegistrationLib.registration import RegistrationConfig
    from PPCRegistrationLib.simulation import ViewSampler, make_case

    ct, roi, renderer, surface = lumbar_l3
    flow = methods.resolve_method("flow")
    targets = surface.points.double()
    out = {}
    for flips in (1, 4):
        cfg = RegistrationConfig().updated({"guards.max_iterations": 1, "refine.iterations": 0,
                                            "learned.flow_flips": flips})
        bias, moved = [], []
        for seed in range(4, 10):
            case = make_case(renderer, targets, seed, (0.0, 45.0), ViewSampler(detector_size_px=256))
            reg = flow.registration(ct, case.xray, case.projection, case.T_gt, roi, cfg, T_gt=case.T_gt,
                                    surface=surface, renderer=renderer)
            st = reg.step()
            d = (st.uv_matched - st.uv)[st.weights > 0]
            bias.append(float(d.mean(0).norm()))
            moved.append(st.mtre_mm)
        out[flips] = (sum(bias) / len(bias), sum(moved) / len(moved))
    # measured: mean displacement 0.77 -> 0.54 px, update 0.84 -> 0.57 mm
    assert out[4][0] < 0.85 * out[1][0], out
    assert out[4][1] < 0.85 * out[1][1], out
