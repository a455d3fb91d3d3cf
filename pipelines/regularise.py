"""Footprint regularisation (buildingregulariser), one building at a time.

buildingregulariser's time goes with the vertices it gets: about 2.4 ms a building on the Banepa mosaic's pixel
outlines (217 vertices on average), 1.3 ms once their pixel staircase is out (:func:`without_staircase`), more than
polygonising; on a machine whose cores the model leaves idle (a GPU machine) batches are cut into chunks of about
equal cost (:func:`balanced_chunks`) and worked over ``predict.footprint_workers`` processes
(pipelines/footprints.py, pipelines/pool.py). Each building is regularised on its own (no neighbour alignment), so
cutting a batch into chunks gives exactly the outlines of one call on the whole batch.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely

from geomoe.config import PredictConfig

log = logging.getLogger(__name__)

MIN_CHUNK = 32  # buildings: smaller chunks cost more in pickling than they save


@dataclass(frozen=True)
class Regularisation:
    """How outlines are squared: buildingregulariser's simplification tolerance and parallel-edge threshold in
    metres on the ground (configured in ``predict``: 0.25 and 0.5 m, chosen on validation; the library's own are 0.5
    and 1 m), never under one and two pixels, and whether edges at 45 degrees are allowed."""

    diagonals: bool
    tolerance_m: float
    parallel_m: float
    min_iou: float = 0.0  # a squared outline is kept where its IoU with the mask's outline is at least this

    @classmethod
    def of(cls, cfg: PredictConfig) -> Regularisation | None:
        """The configured regularisation (``predict.regularize_*``), None where it is off."""
        return cls(cfg.allow_diagonals, cfg.regularize_tolerance_m, cfg.regularize_parallel_m,
                   cfg.regularize_min_iou) if cfg.regularize else None

    def in_units(self, gsd: float, unit: float) -> tuple[float, float]:
        """(parallel threshold, tolerance) in the units of the outlines (``unit`` of them a metre)."""
        return max(self.parallel_m, 2 * gsd) * unit, max(self.tolerance_m, gsd) * unit


def regularise_frame(work: gpd.GeoDataFrame, parallel_threshold: float, tolerance: float,
                     diagonals: bool) -> gpd.GeoDataFrame:
    """buildingregulariser on every row of ``work`` in this process; a self-intersecting outline may give two rows."""
    from buildingregulariser import regularize_geodataframe

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return regularize_geodataframe(work, parallel_threshold=parallel_threshold, simplify_tolerance=tolerance,
                                       allow_45_degree=diagonals, allow_circles=False, num_cores=1)


def balanced_chunks(cost: np.ndarray, n: int) -> list[np.ndarray]:
    """Indices cut into ``n`` chunks of about equal total ``cost`` (largest first, each to the lightest chunk), each
    in ascending order: one merged blob of tens of thousands of vertices must not hold up the buildings after it."""
    loads, parts = np.zeros(n), [[] for _ in range(n)]
    for i in np.argsort(-cost, kind="stable"):
        j = int(np.argmin(loads))
        parts[j].append(i)
        loads[j] += cost[i]
    return [np.sort(np.array(p, dtype=np.int64)) for p in parts if p]


def one_per_building(work: gpd.GeoDataFrame, parts: pd.DataFrame) -> gpd.GeoDataFrame:
    """``work`` with the regulariser's outlines put back row by row (``parts``' ``_order`` column): where it split
    an outline into several rows (a self-touching ring) the largest part is the building, not a footprint each
    (the rest are slivers); where it lost one, the raw outline stays. A building is never dropped or doubled."""
    geoms = work.geometry.to_numpy().copy()
    g = np.asarray(parts[work.geometry.name], dtype=object)
    order = parts["_order"].to_numpy()
    ok = ~(shapely.is_missing(g) | shapely.is_empty(g))
    g, order = g[ok], order[ok]
    by = np.lexsort((-shapely.area(g), order))  # each building's parts, largest first
    first = by[np.unique(order[by], return_index=True)[1]]
    geoms[order[first]] = g[first]
    if len(first) < len(work):
        log.warning("regularisation lost %d footprint(s); their raw outlines are kept", len(work) - len(first))
    split = int((np.bincount(order) > 1).sum()) if len(order) else 0  # outlines that came back in parts
    if split:
        log.debug("regularisation split %d outline(s) into %d extra part(s); the largest part of each is kept",
                  split, len(g) - len(first))
    out = work.copy()
    out[out.geometry.name] = geoms
    squared = np.zeros(len(work), bool)
    squared[order[first]] = True  # a lost outline stays raw
    out["squared"] = squared
    return out


def without_staircase(geoms: np.ndarray, pixel: float) -> np.ndarray:
    """Pixel outlines with their staircase taken out: simplified at one pixel (``pixel``, in their units), the
    mask's resolution, so no outline moves by more than the mask could tell. A roof's edge that is not aligned with
    the raster comes out of polygonising as a step per pixel (on Banepa's mosaic at 0.13 m, 217 vertices a building
    on average; 14 without): the regulariser's time goes with the vertices it gets (half of it on that mosaic)."""
    return shapely.simplify(geoms, pixel, preserve_topology=True) if pixel > 0 else geoms


