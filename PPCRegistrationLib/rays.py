"""The rays of a C-arm in a CT's frame, and the reference DRR renderer (docs/design.md §2).

* The CT moved by a rigid ``T`` (``x' = T x``) seen by a camera ``P = K [R | t]`` gives the same image as the
  fixed CT seen by ``P T``: the renderers move the rays into the CT's frame (``_rays_in_ct``) instead of resampling
  the volume, after the inputs are checked (``_check_inputs``).
* :func:`render_reference`: the straightforward dense ray marcher (3D trilinear ``grid_sample`` at uniform steps
  between each ray's entry into and exit from the volume), the accuracy and speed reference of
  :class:`~PPCRegistrationLib.drr.DRRRenderer`, which also marches its few rays behind the source with it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import InputError
from .geometry import Projection, invert_rigid
from .volume import Volume, hu_to_mu

__all__ = ["render_reference", "DEFAULT_BONE_BOOST"]

#: Scale of the attenuation in excess of +300 HU (bone): CT numbers are measured at the CT's effective energy
#: (~70 keV), while fluoroscopy spectra are softer, where the photo-electric absorption of bone makes it stand out
#: more against soft tissue than a linear HU scaling says (the "bone attenuation multiplier" of other DRR tools).
#: 1.0 is the plain linear model; 2.0 makes vertebrae as conspicuous as in real fluoroscopy.
DEFAULT_BONE_BOOST = 2.0

# Number of samples (rays x planes) processed by one grid_sample call: bounds the temporary memory (about 12
# bytes per sample: grid + output).  Small chunks that stay in the CPU cache are markedly faster than big ones.
_SAMPLES_PER_CHUNK = 1 << 19


# ----------------------------------------------------------------------------- input checks


def _check_inputs(proj: object, T: object, device: torch.device) -> tuple[Projection, torch.Tensor]:
    """Validate ``proj`` and ``T``; return the projection expanded to the batch and ``T`` as ``(B, 4, 4)`` f64."""
    if not isinstance(proj, Projection):
        shape = f" of shape {tuple(proj.shape)}" if isinstance(proj, torch.Tensor) else ""
        raise InputError(f"expected a geometry.Projection (the C-arm geometry) as `proj`, got "
                         f"{type(proj).__name__}{shape}; an image cannot be used as a projection geometry")
    if not isinstance(T, torch.Tensor):
        try:
            T = torch.as_tensor(T, dtype=torch.float64)
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"the transform T must be a (B, 4, 4) tensor, got {type(T).__name__}") from exc
    if T.ndim == 2:
        T = T[None]
    if T.ndim != 3 or tuple(T.shape[1:]) != (4, 4) or T.shape[0] < 1:
        raise InputError(f"the transform T must be a rigid (B, 4, 4) matrix batch, got shape {tuple(T.shape)}")
    T = T.to(device=device, dtype=torch.float64)
    if not torch.isfinite(T).all():
        raise InputError("the transform T contains NaN or infinite values (diverged registration?)")
    rot = T[:, :3, :3]
    eye = torch.eye(3, dtype=torch.float64, device=device)
    ortho_err = (rot.transpose(-1, -2) @ rot - eye).abs().amax()
    bottom = T[:, 3] - torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64, device=device)
    if ortho_err > 1e-3 or bottom.abs().amax() > 1e-6 or (torch.linalg.det(rot) < 0).any():
        raise InputError("the transform T is not rigid: its 3x3 part must be a rotation and its last row "
                         "(0, 0, 0, 1)")
    b = T.shape[0]
    if proj.batch not in (1, b):
        raise InputError(f"the projection has a batch of {proj.batch} geometries but T has {b} poses: "
                         "use one geometry or one per pose")
    proj = proj.to(device=device, dtype=torch.float64).expand(b)
    return proj, T


def _rays_in_ct(proj: Projection, T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Source and ray-direction map of the moved camera in the CT's (fixed) world frame.

    Returns:
        c: ``(B, 3)`` float64 source position (mm) in the CT frame (``T^-1 c``).
        D: ``(B, 3, 3)`` float64 matrix with ``D @ [u, v, 1]`` = direction of the ray through pixel (u, v),
           scaled so that the ray ``c + lam * D [u, v, 1]`` is at camera depth ``lam`` (mm).
    """
    tinv = invert_rigid(T)
    c = (tinv[:, :3, :3] @ proj.source[..., None])[..., 0] + tinv[:, :3, 3]
    D = tinv[:, :3, :3] @ proj.R.transpose(-1, -2) @ torch.linalg.inv(proj.K)
    return c, D


def _pixel_grid(h: int, w: int, device: torch.device) -> torch.Tensor:
    """``(H, W, 3)`` float64 homogeneous pixel centres ``(u, v, 1)``."""
    v, u = torch.meshgrid(torch.arange(h, dtype=torch.float64, device=device),
                          torch.arange(w, dtype=torch.float64, device=device), indexing="ij")
    return torch.stack([u, v, torch.ones_like(u)], -1)


# ----------------------------------------------------------------------------- reference renderer


