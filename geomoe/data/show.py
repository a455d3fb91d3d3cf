"""``geomoe data show``: random training patches with their masks, titled by location."""

from __future__ import annotations

from pathlib import Path

from geomoe.data.datasets import Prepared, RandomPatchDataset
from geomoe.plots import overlay, patch_grid


def show_patches(prep: Prepared, out: str | Path, n: int = 12, seed: int = 0) -> Path:
    """Draw ``n`` random training patches (balanced over locations) with masks overlaid."""
    ds = RandomPatchDataset(prep, n, seed=seed, augment=False, min_valid=0.0)
    tiles, titles = [], []
    for i in range(n):
        d = ds[i]
        img, m, v = d["image"].numpy(), d["mask"].numpy(), d["valid"].numpy()
        tiles.append(overlay(img, m, v))
        loc = prep.locations[d["location"]]
        titles.append(f"{loc}  ({100 * m[v].mean() if v.any() else 0:.0f}% building)")
    return patch_grid(tiles, titles, out, cols=4, suptitle="training patches, buildings in red")
