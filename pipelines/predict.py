"""``geomoe predict``: stream a bundle over large rasters into COG masks, a routing layer and footprints.

Per input: tiles are read window by window (resampled to the bundle's GSD), embedded and routed in
batches, grouped by expert so each expert runs on full batches, blended with a smooth window into a
band of rows, and finished rows are written and polygonized as soon as no tile can touch them again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import geopandas as gpd
import numpy as np
import rasterio
import rasterio.shutil
import torch
import torch.nn.functional as F
from rasterio.enums import Resampling
from rasterio.windows import Window
from shapely.geometry import Polygon
from tqdm import tqdm

from geomoe.atomic import atomic_path, tmp_name
from geomoe.bundle import Bundle, BundlePaths, sha256
from geomoe.config import PredictConfig
from geomoe.data.catalog import IMAGE_SUFFIXES, gsd_near
from geomoe.embedding.model import embed_batches
from geomoe.experts.model import predict_channels
from geomoe.pipelines.geoparquet import gpkg_to_geoparquet
from geomoe.pipelines.footprints import FootprintCollector, Piece, pieces_to_frame
from geomoe.pipelines.instances import instance_labels, separated_mask
from geomoe.pipelines.tiling import BandBlender, TileGrid
from geomoe.raster import (RasterError, bit_depth, explain, fill_invalid, to_uint8, ground_sampling_distance, grid_of, image_bands, open_raster, read_window,
                           scale_for, valid_window_mask)
from geomoe.router.smoothing import scene_majority, smooth_grid

log = logging.getLogger(__name__)
NODATA = 255


class TileModel(Protocol):
    """What prediction needs from a model: tile size, routing, and per-expert probabilities.

    ``channels`` (optional, default 1): 3 when the experts give building, boundary and contact probabilities,
    which are separated into one instance per building before polygonising (pipelines/instances.py).
    """

    tile_size: int
    gsd: float | None  # the GSD every input is resampled to (None: inputs keep theirs unless ``input_gsd`` says)

    def route(self, tiles: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(expert ids (N, top), blend weights (N, top), distance to the nearest centroid (N,))."""

    def predict(self, expert: int, tiles: torch.Tensor) -> torch.Tensor:
        """Probabilities (n, T, T), or (n, channels, T, T), for uint8 tiles (n, 3, T, T)."""


