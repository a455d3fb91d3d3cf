"""Large-raster prediction: exact stitching, footprints across borders, outputs, bad input, resume."""

from __future__ import annotations

import json
import shutil

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from typer.testing import CliRunner

from geomoe.config import PredictConfig
from geomoe.data.synthetic import write_geotiff
from geomoe.pipelines.footprints import FootprintCollector
from geomoe.pipelines.outputs import RunRequest, is_complete, outputs_for
from geomoe.pipelines.predict import predict_many, predict_raster
from geomoe.pipelines.tiling import BandBlender, TileGrid

from conftest import ROOT

CFG = PredictConfig(tile_size=64, overlap=16, batch_size=4, min_area_m2=0.0, regularize=False)


class RedModel:
    """Identity-like model: probability = red band / 255; routes by tile brightness to 2 'experts'."""

    tile_size = 64
    gsd = None

    def __init__(self, fail_after: int | None = None):
        self.calls, self.fail_after = 0, fail_after

    def route(self, tiles):
        ids = (tiles.float().mean((1, 2, 3)) > 100).long().numpy()
        return ids[:, None], np.ones((len(ids), 1), np.float32), np.zeros(len(ids), np.float32)

    def predict(self, expert, tiles):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("killed")
        return tiles[:, 0].float() / 255.0


def _raster(path, h=150, w=170, crs="EPSG:32633", seed=0, nodata=None, data=None, res=0.5):
    rng = np.random.default_rng(seed)
    img = data if data is not None else rng.integers(0, 256, (3, h, w), dtype=np.uint8)
    write_geotiff(path, img, crs, from_origin(500000, 4000000, res, res) if crs != "EPSG:4326" else from_origin(32.5, 0.4, 1e-5, 1e-5), nodata)
    return path


@pytest.mark.parametrize("size,tile,overlap", [((150, 170), 64, 16), ((64, 64), 64, 16), ((40, 500), 64, 20), ((1000, 37), 128, 32)])
def test_blend_weights_sum_to_one_everywhere(size, tile, overlap):
    g = TileGrid(size[1], size[0], tile, overlap)
    total = np.zeros(size)
    for iy in range(len(g.ys)):
        for ix in range(len(g.xs)):
            w = g.weight(ix, iy)
            total[g.ys[iy]:g.ys[iy] + w.shape[0], g.xs[ix]:g.xs[ix] + w.shape[1]] += w
    assert np.allclose(total, 1.0, atol=1e-5)


def test_band_blender_reproduces_a_field_and_flushes_each_row_once():
    rng = np.random.default_rng(0)
    field = rng.random((300, 230)).astype(np.float32)
    g = TileGrid(230, 300, 64, 16)

    def sink(r0, rows, valid):
        seen.append((r0, rows.shape[1]))
        got[:, r0:r0 + rows.shape[1]] = rows
        assert valid.shape == rows.shape[1:] and valid.all()  # tiles without masks cover every pixel

    for channels, flush in ((1, 64), (3, None)):  # one channel in small flushes; instance channels a tile row at once
        stack = np.stack([field * (c + 1) for c in range(channels)])
        got = np.full_like(stack, np.nan)
        seen = []
        b = BandBlender(g, sink, flush_rows=flush, channels=channels)
        for iy in range(len(g.ys)):
            b.start_row(iy)
            for ix in range(len(g.xs)):
                y0, x0 = g.ys[iy], g.xs[ix]
                b.add(ix, iy, stack[:, y0:y0 + 64, x0:x0 + 64])
        b.finish()
        assert np.allclose(got, stack, atol=1e-4)
        assert sum(n for _, n in seen) == 300 and [r for r, _ in seen] == sorted(r for r, _ in seen)
        if flush is None:  # each flush is everything above the next tile row (the stride), the last the rest
            assert [n for _, n in seen[:-1]] == list(np.diff(g.ys)) and seen[-1][1] == g.tile


