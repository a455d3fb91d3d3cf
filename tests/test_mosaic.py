"""Tiles of one grid predicted as one scene (`predict --mosaic`): exact stitching, gaps as nodata, buildings whole
across tile borders, one clear line for tiles that do not fit."""

from __future__ import annotations

import os
import shutil

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine, from_origin
from scipy import ndimage
from typer.testing import CliRunner

from geomoe.data.synthetic import write_geotiff
from geomoe.pipelines.mosaic import write_mosaic
from geomoe.pipelines.predict import predict_raster
from geomoe.raster import RasterError

from conftest import ROOT
from test_predict import CFG, RedModel

BANEPA = ROOT / "sample" / "train" / "banepa"
BLOCK = [f"tile_19_{x}_{y}.tif" for x in (386690, 386691) for y in (220241, 220242)]  # a 2 x 2 block of map tiles


def _labels_as_images(tmp_path, names=BLOCK):
    """The block's real building labels as images (red = building): a model that reads red predicts them exactly,
    so every difference below is the mosaic's doing."""
    out = []
    for n in names:
        with rasterio.open(BANEPA / "masks" / n) as ds:
            m = (ds.read(1) > 0).astype(np.uint8) * 255
            crs, t = ds.crs, ds.transform
        write_geotiff(tmp_path / "tiles" / n, np.stack([m, m // 2, m // 2]), crs, t)
        out.append(tmp_path / "tiles" / n)
    return out


def test_mosaic_of_real_map_tiles_is_their_pixels_and_a_missing_tile_is_nodata(tmp_path):
    tiles = [BANEPA / "images" / n for n in BLOCK[:3]]  # the fourth (bottom right) is missing
    vrt = write_mosaic(tiles, tmp_path / "m.vrt")
    with rasterio.open(vrt) as m:
        assert (m.width, m.height, m.count) == (1024, 1024, 3)
        img, valid = m.read(), m.read_masks(1) > 0
        for p in tiles:
            with rasterio.open(p) as ds:
                col, row = ~m.transform * (ds.transform.c, ds.transform.f)
                assert ds.crs == m.crs and np.isclose(col % 1, 0) and np.isclose(row % 1, 0)
                c, r = round(col), round(row)
                assert np.array_equal(img[:, r:r + 512, c:c + 512], ds.read())
                assert valid[r:r + 512, c:c + 512].all()
        assert not valid[512:, 512:].any() and valid.sum() == 3 * 512 * 512


def test_buildings_across_tile_borders_become_one_footprint(tmp_path):
    tiles = _labels_as_images(tmp_path)
    cfg = CFG.model_copy(update={"tile_size": 128, "overlap": 32})
    per_tile = sum(predict_raster(RedModel(), p, tmp_path / "each", cfg, 0.5, progress=False)[1].footprints
                   for p in tiles)
    outs, st = predict_raster(RedModel(), write_mosaic(tiles, tmp_path / "block.vrt"), tmp_path / "one", cfg, 0.5,
                              progress=False)
    with rasterio.open(tmp_path / "block.vrt") as m:
        truth = m.read(1) > 0
    _, n = ndimage.label(truth)  # the label block's buildings, 4-connected as footprints are
    fp = gpd.read_file(outs.footprints)
    assert st.footprints == len(fp) == n
    assert per_tile > n  # tile by tile, the buildings on the borders were cut in two
    with rasterio.open(outs.mask) as ds:
        assert ds.crs.to_epsg() == 3857 and np.array_equal(ds.read(1) > 0, truth)


def test_unchanged_mosaic_keeps_its_file_so_resume_recognises_it(tmp_path):
    tiles = [BANEPA / "images" / n for n in BLOCK]
    vrt = write_mosaic(tiles, tmp_path / "m.vrt")
    os.utime(vrt, (1, 1))
    assert write_mosaic(list(reversed(tiles)), tmp_path / "m.vrt").stat().st_mtime == 1
    write_mosaic(tiles[:2], tmp_path / "m.vrt")
    assert vrt.stat().st_mtime > 1


def _tile(path, crs="EPSG:32633", origin=(500000.0, 4000000.0), res=0.5, bands=3):
    write_geotiff(path, np.zeros((bands, 32, 32), np.uint8), crs, from_origin(*origin, res, res) if crs else None)
    return path


@pytest.mark.parametrize("odd,why", [
    (dict(crs="EPSG:32634"), "CRS EPSG:32634 differs"),
    (dict(res=0.25), "pixel size"),
    (dict(bands=4), "4 bands"),
    (dict(origin=(500016.2, 4000000.0)), "falls between pixels"),
    (dict(crs=None), "no CRS"),
])
def test_a_tile_off_the_grid_is_named_with_what_differs(tmp_path, odd, why):
    good = _tile(tmp_path / "a.tif")
    bad = _tile(tmp_path / "b.tif", **odd)
    with pytest.raises(RasterError, match=why) as e:
        write_mosaic([good, bad], tmp_path / "m.vrt")
    assert "b.tif" in str(e.value)
    assert not (tmp_path / "m.vrt").exists()


def test_cli_predict_mosaic_with_a_trained_bundle(tmp_path, bundle_dir):
    from geomoe.cli import app

    src, here = BANEPA / "images", tmp_path / "tiles"  # outputs written among the tiles, as a user may
    here.mkdir()
    for n in BLOCK:
        shutil.copy(src / n, here / n)
    run = ["predict", str(here), "-b", str(bundle_dir), "-o", str(here), "--mosaic", "block", "--resume"]
    r = CliRunner().invoke(app, run)
    assert r.exit_code == 0, r.output
    assert "mosaic of 4 tiles" in r.output and "1 done, 0 failed" in r.output
    with rasterio.open(here / "block_prob.tif") as ds:
        assert (ds.width, ds.height) == (1024, 1024) and ds.crs.to_epsg() == 3857
        assert ds.transform.almost_equals(Affine(*rasterio.open(src / BLOCK[0]).transform[:6]))
    r = CliRunner().invoke(app, run)  # the run's own outputs are not tiles; the unchanged mosaic is complete
    assert r.exit_code == 0 and "mosaic of 4 tiles" in r.output and "skipped (complete)" in r.output, r.output
    _tile(tmp_path / "utm.tif")
    r = CliRunner().invoke(app, ["predict", str(src / BLOCK[0]), str(tmp_path / "utm.tif"), "-b", str(bundle_dir),
                                 "-o", str(tmp_path / "pred2"), "--mosaic", "block"])
    assert r.exit_code == 1 and "utm.tif" in r.output and "differs" in r.output, r.output
    r = CliRunner().invoke(app, ["predict", str(src / BLOCK[0]), "-b", str(bundle_dir), "-o", str(tmp_path / "p3"),
                                 "--mosaic", "../x"])
    assert r.exit_code == 1 and "plain name" in r.output