class BundleModel:
    """A bundle as a TileModel: embeds the centre patch (what the embedding saw in training), routes by FAISS."""

    def __init__(self, bundle: Bundle, soft: bool = False, tta: bool = False):
        self.b, self.soft, self.tta = bundle, soft, tta
        self.tile_size = bundle.config.predict.tile_size
        self.patch = min(bundle.config.data.patch_size, self.tile_size)
        self.gsd = bundle.gsd
        self.channels = 3 if all(e.classes >= 3 for e in bundle.experts) else 1
        self.use_alpha = bundle.config.data.alpha == "mask"  # as in training
        self.bands, self.bit_depth = bundle.config.data.bands, bundle.config.data.bit_depth
        # resume only trusts outputs of the same bundle: its manifest (which holds every file's checksum) and its place
        self.identity = f"{bundle.root.resolve()}#{sha256(BundlePaths(bundle.root).manifest)[:12]}"

    def input_gsd(self, native: float | None) -> float | None:
        return self.b.input_gsd(native)

    @property
    def baseline_id(self) -> int | None:
        """The id ``predict`` takes for the single network (after the experts), when the bundle has one loaded."""
        return self.b.k if self.b.baseline is not None else None

    def unfamiliar(self, ids: np.ndarray, dist: np.ndarray) -> np.ndarray:
        return self.b.unfamiliar(ids, dist)

    def embed(self, tiles: torch.Tensor) -> np.ndarray:
        """Unit-norm embeddings of uint8 tiles (n, 3, T, T): their centre patch, the size the embedding trained on."""
        o = (tiles.shape[-1] - self.patch) // 2
        return embed_batches(self.b.embedding, tiles[..., o:o + self.patch, o:o + self.patch], self.b.device)

    def route(self, tiles: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        emb = self.embed(tiles)
        ids, dist = self.b.router.route(emb)
        if self.soft:
            r = self.b.config.router
            sids, w = self.b.router.soft(emb, r.soft_top_k, r.soft_temperature)
            return sids, w, dist
        return ids[:, None], np.ones((len(ids), 1), np.float32), dist

    def predict(self, expert: int, tiles: torch.Tensor) -> torch.Tensor:
        model = self.b.baseline if expert == self.b.k else self.b.experts[expert]
        p = predict_channels(model, tiles, self.b.device)[:, :self.channels]
        if self.tta:  # flips are exact symmetries of the task: average them back
            p = p + predict_channels(model, tiles.flip(-1), self.b.device)[:, :self.channels].flip(-1)
            p = p + predict_channels(model, tiles.flip(-2), self.b.device)[:, :self.channels].flip(-2)
            p = p / 3
        return p


@dataclass
class Outputs:
    prob: Path
    mask: Path
    routing: Path
    footprints: Path
    geojson: Path | None
    summary: Path
    parquet: Path | None = None  # the footprints again, as GeoParquet

    def all(self) -> list[Path]:
        return [p for p in (self.prob, self.mask, self.routing, self.footprints, self.geojson, self.parquet,
                            self.summary) if p]


def outputs_for(src: Path, out: Path, fmt: str = "gpkg", geojson: bool = True, name: str | None = None,
                parquet: bool = False) -> Outputs:
    """Output paths of ``src``; ``name`` (default: the file's stem) keeps inputs of the same name apart."""
    s = name or src.stem
    return Outputs(out / f"{s}_prob.tif", out / f"{s}_mask.tif", out / f"{s}_routing.gpkg",
                   out / f"{s}_footprints.{fmt}", out / f"{s}_footprints.geojson" if geojson else None,
                   out / f"{s}_summary.json", out / f"{s}_footprints.parquet" if parquet else None)


def expand_inputs(inputs: list[Path]) -> list[Path]:
    """Files as given; folders become their rasters; a .txt lists one path per line (relative to it)."""
    out: list[Path] = []
    for p in inputs:
        if p.is_dir():  # hidden files (macOS ._AppleDouble, .DS_Store) are not imagery
            out += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES and not q.name.startswith("."))
        elif p.suffix.lower() == ".txt" and p.exists():
            for line in p.read_text().splitlines():
                if line.strip() and not line.startswith("#"):
                    q = Path(line.strip())
                    out.append(q if q.is_absolute() else p.parent / q)
        else:
            out.append(p)
    return out


@dataclass
class RunStats:
    tiles: int = 0
    skipped_tiles: int = 0
    unfamiliar: int = 0
    seconds: float = 0.0
    footprints: int = 0
    per_expert: dict[int, int] = field(default_factory=dict)


