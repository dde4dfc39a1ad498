"""The 2D pre-alignment stage (docs/design.md §4.1): before the first PPC update, a global search of the in-plane
shift and rotation of the region's DRR window against the X-ray, applied to the CT as a rotation about the ray
through the region's centre and a translation parallel to the detector.  Pure torch."""

from __future__ import annotations

import math

import torch

from .drr import DRRRenderer
from .geometry import Projection, crop_projection, so3_exp, transform_points, translation_matrix
from .gradients import image_gradient

__all__ = ["prealign", "PREALIGN_SIGMA_PX", "cross_correlation"]

#: Gaussian scale (detector pixels) of the gradient images the pre-alignment correlates
PREALIGN_SIGMA_PX = 2.0


def cross_correlation(image: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
    """The valid cross-correlation of ``image (C, H, W)`` with ``template (C, h, w)`` summed over the channels:
    ``(H - h + 1, W - w + 1)``, what ``conv2d(image[None], template[None])`` computes, through the FFT (float64):
    a 65 x 65 search of a 100 x 100 px template costs ~4 ms instead of ~100 ms."""
    H, W = image.shape[-2:]
    h, w = template.shape[-2:]
    x = torch.fft.rfft2(image.double(), s=(H, W))
    t = torch.fft.rfft2(template.double(), s=(H, W))
    full = torch.fft.irfft2((x * t.conj()).sum(0), s=(H, W))
    return full[:H - h + 1, :W - w + 1].to(image.dtype)


def prealign(renderer: DRRRenderer, proj: Projection, xray_gradient: torch.Tensor, T: torch.Tensor,
             points: torch.Tensor, *, search_px: float, angles_deg: tuple[float, ...],
             min_gain: float) -> torch.Tensor:
    """Global 2D search before the first update (docs/design.md §4.1): the in-plane rotation (``angles_deg``, about
    the ray through the region's centre) and shift (within ``search_px`` pixels) of the DRR window around the region
    of interest that best correlate (normalised cross-correlation of the gradient images) with the X-ray, applied to
    the CT as that rotation and a translation parallel to the detector at the region's depth; kept only when it
    raises the correlation by ``min_gain``.

    Args: the CT's renderer; the C-arm ``proj`` (batch 1); ``xray_gradient`` ``(1, 2, H, W)`` the X-ray's gradients
    at :data:`PREALIGN_SIGMA_PX`; ``T`` ``(4, 4)`` the estimate; ``points`` ``(N, 3)`` region points (CT frame, mm).
    Returns: ``(4, 4)`` the pre-aligned estimate (``T`` itself when nothing better is found).

    Contour matching along normals is local: an initial error of half a vertebra's height lets endplates
    lock onto the neighbouring vertebra.  The window holds ribs, pedicles and soft-tissue edges as well,
    which makes the correlation peak unambiguous.
    """
    S = int(round(search_px))
    w_all = transform_points(T, points)
    uv_all = proj.project(w_all[None])[0]
    h, w = proj.height, proj.width
    lo = torch.floor(uv_all.min(0).values) - 8
    hi = torch.ceil(uv_all.max(0).values) + 8
    u0, v0 = int(max(S, lo[0])), int(max(S, lo[1]))
    u1, v1 = int(min(w - 1 - S, hi[0])), int(min(h - 1 - S, hi[1]))
    if u1 - u0 < 16 or v1 - v0 < 16:
        return T  # too close to the detector border for a global search
    centre = w_all.mean(0, keepdim=True)
    uv_c = proj.project(centre[None])[0]  # (1, 2)
    # render a larger window, so that rotated templates have no empty corners
    m = int(math.ceil(0.2 * max(u1 - u0, v1 - v0)))
    big = renderer.render(crop_projection(proj, u0 - m, v0 - m, u1 - u0 + 1 + 2 * m, v1 - v0 + 1 + 2 * m),
                               T[None])
    sigma = PREALIGN_SIGMA_PX
    xg = xray_gradient[0, :, v0 - S:v1 + S + 1, u0 - S:u1 + S + 1]  # (2, th+2S, tw+2S)
    th, tw = v1 - v0 + 1, u1 - u0 + 1
    ones = torch.ones(2, th, tw, dtype=xg.dtype, device=xg.device)
    s1 = cross_correlation(xg, ones)
    s2 = cross_correlation(xg * xg, ones)
    var = (s2 - s1 * s1 / (2 * th * tw)).clamp_min(1e-12)
    hb, wb = big.shape[1:]
    vv, uu = torch.meshgrid(torch.arange(hb, dtype=torch.float64), torch.arange(wb, dtype=torch.float64),
                            indexing="ij")
    c = (uv_c[0] - uv_c.new_tensor([u0 - m, v0 - m])).cpu()  # rotation centre in the big window
    best = (-math.inf, 0.0, 0, 0)
    here = -math.inf
    for ang in angles_deg:
        # template rotated by ang about the region's projection (from +u towards +v), as the CT rotated
        # about the ray through the region's centre would appear
        a_r = math.radians(ang)
        du_, dv_ = uu - c[0], vv - c[1]
        su = c[0] + math.cos(a_r) * du_ + math.sin(a_r) * dv_
        sv = c[1] - math.sin(a_r) * du_ + math.cos(a_r) * dv_
        grid = torch.stack([su / (wb - 1) * 2 - 1, sv / (hb - 1) * 2 - 1], -1)[None].to(big)
        rot = torch.nn.functional.grid_sample(big[None], grid, align_corners=True, padding_mode="border")[0]
        tg = image_gradient(rot, sigma_px=sigma)[0][:, m:m + th, m:m + tw]
        tg = tg - tg.mean(dim=(1, 2), keepdim=True)
        num = cross_correlation(xg, tg)  # (2S+1, 2S+1)
        ncc = num / torch.sqrt(var * (tg * tg).sum()).clamp_min(1e-12)
        k = int(torch.argmax(ncc))
        dv_i, du_i = divmod(k, ncc.shape[1])
        if float(ncc[dv_i, du_i]) > best[0]:
            best = (float(ncc[dv_i, du_i]), ang, du_i - S, dv_i - S)
        if ang == 0:
            here = float(ncc[S, S])
    score, ang, du, dv = best
    if score < here + min_gain:
        return T
    out = T
    if ang != 0:
        axis = proj.ray_directions(uv_c[None])[0, 0]  # from the source through the region's centre
        rot3 = torch.eye(4, dtype=T.dtype, device=T.device)
        rot3[:3, :3] = so3_exp(axis * math.radians(ang))
        cm = translation_matrix(centre[0])
        out = cm @ rot3 @ translation_matrix(-centre[0]) @ out
    depth = proj.depth(centre[None])[0]
    moved = proj.backproject(uv_c + uv_c.new_tensor([float(du), float(dv)]), depth)[0]
    shift = torch.eye(4, dtype=T.dtype, device=T.device)
    shift[:3, 3] = (moved - centre)[0]
    return shift @ out
