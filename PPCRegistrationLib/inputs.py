"""Checks of a registration's inputs (docs/design.md §4.6: bad input gets a clear error): the X-ray against its
C-arm geometry, and rigid transforms.  Each returns the checked value; nothing given is modified."""

from __future__ import annotations

import torch

from .errors import InputError
from .geometry import Projection

__all__ = ["checked_xray", "checked_rigid"]


def checked_xray(xray, projection: Projection) -> torch.Tensor:
    """The X-ray as an ``(H, W)`` tensor (a ``(1, H, W)`` or ``(H, W, 1)`` image is squeezed).

    Raises:
        InputError: not 2D, NaN or infinite pixels, a constant image, a batch of geometries, or a detector of
            another size than the image.
    """
    xray = torch.as_tensor(xray)
    if xray.ndim == 3 and 1 in (xray.shape[0], xray.shape[-1]):
        xray = xray.reshape(xray.shape[1:] if xray.shape[0] == 1 else xray.shape[:-1])
    if xray.ndim != 2:
        raise InputError(f"the X-ray must be a 2D image (H, W), got shape {tuple(xray.shape)}")
    if not torch.isfinite(xray).all():
        raise InputError("the X-ray image contains NaN or infinite pixels")
    if float(xray.max() - xray.min()) <= 0:
        raise InputError("the X-ray image is constant: nothing to register to")
    if projection.batch != 1:
        raise InputError("the registration takes one C-arm geometry (batch 1)")
    if (projection.height, projection.width) != tuple(xray.shape):
        raise InputError(f"the X-ray is {tuple(xray.shape)} pixels but the geometry's detector is "
                         f"{(projection.height, projection.width)} (rows, columns)")
    return xray


def checked_rigid(T, name: str) -> torch.Tensor:
    """``T`` as a float64 ``(4, 4)`` tensor after checking that it is a finite rigid transform (no reflection).

    Raises:
        InputError: another shape, NaN or infinite values, a rotation that is not orthonormal, or a bad last row;
            the message names the transform (``name``).
    """
    T = torch.as_tensor(T, dtype=torch.float64)
    if T.shape != (4, 4):
        raise InputError(f"the {name} must be a 4x4 matrix, got shape {tuple(T.shape)}")
    if not torch.isfinite(T).all():
        raise InputError(f"the {name} contains NaN or infinite values")
    r = T[:3, :3]
    err = float((r.T @ r - torch.eye(3, dtype=T.dtype, device=T.device)).abs().max())
    if err > 1e-4 or float(torch.linalg.det(r)) < 0 or float((T[3] - T.new_tensor([0, 0, 0, 1])).abs().max()) > 1e-9:
        raise InputError(f"the {name} is not rigid (rotation not orthonormal, a reflection, or a bad last row); "
                         "registration needs a rigid transform")
    return T
