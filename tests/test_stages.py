"""The staged prediction pipeline: reader threads and the write-behind worker change nothing in the outputs, errors
cross threads, queues bound memory, and the blender's valid mask replaces a second read of the masks."""

from __future__ import annotations

import threading
import time

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from geomoe.bundle import load_bundle
from geomoe.pipelines.background import Consumer, read_ahead
from geomoe.pipelines.inference import BundleModel
from geomoe.pipelines.outputs import RunRequest
from geomoe.pipelines.predict import predict_raster
from geomoe.pipelines.tiling import BandBlender
from geomoe.raster import open_raster, valid_window_mask

from conftest import ROOT

SCENE = ROOT / "sample" / "scenes" / "banepa_east.tif"


@pytest.fixture(scope="module")
def real_crop(tmp_path_factory):
    """A 700 x 520 crop of the real Banepa sample scene with a nodata strip (its mask) along the left edge."""
    path = tmp_path_factory.mktemp("crop") / "banepa_crop.tif"
    with rasterio.open(SCENE) as ds:
        w = Window(900, 700, 700, 520)
        prof = ds.profile | dict(width=700, height=520, transform=ds.window_transform(w), tiled=True,
                                 blockxsize=256, blockysize=256)
        with rasterio.open(path, "w", **prof) as out:
            out.write(ds.read(window=w))
            m = np.full((520, 700), 255, np.uint8)
            m[:, :70] = 0
            m[400:, 300:380] = 0
            out.write_mask(m)
    return path


def _outputs(model, src, out, cfg, threshold):
    outs, st = predict_raster(model, src, out, cfg, threshold, progress=False)
    with rasterio.open(outs.prob) as p, rasterio.open(outs.mask) as m:
        prob, mask = p.read(1), m.read(1)
    return prob, mask, gpd.read_file(outs.footprints), gpd.read_file(outs.routing), st


@pytest.mark.parametrize("case", ["native", "resampled", "skip"])
def test_staged_pipeline_equals_the_in_line_one_on_a_real_crop(case, real_crop, bundle_dir, tmp_path):
    """Reader threads a few rows ahead, the write-behind worker and footprint batches regularised by a pool while
    bands go on give byte-identical rasters and identical footprints and routing to reading, predicting, writing
    and regularising in one thread."""
    b = load_bundle(bundle_dir)
    cfg = b.config.predict.model_copy(update={"min_area_m2": 0.0, "unfamiliar": "skip" if case == "skip" else "route"})

    def model():
        m = BundleModel(b)
        if case == "resampled":  # the model runs at 1.6 x the crop's GSD: tiles are resampled, masks too
            m.input_gsd = lambda g: g * 1.6
        if case == "skip":  # every third tile of a batch unfamiliar: skipped, nodata in the outputs
            m.unfamiliar = lambda ids, dist: np.arange(len(ids)) % 3 == 0
        return m

    staged = _outputs(model(), real_crop, tmp_path / "staged",
                      cfg.model_copy(update={"readers": 2, "read_ahead": 3, "write_behind": True,
                                             "footprint_workers": 2}), b.threshold)
    inline = _outputs(model(), real_crop, tmp_path / "inline",
                      cfg.model_copy(update={"readers": 0, "write_behind": False, "footprint_workers": 0}), b.threshold)
    assert np.array_equal(staged[0], inline[0]) and np.array_equal(staged[1], inline[1])
    assert (staged[0] == 255).any() and (staged[0] < 255).any()  # nodata kept as nodata, data predicted
    assert len(staged[2]) >= 2  # footprints went through the pool
    for a, c in ((staged[2], inline[2]), (staged[3], inline[3])):
        assert len(a) == len(c)
        assert all(g.equals_exact(h, 0) for g, h in zip(a.geometry, c.geometry))
        assert a.drop(columns="geometry").equals(c.drop(columns="geometry"))
    assert staged[4].tiles == inline[4].tiles and staged[4].per_expert == inline[4].per_expert
    if case == "skip":
        assert (staged[3]["ran"] == "skipped").any()