def test_identity_model_reproduces_input_across_tile_borders(tmp_path):
    src = _raster(tmp_path / "in.tif")
    outs, st = predict_raster(RedModel(), src, tmp_path / "out", CFG, 0.5, progress=False)
    with rasterio.open(src) as a, rasterio.open(outs.prob) as b:
        red = a.read(1).astype(np.float64)
        prob = b.read(1)
        assert b.crs == a.crs and b.transform == a.transform and b.nodata == 255
        assert b.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        # the raster says what its values mean: its own scale turns them back into probabilities
        assert np.abs(prob * b.scales[0] + b.offsets[0] - red / 255).max() <= 1 / 254 + 1e-6
        assert "probability" in b.descriptions[0]
    with rasterio.open(outs.mask) as m:
        assert m.colormap(1)[1] != m.colormap(1)[0] and "1 building" in m.descriptions[0]
        assert m.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
    assert np.abs(prob.astype(int) - np.round(red / 255 * 254)).max() <= 1
    assert st.tiles == len(TileGrid(170, 150, 64, 16)) and set(st.per_expert) <= {0, 1}


def test_identity_on_the_real_sample_scene(tmp_path):
    """The shipped Banepa scene (real imagery, Web Mercator) passes through tiling unchanged."""
    scene = ROOT / "sample" / "scenes" / "banepa_east.tif"
    with rasterio.open(scene) as ds:
        window = ds.read(window=rasterio.windows.Window(0, 0, 300, 260))
        crs, t = ds.crs, ds.window_transform(rasterio.windows.Window(0, 0, 300, 260))
    write_geotiff(tmp_path / "crop.tif", window, crs, t)
    outs, _ = predict_raster(RedModel(), tmp_path / "crop.tif", tmp_path / "o", CFG, 0.5, progress=False)
    with rasterio.open(outs.prob) as b:
        prob = b.read(1).astype(int)
    assert np.abs(prob - np.round(window[0] / 255 * 254)).max() <= 1


def test_buildings_crossing_band_borders_come_out_whole(tmp_path):
    img = np.zeros((3, 400, 300), np.uint8)
    img[0, 30:370, 40:80] = 255  # a tall building across every band border
    img[0, 100:300, 150:170] = 255  # a U: two legs joined at the bottom, in different bands
    img[0, 100:300, 200:220] = 255
    img[0, 280:300, 150:220] = 255
    img[0, 10:20, 250:260] = 255  # a small one inside a single band
    src = _raster(tmp_path / "b.tif", data=img)
    outs, st = predict_raster(RedModel(), src, tmp_path / "out", CFG, 0.5, progress=False)
    fp = gpd.read_file(outs.footprints)
    assert len(fp) == 3 == st.footprints
    areas = sorted(fp.area_m2.round(2))
    assert areas == pytest.approx(sorted([340 * 40 * 0.25, (200 * 20 * 2 + 20 * 30) * 0.25, 100 * 0.25]), rel=1e-6)
    assert fp.crs.to_epsg() == 32633 and set(fp.columns) >= {"area_m2", "expert", "mean_prob", "squared"}
    assert fp.squared.dtype == bool
    assert fp.mean_prob.min() > 0.95
    gj = gpd.read_file(outs.geojson)
    assert gj.crs.to_epsg() == 4326 and len(gj) == 3
    routing = gpd.read_file(outs.routing)
    assert len(routing) == st.tiles and set(routing.columns) >= {"expert", "distance"}
    assert routing.union_all().area == pytest.approx(400 * 300 * 0.25)


