"""C-arm projection geometry and rigid transforms (docs/design.md §2).

Conventions:

* The C-arm is a pinhole camera. Camera frame: origin at the X-ray source, +z along the principal ray from the
  source towards the detector, +x along detector columns (u), +y along detector rows (v).  A world point x (mm)
  maps to camera coordinates ``X = R x + t`` and to the pixel ``(u, v) = (fx X/Z + cx, fy Y/Z + cy)`` with
  ``fx = fy = SDD / pixel spacing``.  ``P = K [R | t]``; the source position is ``c = -R^T t``.
* Pixel (u, v) is (column, row) of the X-ray image; pixel centres are at integer coordinates.
* Rigid transforms are ``(..., 4, 4)`` matrices that move the CT: ``x' = T x``.  Twists ``dv = (w, t)``:
  rotation vector w (radians) first, translation t (mm) second.
* Everything is batched over a leading dimension ``B`` and works on any device.  Geometry is computed in
  float64 where precision matters (matrices) and can be cast to float32 for rendering.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .errors import InputError

# ----------------------------------------------------------------------------- SO(3) / SE(3)


def skew(w: torch.Tensor) -> torch.Tensor:
    """``(..., 3)`` vectors -> ``(..., 3, 3)`` cross-product matrices ``[w]x``."""
    z = torch.zeros_like(w[..., 0])
    return torch.stack([
        torch.stack([z, -w[..., 2], w[..., 1]], -1),
        torch.stack([w[..., 2], z, -w[..., 0]], -1),
        torch.stack([-w[..., 1], w[..., 0], z], -1),
    ], -2)


def _taylor_coeffs(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A = sin t / t, B = (1 - cos t) / t^2, C = (t - sin t) / t^3, stable near 0 (differentiable)."""
    small = theta < 1e-4
    t = torch.where(small, torch.ones_like(theta), theta)
    t2 = theta * theta
    a = torch.where(small, 1 - t2 / 6, torch.sin(t) / t)
    b = torch.where(small, 0.5 - t2 / 24, (1 - torch.cos(t)) / (t * t))
    c = torch.where(small, 1.0 / 6 - t2 / 120, (t - torch.sin(t)) / (t * t * t))
    return a, b, c


def so3_exp(w: torch.Tensor) -> torch.Tensor:
    """Rodrigues: rotation vectors ``(..., 3)`` (radians) -> rotation matrices ``(..., 3, 3)``."""
    theta = torch.linalg.norm(w, dim=-1)
    a, b, _ = _taylor_coeffs(theta)
    k = skew(w)
    eye = torch.eye(3, dtype=w.dtype, device=w.device).expand(k.shape)
    return eye + a[..., None, None] * k + b[..., None, None] * (k @ k)


