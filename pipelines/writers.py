"""The writers of one scene's outputs: probability and mask COGs, footprints (GPKG, GeoJSON, GeoParquet) and the
routing layer. Everything is written under a temporary name and moved to its final name only when complete."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import geopandas as gpd
import numpy as np
import rasterio
import rasterio.shutil
from rasterio.windows import Window
from shapely.geometry import Polygon

from geomoe.atomic import atomic_path, tmp_name
from geomoe.config import PredictConfig
from geomoe.pipelines.background import InOrder
from geomoe.pipelines.calibration import Calibrations
from geomoe.pipelines.footprints import (BandOutlines, FootprintCollector, FrameSpec, Piece, outline_band,
                                        scene_area_crs, start_frame)
from geomoe.pipelines.geojson import gpkg_to_geojson
from geomoe.pipelines.geoparquet import gpkg_to_geoparquet
from geomoe.pipelines.handoff import HandedJob, Handoff, take
from geomoe.pipelines.instances import footprint_mask
from geomoe.pipelines.outputs import Outputs
from geomoe.pipelines.pool import auto_workers, submit
from geomoe.pipelines.regularise import MIN_CHUNK, Regularisation
from geomoe.pipelines.tiling import TileGrid

if TYPE_CHECKING:
    from geomoe.pipelines.inference import RoutingLayer

NODATA = 255
# (rows, columns) of the blocks the probability and mask rasters are written in before their COG copy: low blocks,
# so a band of rows fills whole blocks that GDAL writes out at once; only a partial block row waits in its cache
OUT_BLOCK = (64, 512)
# the footprint layer's attributes and their types, in order (pipelines/footprints.py makes them)
FOOTPRINT_SCHEMA = {"area_m2": np.float64, "expert": np.int32, "mean_prob": np.float32, "pixels": np.int64,
                    "at_edge": bool, "squared": bool}


def footprint_workers(cfg: PredictConfig) -> int:
    """``predict.footprint_workers``, or by default a few processes on machines with cores to spare."""
    return cfg.footprint_workers if cfg.footprint_workers is not None else auto_workers()


# the mask's colours in a GIS: buildings red on black (a TIFF palette has no transparency; 255 is nodata)
MASK_COLOURS = {0: (0, 0, 0, 255), 1: (230, 57, 70, 255)}


def describe(prob, mask) -> None:
    """Say in the rasters what their values mean, so a GIS shows them without this README: the probability is
    stored as round(254 p) with GDAL's scale of 1/254 (QGIS and ``rasterio``'s ``scales`` give p back), the mask
    as 1 building / 0 background with a colour table; 255 is nodata in both."""
    prob.set_band_description(1, "building probability (stored x 254; scale 1/254)")
    prob.scales, prob.offsets = (1 / 254,), (0.0,)
    mask.set_band_description(1, "building mask (1 building, 0 background)")
    mask.write_colormap(1, MASK_COLOURS)
    for ds in (prob, mask):
        ds.update_tags(PRODUCER="geomoe", NODATA_MEANS="outside the image or no valid pixels")


class SceneWriters:
    """The probability and mask GeoTIFFs (tiled, written window by window) and the footprint layer."""

    def __init__(self, ds, outs: Outputs, gsd: float | None, cfg: PredictConfig, expert_at, rules: Calibrations):
        self.workers = footprint_workers(cfg)
        # a machine with footprint workers has cores to spare: GDAL compresses the rasters' blocks on that many threads
        self.gdal_threads = str(max(1, self.workers))
        prof = dict(driver="GTiff", width=ds.width, height=ds.height, count=1, dtype="uint8", crs=ds.crs,
                    transform=ds.transform, nodata=NODATA, tiled=True, blockxsize=OUT_BLOCK[1], blockysize=OUT_BLOCK[0],
                    compress="deflate", BIGTIFF="IF_SAFER", NUM_THREADS=self.gdal_threads)
        self.outs, self.cfg, self.expert_at = outs, cfg, expert_at
        self.raw_prob, self.raw_mask = tmp_name(outs.prob).with_suffix(".raw.tif"), tmp_name(outs.mask).with_suffix(".raw.tif")
        self.prob = rasterio.open(self.raw_prob, "w", **prof)
        self.mask = rasterio.open(self.raw_mask, "w", **prof)
        describe(self.prob, self.mask)
        self.vec_tmp = tmp_name(outs.footprints)
        self.vec_tmp.unlink(missing_ok=True)
        self.count = 0
        # how each network's outputs become footprints (pipelines/predict.py: footprint_rules)
        self.rules = rules
        # how pieces become footprints, each held against its network's smallest footprint; areas measured in the
        # scene centre's UTM zone (once: a CRS query costs 0.2 s)
        self.spec = FrameSpec(ds.transform, ds.crs, gsd, cfg.min_area_m2, Regularisation.of(cfg),
                              scene_area_crs(ds.crs, ds.transform, ds.width, ds.height), (ds.width, ds.height),
                              None if rules.uniform else rules)
        # batches whose footprint work runs in the pool while bands go on; written in order as they finish
        self.pending = InOrder(self.write_frame)

    def write_band(self, row0: int, p8: np.ndarray, m8: np.ndarray) -> None:
        """Write a band's probability and mask rows (uint8, nodata 255) from row ``row0`` on."""
        win = Window(0, row0, p8.shape[1], p8.shape[0])
        self.prob.write(p8, 1, window=win)
        self.mask.write(m8, 1, window=win)

    def write_pieces(self, pieces: list[Piece]) -> None:
        """Start a batch of finished pieces on its way to the layer; write the batches done so far, in order."""
        # batches written in the order their pieces were finished, at most two per worker under way (memory)
        self.pending.add(start_frame(pieces, self.spec, self.expert_at, self.workers), keep=2 * max(1, self.workers))

    def write_frame(self, gdf: gpd.GeoDataFrame) -> None:
        """Append finished footprints (in the raster's CRS) to the layers."""
        if len(gdf):
            gdf = gdf[[*FOOTPRINT_SCHEMA, gdf.geometry.name]]
            gdf.to_file(self.vec_tmp, driver="GPKG", layer="footprints", append=self.vec_tmp.exists(), engine="pyogrio")
            self.count += len(gdf)

    def copy_rows(self, prob_part: Path, mask_part: Path, row0: int, chunk: int = 512) -> None:
        """Write the rows of a strip's probability and mask rasters (made by another worker) from ``row0`` on."""
        with rasterio.open(prob_part) as p, rasterio.open(mask_part) as m:
            for r in range(0, p.height, chunk):
                win = Window(0, r, p.width, min(chunk, p.height - r))
                dst = Window(0, row0 + r, p.width, win.height)
                self.prob.write(p.read(1, window=win), 1, window=dst)
                self.mask.write(m.read(1, window=win), 1, window=dst)

    def close(self) -> None:
        """Write the footprint batches still under way, and close the rasters."""
        self.pending.drain()
        self.prob.close()
        self.mask.close()

    def finish(self) -> None:
        """Convert the rasters to COGs and move every output to its final name."""
        self.close()
        for raw, final in ((self.raw_prob, self.outs.prob), (self.raw_mask, self.outs.mask)):
            with atomic_path(final) as tmp:
                rasterio.shutil.copy(raw, tmp, driver="COG", compress="DEFLATE", overview_resampling="nearest",
                                     BIGTIFF="IF_SAFER", NUM_THREADS=self.gdal_threads)
            raw.unlink()
        if not self.vec_tmp.exists():  # no building found: empty, valid layers
            empty = gpd.GeoDataFrame({c: np.zeros(0, t) for c, t in FOOTPRINT_SCHEMA.items()}, geometry=[],
                                     crs=self.spec.crs)
            empty.to_file(self.vec_tmp, driver="GPKG", layer="footprints")
        # from the finished layer, in chunks: memory stays flat and no format is appended to batch by batch
        if self.outs.parquet is not None:
            gpkg_to_geoparquet(self.vec_tmp, self.outs.parquet)
        if self.outs.geojson is not None:
            gpkg_to_geojson(self.vec_tmp, self.outs.geojson)
        self.vec_tmp.replace(self.outs.footprints)

    def abort(self) -> None:
        self.pending.cancel()
        self.close()
        for p in (self.raw_prob, self.raw_mask, self.vec_tmp):
            p.unlink(missing_ok=True)


