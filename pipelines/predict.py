"""``geomoe predict``: stream a bundle over large rasters into COG masks, a routing layer and footprints.

Per input: tiles are read window by window (resampled to the bundle's GSD), embedded and routed in
batches, grouped by expert so each expert runs on full batches, blended with a smooth window into a
band of rows, and finished rows are written and polygonized as soon as no tile can touch them again.
"""

from __future__ import annotations

import json
import logging
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
from shapely.geometry import box
from tqdm import tqdm

from geomoe.atomic import atomic_path, tmp_name
from geomoe.bundle import Bundle
from geomoe.config import PredictConfig
from geomoe.data.catalog import IMAGE_SUFFIXES
from geomoe.embedding.model import embed_batches
from geomoe.experts.model import predict_probs
from geomoe.pipelines.footprints import FootprintCollector, Piece, pieces_to_frame
from geomoe.pipelines.tiling import BandBlender, TileGrid
from geomoe.raster import (RasterError, ground_sampling_distance, grid_of, image_bands, open_raster, read_window,
                           scale_for, valid_window_mask)

log = logging.getLogger(__name__)
NODATA = 255


class TileModel(Protocol):
    """What prediction needs from a model: tile size, routing, and per-expert probabilities."""

    tile_size: int
    gsd: float | None

    def route(self, tiles: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(expert ids (N, top), blend weights (N, top), distance to the nearest centroid (N,))."""

    def predict(self, expert: int, tiles: torch.Tensor) -> torch.Tensor:
        """Building probability (n, T, T) for uint8 tiles (n, 3, T, T)."""


class BundleModel:
    """A bundle as a TileModel: embeds the centre patch (what the embedding saw in training), routes by FAISS."""

    def __init__(self, bundle: Bundle, soft: bool = False, tta: bool = False):
        self.b, self.soft, self.tta = bundle, soft, tta
        self.tile_size = bundle.config.predict.tile_size
        self.patch = min(bundle.config.data.patch_size, self.tile_size)
        self.gsd = bundle.gsd

    def route(self, tiles: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        o = (tiles.shape[-1] - self.patch) // 2
        emb = embed_batches(self.b.embedding, tiles[..., o:o + self.patch, o:o + self.patch], self.b.device)
        ids, dist = self.b.router.route(emb)
        if self.soft:
            r = self.b.config.router
            sids, w = self.b.router.soft(emb, r.soft_top_k, r.soft_temperature)
            return sids, w, dist
        return ids[:, None], np.ones((len(ids), 1), np.float32), dist

    def predict(self, expert: int, tiles: torch.Tensor) -> torch.Tensor:
        model = self.b.experts[expert]
        p = predict_probs(model, tiles, self.b.device)
        if self.tta:  # flips are exact symmetries of the task: average them back
            p = p + predict_probs(model, tiles.flip(-1), self.b.device).flip(-1)
            p = p + predict_probs(model, tiles.flip(-2), self.b.device).flip(-2)
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

    def all(self) -> list[Path]:
        return [p for p in (self.prob, self.mask, self.routing, self.footprints, self.geojson, self.summary) if p]


def outputs_for(src: Path, out: Path, fmt: str = "gpkg", geojson: bool = True) -> Outputs:
    s = src.stem
    return Outputs(out / f"{s}_prob.tif", out / f"{s}_mask.tif", out / f"{s}_routing.gpkg",
                   out / f"{s}_footprints.{fmt}", out / f"{s}_footprints.geojson" if geojson else None,
                   out / f"{s}_summary.json")


def expand_inputs(inputs: list[Path]) -> list[Path]:
    """Files as given; folders become their rasters; a .txt lists one path per line (relative to it)."""
    out: list[Path] = []
    for p in inputs:
        if p.is_dir():
            out += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
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
        win = Window(0, row0, prob.shape[1], prob.shape[0])
        p8 = (np.clip(prob, 0, 1) * 254 + 0.5).astype(np.uint8)
        p8[~valid] = NODATA
        self.prob.write(p8, 1, window=win)
        m = (prob >= threshold) & valid
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
        if self.json_tmp is not None:
            self.json_tmp.replace(self.outs.geojson)
        self.vec_tmp.replace(self.outs.footprints)

    def abort(self) -> None:
        self.close()
        for p in (self.raw_prob, self.raw_mask, self.vec_tmp, self.json_tmp):
            if p is not None:
                p.unlink(missing_ok=True)


def predict_raster(model: TileModel, src: Path, out: Path, cfg: PredictConfig, threshold: float,
                   progress: bool = True, fmt: str = "gpkg") -> tuple[Outputs, RunStats]:
    """Predict one raster; every output appears under its final name only when complete."""
    t0 = time.perf_counter()
    with open_raster(src) as probe:
        width = probe.width
    # GDAL's block cache defaults to 5% of RAM and fills up on big rasters. Streaming needs only about
    # two rows of 512 px blocks of the input and both outputs (width x 3.5 kB); more just grows RSS.
    cache_mb = max(cfg.gdal_cache_mb, int(width * 3584 / 2**20) + 16)
    with rasterio.Env(GDAL_CACHEMAX=cache_mb):
        ds = open_raster(src)
        try:
            return _predict(model, ds, src, out, cfg, threshold, progress, fmt, t0)
        finally:
            ds.close()


def _predict(model: TileModel, ds, src: Path, out: Path, cfg: PredictConfig, threshold: float, progress: bool,
             fmt: str, t0: float):
    bands, alpha = image_bands(ds, src)
    if ds.count > 4:
        raise RasterError(f"{src}: {ds.count} bands; the bundle expects RGB (3), RGBA (4) or a single band")
    gsd = ground_sampling_distance(grid_of(ds))
    if ds.crs is None:
        warnings.warn(f"{src}: no CRS; outputs are in pixel coordinates and no GeoJSON is written", stacklevel=2)
    elif ds.crs.is_geographic:
        log.info("%s: geographic CRS; footprints are regularised in the local UTM zone", src.name)
    scale = scale_for(gsd, model.gsd)
    T = model.tile_size
    t_src = max(1, int(round(T * scale)))
    grid = TileGrid(ds.width, ds.height, t_src, int(round(cfg.overlap * scale)))
    out.mkdir(parents=True, exist_ok=True)
    outs = outputs_for(src, out, fmt, geojson=ds.crs is not None)
    expert_grid = np.full((len(grid.ys), len(grid.xs)), -1, np.int16)
    dist_grid = np.full(expert_grid.shape, np.nan, np.float32)
    ex, ey = grid.cell_edges("x"), grid.cell_edges("y")

    def expert_at(cols: np.ndarray, rows: np.ndarray) -> np.ndarray:
        ix = np.clip(np.searchsorted(ex, cols, side="right") - 1, 0, len(grid.xs) - 1)
        iy = np.clip(np.searchsorted(ey, rows, side="right") - 1, 0, len(grid.ys) - 1)
        return expert_grid[iy, ix]

    writers = _Writers(ds, outs, gsd, cfg, expert_at)
    collector = FootprintCollector(ds.width, writers.write_pieces, batch=1000)
    stats = RunStats()

    def sink(row0: int, prob: np.ndarray) -> None:
        win = Window(0, row0, ds.width, prob.shape[0])
        valid = valid_window_mask(ds, win, prob.shape, alpha, True)
        m = writers.write_rows(row0, prob, valid, threshold)
        collector.add_band(row0, m, prob)  # probabilities are only summed inside m, which excludes nodata

    blender = BandBlender(grid, sink)
    bar = tqdm(total=len(grid), desc=src.name, unit="tile", disable=not progress)
    try:
        row = list(range(len(grid.xs)))
        for iy in range(len(grid.ys)):
            blender.start_row(iy)
            for chunk in (row[i:i + 4 * cfg.batch_size] for i in range(0, len(row), 4 * cfg.batch_size)):
                _run_chunk(model, ds, bands, alpha, grid, iy, chunk, T, t_src, cfg, blender, expert_grid, dist_grid, stats)
                bar.update(len(chunk))
        blender.finish()
        collector.finish()
        bar.close()
        stats.footprints = writers.count
        _write_routing(outs.routing, grid, ex, ey, expert_grid, dist_grid, ds)
        writers.finish()
    except BaseException:
        bar.close()
        writers.abort()
        raise
    stats.seconds = time.perf_counter() - t0
    with atomic_path(outs.summary) as tmp:
        tmp.write_text(json.dumps({"input": str(src), "tiles": stats.tiles, "empty_tiles": stats.skipped_tiles,
                                   "seconds": round(stats.seconds, 2), "tiles_per_second": round(len(grid) / stats.seconds, 2),
                                   "footprints": stats.footprints, "tiles_per_expert": stats.per_expert,
                                   "gsd": gsd, "bundle_gsd": model.gsd, "crs": str(ds.crs) if ds.crs else None,
                                   "outputs": [str(p) for p in outs.all() if p != outs.summary]}, indent=2))
    if stats.tiles == 0:
        warnings.warn(f"{src}: no valid data (all nodata); outputs are empty", stacklevel=2)
    return outs, stats


def _run_chunk(model: TileModel, ds, bands, alpha, grid: TileGrid, iy: int, cols: list[int], T: int, t_src: int,
               cfg: PredictConfig, blender: BandBlender, expert_grid: np.ndarray, dist_grid: np.ndarray,
               stats: RunStats) -> None:
    """Read, route, predict (grouped by expert) and blend one chunk of a tile row."""
    y0 = int(grid.ys[iy])
    tiles, keep = [], []
    for ix in cols:
        win = Window(int(grid.xs[ix]), y0, t_src, t_src)
        v = valid_window_mask(ds, win, (T, T), alpha, True)
        if not v.any():
            stats.skipped_tiles += 1
            continue
        tiles.append(read_window(ds, bands, win, (T, T), Resampling.bilinear if t_src != T else Resampling.nearest))
        keep.append(ix)
    if not keep:
        return
    batch = torch.from_numpy(np.stack(tiles))
    ids, weights, dist = model.route(batch)
    probs = torch.zeros(len(keep), T, T)
    for e in np.unique(ids):
        rows, slots = np.nonzero(ids == e)
        for s in range(0, len(rows), cfg.batch_size):
            r = rows[s:s + cfg.batch_size]
            p = model.predict(int(e), batch[r])
            probs[r] += p * torch.from_numpy(weights[r, slots[s:s + cfg.batch_size]])[:, None, None]
        stats.per_expert[int(e)] = stats.per_expert.get(int(e), 0) + int((ids[:, 0] == e).sum())
    if t_src != T:
        probs = F.interpolate(probs[:, None], size=(t_src, t_src), mode="bilinear", align_corners=False)[:, 0]
    for j, ix in enumerate(keep):
        blender.add(ix, iy, probs[j].numpy())
        expert_grid[iy, ix] = ids[j, 0]
        dist_grid[iy, ix] = dist[j]
    stats.tiles += len(keep)


def _write_routing(path: Path, grid: TileGrid, ex: np.ndarray, ey: np.ndarray, experts: np.ndarray, dist: np.ndarray, ds) -> None:
    """One polygon per tile's cell, with the expert that handled it and its distance to that centroid."""
    rows = []
    t = ds.transform
    for iy in range(len(grid.ys)):
        for ix in range(len(grid.xs)):
            if experts[iy, ix] < 0:
                continue
            x0, y0 = t @ (ex[ix], ey[iy])
            x1, y1 = t @ (ex[ix + 1], ey[iy + 1])
            rows.append({"expert": int(experts[iy, ix]), "distance": float(dist[iy, ix]), "tile_col": ix, "tile_row": iy,
                         "geometry": box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))})
    gdf = gpd.GeoDataFrame(rows, geometry="geometry", crs=ds.crs) if rows else gpd.GeoDataFrame(
        {"expert": [], "distance": [], "tile_col": [], "tile_row": []}, geometry=[], crs=ds.crs)
    with atomic_path(path) as tmp:
        gdf.to_file(tmp, driver="GPKG", layer="routing")