def test_a_building_cut_by_the_scene_edge_is_kept_though_small(tmp_path):
    """The smallest footprint is for whole buildings: a piece on the scene's edge may be a house the scene cuts, so it
    is kept (flagged ``at_edge``) where an equally small piece inside the scene is dropped; only a speck under a
    quarter of the smallest area goes on the edge too. A strip's own border is not the scene's edge."""
    img = np.zeros((3, 300, 200), np.uint8)
    img[0, 100:110, 0:4] = 255  # 40 px = 10 m2, cut by the left edge (the smallest footprint below is 16 m2)
    img[0, 296:300, 60:70] = 255  # 40 px on the bottom edge
    img[0, 150:160, 100:104] = 255  # 40 px inside: a speck
    img[0, 0:2, 180:185] = 255  # 10 px = 2.5 m2 on the top edge: a speck there too
    img[0, 20:60, 120:160] = 255  # a house, 400 m2
    src = _raster(tmp_path / "e.tif", data=img)
    cfg = CFG.model_copy(update={"min_area_m2": 16.0})
    outs, st = predict_raster(RedModel(), src, tmp_path / "out", cfg, 0.5, progress=False)
    fp = gpd.read_file(outs.footprints)
    assert st.footprints == len(fp) == 3
    assert sorted(fp.area_m2.round(2)) == pytest.approx([10.0, 10.0, 400.0])
    assert fp.at_edge.dtype == bool and sorted(fp.at_edge) == [False, True, True]
    assert not fp[~fp.at_edge].intersects(gpd.GeoSeries.from_xy([500000 + 102 * 0.5], [4000000 - 155 * 0.5],
                                                                  crs=fp.crs).iloc[0]).any()
    # in strips (the Ray engine's cut of a large scene) the strips' borders are inside the scene: the same layer
    from geomoe.pipelines.strips import merge_strips, plan_strips, predict_strip

    req = RunRequest(cfg, 0.5)
    plan = plan_strips(RedModel(), src, "e", tmp_path / "strips", req, 1)
    assert len(plan.strips) >= 3
    res = merge_strips([predict_strip(RedModel(), s, req) for s in plan.strips], tmp_path / "strips", req, None)
    assert res.ok
    sp = gpd.read_file(tmp_path / "strips" / "e_footprints.gpkg")
    assert sorted(zip(sp.area_m2.round(2), sp.at_edge)) == sorted(zip(fp.area_m2.round(2), fp.at_edge))


def test_a_building_cut_by_nodata_inside_the_raster_is_kept_though_small(tmp_path):
    """Nodata inside a raster (a collar along an orthomosaic's irregular edge, a hole) ends what was seen as the
    scene's edge does: a small piece against it is kept and flagged ``at_edge``, an equally small piece in the open
    is dropped, and a speck against it goes. The same in strips, with a strip border on the collar's first row."""
    img = np.full((3, 300, 200), 10, np.uint8)  # band 1 carries the nodata (0); 10 is valid ground
    img[0, 192:300] = 0  # a collar along the bottom, starting on a strip border below
    img[0, 100:140, 100:140] = 0  # a hole
    img[0, 188:192, 60:70] = 255  # 40 px = 10 m2 right above the collar
    img[0, 110:120, 96:100] = 255  # 40 px beside the hole
    img[0, 150:160, 20:24] = 255  # 40 px in the open: a speck
    img[0, 190:192, 150:155] = 255  # 10 px = 2.5 m2 against the collar: a speck there too
    img[0, 20:60, 120:160] = 255  # a house, 400 m2
    src = _raster(tmp_path / "c.tif", data=img, nodata=0)
    cfg = CFG.model_copy(update={"min_area_m2": 16.0})
    outs, st = predict_raster(RedModel(), src, tmp_path / "out", cfg, 0.5, progress=False)
    fp = gpd.read_file(outs.footprints)
    assert sorted(zip(fp.area_m2.round(2), fp.at_edge)) == [(10.0, True), (10.0, True), (400.0, False)]
    from geomoe.pipelines.strips import merge_strips, plan_strips, predict_strip

    req = RunRequest(cfg, 0.5)
    plan = plan_strips(RedModel(), src, "c", tmp_path / "strips", req, 1)
    assert 192 in {s.span.y0 for s in plan.strips}  # the piece above the collar and the collar in different strips
    res = merge_strips([predict_strip(RedModel(), s, req) for s in plan.strips], tmp_path / "strips", req, None)
    assert res.ok
    sp = gpd.read_file(tmp_path / "strips" / "c_footprints.gpkg")
    assert sorted(zip(sp.area_m2.round(2), sp.at_edge)) == sorted(zip(fp.area_m2.round(2), fp.at_edge))