def write_routing(path: Path, grid: TileGrid, layer: "RoutingLayer", ds, names: dict[int, str]) -> None:
    """One polygon per tile's cell (its true footprint, rotated grids included): the region's expert, its distance,
    whether the tile was unfamiliar and what ran on it (``names``: the networks beyond the experts, by id)."""
    ex, ey = grid.cell_edges("x"), grid.cell_edges("y")
    rows = []
    t = ds.transform
    for iy in range(len(grid.ys)):
        for ix in range(len(grid.xs)):
            e = int(layer.experts[iy, ix])
            if e < 0:
                continue
            ran = int(layer.ran[iy, ix])
            corners = [t @ (ex[a], ey[b]) for a, b in ((ix, iy), (ix + 1, iy), (ix + 1, iy + 1), (ix, iy + 1))]
            rows.append({"expert": e, "distance": float(layer.distance[iy, ix]),
                         "unfamiliar": bool(layer.unfamiliar[iy, ix]),
                         "ran": "skipped" if ran == -2 else names.get(ran, f"expert {ran}"),
                         "tile_col": ix, "tile_row": iy, "geometry": Polygon(corners)})
    cols = {"expert": [], "distance": [], "unfamiliar": [], "ran": [], "tile_col": [], "tile_row": []}
    gdf = gpd.GeoDataFrame(rows, geometry="geometry", crs=ds.crs) if rows else gpd.GeoDataFrame(cols, geometry=[], crs=ds.crs)
    with atomic_path(path) as tmp:
        gdf.to_file(tmp, driver="GPKG", layer="routing")