def regularise(work: gpd.GeoDataFrame, parallel_threshold: float, tolerance: float,
               diagonals: bool, min_iou: float = 0.0, pixel: float = 0.0) -> gpd.GeoDataFrame:
    """Regularise every footprint of ``work`` in this process: one row per building, in ``work``'s order; with
    ``min_iou``, only where the squared outline stays that faithful to the mask's (:func:`keep_faithful`). With
    ``pixel`` (the raster's pixel in the outlines' units), the outlines lose their pixel staircase first
    (:func:`without_staircase`) and are squared and guarded as such."""
    if len(work) == 0:
        return work
    smooth = work.copy()
    smooth[work.geometry.name] = without_staircase(work.geometry.to_numpy(), pixel)
    tagged = smooth.assign(_order=np.arange(len(work)))  # each outline's building, whatever the regulariser returns
    squared = one_per_building(smooth, regularise_frame(tagged, parallel_threshold, tolerance, diagonals))
    return keep_faithful(smooth, squared, tolerance, min_iou) if min_iou > 0 else squared


def outline_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of each outline of ``a`` with the one of ``b`` beside it (a squared outline may be invalid: repaired)."""
    bad = ~shapely.is_valid(b)
    b = b.copy()
    b[bad] = shapely.make_valid(b[bad])
    inter = shapely.area(shapely.intersection(a, b))
    union = shapely.area(a) + shapely.area(b) - inter
    return np.divide(inter, union, out=np.zeros(len(a)), where=union > 0)


def keep_faithful(raw: gpd.GeoDataFrame, squared: gpd.GeoDataFrame, tolerance: float,
                  min_iou: float) -> gpd.GeoDataFrame:
    """``squared`` where each outline's IoU with its ``raw`` one (row by row) is at least ``min_iou``; elsewhere the
    raw outline simplified at ``tolerance`` (its ``squared`` column then False, so a user can tell them apart).

    The regulariser fits a few dominant directions to every outline. A roof the mask outlines well comes out
    squared and barely moved; a blob (an irregular or partly seen roof, two roofs the watershed left joined) comes
    out as a rectangle or a staircase that no longer covers what the model found: on session 14's validation windows
    the median squared outline had an IoU of 0.87 with its mask's (Banepa's 0.81), and squaring every footprint cost
    1.8 points of IoU and 0.020 of building F1 against the unsquared outlines; with a guard of 0.9, 0.5 and 0.002
    (bench/footprints.py)."""
    a, b = raw.geometry.to_numpy(), squared.geometry.to_numpy()
    off = outline_iou(a, b) < min_iou
    if not off.any():
        return squared
    out = squared.copy()
    geoms = b.copy()
    geoms[off] = shapely.simplify(a[off], tolerance, preserve_topology=True)
    out[out.geometry.name] = geoms
    out["squared"] = out["squared"].to_numpy() & ~off
    log.debug("%d of %d squared outlines strayed from the mask's (IoU under %g); simplified instead",
              int(off.sum()), len(off), min_iou)
    return out
