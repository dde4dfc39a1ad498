"""Digitally reconstructed radiographs (DRRs): line integrals of attenuation through a (moved) CT.

Conventions (docs/design.md §2, :mod:`.geometry`):

* The CT moved by a rigid ``T`` (``x' = T x``) seen by a camera ``P = K [R | t]`` gives the same image as the
  fixed CT seen by ``P T``: the renderers never resample the volume, they move the rays into the CT's frame.
* A DRR pixel ``(u, v)`` (column, row; centres at integers) is ``sum(mu * step_mm)`` along the ray from the
  X-ray source to that detector pixel's centre: unitless (attenuation ``mu`` in 1/mm times mm).  Outside the
  volume the attenuation is 0; inside it is the trilinear interpolant of the voxel values.
* Output images are ``(B, H, W)`` float32, row ``v`` first; ``img[b, v, u]``.

Two renderers:

* :class:`DRRRenderer` (fast, built once per CT): slice-based ray casting.  The volume axis most parallel to
  the rays is chosen per pose; every ray is sampled where it crosses each voxel plane perpendicular to that
  axis (bilinear in the plane = trilinear in the volume, one cheap 2D ``grid_sample`` per plane) and each
  sample is weighted by the length of the ray inside that slab (spacing / |cos|).  Slices along the marching
  axis may be box-averaged into thicker slabs when the rays are so nearly parallel to the axis that this does
  not blur the image (see ``step_mm``), the volume is cropped to the body and cached on the device.
* :func:`render_reference` (in :mod:`.rays`, re-exported here): the straightforward dense ray marcher (3D trilinear
  ``grid_sample`` at uniform steps between each ray's entry into and exit from the volume), the accuracy and speed
  reference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import InputError
from .geometry import Projection
from .rays import (DEFAULT_BONE_BOOST, _SAMPLES_PER_CHUNK, _check_inputs, _march, _pixel_grid, _rays_in_ct,
                   render_reference)
from .volume import Volume, hu_to_mu

__all__ = ["DRRRenderer", "render_reference", "DEFAULT_BONE_BOOST"]


# ----------------------------------------------------------------------------- volume preparation


def _box_downsample(data: torch.Tensor, ijk_to_world: torch.Tensor,
                    factors: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Anti-aliased (box) downsampling of ``data`` ``(K, J, I)`` by integer ``factors`` along (i, j, k).

    The volume is zero-padded at the high end to a multiple of the factors (so the sum of the voxel values
    times the voxel volume is preserved).  Returns the new data and its ``ijk_to_world``: new voxel i' is the
    mean of old voxels ``f i' .. f i' + f - 1``, centred at old index ``f i' + (f - 1) / 2``.
    """
    fi, fj, fk = (int(f) for f in factors)
    if (fi, fj, fk) == (1, 1, 1):
        return data, ijk_to_world
    k, j, i = data.shape
    pad = (-i % fi, -j % fj, -k % fk)
    x = F.pad(data[None, None], (0, pad[0], 0, pad[1], 0, pad[2]))
    x = F.avg_pool3d(x, kernel_size=(fk, fj, fi), stride=(fk, fj, fi))[0, 0]
    scale = torch.eye(4, dtype=torch.float64, device=ijk_to_world.device)
    scale[0, 0], scale[1, 1], scale[2, 2] = fi, fj, fk
    scale[:3, 3] = torch.tensor([(fi - 1) / 2, (fj - 1) / 2, (fk - 1) / 2], dtype=torch.float64)
    return x.contiguous(), ijk_to_world @ scale


def _at_least_two(data: torch.Tensor) -> torch.Tensor:
    """Zero-pad ``(K, J, I)`` at the high end so that every axis has >= 2 voxels (grid_sample needs it)."""
    k, j, i = data.shape
    if min(k, j, i) >= 2:
        return data
    return F.pad(data, (0, max(0, 2 - i), 0, max(0, 2 - j), 0, max(0, 2 - k)))


