"""Footprints from a mask streamed in bands of rows: polygonize, join across band borders, clean, regularise.

Pieces are kept in pixel coordinates, where band borders are exact integer lines. A building that
touches a band's last row stays open; when the next band arrives, pieces that share pixels across the
border (4-connectivity, as the labelling) are unioned, so no building is cut in two.

Two steps are pure and run in worker processes where there are cores to spare: outlining a band
(:func:`outline_band`) and turning a chunk of finished pieces into footprints (:func:`footprint_chunk`). Only the
join across band borders (:meth:`FootprintCollector.add_outlines`) needs the bands in order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from rasterio import features
from rasterio.crs import CRS
from rasterio.transform import Affine
from scipy import ndimage
from shapely.affinity import affine_transform
from shapely.geometry import shape

from geomoe.metrics import held_size, touch_void
from geomoe.pipelines.calibration import Calibrations
from geomoe.pipelines.pool import result_or, submit
from geomoe.pipelines.regularise import MIN_CHUNK, Regularisation, balanced_chunks, regularise

log = logging.getLogger(__name__)

ExpertAt = Callable[[np.ndarray, np.ndarray], np.ndarray]  # the expert that ran at pixels (cols, rows) of the scene


@dataclass
class Piece:
    geom: shapely.Geometry  # pixel coordinates (col, row)
    pixels: int
    prob_sum: float
    cut: bool = False  # touches nodata inside the raster (a collar, a skipped tile): an edge, as the scene's is


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


@dataclass
class _Open:
    """A building still growing across band borders: its outlines from each band, joined once when it closes (a
    blob crossing many bands is then unioned once, not once per band)."""

    parts: list[shapely.Geometry]
    pixels: int
    prob_sum: float
    cut: bool = False

    def piece(self) -> Piece:
        geom = self.parts[0] if len(self.parts) == 1 else shapely.union_all(self.parts)
        return Piece(geom, self.pixels, self.prob_sum, self.cut)


@dataclass
class BandOutlines:
    """One band's buildings before they are joined across band borders: the outlines of its 4-connected
    components (labels 1..n), their pixel counts and probability sums, and the labels of its first and last rows.
    Worked out on its own for each band (in a worker process when there are cores to spare, :func:`outline_band`);
    only the join (:meth:`FootprintCollector.add_outlines`) needs the bands in order."""

    row0: int
    n: int
    parts: list[tuple[int, shapely.Geometry]]  # (label, outline) in polygonising order; a label may have several
    counts: np.ndarray  # pixels per label (index 0 unused)
    sums: np.ndarray  # probability sum per label
    top: np.ndarray  # labels of the band's first row
    bottom: np.ndarray  # labels of its last row
    cut: np.ndarray | None = None  # per label: touches the band's nodata (None: the band has none)
    void_top: np.ndarray | None = None  # nodata in the band's first row (None: none)
    void_bottom: np.ndarray | None = None  # and in its last


def outline_band(row0: int, mask: np.ndarray, prob: np.ndarray, valid: np.ndarray | None = None) -> BandOutlines:
    """Label ``mask``'s 4-connected components and polygonise them in pixel coordinates (row ``row0`` on);
    ``prob`` is summed inside each (the mask holds no nodata). ``valid``: where the raster has data; components
    touching its nodata are marked cut (the collector also looks across the band's borders)."""
    labels, n = ndimage.label(mask)
    void = None if valid is None or valid.all() else ~valid
    rows = (None, None) if void is None else (void[0].copy() if void[0].any() else None,
                                              void[-1].copy() if void[-1].any() else None)
    if n == 0:
        return BandOutlines(row0, 0, [], np.zeros(1, np.int64), np.zeros(1), labels[0], labels[-1], None, *rows)
    counts = np.bincount(labels.ravel(), minlength=n + 1)
    sums = np.zeros(n + 1)
    sums[1:] = ndimage.sum_labels(prob, labels, np.arange(1, n + 1))
    parts = [(int(lab), shape(geom)) for geom, lab in features.shapes(
        labels.astype(np.int32, copy=False), mask=labels > 0, connectivity=4, transform=Affine.translation(0, row0))]
    cut = None if void is None else touch_void(labels, n, void)
    return BandOutlines(row0, n, parts, counts, sums, labels[0].copy(), labels[-1].copy(), cut, *rows)


class FootprintCollector:
    """Feed bands of (mask, probability) rows in order; finished pieces go to ``emit`` in batches."""

    def __init__(self, width: int, emit: Callable[[list[Piece]], None], batch: int = 5000):
        self.width, self.emit, self.batch = width, emit, batch
        self.open: dict[int, _Open] = {}
        self.edge = np.full(width, -1, np.int64)  # piece id of each pixel in the last row so far
        self.void_last: np.ndarray | None = None  # nodata in the last row so far (None: none)
        self.done: list[Piece] = []
        self.next_id = 0

    def add_band(self, row0: int, mask: np.ndarray, prob: np.ndarray, valid: np.ndarray | None = None) -> None:
        self.add_outlines(outline_band(row0, mask, prob, valid))

    def add_outlines(self, band: BandOutlines) -> None:
        """Join the next band's components to the buildings open at its top; those that end in it are done.
        Buildings touching nodata across the border (the open ones above it, the band's first row below it) are
        marked cut as those touching it inside a band."""
        n = band.n
        if band.void_top is not None:  # open buildings whose last row sits on the band's first row of nodata
            for gid in np.unique(self.edge[band.void_top & (self.edge >= 0)]).tolist():
                self.open[gid].cut = True
        above, self.void_last = self.void_last, band.void_bottom
        if n == 0:
            self._close(set(self.open))
            self.edge[:] = -1
            return
        cut = band.cut.copy() if band.cut is not None else np.zeros(n + 1, bool)
        if above is not None:  # the band's first-row components under the last row's nodata
            cut[band.top[above]] = True
            cut[0] = False
        ids = np.arange(n + 1) + self.next_id  # label l -> global id (label 0 unused)
        self.next_id += n + 1
        new: dict[int, _Open] = {}
        for lab, geom in band.parts:
            gid = int(ids[lab])
            if gid in new:  # one label can come back as several rings; keep them together
                new[gid].parts.append(geom)
            else:
                new[gid] = _Open([geom], int(band.counts[lab]), float(band.sums[lab]), bool(cut[lab]))
        uf = _UnionFind()
        top = band.top
        joined = (self.edge >= 0) & (top > 0)
        for a, b in set(zip(self.edge[joined].tolist(), ids[top[joined]].tolist())):
            uf.union(a, b)
        groups: dict[int, list[int]] = {}
        for gid in list(self.open) + list(new):
            groups.setdefault(uf.find(gid), []).append(gid)
        merged: dict[int, _Open] = {}
        for root, members in groups.items():
            parts = [self.open.get(m) or new[m] for m in members]
            merged[root] = parts[0] if len(parts) == 1 else _Open(
                [g for p in parts for g in p.parts], sum(p.pixels for p in parts), sum(p.prob_sum for p in parts),
                any(p.cut for p in parts))
        last = band.bottom
        bottom_ids = {uf.find(int(ids[l])) for l in np.unique(last[last > 0])}
        self.open = {}
        for root, p in merged.items():
            if root in bottom_ids:
                self.open[root] = p
            else:
                self.done.append(p.piece())
        self.edge = np.where(last > 0, np.array([uf.find(int(i)) for i in ids])[last], -1)
        if len(self.done) >= self.batch:
            self.flush()

    def _close(self, gids: set[int]) -> None:
        for g in gids:
            self.done.append(self.open.pop(g).piece())

    def flush(self) -> None:
        if self.done:
            self.emit(self.done)
            self.done = []

    def finish(self) -> None:
        self._close(set(self.open))
        self.flush()


@dataclass(frozen=True)
class FrameSpec:
    """How a scene's pieces become footprints, the same for every batch: georeferencing, where areas are measured,
    the smallest footprint, regularisation."""

    transform: Affine
    crs: CRS | None
    gsd: float | None
    min_area_m2: float
    regularize: Regularisation | None  # None: outlines as polygonised
    area_crs: CRS | None = None  # areas are measured here (the scene's UTM zone; None: the batch's, or no CRS)
    size: tuple[int, int] | None = None  # the scene's (width, height) in pixels: its edge cuts buildings
    rules: Calibrations | None = None  # each network's own smallest footprint, by its id (None: min_area_m2)

    def min_areas(self, ran: np.ndarray) -> np.ndarray | float:
        """The smallest footprint (m2) of footprints made by networks ``ran``."""
        return self.min_area_m2 if self.rules is None else self.rules.min_area(ran)

    @property
    def least_area(self) -> float:
        """The smallest of the smallest footprints (what no footprint can be under)."""
        return self.min_area_m2 if self.rules is None else self.rules.least_min_area


def scene_area_crs(crs: CRS | None, transform: Affine, width: int, height: int) -> CRS | None:
    """The UTM zone of a scene's centre, where its footprints' areas are measured (one zone for the whole scene,
    so every batch and every chunk of it measures alike)."""
    return None if crs is None else _utm_at(crs, *(transform * (width / 2, height / 2)))


def _utm_at(crs: CRS, x: float, y: float) -> CRS:
    """The UTM zone of the point (x, y) of ``crs`` (a query of the CRS database: about 0.2 s)."""
    return gpd.GeoSeries([shapely.Point(x, y)], crs=crs).estimate_utm_crs()


def footprint_chunk(frame: gpd.GeoDataFrame, spec: FrameSpec) -> gpd.GeoDataFrame:
    """Pieces (pixel outlines with their attributes) -> footprints in the raster's CRS: georeferenced, measured,
    those under the smallest area dropped, pinholes filled, regularised, one polygon each. Each footprint on its
    own, so a batch cut into chunks (worked in worker processes) gives exactly the rows of the whole batch."""
    a = spec.transform
    # canonical outlines (no collinear vertices, fixed start and orientation) in exact pixel coordinates: a building
    # joined across different band or strip borders then reaches the regulariser as the very same polygon
    canon = shapely.normalize(shapely.simplify(frame.geometry.to_numpy(), 0))
    geoms = np.array([affine_transform(g, [a.a, a.b, a.d, a.e, a.c, a.f]) for g in canon], dtype=object)
    # pixel outlines are valid but where two pixels meet at a corner; only those need the (costly) repair
    bad = ~shapely.is_valid(geoms)
    geoms[bad] = shapely.buffer(geoms[bad], 0)
    gdf = gpd.GeoDataFrame(frame.drop(columns=frame.geometry.name), geometry=shapely.normalize(geoms), crs=spec.crs)
    gsd = spec.gsd
    gdf["squared"] = False  # set where the regulariser's outline is kept (pipelines/regularise.py)
    if gsd is None:  # no ground resolution: no areas, no regularisation
        gdf["area_m2"] = np.nan
        return gdf
    if spec.crs is None:  # pixel coordinates with a known resolution (locations.csv or --gsd): measure in pixels
        work, unit, scale = gdf, 1.0 / gsd, gsd * gsd
    else:
        work, unit, scale = (gdf.to_crs(spec.area_crs) if len(gdf) else gdf), 1.0, 1.0
    work["area_m2"] = work.geometry.area * scale
    # a piece on the scene's edge may be a building the scene cuts, of any size: held against a quarter of the area
    least = spec.min_areas(work.expert.to_numpy())  # as the network under each footprint was calibrated
    keep = held_size(work.area_m2.to_numpy(), work.at_edge.to_numpy()) >= least
    work, least = work[keep], (least[keep] if isinstance(least, np.ndarray) else least)
    if len(work):  # pinholes are noise in a roof, not courtyards; they also cost the regulariser most of its time
        work[work.geometry.name] = fill_holes(work.geometry.to_numpy(), least / scale)
    if spec.regularize is not None and len(work):
        try:
            work = regularise(work, *spec.regularize.in_units(gsd, unit), spec.regularize.diagonals,
                              spec.regularize.min_iou, pixel=gsd * unit)
            work["area_m2"] = work.geometry.area * scale
        except Exception as e:  # keep the raw polygons rather than lose the batch
            log.warning("regularisation failed on a batch (%s); raw polygons kept", e)
    work = _one_polygon_each(work, scale)
    return work if spec.crs is None or work.crs == spec.crs else work.to_crs(spec.crs)


class FrameJob:
    """A batch of footprints on its way to the layer: worked in this thread, or in chunks of about equal cost over
    the worker processes while the writer goes on."""

    def __init__(self, chunks: list[gpd.GeoDataFrame], spec: FrameSpec, workers: int = 0):
        self.chunks, self.spec = chunks, spec
        self.futures = [submit(workers, footprint_chunk, c, spec) for c in chunks] if workers > 0 else None
        self.frames = None if workers > 0 else [footprint_chunk(c, spec) for c in chunks]

    def done(self) -> bool:
        return self.futures is None or all(f.done() for f in self.futures)

    def cancel(self) -> None:
        for f in self.futures or []:
            f.cancel()

    def result(self) -> gpd.GeoDataFrame:
        """The batch's footprints in piece order (waits for the workers). A chunk whose worker died (killed, out of
        memory) is worked again here, unregularised, rather than lost; the next batch gets a fresh pool."""
        frames = self.frames
        if frames is None:
            frames = []
            for c, f in zip(self.chunks, self.futures):
                frames.append(result_or(f, partial(footprint_chunk, c, replace(self.spec, regularize=None)),
                                        f"raw polygons kept for {len(c)} buildings"))
        out = gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), geometry=frames[0].geometry.name,
                               crs=self.spec.crs)
        return out.sort_values("_piece", kind="stable").drop(columns="_piece").reset_index(drop=True)


