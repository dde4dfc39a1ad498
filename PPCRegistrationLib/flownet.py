"""The flow network of the learned operator (docs/design.md §3): a small FlowNetC (shared encoder, correlation,
decoder, optional soft-argmax and PWC-Net-style refinement levels), and its flow averaged over mirrorings of the
detector (test-time augmentation).

The flow is defined on the DRR grid and points from the DRR to the X-ray, in pixels: a DRR pixel p corresponds to
the X-ray position ``p' = p + flow(p)`` (u = column, v = row, pixel centres at integers).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError
from .flow_ops import _resample_flow, _upsample_flow, correlation, correlation_displacements, robust_normalise, warp

__all__ = ["FlowNetC", "FlowRefinement", "mirror_averaged_flow", "MIRRORINGS"]


def _cosine_cost(f1: torch.Tensor, f2: torch.Tensor, max_disp: int) -> torch.Tensor:
    """Cost volume ``(B, D, h, w)`` of cosine similarities (channel order of :func:`correlation`)."""
    cos = correlation(F.normalize(f1, dim=1), F.normalize(f2, dim=1), max_disp)
    return cos * f1.shape[1]  # correlation() averages over channels: back to cosine similarity


def _expected_displacement(cost: torch.Tensor, log_temperature: torch.Tensor,
                           displacements: torch.Tensor) -> torch.Tensor:
    """Soft-argmax: expected displacement ``(B, 2, h, w)`` (feature pixels) under a softmax of a cost volume."""
    prob = torch.softmax(cost * log_temperature.exp(), 1)  # (B, D, h, w)
    return torch.einsum("bdhw,dc->bchw", prob, displacements.to(prob.dtype))


class FlowRefinement(nn.Module):
    """One finer level of the flow pyramid (as in PWC-Net): the X-ray features are warped by the flow of the
    coarser level, a local cost volume of ``+-max_disp`` pixels is built, and a small decoder plus the soft-argmax of
    that cost volume (of cosine similarities, the decoder's input too) give a residual flow.

    Args:
        channels: feature channels at this level; max_disp: local search range (pixels of this level);
        decoder_channels: widths of the decoder's hidden convolutions.
    """

    def __init__(self, channels: int, max_disp: int = 3, decoder_channels: tuple[int, ...] = (48, 32)) -> None:
        super().__init__()
        self.max_disp = int(max_disp)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(10.0)))
        self.register_buffer("displacements", correlation_displacements(self.max_disp).float(), persistent=False)
        cin = (2 * self.max_disp + 1) ** 2 + int(channels) + 2
        dec: list[nn.Module] = []
        for cout in decoder_channels:
            dec.append(_conv(cin, int(cout)))
            cin = int(cout)
        self.decoder = nn.Sequential(*dec)
        self.head = nn.Conv2d(cin, 2, 3, padding=1)
        nn.init.zeros_(self.head.bias)
        nn.init.normal_(self.head.weight, std=1e-3)

    def forward(self, f_drr: torch.Tensor, f_xray: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        """Refined flow ``(B, 2, h, w)`` (pixels of this level) from features ``(B, C, h, w)`` and the flow of the
        coarser level resampled to this grid."""
        cos = _cosine_cost(f_drr, warp(f_xray, flow), self.max_disp)
        residual = self.head(self.decoder(torch.cat([cos, f_drr, flow], 1)))
        residual = residual + _expected_displacement(cos, self.log_temperature, self.displacements)
        return flow + residual


def _conv(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation),
                         nn.LeakyReLU(0.1, inplace=True))


# ----------------------------------------------------------------------------- FlowNetC

class FlowNetC(nn.Module):
    """A small FlowNetC: shared encoder, correlation over ±``max_disp`` coarse pixels, convolutional decoder.

    Args:
        stride: 4, 8 or 16, the encoder's downsampling at the correlation level (each stage halves the
            resolution); 16 reaches four times as far as 4 with the same ``max_disp`` and sees more context.
        max_disp: correlation range d in coarse pixels (the full-resolution range is ``d * stride``).
        channels: feature channels of the encoder's last stage.
        decoder_channels: widths of the decoder's hidden convolutions.
        first_channels: width of the encoder's first (half-resolution) stage.
        soft_argmax: add to the decoder's output the soft-argmax of the cost volume of L2-normalised features
            (expected displacement under a softmax with a learned temperature), as cost-volume networks
            (PWC-Net, RAFT) do: the flow is then meaningful from the first iteration and the decoder learns a
            residual, which trains far faster on a CPU budget.
        refine_strides: finer pyramid levels that refine the flow after the correlation level, coarse to fine,
            each a stride of the encoder smaller than ``stride`` (8, 4 and/or 2): at each, the X-ray features are warped
            by the current flow and a local cost volume of ``+-refine_disp`` pixels corrects it
            (:class:`FlowRefinement`). Empty (the default): the flow is the correlation level's, upsampled.
        refine_disp: search range of the refinement levels (pixels of each level).
    Attributes:
        hparams: the architecture hyper-parameters (stored in model files).
    """

    def __init__(self, stride: int = 4, max_disp: int = 6, channels: int = 64,
                 decoder_channels: tuple[int, ...] = (128, 96, 64, 32), first_channels: int = 32,
                 soft_argmax: bool = False, refine_strides: tuple[int, ...] | list[int] = (),
                 refine_disp: int = 3) -> None:
        super().__init__()
        if stride not in (4, 8, 16):
            raise InputError(f"FlowNetC stride must be 4, 8 or 16, got {stride}")
        if max_disp < 1:
            raise InputError("FlowNetC max_disp must be >= 1")
        self.hparams = {"stride": int(stride), "max_disp": int(max_disp), "channels": int(channels),
                        "decoder_channels": [int(c) for c in decoder_channels],
                        "first_channels": int(first_channels), "soft_argmax": bool(soft_argmax)}
        refine = [int(r) for r in refine_strides]
        if any(r not in (2, 4, 8) or r >= stride for r in refine) or refine != sorted(set(refine), reverse=True):
            raise InputError(f"FlowNetC refine_strides must be distinct strides from (8, 4, 2), coarse to fine, each "
                             f"finer than stride {stride}; got {list(refine_strides)}")
        if refine:
            if refine_disp < 1:
                raise InputError("FlowNetC refine_disp must be >= 1")
            self.hparams.update(refine_strides=refine, refine_disp=int(refine_disp))
        self.refine_strides = refine
        self.soft_argmax = bool(soft_argmax)
        if self.soft_argmax:
            self.log_temperature = nn.Parameter(torch.tensor(math.log(10.0)))
            self.register_buffer("displacements", correlation_displacements(int(max_disp)).float(), persistent=False)
        self.stride = int(stride)
        self.max_disp = int(max_disp)
        c = int(channels)
        c0 = int(first_channels)
        layers = [_conv(2, c0, 2), _conv(c0, c0), _conv(c0, c, 2), _conv(c, c)]
        for _ in range({4: 0, 8: 1, 16: 2}[stride]):
            layers += [_conv(c, c, 2), _conv(c, c)]
        self.encoder = nn.Sequential(*layers)
        cin = (2 * self.max_disp + 1) ** 2 + c
        dec: list[nn.Module] = []
        for i, cout in enumerate(decoder_channels):
            dec.append(_conv(cin, int(cout), dilation=2 if i == 1 else 1))
            cin = int(cout)
        self.decoder = nn.Sequential(*dec)
        self.head = nn.Conv2d(cin, 2, 3, padding=1)
        nn.init.zeros_(self.head.bias)
        nn.init.normal_(self.head.weight, std=1e-3)
        # encoder layer after which each stride's features are ready: stride 2 -> layer 1, 4 -> 3, 8 -> 5, 16 -> 7
        self._tap = {2: 1, 4: 3, 8: 5, 16: 7}
        self.refinements = nn.ModuleList(FlowRefinement(c0 if r == 2 else c, int(refine_disp)) for r in refine)

    def _encode(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """Encoder features by stride: ``{stride: (B, C, H / stride, W / stride)}`` (the strides in use)."""
        want = {self.stride, *self.refine_strides}
        out: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.encoder):
            x = layer(x)
            for s_, tap in self._tap.items():
                if tap == i and s_ in want:
                    out[s_] = x
        return out

    def forward(self, xray_grad: torch.Tensor, drr_grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flow from the DRR to the X-ray.

        Args:
            xray_grad: ``(B, 2, H, W)`` gradient of the X-ray (any scale; normalised inside).
            drr_grad: ``(B, 2, H, W)`` gradient of the DRR on the same grid. Any H, W >= 2 (zero-padded to a
                multiple of the stride inside).
        Returns:
            ``flow`` ``(B, 2, H, W)`` in pixels (p' = p + flow(p), p a DRR pixel), and ``coarse`` flow
            ``(B, 2, ceil(H/s), ceil(W/s))`` in coarse pixels (full-resolution pixels / stride s), coarse pixel
            j sitting at full-resolution pixel ``s * j``.
        """
        if xray_grad.shape != drr_grad.shape or xray_grad.ndim != 4 or xray_grad.shape[1] != 2:
            raise InputError("FlowNetC needs two gradient images (B, 2, H, W) of equal shape, got "
                             f"{tuple(xray_grad.shape)} and {tuple(drr_grad.shape)}")
        p = next(self.parameters())
        x = robust_normalise(xray_grad.to(p.dtype))
        d = robust_normalise(drr_grad.to(p.dtype))
        _, _, h, w = x.shape
        s = self.stride
        ph, pw = (-h) % s, (-w) % s
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
            d = F.pad(d, (0, pw, 0, ph))
        feats = self._encode(torch.cat([d, x], 0))
        f_drr, f_xray = feats[s].chunk(2, 0)
        corr = F.leaky_relu(correlation(f_drr, f_xray, self.max_disp), 0.1)
        coarse = self.head(self.decoder(torch.cat([corr, f_drr], 1)))
        if self.soft_argmax:
            coarse = coarse + _expected_displacement(_cosine_cost(f_drr, f_xray, self.max_disp), self.log_temperature,
                                                     self.displacements)
        level, level_stride = coarse, s
        for r, refinement in zip(self.refine_strides, self.refinements):
            fd, fx = feats[r].chunk(2, 0)
            level = refinement(fd, fx, _resample_flow(level, level_stride, r, fd.shape[-2], fd.shape[-1]))
            level_stride = r
        flow = _upsample_flow(level, level_stride, h, w)
        return flow, coarse


