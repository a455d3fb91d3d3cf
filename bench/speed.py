"""Speed: pipeline overhead against pure model compute, measured in one run on the same tiles.

1. Prediction: end-to-end tiles/s (read, embed, route, predict, blend, write COG, polygonize,
   regularise) against the pure forward of the same embedding network and expert on the same tiles.
2. Routing: embedding + FAISS search per tile, as a fraction of one expert forward (resnet101 and the
   configured expert).
(Training speed: bench/trainer.py.)
Usage: uv run python bench/speed.py [--scene ../shared/data/banepa/scene/banepa_mosaic.tif] [--config small]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import torch
from common import SHARED, record
from rasterio.windows import Window

from geomoe.backbone import autocast, batch_to, pick_device, to_device
from geomoe.config import load_config
from geomoe.embedding.model import LocationAutoencoder
from geomoe.experts.model import Expert
from geomoe.pipelines.predict import predict_raster
from geomoe.pipelines.tiling import TileGrid
from geomoe.router.routing import Router


class NetModel:
    def __init__(self, emb, experts, tile, patch, device, centroids):
        self.emb, self.experts, self.tile_size, self.patch, self.device, self.gsd = emb, experts, tile, patch, device, None
        self.router = Router(centroids)

    def route(self, tiles):
        o = (tiles.shape[-1] - self.patch) // 2
        with torch.no_grad(), autocast(self.device):
            e = self.emb.embed(batch_to(tiles[..., o:o + self.patch, o:o + self.patch], self.device)).float().cpu().numpy()
        ids, d = self.router.route(e)
        return ids[:, None], np.ones((len(ids), 1), np.float32), d

    def predict(self, expert, tiles):
        with torch.no_grad(), autocast(self.device):
            return torch.sigmoid(self.experts[expert](batch_to(tiles, self.device)).float())[:, 0].cpu()


def timed(fn, repeat: int = 1) -> float:
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scene", type=Path, default=SHARED / "banepa" / "scene" / "banepa_mosaic.tif")
    ap.add_argument("--crop", type=int, default=1536, help="side of the scene crop predicted (pixels)")
    ap.add_argument("--config", default="small")
    a = ap.parse_args()
    cfg = load_config(a.config)
    dev = pick_device(cfg.device)
    torch.manual_seed(0)
    T, P = cfg.predict.tile_size, min(cfg.data.patch_size, cfg.predict.tile_size)
    emb = to_device(LocationAutoencoder(cfg.embedding.encoder, cfg.embedding.dim, cfg.embedding.input_size), dev).eval()
    experts = [to_device(Expert(cfg.experts.encoder, cfg.experts.decoder), dev).eval() for _ in range(cfg.regions.k)]
    cen = np.random.default_rng(0).normal(size=(cfg.regions.k, cfg.embedding.dim)).astype(np.float32)
    model = NetModel(emb, experts, T, P, dev, cen)
    lines = []

    with tempfile.TemporaryDirectory() as td:
        crop = Path(td) / "crop.tif"
        with rasterio.open(a.scene) as ds:
            w = Window(0, 0, min(a.crop, ds.width), min(a.crop, ds.height))
            prof = ds.profile | dict(width=w.width, height=w.height, transform=ds.window_transform(w))
            data = ds.read(window=w)
        with rasterio.open(crop, "w", **prof) as out:
            out.write(data)
        grid = TileGrid(data.shape[2], data.shape[1], T, cfg.predict.overlap)
        tiles = torch.from_numpy(np.stack([data[:, y:y + T, x:x + T] for y in grid.ys for x in grid.xs]))
        B = cfg.predict.batch_size
        model.predict(0, tiles[:B])  # warm-up

        def pure():
            for s in range(0, len(tiles), B):
                ids, _, _ = model.route(tiles[s:s + B])
                model.predict(int(ids[0, 0]), tiles[s:s + B])

        t_pure = timed(pure)
        t0 = time.perf_counter()
        _, st = predict_raster(model, crop, Path(td) / "out", cfg.predict, 0.5, progress=False)
        t_e2e = time.perf_counter() - t0
        n = len(tiles)
        lines += ["### Prediction", "", "| | tiles/s | seconds |", "|---|---|---|",
                  f"| pure forward (embedding + expert, tiles in memory) | {n / t_pure:.2f} | {t_pure:.1f} |",
                  f"| end to end (read to regularised polygons) | {n / t_e2e:.2f} | {t_e2e:.1f} |", "",
                  f"{n} tiles of {T} px from a {data.shape[2]}x{data.shape[1]} crop of {a.scene.name}; "
                  f"{st.footprints} footprints. **Pipeline overhead: {100 * (t_e2e / t_pure - 1):.1f}% of model compute** "
                  "(target < 10%)."]

        # Routing against expert compute, per tile, at the paper's expert depth and the configured one.
        batch = tiles[:B]
        t_emb = timed(lambda: model.route(batch), 3) / B
        rows = ["", "### Routing cost", "", "| expert | expert ms/tile | routing ms/tile | routing / expert |", "|---|---|---|---|"]
        for enc in ("resnet101", cfg.experts.encoder):
            net = to_device(Expert(enc), dev).eval()
            with torch.no_grad(), autocast(dev):
                net(batch_to(batch, dev))
                t_exp = timed(lambda: net(batch_to(batch, dev)), 2) / B
            rows.append(f"| {enc} U-Net | {1000 * t_exp:.0f} | {1000 * t_emb:.0f} | {100 * t_emb / t_exp:.1f}% |")
        lines += rows + ["", f"Routing = {cfg.embedding.encoder} embedding of the central {P} px at {cfg.embedding.input_size} px "
                         "+ FAISS search. Target: < 15% of a resnet101 expert."]

    record("Speed: pipeline overhead, routing cost", "\n".join(lines),
           f"`{a.config}` (random weights; speed does not depend on them), device {dev}")


if __name__ == "__main__":
    main()
