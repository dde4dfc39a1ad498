"""Foreign objects out of an X-ray: harmonic inpainting of masked pixels (metal screws, wires, instruments).

Metal that is not in the pre-operative CT makes the strongest edges of an interventional X-ray; left in, they pull
the 2D matching and dominate the gradient similarity.  Given a mask of those pixels (painted by the user, found by
a detector, or in a test the simulator's own), :func:`inpaint` replaces them by the harmonic interpolation of
their surroundings (the solution of Laplace's equation with the unmasked pixels as boundary values, the classic
projection-domain metal trace interpolation), so that no edge of the object is left and every consumer of the image
(pre-alignment, matching, similarity, refinement, learned matchers) ignores it without knowing of a mask.
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage as ndi
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch

from .errors import InputError

__all__ = ["inpaint", "MASK_DILATION_PX"]

#: pixels added around a mask before inpainting (the detector's blur spreads an object's edge over ~2 pixels)
MASK_DILATION_PX = 2


def inpaint(image: torch.Tensor, mask: torch.Tensor, *, dilation_px: int = MASK_DILATION_PX) -> torch.Tensor:
    """A copy of ``image (H, W)`` with the pixels of ``mask (H, W)`` (bool, True = replace), grown by
    ``dilation_px``, replaced by the harmonic interpolation of the pixels around them.  The input is not modified.

    Each masked pixel is the mean of its four neighbours (one sparse linear solve over the masked pixels; the
    image border is a mirror).  An empty mask returns a copy.

    Raises:
        InputError: not 2D, a mask of another shape, or a mask that leaves no pixel to interpolate from.
    """
    if image.ndim != 2:
        raise InputError(f"inpainting needs a 2D X-ray, got shape {tuple(image.shape)}")
    if tuple(mask.shape) != tuple(image.shape):
        raise InputError(f"the mask {tuple(mask.shape)} must have the X-ray's shape {tuple(image.shape)}")
    m = mask.detach().cpu().numpy().astype(bool)
    if dilation_px > 0 and m.any():
        m = ndi.binary_dilation(m, iterations=int(dilation_px))
    if not m.any():
        return image.clone()
    if m.all():
        raise InputError("the mask covers the whole X-ray: nothing is left to register")
    x = image.detach().cpu().numpy().astype(np.float64)
    h, w = x.shape
    idx = -np.ones((h, w), dtype=np.int64)
    vv, uu = np.nonzero(m)
    n = vv.size
    idx[vv, uu] = np.arange(n)
    rows, cols, vals = [np.arange(n)], [np.arange(n)], [np.full(n, 4.0)]
    rhs = np.zeros(n)
    for dv, du in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        nv = np.abs(vv + dv)  # mirrored at the border
        nv = np.where(nv > h - 1, 2 * (h - 1) - nv, nv)
        nu = np.abs(uu + du)
        nu = np.where(nu > w - 1, 2 * (w - 1) - nu, nu)
        j = idx[nv, nu]
        inside = j >= 0
        rows.append(np.arange(n)[inside])
        cols.append(j[inside])
        vals.append(-np.ones(int(inside.sum())))
        rhs[~inside] += x[nv[~inside], nu[~inside]]
    A = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    out = x.copy()
    out[vv, uu] = spla.spsolve(A, rhs)
    return torch.from_numpy(out).to(image.dtype).to(image.device)
