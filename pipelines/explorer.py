"""The report's interactive parts, as Bokeh models that work offline: the embedding explorer, scene maps and a
chart of the metrics per location.

The explorer places every embedded patch (and the tiles of predicted scenes) in a 2-D UMAP of the embedding
space: hover shows the patch, its location, split, region and distance to the nearest centroid; colour by
location, region or split; click a legend entry to hide a location. Over ``limit`` patches a stated random
subset is drawn, so a page of thousands stays responsive.
"""

from __future__ import annotations

import base64
import io
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from geomoe.bundle import Bundle
from geomoe.config import PredictConfig
from geomoe.data.datasets import Prepared
from geomoe.embedding.extract import Embeddings

log = logging.getLogger(__name__)
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]
SPLIT_COLOURS = {"train": "#4c72b0", "val": "#dd8452", "test": "#55a868", "scene": "#c44e52"}


@dataclass
class PointSet:
    """Points of one kind in embedding space: a location's patches, or the tiles of one predicted scene."""

    name: str  # the location, or the scene's name
    kind: str  # "patches" or "scene"
    vectors: np.ndarray  # (n, dim) unit norm
    split: list[str]  # train / val / test, or "scene"
    thumbs: list[str] = field(default_factory=list)  # PNG data URIs ('' where the image is not at hand)
    where: list[str] = field(default_factory=list)  # the file (and window) each point comes from


@dataclass
class ExplorerData:
    """What the explorer draws, and how many patches there were before subsampling."""

    sets: list[PointSet]
    total_patches: int
    shown_patches: int


def jpeg_uri(image: np.ndarray, size: int | None = None, quality: int = 75) -> str:
    """A (3, H, W) uint8 image as a JPEG data URI (resized to ``size`` x ``size`` when given): pictures inside the
    page, a tenth of the size of PNG or raw RGBA."""
    im = Image.fromarray(np.ascontiguousarray(image[:3].transpose(1, 2, 0)))
    if size is not None:
        im = im.resize((size, size), Image.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def thumbnail(image: np.ndarray, size: int = 64) -> str:
    """A tooltip's picture (about 2 kB: thousands fit in a page)."""
    return jpeg_uri(image, size)


def patch_points(emb: Embeddings, prep: Prepared | None, limit: int = 3000, seed: int = 0) -> ExplorerData:
    """One PointSet per location; at most ``limit`` patches in all (a random subset, the same every time).

    Thumbnails are read from ``prep`` (the training data) when given; without it the tooltips have no picture.
    """
    n = len(emb)
    keep = np.arange(n)
    if n > limit:
        keep = np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))
    index = {}
    if prep is not None:
        index = {str(Path(r.scene.image).resolve()): i for i, r in enumerate(prep.readers)}
    sets = []
    for loc in sorted(set(emb.location[keep].tolist())):
        rows = keep[emb.location[keep] == loc]
        thumbs, where = [], []
        for r in rows:
            scene, (col, row, size) = str(emb.scene[r]), (int(v) for v in emb.window[r])
            where.append(f"{Path(scene).name} @ {col},{row}")
            i = index.get(str(Path(scene).resolve()))
            thumbs.append(thumbnail(prep.readers[i].read(col, row, size).image) if i is not None else "")
        sets.append(PointSet(str(loc), "patches", emb.vectors[rows], [str(s) for s in emb.split[rows]], thumbs, where))
    return ExplorerData(sets, n, len(keep))


