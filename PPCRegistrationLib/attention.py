"""The attention of the learned operator (docs/design.md §3): per-point features of the correspondences
(:func:`point_features`, :func:`match_evidence`) and the PointNet that turns them into PPC weights in (0, 1)
(:class:`PointNetAttention`).
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import InputError
from .flow_ops import _bilinear, correlation_displacements, robust_normalise

__all__ = ["PointNetAttention", "point_features", "match_evidence", "POINT_FEATURES", "EVIDENCE_FEATURES"]

#: number of channels produced by :func:`point_features` (without extra match features).
POINT_FEATURES = 14
#: number of channels produced by :func:`match_evidence` (the attention's local matching evidence).
EVIDENCE_FEATURES = 5


def _centred(x: torch.Tensor, m: torch.Tensor, centre: torch.Tensor | None = None) -> torch.Tensor:
    """``(x - centre) / r`` for points ``x (B, N, D)`` with weights ``m (B, N)`` (1 = valid, 0 = padding): ``centre``
    ``(B, D)`` defaults to the masked mean, ``r`` is the masked RMS distance from it (at least 1e-6)."""
    cnt = m.sum(1, keepdim=True).clamp_min(1.0)  # (B, 1)
    if centre is None:
        centre = (x * m[..., None]).sum(1) / cnt
    r = x - centre[:, None]
    rad = torch.sqrt(((r * r).sum(-1) * m).sum(1, keepdim=True) / cnt).clamp_min(1e-6)  # (B, 1)
    return r / rad[..., None]


def point_features(uv: torch.Tensor, uv_matched: torch.Tensor, points_3d: torch.Tensor, gradients_3d: torch.Tensor,
                   source: torch.Tensor, centre: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised per-point features for :class:`PointNetAttention` (``POINT_FEATURES`` = 14 channels).

    Channels: 2D position relative to the (masked) centroid of ``uv``, divided by the RMS radius (2);
    displacement ``uv_matched - uv`` in pixels / 10 (2); 3D position relative to ``centre`` divided by the RMS
    radius (3); unit 3D gradient (3); unit viewing ray from the source to the point (3); the cosine between
    gradient and ray (1).

    Args:
        uv: ``(B, N, 2)`` projected contour points p_i (pixels).
        uv_matched: ``(B, N, 2)`` matched positions p'_i (pixels).
        points_3d: ``(B, N, 3)`` contour points w_i (world, mm).
        gradients_3d: ``(B, N, 3)`` their 3D gradients g_i (any scale).
        source: ``(B, 3)`` X-ray source (world, mm).
        centre: ``(B, 3)`` contour centroid (mm); default the masked mean of ``points_3d``.
        mask: ``(B, N)`` bool, valid points (used for the centroids and radii); default all.
    Returns:
        ``(B, N, 14)`` features in ``points_3d``'s dtype (float32 recommended for the network).
    """
    dt = points_3d.dtype
    b, n, _ = points_3d.shape
    m = torch.ones(b, n, dtype=dt, device=points_3d.device) if mask is None else mask.to(dt)
    uv, uv_matched, gradients_3d = uv.to(dt), uv_matched.to(dt), gradients_3d.to(dt)
    source = source.to(dt)
    rel2 = _centred(uv, m)
    rel3 = _centred(points_3d, m, None if centre is None else centre.to(dt))
    disp = (uv_matched - uv) / 10.0
    g = gradients_3d / torch.linalg.norm(gradients_3d, dim=-1, keepdim=True).clamp_min(1e-12)
    ray = points_3d - source[:, None]
    ray = ray / torch.linalg.norm(ray, dim=-1, keepdim=True).clamp_min(1e-12)
    cos = (g * ray).sum(-1, keepdim=True)
    return torch.cat([rel2, disp, rel3, g, ray, cos], -1) * m[..., None]


