"""JSON formats: exact round trips and clear errors (PPCRegistrationLib.formats)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from PPCRegistrationLib import formats
from PPCRegistrationLib.errors import InputError
from PPCRegistrationLib.geometry import Projection, carm_pose, se3_exp


def _projection() -> tuple[Projection, formats.CarmParameters]:
    iso = torch.tensor([12.345678901234, -98.7654321, 300.1], dtype=torch.float64)
    pose = carm_pose(23.456789, -11.1, 785.123456789, iso, "LPS")
    proj = Projection.from_carm(pose, 1198.7654321, 480, 620, (0.3081234, 0.3171234))
    return proj, formats.CarmParameters(1198.7654321, 785.123456789, 23.456789, -11.1, tuple(iso.tolist()), "LPS")


def _rigid() -> torch.Tensor:
    return se3_exp(torch.tensor([0.1234567, -0.3, 0.71, 12.3456789, -45.6, 7.0], dtype=torch.float64))


def test_geometry_round_trip_exact(tmp_path):
    proj, carm = _projection()
    f = formats.save_geometry(tmp_path / "g.json", proj, carm)
    obj = json.loads(f.read_text())
    assert obj["format"] == "ppcreg-geometry" and obj["version"] == 1
    rec = formats.load_geometry(f)
    q = rec.projection
    for name in ("K", "R", "t", "pixel_spacing"):
        assert torch.equal(getattr(q, name), getattr(proj, name)), name
    assert (q.height, q.width) == (proj.height, proj.width)
    assert rec.carm == carm
    # without C-arm parameters
    rec2 = formats.load_geometry(formats.save_geometry(tmp_path / "g2.json", proj))
    assert rec2.carm is None and torch.equal(rec2.projection.K, proj.K)


def test_transform_round_trip_exact(tmp_path):
    T = _rigid()
    f = formats.save_transform(tmp_path / "t.json", T, frame="RAS")
    rec = formats.load_transform(f)
    assert torch.equal(rec.matrix, T) and rec.frame == "RAS" and rec.units == "mm"
    assert json.loads(f.read_text())["format"] == "ppcreg-transform"
    # a batch-1 transform is accepted
    assert torch.equal(formats.load_transform(formats.save_transform(tmp_path / "b.json", T[None])).matrix, T)


def test_result_round_trip_exact(tmp_path):
    history = [{"iteration": 1.0, "dv_norm": 0.123456789012345, "mtre": 12.5},
               {"iteration": 2.0, "dv_norm": 1e-9, "mtre": float("nan"), "cost": float("inf")}]
    res = formats.ResultRecord(
        final_transform=_rigid(), initial_transform=se3_exp(torch.tensor([0.0, 0.1, 0, 5, 6, 7.5],
                                                                         dtype=torch.float64)),
        method="ppc-flow-attention", frame="LPS", history=history,
        metrics={"mtre_initial": 20.123, "mtre_final": 0.987654321, "seconds": 3.0, "bad": -math.inf},
        config={"iterations": 10, "theta_deg": 5.0, "roi": "L3", "nested": {"a": [1, 2, None], "b": True}})
    f = formats.save_result(tmp_path / "r.json", res)
    json.loads(f.read_text())  # standard JSON (no bare NaN / Infinity)
    assert "NaN" not in f.read_text().replace('"NaN"', "")
    back = formats.load_result(f)
    assert torch.equal(back.final_transform, res.final_transform)
    assert torch.equal(back.initial_transform, res.initial_transform)
    assert back.method == res.method and back.frame == res.frame and back.config == res.config
    assert len(back.history) == 2 and back.history[0] == history[0]
    assert math.isnan(back.history[1]["mtre"]) and back.history[1]["cost"] == math.inf
    assert back.history[1]["dv_norm"] == 1e-9
    assert back.metrics["bad"] == -math.inf and back.metrics["mtre_final"] == 0.987654321
    # no initial transform, tensor-valued history entries
    res2 = formats.ResultRecord(final_transform=_rigid(), method="classic",
                                history=[{"mtre": torch.tensor(1.5)}])
    back2 = formats.load_result(formats.save_result(tmp_path / "r2.json", res2))
    assert back2.initial_transform is None and back2.history == [{"mtre": 1.5}]


@pytest.mark.parametrize("bad, words", [
    (torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64)), "orthonormal"),
    (torch.diag(torch.tensor([-1.0, 1.0, 1.0, 1.0], dtype=torch.float64)), "det"),
    (torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0.1, 1]], dtype=torch.float64), "last row"),
    (torch.full((4, 4), float("nan"), dtype=torch.float64), "NaN"),
    (torch.eye(3, dtype=torch.float64), "4x4"),
])
def test_non_rigid_rejected(tmp_path, bad, words):
    with pytest.raises(InputError, match=words):
        formats.save_transform(tmp_path / "t.json", bad)
    # and the same matrix written by hand is refused on loading
    if bad.shape == (4, 4) and torch.isfinite(bad).all():
        (tmp_path / "h.json").write_text(json.dumps({"format": "ppcreg-transform", "version": 1, "frame": "LPS",
                                                     "units": "mm", "matrix": bad.tolist()}))
        with pytest.raises(InputError, match=words):
            formats.load_transform(tmp_path / "h.json")


def test_wrong_format_version_missing_key(tmp_path):
    proj, _ = _projection()
    g = formats.save_geometry(tmp_path / "g.json", proj)
    with pytest.raises(InputError, match="'ppcreg-geometry' file, but a 'ppcreg-transform'"):
        formats.load_transform(g)
    obj = json.loads(g.read_text())
    obj["version"] = 2
    (tmp_path / "v.json").write_text(json.dumps(obj))
    with pytest.raises(InputError, match="version 2.*newer"):
        formats.load_geometry(tmp_path / "v.json")
    obj["version"] = 1
    del obj["R"]
    (tmp_path / "m.json").write_text(json.dumps(obj))
    with pytest.raises(InputError, match="missing the key 'R'"):
        formats.load_geometry(tmp_path / "m.json")
    (tmp_path / "n.json").write_text(json.dumps({"matrix": torch.eye(4).tolist()}))
    with pytest.raises(InputError, match="no \"format\" field"):
        formats.load_transform(tmp_path / "n.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        formats.load_result(tmp_path / "bad.json")
    with pytest.raises(InputError, match="not found"):
        formats.load_result(tmp_path / "absent.json")
    t = formats.save_transform(tmp_path / "t.json", torch.eye(4))
    obj = json.loads(t.read_text())
    obj["units"] = "m"
    t.write_text(json.dumps(obj))
    with pytest.raises(InputError, match="units"):
        formats.load_transform(t)
    res = formats.save_result(tmp_path / "r.json", formats.ResultRecord(torch.eye(4, dtype=torch.float64), None, "x"))
    obj = json.loads(res.read_text())
    del obj["history"]
    res.write_text(json.dumps(obj))
    with pytest.raises(InputError, match="missing the key 'history'"):
        formats.load_result(res)


def test_geometry_validation(tmp_path):
    proj, carm = _projection()
    with pytest.raises(InputError, match="batch of 2"):
        formats.save_geometry(tmp_path / "x.json", proj.expand(2))
    g = formats.save_geometry(tmp_path / "g.json", proj, carm)
    obj = json.loads(g.read_text())
    obj["carm"]["sdd"] = 1000.0
    g.write_text(json.dumps(obj))
    with pytest.raises(InputError, match="carm.sdd"):
        formats.load_geometry(g)
    obj["carm"]["sdd"] = carm.sdd
    obj["R"][0][0] = 5.0
    g.write_text(json.dumps(obj))
    with pytest.raises(InputError, match="not rigid"):
        formats.load_geometry(g)


def test_result_rejects_bad_values(tmp_path):
    scaled = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64))
    with pytest.raises(InputError, match="not rigid"):
        formats.save_result(tmp_path / "r.json", formats.ResultRecord(scaled, method="x"))
    with pytest.raises(InputError, match="must be a number"):
        formats.save_result(tmp_path / "r.json", formats.ResultRecord(torch.eye(4), method="x",
                                                                      history=[{"mtre": "high"}]))
    with pytest.raises(InputError, match="JSON-serialisable"):
        formats.save_result(tmp_path / "r.json", formats.ResultRecord(torch.eye(4), method="x",
                                                                      config={"f": object()}))
    assert not (tmp_path / "r.json").exists()
