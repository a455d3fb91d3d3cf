"""Imagery as users have it and a router that says when it does not know: regression tests for the trust issue."""

from __future__ import annotations

import json

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin

from geomoe.config import PredictConfig
from geomoe.data.synthetic import write_geotiff
from geomoe.metrics import Scores
from geomoe.pipelines.inference import BundleModel
from geomoe.pipelines.outputs import RunRequest
from geomoe.pipelines.predict import predict_raster
from geomoe.raster import fill_invalid


def test_building_f1_is_zero_when_nothing_matches_and_undefined_only_without_buildings():
    truth = np.zeros((32, 32), bool)
    truth[4:12, 4:12] = True
    s = Scores()
    s.update(np.zeros_like(truth), truth)  # a building missed, nothing predicted
    assert s.summary()["building_f1"] == 0.0
    s = Scores()
    s.update(np.zeros_like(truth), np.zeros_like(truth))
    assert np.isnan(s.summary()["building_f1"])


def test_invalid_pixels_take_the_nearest_valid_value():
    img = np.zeros((3, 6, 6), np.uint8)
    img[:, :, :3] = 10
    img[:, :, 3:] = 200
    valid = np.ones((6, 6), bool)
    valid[:, 4:] = False  # a nodata border on the right
    out = fill_invalid(img, valid)
    assert (out[:, :, 4:] == 200).all() and (out[:, :, :4] == img[:, :, :4]).all()


class _Recorder:
    """Keeps every tile the model is shown."""

    tile_size, gsd = 64, None

    def __init__(self):
        self.seen = []

    def route(self, tiles):
        n = len(tiles)
        return np.zeros((n, 1), np.int64), np.ones((n, 1), np.float32), np.zeros(n, np.float32)

    def predict(self, expert, tiles):
        self.seen.append(tiles.clone())
        return torch.zeros(len(tiles), 64, 64)


def test_prediction_never_shows_the_model_nodata_values_or_black_frames(tmp_path):
    """Tiles past the raster edge and over nodata are completed from valid pixels, as in training."""
    img = np.full((3, 100, 90), 120, np.uint8)
    img[:, :, 60:] = 0  # nodata value on the right third
    src = tmp_path / "nd.tif"
    write_geotiff(src, img, "EPSG:32633", from_origin(500000, 4000000, 0.5, 0.5), nodata=0)
    rec = _Recorder()
    predict_raster(rec, src, tmp_path / "o", PredictConfig(tile_size=64, overlap=16, batch_size=4, regularize=False),
                   0.5, progress=False)
    seen = torch.cat(rec.seen)
    assert seen.min() == 120 and seen.max() == 120  # no 0 from the nodata, no black padding past the edges


def test_unfamiliar_tiles_are_flagged_routed_to_the_baseline_or_skipped(bundle_dir, synth_root, tmp_path):
    from geomoe.bundle import load_bundle

    b = load_bundle(bundle_dir)
    assert (bundle_dir / "regions" / "familiarity.json").exists() and b.familiarity.quantile == 0.99
    assert np.isfinite(b.familiarity.thresholds).all()
    # a training scene is mostly familiar; a scene of saturated noise is not
    scene = sorted((synth_root / "loc0" / "images").glob("*.tif"))[0]
    rng = np.random.default_rng(0)
    noise = np.where(rng.random((3, 192, 192)) > 0.5, 255, 0).astype(np.uint8)
    odd = tmp_path / "noise.tif"
    write_geotiff(odd, noise, "EPSG:32633", from_origin(600000, 4000000, 0.5, 0.5))
    cfg = b.config.predict
    _, st = predict_raster(BundleModel(b), scene, tmp_path / "known", cfg, b.threshold, progress=False)
    assert st.unfamiliar / st.tiles <= 0.25
    _, st = predict_raster(BundleModel(b), odd, tmp_path / "odd", cfg, b.threshold, progress=False)
    assert st.unfamiliar == st.tiles > 0
    for action in ("baseline", "skip"):
        pc = cfg.model_copy(update={"unfamiliar": action})
        outs, st = predict_raster(BundleModel(b), odd, tmp_path / action, pc, b.threshold, progress=False)
        layer = gpd.read_file(outs.routing)
        assert layer.unfamiliar.all()
        assert set(layer.ran) == {"single network" if action == "baseline" else "skipped"}
        with rasterio.open(outs.prob) as ds:
            nodata = (ds.read(1) == 255).mean()
        assert nodata == (1.0 if action == "skip" else 0.0)
        assert json.loads(outs.summary.read_text())["unfamiliar_tiles"] == st.tiles


