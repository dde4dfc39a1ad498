"""The learned normal matcher (docs/design.md §5.4): for every projected contour point, how far its edge moved along
the point's 2D normal, and how much to trust that, learned from gradient profiles of the DRR and the X-ray.

The PPC constraint uses nothing of a correspondence but its component along the 2D normal (the plane through the
ray contains the contour's tangent), so the network predicts only that displacement.  Per point it sees ``profiles``
parallel profiles (1 network px apart) of both gradient images, sampled along the normal: the DRR's over
``±half_px`` (the point's own edge, the template), the X-ray's over ``±(half_px + search_px)``.  Two 1D encoders
turn them into features, a cosine cost volume over the displacements ``-search_px .. search_px`` (with the raw
normalised cross-correlation beside it) goes through a 1D CNN to one logit per displacement, and a local soft-argmax
gives a sub-pixel displacement.  A PointNet over the matching evidence of all points (peak probability, entropy,
cost, contrast) gives each point its weight in [0, 1], trained through the PPC solve.

Profiles are sampled in *network pixels* (``pixel_mm`` of the detector the model was trained on); a registration on
a finer detector samples them ``pixel_mm / its pixel`` window pixels apart.  Device-agnostic, batched over points.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError
from .gradients import image_gradient

__all__ = ["NormalMatcherNet", "NormalMatcher", "gradient_profiles", "NORMAL_HPARAMS", "NORMAL_METHOD"]

#: the method name of the learned operator that runs alone (docs/design.md §5.4)
NORMAL_METHOD = "learned"
#: default architecture: 12 px template, ±24 px search, 5 profiles, 16 features (about 27 k parameters)
NORMAL_HPARAMS = {"half_px": 12, "search_px": 24, "profiles": 5, "features": 16, "hidden": 32,
                  "sigma_px": 1.5, "pixel_mm": 380.0 / 256}
#: the evidence each point's weight is computed from (one row per point, see :meth:`NormalMatcherNet.evidence`)
EVIDENCE = ("peak probability", "entropy", "peak cost", "peak NCC", "|displacement| / search",
            "log DRR contrast", "log X-ray contrast")
_LOCAL = 3  # the soft-argmax looks at ±3 bins around the most likely displacement


def gradient_profiles(grad: torch.Tensor, uv: torch.Tensor, normals: torch.Tensor, offsets: torch.Tensor,
                      lateral: torch.Tensor) -> torch.Tensor:
    """Profiles of a gradient image along each point's normal.

    Args:
        grad: ``(1, 2, h, w)`` image gradient (channel 0 d/du, 1 d/dv).
        uv: ``(N, 2)`` points (window px); normals: ``(N, 2)`` unit 2D normals.
        offsets: ``(L,)`` positions along the normal (window px); lateral: ``(P,)`` along the tangent (window px).
    Returns:
        ``(N, 2P, L)``: the gradient's component along the normal (first P channels) and along the tangent (next
        P), sampled bilinearly; 0 outside the image.  Differentiable in ``uv`` and ``normals``.
    """
    n = normals.to(grad.dtype)
    t = torch.stack([-n[:, 1], n[:, 0]], -1)
    N, P, L = uv.shape[0], lateral.numel(), offsets.numel()
    pos = (uv.to(grad.dtype)[:, None, None, :] + lateral.to(grad.dtype)[None, :, None, None] * t[:, None, None, :]
           + offsets.to(grad.dtype)[None, None, :, None] * n[:, None, None, :])  # (N, P, L, 2)
    h, w = grad.shape[-2:]
    grid = torch.stack([pos[..., 0] / max(w - 1, 1) * 2 - 1, pos[..., 1] / max(h - 1, 1) * 2 - 1], -1)
    s = F.grid_sample(grad, grid.reshape(1, N * P, L, 2), mode="bilinear", padding_mode="zeros",
                      align_corners=True).reshape(2, N, P, L)
    gn = s[0] * n[:, 0, None, None] + s[1] * n[:, 1, None, None]
    gt = s[0] * t[:, 0, None, None] + s[1] * t[:, 1, None, None]
    return torch.cat([gn, gt], 1)


def _encoder(c_in: int, hidden: int, features: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(c_in, hidden, 5, padding=2), nn.ReLU(),
                         nn.Conv1d(hidden, hidden, 5, padding=2), nn.ReLU(),
                         nn.Conv1d(hidden, features, 3, padding=1))


class NormalMatcherNet(nn.Module):
    """The network of the learned normal matcher (module docstring).

    Args:
        half_px: template half-length (network px); search_px: displacements ``-search_px .. search_px``.
        profiles: parallel profiles per point; features: encoder features; hidden: hidden channels.
        sigma_px: gradient smoothing (network px); pixel_mm: detector pixel (mm) of the network grid.
    """

    def __init__(self, half_px: int = 12, search_px: int = 24, profiles: int = 5, features: int = 16,
                 hidden: int = 32, sigma_px: float = 1.5, pixel_mm: float = 380.0 / 256) -> None:
        super().__init__()
        if half_px < 2 or search_px < 2 or profiles < 1 or features < 1 or hidden < 1:
            raise InputError("NormalMatcherNet needs half_px, search_px >= 2 and profiles, features, hidden >= 1")
        if not (sigma_px > 0 and pixel_mm > 0):
            raise InputError("NormalMatcherNet needs sigma_px > 0 and pixel_mm > 0")
        self.hparams = {"half_px": int(half_px), "search_px": int(search_px), "profiles": int(profiles),
                        "features": int(features), "hidden": int(hidden), "sigma_px": float(sigma_px),
                        "pixel_mm": float(pixel_mm)}
        self.half, self.search, self.profiles = int(half_px), int(search_px), int(profiles)
        c_in = 2 * self.profiles
        self.enc_drr = _encoder(c_in, hidden, features)
        self.enc_xray = _encoder(c_in, hidden, features)
        s = torch.arange(-self.half, self.half + 1, dtype=torch.float32)
        self.register_buffer("taper", torch.exp(-0.5 * (s / (self.half / 2)) ** 2), persistent=False)
        self.register_buffer("displacements", torch.arange(-self.search, self.search + 1, dtype=torch.float32),
                             persistent=False)
        self.cost_head = nn.Sequential(nn.Conv1d(2, hidden, 5, padding=2), nn.ReLU(),
                                       nn.Conv1d(hidden, hidden, 5, padding=4, dilation=2), nn.ReLU(),
                                       nn.Conv1d(hidden, 1, 3, padding=1))
        k = len(EVIDENCE)
        self.point_mlp = nn.Sequential(nn.Linear(k, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.weight_head = nn.Sequential(nn.Linear(32 + 64, 32), nn.ReLU(), nn.Linear(32, 1))

    @property
    def method(self) -> str:
        return NORMAL_METHOD

    @property
    def template_offsets(self) -> torch.Tensor:
        return torch.arange(-self.half, self.half + 1, dtype=torch.float32)

    @property
    def search_offsets(self) -> torch.Tensor:
        r = self.half + self.search
        return torch.arange(-r, r + 1, dtype=torch.float32)

    @property
    def lateral_offsets(self) -> torch.Tensor:
        return torch.arange(self.profiles, dtype=torch.float32) - (self.profiles - 1) / 2

    @staticmethod
    def _normalise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rms = x.pow(2).mean((1, 2), keepdim=True).add(1e-12).sqrt()
        return x / rms, rms.flatten()

    def _windows(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, Lx)`` -> ``(N, C, D, Lt)``: the template-long windows of each displacement."""
        return x.unfold(2, 2 * self.half + 1, 1)

    def forward(self, drr_prof: torch.Tensor, xray_prof: torch.Tensor, mask: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        """Displacements along the normals and weights for ``N`` points.

        Args:
            drr_prof: ``(N, 2P, 2 half + 1)`` DRR gradient profiles (the template).
            xray_prof: ``(N, 2P, 2 (half + search) + 1)`` X-ray gradient profiles.
            mask: ``(N,)`` bool, points that take part (the weights' PointNet pools over them only).
        Returns:
            ``logits (N, D)`` over the displacements ``-search .. search`` (network px), ``displacement (N,)``
            (network px, local soft-argmax), ``weight (N,)`` in [0, 1], ``evidence (N, 7)`` (:data:`EVIDENCE`).
        """
        N = drr_prof.shape[0]
        dev = drr_prof.device
        if mask is None:
            mask = torch.ones(N, dtype=torch.bool, device=dev)
        d_in, d_rms = self._normalise(drr_prof.float())
        x_in, x_rms = self._normalise(xray_prof.float())
        fd = F.normalize(self.enc_drr(d_in), dim=1) * self.taper           # (N, F, Lt)
        fx = F.normalize(self.enc_xray(x_in), dim=1)                       # (N, F, Lx)
        cost = torch.einsum("nfs,nfds->nd", fd, self._windows(fx)) / self.taper.sum()  # (N, D)
        # the raw normalised cross-correlation of the tapered profiles (the classic matcher's score)
        tw = d_in * self.taper
        xw = self._windows(x_in)                                           # (N, C, D, Lt)
        xw = xw - xw.mean((1, 3), keepdim=True)
        tw = tw - tw.mean((1, 2), keepdim=True)
        ncc = torch.einsum("ncs,ncds->nd", tw, xw) / (
            tw.pow(2).sum((1, 2)).add(1e-9).sqrt()[:, None] * xw.pow(2).sum((1, 3)).add(1e-9).sqrt())
        logits = self.cost_head(torch.stack([cost, ncc], 1))[:, 0]         # (N, D)
        prob = logits.softmax(-1)
        D = logits.shape[1]
        j = logits.detach().argmax(-1)
        idx = (j[:, None] + torch.arange(-_LOCAL, _LOCAL + 1, device=dev)).clamp(0, D - 1)
        local = torch.gather(logits, 1, idx).softmax(-1)
        disp = (local * self.displacements[idx]).sum(-1)
        entropy = -(prob * prob.clamp_min(1e-12).log()).sum(-1) / math.log(D)
        peak = torch.gather(prob, 1, idx).sum(-1)
        ev = torch.stack([peak, entropy, cost.gather(1, j[:, None])[:, 0], ncc.gather(1, j[:, None])[:, 0],
                          disp.abs() / self.search, d_rms.log() - d_rms.log()[mask].mean() if mask.any()
                          else d_rms.log(), x_rms.log() - x_rms.log()[mask].mean() if mask.any()
                          else x_rms.log()], -1)
        h = self.point_mlp(ev.detach())
        m = mask.to(h.dtype)[:, None]
        if bool(mask.any()):
            g_max = (h - 1e4 * (1 - m)).max(0).values
            g_mean = (h * m).sum(0) / m.sum()
        else:
            g_max = g_mean = h.new_zeros(h.shape[1])
        weight = torch.sigmoid(self.weight_head(torch.cat([h, g_max.expand_as(h), g_mean.expand_as(h)], -1)))[:, 0]
        return {"logits": logits, "displacement": disp, "weight": weight * mask.to(weight.dtype), "evidence": ev}

    def profiles_at(self, drr: torch.Tensor, xray: torch.Tensor, uv: torch.Tensor, normals: torch.Tensor,
                    factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The network's inputs from a DRR and an X-ray window ``(h, w)`` (or ``(1, h, w)``) at points ``uv (N, 2)``
        (window px) with unit normals ``(N, 2)``; ``factor`` = network pixel / window pixel.  Returns the DRR and
        X-ray profiles and ``inside (N,)``: the point's whole search profile lies in the window."""
        if drr.shape[-2:] != xray.shape[-2:]:
            raise InputError(f"the DRR and X-ray windows differ in size: {tuple(drr.shape)} vs {tuple(xray.shape)}")
        imgs = torch.stack([drr.reshape(drr.shape[-2:]), xray.reshape(xray.shape[-2:])]).float()
        g = image_gradient(imgs, sigma_px=self.hparams["sigma_px"] * factor)  # (2, 2, h, w)
        dev = g.device
        lat = self.lateral_offsets.to(dev) * factor
        dp = gradient_profiles(g[0:1], uv, normals, self.template_offsets.to(dev) * factor, lat)
        xp = gradient_profiles(g[1:2], uv, normals, self.search_offsets.to(dev) * factor, lat)
        h, w = g.shape[-2:]
        reach = (self.half + self.search) * factor
        ends = torch.stack([uv - reach * normals, uv + reach * normals], 0)
        inside = ((ends[..., 0] >= 0) & (ends[..., 0] <= w - 1) & (ends[..., 1] >= 0)
                  & (ends[..., 1] <= h - 1)).all(0)
        # a point may reach outside the window on its far side and still match: keep it if its centre is inside
        centre_in = (uv[:, 0] >= 1) & (uv[:, 0] <= w - 2) & (uv[:, 1] >= 1) & (uv[:, 1] <= h - 2)
        return dp, xp, inside | centre_in

    def factor_for(self, pixel_spacing_mm: float | None) -> float:
        """Network pixel / window pixel for a detector of ``pixel_spacing_mm`` (1 when unknown)."""
        if pixel_spacing_mm is None or not pixel_spacing_mm > 0:
            return 1.0
        return self.hparams["pixel_mm"] / float(pixel_spacing_mm)

    def match(self, drr: torch.Tensor, xray: torch.Tensor, uv: torch.Tensor, normals: torch.Tensor,
              mask: torch.Tensor, pixel_spacing_mm: float | None = None) -> dict[str, torch.Tensor]:
        """One matching of ``N`` points ``uv (N, 2)`` (window px), normals ``(N, 2)``, ``mask (N,)``: the
        :meth:`forward` outputs plus ``uv_matched (N, 2)`` (window px) and the ``factor`` used."""
        f = self.factor_for(pixel_spacing_mm)
        n = normals.to(torch.float32)
        dp, xp, inside = self.profiles_at(drr, xray, uv.float(), n, f)
        m = mask.to(torch.bool) & inside & (n.norm(dim=-1) > 0.5)
        out = self.forward(dp, xp, m)
        out["uv_matched"] = uv.float() + (out["displacement"] * f)[:, None] * n
        out["mask"] = m
        out["factor"] = torch.tensor(f)
        return out


class NormalMatcher:
    """The learned normal matcher as a :class:`~PPCRegistrationLib.matchers.Matcher` of the update operator.

    It computes its own gradients from the DRR and X-ray windows (as in training) and ignores the loop's search
    range (the network was trained over its whole range).  The last matching's evidence and weights are kept in
    ``last`` for inspection (what the weights weight).
    """

    def __init__(self, net: NormalMatcherNet, *, enable_grad: bool = False) -> None:
        if not isinstance(net, NormalMatcherNet):
            raise InputError(f"NormalMatcher needs a NormalMatcherNet, got {type(net).__name__}")
        self.net = net
        self.enable_grad = enable_grad
        self.last: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}

    @property
    def method(self) -> str:
        return NORMAL_METHOD

    def __call__(self, drr, xray, drr_grad, xray_grad, uv, normals, mask, search_px, context):
        if drr is None or xray is None or normals is None:
            raise InputError("the learned normal matcher needs the DRR and X-ray windows and the points' normals")
        dev = next(self.net.parameters()).device
        with torch.set_grad_enabled(self.enable_grad and torch.is_grad_enabled()):
            out = self.net.match(drr.to(dev), xray.to(dev), uv[0].to(dev), normals[0].to(dev), mask[0].to(dev),
                                 (context or {}).get("pixel_spacing_mm"))
        self.outputs = out  # in the autograd graph when enable_grad (training reads the logits from here)
        self.last = {k: v.detach() for k, v in out.items()}
        uv_m = out["uv_matched"].to(uv.device, uv.dtype)[None]
        return uv_m, out["weight"].to(uv.device, uv.dtype)[None]