def so3_log(r: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``(..., 3, 3)`` -> rotation vectors ``(..., 3)`` (radians, angle in [0, pi])."""
    cos = ((r.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1.0, 1.0)
    v = torch.stack([r[..., 2, 1] - r[..., 1, 2], r[..., 0, 2] - r[..., 2, 0], r[..., 1, 0] - r[..., 0, 1]], -1)
    # atan2 keeps the angle accurate near 0 and pi, where acos loses precision
    theta = torch.atan2(0.5 * torch.linalg.norm(v, dim=-1), cos)
    sin = torch.sin(theta)
    small = theta < 1e-6
    near_pi = theta > math.pi - 1e-3
    factor = torch.where(small, 0.5 + theta ** 2 / 12, theta / (2 * torch.where(small, torch.ones_like(sin), sin)))
    w = factor[..., None] * v
    if near_pi.any():
        # near pi: axis from the symmetric part, (R + R^T)/2 - cos I = (1 - cos) a a^T
        eye3 = torch.eye(3, dtype=r.dtype, device=r.device)
        bb = (r + r.transpose(-1, -2)) / 2 - cos[..., None, None] * eye3
        diag = bb.diagonal(dim1=-2, dim2=-1)
        idx = diag.argmax(-1)
        col = torch.gather(bb, -1, idx[..., None, None].expand(*bb.shape[:-1], 1))[..., 0]
        axis = col / torch.linalg.norm(col, dim=-1, keepdim=True).clamp_min(1e-12)
        # sign so that the axis agrees with the antisymmetric part
        sign = torch.where((axis * v).sum(-1) < 0, -1.0, 1.0).to(r.dtype)
        w = torch.where(near_pi[..., None], axis * (theta * sign)[..., None], w)
    return w


def se3_exp(dv: torch.Tensor) -> torch.Tensor:
    """Twists ``(..., 6)`` = (rotation vector [rad], translation [mm]) -> rigid transforms ``(..., 4, 4)``.

    The exact SE(3) exponential: rotation by Rodrigues, translation ``V t`` with the left Jacobian V.
    """
    w, u = dv[..., :3], dv[..., 3:]
    theta = torch.linalg.norm(w, dim=-1)
    a, b, c = _taylor_coeffs(theta)
    k = skew(w)
    k2 = k @ k
    eye = torch.eye(3, dtype=dv.dtype, device=dv.device).expand(k.shape)
    r = eye + a[..., None, None] * k + b[..., None, None] * k2
    v = eye + b[..., None, None] * k + c[..., None, None] * k2
    t = (v @ u[..., None])[..., 0]
    out = torch.zeros(*dv.shape[:-1], 4, 4, dtype=dv.dtype, device=dv.device)
    out[..., :3, :3] = r
    out[..., :3, 3] = t
    out[..., 3, 3] = 1
    return out


def se3_log(T: torch.Tensor) -> torch.Tensor:
    """Rigid transforms ``(..., 4, 4)`` -> twists ``(..., 6)`` (inverse of :func:`se3_exp`)."""
    w = so3_log(T[..., :3, :3])
    theta = torch.linalg.norm(w, dim=-1)
    k = skew(w)
    small = theta < 1e-4
    th = torch.where(small, torch.ones_like(theta), theta)
    # V^-1 = I - K/2 + (1/theta^2)(1 - (theta sin theta) / (2 (1 - cos theta))) K^2
    coef = torch.where(small, 1.0 / 12 + theta ** 2 / 720,
                       (1 - th * torch.sin(th) / (2 * (1 - torch.cos(th)))) / (th * th))
    eye = torch.eye(3, dtype=T.dtype, device=T.device).expand(k.shape)
    vinv = eye - 0.5 * k + coef[..., None, None] * (k @ k)
    u = (vinv @ T[..., :3, 3:])[..., 0]
    return torch.cat([w, u], -1)


def rigid(rotation: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
    """``(..., 3, 3)`` rotation and ``(..., 3)`` translation (mm) -> ``(..., 4, 4)`` transform."""
    out = torch.zeros(*rotation.shape[:-2], 4, 4, dtype=rotation.dtype, device=rotation.device)
    out[..., :3, :3] = rotation
    out[..., :3, 3] = translation
    out[..., 3, 3] = 1
    return out


def translation_matrix(t: torch.Tensor) -> torch.Tensor:
    """``(..., 3)`` translation (mm) -> ``(..., 4, 4)`` transform."""
    eye = torch.eye(3, dtype=t.dtype, device=t.device).expand(*t.shape[:-1], 3, 3)
    return rigid(eye, t)


def invert_rigid(T: torch.Tensor) -> torch.Tensor:
    """Exact inverse of rigid transforms ``(..., 4, 4)``."""
    r = T[..., :3, :3].transpose(-1, -2)
    return rigid(r, -(r @ T[..., :3, 3:])[..., 0])


def transform_points(T: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Apply transforms ``(..., 4, 4)`` to points ``(..., N, 3)`` (mm); broadcasting over leading dims."""
    return x @ T[..., :3, :3].transpose(-1, -2) + T[..., None, :3, 3]


def rotate_vectors(T: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Rotate direction vectors ``(..., N, 3)`` by the rotation part of ``(..., 4, 4)``."""
    return g @ T[..., :3, :3].transpose(-1, -2)


def centred_update(dv: torch.Tensor, centre: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """``T_new = C exp(dv) C^-1 T`` with C the translation to ``centre`` (docs/design.md §2).

    Args:
        dv: ``(B, 6)`` twist (rad, mm) expressed in coordinates centred on ``centre``.
        centre: ``(B, 3)`` world point (mm), usually the centroid of the moved contour points.
        T: ``(B, 4, 4)`` current estimate.
    """
    c = translation_matrix(centre.to(T.dtype))
    cinv = translation_matrix(-centre.to(T.dtype))
    return c @ se3_exp(dv.to(T.dtype)) @ cinv @ T


def rotation_angle_deg(T: torch.Tensor) -> torch.Tensor:
    """Rotation angle (degrees) of rigid transforms ``(..., 4, 4)``."""
    return torch.rad2deg(torch.linalg.norm(so3_log(T[..., :3, :3]), dim=-1))


# ----------------------------------------------------------------------------- projection


@dataclass(frozen=True)
class Projection:
    """A batch of pinhole C-arm geometries.

    Attributes:
        K: ``(B, 3, 3)`` intrinsics (pixels): ``[[f, 0, cx], [0, f, cy], [0, 0, 1]]``, f = SDD / spacing.
        R: ``(B, 3, 3)`` world -> camera rotation.
        t: ``(B, 3)`` world -> camera translation (mm).
        height, width: detector size in pixels (rows, columns).
        pixel_spacing: ``(B, 2)`` detector pixel size (mm) along (u, v).
    """

    K: torch.Tensor
    R: torch.Tensor
    t: torch.Tensor
    height: int
    width: int
    pixel_spacing: torch.Tensor

    def __post_init__(self) -> None:
        for name in ("K", "R", "t", "pixel_spacing"):
            v = getattr(self, name)
            if not torch.isfinite(v).all():
                raise InputError(f"the C-arm geometry has NaN/infinite values in {name}")
        if self.K.ndim != 3 or self.R.ndim != 3 or self.t.ndim != 2:
            raise InputError("Projection fields need a leading batch dimension: K (B,3,3), R (B,3,3), t (B,3)")
        if self.height < 2 or self.width < 2:
            raise InputError(f"detector of {self.height}x{self.width} pixels is too small")
        if (self.pixel_spacing <= 0).any():
            raise InputError("detector pixel spacing must be positive (mm)")

    # -- construction
    @staticmethod
    def from_carm(pose_world_from_camera: torch.Tensor, sdd: float | torch.Tensor, height: int, width: int,
                  pixel_spacing: float | tuple[float, float] | torch.Tensor,
                  principal_point: tuple[float, float] | torch.Tensor | None = None) -> "Projection":
        """Geometry from the camera pose (camera -> world, ``(B, 4, 4)``), SDD (mm), detector size and spacing.

        The principal point defaults to the detector centre ``((W-1)/2, (H-1)/2)``.
        """
        pose = torch.as_tensor(pose_world_from_camera, dtype=torch.float64)
        if pose.ndim == 2:
            pose = pose[None]
        b = pose.shape[0]
        dev = pose.device
        sdd_t = torch.as_tensor(sdd, dtype=torch.float64, device=dev).reshape(-1).expand(b)
        if (sdd_t <= 0).any():
            raise InputError("the source-to-detector distance must be positive (mm)")
        ps = torch.as_tensor(pixel_spacing, dtype=torch.float64, device=dev).reshape(-1)
        if not torch.isfinite(ps).all() or (ps <= 0).any():
            raise InputError("detector pixel spacing must be positive and finite (mm)")
        ps = (ps.expand(2) if ps.numel() == 1 else ps.reshape(-1, 2)).expand(b, 2).clone() \
            if ps.numel() in (1, 2) else ps.reshape(b, 2)
        if principal_point is None:
            pp = torch.tensor([(width - 1) / 2, (height - 1) / 2], dtype=torch.float64, device=dev).expand(b, 2)
        else:
            pp = torch.as_tensor(principal_point, dtype=torch.float64, device=dev).reshape(-1, 2).expand(b, 2)
        K = torch.zeros(b, 3, 3, dtype=torch.float64, device=dev)
        K[:, 0, 0] = sdd_t / ps[:, 0]
        K[:, 1, 1] = sdd_t / ps[:, 1]
        K[:, 0, 2] = pp[:, 0]
        K[:, 1, 2] = pp[:, 1]
        K[:, 2, 2] = 1
        inv = invert_rigid(pose)
        return Projection(K, inv[:, :3, :3], inv[:, :3, 3], int(height), int(width), ps)

    # -- derived quantities
    @property
    def batch(self) -> int:
        return self.K.shape[0]

    @property
    def device(self) -> torch.device:
        return self.K.device

    @property
    def sdd(self) -> torch.Tensor:
        """``(B,)`` source-to-detector distance (mm)."""
        return self.K[:, 0, 0] * self.pixel_spacing[:, 0]

    @property
    def source(self) -> torch.Tensor:
        """``(B, 3)`` X-ray source position c = -R^T t (world, mm)."""
        return -(self.R.transpose(-1, -2) @ self.t[..., None])[..., 0]

    @property
    def matrix(self) -> torch.Tensor:
        """``(B, 3, 4)`` projection matrix P = K [R | t]."""
        return self.K @ torch.cat([self.R, self.t[..., None]], -1)

    @property
    def world_from_camera(self) -> torch.Tensor:
        """``(B, 4, 4)`` camera pose in the world (columns: detector u, v, beam axis, source)."""
        return invert_rigid(rigid(self.R, self.t))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Projection":
        f = lambda v: v.to(device=device, dtype=dtype)  # noqa: E731
        return replace(self, K=f(self.K), R=f(self.R), t=f(self.t), pixel_spacing=f(self.pixel_spacing))

    def expand(self, b: int) -> "Projection":
        """Repeat a batch-1 geometry ``b`` times."""
        if self.batch == b:
            return self
        if self.batch != 1:
            raise InputError(f"cannot expand a batch of {self.batch} geometries to {b}")
        return replace(self, K=self.K.expand(b, 3, 3), R=self.R.expand(b, 3, 3), t=self.t.expand(b, 3),
                       pixel_spacing=self.pixel_spacing.expand(b, 2))

    def index(self, i: int | slice) -> "Projection":
        """Select batch entries (keeps the batch dimension)."""
        sl = slice(i, i + 1) if isinstance(i, int) else i
        return replace(self, K=self.K[sl], R=self.R[sl], t=self.t[sl], pixel_spacing=self.pixel_spacing[sl])

    # -- projection and back-projection
    def to_camera(self, x: torch.Tensor) -> torch.Tensor:
        """World points ``(B, N, 3)`` (mm) -> camera coordinates ``(B, N, 3)`` (mm)."""
        return x @ self.R.to(x.dtype).transpose(-1, -2) + self.t.to(x.dtype)[:, None, :]

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """World points ``(B, N, 3)`` (mm) -> detector pixels ``(B, N, 2)`` (u, v)."""
        xc = self.to_camera(x)
        z = xc[..., 2:3]
        uvw = xc @ self.K.to(x.dtype).transpose(-1, -2)
        return uvw[..., :2] / torch.where(z.abs() < 1e-9, torch.full_like(z, 1e-9), z)

    def depth(self, x: torch.Tensor) -> torch.Tensor:
        """Depth (mm along the beam axis) of world points ``(B, N, 3)`` -> ``(B, N)``."""
        return self.to_camera(x)[..., 2]

    def ray_directions(self, uv: torch.Tensor) -> torch.Tensor:
        """Unit world directions ``(B, N, 3)`` of the rays from the source through pixels ``(B, N, 2)``."""
        ones = torch.ones_like(uv[..., :1])
        pix = torch.cat([uv, ones], -1)
        kinv = torch.linalg.inv(self.K).to(uv.dtype)
        d_cam = pix @ kinv.transpose(-1, -2)
        d = d_cam @ self.R.to(uv.dtype)  # R^T d_cam, written for row vectors
        return d / torch.linalg.norm(d, dim=-1, keepdim=True)

    def backproject(self, uv: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        """Pixels ``(B, N, 2)`` at depths ``(B, N)`` (mm along the beam axis) -> world points ``(B, N, 3)``."""
        ones = torch.ones_like(uv[..., :1])
        pix = torch.cat([uv, ones], -1)
        kinv = torch.linalg.inv(self.K).to(uv.dtype)
        xc = (pix @ kinv.transpose(-1, -2)) * depth[..., None]
        return (xc - self.t.to(uv.dtype)[:, None, :]) @ self.R.to(uv.dtype)

    def detector_pixel_world(self, uv: torch.Tensor) -> torch.Tensor:
        """World positions ``(B, N, 3)`` of detector pixels ``(B, N, 2)`` (the detector plane is at depth SDD)."""
        return self.backproject(uv, self.sdd.to(uv.dtype)[:, None].expand(uv.shape[:-1]))


# ----------------------------------------------------------------------------- C-arm poses

# Anatomical directions in the two common world conventions.
_ANATOMY = {
    "LPS": {"L": (1, 0, 0), "P": (0, 1, 0), "S": (0, 0, 1)},
    "RAS": {"L": (-1, 0, 0), "P": (0, -1, 0), "S": (0, 0, 1)},
}


def carm_pose(primary_deg: float | torch.Tensor, secondary_deg: float | torch.Tensor,
              source_to_isocenter: float | torch.Tensor, isocenter: torch.Tensor,
              frame: str = "LPS") -> torch.Tensor:
    """Camera pose (camera -> world, ``(B, 4, 4)`` float64) of a C-arm from its angles.

    At primary = secondary = 0 the source is posterior and the beam runs posterior -> anterior (an AP
    fluoroscopy set-up); detector columns (u) run towards the patient's right and rows (v) towards the feet,
    i.e. the image is seen from the source (mirror u for radiological display).

    Args:
        primary_deg: ``(B,)`` or scalar, LAO (+) / RAO (-) angle in degrees: rotation about the patient's
            head-feet axis; at LAO 90 the detector is on the patient's left.
        secondary_deg: ``(B,)`` or scalar, cranial (+) / caudal (-) angle in degrees; at CRA 90 the detector
            is towards the head.
        source_to_isocenter: distance (mm) from the source to the isocentre.
        isocenter: ``(3,)`` or ``(B, 3)`` world point (mm) the beam axis passes through.
        frame: ``"LPS"`` or ``"RAS"``: the anatomical meaning of the world axes.
    """
    if frame not in _ANATOMY:
        raise InputError(f"unknown world frame {frame!r}: use 'LPS' or 'RAS'")
    a = _ANATOMY[frame]
    prim = torch.deg2rad(torch.as_tensor(primary_deg, dtype=torch.float64).reshape(-1))
    sec = torch.deg2rad(torch.as_tensor(secondary_deg, dtype=torch.float64).reshape(-1))
    iso = torch.as_tensor(isocenter, dtype=torch.float64).reshape(-1, 3)
    sid = torch.as_tensor(source_to_isocenter, dtype=torch.float64).reshape(-1)
    b = max(prim.numel(), sec.numel(), iso.shape[0], sid.numel())
    prim, sec, iso, sid = prim.expand(b), sec.expand(b), iso.expand(b, 3), sid.expand(b)
    if (sid <= 0).any():
        raise InputError("the source-to-isocentre distance must be positive (mm)")
    L = torch.tensor(a["L"], dtype=torch.float64)
    P = torch.tensor(a["P"], dtype=torch.float64)
    S = torch.tensor(a["S"], dtype=torch.float64)
    # base camera axes (AP): x -> patient's right, y -> feet, z -> anterior
    base = torch.stack([-L, -S, -P], -1)  # columns are the camera axes in world coordinates
    # primary: rotate about S so that the beam (z = A) turns towards L for positive (LAO) angles
    r_prim = so3_exp(S[None] * prim[:, None])
    # secondary: rotate about the camera x axis (patient's right-left) so the beam turns towards S (CRA)
    rot = r_prim @ base
    x_axis = rot[:, :, 0]
    r_sec = so3_exp(x_axis * sec[:, None])
    rot = r_sec @ rot
    z = rot[:, :, 2]
    source = iso - sid[:, None] * z
    return rigid(rot, source)


def crop_projection(proj: Projection, u0: int, v0: int, width: int, height: int) -> Projection:
    """The same C-arm restricted to the detector window starting at pixel (u0, v0) of size width x height."""
    K = proj.K.clone()
    K[:, 0, 2] -= u0
    K[:, 1, 2] -= v0
    return replace(proj, K=K, width=int(width), height=int(height))


def coarsen_projection(proj: Projection, factor: int) -> Projection:
    """The same C-arm sampled on a detector grid ``factor`` times coarser: rendered pixel ``(j, i)`` is detector
    pixel ``(factor j, factor i)`` (its centre), ``ceil(width / factor) x ceil(height / factor)`` pixels of
    ``factor`` times the spacing."""
    f = int(factor)
    if f < 1:
        raise InputError(f"the detector grid factor must be a whole number >= 1, got {factor}")
    if f == 1:
        return proj
    K = proj.K.clone()
    K[:, :2] = K[:, :2] / f
    return replace(proj, K=K, width=-(-proj.width // f), height=-(-proj.height // f),
                   pixel_spacing=proj.pixel_spacing * f)