def test_predict_model_runs_the_single_network_or_the_generalist_on_every_tile(bundle_dir, synth_root, tmp_path):
    """--model single / generalist: that network's probabilities on every tile, exactly what the routed path gives
    when every expert is that network; the tiles are still routed for the routing layer's record."""
    from dataclasses import replace

    from typer.testing import CliRunner

    from geomoe.bundle import load_bundle
    from geomoe.cli import app

    b = load_bundle(bundle_dir)
    scene = sorted((synth_root / "loc1" / "images").glob("*.tif"))[0]
    cfg = b.config.predict
    names = {"single": "single network", "generalist": "generalist"}
    for use, net in (("single", b.baseline), ("generalist", b.generalist)):
        outs, st = predict_raster(BundleModel(b, use=use), scene, tmp_path / use, cfg, b.threshold, progress=False)
        # every region served by its expert, here that network
        as_experts = replace(b, experts=[net] * b.k, manifest={**b.manifest, "serving": None})
        same, _ = predict_raster(BundleModel(as_experts), scene, tmp_path / f"{use}_as_experts", cfg, b.threshold,
                                 progress=False)
        with rasterio.open(outs.prob) as a, rasterio.open(same.prob) as c:
            assert np.array_equal(a.read(), c.read())
        layer = gpd.read_file(outs.routing)
        assert set(layer.ran) == {names[use]} and (layer.expert < b.k).all()  # routed all the same
        summary = json.loads(outs.summary.read_text())
        assert summary["tiles_per_expert"] == {str(b.k + (use == "generalist")): st.tiles}
        assert summary["settings"]["model"] == use
    # the two networks answer differently, so the equalities above tell which one ran (the experts cannot serve
    # here: an expert whose fine-tuning did not beat its start on validation is the generalist itself)
    assert any(not torch.equal(p, q) for p, q in zip(b.baseline.state_dict().values(),
                                                      b.generalist.state_dict().values()))
    name = outs.prob.name
    with rasterio.open(tmp_path / "single" / name) as a, rasterio.open(tmp_path / "generalist" / name) as c:
        assert not np.array_equal(a.read(), c.read())
    with pytest.raises(ValueError, match="no generalist"):
        BundleModel(replace(b, generalist=None), use="generalist")
    r = CliRunner().invoke(app, ["predict", str(scene), "-b", str(bundle_dir), "-o", str(tmp_path / "cli"),
                                 "--model", "biggest"])
    assert r.exit_code == 1 and "--model biggest: choose experts, single, generalist" in r.output


def test_evaluate_reports_the_unfamiliar_share_per_location(bundle_dir, synth_root):
    from geomoe.bundle import load_bundle
    from geomoe.pipelines.evaluate import evaluate

    b = load_bundle(bundle_dir)
    ev = evaluate(b, synth_root, split="train", progress=False)
    counts = ev.routing[[c for c in ev.routing if c.startswith("expert ")]].sum(1)
    flagged = (ev.routing.unfamiliar * counts).round().sum()
    # the thresholds are the 99th percentile of these very tiles: at most one per region (or 1 %) lies beyond
    assert 0 <= flagged <= max(b.k, 0.01 * counts.sum())
    assert ((ev.routing.unfamiliar >= 0) & (ev.routing.unfamiliar <= 1)).all()