def test_blended_valid_mask_equals_reading_the_mask_for_the_band(real_crop):
    """The mask the blender joins from the tiles' masks is the one a read of the whole band gives."""
    from geomoe.pipelines.tile_source import open_tiles
    from geomoe.config import PredictConfig

    class M:
        tile_size, gsd = 128, None

    with open_raster(real_crop) as ds:
        tiles = open_tiles(M(), ds, real_crop, PredictConfig(tile_size=128, overlap=32))
        got = np.zeros((ds.height, ds.width), bool)

        def sink(r0, values, valid):
            got[r0:r0 + valid.shape[0]] = valid

        blender = BandBlender(tiles.grid, sink)
        for row in tiles.rows(readers=2):
            blender.start_row(row.iy)
            for ix, v in zip(row.cols, row.valid):
                blender.add(ix, row.iy, np.zeros((128, 128), np.float32), v)
        blender.finish()
        tiles.close()
        want = valid_window_mask(ds, Window(0, 0, ds.width, ds.height), (ds.height, ds.width), None, True)
    assert np.array_equal(got, want) and not want.all() and want.any()


def test_read_ahead_keeps_order_bounds_work_in_flight_and_raises_errors():
    started: list[int] = []
    lock = threading.Lock()

    def work(i):
        with lock:
            started.append(i)
        time.sleep(0.01 * (i % 3))  # out-of-order finishing
        if i == 7:
            raise ValueError("tile 7 unreadable")
        return i * i

    got = []
    it = read_ahead(work, range(20), workers=3, depth=2)
    with pytest.raises(ValueError, match="tile 7"):
        for v in it:
            got.append(v)
            assert max(started) <= len(got) + 2  # never more than depth items ahead of the consumer
    assert got == [i * i for i in range(7)]
    assert list(read_ahead(lambda i: -i, range(5), workers=0, depth=2)) == [0, -1, -2, -3, -4]


def test_consumer_keeps_order_blocks_when_full_and_hands_errors_back():
    seen = []
    gate = threading.Event()

    def slow(i):
        gate.wait(5)
        seen.append(i)

    c = Consumer(slow, depth=2)
    c.put(0)  # taken by the worker, which waits at the gate
    time.sleep(0.05)
    c.put(1)
    c.put(2)  # the queue is full now
    t = threading.Thread(target=c.put, args=(3,))
    t.start()
    time.sleep(0.2)
    assert t.is_alive()  # a full queue holds the producer back
    gate.set()
    t.join(5)
    c.close()
    assert seen == [0, 1, 2, 3]

    def fails(i):
        if i == 2:
            raise OSError("disk full")

    c = Consumer(fails, depth=1)
    with pytest.raises(OSError, match="disk full"):
        for i in range(100):
            c.put(i)
        c.close()
    c.abort()


def test_consumer_makes_an_item_only_once_it_has_a_place():
    """With depth 0 the producer's copy of a band is made only when the worker is free, so at most one copy is
    alive beside the producer's own buffer, however slow the worker is."""
    alive, most = [0], [0]
    gate = threading.Event()

    def work(i):
        gate.wait(5)
        alive[0] -= 1

    def make(i):
        alive[0] += 1
        most[0] = max(most[0], alive[0])
        return i

    c = Consumer(work, depth=0)
    c.put_made(lambda: make(0))
    t = threading.Thread(target=lambda: [c.put_made(lambda i=i: make(i)) for i in range(1, 4)])
    t.start()
    time.sleep(0.2)
    assert t.is_alive() and alive[0] == 1  # the second item is not made while the first is worked on
    gate.set()
    t.join(5)
    c.close()
    assert most[0] == 1 and alive[0] == 0


def _same_footprint_sets(a: gpd.GeoDataFrame, c: gpd.GeoDataFrame) -> None:
    """The same footprints whatever their order: same count, and each matched by a topologically equal one with
    the same attributes."""
    assert len(a) == len(c)
    key = lambda g: g.assign(_x=g.geometry.centroid.x.round(6), _y=g.geometry.centroid.y.round(6),
                             _a=g.geometry.area.round(6)).sort_values(["_a", "_x", "_y"]).reset_index(drop=True)
    a, c = key(a), key(c)
    assert all(g.equals(h) for g, h in zip(a.geometry, c.geometry))
    for col in ("expert", "pixels"):
        assert list(a[col]) == list(c[col])
    assert np.allclose(a["mean_prob"], c["mean_prob"]) and np.allclose(a["area_m2"], c["area_m2"])


