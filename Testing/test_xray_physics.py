"""The physics test simulator: attenuation data, spectrum, Beer-Lambert, beam hardening, metal, determinism, and
the real lumbar CT (docs/design.md §6.4)."""

from __future__ import annotations

import math

import pytest
import torch

from PPCRegistrationLib.drr import DRRRenderer
from PPCRegistrationLib.errors import InputError
from PPCRegistrationLib.foreign_objects import Cylinder, chord_lengths
from PPCRegistrationLib.geometry import Projection, carm_pose
from PPCRegistrationLib.physics_simulation import PhysicsSimulator, PhysicsVariation
from PPCRegistrationLib.volume import Volume
from PPCRegistrationLib.xray_physics import Spectrum, attenuation_table, hu_to_densities


def test_table_values_and_interpolation():
    t = attenuation_table()
    # NIST Table 4 entries are returned exactly at the tabulated energies
    assert float(t.mu_rho("water", torch.tensor([60.0]))) == pytest.approx(0.2059, rel=1e-9)
    assert float(t.mu_rho("bone", torch.tensor([40.0]))) == pytest.approx(0.6655, rel=1e-9)
    e = torch.linspace(10, 150, 141, dtype=torch.float64)
    for m in ("soft_tissue", "bone", "iron", "titanium", "aluminium", "copper"):
        v = t.mu_rho(m, e)
        assert bool((v[1:] < v[:-1]).all()), f"{m}: mu/rho must fall with energy (no edge in 10-150 keV)"
    # photo-electric absorption makes bone stand out at diagnostic energies; at 150 keV (Compton) it does not
    low = e[e <= 100]
    assert bool((t.mu_rho("bone", low) > 1.05 * t.mu_rho("soft_tissue", low)).all())
    assert float(t.mu_rho("bone", torch.tensor([150.0]))) < float(t.mu_rho("soft_tissue", torch.tensor([150.0])))
    with pytest.raises(InputError, match="keV"):
        t.mu_rho("water", torch.tensor([5.0]))
    with pytest.raises(InputError, match="material"):
        t.mu_rho("unobtainium", torch.tensor([50.0]))


def test_spectrum_energy_conservation():
    """The unfiltered Kramers spectrum's total energy is the analytic integral of k (kVp - E) over the energies,
    for any bin width; a filter never adds photons, and hardens the beam."""
    for kvp in (70.0, 120.0):
        exact = (kvp - 10.0) ** 2 / 2  # integral of (kVp - E) dE from 10 keV to kVp
        for bin_kev in (0.5, 1.0, 2.0):
            s = Spectrum.kramers(kvp, bin_kev=bin_kev)
            # energy per bin is N * E_centre: exact for the linear integrand up to the bin-centre error
            assert s.energy_fluence() == pytest.approx(exact, rel=2e-3)
            assert float(s.normalized().photons.sum()) == pytest.approx(1.0, abs=1e-12)
        f = Spectrum.kramers(kvp, {"aluminium": 2.5, "copper": 0.2})
        assert bool((f.photons <= Spectrum.kramers(kvp).photons + 1e-15).all())
        assert f.mean_energy() > Spectrum.kramers(kvp).mean_energy() + 5
    with pytest.raises(InputError, match="tube voltage"):
        Spectrum.kramers(200.0)


def _slab_case(thickness_mm: float, hu: float, n: int = 48):
    """A uniform slab of ``hu`` (in air), ``thickness_mm`` along the beam (the AP axis, j), and a PA view."""
    sp = 1.0
    k = int(round(thickness_mm / sp))
    data = torch.full((n, k, n), float(hu))  # (K, J, I): thin along j
    m = torch.diag(torch.tensor([sp, sp, sp, 1.0], dtype=torch.float64))
    m[:3, 3] = torch.tensor([-(n - 1) / 2 * sp, -(k - 1) / 2 * sp, -(n - 1) / 2 * sp], dtype=torch.float64)
    vol = Volume(data, m)
    pose = carm_pose(0.0, 0.0, 1000.0, torch.zeros(3, dtype=torch.float64), "LPS")
    proj = Projection.from_carm(pose, 2000.0, 16, 16, 0.5)
    return vol, proj


