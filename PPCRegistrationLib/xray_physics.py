"""Physics of the test X-ray simulator (docs/design.md §6.4): materials, a polychromatic spectrum, attenuation.

Nothing here is used to make training data: the training X-rays come from :mod:`.simulation` (one monochromatic
DRR plus noise).  This module knows the physics that the training simulator leaves out, so that a test on its
images shows what a method learned from the simulator rather than from the anatomy.

* :func:`attenuation_table`: mass attenuation coefficients mu/rho (cm^2/g) of the materials, from the NIST tables
  shipped in ``data/nist_mass_attenuation.csv`` (source and licence in the file), log-log interpolated in energy.
* :class:`Spectrum`: photon fluence per energy bin of a tungsten-anode tube, Kramers' bremsstrahlung law
  ``N(E) ~ (kVp - E) / E`` (photons per keV), hardened by the tube's filtration (Al, Cu).  No characteristic lines.
* :func:`hu_to_densities`: HU -> partial densities (g/cm^3) of lung, soft tissue (fat and muscle), cortical bone and
  metal.  Bone voxels are a mixture of soft tissue and cortical bone, metal voxels are iron.
* :meth:`Spectrum.detected`: what an energy-integrating detector measures behind given mass thicknesses of each
  material: ``sum_E N(E) E exp(-sum_m mu/rho_m(E) M_m)`` -- so beam hardening appears by itself.

Units: energies keV, mass thickness g/cm^2, densities g/cm^3, lengths mm.
"""

from __future__ import annotations

import csv
import functools
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InputError

__all__ = ["AttenuationTable", "attenuation_table", "Spectrum", "hu_to_densities", "MATERIALS",
           "MATERIAL_COEFFICIENTS"]

_TABLE_FILE = Path(__file__).with_name("data") / "nist_mass_attenuation.csv"

#: the materials a CT voxel is split into (keys of :func:`hu_to_densities`)
MATERIALS = ("lung", "soft_tissue", "bone", "metal")
#: the NIST column whose mu/rho each material uses (lung: ICRU-44 lung tissue differs from muscle by < 1 %)
MATERIAL_COEFFICIENTS = {"lung": "soft_tissue", "soft_tissue": "soft_tissue", "bone": "bone", "metal": "iron",
                         "iron": "iron", "titanium": "titanium", "aluminium": "aluminium", "copper": "copper",
                         "water": "water", "air": "air"}

#: HU boundaries: below LUNG_MAX_HU lung/air, up to BONE_MIN_HU soft tissue, up to METAL_MIN_HU bone, above metal
LUNG_MAX_HU, BONE_MIN_HU, CORTICAL_HU, METAL_MIN_HU = -400.0, 100.0, 1500.0, 3000.0
#: densities (g/cm^3) of ICRU-44 cortical bone and of iron (NIST)
CORTICAL_DENSITY, IRON_DENSITY = 1.92, 7.874


@dataclass(frozen=True)
class AttenuationTable:
    """Tabulated mu/rho (cm^2/g) of materials at energies (keV); :meth:`mu_rho` interpolates log-log."""

    energies_kev: torch.Tensor          # (N,) float64, increasing
    values: dict[str, torch.Tensor]     # material -> (N,) float64 cm^2/g

    def mu_rho(self, material: str, energies_kev: torch.Tensor) -> torch.Tensor:
        """mu/rho (cm^2/g) of ``material`` (a column or a key of :data:`MATERIAL_COEFFICIENTS`) at ``energies``.

        Raises InputError for an unknown material or an energy outside the table (10-150 keV).
        """
        col = MATERIAL_COEFFICIENTS.get(material, material)
        if col not in self.values:
            raise InputError(f"no attenuation data for material {material!r}; known: {', '.join(self.values)}")
        e = torch.as_tensor(energies_kev, dtype=torch.float64)
        lo, hi = float(self.energies_kev[0]), float(self.energies_kev[-1])
        if bool((e < lo - 1e-9).any()) or bool((e > hi + 1e-9).any()):
            raise InputError(f"photon energies must lie in {lo:g}-{hi:g} keV (the attenuation table), got "
                             f"{float(e.min()):g}-{float(e.max()):g}")
        le, lv = torch.log(self.energies_kev), torch.log(self.values[col])
        x = torch.log(e.clamp(lo, hi))
        i = torch.searchsorted(le, x, right=True).clamp(1, len(le) - 1)
        f = (x - le[i - 1]) / (le[i] - le[i - 1])
        return torch.exp(lv[i - 1] + f * (lv[i] - lv[i - 1]))


