"""``ppcreg bench --peer diffdrr`` (PPCRegistrationLib.peer): pins, the peer environment, DiffDRR's conventions, the
worker's task files, and one real end-to-end run.

The end-to-end test (:func:`test_bench_peer_diffdrr_end_to_end`) runs DiffDRR in its own environment: it runs when
that environment exists (``<$PPCREG_CACHE or ~/.cache/ppcregistration>/peer-diffdrr-0.6.1``, made by the first
``ppcreg bench --peer diffdrr``) or when ``PPCREG_PEER_TESTS=1`` is set (then it installs it: about 2.5 GB and a
few minutes), and skips otherwise::

    PPCREG_PEER_TESTS=1 .venv/bin/python -m pytest Testing/test_peer.py -k end_to_end
"""

from __future__ import annotations

import ast
import json
import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from PPCRegistrationLib import peer
from PPCRegistrationLib.cli import main
from PPCRegistrationLib.errors import InputError
from PPCRegistrationLib.geometry import Projection, invert_rigid, se3_exp, transform_points
from PPCRegistrationLib.simulation import ViewSampler
from PPCRegistrationLib.volume import Volume

# ----------------------------------------------------------------------------- pins and the environment


def test_shipped_pins_are_exact_and_complete():
    pins = peer.read_pins()
    assert pins["diffdrr"] == "0.6.1" and pins["torch"] == "2.13.0"
    # everything diffdrr 0.6.1 requires is pinned, with what its rendering and registration import
    for dep in ("numpy", "scipy", "torchio", "torchvision", "kornia", "roma", "timm", "einops", "fastcore",
                "matplotlib", "seaborn", "tqdm", "imageio", "pyvista", "nibabel", "pandas", "simpleitk"):
        assert dep in pins, dep
    assert len(pins) > 100


@pytest.mark.parametrize("text, message", [
    ("torch>=2.0\n", "not an exact pin"),
    ("torch==2.13.0\nTorch==2.13.0\n", "pinned twice"),
    ("# nothing\n\n", "no pins"),
])
def test_read_pins_rejects_loose_or_duplicate_pins(tmp_path, text, message):
    f = tmp_path / "req.txt"
    f.write_text(text)
    with pytest.raises(InputError, match=message):
        peer.read_pins(f)


def test_read_pins_normalises_names_and_skips_comments(tmp_path):
    f = tmp_path / "req.txt"
    f.write_text("# header\nSimple_ITK==2.5.7  # comment\nruamel.yaml==0.18.6\n")
    assert peer.read_pins(f) == {"simple-itk": "2.5.7", "ruamel-yaml": "0.18.6"}


def test_pin_mismatches_accept_local_labels():
    pins = {"torch": "2.13.0", "numpy": "2.4.6", "roma": "1.8.0"}
    have = {"torch": "2.13.0+cpu", "NumPy": "2.4.6", "roma": "1.7.0"}
    bad = peer.pin_mismatches(pins, have)
    assert bad == ["roma==1.8.0 (installed: 1.7.0)"]
    assert "none" in peer.pin_mismatches({"x": "1"}, {})[0]


def test_peer_env_dir_follows_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PPCREG_CACHE", str(tmp_path / "c"))
    assert peer.peer_env_dir() == tmp_path / "c" / "peer-diffdrr-0.6.1"
    assert peer.peer_env_dir(tmp_path / "d") == tmp_path / "d" / "peer-diffdrr-0.6.1"


def _fake_python(path: Path, script: str) -> None:
    path.parent.mkdir(parents=True)
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_failed_install_says_what_failed_and_how_to_retry(tmp_path):
    # an environment whose pip fails (a stand-in interpreter: no network, no real install)
    env = peer.peer_env_dir(tmp_path)
    _fake_python(env / "bin" / "python", 'case "$*" in *pip*) echo "ERROR: No matching distribution found for '
                                         'diffdrr==0.6.1"; exit 1;; esac\nexit 3\n')
    with pytest.raises(peer.PeerError) as info:
        peer.ensure_peer_env(tmp_path, progress=False)
    msg = str(info.value)
    assert "pip exited with code 1" in msg and "No matching distribution" in msg
    assert "run the command again" in msg and str(env) in msg
    assert isinstance(info.value, InputError)