@pytest.mark.parametrize("hu", [0.0, 1000.0])
def test_uniform_slab_matches_beer_lambert_per_energy(hu):
    """Behind a uniform slab each energy is attenuated as exp(-mu/rho(E) rho t), and the detector signal is their
    energy-weighted sum: the simulator's mass thickness and transmission against the hand computation."""
    t_mm = 40.0
    vol, proj = _slab_case(t_mm, hu)
    dens = hu_to_densities(vol.data)
    sim = PhysicsSimulator(vol)
    M = sim.mass_thickness(proj, torch.eye(4, dtype=torch.float64))
    centre = {m: float(v[6:10, 6:10].mean()) for m, v in M.items()}
    for m, d in dens.items():  # mass thickness = density x thickness (g/cm^2), the rays nearly parallel to the axis
        want = float(d.max()) * t_mm / 10.0
        assert centre.get(m, 0.0) == pytest.approx(want, rel=0.01, abs=1e-9), m
    spec = Spectrum.kramers(90.0, {"aluminium": 3.0})
    got = float(spec.detected({m: torch.tensor(v, dtype=torch.float64) for m, v in centre.items()}))
    table = attenuation_table()
    mu = sum(table.mu_rho(m, spec.energies_kev) * v for m, v in centre.items())
    w = spec.photons * spec.energies_kev
    want = float((w * torch.exp(-mu)).sum() / w.sum())
    assert got == pytest.approx(want, rel=1e-9)
    # one energy alone (a narrow spectrum) is exactly Beer-Lambert
    mono = Spectrum(torch.tensor([60.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64), 1.0)
    thick = {m: torch.tensor(v, dtype=torch.float64) for m, v in centre.items()}
    bl = math.exp(-sum(float(table.mu_rho(m, torch.tensor([60.0]))) * v for m, v in centre.items()))
    assert float(mono.detected(thick)) == pytest.approx(bl, rel=1e-9)


def test_beam_hardening_lowers_effective_attenuation_behind_thicker_bone():
    spec = Spectrum.kramers(80.0, {"aluminium": 2.5})
    mu_eff, mean_e = [], []
    for t_cm in (0.5, 1.0, 2.0, 4.0):
        m = torch.tensor(1.92 * t_cm)
        p = float(spec.detected({"bone": m}))
        mu_eff.append(-math.log(p) / t_cm)
        mean_e.append(spec.transmitted({"bone": float(m)}).mean_energy())
    assert all(a > b for a, b in zip(mu_eff, mu_eff[1:])), mu_eff
    assert all(a < b for a, b in zip(mean_e, mean_e[1:])), mean_e
    assert mu_eff[0] / mu_eff[-1] > 1.2  # a clearly visible effect, not rounding


def test_cylinder_chords():
    c = Cylinder((0.0, 0.0, -50.0), (0.0, 0.0, 50.0), 3.0, "iron")
    o = torch.tensor([-1000.0, 0.0, 0.0], dtype=torch.float64)
    dirs = torch.tensor([[1.0, 0.0, 0.0], [1000.0, 2.0, 0.0], [1000.0, 3.5, 0.0], [1000.0, 0.0, 60.0]],
                        dtype=torch.float64)
    got = chord_lengths(c, o, dirs)
    half = math.sqrt(9.0 - (2.0 / math.hypot(1000.0, 2.0) * 1000.0) ** 2)
    assert float(got[0]) == pytest.approx(6.0, abs=1e-9)          # through the axis
    assert float(got[1]) == pytest.approx(2 * half, rel=1e-3)      # off-centre
    assert float(got[2]) == 0.0 and float(got[3]) == 0.0           # beside it, past its end
    along = chord_lengths(c, torch.tensor([0.0, 0.0, -200.0], dtype=torch.float64),
                          torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64))
    assert float(along[0]) == pytest.approx(100.0, abs=1e-9)       # along the axis: its length
    with pytest.raises(InputError):
        Cylinder((0.0, 0.0, 0.0), (0.0, 0.0, 0.0), 1.0)


def test_values_renderer_refuses_bad_values():
    vol, _ = _slab_case(8.0, 0.0, n=8)
    with pytest.raises(InputError, match="every voxel is 0"):
        DRRRenderer.from_values(vol.with_data(torch.zeros(vol.shape)))
    with pytest.raises(InputError, match="non-negative"):
        DRRRenderer.from_values(vol.with_data(-torch.ones(vol.shape)))