def _by_content(routed, tiles, k: int):
    """Routes that change from tile to tile yet are the same wherever a tile is read: from its mean brightness."""
    ids, w, dist = routed
    # at 5 a strip that routed one row too few above or below its own smooths some route differently here
    alt = (tiles.float().mean(dim=(1, 2, 3)) * 5).long().numpy() % k
    return alt[:, None].astype(ids.dtype), w, dist


def test_smoothed_routing_in_one_pass_is_the_whole_scene_majority(real_crop, bundle_dir, tmp_path):
    """Prediction settles a tile row's smoothed routes as soon as the row below it is routed (the scene is read
    once): each tile's route is the majority over its 3 x 3 neighbourhood of the tile-by-tile routes, as smoothing
    the whole scene's grid gives."""
    from geomoe.router.smoothing import smooth_grid

    b = load_bundle(bundle_dir)
    model = BundleModel(b)
    route = model.route
    model.route = lambda tiles: _by_content(route(tiles), tiles, b.k)
    grids = {}
    for how in ("tile", "smoothed"):
        cfg = b.config.predict.model_copy(update={"min_area_m2": 0.0, "routing": how})
        routing = _outputs(model, real_crop, tmp_path / how, cfg, b.threshold)[3]
        g = np.full((routing.tile_row.max() + 1, routing.tile_col.max() + 1), -1)
        g[routing.tile_row, routing.tile_col] = routing.expert
        grids[how] = g
    want = smooth_grid(grids["tile"])
    assert not np.array_equal(want, grids["tile"])  # smoothing changes some routes here
    assert np.array_equal(grids["smoothed"], want)


@pytest.mark.parametrize("routing", ["tile", "smoothed"])
def test_a_scene_in_strips_gives_the_whole_scene_outputs(routing, real_crop, bundle_dir, tmp_path):
    """Strips of one tile row (each reading the row above for its overlap), their boundary pieces joined at the merge:
    byte-identical rasters, the same routing, the same footprints as predicting the scene whole; under smoothed
    routing each strip routes the rows around its own and smooths them as the whole scene does."""
    from geomoe.pipelines.strips import merge_strips, plan_strips, predict_strip

    b = load_bundle(bundle_dir)
    cfg = b.config.predict.model_copy(update={"min_area_m2": 0.0, "routing": routing})
    model = BundleModel(b)
    if routing == "smoothed":  # routes that differ from tile to tile, so smoothing changes some of them
        route = model.route
        model.route = lambda tiles: _by_content(route(tiles), tiles, b.k)
    whole = _outputs(model, real_crop, tmp_path / "whole", cfg, b.threshold)
    req = RunRequest(cfg, b.threshold)
    plan = plan_strips(model, real_crop, "banepa_crop", tmp_path / "strips", req, 1)
    assert len(plan.strips) >= 3
    parts = [predict_strip(model, s, req) for s in reversed(plan.strips)]  # any order
    assert sum(len(p.boundary) for p in parts) > 0  # buildings do cross the strip borders here
    res = merge_strips(parts, tmp_path / "strips", req, req.provenance(model))
    assert res.ok and res.stats.tiles == whole[4].tiles and res.stats.per_expert == whole[4].per_expert
    with rasterio.open(tmp_path / "strips" / "banepa_crop_prob.tif") as p, \
            rasterio.open(tmp_path / "strips" / "banepa_crop_mask.tif") as m:
        assert np.array_equal(p.read(1), whole[0]) and np.array_equal(m.read(1), whole[1])
        assert p.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
    _same_footprint_sets(gpd.read_file(tmp_path / "strips" / "banepa_crop_footprints.gpkg"), whole[2])
    routing = gpd.read_file(tmp_path / "strips" / "banepa_crop_routing.gpkg")
    assert routing.drop(columns="geometry").equals(whole[3].drop(columns="geometry"))
    assert routing["expert"].nunique() >= 2  # several experts ran, their borders crossing the strips
    assert not (tmp_path / "strips" / ".strips" / "banepa_crop").exists()  # the parts are gone


