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