def _crop_to(volume: Volume, keep: torch.Tensor) -> Volume:
    """``volume`` cropped to the bounding box of the voxels where ``keep`` (same shape, bool) is true."""
    lo, hi = [], []
    for dim in (2, 1, 0):  # i, j, k
        idx = torch.nonzero(keep.any(dim=tuple(d for d in range(3) if d != dim))).flatten()
        lo.append(int(idx[0]))
        hi.append(int(idx[-1]) + 1)
    return volume.crop(tuple(lo), tuple(hi))  # type: ignore[arg-type]


# Tensor dimension of each volume axis (i, j, k) in the (K, J, I) data, and the in-plane (row, col) axes of the
# slices perpendicular to each marching axis.
_DIM_OF_AXIS = {0: 2, 1: 1, 2: 0}
_PLANE_AXES = {0: (2, 1), 1: (2, 0), 2: (1, 0)}  # marching axis -> (row axis, column axis) in ijk terms


class _SlabStack:
    """Slices of the attenuation volume perpendicular to one axis, possibly box-merged along it."""

    def __init__(self, mu: torch.Tensor, ijk_to_world: torch.Tensor, axis: int, factor: int) -> None:
        factors = [1, 1, 1]
        factors[axis] = factor
        data, m = _box_downsample(mu, ijk_to_world, tuple(factors))  # type: ignore[arg-type]
        data = _at_least_two(data)
        row_ax, col_ax = _PLANE_AXES[axis]
        perm = (_DIM_OF_AXIS[axis], _DIM_OF_AXIS[row_ax], _DIM_OF_AXIS[col_ax])
        self.slices = data.permute(*perm).contiguous()[:, None]  # (N, 1, rows, cols)
        self.axis, self.row_axis, self.col_axis = axis, row_ax, col_ax
        self.ijk_to_world = m
        self.world_to_ijk = torch.linalg.inv(m)
        self.factor = factor

    @property
    def n(self) -> int:
        return self.slices.shape[0]

    @property
    def rows(self) -> int:
        return self.slices.shape[2]

    @property
    def cols(self) -> int:
        return self.slices.shape[3]


# ----------------------------------------------------------------------------- fast renderer