def test_an_environment_with_the_pins_is_reused(tmp_path, monkeypatch):
    pins = peer.read_pins()
    listing = json.dumps({name: version for name, version in pins.items()})
    env = peer.peer_env_dir(tmp_path)
    _fake_python(env / "bin" / "python", f"echo '{listing}'\n")
    got = peer.ensure_peer_env(tmp_path, progress=False)
    assert not got.installed_now and got.python == env / "bin" / "python"
    assert got.versions["diffdrr"] == "0.6.1"


def test_worker_imports_neither_the_library_nor_its_dependencies():
    tree = ast.parse(peer.WORKER.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    allowed = {"__future__", "json", "math", "sys", "time", "pathlib", "importlib", "numpy", "torch", "diffdrr",
               "torchio", "torchvision"}
    assert names <= allowed, names - allowed


# ----------------------------------------------------------------------------- conventions


def _view(seed: int = 3, principal_point=None) -> Projection:
    gen = torch.Generator().manual_seed(seed)
    proj, _ = ViewSampler().sample(torch.tensor([10.0, -20.0, 30.0]), gen)
    if principal_point is not None:
        proj = Projection.from_carm(proj.world_from_camera, float(proj.sdd[0]), proj.height, proj.width,
                                    proj.pixel_spacing[0], principal_point)
    return proj


def _diffdrr_pixels(pose, reorient, det, x_diffdrr_world):
    """DiffDRR's detector model written out from its source (detector.py): the camera sits at the origin of its
    frame looking along +z, ``pose @ reorient`` maps camera to world; pixel (row i, column j) is at
    ``x = delx * ((W - 1) / 2 - j) + x0``, ``y = dely * ((H - 1) / 2 - i) + y0``, ``z = sdd`` (radiological x)."""
    cam = transform_points(invert_rigid(pose @ reorient), x_diffdrr_world)
    x = cam[:, 0] / cam[:, 2] * det["sdd"]
    y = cam[:, 1] / cam[:, 2] * det["sdd"]
    j = (det["width"] - 1) / 2 - (x - det["x0"]) / det["delx"]
    i = (det["height"] - 1) / 2 - (y - det["y0"]) / det["dely"]
    return torch.stack([j, i], -1)


@pytest.mark.parametrize("principal_point", [None, (140.0, 110.5)])
def test_camera_pose_projects_like_our_geometry(principal_point):
    proj = _view(principal_point=principal_point)
    det = peer.detector_params(proj)
    ijk = torch.tensor([[0.7, 0, 0, -180], [0, 0.7, 0, -170], [0, 0, 2.5, -340], [0, 0, 0, 1]], dtype=torch.float64)
    _, centred, w_from_ct = peer.diffdrr_frames(ijk, (133, 512, 512))
    T = se3_exp(torch.tensor([0.05, -0.1, 0.2, 5.0, -8.0, 12.0], dtype=torch.float64))
    pose = peer.camera_pose(proj, T, w_from_ct)
    x = torch.randn(50, 3, dtype=torch.float64) * 40 + torch.tensor([10.0, -20.0, 30.0], dtype=torch.float64)
    ours = proj.project(transform_points(T, x)[None])[0]
    theirs = _diffdrr_pixels(pose, peer.AP_REORIENT, det, transform_points(w_from_ct, x))
    assert torch.allclose(ours, theirs, atol=1e-6)
    # and back
    assert torch.allclose(peer.transform_from_camera_pose(pose, proj, w_from_ct), T, atol=1e-9)


def test_diffdrr_frames_centre_the_volume_in_ras():
    ijk = torch.tensor([[0.7, 0, 0, -180], [0, 0.7, 0, -170], [0, 0, 2.5, -340], [0, 0, 0, 1]], dtype=torch.float64)
    ras, centred, w_from_ct = peer.diffdrr_frames(ijk, (133, 512, 512))
    assert torch.allclose(ras[:3, :3], torch.diag(torch.tensor([-0.7, -0.7, 2.5], dtype=torch.float64)))
    centre_ijk = torch.tensor([511 / 2, 511 / 2, 132 / 2, 1.0], dtype=torch.float64)
    assert torch.allclose(centred @ centre_ijk, torch.tensor([0, 0, 0, 1.0], dtype=torch.float64), atol=1e-9)
    assert torch.allclose(w_from_ct @ ijk, centred)
    assert torch.allclose(torch.linalg.det(w_from_ct[:3, :3]), torch.tensor(1.0, dtype=torch.float64))


def test_detector_params():
    proj = _view()
    det = peer.detector_params(proj)
    assert det["height"] == det["width"] == 256 and math.isclose(det["sdd"], 1200.0)
    assert math.isclose(det["delx"], 380 / 256) and det["x0"] == det["y0"] == 0.0
    det = peer.detector_params(_view(principal_point=(140.0, 110.5)))
    assert math.isclose(det["x0"], (140 - 127.5) * 380 / 256) and math.isclose(det["y0"], (110.5 - 127.5) * 380 / 256)
    K = torch.tensor([[[1200.0, 0, 31.5], [0, 1000.0, 31.5], [0, 0, 1]]], dtype=torch.float64)
    skewed = Projection(K, torch.eye(3, dtype=torch.float64)[None], torch.zeros(1, 3, dtype=torch.float64), 64, 64,
                        torch.ones(1, 2, dtype=torch.float64))
    with pytest.raises(InputError, match="focal length"):
        peer.detector_params(skewed)


def test_ncc():
    a = torch.rand(32, 32)
    assert math.isclose(peer.ncc(a, 3 * a + 2), 1.0, abs_tol=1e-9)
    assert math.isclose(peer.ncc(a, -a), -1.0, abs_tol=1e-9)
    with pytest.raises(InputError, match="different sizes"):
        peer.ncc(a, a[:5])


# ----------------------------------------------------------------------------- the worker's task files


def test_write_task(tmp_path):
    ijk = torch.tensor([[2.0, 0, 0, -30], [0, 2.0, 0, -20], [0, 0, 3.0, -10], [0, 0, 0, 1]], dtype=torch.float64)
    hu = torch.arange(5 * 6 * 7, dtype=torch.float32).reshape(5, 6, 7)  # (K, J, I)
    ct = Volume(hu, ijk)
    mu = Volume(hu[1:, 1:, 1:] * 1e-5, ijk)
    views = [_view(1), _view(2)]
    det = peer.detector_params(views[0])
    T_init = se3_exp(torch.tensor([0.01, 0.0, 0.02, 1.0, 2.0, 3.0], dtype=torch.float64))
    cases = [{"seed": 7, "xray": torch.rand(256, 256), "projection": views[0], "T_init": T_init}]
    recipe = peer.DiffDRRRecipe(iterations_per_scale=2)
    task = peer.write_task(tmp_path, mu_volume=mu, ct=ct, bone_boost=2.0, detector=det, cases=cases,
                           checks=[("a", views[0]), ("b", views[1])], recipe=recipe, threads=1)
    on_disk = json.loads((tmp_path / "task.json").read_text())
    assert on_disk == json.loads(json.dumps(task))
    # volumes in DiffDRR's (I, J, K) order
    assert np.load(tmp_path / "native.npy").shape == (7, 6, 5)
    assert np.load(tmp_path / "native.npy")[3, 2, 1] == float(hu[1, 2, 3])
    assert np.load(tmp_path / "matched.npy").shape == (6, 5, 4)
    assert task["subjects"]["native"]["density"] == "hu"
    assert task["subjects"]["native"]["bone_attenuation_multiplier"] == 2.0
    assert task["subjects"]["matched"]["density"] == "given"
    # the matched subject at both views, DiffDRR's own density at the first
    assert [r["out"] for r in task["renders"]] == ["drr_matched_a.npy", "drr_native_a.npy", "drr_matched_b.npy"]
    assert task["registration"]["recipe"]["iterations_per_scale"] == 2
    c = task["registration"]["cases"][0]
    assert c["seed"] == 7 and np.load(tmp_path / c["xray"]).shape == (256, 256)
    w_from_ct = torch.tensor(task["world_from_ct"]["matched"], dtype=torch.float64)
    expected = peer.camera_pose(views[0], T_init, w_from_ct)
    assert torch.allclose(torch.tensor(c["pose_init"], dtype=torch.float64), expected)
    assert task["detector"]["renderer"] == "siddon" and task["threads"] == 1


def test_recipe_checks_its_settings():
    with pytest.raises(InputError):
        peer.DiffDRRRecipe(iterations_per_scale=0)
    with pytest.raises(InputError, match="renderer"):
        peer.DiffDRRRecipe(renderer="raymarch")


def test_format_table():
    report = {"versions": {"diffdrr": "0.6.1", "torch": "2.13.0"}, "recipe": peer.DiffDRRRecipe().__dict__,
              "threads": 1, "n_cases": 2, "seed": 0, "mtre_range": [0, 20], "drr_ncc": 0.9991,
              "drr_ncc_views": [0.9991, 0.9995], "drr_ncc_native_density": 0.99, "drr_mean_ratio": 1.0,
              "detector": {"height": 256, "width": 256}, "drr_seconds_ours": 0.1, "drr_seconds_peer": 3.0,
              "drr_speed_ratio": 30.0, "ours_success_2mm": 0.5, "peer_success_2mm": 0.0,
              "ours_seconds_per_case": 20.0, "peer_seconds_per_case": 300.0, "initial_mtre_median_mm": 9.0,
              "ours_mtre_median_mm": 1.5, "peer_mtre_median_mm": float("nan"),
              "cases": [{"seed": 0, "initial_mtre_mm": 5.0, "ours_mtre_mm": 0.5, "ours_seconds": 20.0,
                         "peer_mtre_mm": 3.0, "peer_seconds": 300.0},
                        {"seed": 1, "initial_mtre_mm": 13.0, "ours_mtre_mm": 2.5, "ours_seconds": 20.0,
                         "peer_mtre_mm": float("nan"), "peer_seconds": 300.0}]}
    text = peer.format_table(report)
    assert "NCC 0.9991" in text and "ratio 30.0x" in text and "ours 50 %, DiffDRR 0 %" in text
    assert len(text.splitlines()) == 10


# ----------------------------------------------------------------------------- command line


def test_cli_rejects_an_unknown_peer_before_loading_anything(tmp_path, capsys):
    code = main(["bench", "--peer", "elastix", "--out", str(tmp_path)])
    assert code == 2 and "unknown peer 'elastix'" in capsys.readouterr().err


def test_cli_peer_needs_out(capsys):
    code = main(["bench", "--peer", "diffdrr"])
    assert code == 2 and "--peer needs --out" in capsys.readouterr().err


def test_benchmark_rejects_bad_parameters(tmp_path):
    with pytest.raises(InputError, match="unknown peer"):
        peer.benchmark(None, None, out_dir=tmp_path, peer="x")
    with pytest.raises(InputError, match="at least 1"):
        peer.benchmark(None, None, out_dir=tmp_path, n_cases=0)
    with pytest.raises(InputError, match="mTRE range"):
        peer.benchmark(None, None, out_dir=tmp_path, mtre_range=(5, 1))


# ----------------------------------------------------------------------------- end to end (needs the peer env)


def test_bench_peer_diffdrr_end_to_end(tmp_path, capsys, chest_ct_paths, one_torch_thread):
    """The real thing on one case with a tiny DiffDRR budget: installs DiffDRR 0.6.1 into its environment if
    ``PPCREG_PEER_TESTS=1`` (else skips when that environment is absent), renders both DRRs, times them and runs
    both registrations.  Run it with ``PPCREG_PEER_TESTS=1 .venv/bin/python -m pytest Testing/test_peer.py -k
    end_to_end`` (about 3 minutes with the environment installed, plus a few minutes to install it)."""
    if not (peer.peer_env_dir() / "bin" / "python").exists() and os.environ.get("PPCREG_PEER_TESTS") != "1":
        pytest.skip(f"the DiffDRR peer environment {peer.peer_env_dir()} is absent: set PPCREG_PEER_TESTS=1 to "
                    "install it (about 2.5 GB, a few minutes) and run this test")
    out = tmp_path / "peer"
    code = main(["bench", "--peer", "diffdrr", "--out", str(out), "--cases", "1", "--seed", "2",
                 "--mtre-range", "2", "4", "--peer-iterations", "2", "--repeats", "1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    assert "success < 2 mm" in captured.out and "DRR convention check" in captured.out
    assert "[diffdrr] case 1/1" in captured.err  # per-case progress of the peer
    report = json.loads((out / "peer.json").read_text())
    assert report["drr_ncc"] >= 0.99
    assert report["drr_speed_ratio"] > 0
    for key in ("ours_success_2mm", "peer_success_2mm", "ours_seconds_per_case", "peer_seconds_per_case"):
        assert report[key] is not None and report[key] >= 0, key
    assert report["versions"]["diffdrr"] == "0.6.1" and report["versions"]["torch"].startswith("2.13.0")
    (case,) = report["cases"]
    assert case["seed"] == 2 and 2 <= case["initial_mtre_mm"] <= 4
    assert case["ours_mtre_mm"] >= 0 and case["peer_seconds"] > 0
    assert case["peer_mtre_mm"] is None or case["peer_mtre_mm"] >= 0
