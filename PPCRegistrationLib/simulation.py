"""Simulated cases for tests and evaluation (docs/design.md §6): random C-arm views, X-rays simulated from the CT at
the ground truth with realistic variation, and random initial estimates with a chosen initial mTRE."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from .errors import InputError
from .geometry import Projection, carm_pose, se3_exp, translation_matrix
from .metrics import mtre


class Renderer(Protocol):
    def render(self, proj: Projection, T: torch.Tensor) -> torch.Tensor: ...


@dataclass
class XRayVariation:
    """Ranges of the random appearance changes of a simulated X-ray (each drawn uniformly per image).

    photons: detected photons per pixel behind the median path through the patient (Poisson noise; lower =
        noisier), log-uniform in the range.  Like a C-arm's automatic exposure control, the tube output is set
        for that detector dose, so thick (lateral) views are not noisier than thin ones.  300-3,000 photons per
        (1.5 mm)^2 pixel is the range of low-dose fluoroscopy to radiography.
    blur_px: Gaussian blur sigma (detector pixels; focal spot and detector blur).
    gamma: exponent applied to the normalised attenuation image (contrast change of the imaging chain).
    scatter: fraction of the mean transmitted intensity added as a smooth scatter background.
    """

    photons: tuple[float, float] = (300.0, 3000.0)
    blur_px: tuple[float, float] = (0.3, 1.2)
    gamma: tuple[float, float] = (0.8, 1.25)
    scatter: tuple[float, float] = (0.0, 0.15)

    @staticmethod
    def none() -> "XRayVariation":
        """No variation: the X-ray equals the DRR."""
        return XRayVariation(photons=(0, 0), blur_px=(0, 0), gamma=(1, 1), scatter=(0, 0))


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen, dtype=torch.float64))


def _gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur ``(H, W)`` with a separable Gaussian of ``sigma`` pixels."""
    if sigma <= 1e-3:
        return img
    r = max(1, int(3 * sigma + 0.5))
    x = torch.arange(-r, r + 1, dtype=img.dtype, device=img.device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    im = img[None, None]
    im = F.conv2d(F.pad(im, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    im = F.conv2d(F.pad(im, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return im[0, 0]


def degrade(line_integral: torch.Tensor, variation: XRayVariation, gen: torch.Generator) -> torch.Tensor:
    """Turn a DRR line-integral image ``(H, W)`` into a realistic attenuation image ``(H, W)``.

    Beer-Lambert transmission ``exp(-L)``, scatter background, blur, Poisson photon noise, back to
    ``-log`` (attenuation-positive, like the DRR) and a gamma contrast change.  Output scaled to [0, 1]
    roughly (the registration uses normalised gradient correlation, so absolute scale does not matter).
    """
    L = line_integral.double()
    inten = torch.exp(-L)
    s = _uniform(gen, *variation.scatter)
    if s > 0:
        inten = inten + s * _gaussian_blur(inten, max(L.shape) / 8)
    sigma = _uniform(gen, *variation.blur_px)
    inten = _gaussian_blur(inten, sigma)
    photons = variation.photons
    if photons[1] > 0:
        lo, hi = torch.log(torch.tensor(photons[0])), torch.log(torch.tensor(photons[1]))
        n_det = float(torch.exp(lo + (hi - lo) * torch.rand((), generator=gen, dtype=torch.float64)))
        # automatic exposure control: the dose is set for the centre of the field (where the anatomy is)
        h, w = inten.shape
        centre = inten[h // 4:h - h // 4, w // 4:w - w // 4]
        n0 = n_det / max(float(centre.median()), 1e-12)
        counts = torch.poisson(inten * n0, generator=gen)
        inten = counts.clamp_min(0.5) / n0
    att = -torch.log(inten.clamp_min(1e-12))
    lo_v, hi_v = float(att.min()), float(att.max())
    att = (att - lo_v) / max(hi_v - lo_v, 1e-12)
    g = _uniform(gen, *variation.gamma)
    att = att.clamp_min(0) ** g
    return att.to(line_integral.dtype)


def simulate_xray(renderer: Renderer, proj: Projection, T_gt: torch.Tensor, *, seed: int = 0,
                  variation: XRayVariation | None = None) -> torch.Tensor:
    """Simulated X-ray ``(H, W)`` float32 (attenuation-positive) of the CT moved by ``T_gt`` ``(4, 4)``."""
    if T_gt.shape != (4, 4):
        raise InputError(f"T_gt must be a 4x4 matrix, got {tuple(T_gt.shape)}")
    gen = torch.Generator().manual_seed(int(seed))
    drr = renderer.render(proj, T_gt[None].to(torch.float64))[0].cpu()
    return degrade(drr, variation or XRayVariation(), gen).float()


def perturb(T_gt: torch.Tensor, centre: torch.Tensor, dv: torch.Tensor) -> torch.Tensor:
    """``C exp(dv) C^-1 T_gt`` with C the translation to ``centre`` (mm); ``dv (6,)`` (rad, mm)."""
    c = centre.to(torch.float64)
    return translation_matrix(c) @ se3_exp(dv.to(torch.float64)) @ translation_matrix(-c) @ T_gt


def random_initial_transform(T_gt: torch.Tensor, targets: torch.Tensor, target_mtre_mm: float,
                             gen: torch.Generator, *, rotation_weight_mm: float = 100.0) -> torch.Tensor:
    """A random ``T_init (4, 4)`` whose mTRE to ``T_gt`` over ``targets (M, 3)`` is ``target_mtre_mm``.

    A random direction in twist space (rotation vector scaled by ``rotation_weight_mm`` so that 1 rad weighs
    like 100 mm of translation) around the targets' centroid, scaled by bisection to hit the mTRE.
    """
    if target_mtre_mm < 0:
        raise InputError("the initial mTRE must be non-negative")
    centre = (T_gt[:3, :3] @ targets.to(torch.float64).mean(0) + T_gt[:3, 3])
    d = torch.randn(6, generator=gen, dtype=torch.float64)
    d[:3] /= rotation_weight_mm
    d = d / torch.linalg.norm(d)
    if target_mtre_mm == 0:
        return T_gt.clone()
    lo, hi = 0.0, 1.0
    while float(mtre(perturb(T_gt, centre, d * hi), T_gt, targets)) < target_mtre_mm and hi < 1e6:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        if float(mtre(perturb(T_gt, centre, d * mid), T_gt, targets)) < target_mtre_mm:
            lo = mid
        else:
            hi = mid
    return perturb(T_gt, centre, d * (lo + hi) / 2)


@dataclass
class ViewSampler:
    """Random C-arm views around the patient (docs/design.md §6).

    Angles uniform in the ranges (degrees); isocentre = the target centre plus a uniform random offset
    (mm) in a cube of half-size ``isocenter_jitter_mm``.
    """

    primary_deg: tuple[float, float] = (-90.0, 90.0)
    secondary_deg: tuple[float, float] = (-30.0, 30.0)
    source_to_isocenter_mm: tuple[float, float] = (750.0, 800.0)
    sdd_mm: float = 1200.0
    detector_size_px: int = 256
    detector_width_mm: float = 380.0
    isocenter_jitter_mm: float = 15.0
    frame: str = "LPS"

    def sample(self, centre: torch.Tensor, gen: torch.Generator) -> tuple[Projection, dict]:
        """A random geometry looking at ``centre (3,)`` (mm) and its parameters as a dict."""
        prim = _uniform(gen, *self.primary_deg)
        sec = _uniform(gen, *self.secondary_deg)
        sid = _uniform(gen, *self.source_to_isocenter_mm)
        jitter = (torch.rand(3, generator=gen, dtype=torch.float64) * 2 - 1) * self.isocenter_jitter_mm
        iso = centre.to(torch.float64).cpu() + jitter
        pose = carm_pose(prim, sec, sid, iso, self.frame)
        n = self.detector_size_px
        spacing = self.detector_width_mm / n
        proj = Projection.from_carm(pose, self.sdd_mm, n, n, spacing)
        params = {"primary_deg": prim, "secondary_deg": sec, "source_to_isocenter_mm": sid,
                  "sdd_mm": self.sdd_mm, "isocenter": iso.tolist(), "detector_px": n,
                  "pixel_spacing_mm": spacing, "frame": self.frame}
        return proj, params


@dataclass
class SimulatedCase:
    """One simulated registration problem."""

    projection: Projection
    T_gt: torch.Tensor
    T_init: torch.Tensor
    xray: torch.Tensor
    targets: torch.Tensor
    initial_mtre_mm: float
    view: dict = field(default_factory=dict)
    seed: int = 0
    #: the seed the X-ray's appearance was drawn with (a second simulator draws its own from it)
    xray_seed: int = 0


def make_case(renderer: Renderer, targets: torch.Tensor, seed: int, mtre_range: tuple[float, float],
              views: ViewSampler | None = None, variation: XRayVariation | None = None) -> SimulatedCase:
    """A reproducible simulated case: random view, X-ray at ``T_gt`` (identity: the CT's own pose, the view is
    random), ``T_init`` with initial mTRE uniform in ``mtre_range`` (mm) over ``targets (M, 3)``."""
    gen = torch.Generator().manual_seed(int(seed))
    views = views or ViewSampler()
    centre = targets.to(torch.float64).mean(0)
    proj, params = views.sample(centre, gen)
    T_gt = torch.eye(4, dtype=torch.float64)
    target = _uniform(gen, *mtre_range)
    T_init = random_initial_transform(T_gt, targets, target, gen)
    xray_seed = int(torch.randint(0, 2**31 - 1, (), generator=gen))
    xray = simulate_xray(renderer, proj, T_gt, seed=xray_seed, variation=variation)
    return SimulatedCase(projection=proj, T_gt=T_gt, T_init=T_init, xray=xray, targets=targets,
                         initial_mtre_mm=float(mtre(T_init, T_gt, targets)), view=params, seed=seed,
                         xray_seed=xray_seed)