class _Flat:
    tile_size, gsd = 64, None

    def __init__(self, value: float = 0.7, fail: Exception | None = None):
        self.value, self.fail = value, fail

    def route(self, tiles):
        n = len(tiles)
        return np.zeros((n, 1), np.int64), np.ones((n, 1), np.float32), np.zeros(n, np.float32)

    def predict(self, expert, tiles):
        if self.fail is not None:
            raise self.fail
        return torch.full((len(tiles), 64, 64), self.value)


def test_same_file_names_in_two_folders_get_their_own_outputs_and_resume_checks_the_input(tmp_path):
    from geomoe.pipelines.outputs import is_complete, output_names, outputs_for
    from geomoe.pipelines.predict import predict_many

    cfg = PredictConfig(tile_size=64, overlap=16, batch_size=4, regularize=False)
    srcs = []
    for i, folder in enumerate(("north", "south")):
        (tmp_path / folder).mkdir()
        p = tmp_path / folder / "scene.tif"
        write_geotiff(p, np.full((3, 80, 80), 50 + 100 * i, np.uint8), "EPSG:32633", from_origin(500000, 4000000, 0.5, 0.5))
        srcs.append(p)
    (tmp_path / "north" / "._scene.tif").write_bytes(b"\x00\x05\x16\x07 AppleDouble junk")
    names = output_names(srcs)
    assert names[srcs[0]] != names[srcs[1]]
    out = tmp_path / "out"
    res = predict_many(_Flat(), [tmp_path / "north", tmp_path / "south"], out, RunRequest(cfg, 0.5), progress=False)
    assert [r.ok for r in res] == [True, True]  # the AppleDouble file is skipped, not a failure
    assert all(is_complete(s, out, name=names[s]) for s in srcs)
    assert len({outputs_for(s, out, name=names[s]).prob for s in srcs}) == 2
    # the input changes after its outputs were written: resume predicts it again
    write_geotiff(srcs[0], np.full((3, 80, 80), 90, np.uint8), "EPSG:32633", from_origin(500000, 4000000, 0.5, 0.5))
    assert not is_complete(srcs[0], out, name=names[srcs[0]])
    res = predict_many(_Flat(), srcs, out, RunRequest(cfg, 0.5), resume=True, progress=False)
    assert [r.message for r in res][1] == "skipped (complete)" and "skipped" not in res[0].message


def test_one_scene_failing_with_any_error_does_not_end_the_run(tmp_path):
    from geomoe.pipelines.predict import predict_many

    cfg = PredictConfig(tile_size=64, overlap=16, batch_size=4, regularize=False)
    src = tmp_path / "a.tif"
    write_geotiff(src, np.full((3, 80, 80), 50, np.uint8), "EPSG:32633", from_origin(500000, 4000000, 0.5, 0.5))
    res = predict_many(_Flat(fail=OSError("disk full")), [src, tmp_path / "missing.tif"], tmp_path / "o", RunRequest(cfg, 0.5),
                       progress=False)
    assert [r.ok for r in res] == [False, False]
    assert "OSError: disk full" in res[0].message and "no such file" in res[1].message