@dataclass
class Band:
    """Finished rows of a scene: blended probabilities (channels, n, width), where the raster holds data, and
    which network ran at each pixel (None: one calibration covers the scene)."""

    row0: int
    prob: np.ndarray
    valid: np.ndarray
    ran: np.ndarray | None = None


@dataclass
class BandResult:
    """What a band becomes: its probability and mask rows as written (uint8, nodata 255) and its buildings'
    outlines, not yet joined to the bands around it."""

    row0: int
    p8: np.ndarray
    m8: np.ndarray
    outlines: BandOutlines


def process_band(band: Band, rules: Calibrations) -> BandResult:
    """Everything one band needs that does not depend on the others: probability to uint8, the building mask
    (each pixel thresholded, and with instance channels cut between touching buildings by the watershed, as the
    network that ran there was calibrated; the cuts never fall on the band's edges, so buildings still join across
    bands), and the outlines of its components. Pure, so it runs in a worker process as well as in the writer's
    thread."""
    prob, valid = band.prob, band.valid
    scaled = np.clip(prob[0], 0, 1)  # in place from here on: a band can be tens of thousands of pixels wide
    scaled *= 254
    scaled += 0.5
    p8 = scaled.astype(np.uint8)
    del scaled
    p8[~valid] = NODATA
    threshold, separation = rules.at(band.ran)
    m = footprint_mask(prob, threshold, separation) & valid
    m8 = m.astype(np.uint8)
    m8[~valid] = NODATA
    # probabilities are only summed inside m (no nodata)
    return BandResult(band.row0, p8, m8, outline_band(band.row0, m, prob[0], valid))


def process_handed_band(row0: int, paths: dict[str, Path | None], rules: Calibrations) -> BandResult:
    """:func:`process_band` in a worker process, on a band handed over in memory (pipelines/handoff.py)."""
    a = take(paths)
    return process_band(Band(row0, a["prob"], a["valid"], a["ran"]), rules)


class BandWriter:
    """Writes finished bands in order: probability and mask rows, then their footprints (polygonised, joined across
    band borders, regularised). Runs beside the model (pipelines.background.Consumer), off its critical path.

    With worker processes (``predict.footprint_workers``: a GPU machine's spare cores) each band's own work
    (:func:`process_band`: watershed, polygonising) runs in the pool, several bands at once, and only the writing
    and the join across band borders stay here, in band order: the outputs are those of the in-line path. At most
    ``workers`` bands are under way, so memory stays bounded. Bands reach the workers as files in memory
    (pipelines/handoff.py), not through the pool's pipe.
    """

    def __init__(self, writers: SceneWriters, width: int, rules: Calibrations,
                 emit: Callable[[list[Piece]], None] | None = None):
        self.writers, self.rules = writers, rules
        # batches large enough for every worker to get a few chunks' worth (each batch is one append to the layers)
        w = self.workers = writers.workers
        self.collector = FootprintCollector(width, emit or writers.write_pieces, batch=max(1000, 2 * MIN_CHUNK * w))
        self.pending = InOrder(self._write)
        self.handoff = Handoff() if w > 0 else None

    def __call__(self, band: Band) -> None:
        if self.handoff is None:
            self._write(process_band(band, self.rules))
            return
        paths = self.handoff.put({"prob": band.prob, "valid": band.valid, "ran": band.ran})
        job = (submit(self.workers, process_band, band, self.rules) if paths is None else
               HandedJob(submit(self.workers, process_handed_band, band.row0, paths, self.rules), paths))
        self.pending.add(job, keep=self.workers)

    def _write(self, r: BandResult) -> None:
        self.writers.write_band(r.row0, r.p8, r.m8)
        self.collector.add_outlines(r.outlines)

    def finish(self) -> None:
        self.pending.drain()
        self.collector.finish()
        self._close()

    def cancel(self) -> None:
        """Drop the bands still under way (the run is failing)."""
        self.pending.cancel()
        self._close()

    def _close(self) -> None:
        if self.handoff is not None:
            self.handoff.close()
