"""The tile source of prediction: reads each tile's window and its valid mask once, and yields tile rows.

A tile row's tiles are resampled to what the model sees (bands, bit depth and GSD as in training) and completed
from their nearest valid pixel; each tile's valid mask at the raster's own resolution goes along, so blending knows
which output pixels hold data without reading the mask again. Reader threads each hold their own GDAL handle
(a handle is not safe to share between threads).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.enums import Resampling
from rasterio.windows import Window

from geomoe.config import PredictConfig
from geomoe.data.catalog import gsd_near
from geomoe.pipelines.background import read_ahead
from geomoe.pipelines.tiling import TileGrid
from geomoe.raster import (bit_depth, fill_invalid, grid_of, ground_sampling_distance, image_bands, open_raster,
                           read_window, scale_for, to_uint8, valid_window_mask)


@dataclass
class TileRow:
    """The tiles of one tile row that hold any valid pixel."""

    iy: int
    cols: list[int]  # their columns in the grid
    tiles: torch.Tensor | None  # uint8 (n, bands, T, T) as the model sees them; None when no tile has data
    valid: list[np.ndarray]  # per tile, bool (h, w) at the raster's resolution, cropped to the raster
    empty: int = 0  # tiles of the row without any valid pixel (not read further, not predicted)


@dataclass
class TileSource:
    """A scene's tiles at the model's tile size, a row of the tile grid at a time."""

    path: Path
    ds: rasterio.DatasetReader  # the caller's handle; reader threads open their own
    bands: list[int]
    alpha: int | None
    grid: TileGrid
    T: int  # tile size the model sees
    t_src: int  # the same tile in source pixels
    use_alpha: bool = True  # the bundle's data.alpha: "mask" (transparent pixels are nodata) or "drop"
    top: float = 255.0  # the largest value of the imagery's bit depth, scaled to 255 as in training
    pin: bool = False  # page-locked tiles, so copies to a GPU run asynchronously
    gsd: float | None = None  # the raster's ground resolution (m/pixel; None: unknown)
    model_gsd: float | None = None  # the resolution the model runs at (the raster is resampled to it)
    _local: threading.local = field(default_factory=threading.local, repr=False)
    _opened: list = field(default_factory=list, repr=False)
    _owner: int = field(default_factory=threading.get_ident, repr=False)

    def _handle(self) -> rasterio.DatasetReader:
        if threading.get_ident() == self._owner:
            return self.ds
        ds = getattr(self._local, "ds", None)
        if ds is None:
            ds = self._local.ds = open_raster(self.path)
            self._opened.append(ds)
        return ds

    def close(self) -> None:
        """Close the reader threads' handles (the caller's stays open)."""
        for ds in self._opened:
            ds.close()
        self._opened.clear()

    def _model_mask(self, valid: np.ndarray) -> np.ndarray:
        """The valid mask at the model's tile size, picked from the source-resolution one as GDAL's nearest does
        (the source pixel under each output pixel's centre)."""
        if self.t_src == self.T:
            return valid
        idx = np.minimum(((np.arange(self.T) + 0.5) * self.t_src / self.T).astype(int), self.t_src - 1)
        return valid[np.ix_(idx, idx)]

    def read_row(self, iy: int, cols: list[int] | None = None) -> TileRow:
        """Tile row ``iy`` (or only its columns ``cols``)."""
        ds = self._handle()
        y0 = int(self.grid.ys[iy])
        tiles, keep, masks = [], [], []
        h = min(self.t_src, self.grid.height - y0)
        cols = list(range(len(self.grid.xs))) if cols is None else cols
        for ix in cols:
            x0 = int(self.grid.xs[ix])
            win = Window(x0, y0, self.t_src, self.t_src)
            valid = valid_window_mask(ds, win, (self.t_src, self.t_src), self.alpha, self.use_alpha)
            if not valid.any():
                continue
            rs = Resampling.bilinear if self.t_src != self.T else Resampling.nearest
            # completed as in training (nearest valid pixel), never a black frame at edges and nodata borders
            raw = read_window(ds, self.bands, win, (self.T, self.T), rs)
            tiles.append(fill_invalid(to_uint8(raw, self.top), self._model_mask(valid)))
            keep.append(ix)
            masks.append(valid[:h, :min(self.t_src, self.grid.width - x0)])
        batch = torch.from_numpy(np.stack(tiles)) if tiles else None
        if batch is not None and self.pin:
            batch = batch.pin_memory()
        return TileRow(iy, keep, batch, masks, len(cols) - len(keep))

    def rows(self, readers: int = 0, depth: int = 2, start: int = 0, stop: int | None = None) -> Iterator[TileRow]:
        """Tile rows ``start`` to ``stop`` (default: all) in order, read by ``readers`` threads up to ``depth`` rows
        ahead (0: in this thread)."""
        return read_ahead(self.read_row, range(start, len(self.grid.ys) if stop is None else stop), readers, depth)


def open_tiles(model, ds, src: Path, cfg: PredictConfig, given_gsd: float | None = None,
               warn: bool = True, pin: bool = False) -> TileSource:
    """The tiles the model sees in ``ds`` (bands, bit depth and resolution as in training); ``given_gsd`` is the
    resolution of a raster without a CRS (else a locations.csv above it is asked)."""
    bands, alpha = image_bands(ds, src, getattr(model, "bands", None))
    top = bit_depth(ds, bands, getattr(model, "bit_depth", None))  # as in training: [0, top] scaled to 8 bits
    gsd = ground_sampling_distance(grid_of(ds))
    if ds.crs is None:
        gsd = given_gsd or gsd_near(src)
        if warn:
            warnings.warn(f"{src}: no CRS; outputs are in pixel coordinates and no GeoJSON is written"
                          + ("" if gsd else "; its resolution is unknown (give --gsd) so it is not resampled"),
                          stacklevel=3)
    elif ds.crs.is_geographic and warn:
        import logging

        logging.getLogger(__name__).info("%s: geographic CRS; footprints are regularised in the local UTM zone", src.name)
    target = model.input_gsd(gsd) if hasattr(model, "input_gsd") else model.gsd
    scale = scale_for(gsd, target)
    T = model.tile_size
    t_src = max(1, int(round(T * scale)))
    grid = TileGrid(ds.width, ds.height, t_src, int(round(cfg.overlap * scale)))
    return TileSource(Path(src), ds, bands, alpha, grid, T, t_src, getattr(model, "use_alpha", True), top, pin, gsd,
                      target)