def test_collector_marks_pieces_against_nodata_across_band_borders():
    """Nodata in the next band's first row cuts a building open above it; nodata in a band's last row cuts the next
    band's first-row pieces under it; a piece beside nodata inside a band is cut; the others are not."""
    out = []
    c = FootprintCollector(12, out.extend)
    a, va = np.zeros((4, 12), bool), np.ones((4, 12), bool)
    a[2:, 1:3] = True  # reaches the border; nodata under it in the next band
    a[1:3, 8] = True  # beside nodata inside this band
    va[1:3, 9] = False
    va[3, 5:7] = False  # nodata in the last row ...
    b, vb = np.zeros((4, 12), bool), np.ones((4, 12), bool)
    b[0:2, 5:7] = True  # ... over these
    b[2:4, 10:12] = True  # in the open
    vb[0, 1:3] = False
    c.add_band(0, a, a.astype(float), va)
    c.add_band(4, b, b.astype(float), vb)
    c.finish()
    cut = {(int(p.geom.bounds[0]), int(p.geom.bounds[1])): p.cut for p in out}
    assert cut == {(1, 2): True, (8, 1): True, (5, 4): True, (10, 6): False}


def test_collector_joins_pieces_and_u_shapes():
    out = []
    c = FootprintCollector(10, out.extend)
    a = np.zeros((4, 10), bool)
    a[2:, 1] = a[2:, 5] = True  # two legs reaching the border
    b = np.zeros((4, 10), bool)
    b[:2, 1:6] = True  # the bar joining them in the next band
    c.add_band(0, a, a.astype(float))
    c.add_band(4, b, b.astype(float))
    c.finish()
    assert len(out) == 1 and out[0].pixels == 4 + 10 and out[0].geom.area == 14


def test_regularised_footprints_on_real_geographic_crs(tmp_path):
    img = np.zeros((3, 200, 200), np.uint8)
    img[0, 50:120, 60:140] = 255
    img[0, 120:125, 60:70] = 255  # a notch: regularisation squares it up
    src = _raster(tmp_path / "geo.tif", data=img, crs="EPSG:4326")
    cfg = CFG.model_copy(update={"regularize": True, "min_area_m2": 2.0})
    outs, _ = predict_raster(RedModel(), src, tmp_path / "o", cfg, 0.5, progress=False)
    fp = gpd.read_file(outs.footprints)
    assert len(fp) == 1 and fp.crs.to_epsg() == 4326
    true_area = (70 * 80 + 50) * 1.1132 * 1.1057  # 1e-5 degree near the equator, in metres
    assert fp.area_m2.iloc[0] == pytest.approx(true_area, rel=0.08)


def test_bad_inputs_each_handled(tmp_path):
    ok = _raster(tmp_path / "ok.tif")
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"not a tiff at all")
    two = tmp_path / "two.tif"
    write_geotiff(two, np.zeros((2, 50, 50), np.uint8), "EPSG:32633", from_origin(0, 0, 1, 1))
    tiny = _raster(tmp_path / "tiny.tif", h=20, w=30)
    nodata = _raster(tmp_path / "nodata.tif", data=np.zeros((3, 80, 80), np.uint8), nodata=0)
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(p.name for p in (ok, broken, two, tiny, nodata)) + "\nmissing.tif\n")
    with pytest.warns(UserWarning, match="all nodata"):
        res = {r.path.name: r for r in predict_many(RedModel(), [listing], tmp_path / "out", RunRequest(CFG, 0.5), progress=False)}
    assert res["ok.tif"].ok and res["tiny.tif"].ok and res["nodata.tif"].ok
    assert not res["broken.tif"].ok and "broken.tif" in res["broken.tif"].message
    assert not res["two.tif"].ok and "2 bands" in res["two.tif"].message
    assert not res["missing.tif"].ok and "no such file" in res["missing.tif"].message
    with rasterio.open(outputs_for(tiny, tmp_path / "out").prob) as ds:
        assert (ds.width, ds.height) == (30, 20)
    with rasterio.open(outputs_for(nodata, tmp_path / "out").mask) as ds:
        assert (ds.read(1) == 255).all()
    assert len(gpd.read_file(outputs_for(nodata, tmp_path / "out").footprints)) == 0