def scene_points(bundle: Bundle, image: Path, cfg: PredictConfig, limit: int = 400, name: str | None = None) -> PointSet:
    """A predicted scene's tiles in embedding space: the tiles prediction routes (same reading, same centre
    patch), at most ``limit`` of them on an even sub-grid."""
    from geomoe.pipelines.inference import BundleModel
    from geomoe.pipelines.tile_source import open_tiles
    from geomoe.raster import open_raster

    model = BundleModel(bundle)
    vectors, thumbs, where = [], [], []
    with open_raster(image) as ds, torch.no_grad():
        tiles = open_tiles(model, ds, image, cfg, warn=False)
        rows, cols = len(tiles.grid.ys), len(tiles.grid.xs)
        step = max(1, int(np.ceil(np.sqrt(rows * cols / limit))))
        for iy in range(0, rows, step):
            row = tiles.read_row(iy, list(range(0, cols, step)))
            batch, kept = row.tiles, row.cols
            if batch is None:
                continue
            vectors.append(model.embed(batch))
            thumbs += [thumbnail(t.numpy()) for t in batch]
            where += [f"{image.name} tile {iy},{ix}" for ix in kept]
    vec = np.concatenate(vectors) if vectors else np.zeros((0, bundle.centroids.shape[1]), np.float32)
    return PointSet(name or image.stem, "scene", vec, ["scene"] * len(vec), thumbs, where)