@functools.lru_cache(maxsize=1)
def attenuation_table(path: str | None = None) -> AttenuationTable:
    """The shipped NIST table (or a CSV of the same layout at ``path``)."""
    p = Path(path) if path else _TABLE_FILE
    try:
        rows = [r for r in csv.reader(p.read_text(encoding="utf-8").splitlines()) if r and not r[0].startswith("#")]
        header, data = rows[0], [[float(v) for v in r] for r in rows[1:]]
    except (OSError, ValueError, IndexError) as exc:
        raise InputError(f"cannot read the attenuation table {p}: {exc}") from exc
    t = torch.tensor(data, dtype=torch.float64)
    if header[0] != "energy_kev" or t.ndim != 2 or t.shape[1] != len(header) or not bool((t > 0).all()):
        raise InputError(f"{p} is not an attenuation table (energy_kev, then mu/rho columns, all positive)")
    return AttenuationTable(t[:, 0].contiguous(), {h: t[:, j].contiguous() for j, h in enumerate(header) if j})


@dataclass(frozen=True)
class Spectrum:
    """Photon fluence of an X-ray tube per energy bin.

    Attributes:
        energies_kev: ``(K,)`` bin centres (keV).
        photons: ``(K,)`` photons per bin (relative units; :meth:`normalized` makes them sum to 1).
        bin_kev: bin width (keV).
    """

    energies_kev: torch.Tensor
    photons: torch.Tensor
    bin_kev: float

    @staticmethod
    def kramers(kvp: float, filtration_mm: dict[str, float] | None = None, *, bin_kev: float = 1.0,
                min_kev: float = 10.0) -> "Spectrum":
        """Bremsstrahlung of a tungsten anode at ``kvp`` (70-150 kV), ``N(E) dE ~ (kVp - E) / E dE``, through
        ``filtration_mm`` (material -> mm, e.g. ``{"aluminium": 2.5, "copper": 0.1}``).  Energies from
        ``min_kev`` to kVp in bins of ``bin_kev``; each bin holds the exact integral of the law over the bin."""
        kvp = float(kvp)
        if not (min_kev < kvp <= 150.0):
            raise InputError(f"the tube voltage must be in {min_kev:g}-150 kV, got {kvp:g}")
        if not (0 < bin_kev <= 10):
            raise InputError(f"the energy bin must be in (0, 10] keV, got {bin_kev}")
        n = max(1, int(math.ceil((kvp - min_kev) / bin_kev - 1e-9)))
        edges = torch.linspace(min_kev, min_kev + n * bin_kev, n + 1, dtype=torch.float64).clamp(max=kvp)
        a, b = edges[:-1], edges[1:]
        photons = kvp * torch.log(b / a) - (b - a)  # integral of (kVp - E) / E over [a, b]
        spec = Spectrum((a + b) / 2, photons, float(bin_kev))
        for material, mm in (filtration_mm or {}).items():
            spec = spec.filtered(material, mm)
        return spec

    def filtered(self, material: str, thickness_mm: float, density: float | None = None) -> "Spectrum":
        """The spectrum behind ``thickness_mm`` of ``material`` (its NIST density unless ``density`` g/cm^3)."""
        if not (thickness_mm >= 0 and math.isfinite(thickness_mm)):
            raise InputError(f"a filter thickness must be >= 0 mm, got {thickness_mm}")
        rho = material_density(material) if density is None else float(density)
        mu = attenuation_table().mu_rho(material, self.energies_kev) * rho  # 1/cm
        return Spectrum(self.energies_kev, self.photons * torch.exp(-mu * thickness_mm / 10.0), self.bin_kev)

    def normalized(self) -> "Spectrum":
        """The same spectrum with photons summing to 1."""
        return Spectrum(self.energies_kev, self.photons / self.photons.sum(), self.bin_kev)

    def energy_fluence(self) -> float:
        """Total energy ``sum N(E) E`` (keV x photon units)."""
        return float((self.photons * self.energies_kev).sum())

    def mean_energy(self) -> float:
        """Fluence-weighted mean photon energy (keV)."""
        return float((self.photons * self.energies_kev).sum() / self.photons.sum())

    def detected(self, mass_thickness: dict[str, torch.Tensor]) -> torch.Tensor:
        """Energy-integrating detector signal behind mass thicknesses, relative to the unattenuated beam.

        Args:
            mass_thickness: material -> ``(...)`` mass thickness (g/cm^2) along each ray, all the same shape.
        Returns:
            ``(...)`` float64 ``sum_E N(E) E exp(-sum_m mu/rho_m(E) M_m) / sum_E N(E) E`` in (0, 1].
        """
        if not mass_thickness:
            raise InputError("give the mass thickness of at least one material")
        table = attenuation_table()
        shape = next(iter(mass_thickness.values())).shape
        exponent = torch.zeros((len(self.energies_kev),) + tuple(shape), dtype=torch.float64,
                               device=next(iter(mass_thickness.values())).device)
        for material, m in mass_thickness.items():
            mu = table.mu_rho(material, self.energies_kev).to(exponent.device)
            exponent += mu.view((-1,) + (1,) * len(shape)) * m.to(torch.float64)[None]
        w = (self.photons * self.energies_kev).to(exponent.device)
        w = w / w.sum()
        return torch.einsum("k,k...->...", w, torch.exp(-exponent))

    def transmitted(self, mass_thickness: dict[str, float]) -> "Spectrum":
        """The spectrum behind scalar mass thicknesses (g/cm^2) of materials (e.g. to see beam hardening)."""
        table = attenuation_table()
        att = sum(table.mu_rho(m, self.energies_kev) * float(t) for m, t in mass_thickness.items())
        return Spectrum(self.energies_kev, self.photons * torch.exp(-att), self.bin_kev)


