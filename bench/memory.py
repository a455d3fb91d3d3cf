"""Memory: peak resident memory of prediction on 5000x5000 and 20000x20000 rasters (synthetic content).

Each size runs in a fresh process so peaks do not mix. Every tile goes through the real pipeline. With
``--bundle`` the bundle's own embedding and U-Net experts run (the issue's setting); without it the expert is a cheap
roof-colour rule so that 20000x20000 finishes in minutes on a CPU. Target: peak 20000 / peak 5000 <= 1.10.
Writes bench/results/memory.json. Usage: uv run python bench/memory.py [--bundle BUNDLE] [--sizes 5000 20000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def make_raster(path: Path, size: int) -> None:
    """A tiled, compressed RGB GeoTIFF written block-row by block-row (never whole in memory)."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    from geomoe.data.synthetic import LOOKS, synth_tile

    rng = np.random.default_rng(0)
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8", crs="EPSG:32633",
                       transform=from_origin(500000, 4000000, 0.5, 0.5), tiled=True, blockxsize=512, blockysize=512,
                       compress="deflate", BIGTIFF="YES") as ds:
        tile, _ = synth_tile(LOOKS[0], 512, rng)
        row = np.concatenate([tile] * (size // 512 + 1), axis=2)[:, :, :size]
        for r in range(0, size, 512):
            h = min(512, size - r)
            ds.write(row[:, :h], window=Window(0, r, size, h))


def child(path: Path, out: Path, bundle: str | None) -> dict:
    import resource

    import torch

    if bundle:
        from geomoe.bundle import load_bundle
        from geomoe.pipelines.inference import BundleModel
        from geomoe.pipelines.predict import predict_raster

        b = load_bundle(bundle, "cpu")
        t0 = time.perf_counter()
        _, st = predict_raster(BundleModel(b), path, out, b.config.predict, b.threshold, progress=False)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {"peak_rss_mib": round(peak, 1), "tiles": st.tiles, "footprints": st.footprints,
                "seconds": round(time.perf_counter() - t0, 1)}

    from geomoe.config import PredictConfig
    from geomoe.embedding.model import LocationAutoencoder
    from geomoe.pipelines.predict import predict_raster

    torch.set_num_threads(2)
    emb = LocationAutoencoder("resnet34", 2048, 96).eval()

    class Model:
        """Real embedding network for routing; a roof-colour rule as the expert, so every tile runs."""

        tile_size, gsd = 512, None

        def route(self, tiles):
            with torch.no_grad():
                e = emb.embed(tiles[..., 128:384, 128:384])
            ids = (e[:, 0] > 0).long().numpy()
            return ids[:, None], np.ones((len(tiles), 1), np.float32), (1 - e[:, 0]).numpy()

        def predict(self, expert_id, tiles):
            t = tiles.float()
            return torch.sigmoid((t[:, 0] - t[:, 1] - 60) / 10)

    cfg = PredictConfig(tile_size=512, overlap=128, batch_size=8, regularize=True, min_area_m2=4.0)
    t0 = time.perf_counter()
    _, st = predict_raster(Model(), path, out, cfg, 0.5, progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_rss_mib": round(peak, 1), "tiles": st.tiles, "footprints": st.footprints,
            "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000])
    ap.add_argument("--bundle", type=str, default=None, help="a trained bundle: its real experts run")
    ap.add_argument("--child", nargs=2)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(Path(a.child[0]), Path(a.child[1]), a.bundle)))
        return
    from common import record, write_json

    runs = {}

    lines = ["| raster | file size | peak RSS (MiB) | tiles | footprints | seconds |", "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as td:
        for size in a.sizes:
            src = Path(td) / f"r{size}.tif"
            make_raster(src, size)
            res = subprocess.run([sys.executable, __file__, "--child", str(src), str(Path(td) / f"o{size}"),
                                  *(["--bundle", a.bundle] if a.bundle else [])], capture_output=True, text=True, check=True)
            r = json.loads(res.stdout.strip().splitlines()[-1])
            runs[f"{size}x{size}"] = r
            lines.append(f"| {size}x{size} | {src.stat().st_size / 1e6:.0f} MB | {r['peak_rss_mib']} | {r['tiles']} | "
                         f"{r['footprints']} | {r['seconds']} |")
            print(lines[-1], flush=True)
    peaks = [r["peak_rss_mib"] for r in runs.values()]
    ratio = peaks[-1] / peaks[0]
    lines += ["", f"**Peak RSS {list(runs)[-1]} / {list(runs)[0]}: {ratio:.3f}** (target <= 1.10)."]
    what = (f"bundle `{a.bundle}` (its embedding and U-Net experts, its predict config)" if a.bundle else
            "tile 512, overlap 128, batch 8; resnet34 embedding at 96 px (random weights), roof-colour rule as expert")
    write_json("memory", {"runs": runs, "ratio": round(ratio, 3)}, what)
    record("Memory: peak RSS of streaming prediction", "\n".join(lines),
           what + "; every tile read, embedded, routed, predicted, blended, written as COG, polygonized and regularised")


if __name__ == "__main__":
    main()
