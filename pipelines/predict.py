"""``geomoe predict``: stream a bundle over large rasters into COG masks, a routing layer and footprints.

One scene flows through small stages (each its own module):

    tile source (reader threads, a row of tiles ahead)  -> routing and expert inference, grouped by expert over a
    tile row (pipelines.inference)  -> blending into a band of rows (pipelines.tiling)  -> band writer on its own
    thread behind a bounded queue: probability and mask rows, instance separation, polygons, regularisation
    (pipelines.writers; with ``predict.footprint_workers`` each band's watershed and polygons, and the
    regularisation, run over worker processes, pipelines.pool)

so the model's thread only routes, predicts and blends. Queues are bounded: memory holds a few tile rows across
the scene's width, whatever its height.
Many scenes: ``predict_many`` here, or over a Ray cluster (pipelines.ray_engine).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import torch
from tqdm import tqdm

from geomoe import interrupt
from geomoe.config import PredictConfig
from geomoe.pipelines.background import Consumer
from geomoe.pipelines.calibration import Calibration, Calibrations
from geomoe.pipelines.inference import (InlineSmoothing, RoutingLayer, TileModel, predict_batches, route_row,
                                        route_scene)
from geomoe.pipelines.outputs import (InputResult, Outputs, Provenance, RunRequest, RunStats, expand_inputs,
                                      is_complete, output_names, outputs_for, write_run_summary, write_scene_summary)
from geomoe.pipelines.footprints import Piece
from geomoe.pipelines.instances import Separation
from geomoe.pipelines.tile_source import TileSource, open_tiles
from geomoe.pipelines.tiling import BandBlender, TileGrid
from geomoe.pipelines.writers import OUT_BLOCK, Band, BandWriter, SceneWriters, write_routing
from geomoe.raster import RasterError, explain, open_raster

log = logging.getLogger(__name__)


def _on_cuda(model: TileModel) -> bool:
    dev = getattr(model, "device", None)
    return dev is not None and torch.device(dev).type == "cuda"


def reader_threads(cfg: PredictConfig, model: TileModel) -> int:
    """``predict.readers``, or by default one reader beside a CPU model (the model wants the cores) and enough
    to keep a GPU fed."""
    if cfg.readers is not None:
        return cfg.readers
    return min(8, max(2, (os.cpu_count() or 2) - 2)) if _on_cuda(model) else 1


def block_cache_bytes(ds, tile: int, readers: int) -> int:
    """GDAL block cache streaming needs (GDAL's default, 5% of RAM, just grows RSS on big rasters).

    A reader works across a tile row, so it needs the blocks under two neighbouring tiles, over the rows a tile
    spans. A tiled input needs no more however wide it is: a block is decoded again when the next tile row reaches
    it (a few ms, beside a tile row of model work). A striped input's blocks are the raster's whole width, so it
    needs a tile row of strips. The outputs are written in blocks 64 rows high (``SceneWriters``): whole blocks
    but for one partial block row each."""
    block_h, block_w = ds.block_shapes[0]
    px = sum(np.dtype(d).itemsize for d in ds.dtypes)
    rows = tile + block_h  # the rows a tile (``tile`` source pixels) spans, rounded out to whole blocks
    cols = ds.width if block_w >= ds.width else 2 * max(block_w, tile)
    return max(1, readers) * rows * cols * px + 2 * OUT_BLOCK[0] * ds.width


def predict_raster(model: TileModel, src: Path, out: Path, cfg: PredictConfig, threshold: float,
                   progress: bool = True, gsd: float | None = None,
                   name: str | None = None) -> tuple[Outputs, RunStats]:
    """Predict one raster; every output appears under its final name only when complete.

    ``gsd`` (m/pixel) is used when the raster has no CRS; otherwise a locations.csv above it is asked.
    """
    return predict_file(model, src, out, RunRequest(cfg, threshold, gsd), name, progress)


def predict_file(model: TileModel, src: Path, out: Path, req: RunRequest, name: str | None = None,
                 progress: bool = True) -> tuple[Outputs, RunStats]:
    """:func:`predict_raster` for a run's request; ``name``: the outputs' name (default the file's stem)."""
    t0 = time.perf_counter()
    with rasterio.Env(GDAL_CACHEMAX=req.cfg.gdal_cache_mb):  # raised to what the input's blocks need once it is open
        ds = open_raster(src)
        try:
            tiles = open_tiles(model, ds, src, req.cfg, req.gsd, pin=_on_cuda(model) and torch.cuda.is_available())
            try:
                need = block_cache_bytes(ds, tiles.t_src, reader_threads(req.cfg, model))
                outs = outputs_for(src, out, geojson=ds.crs is not None, name=name,
                                   parquet=req.cfg.geoparquet)
                with rasterio.Env(GDAL_CACHEMAX=max(req.cfg.gdal_cache_mb, int(need / 2**20) + 16)):
                    return _run_scene(model, tiles, outs, req, progress, t0)
            finally:
                tiles.close()
        finally:
            ds.close()


@dataclass
class RowSpan:
    """The tile rows [a, b) a run answers for and the output rows [y0, y1) they finish: a whole scene, or one strip
    of it (pipelines.strips). The tile row before ``a`` is read too: it lends its overlap to rows from y0 on."""

    a: int
    b: int
    y0: int
    y1: int

    @classmethod
    def whole(cls, grid: TileGrid) -> "RowSpan":
        return cls(0, len(grid.ys), 0, grid.height)

    @property
    def first(self) -> int:
        return max(self.a - 1, 0)


def footprint_rules(model: TileModel, req: RunRequest) -> Calibrations:
    """How each network's outputs become footprints in this run: the model's calibrations (a bundle's: each expert
    its own), with the request's smallest footprint for all where it is not the model's (``--min-area``); a plain
    TileModel: the request's threshold and smallest footprint, its separation or the defaults."""
    own = getattr(model, "calibrations", None)
    if own is None:
        return Calibrations(Calibration(req.threshold, getattr(model, "separation", None) or Separation(),
                                        req.cfg.min_area_m2))
    return own if own.default.min_area_m2 == req.cfg.min_area_m2 else own.with_min_area(req.cfg.min_area_m2)


def cell_index(grid: TileGrid) -> Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(cols, rows) of pixels -> (tile column, tile row) of the cell each pixel falls in."""
    ex, ey = grid.cell_edges("x"), grid.cell_edges("y")

    def index(cols: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ix = np.clip(np.searchsorted(ex, cols, side="right") - 1, 0, len(grid.xs) - 1)
        iy = np.clip(np.searchsorted(ey, rows, side="right") - 1, 0, len(grid.ys) - 1)
        return ix, iy

    return index


def stream_rows(model: TileModel, tiles: TileSource, span: RowSpan, req: RunRequest, layer: RoutingLayer,
                writers: SceneWriters, progress: bool = False,
                emit: Callable[[list[Piece]], None] | None = None) -> RunStats:
    """Read, route, predict and blend the tile rows of ``span``; its finished output rows go to ``writers`` (their
    row 0 is ``span.y0``) on the write-behind worker, footprints to ``emit`` (default: the writers)."""
    cfg = req.cfg
    grid, readers = tiles.grid, reader_threads(cfg, model)
    cells = cell_index(grid)
    # thresholds and watershed seeds as calibrated for the network that ran at each pixel
    rules = writers.rules
    band_writer = BandWriter(writers, grid.width, rules, emit)
    # one band written while the model works on the next tile row: each band is a tile row x width (tens of MB for
    # a wide raster), and one more waiting would only hold a copy of it whenever the model is the slower
    consumer = Consumer(band_writer, depth=0, threaded=cfg.write_behind)
    stats, context = RunStats(), RunStats()  # the context row's tiles belong to the strip above

    def sink(row0: int, prob: np.ndarray, valid: np.ndarray) -> None:
        lo, hi = max(row0, span.y0), min(row0 + prob.shape[1], span.y1)
        if lo >= hi:
            return
        prob, valid = prob[:, lo - row0:hi - row0], valid[lo - row0:hi - row0].copy()
        skipped = cfg.unfamiliar == "skip" and (layer.ran == -2).any()
        ran = None
        if skipped or not rules.uniform:  # what ran at each pixel: its cell's network
            cx, cy = cells(np.arange(grid.width), np.arange(lo, hi))
            ran = layer.ran[cy][:, cx]
        if skipped:  # tiles skipped as unfamiliar: nodata cells
            valid &= ran != -2
        # copied (the blender reuses its band) only once the writer has room for it
        consumer.put_made(lambda: Band(lo - span.y0, prob.copy(), valid, None if rules.uniform else ran))

    channels = getattr(model, "channels", 1)
    # the watershed must see whole buildings: instance outputs are flushed a tile row at a time, not in strips
    blender = BandBlender(grid, sink, flush_rows=None if channels > 1 else 64, channels=channels,
                          top=int(grid.ys[span.first]))
    total = len(grid.xs) * (span.b - span.a)
    bar = tqdm(total=total, desc=tiles.path.name, unit="tile", disable=not progress)
    # smoothed routing settles a row once the row below is routed; a strip also routes (only) the row above its
    # context row and the row below its last, so its routes are the whole scene's
    smoothing = InlineSmoothing(layer) if cfg.routing == "smoothed" else None
    n = len(grid.ys)
    start, stop = (max(span.first - 1, 0), min(span.b + 1, n)) if smoothing else (span.first, span.b)
    try:
        rows = tiles.rows(readers, cfg.read_ahead or readers, start, stop)
        if smoothing is not None:
            rows = smoothing.in_order(model, rows, 4 * cfg.batch_size, span.first, span.b)
        for row in rows:
            interrupt.check()
            blender.start_row(row.iy)
            routed = route_row(model, row, cfg, layer, stats if row.iy >= span.a else context)
            if routed is not None:  # each batch blended as it comes: a wide row's outputs are never all held
                for r, p in predict_batches(model, routed, tiles.t_src, cfg):
                    for j, k in enumerate(r):
                        blender.add(routed.cols[k], routed.iy, p[j].numpy(), routed.valid[k])
            if row.iy >= span.a:
                bar.update(len(row.cols) + row.empty)
        if span.b < len(grid.ys):
            blender.start_row(span.b)  # rows above the next strip's first tile row are final
        else:
            blender.finish()
        consumer.close()
        band_writer.finish()
        interrupt.check()
    except BaseException:
        consumer.abort()
        band_writer.cancel()
        raise
    finally:
        bar.close()
    return stats


def _run_scene(model: TileModel, tiles: TileSource, outs: Outputs, req: RunRequest, progress: bool,
               t0: float) -> tuple[Outputs, RunStats]:
    ds, grid, src, cfg = tiles.ds, tiles.grid, tiles.path, req.cfg
    outs.summary.parent.mkdir(parents=True, exist_ok=True)
    if cfg.routing == "scene":  # one expert for the scene: every tile routed first
        layer = route_scene(model, tiles, cfg.routing, cfg, reader_threads(cfg, model), progress, src.name)
    else:  # tile by tile, or smoothed within the one pass (stream_rows)
        layer = RoutingLayer.empty(len(grid.ys), len(grid.xs))
    cells = cell_index(grid)

    def expert_at(cols: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """What ran at these pixels: an expert id, k for the single network (unfamiliar tiles), -2 skipped."""
        ix, iy = cells(cols, rows)
        return layer.ran[iy, ix]

    writers = SceneWriters(ds, outs, tiles.gsd, cfg, expert_at, footprint_rules(model, req))
    try:
        stats = stream_rows(model, tiles, RowSpan.whole(grid), req, layer, writers, progress)
        write_routing(outs.routing, grid, layer, ds, getattr(model, "run_names", {}))
        writers.finish()
        stats.footprints = writers.count  # after finish: the last batches are written there
    except BaseException:
        writers.abort()
        raise
    stats.seconds = time.perf_counter() - t0
    write_scene_summary(outs, src, req.provenance(model), stats, len(grid), {
        "routing": cfg.routing, "unfamiliar_action": cfg.unfamiliar, "gsd": tiles.gsd, "model_gsd": tiles.model_gsd,
        "crs": str(ds.crs) if ds.crs else None})
    if stats.tiles == 0:
        warnings.warn(f"{src}: no valid data (all nodata); outputs are empty", stacklevel=3)
    return outs, stats


def scenes_to_do(inputs: list[Path], out: Path, resume: bool, made_by: Provenance | None
                 ) -> tuple[list[tuple[Path, str]], list[InputResult], dict[Path, int]]:
    """(input, output name) of each scene to predict, the results of those skipped as complete (``resume``), and
    each input's place in the run (results are reported in that order)."""
    srcs = expand_inputs(inputs)
    names = output_names(srcs)
    todo, skipped = [], []
    for src in srcs:
        if resume and is_complete(src, out, name=names[src], made_by=made_by):
            skipped.append(InputResult(src, True, "skipped (complete)"))
        else:
            todo.append((src, names[src]))
    return todo, skipped, {p: i for i, p in enumerate(srcs)}


def predict_scene(model: TileModel, src: Path, name: str, out: Path, req: RunRequest,
                  progress: bool = True) -> InputResult:
    """Predict one scene; a failure (unreadable file, out of memory, anything but an interrupt) comes back as a
    result with its reason, so the other scenes still run."""
    try:
        if not src.exists():
            raise RasterError(f"{src}: no such file")
        _, st = predict_file(model, src, out, req, name, progress)
        return InputResult(src, True, f"{st.tiles} tiles, {st.footprints} footprints, "
                           f"{st.tiles / max(st.seconds, 1e-9):.1f} tiles/s"
                           + (f", {st.unfamiliar} unfamiliar" if st.unfamiliar else ""), st.seconds, st)
    except Exception as e:  # noqa: BLE001 - one scene's failure (OSError, out of memory) must not end the run
        msg = explain(e, src)
        log.error("%s", msg)
        return InputResult(src, False, msg)


def predict_many(model: TileModel, inputs: list[Path], out: Path, req: RunRequest, resume: bool = False,
                 progress: bool = True) -> list[InputResult]:
    """Predict each input in this process (the local engine); writes OUT/run_summary.json."""
    t0 = time.perf_counter()
    todo, results, order = scenes_to_do(inputs, out, resume, req.provenance(model))
    for src, name in todo:
        interrupt.check()
        results.append(predict_scene(model, src, name, out, req, progress))
    results.sort(key=lambda r: order.get(r.path, 0))
    write_run_summary(out, results, time.perf_counter() - t0)
    return results
