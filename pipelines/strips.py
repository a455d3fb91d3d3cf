"""One very large scene in strips: several workers predict bands of tile rows, one merges them into the scene's
outputs.

A strip answers for tile rows [a, b) and finishes output rows [ys[a], ys[b]); it also reads tile row a - 1, whose
overlap it needs, so every output pixel is blended from exactly the tiles the whole-scene run blends (the same
rasters, byte for byte). Its footprints are made where it runs, except those touching its first or last output row:
those go back to the merge, which joins the pieces that meet across a strip border (4-connectivity, as within a
scene) before cleaning and regularising them. Smoothed routing is local (a tile's 3 x 3 neighbourhood): a strip
also routes the row above its context row and the row below its last (pipelines/predict.stream_rows), and so
smooths its rows exactly as the whole scene does. Per-scene routing looks at the whole scene first: such a scene
runs whole.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyogrio
import shapely
from rasterio.windows import Window
from shapely.affinity import translate
from shapely.geometry import box

from geomoe.pipelines.calibration import Calibrations
from geomoe.pipelines.footprints import Piece, _UnionFind, scene_area_crs
from geomoe.pipelines.inference import RoutingLayer, TileModel
from geomoe.pipelines.outputs import (InputResult, Outputs, Provenance, RunRequest, RunStats, outputs_for,
                                      write_scene_summary)
from geomoe.pipelines.predict import RowSpan, cell_index, footprint_rules, stream_rows
from geomoe.pipelines.tile_source import open_tiles
from geomoe.pipelines.tiling import TileGrid
from geomoe.pipelines.writers import NODATA, SceneWriters, write_routing
from geomoe.raster import open_raster


@dataclass
class Strip:
    src: Path
    name: str
    index: int
    count: int
    span: RowSpan
    work: Path  # where its parts go until the merge (a folder every worker and the merge can reach)


@dataclass
class StripResult:
    strip: Strip
    prob: Path
    mask: Path
    footprints: Path | None  # its own footprints (GPKG); None when it has none
    boundary: list[Piece]  # pieces touching its first or last row, in the scene's pixel coordinates
    routing: dict[str, np.ndarray]  # its tile rows of the routing layer
    stats: RunStats
    grid: tuple[int, int, int, int]  # the scene's TileGrid (width, height, tile, overlap)
    gsd: float | None = None
    target: float | None = None
    run_names: dict[int, str] = field(default_factory=dict)  # the networks beyond the experts (routing layer)
    footprints_written: int = 0
    rules: Calibrations | None = None  # how each network's outputs became footprints (the joined pieces' too)


@dataclass
class StripPlan:
    strips: list[Strip] = field(default_factory=list)  # empty: the scene is small enough to run whole


def plan_strips(model: TileModel, src: Path, name: str, out: Path, req: RunRequest, rows_per_strip: int) -> StripPlan:
    """Strips of ``rows_per_strip`` tile rows; none when the scene has no more rows than that or its routing looks
    at the whole scene (per-scene routing)."""
    with open_raster(src) as ds:
        grid = open_tiles(model, ds, src, req.cfg, req.gsd, warn=False).grid
    n = len(grid.ys)
    if n <= rows_per_strip or req.cfg.routing == "scene":
        return StripPlan()
    cuts = list(range(0, n, rows_per_strip)) + [n]
    work = out / ".strips" / name
    spans = [RowSpan(a, b, int(grid.ys[a]), int(grid.ys[b]) if b < n else grid.height) for a, b in zip(cuts, cuts[1:])]
    return StripPlan([Strip(src, name, i, len(spans), s, work) for i, s in enumerate(spans)])


def predict_strip(model: TileModel, strip: Strip, req: RunRequest) -> StripResult:
    """Predict one strip into its part rasters and footprints; held-back boundary pieces come back."""
    span, cfg = strip.span, req.cfg
    strip.work.mkdir(parents=True, exist_ok=True)
    base = strip.work / f"strip{strip.index:05d}"
    with open_raster(strip.src) as ds:
        tiles = open_tiles(model, ds, strip.src, cfg, req.gsd, warn=False)
        try:
            grid = tiles.grid
            layer = RoutingLayer.empty(len(grid.ys), len(grid.xs))
            cells = cell_index(grid)
            h = span.y1 - span.y0
            view = SimpleNamespace(width=ds.width, height=h, crs=ds.crs,
                                   transform=ds.window_transform(Window(0, span.y0, ds.width, h)))

            def expert_at(cols: np.ndarray, rows: np.ndarray) -> np.ndarray:
                ix, iy = cells(cols, rows)
                return layer.ran[iy, ix]

            outs = Outputs(Path(f"{base}_prob.tif"), Path(f"{base}_mask.tif"), Path(f"{base}_routing.gpkg"),
                           Path(f"{base}_footprints.gpkg"), None, Path(f"{base}_summary.json"))
            rules = footprint_rules(model, req)
            writers = SceneWriters(view, outs, tiles.gsd, cfg, expert_at, rules)  # part rasters: the strip's rows only
            # footprints in the scene's pixel grid (the whole run's coordinates), areas measured as the whole scene's,
            # and the scene's edge, not the strip's
            writers.spec = replace(writers.spec, transform=ds.transform, size=(ds.width, ds.height),
                                   area_crs=scene_area_crs(ds.crs, ds.transform, ds.width, ds.height))
            held: list[Piece] = []
            top_open, bottom_open = strip.index > 0, strip.index < strip.count - 1

            def emit(pieces: list[Piece]) -> None:
                own = []
                for p in pieces:
                    _, miny, _, maxy = p.geom.bounds
                    piece = Piece(translate(p.geom, yoff=span.y0), p.pixels, p.prob_sum, p.cut)  # the scene's rows
                    if (top_open and miny <= 0) or (bottom_open and maxy >= h):
                        held.append(piece)
                    else:
                        own.append(piece)
                if own:
                    writers.write_pieces(own)

            try:
                stats = stream_rows(model, tiles, span, req, layer, writers, emit=emit)
            except BaseException:
                writers.abort()
                raise
            writers.close()
        finally:
            tiles.close()
    rows = slice(span.a, span.b)
    return StripResult(strip, writers.raw_prob, writers.raw_mask,
                       writers.vec_tmp if writers.vec_tmp.exists() else None, held,
                       {k: getattr(layer, k)[rows].copy() for k in ("experts", "distance", "unfamiliar", "ran")},
                       stats, (grid.width, grid.height, grid.tile, grid.overlap), tiles.gsd, tiles.model_gsd,
                       getattr(model, "run_names", {}), writers.count, rules)


def _void_rows(r: StripResult) -> tuple[np.ndarray, np.ndarray]:
    """Nodata in a strip's first and last rows, as its part mask holds them."""
    with open_raster(r.mask) as ds:
        first = ds.read(1, window=Window(0, 0, ds.width, 1))[0] == NODATA
        last = ds.read(1, window=Window(0, ds.height - 1, ds.width, 1))[0] == NODATA
    return first, last


