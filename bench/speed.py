"""Speed: prediction end to end against the model alone, on real scenes with a real bundle; routing cost.

1. Prediction (issue 11): a bundle trained by ``geomoe train`` on ../shared/data predicts the Banepa mosaic and a
   mosaic of Xiamen tiles end to end (read, embed, route, predict, blend, write COGs, separate, polygonise,
   regularise, GeoPackage + GeoParquet). The pure model throughput is the same embedding and routed experts on the
   same tiles in the same batches (infer_row over tile rows held in memory). Target: end to end >= 0.90 of it.
2. Routing: embedding + FAISS search per tile, as a fraction of one expert forward (resnet101 and the configured
   expert), with random weights (speed does not depend on them).
Writes bench/results/speed.json. Usage: uv run python bench/speed.py --bundle BUNDLE [--xiamen-tiles 8] [--repeat 4 (each scene 4 x 4 times, for a GPU)]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import deque
from pathlib import Path

import rasterio
import torch
from common import SHARED, record, write_json

from geomoe.backbone import autocast, batch_to, pick_device, to_device
from geomoe.bundle import load_bundle
from geomoe.config import load_config
from geomoe.embedding.model import LocationAutoencoder
from geomoe.experts.model import Expert
from geomoe.pipelines.inference import BundleModel, InlineSmoothing, RoutingLayer, infer_row
from geomoe.pipelines.outputs import RunStats
from geomoe.pipelines.predict import predict_raster, reader_threads
from geomoe.pipelines.tile_source import open_tiles
from geomoe.raster import open_raster


def timed(fn, repeat: int = 1) -> float:
    """Seconds per call; CUDA work is waited for (kernels run asynchronously)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeat


def xiamen_mosaic(folder: Path, n: int) -> Path:
    """A VRT mosaic of the n x n block of neighbouring Xiamen z18 tiles (tile_18_X_Y.tif) with the most tiles
    present (missing ones are nodata); the tiles share one grid, so each is placed by its geotransform."""
    files = {tuple(int(v) for v in f.stem.split("_")[2:4]): f for f in (SHARED / "xiamen" / "images").glob("tile_18_*.tif")}
    best = max(((x, y) for x, y in files), key=lambda o: sum((o[0] + i, o[1] + j) in files for i in range(n) for j in range(n)))
    block = [files[(best[0] + i, best[1] + j)] for i in range(n) for j in range(n) if (best[0] + i, best[1] + j) in files]
    with rasterio.open(block[0]) as ds:
        res, crs, count = ds.res[0], ds.crs, ds.count
    bounds = []
    for f in block:
        with rasterio.open(f) as ds:
            bounds.append(ds.bounds)
    left, top = min(b.left for b in bounds), max(b.top for b in bounds)
    width = round((max(b.right for b in bounds) - left) / res)
    height = round((top - min(b.bottom for b in bounds)) / res)
    bands = []
    for k in range(1, count + 1):
        srcs = "".join(
            f'<SimpleSource><SourceFilename relativeToVRT="0">{f.resolve()}</SourceFilename><SourceBand>{k}</SourceBand>'
            f'<SrcRect xOff="0" yOff="0" xSize="256" ySize="256"/><DstRect xOff="{round((b.left - left) / res)}" '
            f'yOff="{round((top - b.top) / res)}" xSize="256" ySize="256"/></SimpleSource>' for f, b in zip(block, bounds))
        bands.append(f'<VRTRasterBand dataType="Byte" band="{k}"><NoDataValue>0</NoDataValue>{srcs}</VRTRasterBand>')
    vrt = folder / "xiamen_mosaic.vrt"
    vrt.write_text(f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}"><SRS>{crs.to_wkt()}</SRS>'
                   f'<GeoTransform>{left}, {res}, 0, {top}, 0, {-res}</GeoTransform>{"".join(bands)}</VRTDataset>')
    return vrt


