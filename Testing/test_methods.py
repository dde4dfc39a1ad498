"""Methods by name (PPCRegistrationLib.methods): classic, the learned operators from model files, and the chained
``<learned>+classic`` pipelines; the evaluation of several methods on the same cases (Table 1, Fig. 2).

The learned methods run with small *untrained* model files written into tmp folders (the trained weights are
shipped separately): these tests check the plumbing, not the accuracy.  Real CT: the lumbar CT (L3) at a
128-pixel detector.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from PPCRegistrationLib import methods
from PPCRegistrationLib.errors import InputError, ModelFileError
from PPCRegistrationLib.evaluation import SUMMARY_KEYS, evaluate, summary_markdown, write_report
from PPCRegistrationLib.networks import LearnedMatcher, LearnedOperator, save_model
from PPCRegistrationLib.normal_matcher import NormalMatcherNet
from PPCRegistrationLib.registration import Registration, RegistrationConfig
from PPCRegistrationLib.simulation import ViewSampler, make_case
from PPCRegistrationLib.geometry import transform_points

ROOT = Path(__file__).resolve().parents[1]

torch.set_num_threads(1)  # as test_networks: small operations, a shared 2-core machine


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    """Untrained model files of the three learned operators, named as in Resources/Models."""
    d = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    for m in methods.LEARNED_METHODS:
        save_model(d / f"{m}.pt", LearnedOperator(m), {"note": "untrained, for tests"})
    save_model(d / "learned.pt", NormalMatcherNet(), {"note": "untrained, for tests",
                                                      "solver": {"out_of_plane": 1.0, "regularization": 0.1}})
    return d


@pytest.fixture(scope="module")
def lumbar(lumbar_l3):
    ct, roi, renderer, surface = lumbar_l3
    case = make_case(renderer, surface.points, 0, (5, 10), ViewSampler(detector_size_px=128))
    return ct, roi, renderer, surface, case


def _run(lumbar, method: methods.Method, settings: dict | None = None):
    ct, roi, renderer, surface, case = lumbar
    reg = method.registration(ct, case.xray, case.projection, case.T_init, roi,
                              RegistrationConfig(device="cpu").updated(settings or {}), T_gt=case.T_gt,
                              surface=surface,
                              renderer=renderer)
    return reg, reg.run()


# ----------------------------------------------------------------------------- names and model files


def test_method_names_are_normalised_and_unknown_ones_rejected():
    assert methods.normalize_method("PPC_Flow_Attention + Classic") == "ppc-flow-attention+classic"
    assert methods.parse_methods(["classic,flow", "ppc-flow", "classic"]) == ["classic", "flow", "ppc-flow"]
    assert methods.learned_part("ppc-flow+classic") == "ppc-flow" and methods.learned_part("classic") is None
    assert set(methods.METHOD_LABELS) == set(methods.ALL_METHODS)
    with pytest.raises(InputError, match="unknown method 'magic'.*ppc-flow-attention\\+classic"):
        methods.normalize_method("magic")
    with pytest.raises(InputError, match="unknown method"):
        methods.parse_methods("classic+flow")  # only <learned>+classic chains exist


def test_default_model_path_is_resources_models_of_the_repository():
    assert methods.default_models_dir() == ROOT / "Resources" / "Models"
    assert methods.default_model_path("ppc-flow-attention+classic") == ROOT / "Resources" / "Models" / \
        "ppc-flow-attention.pt"
    # the Slicer module installs the same folder next to the library
    cmake = (ROOT / "PPCRegistration" / "CMakeLists.txt").read_text()
    assert "Resources/Models" in cmake and "${_models_source_dir}/*.pt" in cmake


def test_missing_model_file_names_the_file_and_how_to_get_one(tmp_path):
    with pytest.raises(ModelFileError) as err:
        methods.resolve_method("ppc-flow", models_dir=tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "ppc-flow.pt") in msg and "ppcreg train" in msg
    with pytest.raises(ModelFileError, match="nowhere.pt"):
        methods.resolve_method("flow+classic", model_path=tmp_path / "nowhere.pt")


def test_untrained_model_loads_and_corrupt_or_wrong_one_fails(models_dir, tmp_path):
    m = methods.resolve_method("ppc-flow-attention", models_dir=models_dir)
    assert isinstance(m.operator, LearnedOperator) and m.operator.method == "ppc-flow-attention"
    assert m.model_path == models_dir / "ppc-flow-attention.pt" and m.model_meta["note"].startswith("untrained")
    assert isinstance(m.matcher(), LearnedMatcher)
    cfg = m.config(RegistrationConfig().updated({"guards.max_iterations": 7}))
    got = (cfg.method, cfg.solver.kind, cfg.prealign.search_px, cfg.guards.max_iterations)
    assert got == ("ppc-flow-attention", "plain", 0.0, 7)
    assert methods.resolve_method("classic").operator is None
    # the learned search range is the operator's reach (+-32 network pixels of 380/256 mm) on the detector
    assert methods.learned_search_px(m.operator, 380 / 256) == pytest.approx(32.0)
    assert methods.learned_search_px(m.operator, 380 / 512) == pytest.approx(64.0)
    # damaged: bytes flipped in the middle of the file
    bad = tmp_path / "ppc-flow.pt"
    data = bytearray((models_dir / "ppc-flow.pt").read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="ppc-flow.pt"):
        methods.resolve_method("ppc-flow", model_path=bad)
    (tmp_path / "junk.pt").write_text("not a model")
    with pytest.raises(ModelFileError, match="junk.pt"):
        methods.resolve_method("ppc-flow", model_path=tmp_path / "junk.pt")
    # a model of another operator
    with pytest.raises(ModelFileError, match="'flow'"):
        methods.resolve_method("ppc-flow-attention", model_path=models_dir / "flow.pt")


# ----------------------------------------------------------------------------- pipelines on the real CT


def test_every_method_runs_a_few_updates(lumbar, models_dir):
    for name in methods.ALL_METHODS:
        m = methods.resolve_method(name, models_dir=models_dir)
        reg, res = _run(lumbar, m, {"guards.max_iterations": 2, "guards.tolerance_mm": 0.0, "refine.iterations": 0})
        assert 1 <= res.iterations <= 2, name
        assert res.history[0].operator == (methods.learned_part(name) or "classic"), name
        assert torch.isfinite(res.T).all(), name
        assert reg.mtre(res.T.to(reg.device)) < 60, name


def test_chain_switches_from_learned_to_classic_after_k_updates(lumbar, models_dir):
    m = methods.resolve_method("ppc-flow-attention+classic", models_dir=models_dir, learned_steps=2, switch_mm=0.0)
    seen = []
    ct, roi, renderer, surface, case = lumbar
    reg = m.registration(ct, case.xray, case.projection, case.T_init, roi,
                         RegistrationConfig(device="cpu").updated(
                             {"guards.max_iterations": 4, "guards.tolerance_mm": 0.0, "refine.iterations": 3}),
                         T_gt=case.T_gt, surface=surface, renderer=renderer)
    assert reg.schedule.name == "ppc-flow-attention+classic" and len(reg.schedule.attempts) == 7
    assert reg.phase.name == "ppc-flow-attention" and reg.phase.max_updates == 2
    res = reg.run(callback=seen.append)
    # the learned phase never refines; the classic phase ends with one intensity refinement update per scale
    n_refine = len(RegistrationConfig().refine.sigmas_px)
    assert [st.operator for st in res.history] == ["ppc-flow-attention"] * 2 + ["classic"] * 2 + ["refine"] * n_refine
    assert len(seen) == res.iterations == 4 + n_refine and res.status == "max_iterations"
    assert reg.phase.name == "classic" and reg.config.solver.kind == "robust" and reg.attempt == 1
    # reset goes back to the learned phase; step by step gives the same sequence
    reg.reset()
    assert reg.phase.name == "ppc-flow-attention" and reg.iteration == 0 and reg.config.solver.kind == "plain"
    assert torch.equal(reg.T.cpu(), case.T_init.to(torch.float64))
    ops = [reg.step().operator for _ in range(3)]
    assert ops == ["ppc-flow-attention", "ppc-flow-attention", "classic"]


def test_chain_switches_early_after_a_small_learned_update(lumbar, models_dir):
    # the untrained operator predicts an almost zero flow: its first update is tiny (< 0.5 mm), so the pipeline
    # goes on with classic updates instead of stopping as converged
    m = methods.resolve_method("ppc-flow+classic", models_dir=models_dir)
    reg, res = _run(lumbar, m, {"guards.max_iterations": 3, "refine.iterations": 0})
    ops = [st.operator for st in res.history]
    assert ops[0] == "ppc-flow" and ops[1:] == ["classic"] * (len(ops) - 1) and len(ops) >= 2
    assert res.history[0].update_mm < methods.DEFAULT_SWITCH_MM
    # alone, the same operator stops after that update (converged or not, but never more than max_iterations)
    solo, res2 = _run(lumbar, methods.resolve_method("ppc-flow", models_dir=models_dir), {"guards.max_iterations": 3})
    assert all(st.operator == "ppc-flow" for st in res2.history)


def test_stop_request_stops_a_chain(lumbar, models_dir):
    m = methods.resolve_method("flow+classic", models_dir=models_dir, learned_steps=1, switch_mm=0.0)
    ct, roi, renderer, surface, case = lumbar
    reg = m.registration(ct, case.xray, case.projection, case.T_init, roi,
                         RegistrationConfig(device="cpu").updated({"guards.max_iterations": 10}), surface=surface,
                         renderer=renderer)
    res = reg.run(callback=lambda st: reg.stop() if st.iteration == 2 else None)
    assert res.status == "stopped" and res.iterations == 2
    assert [st.operator for st in res.history] == ["flow", "classic"]


def test_build_registration_and_plain_registration_error(lumbar, models_dir):
    ct, roi, renderer, surface, case = lumbar
    reg = methods.build_registration("ppc-flow", ct, case.xray, case.projection, case.T_init, roi,
                                     RegistrationConfig(device="cpu").updated({"guards.max_iterations": 1}),
                                     model_path=models_dir / "ppc-flow.pt", surface=surface, renderer=renderer)
    assert isinstance(reg.matcher, LearnedMatcher) and reg.config.solver.kind == "plain"
    with pytest.raises(InputError, match="build_registration"):
        Registration(ct, case.xray, case.projection, case.T_init, roi, RegistrationConfig(method="ppc-flow"),
                     surface=surface, renderer=renderer)


# ----------------------------------------------------------------------------- evaluation


def test_evaluate_two_methods_writes_table1_json_and_fig2(lumbar, models_dir, tmp_path):
    ct, roi, renderer, surface, _ = lumbar
    result = evaluate(ct, roi, ["classic", "PPC_Flow_Attention+classic"], n_cases=2, seed=3, mtre_range=(2, 8),
                      iterations=3, detector_px=128, device="cpu", models_dir=models_dir, learned_steps=1,
                      renderer=renderer, surface=surface, progress=False)
    assert result["config"]["methods"] == ["classic", "ppc-flow-attention+classic"]
    assert result["config"]["models"] == {"ppc-flow-attention+classic": str(models_dir / "ppc-flow-attention.pt")}
    for rec in result["cases"]:  # every method on the same cases
        assert set(rec["methods"]) == {"classic", "ppc-flow-attention+classic"}
    paths = write_report(result, tmp_path)
    md = paths["summary.md"].read_text()
    table1 = md[md.index("## After one update"):md.index("Paired on the same cases")]
    rows = [line for line in table1.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert [r.split("|")[1].strip() for r in rows] == ["initial", "classic", "ppc-flow-attention+classic"]
    assert "reduction factor" in table1 and "success < 2 mm" in md[md.index("## Iterated"):]
    # the paired comparison of the two methods on the same cases, after one update and final
    assert "| ppc-flow-attention+classic | classic |" in md and "McNemar" in md
    summary = json.loads(paths["summary.json"].read_text())
    (pair,) = summary["paired"]
    assert (pair["a"], pair["b"], pair["n"]) == ("ppc-flow-attention+classic", "classic", 2)
    d = [rec["methods"]["ppc-flow-attention+classic"]["mtre_one_update_mm"] - rec["methods"]["classic"][
        "mtre_one_update_mm"] for rec in result["cases"]]
    assert pair["one_update_diff_mean"] == pytest.approx(sum(d) / 2)
    for m in ("classic", "ppc-flow-attention+classic"):
        for stage in ("one_update", "final"):
            assert set(SUMMARY_KEYS) <= set(summary["methods"][m][stage])
    from PIL import Image

    for name in ("scatter_one_update.png", "scatter_final.png"):
        with Image.open(paths[name]) as im:
            assert im.size[0] > 1.6 * im.size[1]  # two panels side by side


def test_evaluate_one_update_only_and_early_model_errors(lumbar, models_dir, tmp_path):
    ct, roi, renderer, surface, _ = lumbar
    result = evaluate(ct, roi, ["flow", "ppc-flow"], n_cases=2, seed=0, mtre_range=(5, 20), iterations=1,
                      detector_px=128, device="cpu", models={"flow": models_dir / "flow.pt",
                                                               "ppc-flow": models_dir / "ppc-flow.pt"},
                      renderer=renderer, surface=surface, progress=False)
    assert result["config"]["one_update_only"]
    for rec in result["cases"]:
        for r in rec["methods"].values():
            assert r["iterations"] == 1 and r["mtre_one_update_mm"] == r["mtre_final_mm"]
    md = summary_markdown(result)
    assert "| flow |" in md and "| ppc-flow |" in md and "## Iterated" not in md and "One update only" in md
    # a missing model is reported before any case is simulated
    with pytest.raises(ModelFileError, match="ppc-flow-attention.pt"):
        evaluate(ct, roi, ["classic", "ppc-flow-attention"], n_cases=50, models_dir=tmp_path, renderer=renderer,
                 surface=surface, progress=False)


def test_oracle_is_the_ceiling_of_one_update(lumbar, tmp_path):
    """The ground-truth correspondences through the plain PPC solve (real lumbar CT): one update removes most of
    the in-plane error, and the oracle needs a ground truth."""
    from PPCRegistrationLib.registration import OracleMatcher
    ct, roi, renderer, surface, _ = lumbar
    result = evaluate(ct, roi, ["oracle"], n_cases=3, seed=5, mtre_range=(32, 40), iterations=1, detector_px=128,
                      device="cpu", renderer=renderer, surface=surface, progress=False)
    for rec in result["cases"]:
        r = rec["methods"]["oracle"]
        assert r["mtre_one_update_mm"] < 0.8 * rec["initial_mtre_mm"], rec
        assert r["mrpd_one_update_mm"] < 0.5 * rec["initial_mtre_mm"], rec  # most of the in-plane error goes
    assert "| oracle |" in summary_markdown(result)
    case = make_case(renderer, surface.points.to(torch.float64), 0, (10.0, 10.0),
                     ViewSampler(detector_size_px=128), None)
    reg = Registration(ct, case.xray, case.projection, case.T_init, roi,
                       RegistrationConfig().updated({"guards.max_iterations": 1}),
                       matcher=OracleMatcher(), surface=surface, renderer=renderer)
    with pytest.raises(InputError, match="ground-truth transform"):
        reg.step()


def test_join_evaluations_by_seed_and_by_method(lumbar, capsys, tmp_path):
    """Two runs of other seeds and a run of another method on one of them join case by case (real lumbar CT); runs
    of another protocol or cases lacking a method are refused with a clear message."""
    from PPCRegistrationLib.cli import main
    from PPCRegistrationLib.evaluation import join_results, read_result

    ct, roi, renderer, surface, _ = lumbar
    kw = dict(mtre_range=(5, 10), iterations=1, detector_px=128, device="cpu", renderer=renderer, surface=surface,
              progress=False)
    a = evaluate(ct, roi, ["classic"], n_cases=2, seed=0, **kw)
    b = evaluate(ct, roi, ["classic"], n_cases=1, seed=2, **kw)
    c = evaluate(ct, roi, ["oracle"], n_cases=2, seed=0, **kw)
    for name, res in (("a", a), ("b", b), ("c", c)):
        write_report(res, tmp_path / name)
    joined = join_results([read_result(tmp_path / "a"), read_result(tmp_path / "b")])
    assert [r["seed"] for r in joined["cases"]] == [0, 1, 2] and joined["summary"]["n_cases"] == 3
    assert joined["cases"][2]["methods"]["classic"] == b["cases"][0]["methods"]["classic"]
    both = join_results([a, c])  # the same seeds, another method: the paired comparison is possible
    assert both["config"]["methods"] == ["classic", "oracle"] and both["summary"]["paired"][0]["n"] == 2
    with pytest.raises(InputError, match="no result of oracle"):
        join_results([a, b, c])  # seed 2 has no oracle
    other = evaluate(ct, roi, ["classic"], n_cases=1, seed=5, **{**kw, "mtre_range": (10, 20)})
    with pytest.raises(InputError, match="mtre_range"):
        join_results([a, other])
    code = main(["join-evaluations", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "ab")])
    out = capsys.readouterr().out
    assert code == 0 and "3 simulated cases (seeds 0..2)" in out and (tmp_path / "ab" / "summary.md").is_file()
    code = main(["join-evaluations", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])
    assert code == 2 and "cases.json not found" in capsys.readouterr().err


def test_classic_fallback_is_exactly_the_classic_registration(lumbar, models_dir):
    """A learned pipeline whose result counts as poor (here: any result, retry_below_similarity > 1) starts again
    from the initial estimate as the classic registration runs alone: its second attempt is classic's first (with the
    2D pre-alignment), its third classic's retry and then classic's tilted restarts, to the same poses (real lumbar
    CT); it keeps the best of all.
    Without the fallback only classic's retry follows."""
    ct, roi, renderer, surface, case = lumbar
    cfg = RegistrationConfig(device="cpu").updated({"guards.max_iterations": 3, "refine.iterations": 2,
                                                    "restart.below_similarity": 1.01})

    def run(method):
        reg = method.registration(ct, case.xray, case.projection, case.T_init, roi, cfg, T_gt=case.T_gt,
                                  surface=surface, renderer=renderer)
        return reg, reg.run()

    # candidates: the first attempt's result and its thorough re-refinement, the retry's, the four tilted restarts'
    classic, res_c = run(methods.resolve_method("classic"))
    assert classic.attempt == 6 and len(classic._candidates) == 7
    pipe, res_p = run(methods.resolve_method("flow+classic", models_dir=models_dir))
    assert pipe.attempt == 7 and len(pipe._candidates) == 9
    for (sim_p, T_p, _), (sim_c, T_c, _) in zip(pipe._candidates[2:], classic._candidates):
        assert torch.allclose(T_p, T_c, atol=1e-9) and sim_p == pytest.approx(sim_c, abs=1e-9)
    messages = " ".join(st.message for st in res_p.history)
    assert "with the classic registration (2D pre-alignment" in messages and "without the 2D pre-alignment" in messages
    best = max(pipe._candidates + [(pipe._initial_similarity(), case.T_init, "")], key=lambda c: c[0])
    assert torch.allclose(res_p.T.to(torch.float64), best[1].cpu().to(torch.float64), atol=1e-9)
    assert "kept the" in res_p.history[-1].message
    ops = [st.operator for st in res_p.history]
    assert ops[0] == "flow" and "flow" not in ops[1:]  # the fallback attempts are classic
    off, _ = run(methods.resolve_method("flow+classic", models_dir=models_dir, classic_fallback=False))
    assert off.attempt == 2 and len(off._candidates) == 3


