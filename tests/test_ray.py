"""The Ray engine: 4 real scene crops on a local Ray cluster (2 CPUs) give the local engine's outputs; a bad scene is
reported by name while the others finish; a rerun skips finished scenes; an unreachable cluster is one line."""

from __future__ import annotations

import json
import subprocess
import sys

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from geomoe.bundle import load_bundle
from geomoe.pipelines.inference import BundleModel, ModelSpec
from geomoe.pipelines.outputs import RunRequest
from geomoe.pipelines.predict import predict_many

from conftest import ROOT
from test_stages import _same_footprint_sets

ray = pytest.importorskip("ray")
from geomoe.pipelines.ray_engine import RayOptions, connect, predict_many_ray  # noqa: E402

SCENE = ROOT / "sample" / "scenes" / "banepa_east.tif"


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Four 384 px crops of the real Banepa sample scene and one file that is no raster."""
    d = tmp_path_factory.mktemp("scenes")
    with rasterio.open(SCENE) as ds:
        for i, (c, r) in enumerate(((0, 0), (1200, 300), (600, 1500), (1600, 1600))):
            w = Window(c, r, 384, 384)
            prof = ds.profile | dict(width=384, height=384, transform=ds.window_transform(w), tiled=True,
                                     blockxsize=128, blockysize=128)
            with rasterio.open(d / f"scene{i}.tif", "w", **prof) as out:
                out.write(ds.read(window=w))
    return d


@pytest.fixture(scope="module")
def cluster():
    connect(RayOptions(num_cpus=2))
    yield
    ray.shutdown()


def _read(out, stem):
    with rasterio.open(out / f"{stem}_prob.tif") as p:
        prob = p.read(1)
    return prob, gpd.read_file(out / f"{stem}_footprints.gpkg")


def test_four_scenes_on_ray_equal_the_local_engine(scenes, bundle_dir, cluster, tmp_path):
    b = load_bundle(bundle_dir)
    cfg = b.config.predict.model_copy(update={"min_area_m2": 0.0})
    inputs = sorted(scenes.glob("scene*.tif"))
    local = predict_many(BundleModel(b), inputs, tmp_path / "local", RunRequest(cfg, b.threshold), progress=False)
    spec = ModelSpec(str(bundle_dir), "cpu")
    remote = predict_many_ray(spec, BundleModel(b).identity, inputs, tmp_path / "ray", RunRequest(cfg, b.threshold),
                              RayOptions(), progress=False)
    assert [r.ok for r in remote] == [True] * 4 and [r.path for r in remote] == inputs
    for a, c in zip(local, remote):
        assert a.stats.tiles == c.stats.tiles and a.stats.per_expert == c.stats.per_expert
    for src in inputs:
        pa, fa = _read(tmp_path / "local", src.stem)
        pb, fb = _read(tmp_path / "ray", src.stem)
        assert np.array_equal(pa, pb), src.name
        assert len(fa) == len(fb) and all(g.equals_exact(h, 0) for g, h in zip(fa.geometry, fb.geometry))
    summary = json.loads((tmp_path / "ray" / "run_summary.json").read_text())
    assert summary["predicted"] == 4 and summary["failed"] == []
    assert summary["footprints"] == sum(r.stats.footprints for r in local)

    # the same scenes cut into strips of one tile row, spread over the workers and merged: the same outputs
    strips = predict_many_ray(spec, BundleModel(b).identity, inputs, tmp_path / "strips", RunRequest(cfg, b.threshold),
                              RayOptions(strip_rows=1), progress=False)
    assert [r.ok for r in strips] == [True] * 4 and all("strips" in r.message for r in strips)
    for src in inputs:
        pa, fa = _read(tmp_path / "local", src.stem)
        pb, fb = _read(tmp_path / "strips", src.stem)
        assert np.array_equal(pa, pb), src.name
        _same_footprint_sets(fb, fa)
    assert not (tmp_path / "strips" / ".strips").exists()


def test_a_bad_scene_is_reported_and_a_rerun_skips_finished_ones(scenes, bundle_dir, cluster, tmp_path):
    b = load_bundle(bundle_dir)
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"II*\x00 not really a tiff")
    inputs = [*sorted(scenes.glob("scene*.tif"))[:2], bad]
    spec, ident = ModelSpec(str(bundle_dir), "cpu"), BundleModel(b).identity
    res = predict_many_ray(spec, ident, inputs, tmp_path / "out", RunRequest(b.config.predict, b.threshold), RayOptions(),
                           progress=False)
    assert [r.ok for r in res] == [True, True, False]
    assert "broken.tif" in res[2].message and "\n" not in res[2].message
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    assert summary["predicted"] == 2 and summary["failed"][0]["input"].endswith("broken.tif")
    again = predict_many_ray(spec, ident, inputs, tmp_path / "out", RunRequest(b.config.predict, b.threshold), RayOptions(),
                             resume=True, progress=False)
    assert [r.message for r in again[:2]] == ["skipped (complete)"] * 2 and not again[2].ok


def test_unreachable_ray_address_is_one_line(bundle_dir, scenes, tmp_path):
    p = subprocess.run([sys.executable, "-m", "geomoe.cli", "predict", str(scenes / "scene0.tif"), "-b", str(bundle_dir),
                        "-o", str(tmp_path / "o"), "--engine", "ray", "--address", "127.0.0.1:9"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 1
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and "cannot reach the Ray cluster at 127.0.0.1:9" in lines[0], p.stdout + p.stderr
    assert "Traceback" not in p.stderr