def repeated_scene(scene: Path, folder: Path, n: int) -> Path:
    """A VRT laying ``scene`` out n x n times side by side on one grid: real imagery (so real footprints) in a scene
    large enough that a GPU's start-up and the last row's drain do not dominate its time."""
    with rasterio.open(scene) as ds:
        w, h, count, crs, t = ds.width, ds.height, ds.count, ds.crs, ds.transform
        nodata = ds.nodata
    bands = []
    for k in range(1, count + 1):
        srcs = "".join(
            f'<SimpleSource><SourceFilename relativeToVRT="0">{scene.resolve()}</SourceFilename><SourceBand>{k}</SourceBand>'
            f'<SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/><DstRect xOff="{i * w}" yOff="{j * h}" xSize="{w}" '
            f'ySize="{h}"/></SimpleSource>' for i in range(n) for j in range(n))
        nd = f"<NoDataValue>{nodata}</NoDataValue>" if nodata is not None else ""
        bands.append(f'<VRTRasterBand dataType="Byte" band="{k}">{nd}{srcs}</VRTRasterBand>')
    vrt = folder / f"{scene.stem}_x{n}.vrt"
    vrt.write_text(f'<VRTDataset rasterXSize="{n * w}" rasterYSize="{n * h}"><SRS>{crs.to_wkt()}</SRS>'
                   f'<GeoTransform>{t.c}, {t.a}, 0, {t.f}, 0, {t.e}</GeoTransform>{"".join(bands)}</VRTDataset>')
    return vrt


class Replay:
    """A TileModel that gives back what ``model`` answered, call for call: the first pass records, the second
    replays. Prediction with a replay costs everything but the model, which tells what bounds a fast GPU."""

    def __init__(self, model: BundleModel):
        self.model, self.routes, self.probs, self.recording = model, deque(), deque(), True

    def __getattr__(self, name):  # tile size, channels, device, unfamiliar, ...: the model's
        return getattr(self.model, name)

    def route(self, tiles):
        if self.recording:
            self.routes.append(self.model.route(tiles))
            return self.routes[-1]
        return self.routes.popleft()

    def predict(self, expert, tiles):
        if self.recording:
            self.probs.append(self.model.predict(expert, tiles))
            return self.probs[-1]
        return self.probs.popleft()


