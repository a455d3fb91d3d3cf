"""Ray engine against the local engine: the same 4 real scenes, this machine, a local Ray cluster (num_cpus=2).

Local: load the bundle, ``predict_many`` in this process (torch on every core). Ray: ``predict_many_ray`` with one
worker per CPU (each loading the bundle once, one torch thread each); the cluster is started before the clock
(a cluster is up before a run is sent to it), the workers' start and bundle loading are timed. Outputs are compared.
Target: Ray at least 0.90 of the local engine's throughput. Writes bench/results/ray.json.
Usage: uv run python bench/ray_engine.py --bundle BUNDLE [--scene ../shared/data/banepa/scene/banepa_mosaic.tif]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from common import SHARED, record, write_json
from rasterio.windows import Window

from geomoe.bundle import load_bundle
from geomoe.pipelines.inference import BundleModel, ModelSpec
from geomoe.pipelines.outputs import RunRequest
from geomoe.pipelines.predict import predict_many
from geomoe.pipelines.ray_engine import RayOptions, connect, predict_many_ray


def crops(scene: Path, folder: Path, side: int) -> list[Path]:
    """Four side x side crops of the scene (its quadrants' top-left corners), as separate GeoTIFFs."""
    out = []
    with rasterio.open(scene) as ds:
        for i, (c, r) in enumerate(((0, 0), (ds.width - side, 0), (0, ds.height - side), (ds.width - side, ds.height - side))):
            w = Window(max(c, 0), max(r, 0), min(side, ds.width), min(side, ds.height))
            prof = ds.profile | dict(width=w.width, height=w.height, transform=ds.window_transform(w), tiled=True,
                                     blockxsize=256, blockysize=256, compress="deflate")
            path = folder / f"{scene.stem}_{i}.tif"
            with rasterio.open(path, "w", **prof) as dst:
                dst.write(ds.read(window=w))
            out.append(path)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--scene", type=Path, default=SHARED / "banepa" / "scene" / "banepa_mosaic.tif")
    ap.add_argument("--side", type=int, default=1536)
    ap.add_argument("--cpus", type=int, default=2)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as td:
        scenes = crops(a.scene, Path(td), a.side)
        t0 = time.perf_counter()
        b = load_bundle(a.bundle, "cpu")
        model = BundleModel(b)
        local = predict_many(model, scenes, Path(td) / "local", RunRequest(b.config.predict, b.threshold),
                             progress=False)
        t_local = time.perf_counter() - t0
        connect(RayOptions(num_cpus=a.cpus))
        t0 = time.perf_counter()
        remote = predict_many_ray(ModelSpec(str(a.bundle.resolve()), "cpu"), model.identity, scenes, Path(td) / "ray",
                                  RunRequest(b.config.predict, b.threshold), RayOptions(), progress=False)
        t_ray = time.perf_counter() - t0
        tiles = sum(r.stats.tiles for r in local)
        same = True
        for s in scenes:
            with rasterio.open(Path(td) / "local" / f"{s.stem}_prob.tif") as x, \
                    rasterio.open(Path(td) / "ray" / f"{s.stem}_prob.tif") as y:
                same &= np.array_equal(x.read(1), y.read(1))
        same &= [r.stats.footprints for r in local] == [r.stats.footprints for r in remote]
    ratio = t_local / t_ray
    figures = {"scenes": len(scenes), "tiles": tiles, "local_seconds": round(t_local, 1), "ray_seconds": round(t_ray, 1),
               "local_tiles_per_s": round(tiles / t_local, 2), "ray_tiles_per_s": round(tiles / t_ray, 2),
               "ray_over_local": round(ratio, 3), "identical_outputs": bool(same), "ray_cpus": a.cpus,
               "footprints": sum(r.stats.footprints for r in local)}
    write_json("ray", figures, {"bundle": str(a.bundle), "scene": str(a.scene), "side": a.side, "cpus": a.cpus})
    body = "\n".join([
        "| engine | seconds | tiles/s |", "|---|---|---|",
        f"| local (one process, torch on {a.cpus} cores) | {t_local:.1f} | {tiles / t_local:.2f} |",
        f"| Ray, local cluster num_cpus={a.cpus} (workers' start and bundle loading included) | {t_ray:.1f} | "
        f"{tiles / t_ray:.2f} |", "",
        f"4 crops of {a.side} px of {a.scene.name}, {tiles} tiles, {figures['footprints']} footprints. "
        f"**Ray / local: {ratio:.2f}** (target >= 0.90); outputs identical: {same}."])
    record("Ray engine against the local engine", body, f"bundle `{a.bundle}`, {a.cpus} CPUs")


if __name__ == "__main__":
    main()