def _on_void(row: shapely.Geometry, void: np.ndarray) -> bool:
    """Whether a piece's outline within one row (``row``) covers a column of ``void``: its parts of positive area
    (an intersection also holds the lines where the outline only touches the row)."""
    parts = shapely.get_parts(shapely.get_parts(row))
    parts = parts[shapely.area(parts) > 0]
    return any(void[int(round(b[0])):int(round(b[2]))].any() for b in shapely.bounds(parts))


def join_boundary_pieces(results: list[StripResult], width: int) -> list[Piece]:
    """Union the held-back pieces that share pixels across strip borders (4-connectivity: one pixel above the other);
    those facing nodata across a border are cut, as the stream marks them."""
    pieces = [p for r in results for p in r.boundary]
    if not pieces:
        return []
    uf = _UnionFind()
    owner = [i for i, r in enumerate(results) for _ in r.boundary]
    cut = [p.cut for p in pieces]
    voids = [_void_rows(r) for r in results]
    for k in range(len(results) - 1):
        y = results[k + 1].strip.span.y0
        above = [i for i, o in enumerate(owner) if o == k and pieces[i].geom.bounds[3] >= y]
        below = [i for i, o in enumerate(owner) if o == k + 1 and pieces[i].geom.bounds[1] <= y]
        # the last row above, moved down one row, against the first row below: overlap of positive length = a shared
        # column, the same test as the stream's label comparison
        rows_above = [translate(shapely.intersection(pieces[i].geom, box(0, y - 1, width, y)), yoff=1) for i in above]
        rows_below = [shapely.intersection(pieces[i].geom, box(0, y, width, y + 1)) for i in below]
        for i, g in zip(above, rows_above):
            cut[i] |= _on_void(g, voids[k + 1][0])
        for i, g in zip(below, rows_below):
            cut[i] |= _on_void(g, voids[k][1])
        if not above or not below:
            continue
        tree = shapely.STRtree(rows_below)
        for ia, ga in zip(above, rows_above):
            for jb in tree.query(ga):
                if shapely.intersection(ga, rows_below[jb]).area > 0:
                    uf.union(ia, below[jb])
    groups: dict[int, list[int]] = {}
    for i in range(len(pieces)):
        groups.setdefault(uf.find(i), []).append(i)
    joined = []
    for members in groups.values():
        parts = [pieces[m] for m in members]
        geom = parts[0].geom if len(parts) == 1 else shapely.union_all([p.geom for p in parts])
        joined.append(Piece(geom, sum(p.pixels for p in parts), sum(p.prob_sum for p in parts),
                            any(cut[m] for m in members)))
    return joined