class _Writers:
    """The probability and mask GeoTIFFs (tiled, written window by window) and the footprint layer."""

    def __init__(self, ds, outs: Outputs, gsd: float | None, cfg: PredictConfig, expert_at):
        prof = dict(driver="GTiff", width=ds.width, height=ds.height, count=1, dtype="uint8", crs=ds.crs,
                    transform=ds.transform, nodata=NODATA, tiled=True, blockxsize=512, blockysize=512,
                    compress="deflate", BIGTIFF="IF_SAFER")
        self.outs, self.cfg, self.gsd, self.expert_at = outs, cfg, gsd, expert_at
        self.crs, self.transform = ds.crs, ds.transform
        self.raw_prob, self.raw_mask = tmp_name(outs.prob).with_suffix(".raw.tif"), tmp_name(outs.mask).with_suffix(".raw.tif")
        self.prob = rasterio.open(self.raw_prob, "w", **prof)
        self.mask = rasterio.open(self.raw_mask, "w", **prof)
        self.vec_tmp = tmp_name(outs.footprints)
        self.json_tmp = tmp_name(outs.geojson) if outs.geojson else None
        for p in (self.vec_tmp, self.json_tmp):
            if p is not None and p.exists():
                p.unlink()
        self.count = 0

    def write_rows(self, row0: int, prob: np.ndarray, valid: np.ndarray, threshold: float) -> np.ndarray:
        """Write building probability and mask for rows ``prob`` (channels, n, width); return the mask.

        With instance channels the mask is cut between touching buildings (watershed), so each polygon is one
        building; the cuts never fall on the band's edges, so the collector still joins buildings across bands.
        """
        building = prob[0]
        win = Window(0, row0, building.shape[1], building.shape[0])
        p8 = (np.clip(building, 0, 1) * 254 + 0.5).astype(np.uint8)
        p8[~valid] = NODATA
        self.prob.write(p8, 1, window=win)
        if len(prob) >= 3:
            m = separated_mask(instance_labels(prob, threshold)) & valid
        else:
            m = (building >= threshold) & valid
        m8 = m.astype(np.uint8)
        m8[~valid] = NODATA
        self.mask.write(m8, 1, window=win)
        return m

    def write_pieces(self, pieces: list[Piece]) -> None:
        gdf = pieces_to_frame(pieces, self.transform, self.crs, self.gsd, self.cfg.min_area_m2, self.cfg.regularize,
                              self.cfg.allow_diagonals, self.expert_at)
        if len(gdf):
            gdf = gdf[["area_m2", "expert", "mean_prob", "pixels", "geometry"]]
            gdf.to_file(self.vec_tmp, driver="GPKG", layer="footprints", append=self.vec_tmp.exists(), engine="pyogrio")
            if self.json_tmp is not None:  # written batch by batch too, so no step holds every footprint
                gdf.to_crs("EPSG:4326").to_file(self.json_tmp, driver="GeoJSON", append=self.json_tmp.exists(),
                                                engine="pyogrio")
            self.count += len(gdf)

    def close(self) -> None:
        self.prob.close()
        self.mask.close()

    def finish(self) -> None:
        """Convert the rasters to COGs and move every output to its final name."""
        self.close()
        for raw, final in ((self.raw_prob, self.outs.prob), (self.raw_mask, self.outs.mask)):
            with atomic_path(final) as tmp:
                rasterio.shutil.copy(raw, tmp, driver="COG", compress="DEFLATE", overview_resampling="nearest",
                                     BIGTIFF="IF_SAFER")
            raw.unlink()
        if not self.vec_tmp.exists():  # no building found: empty, valid layers
            empty = gpd.GeoDataFrame({"area_m2": [], "expert": [], "mean_prob": [], "pixels": []}, geometry=[], crs=self.crs)
            empty.to_file(self.vec_tmp, driver="GPKG", layer="footprints")
            if self.json_tmp is not None:
                empty.to_crs("EPSG:4326").to_file(self.json_tmp, driver="GeoJSON")
        if self.outs.parquet is not None:  # from the finished layer, in chunks: memory stays flat
            gpkg_to_geoparquet(self.vec_tmp, self.outs.parquet)
        if self.json_tmp is not None:
            self.json_tmp.replace(self.outs.geojson)
        self.vec_tmp.replace(self.outs.footprints)

    def abort(self) -> None:
        self.close()
        for p in (self.raw_prob, self.raw_mask, self.vec_tmp, self.json_tmp):
            if p is not None:
                p.unlink(missing_ok=True)


def predict_raster(model: TileModel, src: Path, out: Path, cfg: PredictConfig, threshold: float,
                   progress: bool = True, fmt: str = "gpkg", gsd: float | None = None,
                   name: str | None = None) -> tuple[Outputs, RunStats]:
    """Predict one raster; every output appears under its final name only when complete.

    ``gsd`` (m/pixel) is used when the raster has no CRS; otherwise a locations.csv above it is asked.
    """
    t0 = time.perf_counter()
    with open_raster(src) as probe:
        width = probe.width
    # GDAL's block cache defaults to 5% of RAM and fills up on big rasters. Streaming needs only about
    # two rows of 512 px blocks of the input and both outputs (width x 3.5 kB); more just grows RSS.
    cache_mb = max(cfg.gdal_cache_mb, int(width * 3584 / 2**20) + 16)
    with rasterio.Env(GDAL_CACHEMAX=cache_mb):
        ds = open_raster(src)
        try:
            return _predict(model, ds, src, out, cfg, threshold, progress, fmt, t0, gsd, name)
        finally:
            ds.close()


