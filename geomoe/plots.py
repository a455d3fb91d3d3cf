"""Pictures a person would rather look at than numbers: patches with masks, curves, grids."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from geomoe.atomic import atomic_path  # noqa: E402


def overlay(image: np.ndarray, mask: np.ndarray | None, valid: np.ndarray | None = None,
            color=(255, 40, 40), alpha: float = 0.45) -> np.ndarray:
    """HWC uint8 picture of a CHW image with the mask tinted on top and invalid pixels hatched grey."""
    rgb = np.transpose(image[:3], (1, 2, 0)).astype(np.float32)
    if mask is not None:
        m = mask.astype(bool)
        rgb[m] = (1 - alpha) * rgb[m] + alpha * np.array(color, np.float32)
    if valid is not None:
        rgb[~valid] = 90
    return rgb.clip(0, 255).astype(np.uint8)


def save_figure(fig, out: str | Path, dpi: int = 110) -> Path:
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return out


def patch_grid(tiles: list[np.ndarray], titles: list[str], out: str | Path, cols: int = 4, suptitle: str = "") -> Path:
    """Save HWC tiles in a titled grid."""
    rows = max(1, -(-len(tiles) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, t, title in zip(axes.flat, tiles, titles):
        ax.imshow(t)
        ax.set_title(title, fontsize=9)
    if suptitle:
        fig.suptitle(suptitle)
    return save_figure(fig, out)


def line_plot(x, ys: dict[str, list[float]], out: str | Path, xlabel: str, ylabel: str, logx: bool = False,
              title: str = "", mark_x: float | None = None) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, y in ys.items():
        ax.plot(x, y, label=name)
    if logx:
        ax.set_xscale("log")
    if mark_x is not None:
        ax.axvline(mark_x, color="k", ls="--", lw=1, label=f"suggested {mark_x:.1e}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    return save_figure(fig, out)