def test_train_stops_when_a_location_loses_every_image_unless_told_to_skip_it(synth_root, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from geomoe.cli import app
    from geomoe.config import DataConfig
    from geomoe.data.datasets import prepare

    root = tmp_path / "data"
    shutil.copytree(synth_root, root)
    for m in (root / "loc1" / "masks").glob("*.tif"):
        m.write_bytes(b"not a tiff")  # every mask of loc1 broken
    res = CliRunner().invoke(app, ["train", str(root), "-o", str(tmp_path / "b"), "-c", "tiny"])
    assert res.exit_code == 1 and "loc1 lost all its 2 labelled images" in res.output and "--skip-location loc1" in res.output
    assert len(res.output.strip().splitlines()) == 1
    prep = prepare(root, DataConfig(skip_locations=["loc1"], patch_size=64, block_size=128, val_fraction=0.25))
    assert prep.locations == ["loc0", "loc2"] and prep.report.skipped_locations == ["loc1"]
    assert "loc1" not in prep.report.locations and prep.report.locations["loc0"]["used"] == 2


def test_bundle_records_what_training_used(bundle_dir):
    m = json.loads((bundle_dir / "manifest.json").read_text())
    assert m["data"]["locations"]["loc0"] == {"images": 2, "labelled": 2, "used": 2}
    assert m["data"]["skipped_scenes"] == [] and m["steps"]["baseline"] > 0


class _Identity:
    """probability = red band / 255: any resampling or shift of the pixels shows in the output."""

    tile_size, gsd = 64, None

    def route(self, tiles):
        n = len(tiles)
        return np.zeros((n, 1), np.int64), np.ones((n, 1), np.float32), np.zeros(n, np.float32)

    def predict(self, expert, tiles):
        return tiles[:, 0].float() / 255.0


def test_rotated_raster_is_read_in_pixel_space_and_keeps_its_grid(tmp_path):
    from rasterio.transform import Affine

    rng = np.random.default_rng(3)
    img = rng.integers(1, 255, (3, 150, 170), dtype=np.uint8)
    t = Affine.translation(500000, 4000000) * Affine.rotation(20) * Affine.scale(0.5, -0.5)
    src = tmp_path / "rot.tif"
    write_geotiff(src, img, "EPSG:32633", t)
    outs, st = predict_raster(_Identity(), src, tmp_path / "o", PredictConfig(tile_size=64, overlap=16, batch_size=4,
                                                                               regularize=False), 0.5, progress=False)
    with rasterio.open(outs.prob) as ds:
        prob = ds.read(1)
        assert ds.transform.almost_equals(t)
    assert (prob != 255).all()  # no pixel lost to nodata
    assert np.abs(prob.astype(int) - np.round(img[0] / 255 * 254)).max() <= 1  # the very pixels, unshifted
    cells = gpd.read_file(outs.routing)
    assert abs(cells.union_all().area - 150 * 170 * 0.25) < 1.0  # the cells cover the true, rotated footprint


@pytest.mark.parametrize("kind", ["uint16-12bit", "float-reflectance"])
def test_other_bit_depths_look_like_the_8_bit_original(tmp_path, kind):
    """A 12-bit (uint16) or reflectance (float) copy of a scene is scaled back to 8 bits before the model sees it."""
    rng = np.random.default_rng(4)
    img8 = rng.integers(0, 256, (3, 90, 110), dtype=np.uint8)
    img8[:, 0, 0] = 255  # the scene uses its full range
    other = (img8.astype(np.uint16) * 16 + 8) if kind.startswith("uint16") else img8.astype(np.float32) / 255.0
    cfg = PredictConfig(tile_size=64, overlap=16, batch_size=4, regularize=False)
    probs = []
    for name, data in (("a8.tif", img8), ("b.tif", other)):
        write_geotiff(tmp_path / name, data, "EPSG:32633", from_origin(500000, 4000000, 0.5, 0.5))
        outs, _ = predict_raster(_Identity(), tmp_path / name, tmp_path / name[:-4], cfg, 0.5, progress=False)
        with rasterio.open(outs.prob) as ds:
            probs.append(ds.read(1).astype(int))
    assert np.abs(probs[0] - probs[1]).max() <= 2


def test_multispectral_needs_a_band_choice_and_a_uint16_image_with_a_uint8_mask_trains(tmp_path):
    from geomoe.config import DataConfig
    from geomoe.data.datasets import GridDataset, prepare
    from geomoe.raster import RasterError

    rng = np.random.default_rng(5)
    six = rng.integers(0, 4096, (6, 128, 128), dtype=np.uint16)
    mask = (rng.random((128, 128)) > 0.7).astype(np.uint8) * 255
    for loc in ("a", "b"):
        (tmp_path / "root" / loc / "images").mkdir(parents=True)
        (tmp_path / "root" / loc / "masks").mkdir(parents=True)
        t = from_origin(500000 + (loc == "b") * 5000, 4000000, 0.5, 0.5)
        write_geotiff(tmp_path / "root" / loc / "images" / "s.tif", six, "EPSG:32633", t)
        write_geotiff(tmp_path / "root" / loc / "masks" / "s.tif", mask, "EPSG:32633", t)
    cfg = DataConfig(patch_size=64, block_size=64, val_fraction=0.0, test_fraction=0.0, split_gap=0)
    with pytest.raises(RasterError, match="6 bands; choose the red, green and blue"):
        prepare(tmp_path / "root", cfg)
    prep = prepare(tmp_path / "root", cfg.model_copy(update={"bands": [3, 2, 1]}))
    d = GridDataset(prep, prep.windows("train"))[0]
    assert d["image"].dtype == torch.uint8 and d["image"].float().max() > 200  # 12 bits scaled to 8, not clipped
    with pytest.raises(RasterError, match=r"bands \[7, 2, 1\] asked for"):
        prepare(tmp_path / "root", cfg.model_copy(update={"bands": [7, 2, 1]}))


def test_a_small_crop_gives_about_the_answer_of_the_same_pixels_inside_the_scene(bundle_dir, synth_root, tmp_path,
                                                                                 monkeypatch):
    """A 40 x 40 crop (smaller than the 64 px tile, so padded) against the same pixels in its 256 px scene,
    with a trained U-Net expert: completion from the nearest valid pixel keeps the answer close, closer than the
    black frame used before."""
    import geomoe.pipelines.tile_source as pred
    from geomoe.bundle import load_bundle

    b = load_bundle(bundle_dir)
    scene = sorted((synth_root / "loc1" / "images").glob("*.tif"))[0]
    with rasterio.open(scene) as ds:
        crop = ds.read(window=rasterio.windows.Window(108, 108, 40, 40))
        t = ds.window_transform(rasterio.windows.Window(108, 108, 40, 40))
        crs = ds.crs
    small = tmp_path / "crop.tif"
    write_geotiff(small, crop, crs.to_string(), t)

    def prob(src, name):
        outs, _ = predict_raster(BundleModel(b), src, tmp_path / name, b.config.predict, b.threshold, progress=False)
        with rasterio.open(outs.prob) as ds:
            return ds.read(1).astype(float) / 254

    full = prob(scene, "full")[108:148, 108:148]
    filled = prob(small, "filled")
    monkeypatch.setattr(pred, "fill_invalid", lambda img, valid: np.where(valid[None], img, 0).astype(img.dtype))
    black = prob(small, "black")
    d_fill, d_black = np.abs(full - filled).mean(), np.abs(full - black).mean()
    print(f"mean |difference| to the full scene: completed {d_fill:.4f}, black frame {d_black:.4f}")
    assert abs((full >= 0.5).mean() - (filled >= 0.5).mean()) < 0.1
    assert d_fill < 0.15 and d_fill < d_black, (d_fill, d_black)


def test_cli_errors_are_one_line_with_exit_1(tmp_path):
    """A missing demo sample, a bad --routing, an output folder under a file: one line each, no traceback."""
    from typer.testing import CliRunner

    from geomoe.cli import app

    r = CliRunner()
    res = r.invoke(app, ["demo", "--data", str(tmp_path / "none")])
    assert res.exit_code == 1 and "no demo sample here" in res.output and "--data" in res.output
    (tmp_path / "f").write_text("x")
    res = r.invoke(app, ["train", str(tmp_path), "-o", str(tmp_path / "f" / "b"), "-c", "tiny"])
    assert res.exit_code == 1 and "is a file" in res.output
    for res in (r.invoke(app, ["demo", "--data", str(tmp_path / "none")]),
                r.invoke(app, ["train", str(tmp_path), "-o", str(tmp_path / "f" / "b"), "-c", "tiny"])):
        assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output


def test_scene_picture_marks_unfamiliar_tiles(tmp_path):
    from geomoe.pipelines.scene_plots import plot_scene

    class HalfOdd(_Identity):
        def unfamiliar(self, ids, dist):
            return np.arange(len(ids)) % 2 == 0

    src = tmp_path / "s.tif"
    write_geotiff(src, np.random.default_rng(1).integers(0, 255, (3, 150, 170), dtype=np.uint8), "EPSG:32633",
                  from_origin(500000, 4000000, 0.5, 0.5))
    outs, st = predict_raster(HalfOdd(), src, tmp_path / "o", PredictConfig(tile_size=64, overlap=16, batch_size=4,
                                                                             regularize=False), 0.5, progress=False)
    layer = gpd.read_file(outs.routing)
    assert 0 < layer.unfamiliar.sum() < len(layer) and st.unfamiliar == layer.unfamiliar.sum()
    png = plot_scene(src, outs, tmp_path / "scene.png")
    assert png.exists() and png.stat().st_size > 10_000


def test_regularisation_keeps_every_building():
    """Regularised footprints: one per piece, none dropped (a piece it cannot regularise keeps its outline)."""
    from rasterio.crs import CRS
    from shapely.geometry import Polygon, box

    from geomoe.pipelines.footprints import FrameSpec, Piece, pieces_to_frame
    from geomoe.pipelines.regularise import Regularisation

    pieces = [Piece(box(10, 10, 30, 24), 280, 200.0), Piece(box(40, 10, 52, 30), 240, 180.0),
              Piece(Polygon([(60, 10), (75, 12), (74, 28), (61, 26)]), 230, 150.0),
              Piece(box(80, 10, 83, 13), 9, 8.0)]  # a shed at the size limit
    t = from_origin(500000, 4000000, 0.5, 0.5)
    gdf = pieces_to_frame(pieces, FrameSpec(t, CRS.from_epsg(32633), 0.5, 1.0, Regularisation.of(PredictConfig())))
    assert len(gdf) == 4 and gdf.geometry.is_valid.all() and not gdf.geometry.is_empty.any()
    assert abs(gdf.area_m2.iloc[0] - 20 * 14 * 0.25) / (20 * 14 * 0.25) < 0.2


def test_ctrl_c_says_nothing_partial_remains_and_how_to_resume(bundle_dir, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    src = tmp_path / "big.tif"
    write_geotiff(src, np.random.default_rng(2).integers(0, 255, (3, 1500, 1500), dtype=np.uint8), "EPSG:32633",
                  from_origin(500000, 4000000, 0.5, 0.5))
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "geomoe.cli", "predict", str(src), "-b", str(bundle_dir), "-o", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not any(out.glob("*.raw.tif")):  # wait until prediction has started writing
        time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    text, _ = p.communicate(timeout=120)
    assert p.returncode == 130 and "interrupted" in text and "resume" in text and "Traceback" not in text
    assert not [f for f in out.iterdir() if f.name.startswith("big_")]  # nothing under a final name, no leftovers


def test_the_cli_gives_a_warning_as_one_line_for_the_user(bundle_dir, tmp_path):
    """An image without a CRS: the command says so once, as "warning: ...", without Python's file and line, and
    pyogrio's own notice about each layer without a CRS is not repeated after it."""
    import subprocess
    import sys

    src = tmp_path / "plain.png"
    with rasterio.open(src, "w", driver="PNG", width=96, height=96, count=3, dtype="uint8") as ds:
        ds.write(np.random.default_rng(3).integers(0, 255, (3, 96, 96), dtype=np.uint8))
    p = subprocess.run([sys.executable, "-m", "geomoe.cli", "predict", str(src), "-b", str(bundle_dir), "-o",
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stderr.splitlines()
    assert [ln for ln in lines if ln.startswith("warning:")] == [
        f"warning: {src}: no CRS; outputs are in pixel coordinates and no GeoJSON is written; its resolution is "
        "unknown (give --gsd) so it is not resampled"]
    assert "UserWarning" not in p.stderr and "crs' was not provided" not in p.stderr