def test_lumbar_ct_physics_xray(lumbar_l3):
    """On the real lumbar CT: deterministic per seed, another image than the training DRR but the same anatomy,
    metal visible where it was put, the collimator's shadow outside the field."""
    from PPCRegistrationLib.simulation import ViewSampler, make_case

    ct, _, renderer, surface = lumbar_l3
    targets = surface.points.detach().cpu().to(torch.float64)
    case = make_case(renderer, targets, 3, (5.0, 10.0), ViewSampler(detector_size_px=128))
    sim = PhysicsSimulator(ct, anchor=targets, metal=True,
                           variation=PhysicsVariation(metal_p=1.0, collimation_p=1.0, log_p=1.0))
    a, info = sim.simulate(case.projection, case.T_gt, seed=11)
    b, _ = sim.simulate(case.projection, case.T_gt, seed=11)
    c, _ = sim.simulate(case.projection, case.T_gt, seed=12)
    assert a.shape == (128, 128) and a.dtype == torch.float32 and bool(torch.isfinite(a).all())
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert info["metal"] and info["objects"]
    drr = renderer.render(case.projection, case.T_gt[None])[0]
    field = info["field_mask"]
    r = torch.corrcoef(torch.stack([a[field].double(), drr[field].double()]))[0, 1]
    assert 0.5 < float(r) < 0.999, float(r)
    # metal: the pixels behind the implants (in the patient) are among the most attenuating of the field
    implants = [o for o in info["objects"] if o.attached]
    M = sim.mass_thickness(case.projection, case.T_gt, implants)
    metal_px = (M.get("titanium", torch.zeros(1)) + M.get("iron", torch.zeros(1))) > 2.0
    metal_px = metal_px & field
    assert int(metal_px.sum()) > 5
    assert float(a[metal_px].median()) > float(a[field & ~metal_px].quantile(0.75))
    # collimator blades: outside the field almost no primary, so high attenuation after the log
    assert int((~field).sum()) > 0 and float(a[~field].mean()) > float(a[field].mean())
    without = PhysicsSimulator(ct, variation=PhysicsVariation(collimation_p=0.0))
    d, info_d = without.simulate(case.projection, case.T_gt, seed=11)
    assert not info_d["metal"] and bool(info_d["field_mask"].all())


def test_cli_simulate_physics_with_metal_and_its_errors(capsys, tmp_path, lumbar_ct_path, lumbar_labels_path):
    """`ppcreg simulate --xray-model physics --metal` writes the case with the drawn physics; --metal alone is a
    clear error before the CT is read."""
    import json

    from PPCRegistrationLib.cli import main

    base = ["simulate", "--ct", str(lumbar_ct_path), "--labels", str(lumbar_labels_path), "--vertebra", "L3",
            "--seed", "1", "--mtre", "5", "--detector-px", "96"]
    assert main(base + ["--out", str(tmp_path / "bad"), "--metal"]) == 2
    assert "--metal needs --xray-model physics" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert main(base + ["--out", str(tmp_path / "drr")]) == 0
    assert main(base + ["--out", str(tmp_path / "phys"), "--xray-model", "physics", "--metal"]) == 0
    case = json.loads((tmp_path / "phys" / "case.json").read_text())
    assert case["xray_model"] == "physics" and 70 <= case["physics"]["kvp"] <= 120
    drr = json.loads((tmp_path / "drr" / "case.json").read_text())
    assert drr["xray_model"] == "drr" and drr["physics"] is None
    # the same case (view, initial estimate), another image
    assert case["initial_mtre_mm"] == drr["initial_mtre_mm"] and case["view"] == drr["view"]
    assert (tmp_path / "phys" / "xray.nrrd").read_bytes() != (tmp_path / "drr" / "xray.nrrd").read_bytes()