def test_block_cache_of_a_tiled_input_does_not_grow_with_its_width(tmp_path):
    """A tiled input needs the blocks under two tiles whatever its width; a striped one a tile row of strips."""
    import rasterio
    from rasterio.transform import from_origin

    from geomoe.pipelines.predict import block_cache_bytes
    from geomoe.pipelines.writers import OUT_BLOCK

    def need(width: int, tiled: bool) -> int:
        path = tmp_path / f"{width}_{tiled}.tif"
        opts = dict(tiled=True, blockxsize=512, blockysize=512) if tiled else dict(tiled=False, blocksize=None)
        with rasterio.open(path, "w", driver="GTiff", width=width, height=64, count=3, dtype="uint8",
                           crs="EPSG:32633", transform=from_origin(0, 0, 0.5, 0.5), **opts):
            pass  # nothing written: the layout is all that matters
        with rasterio.open(path) as ds:
            return block_cache_bytes(ds, tile=256, readers=1) - 2 * OUT_BLOCK[0] * width  # the input's part

    assert need(20000, True) == need(5000, True) < 8 * 2**20
    assert need(20000, False) == 4 * need(5000, False)


def _instance_bands(band: int):
    """Building, boundary and contact probabilities of the real Austin sample's buildings (its mask, blurred as a
    model's output is), cut into bands of ``band`` rows: dense suburbs with buildings across every band border."""
    from scipy import ndimage

    with rasterio.open(ROOT / "sample" / "scenes" / "austin3_sw_mask.tif") as m:
        truth = m.read(1) > 0
    b = ndimage.gaussian_filter(truth.astype(np.float32), 1.5)
    edge = truth ^ ndimage.binary_erosion(truth, iterations=2)
    prob = np.stack([b, np.clip(ndimage.gaussian_filter(edge.astype(np.float32), 1.0) * 2, 0, 1), np.zeros_like(b)])
    valid = np.ones(truth.shape, bool)
    valid[:, :40] = False  # a nodata strip
    return [(r, prob[:, r:r + band], valid[r:r + band]) for r in range(0, truth.shape[0], band)], truth.shape


@pytest.mark.parametrize("workers", [1, 3])
def test_bands_worked_in_processes_give_the_writer_threads_rasters_and_footprints(workers, tmp_path):
    """Watershed and polygonising of each band in worker processes (bands done out of order, joined in order)
    give byte-identical rasters and exactly the footprints of doing each band in the writer's thread."""
    from geomoe.config import PredictConfig
    from geomoe.pipelines.calibration import Calibration, Calibrations
    from geomoe.pipelines.instances import Separation
    from geomoe.pipelines.outputs import outputs_for
    from geomoe.pipelines.writers import Band, BandWriter, SceneWriters

    bands, (h, w) = _instance_bands(96)
    with rasterio.open(ROOT / "sample" / "scenes" / "austin3_sw.tif") as ds:
        results = []
        for n in (0, workers):
            cfg = PredictConfig(footprint_workers=n, min_area_m2=4.0)
            outs = outputs_for(tmp_path / "austin.tif", tmp_path / f"w{n}", parquet=False)
            outs.prob.parent.mkdir()
            rules = Calibrations(Calibration(0.5, Separation(0.5, 2.0), 4.0))
            writers = SceneWriters(ds, outs, 0.75, cfg, lambda c, r: np.zeros(len(c), np.int32), rules)
            bw = BandWriter(writers, w, rules)
            assert bw.workers == n
            for r, p, v in bands:
                bw(Band(r, p.copy(), v))
            bw.finish()
            writers.finish()
            with rasterio.open(outs.prob) as p, rasterio.open(outs.mask) as m:
                results.append((p.read(1), m.read(1), gpd.read_file(outs.footprints)))
    (p0, m0, f0), (p1, m1, f1) = results
    assert np.array_equal(p0, p1) and np.array_equal(m0, m1)
    assert (m0 == 255).any() and (m0 == 1).any()
    assert len(f0) == len(f1) > 100  # hundreds of Austin buildings, many across band borders
    assert all(a.equals_exact(b, 0) for a, b in zip(f0.geometry, f1.geometry))
    assert f0.drop(columns="geometry").equals(f1.drop(columns="geometry"))