def open_tiles(model: TileModel, ds, src: Path, cfg: PredictConfig, given_gsd: float | None = None,
               warn: bool = True) -> tuple["TileSource", float | None, float | None]:
    """The tiles the model sees in ``ds`` (bands, bit depth and resolution as in training), the raster's GSD and
    the GSD the model runs at."""
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
        log.info("%s: geographic CRS; footprints are regularised in the local UTM zone", src.name)
    target = model.input_gsd(gsd) if hasattr(model, "input_gsd") else model.gsd
    scale = scale_for(gsd, target)
    T = model.tile_size
    t_src = max(1, int(round(T * scale)))
    grid = TileGrid(ds.width, ds.height, t_src, int(round(cfg.overlap * scale)))
    return TileSource(ds, bands, alpha, grid, T, t_src, getattr(model, "use_alpha", True), top), gsd, target


def _predict(model: TileModel, ds, src: Path, out: Path, cfg: PredictConfig, threshold: float, progress: bool,
             fmt: str, t0: float, given_gsd: float | None, name: str | None):
    tiles, gsd, target = open_tiles(model, ds, src, cfg, given_gsd)
    grid, alpha, use_alpha = tiles.grid, tiles.alpha, tiles.use_alpha
    out.mkdir(parents=True, exist_ok=True)
    outs = outputs_for(src, out, fmt, geojson=ds.crs is not None, name=name, parquet=cfg.geoparquet)
    if cfg.routing == "tile":
        layer = RoutingLayer.empty(len(grid.ys), len(grid.xs))
    else:
        layer = route_scene(model, tiles, cfg.routing, cfg.batch_size, progress, src.name)
    ex, ey = grid.cell_edges("x"), grid.cell_edges("y")

    def expert_at(cols: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """What ran at these pixels: an expert id, k for the single network (unfamiliar tiles), -2 skipped."""
        ix = np.clip(np.searchsorted(ex, cols, side="right") - 1, 0, len(grid.xs) - 1)
        iy = np.clip(np.searchsorted(ey, rows, side="right") - 1, 0, len(grid.ys) - 1)
        return layer.ran[iy, ix]

    writers = _Writers(ds, outs, gsd, cfg, expert_at)
    collector = FootprintCollector(ds.width, writers.write_pieces, batch=1000)
    stats = RunStats()

    def sink(row0: int, prob: np.ndarray) -> None:
        win = Window(0, row0, ds.width, prob.shape[1])
        valid = valid_window_mask(ds, win, prob.shape[1:], alpha, use_alpha)
        if (layer.ran == -2).any():  # tiles skipped as unfamiliar: their cells are nodata
            cy = np.clip(np.searchsorted(ey, np.arange(row0, row0 + prob.shape[1]), side="right") - 1, 0, len(grid.ys) - 1)
            cx = np.clip(np.searchsorted(ex, np.arange(ds.width), side="right") - 1, 0, len(grid.xs) - 1)
            valid &= layer.ran[cy][:, cx] != -2
        m = writers.write_rows(row0, prob, valid, threshold)
        collector.add_band(row0, m, prob[0])  # probabilities are only summed inside m, which excludes nodata

    channels = getattr(model, "channels", 1)
    # the watershed must see whole buildings: instance outputs are flushed a tile row at a time, not in strips
    blender = BandBlender(grid, sink, flush_rows=None if channels > 1 else 64, channels=channels)
    bar = tqdm(total=len(grid), desc=src.name, unit="tile", disable=not progress)
    try:
        last = -1
        for iy, chunk in tiles.chunks(4 * cfg.batch_size):
            if iy != last:
                blender.start_row(iy)
                last = iy
            _run_chunk(model, tiles, iy, chunk, cfg, blender, layer, stats)
            bar.update(len(chunk))
        blender.finish()
        collector.finish()
        bar.close()
        stats.footprints = writers.count
        _write_routing(outs.routing, grid, ex, ey, layer, ds, getattr(model, "baseline_id", None))
        writers.finish()
    except BaseException:
        bar.close()
        writers.abort()
        raise
    stats.seconds = time.perf_counter() - t0
    with atomic_path(outs.summary) as tmp:
        tmp.write_text(json.dumps({"input": str(src), "input_identity": input_identity(src),
                                   "bundle": getattr(model, "identity", None), "tiles": stats.tiles, "empty_tiles": stats.skipped_tiles,
                                   "seconds": round(stats.seconds, 2), "tiles_per_second": round(len(grid) / stats.seconds, 2),
                                   "footprints": stats.footprints, "tiles_per_expert": stats.per_expert, "routing": cfg.routing,
                                   "unfamiliar_tiles": stats.unfamiliar, "unfamiliar_action": cfg.unfamiliar,
                                   "gsd": gsd, "model_gsd": target, "crs": str(ds.crs) if ds.crs else None,
                                   "outputs": [str(p) for p in outs.all() if p != outs.summary]}, indent=2))
    if stats.tiles == 0:
        warnings.warn(f"{src}: no valid data (all nodata); outputs are empty", stacklevel=2)
    return outs, stats


@dataclass
class TileSource:
    """Reads a scene's tiles (resampled to the bundle's tile size) a chunk of one tile row at a time."""

    ds: rasterio.DatasetReader
    bands: list[int]
    alpha: int | None
    grid: TileGrid
    T: int  # tile size the model sees
    t_src: int  # the same tile in source pixels
    use_alpha: bool = True  # the bundle's data.alpha: "mask" (transparent pixels are nodata) or "drop"
    top: float = 255.0  # the largest value of the imagery's bit depth, scaled to 255 as in training

    def read(self, iy: int, cols: list[int]) -> tuple[torch.Tensor | None, list[int]]:
        """uint8 tiles (n, 3, T, T) of the columns with any valid pixel, and those columns."""
        y0 = int(self.grid.ys[iy])
        tiles, keep = [], []
        for ix in cols:
            win = Window(int(self.grid.xs[ix]), y0, self.t_src, self.t_src)
            valid = valid_window_mask(self.ds, win, (self.T, self.T), self.alpha, self.use_alpha)
            if not valid.any():
                continue
            rs = Resampling.bilinear if self.t_src != self.T else Resampling.nearest
            # completed as in training (nearest valid pixel), never a black frame at edges and nodata borders
            raw = read_window(self.ds, self.bands, win, (self.T, self.T), rs)
            tiles.append(fill_invalid(to_uint8(raw, self.top), valid))
            keep.append(ix)
        return (torch.from_numpy(np.stack(tiles)) if tiles else None), keep

    def chunks(self, size: int):
        """(row, columns) in reading order, ``size`` columns at a time."""
        row = list(range(len(self.grid.xs)))
        for iy in range(len(self.grid.ys)):
            for i in range(0, len(row), size):
                yield iy, row[i:i + size]


@dataclass
class RoutingLayer:
    """Expert and distance per tile; ``fixed`` holds routes decided before prediction (smoothed or per scene)."""

    experts: np.ndarray  # (rows, cols) int16: the region's expert; -1 where no tile ran
    distance: np.ndarray  # (rows, cols) float32, distance to the nearest centroid
    fixed: bool = False
    unfamiliar: np.ndarray | None = None  # (rows, cols) bool: beyond the region's training distances
    ran: np.ndarray | None = None  # (rows, cols) int16: what ran (expert id, k = single network, -2 skipped)

    @classmethod
    def empty(cls, rows: int, cols: int, fixed: bool = False) -> "RoutingLayer":
        return cls(np.full((rows, cols), -1, np.int16), np.full((rows, cols), np.nan, np.float32), fixed,
                   np.zeros((rows, cols), bool), np.full((rows, cols), -1, np.int16))

    def flag(self, model: TileModel, iy: int, cols: list[int], ids: np.ndarray, dist: np.ndarray) -> None:
        """Record route and distance of tiles (iy, cols) and whether each is unfamiliar."""
        self.experts[iy, cols] = ids
        self.distance[iy, cols] = dist
        if hasattr(model, "unfamiliar"):
            self.unfamiliar[iy, cols] = model.unfamiliar(ids, dist)


def route_scene(model: TileModel, src: TileSource, how: str, batch: int, progress: bool = False,
                name: str = "") -> RoutingLayer:
    """A first, embedding-only pass over the scene; then each tile takes its neighbourhood's (or the scene's)
    majority expert. The experts run in the second pass on these routes."""
    layer = RoutingLayer.empty(len(src.grid.ys), len(src.grid.xs), fixed=True)
    with tqdm(total=len(src.grid), desc=f"{name} routing", unit="tile", disable=not progress, leave=False) as bar:
        for iy, cols in src.chunks(4 * batch):
            tiles, keep = src.read(iy, cols)
            if keep:
                ids, _, dist = model.route(tiles)
                layer.flag(model, iy, keep, ids[:, 0], dist)
            bar.update(len(cols))
    layer.experts = (smooth_grid(layer.experts) if how == "smoothed" else scene_majority(layer.experts)).astype(np.int16)
    return layer


def _run_chunk(model: TileModel, src: TileSource, iy: int, cols: list[int], cfg: PredictConfig,
               blender: BandBlender, layer: RoutingLayer, stats: RunStats) -> None:
    """Read, route (unless routed already), predict (grouped by expert) and blend one chunk of a tile row."""
    batch, keep = src.read(iy, cols)
    stats.skipped_tiles += len(cols) - len(keep)
    stats.tiles += len(keep)  # tiles with data, whether predicted or skipped as unfamiliar
    if not keep:
        return
    if layer.fixed:
        ids = layer.experts[iy, keep].astype(np.int64)[:, None]
        weights = np.ones((len(keep), 1), np.float32)
    else:
        ids, weights, dist = model.route(batch)
        layer.flag(model, iy, keep, ids[:, 0], dist)
    unf = layer.unfamiliar[iy, keep]
    stats.unfamiliar += int(unf.sum())
    if unf.any() and cfg.unfamiliar != "route":
        if cfg.unfamiliar == "skip":  # these tiles get no prediction; their cells are written as nodata
            layer.ran[iy, np.asarray(keep)[unf]] = -2
            sel = np.flatnonzero(~unf)
            batch, ids, weights, keep = batch[sel], ids[sel], weights[sel], [keep[j] for j in sel]
            if not keep:
                return
        else:  # the single network on every unfamiliar tile
            base = getattr(model, "baseline_id", None)
            if base is None:
                raise ValueError("--unfamiliar baseline needs a bundle with its single network (trained with --baseline)")
            ids, weights = ids.copy(), weights.copy()
            ids[unf] = base
            weights[unf] = 0
            weights[unf, 0] = 1
    layer.ran[iy, keep] = ids[:, 0]
    T = src.T
    probs = torch.zeros(len(keep), getattr(model, "channels", 1), T, T)
    for e in np.unique(ids):
        rows, slots = np.nonzero(ids == e)
        for s in range(0, len(rows), cfg.batch_size):
            r = rows[s:s + cfg.batch_size]
            p = model.predict(int(e), batch[r])
            p = p[:, None] if p.ndim == 3 else p
            probs[r] += p * torch.from_numpy(weights[r, slots[s:s + cfg.batch_size]])[:, None, None, None]
        stats.per_expert[int(e)] = stats.per_expert.get(int(e), 0) + int((ids[:, 0] == e).sum())
    if src.t_src != T:
        probs = F.interpolate(probs, size=(src.t_src, src.t_src), mode="bilinear", align_corners=False)
    for j, ix in enumerate(keep):
        blender.add(ix, iy, probs[j].numpy())


def _write_routing(path: Path, grid: TileGrid, ex: np.ndarray, ey: np.ndarray, layer: RoutingLayer, ds,
                   baseline_id: int | None) -> None:
    """One polygon per tile's cell (its true footprint, rotated grids included): the region's expert, its distance,
    whether the tile was unfamiliar and what ran on it."""
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
                         "ran": "skipped" if ran == -2 else "single network" if ran == baseline_id else f"expert {ran}",
                         "tile_col": ix, "tile_row": iy, "geometry": Polygon(corners)})
    cols = {"expert": [], "distance": [], "unfamiliar": [], "ran": [], "tile_col": [], "tile_row": []}
    gdf = gpd.GeoDataFrame(rows, geometry="geometry", crs=ds.crs) if rows else gpd.GeoDataFrame(cols, geometry=[], crs=ds.crs)
    with atomic_path(path) as tmp:
        gdf.to_file(tmp, driver="GPKG", layer="routing")