def test_learned_operator_renders_the_window_it_was_trained_on(lumbar, tmp_path):
    """An operator trained on 48-pixel windows gets a 48 x 48 detector window centred on the region (twice that on a
    detector of half its pixel size); one without a recorded window renders the region with its margin."""
    ct, roi, renderer, surface, case = lumbar
    torch.manual_seed(0)
    spacing = float(case.projection.pixel_spacing[0, 0])
    op = LearnedOperator("flow", network_pixel_mm=spacing, window_px=48)
    save_model(tmp_path / "flow.pt", op, {})
    m = methods.resolve_method("flow", model_path=tmp_path / "flow.pt")
    assert m.operator.window_px == 48 and methods.learned_window_px(m.operator, spacing) == 48
    assert methods.learned_window_px(m.operator, spacing / 2) == 96
    reg, res = _run(lumbar, m, {"guards.max_iterations": 1})
    assert reg.config.matching.window_px == 48
    rows, cols = torch.nonzero(res.history[0].drr).unbind(1)
    assert int(rows.max() - rows.min()) + 1 <= 48 and int(cols.max() - cols.min()) + 1 <= 48
    uv = case.projection.project(transform_points(case.T_init, surface.points)[None])[0].mean(0)
    assert abs(float(cols.float().mean()) - float(uv[0])) < 6 and abs(float(rows.float().mean()) - float(uv[1])) < 6
    old = methods.resolve_method("flow", operator=LearnedOperator("flow", network_pixel_mm=spacing))
    assert old.operator.window_px is None and old.config(None, spacing).matching.window_px == 0
    with pytest.raises(InputError, match="window_px"):
        RegistrationConfig().updated({"matching.window_px": -1})
