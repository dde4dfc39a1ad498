"""The ``ppcreg`` command line: help, clear errors for bad input, and real end-to-end runs on the lumbar CT.

Everything calls :func:`PPCRegistrationLib.cli.main` in-process and checks the exit code and the printed
text.  The end-to-end tests use a 128-pixel detector and a few iterations so that the file stays well under a
minute on two CPU cores.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from PPCRegistrationLib import formats, io
from PPCRegistrationLib.cli import main
from PPCRegistrationLib.evaluation import SUMMARY_KEYS
from PPCRegistrationLib.volume import Volume


# ----------------------------------------------------------------------------- helpers and fixtures


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def assert_error(capsys, argv, *fragments: str) -> str:
    """The command fails with exit code 2 and prints ``error: ...`` containing every fragment, no traceback."""
    code, out, err = run(capsys, *argv)
    assert code == 2, (code, out, err)
    assert err.startswith("error: "), err
    assert "Traceback" not in err + out
    for f in fragments:
        assert f in err, (f, err)
    return err


@pytest.fixture(scope="module")
def phantom_ct(tmp_path_factory) -> Path:
    """A small synthetic CT (water cylinder with a bone block) as NIfTI, for tests that need no real data."""
    k, j, i = torch.meshgrid(torch.arange(40.0), torch.arange(48.0), torch.arange(48.0), indexing="ij")
    hu = torch.full((40, 48, 48), -1000.0)
    hu[(i - 24) ** 2 + (j - 24) ** 2 < 20 ** 2] = 0.0
    hu[(abs(i - 24) < 6) & (abs(j - 24) < 6) & (abs(k - 20) < 8)] = 800.0
    m = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64))
    path = tmp_path_factory.mktemp("phantom") / "phantom.nii.gz"
    io.write_volume(path, Volume(hu, m))
    return path


@pytest.fixture(scope="module")
def lumbar_case(tmp_path_factory, lumbar_ct_path, lumbar_labels_path) -> dict:
    """``ppcreg simulate`` on the real lumbar CT (L3), 128-px detector, initial mTRE 6 mm, AP-ish view."""
    out = tmp_path_factory.mktemp("cli") / "case"
    code = main(["simulate", "--ct", str(lumbar_ct_path), "--labels", str(lumbar_labels_path), "--vertebra", "L3",
                 "--out", str(out), "--seed", "3", "--mtre", "6", "--primary", "10", "--secondary", "5",
                 "--detector-px", "128"])
    assert code == 0
    roi = ["--labels", str(lumbar_labels_path), "--vertebra", "L3"]
    return {"out": out, "ct": lumbar_ct_path, "labels": lumbar_labels_path, "roi": roi}


def _register_args(case: dict, out: Path, **over) -> list[str]:
    d = case["out"]
    args = {"--ct": case["ct"], "--xray": d / "xray.nrrd", "--geometry": d / "geometry.json",
            "--init": d / "T_init.json", "--gt": d / "T_gt.json", "--out": out}
    args.update(over)
    flat = ["register"]
    for k, v in args.items():
        if v is not None:
            flat += [k, str(v)]
    return flat + case["roi"] + ["--iterations", "3", "--device", "cpu"]


# ----------------------------------------------------------------------------- help and usage


@pytest.mark.parametrize("command", ["sample-data", "simulate", "register", "evaluate", "bench"])
def test_help_of_every_subcommand(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    assert f"usage: ppcreg {command}" in out


def test_top_level_help_and_missing_command(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "simulate" in out and "register" in out and "PPCREG_CACHE" in out
    code, _, err = run(capsys)
    assert code == 2 and "usage: ppcreg" in err


def test_usage_errors_exit_2(capsys, tmp_path):
    code, _, err = run(capsys, "evaluate", "--ct", "x.nii.gz", "--cases", "0", "--out", tmp_path)
    assert code == 2 and "--cases must be at least 1" in err
    code, _, err = run(capsys, "register", "--ct", "x")  # required options missing
    assert code == 2 and "required" in err


# ----------------------------------------------------------------------------- bad input (no real data needed)


def test_missing_ct_file(capsys, tmp_path):
    assert_error(capsys, ["simulate", "--ct", tmp_path / "nope.nii.gz", "--out", tmp_path / "o"],
                 "CT volume file not found", "nope.nii.gz")


def test_no_ct_given(capsys, tmp_path):
    assert_error(capsys, ["simulate", "--out", tmp_path / "o"], "no CT given", "--sample")


def test_unknown_vertebra(capsys, phantom_ct, tmp_path):
    assert_error(capsys, ["simulate", "--ct", phantom_ct, "--labels", phantom_ct, "--vertebra", "X9",
                          "--out", tmp_path / "o"], "unknown vertebra 'X9'", "L3")


def test_incomplete_roi_options(capsys, phantom_ct, tmp_path):
    assert_error(capsys, ["simulate", "--ct", phantom_ct, "--vertebra", "L3", "--out", tmp_path / "o"],
                 "--labels")
    assert_error(capsys, ["simulate", "--ct", phantom_ct, "--roi-center", "0", "0", "0", "--out", tmp_path / "o"],
                 "--roi-size")


def test_empty_box_roi(capsys, phantom_ct, tmp_path):
    assert_error(capsys, ["simulate", "--ct", phantom_ct, "--roi-center", "5000", "5000", "5000",
                          "--roi-size", "10", "10", "10", "--out", tmp_path / "o"],
                 "region of interest contains no voxels")


def test_simulate_on_phantom_with_box_roi(capsys, phantom_ct, tmp_path):
    code, out, err = run(capsys, "simulate", "--ct", phantom_ct, "--roi-center", "48", "48", "40",
                         "--roi-size", "40", "40", "40", "--out", tmp_path / "case", "--mtre", "3",
                         "--detector-px", "64", "--no-variation")
    assert code == 0, err
    case = json.loads((tmp_path / "case" / "case.json").read_text())
    assert case["initial_mtre_mm"] == pytest.approx(3.0, abs=1e-3)
    assert "--roi-center" in case["register_command"]
    assert formats.load_geometry(tmp_path / "case" / "geometry.json").projection.height == 64
    assert io.read_xray(tmp_path / "case" / "xray.nrrd").image.shape == (64, 64)


# ----------------------------------------------------------------------------- real data: end to end


def test_simulate_writes_case(lumbar_case):
    d = lumbar_case["out"]
    for name in ("xray.nrrd", "xray.png", "geometry.json", "T_gt.json", "T_init.json", "case.json"):
        assert (d / name).is_file(), name
    case = json.loads((d / "case.json").read_text())
    assert case["initial_mtre_mm"] == pytest.approx(6.0, abs=1e-3)
    assert case["view"]["primary_deg"] == pytest.approx(10.0)
    x = io.read_xray(d / "xray.nrrd")
    assert x.image.shape == (128, 128)
    assert torch.equal(formats.load_transform(d / "T_gt.json").matrix, torch.eye(4, dtype=torch.float64))


def test_register_end_to_end(capsys, lumbar_case, tmp_path):
    code, out, err = run(capsys, *_register_args(lumbar_case, tmp_path / "reg"))
    assert code == 0, err
    assert "iteration   1  mTRE" in out and "status:" in out and "mTRE: 6.000 mm ->" in out
    res = formats.load_result(tmp_path / "reg" / "result.json")
    assert res.method == "classic" and res.frame == "LPS"
    assert len(res.history) == len(res.config["operators"]) and "mtre_mm" in res.history[0]
    ops = res.config["operators"]
    # a few classic PPC updates, then one intensity refinement update per scale (when they did not diverge)
    assert 1 <= ops.count("classic") <= 3 and ops.count("refine") in (0, 3)
    assert ops[:ops.count("classic")] == ["classic"] * ops.count("classic")
    assert "refine" in out
    assert res.metrics["mtre_initial_mm"] == pytest.approx(6.0, abs=1e-3)
    assert math.isfinite(res.metrics["mtre_final_mm"])
    assert res.config["status"] in ("converged", "max_iterations", "diverged", "rank_deficient", "stopped")
    T = formats.load_transform(tmp_path / "reg" / "transform.json").matrix
    assert torch.allclose(T, res.final_transform)
    from PIL import Image  # matplotlib's dependency

    with Image.open(tmp_path / "reg" / "overlay.png") as im:
        im.verify()
    with Image.open(tmp_path / "reg" / "overlay.png") as im:
        assert im.format == "PNG" and im.size[0] > 600 and im.size[1] > 300
        assert np.asarray(im.convert("L")).std() > 5  # not a blank picture


def test_register_rejects_a_3d_xray(capsys, lumbar_case, tmp_path):
    assert_error(capsys, _register_args(lumbar_case, tmp_path / "r", **{"--xray": lumbar_case["ct"]}),
                 "expected a 2D X-ray", "3D volume")


def test_register_rejects_wrong_json_format(capsys, lumbar_case, tmp_path):
    geom = lumbar_case["out"] / "geometry.json"
    assert_error(capsys, _register_args(lumbar_case, tmp_path / "r", **{"--init": geom}),
                 "'ppcreg-geometry' file", "'ppcreg-transform' file is expected")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert_error(capsys, _register_args(lumbar_case, tmp_path / "r", **{"--geometry": bad}), "is not valid JSON")


def test_register_rejects_missing_files_and_mismatched_detector(capsys, lumbar_case, tmp_path):
    assert_error(capsys, _register_args(lumbar_case, tmp_path / "r", **{"--gt": tmp_path / "gt.json"}),
                 "ground-truth transform file not found")
    # a geometry of another detector size than the X-ray
    rec = formats.load_geometry(lumbar_case["out"] / "geometry.json")
    from dataclasses import replace

    formats.save_geometry(tmp_path / "g64.json", replace(rec.projection, height=64, width=64))
    assert_error(capsys, _register_args(lumbar_case, tmp_path / "r", **{"--geometry": tmp_path / "g64.json"}),
                 "128x128", "64x64")


def test_vertebra_absent_from_label_map(capsys, lumbar_ct_path, lumbar_labels_path, tmp_path):
    assert_error(capsys, ["simulate", "--ct", lumbar_ct_path, "--labels", lumbar_labels_path, "--vertebra", "C3",
                          "--out", tmp_path / "o"], "C3", "not in the label map")


def test_register_accepts_ras_transforms(capsys, lumbar_case, tmp_path):
    """A transform saved in RAS (as Slicer would) gives the same start as the LPS file."""
    d = lumbar_case["out"]
    T = formats.load_transform(d / "T_init.json").matrix
    f = torch.diag(torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=torch.float64))
    formats.save_transform(tmp_path / "T_init_ras.json", f @ T @ f, frame="RAS")
    code, out, err = run(capsys, *_register_args(lumbar_case, tmp_path / "reg",
                                                 **{"--init": tmp_path / "T_init_ras.json"})[:-4],
                         "--iterations", "1", "--device", "cpu", "--quiet")
    assert code == 0, err
    assert "initial mTRE 6.000 mm" in out


def test_evaluate_two_cases(capsys, lumbar_ct_path, lumbar_labels_path, tmp_path):
    out_dir = tmp_path / "eval"
    code, out, err = run(capsys, "evaluate", "--ct", lumbar_ct_path, "--labels", lumbar_labels_path,
                         "--vertebra", "L3", "--cases", "2", "--seed", "0", "--mtre-range", "2", "6",
                         "--iterations", "2", "--detector-px", "128", "--device", "cpu", "--out", out_dir,
                         "--quiet")
    assert code == 0, err
    for name in ("cases.json", "cases.csv", "summary.json", "summary.md", "scatter_one_update.png",
                 "scatter_final.png"):
        assert (out_dir / name).is_file(), name
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["n_cases"] == 2
    for stage in ("one_update", "final"):
        s = summary["methods"]["classic"][stage]
        assert set(SUMMARY_KEYS) <= set(s), set(SUMMARY_KEYS) - set(s)
    cases = json.loads((out_dir / "cases.json").read_text())["cases"]
    assert [c["seed"] for c in cases] == [0, 1]
    for c in cases:
        assert 2 - 1e-6 <= c["initial_mtre_mm"] <= 6 + 1e-6
        r = c["methods"]["classic"]
        assert 1 <= r["iterations"] <= 2 and r["status"]
        assert {"mtre_one_update_mm", "mtre_final_mm", "mrpd_final_mm", "seconds"} <= set(r)
    assert "| classic |" in (out_dir / "summary.md").read_text()
    assert len((out_dir / "cases.csv").read_text().strip().splitlines()) == 3
    assert "After one update" in out


def test_evaluate_unknown_method(capsys, phantom_ct, tmp_path):
    assert_error(capsys, ["evaluate", "--ct", phantom_ct, "--methods", "classic", "magic", "--cases", "1",
                          "--out", tmp_path / "e", "--quiet"], "unknown method 'magic'", "classic")


def test_bench_small(capsys, lumbar_ct_path, lumbar_labels_path):
    code, out, err = run(capsys, "bench", "--ct", lumbar_ct_path, "--labels", lumbar_labels_path, "--vertebra",
                         "L3", "--sizes", "32", "--step-px", "96", "--repeats", "1")
    assert code == 0, err
    for word in ("DRRRenderer", "reference", "render", "gradients", "contour", "matching", "solve",
                 "intensity refinement", "one batch of 7 DRRs at", "whole refinement (", "whole registration ("):
        assert word in out, word


# ----------------------------------------------------------------------------- learned and chained methods


@pytest.fixture(scope="module")
def untrained_models(tmp_path_factory) -> Path:
    """Untrained model files of the learned operators (the trained ones are shipped separately)."""
    from PPCRegistrationLib.networks import LEARNED_METHODS, LearnedOperator, save_model

    d = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    for m in LEARNED_METHODS:
        save_model(d / f"{m}.pt", LearnedOperator(m), {"note": "untrained"})
    return d


def test_method_help_lists_the_methods(capsys):
    for command in ("register", "evaluate"):
        code, out, _ = run(capsys, command, "--help")
        assert code == 0
        flat = " ".join(out.split())
        for word in ("ppc-flow-attention+classic", "--model", "--models-dir", "ppcreg train"):
            assert word in flat.replace("- ", "-"), (command, word)
    _, out, _ = run(capsys, "evaluate", "--help")
    assert "--one-update" in out and "METHOD=FILE" in out


def test_register_unknown_method_and_missing_or_corrupt_model(capsys, lumbar_case, tmp_path):
    assert_error(capsys, _register_args(lumbar_case, tmp_path / "r") + ["--method", "magic"],
                 "unknown method 'magic'", "ppc-flow-attention")
    assert_error(capsys, _register_args(lumbar_case, tmp_path / "r") + ["--method", "ppc-flow",
                                                                         "--models-dir", tmp_path],
                 str(tmp_path / "ppc-flow.pt"), "ppcreg train")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 100)
    assert_error(capsys, _register_args(lumbar_case, tmp_path / "r") + ["--method", "ppc-flow", "--model", bad],
                 "bad.pt", "not a readable model file")
    assert_error(capsys, _register_args(lumbar_case, tmp_path / "r") + ["--model", bad], "classic",
                 "no model file")


def test_register_chained_method_with_a_model_file(capsys, lumbar_case, untrained_models, tmp_path):
    model = untrained_models / "ppc-flow-attention.pt"
    code, out, err = run(capsys, *_register_args(lumbar_case, tmp_path / "reg"), "--method",
                         "ppc-flow-attention+classic", "--model", model, "--learned-steps", "1", "--flow-flips", "2")
    assert code == 0, err
    assert f"model {model}" in out and "iteration   1  ppc-flow-attention" in out
    assert "iteration   2  classic" in out
    res = formats.load_result(tmp_path / "reg" / "result.json")
    assert res.method == "ppc-flow-attention+classic" and res.config["model"] == str(model)
    assert res.config["registration"]["learned"]["flow_flips"] == 2
    ops = res.config["operators"]
    n_ppc = len(ops) - ops.count("refine")
    assert ops[:n_ppc] == ["ppc-flow-attention"] + ["classic"] * (n_ppc - 1) and ops.count("refine") in (0, 3)


def test_evaluate_learned_methods_comma_separated(capsys, lumbar_ct_path, lumbar_labels_path, untrained_models,
                                                  tmp_path):
    out_dir = tmp_path / "eval"
    code, out, err = run(capsys, "evaluate", "--ct", lumbar_ct_path, "--labels", lumbar_labels_path,
                         "--vertebra", "L3", "--cases", "2", "--mtre-range", "2", "10", "--detector-px", "128",
                         "--device", "cpu", "--methods", "classic,flow", "ppc-flow", "--models-dir",
                         untrained_models, "--model", f"ppc-flow={untrained_models / 'ppc-flow.pt'}",
                         "--one-update", "--out", out_dir, "--quiet")
    assert code == 0, err
    summary = json.loads((out_dir / "summary.json").read_text())
    assert list(summary["methods"]) == ["classic", "flow", "ppc-flow"]
    assert summary["config"]["iterations"] == 1 and summary["config"]["one_update_only"]
    assert summary["config"]["flow_flips"] == 4  # the default: the learned flow averaged over four mirrorings
    for m in ("classic", "flow", "ppc-flow"):
        assert set(SUMMARY_KEYS) <= set(summary["methods"][m]["one_update"])
    md = (out_dir / "summary.md").read_text()
    assert "| initial |" in md and "| ppc-flow |" in md and "## Iterated" not in md
    assert (out_dir / "scatter_one_update.png").is_file()


def test_evaluate_missing_or_bad_model_errors(capsys, phantom_ct, tmp_path):
    assert_error(capsys, ["evaluate", "--ct", phantom_ct, "--methods", "classic,ppc-flow-attention+classic",
                          "--models-dir", tmp_path, "--cases", "1", "--out", tmp_path / "e", "--quiet"],
                 str(tmp_path / "ppc-flow-attention.pt"), "ppcreg train")
    assert_error(capsys, ["evaluate", "--ct", phantom_ct, "--methods", "flow", "--model", "flow", "--cases", "1",
                          "--out", tmp_path / "e", "--quiet"], "METHOD=FILE")
    (tmp_path / "junk.pt").write_text("junk")
    assert_error(capsys, ["evaluate", "--ct", phantom_ct, "--methods", "flow", "--model",
                          f"flow={tmp_path / 'junk.pt'}", "--cases", "1", "--out", tmp_path / "e", "--quiet"],
                 "junk.pt")


def test_register_without_the_refinement(capsys, lumbar_case, tmp_path):
    code, out, err = run(capsys, *_register_args(lumbar_case, tmp_path / "reg"), "--refine-iterations", "0",
                         "--iterations", "3")
    assert code == 0, err
    res = formats.load_result(tmp_path / "reg" / "result.json")
    assert res.config["operators"] == ["classic"] * len(res.history) and 1 <= len(res.history) <= 3
    assert res.config["registration"]["refine"]["iterations"] == 0 and "refine" not in out
    code, out, err = run(capsys, *_register_args(lumbar_case, tmp_path / "r2"), "--refine-iterations", "-1")
    assert code == 2 and "--refine-iterations must be 0 or more" in err and "Traceback" not in err


def test_evaluate_oracle_beside_classic(capsys, lumbar_ct_path, lumbar_labels_path, tmp_path):
    out_dir = tmp_path / "eval"
    code, out, err = run(capsys, "evaluate", "--ct", lumbar_ct_path, "--labels", lumbar_labels_path,
                         "--vertebra", "L3", "--cases", "2", "--mtre-range", "10", "20", "--one-update",
                         "--methods", "Oracle,classic", "--detector-px", "128", "--device", "cpu", "--out", out_dir,
                         "--quiet")
    assert code == 0, err
    summary = json.loads((out_dir / "summary.json").read_text())
    assert list(summary["methods"]) == ["classic", "oracle"]
    assert summary["methods"]["oracle"]["one_update"]["mtre_mean"] < summary["initial"]["mtre_mean"]


def test_methods_lists_every_method_with_its_schedule(capsys, tmp_path):
    """``ppcreg methods``: every method by name with its stages; a learned method whose model file is missing says
    so instead of failing the listing."""
    from PPCRegistrationLib.methods import ALL_METHODS

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert all(f"{m}: " in out for m in ALL_METHODS)
    assert "attempt 6: 2D pre-alignment" in out and "tilted -10 degrees about the detector's v axis" in out
    assert "flow PPC updates, plain solve (at most 1) -> classic PPC updates" in out
    assert main(["methods", "--models-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"model file {tmp_path / 'flow.pt'}: not usable" in out and "classic: Classic PPC" in out