def test_raster_without_crs_gets_pixel_outputs_and_no_geojson(tmp_path):
    img = np.zeros((3, 100, 100), np.uint8)
    img[0, 10:40, 10:40] = 255
    png = tmp_path / "plain.png"
    with rasterio.open(png, "w", driver="PNG", width=100, height=100, count=3, dtype="uint8") as ds:
        ds.write(img)
    with pytest.warns(UserWarning, match="no CRS"):
        outs, st = predict_raster(RedModel(), png, tmp_path / "o", CFG, 0.5, progress=False)
    assert outs.geojson is None and not (tmp_path / "o" / "plain_footprints.geojson").exists()
    fp = gpd.read_file(outs.footprints)
    assert len(fp) == 1 and fp.geometry.iloc[0].area == 900  # pixel units


def test_interrupted_run_leaves_no_output_and_resume_skips_complete(tmp_path):
    src = _raster(tmp_path / "in.tif", h=300, w=300)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="killed"):
        predict_raster(RedModel(fail_after=5), src, out, CFG, 0.5, progress=False)
    assert not any(p.exists() for p in outputs_for(src, out).all())
    assert not is_complete(src, out)
    predict_many(RedModel(), [src], out, RunRequest(CFG, 0.5), progress=False)
    assert is_complete(src, out)
    assert [p.name for p in out.iterdir() if ".partial" in p.name] == []
    res = predict_many(RedModel(fail_after=0), [src], out, RunRequest(CFG, 0.5), resume=True, progress=False)
    assert res[0].ok and "skipped" in res[0].message
    # settings that only change speed resume; those that change the outputs redo the scene
    faster = CFG.model_copy(update={"batch_size": 16, "write_behind": False})
    assert "skipped" in predict_many(RedModel(fail_after=0), [src], out, RunRequest(faster, 0.5), resume=True,
                                     progress=False)[0].message
    for cfg, threshold in ((CFG.model_copy(update={"tta": True}), 0.5), (CFG.model_copy(update={"min_area_m2": 8.0}), 0.5),
                           (CFG, 0.6)):
        res = predict_many(RedModel(), [src], out, RunRequest(cfg, threshold), resume=True, progress=False)
        assert res[0].ok and "skipped" not in res[0].message
        assert json.loads(outputs_for(src, out).summary.read_text())["settings"]["threshold"] == threshold


def test_cli_predict_with_a_trained_bundle(tmp_path, synth_root, bundle_dir):
    from geomoe.cli import app
    from geomoe.config import load_config

    bundle = bundle_dir
    scene = next(synth_root.glob("loc1/images/*.tif"))
    shutil.copy(scene, tmp_path / "scene.tif")
    (tmp_path / "bad.tif").write_bytes(b"junk")
    r = CliRunner().invoke(app, ["predict", str(tmp_path / "scene.tif"), str(tmp_path / "bad.tif"), "-b", str(bundle),
                                 "-o", str(tmp_path / "pred"), "--tta", "--soft"])
    assert r.exit_code == 1 and "1 done, 1 failed" in r.output, r.output
    summary = json.loads((tmp_path / "pred" / "scene_summary.json").read_text())
    assert summary["tiles"] > 0 and sum(summary["tiles_per_expert"].values()) == summary["tiles"]
    # the bundle routes smoothed by default; --soft weighs each tile's own nearest experts
    assert load_config("tiny").predict.routing == "smoothed" and summary["routing"] == "tile"
    with rasterio.open(tmp_path / "pred" / "scene_mask.tif") as ds:
        assert ds.crs.to_epsg() == 32633 and set(np.unique(ds.read(1))) <= {0, 1}
    # one summary for the whole run, failures with their reason
    run = json.loads((tmp_path / "pred" / "run_summary.json").read_text())
    assert run["scenes"] == 2 and run["predicted"] == 1 and len(run["failed"]) == 1
    assert "bad.tif" in run["failed"][0]["input"] and run["failed"][0]["reason"]
    assert run["tiles"] == summary["tiles"] and run["footprints"] == summary["footprints"]
    assert run["tiles_per_expert"] == {str(k): v for k, v in summary["tiles_per_expert"].items()}
    # the footprints also as GeoParquet: same features as the GPKG, with the raster's CRS
    pq_path = tmp_path / "pred" / "scene_footprints.parquet"
    assert str(pq_path) in summary["outputs"]
    gp, gk = gpd.read_parquet(pq_path), gpd.read_file(tmp_path / "pred" / "scene_footprints.gpkg")
    assert gp.crs.to_epsg() == 32633 and len(gp) == len(gk) == summary["footprints"]
    assert np.isclose(gp.geometry.area.sum(), gk.geometry.area.sum())
    assert gp.squared.dtype == bool and gp.squared.tolist() == gk.squared.tolist()