def is_complete(src: Path, out: Path, fmt: str = "gpkg") -> bool:
    """True when every output of ``src`` exists (each is renamed into place only when complete)."""
    s = outputs_for(src, out, fmt)
    if not s.summary.exists():
        return False
    listed = json.loads(s.summary.read_text()).get("outputs", [])
    return all(Path(p).exists() for p in listed)


@dataclass
class InputResult:
    path: Path
    ok: bool
    message: str
    seconds: float = 0.0


def predict_many(model: TileModel, inputs: list[Path], out: Path, cfg: PredictConfig, threshold: float,
                 resume: bool = False, progress: bool = True) -> list[InputResult]:
    """Predict each input; a failure is recorded and the others still run."""
    results = []
    for src in expand_inputs(inputs):
        if resume and is_complete(src, out):
            results.append(InputResult(src, True, "skipped (complete)"))
            continue
        try:
            if not src.exists():
                raise RasterError(f"{src}: no such file")
            outs, st = predict_raster(model, src, out, cfg, threshold, progress)
            results.append(InputResult(src, True, f"{st.tiles} tiles, {st.footprints} footprints, "
                                       f"{st.tiles / max(st.seconds, 1e-9):.1f} tiles/s",
                                       st.seconds))
        except (RasterError, rasterio.errors.RasterioError, ValueError) as e:
            log.error("%s", e)
            results.append(InputResult(src, False, str(e)))
    return results