def test_evaluate_reports_the_simulator_gap(lumbar_l3, one_torch_thread):
    """Both simulators on the same cases: each method twice, paired, with the physics draws in the records."""
    from PPCRegistrationLib.evaluation import evaluate, summary_markdown

    ct, roi, renderer, surface = lumbar_l3
    res = evaluate(ct, roi, methods=["classic"], n_cases=2, seed=5, mtre_range=(2.0, 4.0), iterations=1,
                   detector_px=96, renderer=renderer, surface=surface, progress=False,
                   xray_models=("drr", "physics"), metal=True, mask_field=True)
    assert res["config"]["methods"] == ["classic", "classic@physics"] and res["config"]["metal"]
    assert res["config"]["mask_field"]
    for rec in res["cases"]:
        assert set(rec["methods"]) == {"classic", "classic@physics"}
        assert 70 <= rec["physics"]["kvp"] <= 120 and isinstance(rec["physics"]["objects"], list)
        # the field found in each X-ray: (nearly) the whole image of the uncollimated DRR X-ray (the end of the CT's
        # scan range is a straight edge across it too)
        u0, v0, u1, v1 = rec["field_box"]["drr"]
        assert (u1 - u0) * (v1 - v0) >= 0.9 * 96 * 96 and len(rec["field_box"]["physics"]) == 4
    pair = res["summary"]["paired"][0]
    assert (pair["a"], pair["b"]) == ("classic@physics", "classic")
    assert "classic@physics" in summary_markdown(res)
    with pytest.raises(InputError, match="physics"):
        evaluate(ct, roi, n_cases=1, xray_models=("drr",), metal=True, renderer=renderer, surface=surface,
                 progress=False)
    with pytest.raises(InputError, match="unknown X-ray model"):
        evaluate(ct, roi, n_cases=1, xray_models=("deepdrr",), renderer=renderer, surface=surface, progress=False)


def test_collimator_blades_are_found_and_filled(lumbar_l3, tmp_path_factory):
    """On collimated physics X-rays of the lumbar CT the field found from the image alone overlaps the simulator's
    field (IoU > 0.8); the training simulator's uncollimated X-rays and the real RG1 radiograph keep the whole
    image; the fill leaves no step at the field's edge and does not modify its input."""
    from PPCRegistrationLib.io import read_xray
    from PPCRegistrationLib.sample_data import fetch_radiograph
    from PPCRegistrationLib.simulation import ViewSampler, make_case
    from PPCRegistrationLib.xray_field import detect_field, field_mask, fill_outside

    ct, _, renderer, surface = lumbar_l3
    targets = surface.points.detach().cpu().to(torch.float64)
    sim = PhysicsSimulator(ct, variation=PhysicsVariation(collimation_p=1.0))
    for seed in range(4):
        case = make_case(renderer, targets, seed, (5.0, 10.0), ViewSampler(detector_size_px=128))
        img, info = sim.simulate(case.projection, case.T_gt, case.xray_seed)
        box = detect_field(img)
        found, truth = field_mask(img.shape, box), info["field_mask"]
        assert float((found & truth).sum() / (found | truth).sum()) > 0.8, (seed, box)
        assert detect_field(case.xray) == (0, 0, 128, 128)
        before = img.clone()
        filled = fill_outside(img, box)
        assert torch.equal(img, before)
        u0, v0, u1, v1 = box
        assert torch.equal(filled[v0 + 2:v1 - 2, u0 + 2:u1 - 2], img[v0 + 2:v1 - 2, u0 + 2:u1 - 2])
        if v0 > 0:  # above the field: each column repeats the field's first row
            assert torch.equal(filled[0], filled[v0 + 2])
    try:  # the same cache as test_io.py's
        path = fetch_radiograph(cache_dir=tmp_path_factory.getbasetemp() / "ppcreg-sample-cache", progress=False)
    except Exception as exc:  # no network / registry
        pytest.skip(f"sample radiograph unavailable: {exc}")
    rg1 = read_xray(path, pixel_spacing=0.2)
    assert detect_field(rg1.image) == (0, 0, rg1.width, rg1.height)
    with pytest.raises(InputError, match="too small"):
        fill_outside(torch.rand(32, 32), (10, 10, 14, 14))