def project(fit: np.ndarray, others: list[np.ndarray], seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """2-D coordinates: UMAP (cosine) fitted on ``fit``, other points placed by its transform; PCA when there are
    too few points for a neighbourhood graph."""
    if len(fit) >= 30:
        import umap

        reducer = umap.UMAP(n_neighbors=min(15, len(fit) - 1), metric="cosine", random_state=seed)
        with warnings.catch_warnings():  # a seed makes umap run on one thread, which it announces on every fit
            warnings.filterwarnings("ignore", message="n_jobs value")
            xy = reducer.fit_transform(fit)
            return xy, [reducer.transform(o) if len(o) else np.zeros((0, 2)) for o in others]
    mean = fit.mean(0)
    _, _, vt = np.linalg.svd(fit - mean, full_matrices=False)
    basis = vt[:2].T
    return (fit - mean) @ basis, [(o - mean) @ basis if len(o) else np.zeros((0, 2)) for o in others]


def explorer(bundle: Bundle, data: ExplorerData, seed: int = 0):
    """The Bokeh layout of the embedding explorer (one renderer per location and per scene)."""
    from bokeh.layouts import column, row
    from bokeh.models import ColumnDataSource, CustomJS, Div, HoverTool, Select
    from bokeh.plotting import figure

    patches = [s for s in data.sets if s.kind == "patches"]
    scenes = [s for s in data.sets if s.kind == "scene" and len(s.vectors)]
    fit = np.concatenate([s.vectors for s in patches])
    xy, placed = project(fit, [bundle.centroids.astype(np.float32), *(s.vectors for s in scenes)], seed)
    cxy, scene_xy = placed[0], placed[1:]
    loc_colour = {s.name: PALETTE[i % len(PALETTE)] for i, s in enumerate(data.sets)}

    fig = figure(title="embedding space (UMAP of the 2048-d embeddings)", width=820, height=620, name="embedding-explorer",
                 tools="pan,wheel_zoom,box_zoom,reset,save", active_scroll="wheel_zoom", match_aspect=True)
    sources = []
    coords = np.split(xy, np.cumsum([len(s.vectors) for s in patches])[:-1]) + scene_xy  # back to one block per set
    for s, pts in zip([*patches, *scenes], coords):
        ids, dist = bundle.router.route(s.vectors)
        unfamiliar = bundle.unfamiliar(ids, dist)
        region_c = [PALETTE[int(i) % len(PALETTE)] for i in ids]
        loc_c = [loc_colour[s.name]] * len(ids)
        split_c = [SPLIT_COLOURS.get(v, "#999999") for v in s.split]
        src = ColumnDataSource(dict(
            x=pts[:, 0], y=pts[:, 1], location=[s.name] * len(ids), split=s.split, region=[int(i) for i in ids],
            distance=[float(d) for d in dist], unfamiliar=["unfamiliar" if u else "" for u in unfamiliar],
            thumb=s.thumbs or [""] * len(ids), where=s.where or [""] * len(ids),
            color=loc_c, c_location=loc_c, c_region=region_c, c_split=split_c), name=f"explorer-{s.kind}-{s.name}")
        sources.append(src)
        legend = s.name if s.kind == "patches" else f"scene {s.name}"
        if s.kind == "patches":
            fig.scatter("x", "y", source=src, size=6, fill_color="color", line_color="color", fill_alpha=0.65,
                        legend_label=legend, name=f"points-{s.name}")
        else:  # scene tiles: triangles with a dark outline, so they stand out among the training patches
            fig.scatter("x", "y", source=src, marker="triangle", size=10, fill_color="color", line_color="black",
                        fill_alpha=0.9, legend_label=legend, name=f"points-scene-{s.name}")
    cen = ColumnDataSource(dict(x=cxy[:, 0], y=cxy[:, 1], label=[f"region {i}" for i in range(len(cxy))]))
    cr = fig.scatter("x", "y", source=cen, marker="x", size=18, line_width=4, line_color="black", legend_label="centroids")
    fig.text("x", "y", text="label", source=cen, x_offset=8, y_offset=-8, text_font_size="10pt")
    tooltip = """<div style="width:200px">
      <img src="@thumb" width="96" height="96" style="image-rendering:pixelated;border:1px solid #ccc"
           onerror="this.style.display='none'"><br>
      <b>@location</b> &middot; @split &middot; region @region<br>
      distance to centroid @distance{0.000} <span style="color:#c00">@unfamiliar</span><br>
      <span style="font-size:80%;color:#666">@where</span></div>"""
    fig.add_tools(HoverTool(renderers=[r for r in fig.renderers if r is not cr and r.name and r.name.startswith("points")],
                            tooltips=tooltip))
    fig.add_tools(HoverTool(renderers=[cr], tooltips=[("", "@label")]))
    fig.legend.click_policy = "hide"
    fig.legend.location = "top_left"
    fig.add_layout(fig.legend[0], "right")
    pick = Select(title="colour by", value="location", options=["location", "region", "split"], name="colour-by")
    pick.js_on_change("value", CustomJS(args=dict(sources=sources), code="""
        for (const s of sources) { const d = {...s.data}; d.color = d['c_' + this.value]; s.data = d; }"""))
    n_scene = sum(len(s.vectors) for s in scenes)
    note = (f"{data.shown_patches} patches shown" + (f" (a random {data.shown_patches} of {data.total_patches})"
            if data.shown_patches < data.total_patches else "") + f", {len(cxy)} centroids"
            + (f", {n_scene} tiles of {len(scenes)} predicted scene(s) (triangles)" if scenes else "")
            + ". Hover a point for its patch; click a legend entry to hide it; wheel to zoom.")
    return column(row(pick, Div(text=f"<p class='note'>{note}</p>", width=560)), fig, name="explorer")


def scene_map(image: Path, routing: Path | None, footprints: Path | None, title: str, max_px: int = 1400):
    """A zoomable map of a predicted scene: the image (downsampled to ``max_px``), footprint outlines and the
    routing layer (expert per tile; hover for its distance and what ran)."""
    import geopandas as gpd
    from bokeh.models import ColumnDataSource, HoverTool
    from bokeh.plotting import figure
    from rasterio.enums import Resampling

    from geomoe.raster import bit_depth, image_bands, open_raster, to_uint8

    with open_raster(image) as ds:
        bands, _ = image_bands(ds, image)
        f = max(ds.width, ds.height) / max_px
        h, w = max(1, int(ds.height / max(f, 1))), max(1, int(ds.width / max(f, 1)))
        rgb = to_uint8(ds.read(bands, out_shape=(3, h, w), resampling=Resampling.average), bit_depth(ds, bands))
        left, bottom, right, top = ds.bounds
        down = ds.transform.e > 0  # no CRS: pixel coordinates, rows grow downwards
    y0, y1 = min(bottom, top), max(bottom, top)
    fig = figure(title=title, width=820, height=int(820 * (y1 - y0) / max(right - left, 1e-9)) + 40,
                 tools="pan,wheel_zoom,box_zoom,reset,save", active_scroll="wheel_zoom", match_aspect=True,
                 x_range=(left, right), y_range=(y1, y0) if down else (y0, y1), name=f"map-{title}")
    fig.image_url(url=[jpeg_uri(rgb, quality=85)], x=left, y=y0 if down else y1, w=right - left, h=y1 - y0, anchor="top_left")
    if routing is not None and routing.exists():
        r = gpd.read_file(routing)
        if len(r):
            xs, ys = _rings(r.geometry)
            src = ColumnDataSource(dict(xs=xs, ys=ys, expert=r["expert"].astype(int).tolist(),
                                        distance=r["distance"].astype(float).tolist(),
                                        unfamiliar=["unfamiliar" if u else "" for u in r["unfamiliar"]],
                                        ran=r["ran"].astype(str).tolist(),
                                        color=[PALETTE[int(e) % len(PALETTE)] for e in r["expert"]]))
            tiles = fig.patches("xs", "ys", source=src, fill_color="color", fill_alpha=0.18, line_color="color",
                                line_alpha=0.5, legend_label="routing (colour = expert)", name="routing")
            fig.add_tools(HoverTool(renderers=[tiles], tooltips=[("expert", "@expert"), ("distance", "@distance{0.000}"),
                                                                 ("ran", "@ran"), ("", "@unfamiliar")]))
    if footprints is not None and footprints.exists():
        fp = gpd.read_file(footprints).explode(index_parts=False)
        fp = fp[fp.geometry.notna() & ~fp.geometry.is_empty]
        if len(fp):
            fig.multi_line(*_rings(fp.geometry), line_color="yellow", line_width=1.5, legend_label=f"footprints ({len(fp)})", name="footprints")
    if fig.legend:
        fig.legend.click_policy = "hide"
    fig.axis.visible = False
    return fig


def _rings(geoms) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Outer rings as arrays: Bokeh sends arrays as binary, lists of floats as (much longer) JSON."""
    rings = [np.asarray(g.exterior.coords, np.float64) for g in geoms]
    return [np.ascontiguousarray(c[:, 0]) for c in rings], [np.ascontiguousarray(c[:, 1]) for c in rings]


def metrics_chart(table, metric: str = "iou", methods: tuple[str, ...] = (
        "single", "generalist", "embedding", "smoothed", "location_oracle", "best_expert", "random",
        "single_footprints", "smoothed_footprints")):
    """Grouped bars of ``metric`` per location and method, from an evaluation's long table."""
    from bokeh.models import ColumnDataSource, FactorRange, HoverTool
    from bokeh.plotting import figure

    t = table[table.method.isin(methods)].dropna(subset=[metric])
    present = [m for m in methods if m in set(t.method)]
    locs = [l for l in dict.fromkeys(t.location) if l != "overall"] + (["overall"] if "overall" in set(t.location) else [])
    factors = [(l, m) for l in locs for m in present if ((t.location == l) & (t.method == m)).any()]
    val = {(r.location, r.method): float(getattr(r, metric)) for r in t.itertuples()}
    src = ColumnDataSource(dict(x=factors, v=[val[f] for f in factors], method=[f[1] for f in factors],
                                color=[PALETTE[present.index(f[1]) % len(PALETTE)] for f in factors]))
    fig = figure(x_range=FactorRange(*factors), height=330, width=980, title=f"{metric} by location and method",
                 tools="save", name=f"chart-{metric}")
    fig.vbar(x="x", top="v", width=0.85, source=src, fill_color="color", line_color="white")
    fig.add_tools(HoverTool(tooltips=[("", "@x"), (metric, "@v{0.000}")]))
    fig.xaxis.major_label_orientation = 1.0
    fig.xaxis.group_label_orientation = 0
    fig.y_range.start = 0
    return fig


def embedded_patches(bundle_root: Path) -> Embeddings:
    """The bundle's patch embeddings, or one line saying they are missing."""
    from geomoe.bundle import BundlePaths

    p = BundlePaths(bundle_root).embeddings
    if not p.exists():
        raise ValueError(f"{bundle_root}: no patch embeddings ({p.name} is missing); the explorer needs a bundle "
                         f"trained by 'geomoe train' (its embedding stage writes them)")
    return Embeddings.load(p)

