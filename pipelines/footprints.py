"""Footprints from a mask streamed in bands of rows: polygonize, join across band borders, clean, regularise.

Pieces are kept in pixel coordinates, where band borders are exact integer lines. A building that
touches a band's last row stays open; when the next band arrives, pieces that share pixels across the
border (4-connectivity, as the labelling) are unioned, so no building is cut in two.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import geopandas as gpd
import numpy as np
import shapely
from rasterio import features
from rasterio.crs import CRS
from rasterio.transform import Affine
from scipy import ndimage
from shapely.affinity import affine_transform
from shapely.geometry import shape

log = logging.getLogger(__name__)


@dataclass
class Piece:
    geom: shapely.Geometry  # pixel coordinates (col, row)
    pixels: int
    prob_sum: float


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, a: int) -> int:
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        self.parent[self.find(a)] = self.find(b)


class FootprintCollector:
    """Feed bands of (mask, probability) rows in order; finished pieces go to ``emit`` in batches."""

    def __init__(self, width: int, emit: Callable[[list[Piece]], None], batch: int = 5000):
        self.width, self.emit, self.batch = width, emit, batch
        self.open: dict[int, Piece] = {}
        self.edge = np.full(width, -1, np.int64)  # piece id of each pixel in the last row so far
        self.done: list[Piece] = []
        self.next_id = 0

    def add_band(self, row0: int, mask: np.ndarray, prob: np.ndarray) -> None:
        labels, n = ndimage.label(mask)
        if n == 0:
            self._close(set(self.open))
            self.edge[:] = -1
            return
        counts = np.bincount(labels.ravel(), minlength=n + 1)
        sums = np.zeros(n + 1)
        sums[1:] = ndimage.sum_labels(prob, labels, np.arange(1, n + 1))
        ids = np.arange(n + 1) + self.next_id  # label l -> global id (label 0 unused)
        self.next_id += n + 1
        new: dict[int, Piece] = {}
        for geom, lab in features.shapes(labels.astype(np.int32, copy=False), mask=labels > 0, connectivity=4,
                                         transform=Affine.translation(0, row0)):
            lab = int(lab)
            g = shape(geom)
            gid = int(ids[lab])
            if gid in new:  # one label can come back as several rings; keep them together
                new[gid].geom = shapely.union(new[gid].geom, g)
            else:
                new[gid] = Piece(g, int(counts[lab]), float(sums[lab]))
        uf = _UnionFind()
        top = labels[0]
        joined = (self.edge >= 0) & (top > 0)
        for a, b in set(zip(self.edge[joined].tolist(), ids[top[joined]].tolist())):
            uf.union(a, b)
        groups: dict[int, list[int]] = {}
        for gid in list(self.open) + list(new):
            groups.setdefault(uf.find(gid), []).append(gid)
        merged: dict[int, Piece] = {}
        for root, members in groups.items():
            parts = [self.open.get(m) or new[m] for m in members]
            if len(parts) == 1:
                merged[root] = parts[0]
            else:
                merged[root] = Piece(shapely.union_all([p.geom for p in parts]), sum(p.pixels for p in parts),
                                     sum(p.prob_sum for p in parts))
        last = labels[-1]
        bottom_ids = {uf.find(int(ids[l])) for l in np.unique(last[last > 0])}
        self.open = {}
        for root, p in merged.items():
            if root in bottom_ids:
                self.open[root] = p
            else:
                self.done.append(p)
        self.edge = np.where(last > 0, np.array([uf.find(int(i)) for i in ids])[last], -1)
        if len(self.done) >= self.batch:
            self.flush()

    def _close(self, gids: set[int]) -> None:
        for g in gids:
            self.done.append(self.open.pop(g))

    def flush(self) -> None:
        if self.done:
            self.emit(self.done)
            self.done = []

    def finish(self) -> None:
        self._close(set(self.open))
        self.flush()


def pieces_to_frame(pieces: list[Piece], transform: Affine, crs: CRS | None, gsd: float | None,
                    min_area_m2: float, regularize: bool, diagonals: bool,
                    expert_at: Callable[[np.ndarray, np.ndarray], np.ndarray], workers: int = 0) -> gpd.GeoDataFrame:
    """Georeference, measure, filter and regularise pieces (over ``workers`` processes when more than one);
    attributes: area_m2, expert, mean_prob."""
    cent = np.array([[p.geom.centroid.x, p.geom.centroid.y] for p in pieces]).reshape(-1, 2)
    a = transform
    # canonical outlines (no collinear vertices, fixed start and orientation) in exact pixel coordinates: a building
    # joined across different band or strip borders then reaches the regulariser as the very same polygon
    canon = shapely.normalize(shapely.simplify(np.array([p.geom for p in pieces], dtype=object), 0))
    geoms = [affine_transform(g, [a.a, a.b, a.d, a.e, a.c, a.f]).buffer(0) for g in canon]
    gdf = gpd.GeoDataFrame(
        {"expert": expert_at(cent[:, 0], cent[:, 1]).astype(np.int32) if len(pieces) else np.zeros(0, np.int32),
         "mean_prob": np.array([p.prob_sum / max(p.pixels, 1) for p in pieces], np.float32),
         "pixels": np.array([p.pixels for p in pieces], np.int64)},
        geometry=geoms, crs=crs)
    if gsd is None:
        gdf["area_m2"] = np.nan
        return gdf
    if crs is None:  # pixel coordinates with a known resolution (locations.csv or --gsd): measure in pixels
        work, unit = gdf, 1.0 / gsd
        work["area_m2"] = work.geometry.area * gsd * gsd
    else:
        work, unit = (gdf.to_crs(gdf.estimate_utm_crs()) if len(gdf) else gdf), 1.0
        work["area_m2"] = work.geometry.area
    work = work[work.area_m2 >= min_area_m2]
    if regularize and len(work):
        try:
            from geomoe.pipelines.regularise import regularise

            reg = regularise(work, 2 * gsd * unit, gsd * unit, diagonals, workers)
            lost = reg.geometry.isna() | reg.geometry.is_empty
            if len(reg) == len(work) and lost.any():  # a building is never dropped: its raw outline stays
                reg.loc[lost.to_numpy(), reg.geometry.name] = work.geometry[lost.to_numpy()].to_numpy()
                log.warning("regularisation emptied %d footprint(s); their raw outlines are kept", int(lost.sum()))
            elif lost.any():
                log.warning("regularisation dropped %d footprint(s)", int(lost.sum()))
                reg = reg[~lost]
            reg["area_m2"] = reg.geometry.area * (gsd * gsd if crs is None else 1.0)
            work = reg
        except Exception as e:  # keep the raw polygons rather than lose the batch
            log.warning("regularisation failed on a batch (%s); raw polygons kept", e)
    work = _one_polygon_each(work, gsd * gsd if crs is None else 1.0)
    if crs is None:
        return work
    return work.to_crs(crs)


def _one_polygon_each(gdf: gpd.GeoDataFrame, area_scale: float) -> gpd.GeoDataFrame:
    """One Polygon per building: a piece is one 4-connected component, so a MultiPolygon can only come from
    cleaning or regularising its outline (rings touching at a corner); its largest part is the building."""
    multi = gdf.geom_type == "MultiPolygon"
    if multi.any():
        parts = [max(g.geoms, key=lambda q: q.area) for g in gdf.geometry[multi]]
        gdf.loc[multi.to_numpy(), gdf.geometry.name] = parts
        gdf.loc[multi.to_numpy(), "area_m2"] = np.array([q.area for q in parts]) * area_scale
    return gdf