# ----------------------------------------------------------------------------- mirror averaging

#: mirrorings averaged by :func:`mirror_averaged_flow`: (flip u, flip v) of each pass, in this order
MIRRORINGS = ((False, False), (True, True), (True, False), (False, True))


def _mirror_gradient(grad: torch.Tensor, flip_u: bool, flip_v: bool) -> torch.Tensor:
    """The gradient image ``(B, 2, H, W)`` (d/du, d/dv) of the mirrored image: mirrored, and the mirrored axes'
    components negated. Its own inverse."""
    dims = [d for d, f in ((3, flip_u), (2, flip_v)) if f]
    if not dims:
        return grad
    sign = grad.new_tensor([-1.0 if flip_u else 1.0, -1.0 if flip_v else 1.0]).view(1, 2, 1, 1)
    return grad.flip(dims) * sign


def mirror_averaged_flow(flow_net: "FlowNetC", xray_grad: torch.Tensor, drr_grad: torch.Tensor,
                         flips: int = 4) -> torch.Tensor:
    """Dense flow of ``flow_net`` averaged over mirrorings of the detector (test-time augmentation).

    The encoder samples its stride-s grid at pixels ``s * j``; mirroring a window of W pixels maps them to
    ``W - 1 - s * j``, another phase of the grid (for an even W, as the 128-pixel training windows, W - 1 is no
    multiple of s), so a network trained with mirrored samples keeps a bias of a few tenths of a pixel that changes
    sign with the mirror (measured on the chest validation samples, flows under 2 px: (-0.39, -0.24) px; mirrored
    left-right (+0.42, -0.31)). The mean over the mirrorings cancels it and averages out part of the noise
    (validation EPE 9.22 -> 8.46 px with four).

    Args:
        flow_net: a :class:`FlowNetC`.
        xray_grad, drr_grad: ``(B, 2, H, W)`` gradient images, as :meth:`FlowNetC.forward` takes them.
        flips: 1 (the network once), 2 (and its 180 degree rotation) or 4 (all four mirrorings).
    Returns:
        ``(B, 2, H, W)`` flow (pixels, p' = p + flow(p)), the mean of the un-mirrored flows of one batched pass.
    """
    if flips not in (1, 2, 4):
        raise InputError(f"flips must be 1, 2 or 4 (mirrorings averaged), got {flips}")
    if flips == 1:
        return flow_net(xray_grad, drr_grad)[0]
    b = xray_grad.shape[0]
    ways = MIRRORINGS[:flips]
    xs = torch.cat([_mirror_gradient(xray_grad, fu, fv) for fu, fv in ways])
    ds = torch.cat([_mirror_gradient(drr_grad, fu, fv) for fu, fv in ways])
    flow = flow_net(xs, ds)[0]  # a flow is a vector field: it mirrors as a gradient does
    return torch.stack([_mirror_gradient(f, fu, fv) for f, (fu, fv) in zip(flow.split(b), ways)]).mean(0)