def test_linear_images_go_through_the_intake_log(lumbar_l3):
    """A linear detector image (no log transform) is logged by the intake as a DICOM marked LIN would be: the same
    draw with the detector's own log gives (almost) the same image; registered as is (``linear_intake=False``) it is
    another, nonlinear one.  The records say which."""
    from PPCRegistrationLib.simulation import ViewSampler, make_case

    ct, _, renderer, surface = lumbar_l3
    targets = surface.points.detach().cpu().to(torch.float64)
    case = make_case(renderer, targets, 2, (5.0, 10.0), ViewSampler(detector_size_px=96))
    args = (case.projection, case.T_gt)
    logged, info_log = PhysicsSimulator(ct, variation=PhysicsVariation(log_p=1.0, collimation_p=0.0)).simulate(
        *args, seed=4)
    lin = PhysicsSimulator(ct, variation=PhysicsVariation(log_p=0.0, collimation_p=0.0))
    intake, info_lin = lin.simulate(*args, seed=4)
    as_is, info_as_is = PhysicsSimulator(ct, variation=PhysicsVariation(log_p=0.0, collimation_p=0.0),
                                         linear_intake=False).simulate(*args, seed=4)
    assert (info_log["intensity_relationship"], info_log["intake_log"]) == ("LOG", False)
    assert (info_lin["intensity_relationship"], info_lin["intake_log"]) == ("LIN", True)
    assert not info_as_is["intake_log"]
    assert float((intake - logged).abs().mean()) < 0.01
    assert float((as_is - logged).abs().mean()) > 0.03


def test_metal_mask_and_inpainting(lumbar_l3):
    """The simulator's metal mask covers the implants; inpainting it takes the metal out (no pixel of the mask as
    bright as before), keeps the rest, and does not modify its input; a plane is inpainted exactly; bad masks are
    clear errors."""
    from PPCRegistrationLib.inpainting import inpaint
    from PPCRegistrationLib.simulation import ViewSampler, make_case

    ct, _, renderer, surface = lumbar_l3
    targets = surface.points.detach().cpu().to(torch.float64)
    case = make_case(renderer, targets, 3, (5.0, 10.0), ViewSampler(detector_size_px=128))
    sim = PhysicsSimulator(ct, anchor=targets, metal=True, variation=PhysicsVariation(metal_p=1.0, log_p=1.0))
    img, info = sim.simulate(case.projection, case.T_gt, seed=11)
    mask = info["metal_mask"]
    assert mask.dtype == torch.bool and mask.shape == img.shape and int(mask.sum()) > 20
    before = img.clone()
    out = inpaint(img, mask)
    assert torch.equal(img, before) and out.dtype == img.dtype
    import scipy.ndimage as ndi

    grown = torch.from_numpy(ndi.binary_dilation(mask.numpy(), iterations=2))
    assert torch.equal(out[~grown], img[~grown])
    assert float(out[mask].mean()) < float(img[mask].mean()) - 0.05
    # harmonic inpainting reproduces a plane inside the image
    v, u = torch.meshgrid(torch.arange(40.0, dtype=torch.float64), torch.arange(50.0, dtype=torch.float64),
                          indexing="ij")
    plane = 0.3 + 0.01 * u - 0.02 * v
    hole = ((u - 25) ** 2 + (v - 20) ** 2) < 64
    spoiled = torch.where(hole, torch.full_like(plane, 5.0), plane)
    assert torch.allclose(inpaint(spoiled, hole, dilation_px=0), plane, atol=1e-9)
    assert torch.equal(inpaint(plane, torch.zeros_like(hole)), plane)
    with pytest.raises(InputError, match="shape"):
        inpaint(plane, hole[:10])
    with pytest.raises(InputError, match="whole X-ray"):
        inpaint(plane, torch.ones_like(hole))
    with pytest.raises(InputError, match="2D"):
        inpaint(plane[None], hole[None])


def _blobs(n: int = 96) -> torch.Tensor:
    v, u = torch.meshgrid(torch.arange(n, dtype=torch.float64), torch.arange(n, dtype=torch.float64), indexing="ij")
    p = torch.zeros(n, n, dtype=torch.float64)
    for cu, cv, s, a in ((30, 30, 9, 2.0), (60, 50, 14, 1.5), (45, 75, 6, 3.0), (75, 20, 10, 1.0)):
        p = p + a * torch.exp(-((u - cu) ** 2 + (v - cv) ** 2) / (2 * s * s))
    return p