#: NIST densities (g/cm^3) of the filter and object materials
_FILTER_DENSITY = {"aluminium": 2.699, "copper": 8.96, "iron": IRON_DENSITY, "titanium": 4.54, "water": 1.0,
                   "soft_tissue": 1.05, "bone": CORTICAL_DENSITY}


def material_density(material: str) -> float:
    """NIST density (g/cm^3) of a filter/object material (aluminium, copper, iron, titanium, water, bone)."""
    if material not in _FILTER_DENSITY:
        raise InputError(f"no density known for material {material!r}; known: {', '.join(_FILTER_DENSITY)}")
    return _FILTER_DENSITY[material]


def hu_to_densities(hu: torch.Tensor) -> dict[str, torch.Tensor]:
    """Partial densities (g/cm^3) of :data:`MATERIALS` in each voxel of a CT in HU.

    * HU < -400: lung (and air), density ``1 + HU/1000`` (0 at -1000 and below);
    * -400 <= HU < 100: soft tissue (fat, muscle, organs), density ``1 + HU/1000``;
    * 100 <= HU < 3000: a mixture: cortical bone volume fraction ``f = (HU - 100) / 1400`` (capped at 1) of
      density 1.92 and soft tissue ``(1 - f) * 1.1`` -- trabecular bone is marrow plus mineral;
    * HU >= 3000 (metal implants, saturated in CT): iron at 7.874.

    Args:
        hu: any shape (voxels), Hounsfield units.
    Returns:
        ``{material: tensor like hu}`` float32, g/cm^3, non-negative.
    """
    hu = hu.to(torch.float32)
    lin = (1.0 + hu / 1000.0).clamp_min(0.0)
    lung = torch.where(hu < LUNG_MAX_HU, lin, torch.zeros_like(lin))
    is_soft = (hu >= LUNG_MAX_HU) & (hu < BONE_MIN_HU)
    is_bone = (hu >= BONE_MIN_HU) & (hu < METAL_MIN_HU)
    f = ((hu - BONE_MIN_HU) / (CORTICAL_HU - BONE_MIN_HU)).clamp(0.0, 1.0)
    soft_at_bone = 1.0 + BONE_MIN_HU / 1000.0
    soft = torch.where(is_soft, lin, torch.where(is_bone, (1.0 - f) * soft_at_bone, torch.zeros_like(lin)))
    bone = torch.where(is_bone, f * CORTICAL_DENSITY, torch.zeros_like(lin))
    metal = torch.where(hu >= METAL_MIN_HU, torch.full_like(lin, IRON_DENSITY), torch.zeros_like(lin))
    return {"lung": lung, "soft_tissue": soft, "bone": bone, "metal": metal}