def merge_strips(results: list[StripResult], out: Path, req: RunRequest, made_by: Provenance | None = None,
                 started: float | None = None) -> InputResult:
    """The scene's outputs from its strips: rasters copied row by row into the COGs, footprints appended in chunks,
    the boundary pieces joined; every output appears under its final name only when complete. ``made_by``: the
    run's bundle and settings, for the scene's summary (resume compares them)."""
    results, cfg = sorted(results, key=lambda r: r.strip.index), req.cfg
    first = results[0]
    src, name = first.strip.src, first.strip.name
    grid = TileGrid(*first.grid)
    layer = RoutingLayer.empty(len(grid.ys), len(grid.xs))
    for r in results:
        for k, v in r.routing.items():
            getattr(layer, k)[r.strip.span.a:r.strip.span.b] = v
    cells = cell_index(grid)

    def expert_at(cols: np.ndarray, rows: np.ndarray) -> np.ndarray:
        ix, iy = cells(cols, rows)
        return layer.ran[iy, ix]

    stats = RunStats()
    for r in results:
        stats.tiles += r.stats.tiles
        stats.skipped_tiles += r.stats.skipped_tiles
        stats.unfamiliar += r.stats.unfamiliar
        for e, n in r.stats.per_expert.items():
            stats.per_expert[e] = stats.per_expert.get(e, 0) + n
    out.mkdir(parents=True, exist_ok=True)
    with open_raster(src) as ds:
        outs = outputs_for(src, out, geojson=ds.crs is not None, name=name, parquet=cfg.geoparquet)
        writers = SceneWriters(ds, outs, first.gsd, cfg, expert_at, first.rules)
        try:
            for r in results:
                writers.copy_rows(r.prob, r.mask, r.strip.span.y0)
                if r.footprints is not None:
                    n = pyogrio.read_info(r.footprints, layer="footprints")["features"]
                    for s in range(0, n, 5000):
                        gdf = pyogrio.read_dataframe(r.footprints, layer="footprints", skip_features=s, max_features=5000)
                        writers.write_frame(gdf)
            joined = join_boundary_pieces(results, grid.width)
            if joined:
                writers.write_pieces(joined)
            write_routing(outs.routing, grid, layer, ds, first.run_names)
            writers.finish()
            stats.footprints = writers.count  # after finish: the last batches are written there
        except BaseException:
            writers.abort()
            raise
        stats.seconds = time.time() - started if started is not None else 0.0  # wall clock: strips ran elsewhere
        write_scene_summary(outs, src, made_by or Provenance(None, {}), stats, len(grid), {
            "routing": cfg.routing, "unfamiliar_action": cfg.unfamiliar, "gsd": first.gsd, "model_gsd": first.target,
            "crs": str(ds.crs) if ds.crs else None, "strips": len(results)})
    shutil.rmtree(first.strip.work, ignore_errors=True)
    try:
        first.strip.work.parent.rmdir()  # .strips, once no other scene's parts are in it
    except OSError:
        pass
    return InputResult(src, True, f"{stats.tiles} tiles in {len(results)} strips, {stats.footprints} footprints",
                       stats.seconds, stats)
