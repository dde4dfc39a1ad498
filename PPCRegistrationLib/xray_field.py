"""The exposed field of an X-ray: collimator shadows and burnt-in borders found and taken out of the registration.

A collimator blade or a black/white border band is a long straight edge that no DRR has; left in, it attracts the
2D matching and weighs in the gradient similarity.  :func:`detect_field` finds the rectangle inside the straight
steps across the image near its borders; :func:`fill_outside` replaces everything outside it by the nearest pixel
of the field (replication), so that no gradient crosses the field's edge and every consumer of the image
(pre-alignment, matching, similarity, refinement, learned matchers) ignores the outside without knowing of a mask.
"""

from __future__ import annotations

import torch

from .errors import InputError

__all__ = ["detect_field", "fill_outside", "field_mask"]


def _edge_from_start(x: torch.Tensor, limit: int, threshold: float) -> int:
    """The first field row when scanning ``x (H, W)`` from row 0: just after the strongest straight edge across
    the whole width (the median over the columns of the row-to-row step) within ``limit`` rows, or 0 if none
    exceeds ``threshold``."""
    if limit < 1:
        return 0
    step = (x[1:limit + 1] - x[:limit]).median(dim=1).values.abs()  # (limit,)
    k = int(step.argmax())
    return k + 1 if float(step[k]) > threshold else 0


def detect_field(image: torch.Tensor, *, threshold: float = 0.08,
                 max_fraction: float = 0.35) -> tuple[int, int, int, int]:
    """The exposed field ``(u0, v0, u1, v1)`` (pixels, end exclusive) inside collimator blades or border bands.

    On each side a blade's edge is a straight step across the whole image: the row (column) whose median step to
    the next, over all columns (rows), is the largest within ``max_fraction`` of the image from that side and
    larger than ``threshold`` times the image's 1-99 % range.  Anatomy, metal and wires are not straight across the
    whole image, so their median step is small.

    Args:
        image: ``(H, W)`` X-ray.
    Returns:
        the field box; the whole image when no blade is found.
    """
    if image.ndim != 2 or min(image.shape) < 8:
        raise InputError(f"the X-ray must be a 2D image of at least 8x8 pixels, got shape {tuple(image.shape)}")
    x = image.to(torch.float64)
    lo, hi = (float(v) for v in torch.quantile(x.flatten()[:: max(1, x.numel() // 200_000)],
                                               torch.tensor([0.01, 0.99], dtype=x.dtype)))
    thr = threshold * max(hi - lo, 1e-12)
    h, w = x.shape
    lh, lw = int(max_fraction * h), int(max_fraction * w)
    v0 = _edge_from_start(x, lh, thr)
    v1 = h - _edge_from_start(x.flip(0), lh, thr)
    u0 = _edge_from_start(x.T, lw, thr)
    u1 = w - _edge_from_start(x.T.flip(0), lw, thr)
    return u0, v0, u1, v1


def field_mask(shape: tuple[int, int], box: tuple[int, int, int, int]) -> torch.Tensor:
    """``(H, W)`` bool, True inside the field box ``(u0, v0, u1, v1)``."""
    h, w = shape
    u0, v0, u1, v1 = box
    m = torch.zeros(h, w, dtype=torch.bool)
    m[v0:v1, u0:u1] = True
    return m


def fill_outside(image: torch.Tensor, box: tuple[int, int, int, int], *, inset_px: int = 2) -> torch.Tensor:
    """A copy of ``image (H, W)`` whose pixels outside the field box take the value of the nearest field pixel.

    The sides where the box is inside the image (a blade) are moved in by ``inset_px`` to drop the blade's blurred
    edge; a box covering the whole image changes nothing.  The input is not modified."""
    h, w = image.shape
    u0, v0, u1, v1 = box
    u0, v0 = u0 + (inset_px if u0 > 0 else 0), v0 + (inset_px if v0 > 0 else 0)
    u1, v1 = u1 - (inset_px if u1 < w else 0), v1 - (inset_px if v1 < h else 0)
    if u1 - u0 < 4 or v1 - v0 < 4:
        raise InputError(f"the exposed field {box} is too small to register (fewer than 4 pixels across)")
    rows = torch.arange(h, device=image.device).clamp(v0, v1 - 1)
    cols = torch.arange(w, device=image.device).clamp(u0, u1 - 1)
    return image[rows][:, cols].clone()