def test_regions_served_by_the_single_network_predict_what_the_single_network_predicts(tmp_path, synth_root,
                                                                                       bundle_dir):
    from geomoe.bundle import load_bundle, save_manifest
    from geomoe.cli import app

    served = tmp_path / "served"
    shutil.copytree(bundle_dir, served, ignore=shutil.ignore_patterns("runs"))
    m = json.loads((served / "manifest.json").read_text())
    save_manifest(served, {**m, "serving": [3, 3, 3]})  # as if the single network had won every region's windows
    assert load_bundle(served, with_baseline=False).baseline is not None  # routed prediction needs it now
    scene = next(synth_root.glob("loc2/images/*.tif"))
    runs = {"served": ["-b", str(served)], "single": ["-b", str(bundle_dir), "--model", "single"]}
    for name, args in runs.items():
        r = CliRunner().invoke(app, ["predict", str(scene), "-o", str(tmp_path / name), *args])
        assert r.exit_code == 0, r.output
    for layer in ("prob", "mask"):
        with rasterio.open(tmp_path / "served" / f"{scene.stem}_{layer}.tif") as a, \
                rasterio.open(tmp_path / "single" / f"{scene.stem}_{layer}.tif") as b:
            assert np.array_equal(a.read(), b.read()), layer
    got = gpd.read_file(tmp_path / "served" / f"{scene.stem}_routing.gpkg")
    assert set(got.ran) == {"single network"} and got.expert.between(0, 2).all()  # the regions are still recorded
    summary = json.loads((tmp_path / "served" / f"{scene.stem}_summary.json").read_text())
    assert set(summary["tiles_per_expert"]) == {"3"}  # the single network's id, after the experts'


def test_geoparquet_is_written_in_chunks_with_its_crs(tmp_path):
    from shapely.geometry import box

    from geomoe.pipelines.geoparquet import gpkg_to_geoparquet

    g = gpd.GeoDataFrame({"area_m2": np.arange(7.0), "expert": np.arange(7) % 3},
                         geometry=[box(i, 0, i + 0.5, 1) for i in range(7)], crs="EPSG:32614")
    g.to_file(tmp_path / "f.gpkg", layer="footprints")
    gpkg_to_geoparquet(tmp_path / "f.gpkg", tmp_path / "f.parquet", chunk=3)  # three chunks
    r = gpd.read_parquet(tmp_path / "f.parquet")
    assert r.crs.to_epsg() == 32614 and list(r.area_m2) == list(g.area_m2)
    assert all(a.equals(b) for a, b in zip(r.geometry, g.geometry))


def test_a_footprint_that_cleaning_splits_stays_one_polygon():
    """A building's outline that cleaning or regularising turned into a MultiPolygon is written as its largest part."""
    import geopandas as gpd
    from shapely.geometry import MultiPolygon, box

    from geomoe.pipelines.footprints import _one_polygon_each

    gdf = gpd.GeoDataFrame({"area_m2": [5.0, 4.0]}, geometry=[MultiPolygon([box(0, 0, 2, 2), box(2, 2, 3, 3)]), box(5, 5, 7, 7)],
                           crs="EPSG:32633")
    out = _one_polygon_each(gdf, 1.0)
    assert list(out.geom_type) == ["Polygon", "Polygon"] and out.geometry[0].equals(box(0, 0, 2, 2))
    assert list(out.area_m2) == [4.0, 4.0]