class DRRRenderer:
    """Fast DRR renderer for one CT (slice-based ray casting, trilinear interpolation).

    Built once per CT: converts HU to attenuation, crops to the body, optionally downsamples, and caches the
    result on ``device``.  Then :meth:`render` draws batches of DRRs of the CT moved by rigid transforms.

    Args:
        volume: the CT, voxel values in Hounsfield units (:class:`~.volume.Volume`).
        mu_water: attenuation of water (1/mm) for :func:`~.volume.hu_to_mu`.
        bone_boost: scale of the attenuation above +300 HU (default :data:`DEFAULT_BONE_BOOST`; 1 = linear in HU).
        air_threshold_hu: the volume is cropped to the bounding box of voxels above this value (HU); air and
            padding (-1000, -2048) outside that box contribute nothing.
        step_mm: thickness (mm) of the slabs the rays are stepped through along the marching axis.  The voxel
            planes along that axis are box-averaged in groups of ``round(step_mm / spacing)`` (>= 1).
            ``None`` (default): automatic per render -- planes are merged only as far as the lateral drift of the
            most oblique ray across a slab stays below half a pixel footprint / in-plane voxel (and the slab
            no thicker than the CT's coarsest voxel spacing), which keeps the image within a fraction of a
            percent of the unmerged one.  Use ``step_mm=0`` to disable merging.
        max_voxel_mm: if given, the attenuation volume is box-downsampled (anti-aliased) by integer factors so
            that voxels finer than this are merged, each axis staying at most ``max_voxel_mm`` (mm) or at its
            original spacing if that is already coarser.
        device: where the cached volume lives and rendering runs (default: the volume's device).
    """

    def __init__(self, volume: Volume, *, mu_water: float = 0.02, air_threshold_hu: float = -900.0,
                 step_mm: float | None = None, max_voxel_mm: float | None = None,
                 device: torch.device | str | None = None, bone_boost: float | None = None) -> None:
        if not isinstance(volume, Volume):
            raise InputError(f"DRRRenderer needs a volume.Volume (CT in HU), got {type(volume).__name__}")
        if not (mu_water > 0 and math.isfinite(mu_water)):
            raise InputError(f"mu_water must be a positive attenuation (1/mm), got {mu_water}")
        if step_mm is not None and not (step_mm >= 0 and math.isfinite(step_mm)):
            raise InputError(f"step_mm must be None or >= 0 (mm), got {step_mm}")
        if max_voxel_mm is not None and not (max_voxel_mm > 0 and math.isfinite(max_voxel_mm)):
            raise InputError(f"max_voxel_mm must be None or > 0 (mm), got {max_voxel_mm}")
        self.device = torch.device(device) if device is not None else volume.device
        self.mu_water = float(mu_water)
        self.step_mm = step_mm
        hu = volume.data.to(device=self.device, dtype=torch.float32)
        m = volume.ijk_to_world.to(self.device)
        if not torch.isfinite(hu).all():
            raise InputError("the CT contains NaN or infinite voxel values")
        body = hu > air_threshold_hu
        if not bool(body.any()):
            raise InputError(f"no voxel of the CT is above {air_threshold_hu} HU: is the volume in Hounsfield "
                             "units? (an empty or all-air volume cannot be rendered)")
        cropped = _crop_to(Volume(hu, m), body)
        self.bone_boost = DEFAULT_BONE_BOOST if bone_boost is None else float(bone_boost)
        if not (self.bone_boost > 0 and math.isfinite(self.bone_boost)):
            raise InputError(f"bone_boost must be a positive number, got {bone_boost}")
        mu = hu_to_mu(cropped.data, mu_water=mu_water, bone_boost=self.bone_boost).contiguous()
        mat = cropped.ijk_to_world
        if max_voxel_mm is not None:
            sp = cropped.spacing
            factors = tuple(max(1, int(math.floor(max_voxel_mm / float(s) + 1e-6))) for s in sp)
            mu, mat = _box_downsample(mu, mat, factors)  # type: ignore[arg-type]
        #: the cached attenuation volume (1/mm), cropped and downsampled, on ``device``
        self.mu_volume = Volume(_at_least_two(mu), mat)
        self._stacks: dict[tuple[int, int], _SlabStack] = {}

    @classmethod
    def from_values(cls, values: Volume, *, step_mm: float | None = None,
                    device: torch.device | str | None = None) -> "DRRRenderer":
        """A renderer of a volume of non-negative values per mm (an attenuation or a partial density), not HU.

        The line integrals are then ``sum(value * step_mm)``: e.g. a bone density volume (g/cm^3) gives the bone
        mass thickness in (g/cm^3 * mm).  Cropped to the non-zero voxels (raises ``InputError`` when there are
        none), not downsampled.
        """
        if not isinstance(values, Volume):
            raise InputError(f"DRRRenderer.from_values needs a volume.Volume, got {type(values).__name__}")
        self = cls.__new__(cls)
        self.device = torch.device(device) if device is not None else values.device
        self.mu_water, self.bone_boost, self.step_mm = float("nan"), 1.0, step_mm
        data = values.data.to(device=self.device, dtype=torch.float32)
        if not torch.isfinite(data).all() or bool((data < 0).any()):
            raise InputError("the values to render must be finite and non-negative")
        if not bool((data > 0).any()):
            raise InputError("nothing to render: every voxel is 0")
        cropped = _crop_to(Volume(data, values.ijk_to_world.to(self.device)), data > 0)
        self.mu_volume = Volume(_at_least_two(cropped.data.contiguous()), cropped.ijk_to_world)
        self._stacks = {}
        return self

    # -- internals
    def _stack(self, axis: int, factor: int) -> _SlabStack:
        key = (axis, factor)
        st = self._stacks.get(key)
        if st is None:
            if len(self._stacks) >= 6:  # bound the memory: drop the oldest entry
                self._stacks.pop(next(iter(self._stacks)))
            st = _SlabStack(self.mu_volume.data, self.mu_volume.ijk_to_world, axis, factor)
            self._stacks[key] = st
        return st

    def _merge_factor(self, axis: int, e_corners: torch.Tensor, footprint_mm: torch.Tensor) -> int:
        """Number of planes merged into one slab along ``axis`` for a group of poses.

        ``e_corners``: ``(B, 4, 3)`` ray directions at the detector corners in base-volume index units.
        ``footprint_mm``: ``(B,)`` detector pixel size projected to the volume centre (mm).
        """
        sp = self.mu_volume.spacing
        s_a = float(sp[axis])
        if self.step_mm is not None:
            return max(1, int(round(self.step_mm / s_a)))
        ra, rb = _PLANE_AXES[axis]
        ea = e_corners[..., axis].abs()
        # lateral drift (mm) of the ray per plane along the marching axis, in the worst corner
        drift = torch.sqrt((e_corners[..., ra] / ea * sp[ra]) ** 2 + (e_corners[..., rb] / ea * sp[rb]) ** 2)
        drift = float(drift.amax())
        tol = 0.5 * max(float(footprint_mm.min()), float(min(sp[ra], sp[rb])))
        f_blur = int(tol / max(drift, 1e-9))
        f_res = int(math.floor(float(sp.max()) / s_a + 1e-6))
        return max(1, min(f_blur, f_res, 8))

    # -- public
    def render(self, proj: Projection, T: torch.Tensor) -> torch.Tensor:
        """DRRs of the CT moved by ``T``.

        Args:
            proj: C-arm geometry with batch 1 (shared by all poses) or B.
            T: ``(B, 4, 4)`` rigid transforms (float64 preferred) moving the CT, ``x' = T x`` (mm).
        Returns:
            ``(B, H, W)`` float32 line integrals of attenuation (unitless) on ``self.device``; ``img[b, v, u]``.
        """
        proj, T = _check_inputs(proj, T, self.device)
        b, h, w = T.shape[0], proj.height, proj.width
        out = torch.zeros(b, h, w, dtype=torch.float32, device=self.device)
        c, D = _rays_in_ct(proj, T)
        vol = self.mu_volume
        w2i = vol.world_to_ijk
        E0 = w2i[:3, :3] @ D  # (B, 3, 3): index-space direction of pixel (u, v, 1)
        corners = torch.tensor([[-0.5, -0.5, 1.0], [w - 0.5, -0.5, 1.0], [-0.5, h - 0.5, 1.0],
                                [w - 0.5, h - 0.5, 1.0]], dtype=torch.float64, device=self.device)
        ec = corners @ E0.transpose(-1, -2)  # (B, 4, 3)
        # per pose: the axis whose worst-corner |cos| (in index space) is largest, rays all one way along it
        cosines = ec.abs() / torch.linalg.norm(ec, dim=-1, keepdim=True)
        same_sign = (torch.sign(ec) == torch.sign(ec[:, :1])).all(1) & (ec.abs() > 0).all(1)
        score = torch.where(same_sign, cosines.amin(1), torch.full_like(cosines[:, 0], -1.0))
        best = score.argmax(-1)
        ok = score.gather(1, best[:, None])[:, 0] > 0.3  # rays within ~72 degrees of the axis
        # pixel footprint at the volume centre (for the automatic merge factor)
        centre = vol.center_world().to(torch.float64)
        depth = ((proj.R @ ((T[:, :3, :3] @ centre) + T[:, :3, 3])[..., None])[..., 0] + proj.t)[:, 2]
        footprint = proj.pixel_spacing.amin(-1) * depth.clamp_min(1.0) / proj.sdd
        pix = _pixel_grid(h, w, self.device)
        for axis in range(3):
            sel = torch.nonzero(ok & (best == axis)).flatten()
            if sel.numel() == 0:
                continue
            f = self._merge_factor(axis, ec[sel].detach(), footprint[sel].detach())
            st = self._stack(axis, f)
            out[sel] = self._render_group(st, c[sel], D[sel], proj.sdd[sel], pix)
        bad = torch.nonzero(~ok).flatten()
        if bad.numel():  # very wide field of view: no plane family suits all rays, march densely instead
            sub = Projection(proj.K[bad], proj.R[bad], proj.t[bad], h, w, proj.pixel_spacing[bad])
            out[bad] = _march(vol.data, vol.ijk_to_world, sub, c[bad], D[bad], 0.5 * float(vol.spacing.min()))
        return out

    def _render_group(self, st: _SlabStack, c: torch.Tensor, D: torch.Tensor, sdd: torch.Tensor,
                      pix: torch.Tensor) -> torch.Tensor:
        """Render poses that share a marching axis.  ``c`` (B,3), ``D`` (B,3,3), ``sdd`` (B,), ``pix`` (H,W,3).

        The ray through pixel (u, v) meets plane ``k`` (stack index along the marching axis ``a``) at the
        in-plane index ``s + (k - s_a) * e / e_a`` with ``e = E (u, v, 1)``: in grid_sample's normalised
        coordinates that is ``g0 + k * g1`` per pixel, so the sample grid of a chunk of planes is one outer
        product.  Returns ``(B, H, W)`` float32.
        """
        dev = self.device
        b = c.shape[0]
        h, w = pix.shape[:2]
        a, ra, ca = st.axis, st.row_axis, st.col_axis
        w2i = st.world_to_ijk
        s = c @ w2i[:3, :3].T + w2i[:3, 3]  # (B, 3) source, stack index coordinates
        E = w2i[:3, :3] @ D  # (B, 3, 3)
        e = (pix.reshape(1, -1, 3) @ E.transpose(-1, -2)).view(b, h, w, 3)  # index-space direction / unit depth
        ea = e[..., a]
        # path length (mm) per unit step of the marching index = |d| / |e_a|
        dlen = torch.linalg.norm(pix.reshape(1, -1, 3) @ D.transpose(-1, -2), dim=-1).view(b, h, w)
        weight = (dlen / ea.abs()).to(torch.float32)
        # normalised grid coordinates (x = column, y = row): g0 + k * g1
        nr, nc = st.rows, st.cols
        scale = torch.tensor([2.0 / (nc - 1), 2.0 / (nr - 1)], dtype=torch.float64, device=dev)
        g1 = torch.stack([e[..., ca], e[..., ra]], -1) / ea[..., None] * scale  # (B, H, W, 2)
        src = torch.stack([s[:, ca], s[:, ra]], -1)[:, None, None, :]  # (B, 1, 1, 2)
        g0 = (src - s[:, a, None, None, None] * g1 / scale) * scale - 1
        g0_32, g1_32 = g0.to(torch.float32), g1.to(torch.float32)
        sign = torch.sign(ea[:, 0, 0])  # (B,), uniform over the detector (checked by the caller)
        ea_abs = ea.abs()
        lam_lo = ea_abs.flatten(1).amin(1)  # (B,) smallest |e_a|: plane offset |t| <= sdd*lam_lo is all in front
        lam_hi = ea_abs.flatten(1).amax(1)
        planes = torch.arange(st.n, dtype=torch.float64, device=dev)
        t = planes[:, None] - s[None, :, a]  # (N, B) signed offset of each plane from the source
        ts = t * sign[None]  # > 0: in front of the source
        front = ts > 0
        full = (front & (ts <= sdd[None] * lam_lo[None])).cpu()  # every pixel's ray meets it before the detector
        partial = (front & (ts <= sdd[None] * lam_hi[None])).cpu() & ~full
        used = full | partial
        if not bool(used.any()):
            return torch.zeros(b, h, w, dtype=torch.float32, device=dev)
        idx = torch.nonzero(used.any(1)).flatten()
        k_lo, k_hi = int(idx[0]), int(idx[-1]) + 1
        acc = torch.zeros(b, h, w, dtype=torch.float32, device=dev)
        rects = self._plane_rects(st, s, E, k_lo, k_hi, h, w)  # (N', 4) int rows: u0, u1, v0, v1
        chunk = max(1, min(k_hi - k_lo, _SAMPLES_PER_CHUNK // max(1, b * h * w)))
        buf = torch.empty(chunk * b * h * w * 2, dtype=torch.float32, device=dev)
        for k0 in range(k_lo, k_hi, chunk):
            k1 = min(k_hi, k0 + chunk)
            n = k1 - k0
            rr = rects[k0 - k_lo:k1 - k_lo]
            u0, v0 = int(rr[:, 0].min()), int(rr[:, 2].min())
            u1, v1 = int(rr[:, 1].max()), int(rr[:, 3].max())
            if u1 <= u0 or v1 <= v0:
                continue
            hh, ww = v1 - v0, u1 - u0
            if (hh, ww) == (h, w):
                a0, a1 = g0_32.reshape(1, -1), g1_32.reshape(1, -1)
            else:
                a0 = g0_32[:, v0:v1, u0:u1].reshape(1, -1)
                a1 = g1_32[:, v0:v1, u0:u1].reshape(1, -1)
            ks = torch.arange(k0, k1, dtype=torch.float32, device=dev)[:, None]
            if a1.requires_grad:  # differentiable path (out= does not support autograd)
                grid = torch.addcmul(a0, ks, a1)
            else:
                grid = buf[:n * a1.shape[1]].view(n, -1)
                torch.mul(ks, a1, out=grid)  # (faster than addcmul with broadcasting)
                grid += a0
            smp = F.grid_sample(st.slices[k0:k1], grid.view(n, b * hh, ww, 2), mode="bilinear",
                                padding_mode="zeros", align_corners=True).view(n, b, hh, ww)
            if not bool(full[k0:k1].all()):  # planes behind the source or beyond the detector for some rays
                lam = t[k0:k1, :, None, None] / ea[None, :, v0:v1, u0:u1]
                mask = (lam > 0) & (lam <= sdd[None, :, None, None])
                smp = smp * mask.to(smp.dtype)
            acc[:, v0:v1, u0:u1] += smp.sum(0)
        return acc * weight

    @staticmethod
    def _plane_rects(st: _SlabStack, s: torch.Tensor, E: torch.Tensor, k_lo: int, k_hi: int, h: int,
                     w: int) -> torch.Tensor:
        """Detector rectangles hit by the sampled support of planes ``k_lo .. k_hi - 1`` (union over poses).

        Returns a CPU int64 tensor ``(k_hi - k_lo, 4)`` of ``(u0, u1, v0, v1)``, half-open, clipped to the
        detector (empty when ``u1 <= u0``).  The support of a plane with zero-padded bilinear sampling is the
        index rectangle ``(-1, rows) x (-1, cols)``; its corners are projected with the moved camera.
        """
        dev = s.device
        n = k_hi - k_lo
        pts = torch.zeros(n, 4, 3, dtype=torch.float64, device=dev)
        pts[..., st.axis] = torch.arange(k_lo, k_hi, dtype=torch.float64, device=dev)[:, None]
        pts[:, :, st.row_axis] = torch.tensor([-1.0, -1.0, st.rows, st.rows], dtype=torch.float64, device=dev)
        pts[:, :, st.col_axis] = torch.tensor([-1.0, st.cols, -1.0, st.cols], dtype=torch.float64, device=dev)
        einv = torch.linalg.inv(E)  # index-space offset from the source -> lam * (u, v, 1)
        q = (pts[None] - s[:, None, None, :]) @ einv[:, None].transpose(-1, -2)  # (B, n, 4, 3)
        behind = (q[..., 2] <= 1e-6).any(-1).any(0)  # (n,): a corner behind the source -> whole detector
        uv = q[..., :2] / q[..., 2:3].clamp_min(1e-6)
        lo = uv.amin(dim=(0, 2)).floor()
        hi = uv.amax(dim=(0, 2)).ceil() + 1
        rect = torch.stack([lo[:, 0].clamp(0, w), hi[:, 0].clamp(0, w), lo[:, 1].clamp(0, h), hi[:, 1].clamp(0, h)],
                           -1)
        full = torch.tensor([0, w, 0, h], dtype=rect.dtype, device=dev)
        rect = torch.where(behind[:, None], full, rect)
        return rect.to(torch.int64).cpu()