def test_bands_handed_to_workers_in_memory_come_back_exact_and_leave_no_files():
    """A band handed over as files in memory (pipelines/handoff.py) is the same band in the worker; its files go
    once the result is taken, the folder when the writer ends, also when a run fails with bands under way."""
    from geomoe.pipelines.handoff import HandedJob, Handoff, take
    from geomoe.pipelines.pool import submit

    rng = np.random.default_rng(0)
    prob = rng.random((3, 40, 300), dtype=np.float32)
    valid = rng.random((40, 300)) > 0.1
    h = Handoff()
    paths = h.put({"prob": prob, "valid": valid, "ran": None})
    back = take(paths)
    assert back["ran"] is None and np.array_equal(back["prob"], prob) and np.array_equal(back["valid"], valid)
    assert not back["prob"].flags.writeable  # mapped read-only: a worker cannot change the writer's band
    job = HandedJob(submit(1, np.sum, back["prob"]), paths)
    assert job.result() == pytest.approx(float(prob.sum()), rel=1e-5)
    assert not any(p.exists() for p in paths.values() if p is not None)
    cancelled = HandedJob(submit(1, np.sum, prob), h.put({"prob": prob}))
    cancelled.cancel()
    assert not cancelled.paths["prob"].exists()
    h.close()
    assert not h.folder.exists()


def test_band_writer_with_workers_removes_its_handoff_when_cancelled(tmp_path):
    from geomoe.config import PredictConfig
    from geomoe.pipelines.calibration import Calibration, Calibrations
    from geomoe.pipelines.instances import Separation
    from geomoe.pipelines.outputs import outputs_for
    from geomoe.pipelines.writers import Band, BandWriter, SceneWriters

    bands, (h, w) = _instance_bands(96)
    with rasterio.open(ROOT / "sample" / "scenes" / "austin3_sw.tif") as ds:
        outs = outputs_for(tmp_path / "austin.tif", tmp_path / "out", parquet=False)
        outs.prob.parent.mkdir()
        rules = Calibrations(Calibration(0.5, Separation(0.5, 2.0), 4.0))
        writers = SceneWriters(ds, outs, 0.75, PredictConfig(footprint_workers=2), lambda c, r: np.zeros(len(c), np.int32), rules)
        bw = BandWriter(writers, w, rules)
        for r, p, v in bands[:3]:
            bw(Band(r, p.copy(), v))
        assert bw.handoff.folder.exists()
        bw.cancel()
        writers.abort()
    assert not bw.handoff.folder.exists()


def test_handoff_without_room_leaves_no_partial_files_and_says_so(monkeypatch):
    """A full /dev/shm (a container's 64 MB): the band is not handed off (the writer pickles it instead) and the
    part already written is removed."""
    from geomoe.pipelines import handoff as H

    h = H.Handoff()
    real, calls = np.save, []

    def save(path, a, allow_pickle=False):
        calls.append(path)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        real(path, a, allow_pickle=allow_pickle)

    monkeypatch.setattr(H.np, "save", save)
    assert h.put({"prob": np.zeros((3, 4, 5), np.float32), "valid": np.ones((4, 5), bool)}) is None
    assert calls and not any(h.folder.iterdir())
    h.close()


def test_work_beside_the_caller_comes_back_in_order_and_bounded():
    """pool.beside: results in the items' order whether in line or on worker processes, never more than twice the
    workers waiting while the caller's generator makes items, and an error in the generator drops what waits."""
    from geomoe.pipelines.pool import beside

    made, seen = [], []

    def items(n: int):
        for k in range(n):
            made.append(k)
            # items made ahead of the results taken: at most 2 x workers waiting, plus the one being made
            assert len(made) - len(seen) <= 2 * 2 + 1
            yield -k

    for r in beside(2, abs, items(12)):
        seen.append(r)
    assert seen == list(range(12))
    assert list(beside(0, abs, items(0))) == []
    assert list(beside(0, abs, [-3, 4])) == [3, 4]

    def failing():
        yield -1
        raise RuntimeError("reader failed")

    with pytest.raises(RuntimeError, match="reader failed"):
        list(beside(2, abs, failing()))
    # a worker killed under an item (out of memory, say): that item is worked again in this process, the rest go on
    assert list(beside(2, _dies_in_a_worker, [-1, -2, -3])) == [1, 2, 3]


def _dies_in_a_worker(x: int) -> int:
    """abs(x), but a worker process dies on -2 (as the kernel's out-of-memory killer ends one)."""
    import multiprocessing
    import os

    if x == -2 and multiprocessing.current_process().name != "MainProcess":
        os._exit(1)
    return abs(x)