def test_unexplained_mask_finds_what_the_ct_lacks():
    """A bar added to an X-ray that is a slowly varying linear map of the DRR is found (and nothing else); the same
    X-ray one pixel off is explained within the tolerance; bad inputs are clear errors."""
    from PPCRegistrationLib.foreign_detection import unexplained_mask

    p = _blobs()
    gen = torch.Generator().manual_seed(0)
    u = torch.arange(96, dtype=torch.float64)[None, :]
    x = 0.2 + 0.5 * p * (1 + 0.3 * u / 96) + 0.002 * torch.randn(p.shape, generator=gen, dtype=torch.float64)
    bar = torch.zeros(96, 96, dtype=torch.bool)
    bar[40:45, 20:70] = True
    found = unexplained_mask(x + 0.5 * bar, p)
    assert float((found & bar).sum() / bar.sum()) > 0.9
    import scipy.ndimage as ndi

    near = torch.from_numpy(ndi.binary_dilation(bar.numpy(), iterations=2))
    assert int((found & ~near).sum()) == 0
    assert int(unexplained_mask(x, p).sum()) == 0
    moved = torch.cat([x[:, :1], x[:, :-1]], dim=1)  # one pixel to the right
    assert int(unexplained_mask(moved, p, tolerance_px=2.0).sum()) == 0
    with pytest.raises(InputError, match="one shape"):
        unexplained_mask(x, p[:50])
    with pytest.raises(InputError, match="NaN"):
        unexplained_mask(x * float("nan"), p)
    with pytest.raises(InputError, match="bad settings"):
        unexplained_mask(x, p, threshold_sd=0)


def test_registration_inpaints_what_the_ct_cannot_explain(lumbar_l3):
    """On a physics X-ray of the lumbar CT with screws in L3 the classic registration finds the metal at its
    result, registers again on the X-ray with it inpainted (the image similarity leaving those pixels out) and ends
    below 2 mm; the X-ray given is not modified;
    reset() goes back to it; ``foreign.passes = 0`` makes no pass."""
    from PPCRegistrationLib.config import RegistrationConfig
    from PPCRegistrationLib.methods import resolve_method
    from PPCRegistrationLib.metrics import mtre
    from PPCRegistrationLib.similarity import pose_similarity
    from PPCRegistrationLib.simulation import ViewSampler, make_case

    ct, roi, renderer, surface = lumbar_l3
    targets = surface.points.detach().cpu().to(torch.float64)
    case = make_case(renderer, targets, 4, (2.0, 6.0), ViewSampler(detector_size_px=128))
    sim = PhysicsSimulator(ct, anchor=targets, metal=True,
                           variation=PhysicsVariation(metal_p=1.0, log_p=1.0, collimation_p=0.0))
    img, info = sim.simulate(case.projection, case.T_gt, seed=4)
    before = img.clone()
    reg = resolve_method("classic").registration(ct, img, case.projection, case.T_init, roi, RegistrationConfig(),
                                                 T_gt=case.T_gt, surface=surface, renderer=renderer)
    res = reg.run()
    assert torch.equal(img, before)
    assert reg.foreign_passes == 1 and any("inpainted" in st.message for st in res.history)
    metal = info["metal_mask"]
    assert float((reg.foreign_mask & metal).sum() / metal.sum()) > 0.5
    assert float(mtre(res.T, case.T_gt, targets)) < 2.0
    assert not torch.equal(reg.xray.cpu(), img)
    # the image similarity leaves the inpainted pixels out (foreign.mask_inpainted), or with the setting off not
    cfg = RegistrationConfig()
    kw = dict(sigma_px=cfg.refine.sigmas_px[-1], highpass_px=cfg.refine.highpass_px, blur_px=cfg.refine.blur_px,
              margin_px=int(cfg.matching.window_margin_px))
    masked = pose_similarity(renderer, reg.xray, case.projection, res.T, surface.points, ignore=reg.foreign_mask, **kw)
    plain = pose_similarity(renderer, reg.xray, case.projection, res.T, surface.points, **kw)
    assert abs(reg._similarity(res.T) - masked) < 1e-6 and abs(masked - plain) > 1e-4, (masked, plain)
    reg.config = cfg.updated({"foreign.mask_inpainted": False})
    assert abs(reg._similarity(res.T) - plain) < 1e-6
    reg.reset()
    assert torch.equal(reg.xray.cpu(), img) and reg.foreign_passes == 0 and reg.foreign_mask is None
    off = resolve_method("classic").registration(ct, img, case.projection, case.T_init, roi,
                                                 RegistrationConfig().updated({"foreign.passes": 0}),
                                                 surface=surface, renderer=renderer)
    off.run()
    assert off.foreign_passes == 0 and off.foreign_mask is None
