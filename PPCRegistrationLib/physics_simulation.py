"""The physics-based test X-ray simulator, ``--xray-model physics`` (docs/design.md §6.4).

A second way to make an X-ray from a CT, physically different from the training simulator (:mod:`.simulation`:
one monochromatic DRR, Poisson noise, blur, gamma and a flat scatter background).  Used for testing only:

1. The CT split into materials (:func:`.xray_physics.hu_to_densities`); one line integral per material gives its
   mass thickness (g/cm^2) on every detector pixel; metal objects (:mod:`.foreign_objects`) add theirs exactly.
2. A polychromatic tungsten spectrum (kVp, Al and Cu filtration) through those materials with the NIST
   mass attenuation coefficients, seen by an energy-integrating detector: beam hardening appears by itself.
3. The heel effect (a linear intensity ramp along the anode-cathode axis), scatter from a thickness-dependent
   convolution model (the scatter-to-primary ratio grows with the water-equivalent thickness, spread by a wide
   Gaussian, emitted only from the irradiated field), collimator blades (lead: 0.1 % leakage).
4. Quantum noise with the energy-integrating (Swank) variance, scintillator blur (a Gaussian core plus a wide
   glare tail), residual gain non-uniformity after flat-field correction, electronic noise, quantisation to
   12-16 bits with saturation of the direct beam, and the log transform applied or not (a linear detector image).
5. The intake: a linear image is stored as a DICOM with PixelIntensityRelationship ``LIN`` would be, and, as
   :func:`.xray_io.read_xray` does with such a file, its logarithm is taken
   (:func:`.xray_io.exposure_to_line_integrals`); ``linear_intake=False`` passes it on linear (a linear image
   whose intensity relationship nobody recorded).

Deterministic per seed.  Output: ``(H, W)`` float32 attenuation-positive (bone bright) image scaled to [0, 1], as the
registration takes X-rays, plus the drawn parameters and the collimated field's mask.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from .drr import DRRRenderer
from .errors import InputError
from .foreign_objects import Cylinder, chord_lengths, random_implants, random_instrument
from .geometry import Projection
from .rays import _pixel_grid, _rays_in_ct
from .simulation import _gaussian_blur, _uniform
from .volume import Volume
from .xray_io import exposure_to_line_integrals
from .xray_physics import MATERIALS, Spectrum, hu_to_densities, material_density

__all__ = ["PhysicsVariation", "PhysicsSimulator", "XRAY_MODELS"]

#: where the exposure-controlled signal behind the field's centre lands on the ADC's scale
ADC_CENTRE_FRACTION = 0.25
#: mass thickness (g/cm^2) of foreign metal above which a pixel is in ``info["metal_mask"]`` (~0.1 mm of steel)
METAL_MASK_G_CM2 = 0.05
#: the names of the X-ray simulators of ``ppcreg simulate/evaluate --xray-model``
XRAY_MODELS = ("drr", "physics")


@dataclass
class PhysicsVariation:
    """Ranges of the physics simulator's parameters, each drawn uniformly per image (probabilities: Bernoulli).

    kvp: tube voltage (kV).  al_mm, cu_mm: tube filtration (mm).  spr: scatter-to-primary ratio behind 20 cm of
    water (with an anti-scatter grid 0.1-0.5).  scatter_sigma_mm: width of the scatter kernel at the detector.
    heel: relative intensity change from edge to centre along the anode-cathode axis.  photons: detected photons
    per pixel behind the field's centre (automatic exposure control).  psf_px, glare, glare_px: scintillator blur
    (Gaussian core sigma, fraction and sigma of the wide tail).  gain_sd: residual gain non-uniformity (relative
    s.d. of a smooth field).  electronic_noise: s.d. relative to the exposure-controlled signal behind the field's
    centre (a fixed detector dose).  bits: ADC depth (one
    of 12, 14, 16).  collimation_p / collimation_fraction: probability of visible collimator blades and the
    open fraction of the field along each axis.  log_p: probability that the log transform is applied (else the
    image is linear in the detected intensity).  metal_p: probability of metal in the field when metal is asked
    for; instrument_p: probability that the metal includes an instrument in front of the detector.
    """

    kvp: tuple[float, float] = (70.0, 120.0)
    al_mm: tuple[float, float] = (2.5, 4.0)
    cu_mm: tuple[float, float] = (0.0, 0.3)
    spr: tuple[float, float] = (0.1, 0.5)
    scatter_sigma_mm: tuple[float, float] = (25.0, 60.0)
    heel: tuple[float, float] = (0.0, 0.15)
    photons: tuple[float, float] = (300.0, 3000.0)
    psf_px: tuple[float, float] = (0.4, 1.0)
    glare: tuple[float, float] = (0.0, 0.08)
    glare_px: tuple[float, float] = (6.0, 15.0)
    gain_sd: tuple[float, float] = (0.0, 0.02)
    electronic_noise: tuple[float, float] = (0.0, 0.01)
    bits: tuple[int, ...] = (12, 14, 16)
    collimation_p: float = 0.7
    collimation_fraction: tuple[float, float] = (0.75, 0.95)
    log_p: float = 0.5
    metal_p: float = 0.5
    instrument_p: float = 0.5


def _coin(gen: torch.Generator, p: float) -> bool:
    return float(torch.rand((), generator=gen, dtype=torch.float64)) < p


@dataclass
class PhysicsSimulator:
    """The physics X-ray simulator of one CT.

    Args:
        ct: the CT (HU).
        anchor: ``(M, 3)`` points (mm, CT frame) the implants are placed around (the registration's surface
            points); needed when ``metal``.
        metal: put metal in the field of a random ``variation.metal_p`` share of the images.
        variation: parameter ranges.
        device: where the material volumes and the rendering live.
        linear_intake: take the logarithm of linear detector images, as the intake of a DICOM marked ``LIN`` does
            (default); False registers them linear.
    """

    ct: Volume
    anchor: torch.Tensor | None = None
    metal: bool = False
    variation: PhysicsVariation = field(default_factory=PhysicsVariation)
    device: str | torch.device = "cpu"
    linear_intake: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.ct, Volume):
            raise InputError(f"the physics simulator needs a volume.Volume (CT in HU), got {type(self.ct).__name__}")
        if self.metal and self.anchor is None:
            raise InputError("metal in the field needs anchor points to place the implants around")
        dens = hu_to_densities(self.ct.data)
        self._renderers: dict[str, DRRRenderer] = {}
        for m in MATERIALS:
            if bool((dens[m] > 0).any()):
                self._renderers[m] = DRRRenderer.from_values(self.ct.with_data(dens[m]), device=self.device)

    # -- mechanism
    def mass_thickness(self, proj: Projection, T: torch.Tensor,
                       objects: list[Cylinder] = ()) -> dict[str, torch.Tensor]:
        """Mass thickness (g/cm^2) of each material on every pixel of the CT moved by ``T (4, 4)``, plus objects.

        Returns ``{material: (H, W) float64}`` (CT materials, then the objects' metals).
        """
        T = T.to(torch.float64).reshape(1, 4, 4)
        out = {m: r.render(proj, T)[0].cpu().to(torch.float64) * 0.1 for m, r in self._renderers.items()}
        if objects:
            pix = _pixel_grid(proj.height, proj.width, torch.device("cpu"))
            proj64 = proj.to("cpu", torch.float64)
            rays = {True: _rays_in_ct(proj64, T),  # objects in the patient move with it, the others do not
                    False: _rays_in_ct(proj64, torch.eye(4, dtype=torch.float64)[None])}
            for obj in objects:
                c, D = rays[obj.attached]
                dirs = pix @ D[0].T
                m = chord_lengths(obj, c[0], dirs) * 0.1 * material_density(obj.material)
                out[obj.material] = out.get(obj.material, 0) + m
        return out

    def draw(self, proj: Projection, seed: int) -> dict:
        """The parameters of one image (deterministic per ``seed``): a dict of plain values and the objects."""
        v, gen = self.variation, torch.Generator().manual_seed(int(seed))
        p = {"kvp": _uniform(gen, *v.kvp), "al_mm": _uniform(gen, *v.al_mm), "cu_mm": _uniform(gen, *v.cu_mm),
             "spr": _uniform(gen, *v.spr), "scatter_sigma_mm": _uniform(gen, *v.scatter_sigma_mm),
             "heel": _uniform(gen, *v.heel), "heel_axis": int(torch.randint(0, 4, (), generator=gen)),
             "photons": math.exp(_uniform(gen, *map(math.log, v.photons))),
             "psf_px": _uniform(gen, *v.psf_px), "glare": _uniform(gen, *v.glare),
             "glare_px": _uniform(gen, *v.glare_px), "gain_sd": _uniform(gen, *v.gain_sd),
             "electronic_noise": _uniform(gen, *v.electronic_noise),
             "bits": int(v.bits[int(torch.randint(0, len(v.bits), (), generator=gen))]),
             "collimated": _coin(gen, v.collimation_p), "log": _coin(gen, v.log_p),
             "noise_seed": int(torch.randint(0, 2**31 - 1, (), generator=gen))}
        fr = [_uniform(gen, *v.collimation_fraction) for _ in range(2)]
        shift = [_uniform(gen, -0.5, 0.5) * (1 - f) for f in fr]
        p["field"] = [fr[0], fr[1], shift[0], shift[1]]  # open fraction (u, v) and centre shift (fraction)
        objects: list[Cylinder] = []
        p["metal"] = bool(self.metal and _coin(gen, v.metal_p))
        if p["metal"]:
            objects = random_implants(self.anchor, gen)
            if _coin(gen, v.instrument_p):
                proj64 = proj.to("cpu", torch.float64)
                centre_uv = torch.tensor([[[(proj.width - 1) / 2, (proj.height - 1) / 2]]], dtype=torch.float64)
                det = proj64.detector_pixel_world(centre_uv)[0, 0]
                objects += random_instrument(proj64.source[0], det, float(proj64.pixel_spacing[0, 0]) * proj.width,
                                             gen)
        p["objects"] = objects
        return p

    def simulate(self, proj: Projection, T_gt: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, dict]:
        """An X-ray of the CT moved by ``T_gt (4, 4)``.

        Returns:
            ``(image, info)``: ``(H, W)`` float32 in [0, 1] (attenuation-positive), and the drawn parameters with
            ``"field_mask"`` ``(H, W)`` bool (inside the collimator), ``"metal_mask"`` ``(H, W)`` bool (the pixels
            behind more than :data:`METAL_MASK_G_CM2` of the objects' metal, before the detector's blur) and
            ``"objects"`` (the metal's cylinders).
        """
        if T_gt.shape != (4, 4):
            raise InputError(f"T_gt must be a 4x4 matrix, got {tuple(T_gt.shape)}")
        p = self.draw(proj, seed)
        M = self.mass_thickness(proj, T_gt, p["objects"])
        object_metals = {o.material for o in p["objects"]}
        metal_mask = sum((M[m] for m in object_metals), torch.zeros(proj.height, proj.width, dtype=torch.float64))
        metal_mask = metal_mask > METAL_MASK_G_CM2
        spec = Spectrum.kramers(p["kvp"], {"aluminium": p["al_mm"], "copper": p["cu_mm"]})
        primary = spec.detected(M)                                        # (H, W) relative to the open beam
        h, w = primary.shape
        gen = torch.Generator().manual_seed(p["noise_seed"])
        # heel effect: the tube output falls towards the anode side
        ramp = torch.linspace(-1.0, 1.0, w if p["heel_axis"] < 2 else h, dtype=torch.float64)
        ramp = ramp if p["heel_axis"] % 2 == 0 else -ramp
        heel = 1.0 - p["heel"] * (ramp + 1.0) / 2.0
        heel = heel[None, :] if p["heel_axis"] < 2 else heel[:, None]
        field_mask = self._field_mask(h, w, p) if p["collimated"] else torch.ones(h, w, dtype=torch.bool)
        open_beam = heel * torch.where(field_mask, 1.0, 1e-3)
        primary = primary * open_beam
        # scatter: SPR grows with the water-equivalent thickness, emitted from the irradiated field only
        thick_cm = sum(M.values())                                        # g/cm^2 ~ cm of water
        px_mm = float(proj.pixel_spacing.reshape(-1, 2)[0].mean())
        scatter = _gaussian_blur(primary * p["spr"] * (thick_cm / 20.0) * field_mask,
                                 p["scatter_sigma_mm"] / px_mm)
        signal = primary + scatter
        # quantum noise at the dose set by the exposure control (the centre of the field)
        centre = signal[h // 4:h - h // 4, w // 4:w - w // 4]
        n0 = p["photons"] / max(float(centre.median()), 1e-9)             # photons per pixel of the open beam
        swank = float((spec.photons * spec.energies_kev ** 2).sum() * spec.photons.sum()
                      / (spec.photons * spec.energies_kev).sum() ** 2)
        q = signal * n0
        q = q + torch.sqrt(q * swank) * torch.randn(q.shape, generator=gen, dtype=torch.float64)
        # scintillator blur (core + glare), gain residual, electronic noise
        q = (1 - p["glare"]) * _gaussian_blur(q, p["psf_px"]) + p["glare"] * _gaussian_blur(q, p["glare_px"])
        gain = F.interpolate(torch.randn(1, 1, 8, 8, generator=gen, dtype=torch.float64), size=(h, w),
                             mode="bicubic", align_corners=True)[0, 0]
        q = q * (1 + p["gain_sd"] * gain)
        q = q + p["electronic_noise"] * p["photons"] * torch.randn(q.shape, generator=gen, dtype=torch.float64)
        # ADC: set for the exposure-controlled dose (the field's centre at a quarter of full scale); the open
        # beam beside the patient saturates, as on a real detector
        full = 2 ** p["bits"] - 1
        dn = torch.round(q / p["photons"] * ADC_CENTRE_FRACTION * full).clamp(0, full)
        if p["log"]:  # the detector's own log transform
            att = -torch.log(dn.clamp_min(0.5) / full)
        elif self.linear_intake:  # stored linear (LIN); the intake takes the log, as read_xray does
            att = torch.from_numpy(exposure_to_line_integrals(dn.numpy()))
        else:  # linear, and registered so
            att = 1.0 - dn / full
        # display window: 0.5-99.5 % of the collimated field to [0, 1], the rest clipped (the collimator's
        # shadow and burnt-out direct beam saturate, as on a monitor)
        inside = att[field_mask]
        lo, hi = (float(v) for v in torch.quantile(inside, torch.tensor([0.005, 0.995], dtype=inside.dtype)))
        img = ((att - lo) / max(hi - lo, 1e-12)).clamp(0, 1).to(torch.float32)
        info = {k: v for k, v in p.items() if k != "objects"}
        info.update(field_mask=field_mask, metal_mask=metal_mask, objects=p["objects"],
                    mean_energy_kev=spec.mean_energy(),
                    intensity_relationship="LOG" if p["log"] else "LIN",
                    intake_log=bool(not p["log"] and self.linear_intake))
        return img, info

    @staticmethod
    def _field_mask(h: int, w: int, p: dict) -> torch.Tensor:
        fu, fv, su, sv = p["field"]
        u = (torch.arange(w, dtype=torch.float64) + 0.5) / w - 0.5 - su
        v = (torch.arange(h, dtype=torch.float64) + 0.5) / h - 0.5 - sv
        return (v.abs()[:, None] <= fv / 2) & (u.abs()[None, :] <= fu / 2)


def describe(info: dict) -> dict:
    """The JSON-safe part of a :meth:`PhysicsSimulator.simulate` info dict (no mask; objects as dicts)."""
    out = {k: v for k, v in info.items() if k not in ("field_mask", "metal_mask", "objects")}
    out["objects"] = [asdict(o) for o in info.get("objects", [])]
    return out
