"""Metal objects in the X-ray's field for the test simulator (docs/design.md §6.4): pedicle screws and K-wires
in the patient, a steel instrument between the patient and the detector.

Each object is a union of finite solid cylinders; its projection is the exact chord length of every ray through
each cylinder (no voxelisation), so thin wires keep their sharp edges.  Units: mm; mass thickness g/cm^2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import InputError
from .simulation import _uniform
from .xray_physics import material_density

__all__ = ["Cylinder", "chord_lengths", "random_implants", "random_instrument"]


@dataclass(frozen=True)
class Cylinder:
    """A solid cylinder from ``a`` to ``b`` (mm, ``(3,)``) of ``radius_mm``, made of ``material``.

    ``attached``: True = in the patient (moves with the CT, coordinates in the CT frame); False = fixed in the room
    (world frame), like an instrument held in front of the detector.
    """

    a: tuple[float, float, float]
    b: tuple[float, float, float]
    radius_mm: float
    material: str = "titanium"
    attached: bool = True

    def __post_init__(self) -> None:
        length = math.dist(self.a, self.b)
        if not (self.radius_mm > 0 and length > 0 and math.isfinite(length)):
            raise InputError(f"a cylinder needs a positive radius and length, got r={self.radius_mm}, L={length}")
        material_density(self.material)  # raises for an unknown material


def chord_lengths(cyl: Cylinder, origin: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """Length (mm) of each ray inside the cylinder.

    Args:
        origin: ``(3,)`` the rays' common start (the X-ray source), mm, in the cylinder's frame.
        dirs: ``(..., 3)`` ray directions (any length; normalised here).
    Returns:
        ``(...)`` float64 chord lengths (mm); 0 for rays that miss it.
    """
    d = dirs.to(torch.float64)
    d = d / torch.linalg.norm(d, dim=-1, keepdim=True)
    a = torch.tensor(cyl.a, dtype=torch.float64, device=d.device)
    axis = torch.tensor(cyl.b, dtype=torch.float64, device=d.device) - a
    h = torch.linalg.norm(axis)
    w = axis / h
    o = origin.to(torch.float64).to(d.device) - a
    oz, dz = torch.dot(o, w), d @ w                              # along the axis
    o_p, d_p = o - oz * w, d - dz[..., None] * w                 # across it
    qa = (d_p * d_p).sum(-1)
    qb = 2 * (d_p @ o_p)
    qc = torch.dot(o_p, o_p) - cyl.radius_mm ** 2
    disc = qb * qb - 4 * qa * qc
    hit = (disc > 0) & (qa > 1e-15)
    sq = torch.sqrt(disc.clamp_min(0))
    safe = torch.where(hit, qa, torch.ones_like(qa))
    t1, t2 = (-qb - sq) / (2 * safe), (-qb + sq) / (2 * safe)
    parallel = qa <= 1e-15                                       # ray along the axis: inside or not at all
    inf = torch.full_like(qa, math.inf)
    t1 = torch.where(parallel, torch.where(qc < 0, -inf, inf), t1)
    t2 = torch.where(parallel, torch.where(qc < 0, inf, -inf), t2)
    safe_dz = torch.where(dz.abs() > 1e-15, dz, torch.ones_like(dz))
    z1, z2 = (0 - oz) / safe_dz, (h - oz) / safe_dz
    zlo, zhi = torch.minimum(z1, z2), torch.maximum(z1, z2)
    inside_slab = (oz >= 0) & (oz <= h)
    zlo = torch.where(dz.abs() > 1e-15, zlo, torch.where(inside_slab, -inf, inf))
    zhi = torch.where(dz.abs() > 1e-15, zhi, torch.where(inside_slab, inf, -inf))
    lo = torch.maximum(torch.maximum(t1, zlo), torch.zeros_like(t1))
    hi = torch.minimum(t2, zhi)
    out = (hi - lo).clamp_min(0)
    return torch.where((hit | parallel) & torch.isfinite(out), out, torch.zeros_like(out))


def _random_unit(gen: torch.Generator) -> torch.Tensor:
    v = torch.randn(3, generator=gen, dtype=torch.float64)
    return v / torch.linalg.norm(v)


def random_implants(anchor: torch.Tensor, gen: torch.Generator) -> list[Cylinder]:
    """Metal in the patient around ``anchor (M, 3)`` (mm, CT frame; e.g. the vertebra's surface points):
    1-2 pairs of titanium pedicle screws (shaft 6.5 mm x 35-45 mm, head 11 mm x 12 mm) entering from near the
    surface points and pointing through the vertebra's centre, and with probability 1/2 a steel K-wire
    (2 mm x 150-250 mm) through the region."""
    pts = anchor.to(torch.float64).cpu()
    if pts.ndim != 2 or pts.shape[-1] != 3 or len(pts) < 2:
        raise InputError("give at least 2 anchor points (M, 3) to place implants around")
    centre = pts.mean(0)
    objects: list[Cylinder] = []
    for _ in range(int(torch.randint(1, 3, (), generator=gen))):
        base = pts[int(torch.randint(0, len(pts), (), generator=gen))]
        side = _random_unit(gen)
        for sign in (1.0, -1.0):  # a pair, mirrored about the centre
            entry = centre + sign * (base - centre) + 4.0 * side
            axis = centre - entry
            axis = axis / torch.linalg.norm(axis).clamp_min(1e-6)
            length = _uniform(gen, 35.0, 45.0)
            tip = entry + length * axis
            objects.append(Cylinder(tuple(entry.tolist()), tuple(tip.tolist()), 3.25, "titanium"))
            head_end = entry - 12.0 * axis
            objects.append(Cylinder(tuple(head_end.tolist()), tuple(entry.tolist()), 5.5, "titanium"))
    if float(torch.rand((), generator=gen)) < 0.5:
        d = _random_unit(gen)
        length = _uniform(gen, 150.0, 250.0)
        mid = centre + (torch.rand(3, generator=gen, dtype=torch.float64) * 2 - 1) * 20.0
        objects.append(Cylinder(tuple((mid - d * length / 2).tolist()), tuple((mid + d * length / 2).tolist()),
                                1.0, "iron"))
    return objects


def random_instrument(source: torch.Tensor, detector_centre: torch.Tensor, field_mm: float,
                      gen: torch.Generator) -> list[Cylinder]:
    """A steel instrument (a 5 mm rod of 120-200 mm with a 10 mm grip) in the room between the patient and the
    detector, 5-15 % of the source-detector distance in front of the detector, across the field (world frame,
    mm; ``field_mm`` is the detector's width)."""
    s, dc = source.to(torch.float64).cpu(), detector_centre.to(torch.float64).cpu()
    beam = dc - s
    sdd = float(torch.linalg.norm(beam))
    beam = beam / sdd
    at = dc - beam * sdd * _uniform(gen, 0.05, 0.15)
    across = torch.linalg.cross(beam, _random_unit(gen))
    across = across / torch.linalg.norm(across).clamp_min(1e-6)
    offset = torch.linalg.cross(beam, across) * _uniform(gen, -0.25, 0.25) * field_mm
    length = _uniform(gen, 120.0, 200.0)
    tip = at + offset - across * length / 2
    end = at + offset + across * length / 2
    grip_end = end + across * 60.0
    return [Cylinder(tuple(tip.tolist()), tuple(end.tolist()), 2.5, "iron", attached=False),
            Cylinder(tuple(end.tolist()), tuple(grip_end.tolist()), 5.0, "iron", attached=False)]