def output_names(inputs: list[Path]) -> dict[Path, str]:
    """A distinct output name per input: the file's stem, or where stems collide its path below the inputs'
    common folder (``a/scene.tif`` and ``b/scene.tif`` give ``a_scene`` and ``b_scene``), plus a short hash if needed."""
    stems: dict[str, int] = {}
    for p in inputs:
        stems[p.stem] = stems.get(p.stem, 0) + 1
    res = [p.resolve() for p in inputs]
    common = Path(os.path.commonpath([str(r.parent) for r in res])) if res else Path(".")
    names = {}
    for p, r in zip(inputs, res):
        names[p] = p.stem if stems[p.stem] == 1 else "_".join(r.relative_to(common).with_suffix("").parts)
    seen: dict[str, int] = {}
    for n in names.values():
        seen[n] = seen.get(n, 0) + 1
    for p, r in zip(inputs, res):
        if seen[names[p]] > 1:  # the same file given twice, or names that still collide
            names[p] += "_" + hashlib.sha1(str(r).encode()).hexdigest()[:8]
    return names


def input_identity(src: Path) -> dict:
    """What makes a finished output belong to this input: its absolute path, size and modification time."""
    st = src.stat()
    return {"path": str(src.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def is_complete(src: Path, out: Path, fmt: str = "gpkg", name: str | None = None, model_id: str | None = None) -> bool:
    """True when every output of ``src`` exists and was made from this very file (path, size, modification
    time) by the same bundle; outputs of another input or bundle under the same names are redone."""
    s = outputs_for(src, out, fmt, name=name)
    if not s.summary.exists():
        return False
    try:
        summary = json.loads(s.summary.read_text())
    except json.JSONDecodeError:
        return False
    if src.exists() and summary.get("input_identity") != input_identity(src):
        return False
    if model_id is not None and summary.get("bundle") != model_id:
        return False
    return all(Path(p).exists() for p in summary.get("outputs", []))


@dataclass
class InputResult:
    path: Path
    ok: bool
    message: str
    seconds: float = 0.0
    stats: RunStats | None = None  # None: skipped as complete, or failed


def write_run_summary(out: Path, results: list[InputResult], seconds: float) -> Path:
    """One summary of a run over many scenes: scenes done, skipped and failed (with reasons), tiles, footprints,
    tiles per expert, time; written as OUT/run_summary.json."""
    done = [r for r in results if r.stats is not None]
    per_expert: dict[str, int] = {}
    for r in done:
        for e, n in r.stats.per_expert.items():
            per_expert[str(e)] = per_expert.get(str(e), 0) + n
    tiles = sum(r.stats.tiles for r in done)
    summary = {"scenes": len(results), "predicted": len(done), "skipped_complete": sum(r.ok and r.stats is None for r in results),
               "failed": [{"input": str(r.path), "reason": r.message} for r in results if not r.ok],
               "tiles": tiles, "unfamiliar_tiles": sum(r.stats.unfamiliar for r in done),
               "footprints": sum(r.stats.footprints for r in done), "tiles_per_expert": dict(sorted(per_expert.items())),
               "seconds": round(seconds, 2), "tiles_per_second": round(tiles / seconds, 2) if seconds > 0 else None}
    out.mkdir(parents=True, exist_ok=True)
    path = out / "run_summary.json"
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    return path


def predict_many(model: TileModel, inputs: list[Path], out: Path, cfg: PredictConfig, threshold: float,
                 resume: bool = False, progress: bool = True, gsd: float | None = None) -> list[InputResult]:
    """Predict each input; a failure (unreadable file, out of memory, anything but an interrupt) is recorded with
    its reason and the others still run."""
    results = []
    t0 = time.perf_counter()
    srcs = expand_inputs(inputs)
    names = output_names(srcs)
    model_id = getattr(model, "identity", None)
    for src in srcs:
        if resume and is_complete(src, out, name=names[src], model_id=model_id):
            results.append(InputResult(src, True, "skipped (complete)"))
            continue
        try:
            if not src.exists():
                raise RasterError(f"{src}: no such file")
            outs, st = predict_raster(model, src, out, cfg, threshold, progress, gsd=gsd, name=names[src])
            results.append(InputResult(src, True, f"{st.tiles} tiles, {st.footprints} footprints, "
                                       f"{st.tiles / max(st.seconds, 1e-9):.1f} tiles/s"
                                       + (f", {st.unfamiliar} unfamiliar" if st.unfamiliar else ""), st.seconds, st))
        except Exception as e:  # noqa: BLE001 - one scene's failure (OSError, out of memory) must not end the run
            msg = explain(e, src)
            log.error("%s", msg)
            results.append(InputResult(src, False, msg))
    write_run_summary(out, results, time.perf_counter() - t0)
    return results