def start_frame(pieces: list[Piece], spec: FrameSpec, expert_at: ExpertAt | None = None,
                workers: int = 0) -> FrameJob:
    """Start turning a batch of pieces into footprints (:func:`footprint_chunk`), over ``workers`` processes in
    chunks of about equal cost when given (they go on while the caller does; the job's ``result()`` gives the
    frame). ``expert_at``: the expert that ran at pixel (col, row) (None: 0). Pieces on the scene's edge, or cut
    by nodata inside it, need a quarter of the smallest area (:func:`geomoe.metrics.held_size`) and are flagged
    ``at_edge``."""
    geoms = np.array([p.geom for p in pieces], dtype=object)
    edge = on_edge(geoms, spec.size) | np.array([p.cut for p in pieces], bool)
    keep = _not_specks(pieces, spec.gsd, spec.least_area, edge)
    pieces, geoms, edge = [p for p, k in zip(pieces, keep) if k], geoms[keep], edge[keep]
    cent = shapely.get_coordinates(shapely.centroid(geoms)) if len(pieces) else np.zeros((0, 2))
    experts = expert_at(cent[:, 0], cent[:, 1]) if expert_at is not None and len(pieces) else np.zeros(len(pieces))
    frame = gpd.GeoDataFrame(
        {"expert": np.asarray(experts).astype(np.int32),
         "mean_prob": np.array([p.prob_sum / max(p.pixels, 1) for p in pieces], np.float32),
         "pixels": np.array([p.pixels for p in pieces], np.int64),
         "at_edge": edge,
         "_piece": np.arange(len(pieces))}, geometry=geoms)
    if spec.crs is not None and spec.area_crs is None and len(pieces):  # no scene's zone given: this batch's
        spec = replace(spec, area_crs=_utm_at(spec.crs, *(spec.transform * tuple(cent.mean(0)))))
    n = min(workers, len(pieces) // MIN_CHUNK)
    if n < 2:  # too few buildings to be worth sending out
        return FrameJob([frame], spec)
    # the regulariser's cost grows with an outline's vertices; chunks of about equal cost
    cost = shapely.get_num_coordinates(geoms).astype(float)
    return FrameJob([frame.iloc[idx] for idx in balanced_chunks(cost, n)], spec, workers)


def _not_specks(pieces: list[Piece], gsd: float | None, min_area_m2: float, edge: np.ndarray) -> np.ndarray:
    """Which of ``pieces`` are not far below the smallest footprint by their pixel count (most pieces are specks):
    geometry work is then spent on buildings. The margin of four leaves the exact decision, on the measured
    area, to :func:`footprint_chunk` (the ground resolution is the scene centre's)."""
    if gsd is None or min_area_m2 <= 0:
        return np.ones(len(pieces), bool)
    return held_size(np.array([p.pixels * gsd * gsd * 4 for p in pieces]), edge) >= min_area_m2


def on_edge(geoms: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """Which of the pixel outlines ``geoms`` touch the edge of a scene of ``size`` (width, height) pixels (none
    when unknown)."""
    if size is None or not len(geoms):
        return np.zeros(len(geoms), bool)
    b = shapely.bounds(geoms)
    return (b[:, 0] <= 0) | (b[:, 1] <= 0) | (b[:, 2] >= size[0]) | (b[:, 3] >= size[1])


def pieces_to_frame(pieces: list[Piece], spec: FrameSpec, expert_at: ExpertAt | None = None,
                    workers: int = 0) -> gpd.GeoDataFrame:
    """Georeference, measure, filter and regularise pieces (over ``workers`` processes when more than one);
    attributes: area_m2, expert, mean_prob, pixels, at_edge (touches the scene's edge), squared (the outline is
    the regulariser's, not the mask's simplified)."""
    return start_frame(pieces, spec, expert_at, workers).result()


def fill_holes(geoms: np.ndarray, min_area: float | np.ndarray) -> np.ndarray:
    """Polygons (and multipolygons' parts) without their holes smaller than ``min_area`` (in the geometries' units;
    one value, or one per polygon): a building's holes under the smallest building kept are gaps in the mask, and
    each costs the regulariser as much as a small building."""

    def fill(g: shapely.Polygon, least: float) -> shapely.Polygon:
        keep = [r for r in g.interiors if shapely.area(shapely.Polygon(r)) >= least]
        return g if len(keep) == len(g.interiors) else shapely.Polygon(g.exterior, keep)

    out = geoms.copy()
    least = np.broadcast_to(np.asarray(min_area, float), geoms.shape)
    for i, g in enumerate(geoms):
        if g.geom_type == "Polygon" and len(g.interiors):
            out[i] = fill(g, least[i])
        elif g.geom_type == "MultiPolygon" and any(len(q.interiors) for q in g.geoms):
            out[i] = shapely.MultiPolygon([fill(q, least[i]) for q in g.geoms])
    return out


def _one_polygon_each(gdf: gpd.GeoDataFrame, area_scale: float) -> gpd.GeoDataFrame:
    """One Polygon per building: a piece is one 4-connected component, so a MultiPolygon can only come from
    cleaning or regularising its outline (rings touching at a corner); its largest part is the building."""
    multi = gdf.geom_type == "MultiPolygon"
    if multi.any():
        parts = [max(g.geoms, key=lambda q: q.area) for g in gdf.geometry[multi]]
        gdf.loc[multi.to_numpy(), gdf.geometry.name] = parts
        gdf.loc[multi.to_numpy(), "area_m2"] = np.array([q.area for q in parts]) * area_scale
    return gdf


def window_footprints(mask: np.ndarray, gsd: float | None, min_area_m2: float, regularize: Regularisation | None,
                      valid: np.ndarray | None = None) -> tuple[gpd.GeoDataFrame, Affine]:
    """The footprints prediction makes of one window's ``mask``, the window taken as a scene (outlined, specks
    dropped, on its edge or its nodata's (``valid`` False) only those under a quarter of the smallest area, pinholes
    filled, squared), in pixel units with y up as on a georeferenced raster (so the regulariser sees outlines turned
    as in a scene), and that frame's transform from pixels."""
    pieces: list[Piece] = []
    fc = FootprintCollector(mask.shape[1], pieces.extend)
    fc.add_band(0, mask, mask.astype(np.float32), valid)
    fc.finish()
    t = Affine(1, 0, 0, 0, -1, mask.shape[0])
    spec = FrameSpec(t, None, gsd, min_area_m2, regularize, size=(mask.shape[1], mask.shape[0]))
    return pieces_to_frame(pieces, spec), t


def rasterise_footprints(gdf: gpd.GeoDataFrame, transform: Affine, shape: tuple[int, int]) -> np.ndarray:
    """Footprints back on a grid, a pixel cut wherever two meet, so each stays one building for the metrics."""
    from geomoe.pipelines.instances import separated_mask

    if not len(gdf):
        return np.zeros(shape, bool)
    labels = features.rasterize(((g, i + 1) for i, g in enumerate(gdf.geometry)), out_shape=shape,
                                transform=transform, dtype="int32")
    return separated_mask(labels)


def as_delivered(mask: np.ndarray, gsd: float | None, min_area_m2: float, regularize: Regularisation | None,
                 valid: np.ndarray | None = None) -> np.ndarray:
    """``mask`` as the footprints a user gets of it, rasterised back (evaluate scores them so). Without a
    ground resolution prediction neither measures nor squares, and the mask is its outlines."""
    if gsd is None:
        return mask
    gdf, t = window_footprints(mask, gsd, min_area_m2, regularize, valid)
    return rasterise_footprints(gdf, t, mask.shape)
