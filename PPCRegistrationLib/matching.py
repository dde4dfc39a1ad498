"""Classic 2D matching of contour points (docs/design.md §3, update steps 4 and 5).

For every contour point p_i (projected into the DRR) the DRR gradient, projected on the 2D normal n_i, is
sampled on a short profile (optionally a thin patch of parallel profiles) centred on p_i.  That template is
slid along n_i over the same quantity of the X-ray gradient image within +-``search_px``; the match
``p'_i = p_i + o_i n_i`` is the offset with the best normalised cross-correlation (NCC), refined to sub-pixel
precision by a parabola through the three best samples.  The score (the NCC, 0 for rejected matches) is the
natural PPC weight; :func:`robust_weights` and :func:`displacement_consistency` down-weight outliers.

Everything is batched over B, vectorised over the N points (``grid_sample`` for the profiles, no Python loop
over points) and runs on the device of the inputs.  Image coordinates: pixels (u, v) = (column, row), pixel
centres at integers; gradient images are ``(B, 2, H, W)`` with channel 0 = d/du, channel 1 = d/dv.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import InputError

__all__ = ["MatchResult", "match_along_normals", "sample_image", "robust_weights", "displacement_consistency"]


@dataclass(frozen=True)
class MatchResult:
    """Result of :func:`match_along_normals`.

    Attributes:
        uv_matched: ``(B, N, 2)`` matched X-ray positions p'_i (pixels); equal to p_i where not valid.
        score: ``(B, N)`` match quality in [0, 1]: the NCC of the best offset mapped linearly from
            [min_ncc, 1] to [0, 1]; 0 where not valid.
        valid: ``(B, N)`` bool: a contour point with a significant match strictly inside the search range.
        offset_px: ``(B, N)`` signed displacement along the normal (pixels); 0 where not valid.
        inverted: ``(B,)`` bool: the X-ray contrast was treated as inverted relative to the DRR.
        normals: ``(B, N, 2)`` the unit search directions used.
    """

    uv_matched: torch.Tensor
    score: torch.Tensor
    valid: torch.Tensor
    offset_px: torch.Tensor
    inverted: torch.Tensor
    normals: torch.Tensor

    @property
    def displacement(self) -> torch.Tensor:
        """``(B, N, 2)`` p'_i - p_i (pixels); 0 where not valid."""
        return self.offset_px[..., None] * self.normals


