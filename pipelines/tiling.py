"""Overlapping tiles over a raster and their seamless blend, streamed one band of rows at a time.

The blend window is separable and the tile origins form a product grid, so the sum of all tiles'
weights at a pixel is sum_y(row) * sum_x(col): two 1-D arrays. Each tile's weights are divided by
that sum before they are added, so every pixel's weights sum to exactly one and no full-scene
weight buffer is ever needed. Only the rows a later tile can still touch are held in memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from geomoe.data.sampling import origins


def ramp(tile: int, overlap: int) -> np.ndarray:
    """1-D blend window: a raised-cosine rise over ``overlap`` pixels at each end, flat in between.

    Never exactly zero, so a pixel covered by one tile only (raster edges) keeps that tile's value.
    """
    w = np.ones(tile, np.float64)
    if overlap > 0:
        t = (np.arange(overlap) + 0.5) / overlap
        rise = np.sin(t * np.pi / 2) ** 2
        w[:overlap] = rise
        w[tile - overlap:] = rise[::-1]
    return np.maximum(w, 1e-3)


@dataclass
class TileGrid:
    """Tiles of ``tile`` pixels with ``overlap`` over a ``width`` x ``height`` raster."""

    width: int
    height: int
    tile: int
    overlap: int

    def __post_init__(self) -> None:
        stride = self.tile - self.overlap
        self.xs = origins(self.width, self.tile, stride)
        self.ys = origins(self.height, self.tile, stride)
        self.w = ramp(self.tile, self.overlap)
        self.sum_x = self._sums(self.width, self.xs)
        self.sum_y = self._sums(self.height, self.ys)

    def _sums(self, length: int, starts: np.ndarray) -> np.ndarray:
        s = np.zeros(length, np.float64)
        for o in starts:
            n = min(self.tile, length - o)
            s[o:o + n] += self.w[:n]
        return s

    def __len__(self) -> int:
        return len(self.xs) * len(self.ys)

    def weight(self, ix: int, iy: int) -> np.ndarray:
        """Normalised weights of tile (ix, iy) over its part inside the raster."""
        x0, y0 = int(self.xs[ix]), int(self.ys[iy])
        h, w = min(self.tile, self.height - y0), min(self.tile, self.width - x0)
        wy = self.w[:h] / self.sum_y[y0:y0 + h]
        wx = self.w[:w] / self.sum_x[x0:x0 + w]
        return (wy[:, None] * wx[None, :]).astype(np.float32)

    def cell_edges(self, axis: str) -> np.ndarray:
        """Boundaries of the cells each tile answers for (midway between neighbouring tile centres)."""
        starts, length = (self.xs, self.width) if axis == "x" else (self.ys, self.height)
        centres = starts + self.tile / 2
        mids = (centres[:-1] + centres[1:]) / 2
        return np.concatenate([[0], np.round(mids), [length]]).astype(int)


class BandBlender:
    """Accumulates weighted tile predictions for one row of tiles at a time and hands finished rows on.

    ``sink(row0, values, valid)`` receives rows in order, each exactly once, as float32 (channels, n_rows, width)
    and a bool (n_rows, width) mask of the pixels any added tile called valid (all True when tiles came without
    masks), at most ``flush_rows`` at a time so that what the sink derives from them stays small (``None``: every
    row a tile row finishes at once, which the watershed of instance outputs needs to see whole buildings).
    The arrays are views of the band: a sink that keeps them past the call copies them.
    Memory: one (channels x tile x width) float32 band and its mask.
    """

    def __init__(self, grid: TileGrid, sink: Callable[[int, np.ndarray, np.ndarray], None],
                 flush_rows: int | None = 64, channels: int = 1, top: int = 0):
        self.g, self.sink, self.flush_rows = grid, sink, flush_rows
        self.top = top  # first row of the band: the first tile row's origin (0, or a strip's context row)
        self.band = np.zeros((channels, grid.tile, grid.width), np.float32)
        self.valid = np.zeros((grid.tile, grid.width), bool)

    def start_row(self, iy: int) -> None:
        """Begin tile row ``iy``: rows above its origin can no longer change, so they are flushed."""
        y = int(self.g.ys[iy])
        self._flush_to(y)

    def _flush_to(self, y: int) -> None:
        n = min(y - self.top, self.g.height - self.top)
        if n <= 0:
            return
        step = self.flush_rows or n
        for r in range(0, n, step):
            self.sink(self.top + r, self.band[:, r:min(n, r + step)], self.valid[r:min(n, r + step)])
        rows = self.band.shape[1]
        self.band[:, :-n] = self.band[:, n:].copy() if n < rows else 0
        self.band[:, -n:] = 0
        self.valid[:-n] = self.valid[n:].copy() if n < rows else False
        self.valid[-n:] = False
        self.top += n

    def add(self, ix: int, iy: int, values: np.ndarray, valid: np.ndarray | None = None) -> None:
        """Add tile (ix, iy)'s prediction ((channels,) tile x tile, or larger: it is cropped to the raster) and
        its valid mask at the raster's resolution (None: all valid). Tiles read the same pixels where they
        overlap, so their masks agree there and are simply joined."""
        x0, y0 = int(self.g.xs[ix]), int(self.g.ys[iy])
        wgt = self.g.weight(ix, iy)
        h, w = wgt.shape
        r = y0 - self.top
        v = values if values.ndim == 3 else values[None]
        self.band[:, r:r + h, x0:x0 + w] += v[:, :h, :w] * wgt
        self.valid[r:r + h, x0:x0 + w] |= True if valid is None else valid[:h, :w]

    def finish(self) -> None:
        self._flush_to(self.g.height)
