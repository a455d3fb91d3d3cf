"""Synthetic multi-location imagery for fast tests: places differ in ground, roofs, density and texture."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin

from geomoe.atomic import atomic_path


@dataclass(frozen=True)
class Look:
    ground: tuple[int, int, int]
    roof: tuple[int, int, int]
    buildings: int  # per 256x256
    size: tuple[int, int]  # building side range in pixels
    texture: float  # ground noise amplitude


LOOKS = [
    Look((70, 110, 55), (190, 60, 50), 6, (18, 40), 25.0),  # green suburb, red roofs, sparse
    Look((150, 125, 95), (200, 200, 205), 22, (8, 20), 12.0),  # dusty dense town, tin roofs
    Look((95, 95, 100), (60, 80, 160), 12, (12, 30), 40.0),  # grey city, blue roofs, rough texture
    Look((180, 170, 120), (120, 70, 40), 9, (10, 26), 8.0),  # arid, brown roofs
    Look((40, 70, 40), (230, 230, 230), 4, (20, 50), 30.0),  # forest, white roofs
]


def synth_tile(look: Look, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One (3, size, size) uint8 image and its {0, 1} mask."""
    noise = rng.normal(0, look.texture, (size // 8 + 1, size // 8 + 1, 3))
    noise = np.kron(noise, np.ones((8, 8, 1)))[:size, :size] + rng.normal(0, look.texture / 3, (size, size, 3))
    img = np.asarray(look.ground, np.float32) + noise
    mask = np.zeros((size, size), np.uint8)
    n = max(1, int(look.buildings * (size / 256) ** 2))
    for _ in range(n):
        h, w = rng.integers(*look.size, size=2)
        r, c = rng.integers(0, max(1, size - h)), rng.integers(0, max(1, size - w))
        shade = rng.uniform(0.85, 1.15)
        img[r:r + h, c:c + w] = np.asarray(look.roof, np.float32) * shade
        mask[r:r + h, c:c + w] = 1
    img = np.clip(img, 0, 255).astype(np.uint8).transpose(2, 0, 1)
    return img, mask


def write_geotiff(path: Path, data: np.ndarray, crs: str | None, transform, nodata=None) -> None:
    data = data if data.ndim == 3 else data[None]
    with atomic_path(path) as tmp:
        with rasterio.open(tmp, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                           dtype=data.dtype, crs=crs, transform=transform, nodata=nodata, compress="deflate") as ds:
            ds.write(data)


def make_synthetic(root: str | Path, n_locations: int = 3, scenes_per_location: int = 2, size: int = 256,
                   seed: int = 0, gsd: float = 0.5, mask_scale: int = 255) -> Path:
    """Write ``root/<loc_i>/images|masks/*.tif`` in UTM zone 33N, one look per location."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for li in range(n_locations):
        look = LOOKS[li % len(LOOKS)]
        loc = root / f"loc{li}"
        for si in range(scenes_per_location):
            img, mask = synth_tile(look, size, rng)
            t = from_origin(500000 + 10000 * li + size * gsd * si, 4000000, gsd, gsd)
            write_geotiff(loc / "images" / f"s{si}.tif", img, "EPSG:32633", t)
            write_geotiff(loc / "masks" / f"s{si}.tif", (mask * mask_scale).astype(np.uint8), "EPSG:32633", t)
    return root