def match_evidence(drr_grad: torch.Tensor, xray_grad: torch.Tensor, uv: torch.Tensor, uv_matched: torch.Tensor,
                   mask: torch.Tensor | None = None, patch_radius: int = 2) -> torch.Tensor:
    """Local matching evidence of each correspondence p_i -> p'_i (``EVIDENCE_FEATURES`` = 5 channels), for the
    attention: how well the images support it and how well it agrees with the other points' motion.

    Channels: cosine of the angle between the DRR gradient at p_i and the X-ray gradient at p'_i (signed: both
    images are attenuation-positive, so a bone edge keeps its polarity); log of the two gradient magnitudes
    (2; gradients divided by their image's robust scale, :func:`robust_normalise`); normalised cross-correlation of
    the two-channel gradient patches of ``2 * patch_radius + 1`` pixels around p_i and p'_i; and the distance of
    p'_i from the best 2D affine motion of all (masked) points' displacements, in pixels / 10 (large for a match
    that disagrees with the rest). Computed without gradients (evidence, not a path for training the flow).

    Args:
        drr_grad, xray_grad: ``(B, 2, H, W)`` gradient images (any scale), on the pixel grid of ``uv``.
        uv: ``(B, N, 2)`` points p_i in the DRR; uv_matched: ``(B, N, 2)`` matches p'_i in the X-ray (pixels).
        mask: ``(B, N)`` bool, valid points (the affine fit uses only these); default all.
        patch_radius: half-size of the correlation patches (pixels).
    Returns:
        ``(B, N, 5)`` in ``drr_grad``'s dtype; zero where masked.
    """
    with torch.no_grad():
        dt = drr_grad.dtype
        b, n, _ = uv.shape
        m = torch.ones(b, n, dtype=torch.bool, device=uv.device) if mask is None else mask.to(uv.device, torch.bool)
        mf = m.to(dt)
        d = robust_normalise(drr_grad)
        x = robust_normalise(xray_grad)
        uv, uv_matched = uv.to(dt), uv_matched.to(dt)
        off = correlation_displacements(int(patch_radius)).to(uv.device, dt)  # (P, 2), (0, 0) in the middle
        k = off.shape[0]
        pd = _bilinear(d, (uv[:, :, None] + off).reshape(b, n * k, 2)).reshape(b, n, k, 2)
        px = _bilinear(x, (uv_matched[:, :, None] + off).reshape(b, n * k, 2)).reshape(b, n, k, 2)
        gd, gx = pd[:, :, k // 2], px[:, :, k // 2]  # (B, N, 2) at the points themselves
        nd, nx = torch.linalg.norm(gd, dim=-1), torch.linalg.norm(gx, dim=-1)
        cos = (gd * gx).sum(-1) / (nd * nx).clamp_min(1e-6)
        a = pd.reshape(b, n, -1)
        c = px.reshape(b, n, -1)
        a = a - a.mean(-1, keepdim=True)
        c = c - c.mean(-1, keepdim=True)
        ncc = (a * c).sum(-1) / (torch.linalg.norm(a, dim=-1) * torch.linalg.norm(c, dim=-1)).clamp_min(1e-6)
        # the best affine map of the displacements over the valid points (centred, scaled coordinates)
        rel = _centred(uv, mf)
        design = torch.cat([rel, torch.ones_like(rel[..., :1])], -1)  # (B, N, 3)
        dw = design * mf[..., None]
        normal = dw.transpose(1, 2) @ design + 1e-3 * torch.eye(3, dtype=dt, device=uv.device)
        disp = uv_matched - uv
        coef = torch.linalg.solve(normal, dw.transpose(1, 2) @ disp)  # (B, 3, 2)
        resid = torch.linalg.norm(disp - design @ coef, dim=-1) / 10.0
        feats = torch.stack([cos, torch.log(nd + 0.05), torch.log(nx + 0.05), ncc, resid], -1)
        return feats * mf[..., None]


class PointNetAttention(nn.Module):
    """Per-point weights in (0, 1) from per-point features with a PointNet (shared MLP + global pooling).

    Args:
        in_features: F, channels of the input features (``POINT_FEATURES`` for :func:`point_features`).
        hidden: width of the shared per-point MLP.
        global_features: width of the per-point feature that is max- and mean-pooled.
    Attributes:
        hparams: the architecture hyper-parameters (stored in model files).
    """

    def __init__(self, in_features: int = POINT_FEATURES, hidden: int = 64, global_features: int = 128) -> None:
        super().__init__()
        self.hparams = {"in_features": int(in_features), "hidden": int(hidden),
                        "global_features": int(global_features)}
        self.local = nn.Sequential(nn.Linear(in_features, hidden), nn.LeakyReLU(0.1),
                                   nn.Linear(hidden, global_features), nn.LeakyReLU(0.1))
        self.head = nn.Sequential(nn.Linear(3 * global_features, hidden), nn.LeakyReLU(0.1),
                                  nn.Linear(hidden, hidden // 2), nn.LeakyReLU(0.1),
                                  nn.Linear(hidden // 2, 1))

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Weights of the points.

        Args:
            features: ``(B, N, F)`` per-point features.
            mask: ``(B, N)`` bool, False for padding: those points get weight 0 and are left out of pooling.
        Returns:
            ``(B, N)`` weights in (0, 1) (exactly 0 where masked).
        """
        if features.ndim != 3 or features.shape[-1] != self.hparams["in_features"]:
            raise InputError(f"PointNetAttention expects (B, N, {self.hparams['in_features']}) features, got "
                             f"{tuple(features.shape)}")
        p = next(self.parameters())
        x = features.to(p.dtype)
        b, n, _ = x.shape
        m = torch.ones(b, n, dtype=torch.bool, device=x.device) if mask is None else mask.to(x.device, torch.bool)
        h = self.local(x)  # (B, N, G)
        mf = m[..., None].to(h.dtype)
        hmax = torch.where(m[..., None], h, torch.full_like(h, -torch.inf)).amax(1)
        hmax = torch.where(torch.isfinite(hmax), hmax, torch.zeros_like(hmax))  # all points masked
        hmean = (h * mf).sum(1) / mf.sum(1).clamp_min(1.0)
        glob = torch.cat([hmax, hmean], -1)[:, None].expand(b, n, -1)
        logits = self.head(torch.cat([h, glob], -1))[..., 0]
        return torch.sigmoid(logits) * m.to(logits.dtype)

    def weigh(self, uv: torch.Tensor, uv_matched: torch.Tensor, points_3d: torch.Tensor, gradients_3d: torch.Tensor,
              source: torch.Tensor, centre: torch.Tensor | None = None,
              mask: torch.Tensor | None = None, extra: torch.Tensor | None = None) -> torch.Tensor:
        """Weights of correspondences: :func:`point_features` (computed in float64 on this network's device),
        followed by the ``extra`` per-point features ``(B, N, E)`` when given (e.g. :func:`match_evidence`), then
        :meth:`forward`. Arguments as :func:`point_features`; returns ``(B, N)`` on this network's device and
        dtype."""
        a = next(self.parameters())

        def f64(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.to(a.device, torch.float64)

        m = None if mask is None else mask.to(a.device)
        feats = point_features(f64(uv), f64(uv_matched), f64(points_3d), f64(gradients_3d), f64(source), f64(centre),
                               m)
        if extra is not None:
            feats = torch.cat([feats, f64(extra)], -1)
        return self(feats.to(a.dtype), m)