def pure_model(model: BundleModel, scene: Path, cfg) -> tuple[float, int, Replay]:
    """Seconds of routing and experts alone over the scene's tiles (read into memory first), the tiles, and a
    replay of the model's answers. Routed as prediction routes (``predict.routing``): under smoothed routing each
    row's experts run once the row below is routed."""
    with open_raster(scene) as ds:
        tiles = open_tiles(model, ds, scene, cfg, warn=False)
        rows = [tiles.read_row(iy) for iy in range(len(tiles.grid.ys))]
    stats = RunStats()
    model.predict(0, rows[0].tiles[:cfg.batch_size])  # warm-up
    replay = Replay(model)  # records in the timed pass: keeping a reference to each answer costs nothing

    def run() -> None:
        layer = RoutingLayer.empty(len(tiles.grid.ys), len(tiles.grid.xs))
        order = (InlineSmoothing(layer).in_order(replay, rows, 4 * cfg.batch_size, 0, len(rows))
                 if cfg.routing == "smoothed" else rows)
        for r in order:
            infer_row(replay, r, tiles.t_src, cfg, layer, stats)

    t = timed(run)
    replay.recording = False
    return t, sum(len(r.cols) for r in rows), replay


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", type=Path, required=True, help="a bundle trained by geomoe train on ../shared/data")
    ap.add_argument("--scene", type=Path, default=SHARED / "banepa" / "scene" / "banepa_mosaic.tif")
    ap.add_argument("--xiamen-tiles", type=int, default=8, help="side of the block of Xiamen tiles mosaicked")
    ap.add_argument("--config", default="small", help="the configuration of the routing-cost part")
    ap.add_argument("--results", default="speed", help="name of the JSON under bench/results/ (speed_gpu for a GPU run)")
    ap.add_argument("--routing", choices=("tile", "smoothed"), default=None,
                    help="override the bundle's predict.routing (per-scene routing is not measured)")
    ap.add_argument("--repeat", type=int, default=1, help="lay each scene out n x n times (a GPU needs large scenes)")
    a = ap.parse_args()
    b = load_bundle(a.bundle, pick_device("auto"))
    model = BundleModel(b)
    pcfg = b.config.predict.model_copy(update={"routing": a.routing} if a.routing else {})
    if pcfg.routing == "scene":
        raise SystemExit(f"{a.bundle}: per-scene routing is not measured here; pass --routing tile or smoothed")
    figures: dict = {"bundle": str(a.bundle), "routing": pcfg.routing, "repeat": a.repeat, "tile_size": pcfg.tile_size, "batch_size": pcfg.batch_size,
                     "readers": reader_threads(pcfg, model), "device": str(b.device), "scenes": {}}
    lines = ["### Prediction end to end against the model alone (real bundle, real scenes)", "",
             "| scene | size | tiles | model alone tiles/s | end to end tiles/s | end to end / model | "
             "without the model tiles/s | footprints |",
             "|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as td:
        scenes = (a.scene, xiamen_mosaic(Path(td), a.xiamen_tiles))
        if a.repeat > 1:
            scenes = tuple(repeated_scene(s, Path(td), a.repeat) for s in scenes)
        for scene in scenes:
            t_model, n, replay = pure_model(model, scene, pcfg)
            print(f"{scene.stem}: {n} tiles, model alone {t_model:.1f} s", flush=True)  # each part as it ends
            t0 = time.perf_counter()
            _, st = predict_raster(model, scene, Path(td) / "out", pcfg, b.threshold, progress=False)
            t_e2e = time.perf_counter() - t0
            print(f"{scene.stem}: end to end {t_e2e:.1f} s, {st.footprints} footprints", flush=True)
            t0 = time.perf_counter()
            _, st_r = predict_raster(replay, scene, Path(td) / "replay", pcfg, b.threshold, progress=False)
            t_rest = time.perf_counter() - t0
            print(f"{scene.stem}: without the model {t_rest:.1f} s", flush=True)
            assert st_r.footprints == st.footprints and not replay.probs, "the replay must answer as the model did"
            del replay
            with rasterio.open(scene) as ds:
                size = f"{ds.width}x{ds.height}"
            ratio = (n / t_e2e) / (n / t_model)
            figures["scenes"][scene.stem] = {"size": size, "tiles": n, "model_tiles_per_s": round(n / t_model, 2),
                                             "end_to_end_tiles_per_s": round(n / t_e2e, 2), "ratio": round(ratio, 3),
                                             "without_model_tiles_per_s": round(n / t_rest, 2),
                                             "footprints": st.footprints}
            lines.append(f"| {scene.stem} | {size} | {n} | {n / t_model:.2f} | {n / t_e2e:.2f} | **{ratio:.2f}** | "
                         f"{n / t_rest:.2f} | {st.footprints} |")
            print(lines[-1], flush=True)
    lines += ["", "Model alone: routing (embedding + FAISS) and the routed experts on the same tiles in the same batches "
              "(tile rows read into memory first). End to end: `predict_raster` from the file to COGs, GeoPackage and "
              "GeoParquet footprints (instance separation, polygons, regularisation). Without the model: the same "
              "prediction with the model's answers replayed (everything but the model: what bounds a fast GPU). "
              "Target: end to end >= 0.90 of the model alone."]

    # Routing against expert compute, per tile, at the paper's expert depth and the configured one.
    cfg = load_config(a.config)
    dev = pick_device(cfg.device)
    torch.manual_seed(0)
    T, P, B = cfg.predict.tile_size, min(cfg.data.patch_size, cfg.predict.tile_size), cfg.predict.batch_size
    emb = to_device(LocationAutoencoder(cfg.embedding.encoder, cfg.embedding.dim, cfg.embedding.input_size), dev).eval()
    batch = torch.randint(0, 255, (B, 3, T, T), dtype=torch.uint8)
    o = (T - P) // 2

    def route():
        with torch.no_grad(), autocast(dev):
            emb.embed(batch_to(batch[..., o:o + P, o:o + P], dev))

    route()
    reps = 10 if torch.device(dev).type == "cuda" else 3
    t_emb = timed(route, reps) / B
    rows = ["", "### Routing cost", "", "| expert | expert ms/tile | routing ms/tile | routing / expert |", "|---|---|---|---|"]
    for enc in dict.fromkeys(("resnet101", cfg.experts.encoder)):
        net = to_device(Expert(enc), dev).eval()
        with torch.no_grad(), autocast(dev):
            net(batch_to(batch, dev))
            t_exp = timed(lambda: net(batch_to(batch, dev)), max(2, reps // 2)) / B
        rows.append(f"| {enc} U-Net | {1000 * t_exp:.2f} | {1000 * t_emb:.2f} | {100 * t_emb / t_exp:.1f}% |")
        figures[f"routing_over_{enc}"] = round(t_emb / t_exp, 4)
    lines += rows + ["", f"Routing = {cfg.embedding.encoder} embedding of the central {P} px at {cfg.embedding.input_size} "
                     "px (random weights). Target: < 15% of a resnet101 expert."]
    write_json(a.results, figures, {"bundle": str(a.bundle), "predict": pcfg.model_dump(), "routing_config": a.config})
    record("Speed: prediction end to end against the model, routing cost", "\n".join(lines),
           f"bundle `{a.bundle}` (tile {pcfg.tile_size}, batch {pcfg.batch_size}, {pcfg.routing} routing, "
           f"{figures['readers']} reader thread(s), write-behind {pcfg.write_behind}), device {b.device}")


if __name__ == "__main__":
    main()