def sample_image(img: torch.Tensor, uv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear samples of images at pixel positions.

    Args:
        img: ``(B, C, H, W)``.
        uv: ``(B, ..., 2)`` pixel positions (u = column, v = row).
    Returns:
        ``(B, C, ...)`` samples (0 outside) and ``(B, ...)`` bool "inside the image" flags.
    """
    b, _, h, w = img.shape
    shape = uv.shape[1:-1]
    g = uv.reshape(b, 1, -1, 2).to(img.dtype)
    scale = torch.tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)], dtype=img.dtype, device=img.device)
    out = F.grid_sample(img, g * scale - 1, mode="bilinear", padding_mode="zeros", align_corners=True)
    inside = (uv[..., 0] >= 0) & (uv[..., 0] <= w - 1) & (uv[..., 1] >= 0) & (uv[..., 1] <= h - 1)
    return out.reshape(b, img.shape[1], *shape), inside


def _masked_mean(x: torch.Tensor, m: torch.Tensor, dim: int = -1) -> torch.Tensor:
    m = m.to(x.dtype)
    return (x * m).sum(dim) / m.sum(dim).clamp_min(1.0)


def match_along_normals(drr_grad: torch.Tensor, xray_grad: torch.Tensor, uv: torch.Tensor, normals: torch.Tensor,
                        mask: torch.Tensor | None = None, *, search_px: float = 20.0, patch_half_len: float = 12.0,
                        patch_half_width: int = 2, step_px: float = 1.0, polarity: str = "auto",
                        min_ncc: float = 0.5, min_contrast: float = 0.02, taper_sigma_px: float | None = None,
                        min_edge_ratio: float = 0.0) -> MatchResult:
    """Match contour points between the DRR and the X-ray by NCC of gradient profiles along the normal.

    Args:
        drr_grad: ``(B, 2, H, W)`` gradient (d/du, d/dv) of the DRR rendered at the current estimate.
        xray_grad: ``(B, 2, H, W)`` gradient of the X-ray (same detector grid).
        uv: ``(B, N, 2)`` projected contour points p_i (pixels).
        normals: ``(B, N, 2)`` unit search directions n_i (e.g. :func:`~PPCRegistrationLib.features.project_normals`).
        mask: ``(B, N)`` bool, the points to match (contour points); all when ``None``.
        search_px: the search range +-``search_px`` (pixels) along the normal.
        patch_half_len: half length (pixels) of the DRR template along the normal.
        patch_half_width: the template has ``2 * patch_half_width + 1`` parallel profiles, 1 pixel apart
            (0 = a single 1D profile).
        step_px: sampling step (pixels) along the normal (0.5 or 1 are good choices).
        polarity: ``"same"`` (bone bright in both images), ``"inverted"`` (the X-ray's contrast is the
            negative of the DRR's) or ``"auto"`` (decided per batch element from the correlation of all
            points: the polarity with the larger mean best-NCC wins).
        min_ncc: matches with a lower NCC are rejected.
        taper_sigma_px: Gaussian weighting (pixels) of the template samples along the normal in the NCC, so
            the point's own edge dominates and the rest of the profile gives context; default
            ``patch_half_len / 2``; 0 = uniform.
        min_edge_ratio: reject points whose DRR template has, at its centre, less than this fraction of its
            largest absolute value (the point's own edge is not visible in the DRR); 0 disables.
        min_contrast: a template weaker than this fraction of the median template strength of the batch
            element (a flat DRR profile) is rejected, as is an X-ray window with (almost) no signal.
    Returns:
        :class:`MatchResult`. Rejected: masked-out points, templates leaving the image or without contrast,
        best offsets on the border of the search range, NCC below ``min_ncc``.
    """
    if drr_grad.ndim != 4 or drr_grad.shape[1] != 2 or xray_grad.shape != drr_grad.shape:
        raise InputError(f"gradient images must both be (B, 2, H, W), got {tuple(drr_grad.shape)} and "
                         f"{tuple(xray_grad.shape)}")
    b, _, h, w = drr_grad.shape
    if uv.ndim != 3 or uv.shape[0] != b or uv.shape[-1] != 2 or normals.shape != uv.shape:
        raise InputError(f"uv and normals must be (B, N, 2) with B = {b}, got {tuple(uv.shape)} and "
                         f"{tuple(normals.shape)}")
    if polarity not in ("auto", "same", "inverted"):
        raise InputError(f"polarity must be 'auto', 'same' or 'inverted', got {polarity!r}")
    if step_px <= 0 or search_px < 2 * step_px or patch_half_len < step_px:
        raise InputError("need step_px > 0, search_px >= 2 step_px and patch_half_len >= step_px (pixels)")
    n = uv.shape[1]
    dev = drr_grad.device
    dt = drr_grad.dtype if drr_grad.dtype in (torch.float32, torch.float64) else torch.float32
    drr_grad, xray_grad = drr_grad.to(dt), xray_grad.to(device=dev, dtype=dt)
    uv_d, nrm = uv.to(device=dev, dtype=dt), normals.to(device=dev, dtype=dt)
    nrm = nrm / torch.linalg.norm(nrm, dim=-1, keepdim=True).clamp_min(1e-12)
    has_normal = torch.linalg.norm(normals.to(dev), dim=-1) > 0.5
    if mask is None:
        mask = torch.ones(b, n, dtype=torch.bool, device=dev)
    mask = mask.to(dev) & has_normal & torch.isfinite(uv_d).all(-1)
    if n == 0:
        z = torch.zeros(b, 0, device=dev, dtype=dt)
        return MatchResult(uv_d.clone(), z, z.bool(), z, torch.zeros(b, dtype=torch.bool, device=dev), nrm)

    L = int(round(patch_half_len / step_px))  # template: 2L+1 samples
    S = int(round(search_px / step_px))  # offsets: 2S+1
    P = int(patch_half_width)
    s_t = torch.arange(-L, L + 1, device=dev, dtype=dt) * step_px  # (Wn,)
    s_x = torch.arange(-L - S, L + S + 1, device=dev, dtype=dt) * step_px  # (M,)
    lat = torch.arange(-P, P + 1, device=dev, dtype=dt)  # (Pn,)
    tang = torch.stack([-nrm[..., 1], nrm[..., 0]], -1)

    def profiles(img: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions (B, N, Pn, len(s), 2), values = n . grad
        pos = (uv_d[:, :, None, None, :] + s[None, None, None, :, None] * nrm[:, :, None, None, :]
               + lat[None, None, :, None, None] * tang[:, :, None, None, :])
        vals, inside = sample_image(img, pos)  # (B, 2, N, Pn, len(s))
        proj = (vals * nrm.permute(0, 2, 1)[:, :, :, None, None]).sum(1)  # (B, N, Pn, len(s))
        return proj, inside

    tpl, tpl_in = profiles(drr_grad, s_t)  # (B, N, Pn, Wn)
    sig, sig_in = profiles(xray_grad, s_x)  # (B, N, Pn, M)
    wn = 2 * L + 1
    # windows of the X-ray profile for every offset: (B, N, O, Pn, Wn)
    win = sig.unfold(-1, wn, 1).permute(0, 1, 3, 2, 4)
    win_in = sig_in.unfold(-1, wn, 1).permute(0, 1, 3, 2, 4).all(-1).all(-1)  # (B, N, O)
    # Gaussian taper along the normal: the point's own edge counts most, the rest of the profile gives context
    if taper_sigma_px is None:
        taper_sigma_px = patch_half_len / 2
    if taper_sigma_px <= 0:
        wt = torch.ones(wn, device=dev, dtype=dt)
    else:
        wt = torch.exp(-0.5 * (s_t / taper_sigma_px) ** 2)
    wt = (wt / (wt.sum() * (2 * P + 1)))[None, None, None, :]  # sums to 1 over the patch
    cnt = 1.0
    t0 = tpl - (tpl * wt).sum(dim=(-2, -1), keepdim=True)
    t_norm = torch.sqrt((wt * t0 ** 2).sum(dim=(-2, -1)))  # (B, N) weighted rms
    wt5 = wt[:, :, None]
    w0 = win - (win * wt5).sum(dim=(-2, -1), keepdim=True)
    w_norm = torch.sqrt((wt5 * w0 ** 2).sum(dim=(-2, -1)))  # (B, N, O)
    ncc = (wt5 * w0 * t0[:, :, None]).sum(dim=(-2, -1)) / (w_norm * t_norm[..., None]).clamp_min(1e-20)
    # is the point's own edge visible in the DRR? (template value at the centre vs its largest value)
    centre = tpl[..., L].mean(-1)
    edge_ratio = centre.abs() / tpl.mean(-2).abs().amax(-1).clamp_min(1e-20)

    # significance of the template and of the X-ray windows (relative to the batch element's typical level)
    base = mask & tpl_in.all(-1).all(-1)
    t_rms = t_norm / math.sqrt(cnt)
    w_rms = w_norm / math.sqrt(cnt)
    big = 2.0
    nan = torch.full_like(t_rms, float("nan"))
    t_ref = torch.nan_to_num(torch.nanmedian(torch.where(base, t_rms, nan), dim=1).values)
    w_ref = torch.nan_to_num(torch.nanmedian(torch.where(base, w_rms.median(-1).values, nan), dim=1).values)
    strong_t = t_rms > min_contrast * t_ref[:, None]
    ok_win = win_in & (w_rms > min_contrast * w_ref[:, None, None]) & (w_rms > 0)
    ok = base & strong_t & (edge_ratio >= min_edge_ratio)

    # polarity
    def best(c: torch.Tensor) -> torch.Tensor:
        return torch.where(ok_win, c, torch.full_like(c, -big)).max(-1).values

    if polarity == "same":
        inverted = torch.zeros(b, dtype=torch.bool, device=dev)
    elif polarity == "inverted":
        inverted = torch.ones(b, dtype=torch.bool, device=dev)
    else:
        bs, bi = best(ncc).clamp_min(0), best(-ncc).clamp_min(0)
        inverted = _masked_mean(bi, ok) > _masked_mean(bs, ok)
    ncc = torch.where(inverted[:, None, None], -ncc, ncc)

    c = torch.where(ok_win, ncc, torch.full_like(ncc, -2.0))
    cmax, k = c.max(-1)  # (B, N)
    o = c.shape[-1]
    interior = (k > 0) & (k < o - 1)
    km, kp = (k - 1).clamp_min(0), (k + 1).clamp_max(o - 1)
    cm = c.gather(-1, km[..., None])[..., 0]
    cp = c.gather(-1, kp[..., None])[..., 0]
    # neighbours must be valid windows too (otherwise the peak may be an artefact of the image border)
    interior &= (cm > -1.5) & (cp > -1.5)
    den = cm - 2 * cmax + cp
    delta = torch.where(den < -1e-12, 0.5 * (cm - cp) / torch.where(den < -1e-12, den, -torch.ones_like(den)),
                        torch.zeros_like(den)).clamp(-0.5, 0.5)
    offset = (k.to(dt) + delta - S) * step_px
    valid = ok & interior & (cmax >= min_ncc)
    ramp = (cmax - min_ncc) / max(1.0 - min_ncc, 1e-6)
    score = torch.where(valid, ramp.clamp(0.0, 1.0), torch.zeros_like(cmax))
    offset = torch.where(valid, offset, torch.zeros_like(offset))
    uv_m = uv_d + offset[..., None] * nrm
    return MatchResult(uv_m, score, valid, offset, inverted, nrm)


# ----------------------------------------------------------------------------- robust re-weighting


def robust_weights(residuals: torch.Tensor, valid: torch.Tensor | None = None, *, kind: str = "tukey",
                   c: float | None = None, scale: torch.Tensor | float | None = None,
                   min_scale: float = 0.5) -> torch.Tensor:
    """M-estimator weights of residuals (IRLS re-weighting of the PPC correspondences).

    Args:
        residuals: ``(B, N)`` scalar residuals or ``(B, N, D)`` vectors (their norms are used), e.g. the
            2D inconsistency of the matched displacement (pixels) or the PPC point-to-plane residual (mm).
        valid: ``(B, N)`` bool, the residuals that count (weights of the others are 0).
        kind: ``"tukey"`` (biweight, 0 beyond c*scale) or ``"huber"``.
        c: tuning constant in units of ``scale``; default 4.685 (Tukey) / 1.345 (Huber).
        scale: residual scale (same unit as the residuals); default 1.4826 * median absolute residual
            of the valid points per batch element, at least ``min_scale``.
        min_scale: lower bound of the automatic scale (keeps perfect matches from rejecting everything
            else).
    Returns:
        ``(B, N)`` weights in [0, 1].
    """
    r = torch.linalg.norm(residuals, dim=-1) if residuals.ndim == 3 else residuals.abs()
    if valid is None:
        valid = torch.isfinite(r)
    valid = valid & torch.isfinite(r)
    r = torch.where(valid, r, torch.zeros_like(r))
    if kind not in ("tukey", "huber"):
        raise InputError(f"kind must be 'tukey' or 'huber', got {kind!r}")
    if c is None:
        c = 4.685 if kind == "tukey" else 1.345
    if scale is None:
        med = torch.nanmedian(torch.where(valid, r, torch.full_like(r, float("nan"))), dim=1).values
        s = (1.4826 * torch.nan_to_num(med)).clamp_min(min_scale)[:, None]
    else:
        s = torch.as_tensor(scale, dtype=r.dtype, device=r.device)
        s = s.reshape(-1, 1) if s.ndim else s
    u = r / (c * s)
    if kind == "tukey":
        wts = torch.where(u < 1, (1 - u ** 2) ** 2, torch.zeros_like(u))
    else:
        wts = torch.where(u <= 1, torch.ones_like(u), 1.0 / u.clamp_min(1e-12))
    return torch.where(valid, wts, torch.zeros_like(wts))


def displacement_consistency(uv: torch.Tensor, displacement: torch.Tensor, valid: torch.Tensor,
                             k: int = 8) -> torch.Tensor:
    """How much each match disagrees with its neighbours (pixels).

    A rigid motion moves neighbouring contour points alike, so the normal component of a point's
    displacement should match that of the displacements of its ``k`` nearest valid neighbours.  The
    residual is ``|n_i . (d_i - median_j d_j)|`` where ``d`` are the 2D displacements and n_i the
    direction of d_i (or of the neighbours' median when d_i = 0).

    Args:
        uv: ``(B, N, 2)`` contour point positions (pixels).
        displacement: ``(B, N, 2)`` matched displacements p'_i - p_i (pixels).
        valid: ``(B, N)`` bool.
        k: neighbours.
    Returns:
        ``(B, N)`` residuals (pixels), ``inf`` where not valid or no valid neighbour exists.
    """
    b, n, _ = uv.shape
    if n == 0:
        return uv.new_zeros(b, 0)
    d = torch.cdist(uv.to(torch.float32), uv.to(torch.float32))  # (B, N, N)
    inf = float("inf")
    d = d.masked_fill(~valid[:, None, :], inf)
    d.diagonal(dim1=-2, dim2=-1).fill_(inf)
    kk = min(k, n - 1) if n > 1 else 0
    if kk == 0:
        return torch.full((b, n), inf, dtype=uv.dtype, device=uv.device)
    dist, idx = d.topk(kk, dim=-1, largest=False)  # (B, N, kk)
    nb_ok = torch.isfinite(dist)
    disp = displacement.to(torch.float32)
    nb = torch.gather(disp[:, None].expand(b, n, n, 2), 2, idx[..., None].expand(b, n, kk, 2))
    nb = torch.where(nb_ok[..., None], nb, torch.full_like(nb, float("nan")))
    med = torch.nanmedian(nb, dim=2).values  # (B, N, 2)
    di = disp
    dirn = torch.where(torch.linalg.norm(di, dim=-1, keepdim=True) > 1e-6, di, med)
    dirn = dirn / torch.linalg.norm(dirn, dim=-1, keepdim=True).clamp_min(1e-12)
    res = ((di - med) * dirn).sum(-1).abs()
    res = torch.where(valid & nb_ok.any(-1) & torch.isfinite(res), res, torch.full_like(res, inf))
    return res.to(uv.dtype)
