"""Pictures of a predicted scene: the prediction over the image, and which expert handled each tile."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
from rasterio.enums import Resampling

from geomoe.pipelines.outputs import Outputs
from geomoe.plots import plt, save_figure


def _read_small(path: Path, max_side: int, bands=None, resampling=Resampling.average) -> tuple[np.ndarray, float]:
    """The raster read straight to at most ``max_side`` pixels (from overviews when present)."""
    with rasterio.open(path) as ds:
        f = max(1.0, max(ds.width, ds.height) / max_side)
        shape = (int(ds.height / f), int(ds.width / f))
        idx = bands or list(range(1, ds.count + 1))
        return ds.read(idx, out_shape=(len(idx), *shape), resampling=resampling), f


def plot_scene(image: Path, outs: Outputs, out: Path, truth: Path | None = None, max_side: int = 1400) -> Path:
    """Left: image with predicted mask (red) and footprint outlines (yellow); right: routing map."""
    with rasterio.open(image) as ds:
        bands = [1, 2, 3] if ds.count >= 3 else [1, 1, 1]
        transform = ds.transform
    rgb, f = _read_small(image, max_side, bands)
    mask, _ = _read_small(outs.mask, max_side, [1], Resampling.nearest)
    m = mask[0] == 1
    pic = np.transpose(rgb, (1, 2, 0)).astype(np.float32)
    pic[m] = 0.55 * pic[m] + 0.45 * np.array([255, 40, 40])
    fig, axes = plt.subplots(1, 2, figsize=(16, 8 * pic.shape[0] / pic.shape[1] + 0.6))
    inv = ~(transform * rasterio.Affine.scale(f))

    def to_px(g):
        xs, ys = g.exterior.xy
        cols, rows = inv * (np.asarray(xs), np.asarray(ys))
        return cols, rows

    axes[0].imshow(pic.clip(0, 255).astype(np.uint8))
    fp = gpd.read_file(outs.footprints)
    for geom in fp.geometry:
        for poly in getattr(geom, "geoms", [geom]):
            c, r = to_px(poly)
            axes[0].plot(c, r, color="yellow", lw=0.7)
    title = f"{image.name}: prediction (red), {len(fp)} footprints (yellow)"
    if truth is not None:
        tm, _ = _read_small(truth, max_side, [1], Resampling.nearest)
        t, v = tm[0] > 0, mask[0] != 255
        inter, union = (t & m & v).sum(), ((t | m) & v).sum()
        title += f"\nIoU against the truth mask: {inter / union:.3f}" if union else ""
    axes[0].set_title(title, fontsize=10)
    axes[1].imshow(np.transpose(rgb, (1, 2, 0)))
    routing = gpd.read_file(outs.routing)
    k = int(routing.expert.max()) + 1 if len(routing) else 1
    unfamiliar = routing["unfamiliar"].astype(bool) if "unfamiliar" in routing else np.zeros(len(routing), bool)
    for (_, row), odd in zip(routing.iterrows(), unfamiliar):
        c, r = to_px(row.geometry)
        axes[1].fill(c, r, color=plt.cm.tab10(int(row.expert) % 10), alpha=0.35, lw=0)
        if odd:  # unlike the training data: hatched and outlined in black
            axes[1].fill(c, r, fill=False, hatch="xx", edgecolor="black", lw=0.8)
    for e in range(k):
        ran = set(routing.loc[routing.expert == e, "ran"]) if "ran" in routing else set()
        # a region served by the single network (chosen on validation) says so
        label = f"region {e}: single network" if ran == {"single network"} else f"expert {e}"
        axes[1].plot([], [], "s", color=plt.cm.tab10(e % 10), label=label)
    if unfamiliar.any():
        axes[1].fill([], [], fill=False, hatch="xx", edgecolor="black", label="unfamiliar tile")
    axes[1].legend(loc="upper right", fontsize=9)
    axes[1].set_title(f"routing: the expert that handled each tile; {int(unfamiliar.sum())} of {len(routing)} tiles "
                      f"unfamiliar", fontsize=10)
    for ax in axes:
        ax.axis("off")
    return save_figure(fig, out, dpi=100)