def _march(mu: torch.Tensor, ijk_to_world: torch.Tensor, proj: Projection, c: torch.Tensor, D: torch.Tensor,
           step_mm: float) -> torch.Tensor:
    """Dense ray marching through the attenuation volume ``mu`` ``(K, J, I)`` (1/mm).

    Rays from ``c`` (B,3) along ``D [u, v, 1]`` (CT frame), clipped to [source, detector] and to the box of voxel
    indices [-1, n] (the support of the zero-padded trilinear interpolant).  Each ray is divided into equal
    steps of at most ``step_mm`` and sampled at their midpoints.  Returns ``(B, H, W)`` float32.
    """
    dev = mu.device
    b, h, w = c.shape[0], proj.height, proj.width
    pix = _pixel_grid(h, w, dev)
    d = (pix.reshape(1, -1, 3) @ D.transpose(-1, -2)).view(b, h, w, 3)  # direction per unit depth
    dlen = torch.linalg.norm(d, dim=-1)
    dhat = d / dlen[..., None]
    tau_det = proj.sdd.to(dev)[:, None, None] * dlen  # distance (mm) source -> detector pixel
    w2i = torch.linalg.inv(ijk_to_world.to(dev))
    s = c @ w2i[:3, :3].T + w2i[:3, 3]  # (B, 3)
    e = dhat @ w2i[:3, :3].T  # (B, H, W, 3) index units per mm
    k, j, i = mu.shape
    lo = torch.full((3,), -1.0, dtype=torch.float64, device=dev)
    hi = torch.tensor([i, j, k], dtype=torch.float64, device=dev)
    safe = torch.where(e.abs() < 1e-12, torch.full_like(e, 1e-12), e)
    t1 = (lo - s[:, None, None, :]) / safe
    t2 = (hi - s[:, None, None, :]) / safe
    tmin = torch.minimum(t1, t2).amax(-1).clamp_min(0.0)
    tmax = torch.minimum(torch.maximum(t1, t2).amin(-1), tau_det)
    length = (tmax - tmin).clamp_min(0.0)
    nsteps = torch.ceil(length / step_mm)
    step = torch.where(nsteps > 0, length / nsteps.clamp_min(1), torch.zeros_like(length))
    m_max = int(nsteps.max().item()) if length.numel() else 0
    acc = torch.zeros(b, h, w, dtype=torch.float32, device=dev)
    if m_max == 0:
        return acc
    scale = torch.tensor([2.0 / (i - 1), 2.0 / (j - 1), 2.0 / (k - 1)], dtype=torch.float64, device=dev)
    # normalised grid = a0 + tau * g with a0 = s*scale - 1, g = e*scale
    a0 = (s * scale - 1)[:, None, None, :].to(torch.float32)
    g = (e * scale).to(torch.float32)
    tmin32, step32, n32 = tmin.to(torch.float32), step.to(torch.float32), nsteps.to(torch.float32)
    vol = mu.to(torch.float32)[None, None]
    chunk = max(1, _SAMPLES_PER_CHUNK // max(1, b * h * w))
    for m0 in range(0, m_max, chunk):
        m = torch.arange(m0, min(m_max, m0 + chunk), dtype=torch.float32, device=dev)  # (n,)
        tau = tmin32[None] + (m[:, None, None, None] + 0.5) * step32[None]  # (n, B, H, W)
        grid = a0[None] + tau[..., None] * g[None]  # (n, B, H, W, 3)
        n = m.numel()
        smp = F.grid_sample(vol, grid.reshape(1, n, b * h, w, 3), mode="bilinear", padding_mode="zeros",
                            align_corners=True)[0, 0].reshape(n, b, h, w)
        smp = smp * (m[:, None, None, None] < n32[None]).to(smp.dtype)
        acc += smp.sum(0)
    return acc * step32


def render_reference(volume: Volume, proj: Projection, T: torch.Tensor, step_mm: float = 0.5, *,
                     mu_water: float = 0.02, bone_boost: float | None = None) -> torch.Tensor:
    """Reference DRR: dense ray marching with 3D trilinear interpolation (slow, simple, no cropping).

    Each ray from the source to a detector pixel centre is clipped to the volume box and divided into equal
    steps of at most ``step_mm`` (mm); the attenuation (HU converted with ``mu_water``, 1/mm) is sampled
    trilinearly at the step midpoints and summed times the step length.

    Args:
        volume: CT in Hounsfield units.
        proj: geometry with batch 1 or B.
        T: ``(B, 4, 4)`` rigid transforms moving the CT (``x' = T x``, mm).
        step_mm: largest sampling step along each ray (mm).
    Returns:
        ``(B, H, W)`` float32 line integrals (unitless) on the volume's device.
    """
    if not isinstance(volume, Volume):
        raise InputError(f"render_reference needs a volume.Volume (CT in HU), got {type(volume).__name__}")
    if not (step_mm > 0 and math.isfinite(step_mm)):
        raise InputError(f"step_mm must be a positive step (mm), got {step_mm}")
    dev = volume.device
    proj, T = _check_inputs(proj, T, dev)
    c, D = _rays_in_ct(proj, T)
    mu = hu_to_mu(volume.data.to(torch.float32), mu_water=mu_water,
                  bone_boost=DEFAULT_BONE_BOOST if bone_boost is None else float(bone_boost))
    return _march(mu, volume.ijk_to_world, proj, c, D, float(step_mm))
