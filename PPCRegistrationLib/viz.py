"""Pictures for the command line: overlays of the DRR on the X-ray, correspondences coloured by weight, and the
initial-vs-final mTRE scatter plots of the evaluation (matplotlib, off-screen Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _structure(img: torch.Tensor, sigma_px: float = 6.0) -> np.ndarray:
    """High-pass ``(H, W)`` in [0, 1]: the image minus its Gaussian blur, so that two images of different
    contrast (X-ray and DRR) show the same structures at the same brightness."""
    from scipy import ndimage

    a = img.detach().double().cpu().numpy()
    hp = a - ndimage.gaussian_filter(a, sigma_px, mode="nearest")
    lo, hi = np.percentile(hp, [2, 98])
    return np.clip((hp - lo) / max(hi - lo, 1e-12), 0, 1)


def _gray(img: torch.Tensor) -> np.ndarray:
    a = img.detach().float().cpu().numpy()
    lo, hi = np.percentile(a, [1, 99.5])
    return np.clip((a - lo) / max(hi - lo, 1e-12), 0, 1)


def overlay_figure(path: str | Path, xray: torch.Tensor, drr_initial: torch.Tensor, drr_final: torch.Tensor,
                   uv: torch.Tensor | None = None, uv_matched: torch.Tensor | None = None,
                   weights: torch.Tensor | None = None, titles: Sequence[str] = ("initial", "registered"),
                   suptitle: str = "") -> Path:
    """Save a 3-panel PNG: colour fusions of the X-ray (magenta) and the DRR (green) at the initial and at the
    final estimate (grey where they agree), and the correspondences of one update (points p_i coloured by
    weight, vectors p_i -> p'_i).

    Args:
        xray: ``(H, W)`` image.  drr_initial, drr_final: ``(H, W)`` DRRs at the two estimates.
        uv, uv_matched: ``(N, 2)`` pixels (u, v); weights ``(N,)`` in [0, 1].
    """
    plt = _plt()
    from matplotlib.colors import LinearSegmentedColormap

    gray = _gray(xray)
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.4), dpi=100)
    for ax, drr, title in ((axes[0], drr_initial, titles[0]), (axes[1], drr_final, titles[1])):
        # colour fusion of the structures (high-pass): X-ray in magenta, DRR in green; aligned edges are grey,
        # misaligned ones show as magenta/green fringes
        x, d = _structure(xray), _structure(drr)
        ax.imshow(np.stack([x, d, x], -1), interpolation="bilinear")
        ax.set_title(f"{title}\nX-ray (magenta) + DRR (green)", fontsize=10)
        ax.axis("off")
    ax = axes[2]
    ax.imshow(gray, cmap="gray", interpolation="bilinear")
    if uv is not None and uv.numel():
        u = uv.detach().cpu().numpy()
        w = np.ones(len(u)) if weights is None else weights.detach().cpu().numpy()
        cmap = LinearSegmentedColormap.from_list("w", [(0.2, 0.2, 1.0), (1.0, 1.0, 0.0), (1.0, 0.1, 0.1)])
        if uv_matched is not None:
            m = uv_matched.detach().cpu().numpy()
            d = m - u
            ax.quiver(u[:, 0], u[:, 1], d[:, 0], d[:, 1], w, cmap=cmap, angles="xy", scale_units="xy", scale=1,
                      width=0.002, clim=(0, 1))
        sc = ax.scatter(u[:, 0], u[:, 1], c=w, cmap=cmap, s=5, vmin=0, vmax=1)
        fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.02, label="correspondence weight")
    ax.set_title("contour points p_i and matches p'_i")
    ax.axis("off")
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout(rect=(0, 0, 1, 0.94) if suptitle else None)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p)
    plt.close(fig)
    return p


def scatter_plot(path: str | Path, results: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                 ylabel: str = "mTRE after [mm]", title: str = "", max_columns: int = 4) -> Path:
    """Initial vs final mTRE, one panel per method (as Fig. 2 of the paper), all panels on the same axes.

    Cases whose error after the update lies above the axes (beyond the largest initial error or the 98th
    percentile of the errors after) are drawn on the top edge as red triangles, so that none disappears.

    Args:
        results: method name -> (initial mTRE list, final mTRE list), mm.
        max_columns: panels per row.
    """
    plt = _plt()
    n = max(1, len(results))
    cols = min(n, max(1, int(max_columns)))
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 4.4 * rows), dpi=100, squeeze=False)
    lim = 1.0
    for ini, fin in results.values():
        if len(ini):
            fin_f = np.asarray(fin, dtype=float)
            fin_f = fin_f[np.isfinite(fin_f)]
            lim = max(lim, float(np.nanmax(ini)), float(np.percentile(fin_f, 98)) if len(fin_f) else 0)
    top = lim * 1.02
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (name, (ini, fin)) in zip(axes.flat, results.items()):
        ini_a, fin_a = np.asarray(ini, dtype=float), np.asarray(fin, dtype=float)
        out = ~(fin_a <= top)  # above the axes, or not finite
        ax.scatter(ini_a[~out], fin_a[~out], s=8, alpha=0.6)
        if out.any():
            ax.scatter(ini_a[out], np.full(int(out.sum()), top * 0.985), marker="^", s=18, color="tab:red",
                       clip_on=False, label=f"{int(out.sum())} above {top:.0f} mm")
        ax.plot([0, lim], [0, lim], "k--", lw=0.8, label="no change")
        ax.axhline(2.0, color="g", lw=0.8, ls=":", label="2 mm")
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
        ax.set_aspect("equal", adjustable="box")
        ax.set_xlabel("initial mTRE [mm]")
        ax.set_ylabel(ylabel)
        med = float(np.nanmedian(fin_a)) if len(fin_a) else float("nan")
        ax.set_title(f"{name} (median {med:.2f} mm)")
        ax.legend(loc="upper left", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p)
    plt.close(fig)
    return p
