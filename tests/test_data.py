"""The data layer: layouts, bad input, GSD, sampling and the split, on synthetic and shipped real data."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin
from typer.testing import CliRunner

from geomoe.cli import app
from geomoe.config import DataConfig
from geomoe.data.catalog import discover
from geomoe.data.check import check_catalog
from geomoe.data.datasets import GridDataset, RandomPatchDataset, augment, compute_stats, prepare
from geomoe.data.reader import SceneReader
from geomoe.data.synthetic import make_synthetic, write_geotiff
from geomoe.raster import Grid, ground_sampling_distance

from conftest import SAMPLE


def _write(path: Path, data: np.ndarray, crs="EPSG:32633", transform=None, nodata=None):
    write_geotiff(path, data, crs, transform or from_origin(500000, 4000000, 0.5, 0.5), nodata)


def _problems(cat) -> str:
    return "\n".join(str(p) for p in cat.problems)


# --- layouts -------------------------------------------------------------------------------------

def test_folder_layout_and_mask_scales(tmp_path):
    make_synthetic(tmp_path / "a", n_locations=2, scenes_per_location=1, mask_scale=1)
    make_synthetic(tmp_path / "b", n_locations=2, scenes_per_location=1, mask_scale=255)
    ra = SceneReader(discover(tmp_path / "a").scenes[0]).read(0, 0, 256)
    rb = SceneReader(discover(tmp_path / "b").scenes[0]).read(0, 0, 256)
    assert set(np.unique(ra.mask)) == {0, 1} and np.array_equal(ra.mask, rb.mask)


def test_inria_layout_holds_out_tiles_1_to_5(tmp_path):
    train = tmp_path / "AerialImageDataset" / "train"
    rng = np.random.default_rng(0)
    for city in ("austin", "vienna"):
        for n in (1, 5, 6, 7):
            _write(train / "images" / f"{city}{n}.tif", rng.integers(0, 255, (3, 64, 64), dtype=np.uint8))
            _write(train / "gt" / f"{city}{n}.tif", (rng.random((64, 64)) > 0.5).astype(np.uint8) * 255)
    cat = discover(tmp_path)
    assert cat.layout == "inria" and cat.locations == ["austin", "vienna"]
    split = {s.name: s.split for s in cat.scenes}
    # the paper's held-out tiles are the test split; validation blocks come out of the other tiles
    assert split["austin1"] == split["vienna5"] == "test" and split["austin6"] == split["vienna7"] == "train"
    prep = prepare(tmp_path, DataConfig(patch_size=32, val_fraction=0.2))
    test_scenes = {prep.readers[r.scene].scene.name for r in prep.windows("test")}
    assert test_scenes == {"austin1", "austin5", "vienna1", "vienna5"}
    val_scenes = {prep.readers[r.scene].scene.name for r in prep.windows("val")}
    assert val_scenes and val_scenes <= {"austin6", "austin7", "vienna6", "vienna7"}


def test_locations_csv_is_read():
    cat = discover(SAMPLE)
    assert set(cat.locations_meta) >= {"austin", "banepa", "kampala"}
    assert float(cat.locations_meta["banepa"]["lat"]) == pytest.approx(27.63)


def test_vector_labels_match_the_rasterised_masks_on_real_tiles(tmp_path):
    """Banepa's OSM polygons, rasterised on each tile's own grid, reproduce the shipped masks."""
    loc = tmp_path / "banepa"
    (loc / "images").mkdir(parents=True)
    tiles = sorted((SAMPLE / "banepa" / "images").glob("*.tif"))[:3]
    for t in tiles:
        shutil.copy(t, loc / "images" / t.name)
    shutil.copy(SAMPLE / "banepa" / "labels.geojson", loc / "labels.geojson")
    cat = discover(tmp_path)
    assert all(s.label_kind == "vector" for s in cat.scenes)
    for s in cat.scenes:
        vec = SceneReader(s).read(0, 0, 512).mask
        with rasterio.open(SAMPLE / "banepa" / "masks" / s.image.name) as ds:
            ref = ds.read(1) > 0
        inter, union = (vec.astype(bool) & ref).sum(), (vec.astype(bool) | ref).sum()
        assert union > 0 and inter / union > 0.95


def test_labels_under_the_names_datasets_ship_them_with_are_found(tmp_path):
    """Masks in labels/ named <image>_mask.tif, a vector file per image, and an image with no label at all: the
    first two read as the shipped masks on real tiles, the third is named with where its label was looked for."""
    kampala, banepa = tmp_path / "kampala", tmp_path / "banepa"
    for d in (kampala / "images", kampala / "labels", banepa / "images", banepa / "gt"):
        d.mkdir(parents=True)
    k_tiles = sorted((SAMPLE / "kampala" / "images").glob("*.tif"))[:3]
    for t in k_tiles[:2]:
        shutil.copy(t, kampala / "images" / t.name)
        shutil.copy(SAMPLE / "kampala" / "masks" / t.name, kampala / "labels" / f"{t.stem}_mask.tif")
    shutil.copy(k_tiles[2], kampala / "images" / k_tiles[2].name)  # no label anywhere
    b_tile = sorted((SAMPLE / "banepa" / "images").glob("*.tif"))[0]
    shutil.copy(b_tile, banepa / "images" / b_tile.name)
    shutil.copy(SAMPLE / "banepa" / "labels.geojson", banepa / "gt" / f"{b_tile.stem}.geojson")

    cat = discover(tmp_path)
    kinds = {s.image.name: s.label_kind for s in cat.scenes}
    assert kinds == {k_tiles[0].name: "mask", k_tiles[1].name: "mask", k_tiles[2].name: None, b_tile.name: "vector"}
    [missing] = [p for p in cat.problems if "no label" in p.message]
    assert not missing.fatal and k_tiles[2].name in missing.message and "_mask" in missing.message
    for s in cat.labelled():
        got = SceneReader(s).read(0, 0, 256 if s.location == "kampala" else 512).mask.astype(bool)
        with rasterio.open(SAMPLE / s.location / "masks" / s.image.name) as ds:
            ref = ds.read(1) > 0
        assert got.any() and (got & ref).sum() / (got | ref).sum() > (0.999 if s.location == "kampala" else 0.95)


def test_lossy_masks_and_instance_id_masks_are_read_as_their_makers_meant(tmp_path):
    """Real Kampala masks saved as JPEG (values between 0 and 255) read back as the shipped masks; an instance mask
    (one id per building) keeps two touching buildings apart, in the truth and in the training targets; a 0/1 mask
    and a grey mask saved as RGB PNG read as they were; a colour mask is refused; each reading is said by the check."""
    from PIL import Image

    from experts.targets import building_targets

    town = tmp_path / "town"
    for d in ("images", "masks"):
        (town / d).mkdir(parents=True)
    tiles = sorted((SAMPLE / "kampala" / "images").glob("*.tif"))[:2]
    for t in tiles:
        shutil.copy(t, town / "images" / t.name)
        with rasterio.open(SAMPLE / "kampala" / "masks" / t.name) as ds:
            Image.fromarray(ds.read(1)).save(town / "masks" / f"{t.stem}.jpg", quality=85)
    ids = np.zeros((64, 64), np.uint16)
    ids[10:30, 10:30], ids[10:30, 30:50], ids[40:50, 5:15] = 1, 2, 3  # 1 and 2 share a wall
    _write(tmp_path / "rows" / "images" / "r.tif", np.full((3, 64, 64), 90, np.uint8))
    _write(tmp_path / "rows" / "masks" / "r.tif", ids)
    _write(tmp_path / "rows" / "images" / "b.tif", np.full((3, 64, 64), 90, np.uint8))
    _write(tmp_path / "rows" / "masks" / "b.tif", (ids > 0).astype(np.uint8))
    grey = np.repeat(((ids > 0) * 255).astype(np.uint8)[..., None], 3, axis=2)
    for name, rgb in (("g", grey), ("c", grey * np.array([1, 0, 1], np.uint8))):  # grey saved as RGB; a colour map
        _write(tmp_path / "rows" / "images" / f"{name}.tif", np.full((3, 64, 64), 90, np.uint8))
        Image.fromarray(rgb).save(tmp_path / "rows" / "masks" / f"{name}.png")

    cat = discover(tmp_path)
    _, sums = check_catalog(cat, progress=False)
    text = _problems(cat)
    assert text.count("read as building where 128 or more") == 2 and text.count("several building values") == 1
    [colour] = [p for p in cat.problems if p.fatal]
    assert colour.path.name == "c.png" and "mask is in colour" in colour.message
    assert {s.location: (s.usable, s.ids) for s in sums} == {"town": (2, False), "rows": (3, True)}
    readings = {s.image.name: s.mask_reading for s in cat.scenes}
    assert readings == {tiles[0].name: "lossy", tiles[1].name: "lossy", "r.tif": "ids", "b.tif": "binary",
                        "g.tif": "binary", "c.tif": None}
    cat.scenes = [s for s in cat.scenes if s.name != "c"]
    for s in cat.scenes:
        p = SceneReader(s).read(0, 0, 256 if s.location == "town" else 64)
        if s.location == "town":
            with rasterio.open(SAMPLE / "kampala" / "masks" / s.image.name) as ds:
                ref = ds.read(1) > 0
            got = p.mask.astype(bool)
            assert (got & ref).sum() / (got | ref).sum() > 0.99
        else:
            assert p.mask.sum() == 900 and len(np.unique(p.instances)) - 1 == (3 if s.name == "r" else 2), s.name
            contact = building_targets(p.mask, instances=p.instances)[2]
            assert contact[10:30, 28:32].any() == (s.name == "r")  # the shared wall only where ids tell it
    lines = "\n".join(prepare(tmp_path, DataConfig(patch_size=64)).report.lines())  # what train prints
    assert "2 masks read as 0/255 with values between (lossy)" in lines and "1 mask read as building ids" in lines


def test_a_mask_on_a_grid_of_its_own_is_read_onto_its_image(tmp_path):
    """A real Kampala mask at twice the resolution, and one reprojected to EPSG:4326: both read on the image's grid
    as the shipped mask; pixels the mask does not reach are not valid."""
    from rasterio.warp import calculate_default_transform, reproject

    tile = sorted((SAMPLE / "kampala" / "images").glob("*.tif"))[0]
    loc = tmp_path / "town"
    (loc / "masks").mkdir(parents=True)
    with rasterio.open(SAMPLE / "kampala" / "masks" / tile.name) as m:
        ref, prof, crs, tr, bounds = m.read(1), m.profile, m.crs, m.transform, m.bounds
    fine = np.repeat(np.repeat(ref, 2, 0), 2, 1)[:, :400]  # cut short: the east part of the image has no label
    _write(loc / "masks" / "fine.tif", fine, crs=crs, transform=tr * rasterio.Affine.scale(0.5))
    t4326, w, h = calculate_default_transform(crs, "EPSG:4326", prof["width"], prof["height"], *bounds)
    geo = np.zeros((h, w), np.uint8)
    reproject(ref, geo, src_transform=tr, src_crs=crs, dst_transform=t4326, dst_crs="EPSG:4326")
    _write(loc / "masks" / "geo.tif", geo, crs="EPSG:4326", transform=t4326)
    for name in ("fine", "geo"):
        (loc / "images").mkdir(exist_ok=True)
        shutil.copy(tile, loc / "images" / f"{name}.tif")
    cat = discover(tmp_path)
    reports, _ = check_catalog(cat, progress=False)
    assert all(r.ok for r in reports) and all(s.mask_on_own_grid for s in cat.scenes)
    assert "2 masks on another grid than the image's" in "\n".join(prepare(tmp_path, DataConfig(patch_size=64)).report.lines())
    for s in cat.scenes:
        p = SceneReader(s).read(0, 0, 256)
        v = p.valid
        if s.name == "fine":
            assert v[:, :200].all() and not v[:, 200:].any()
        got, want = p.mask.astype(bool)[v], (ref > 0)[v]
        assert (got & want).sum() / (got | want).sum() > 0.97, s.name


def test_rgba_alpha_marks_invalid_and_single_band_is_replicated(tmp_path):
    rgba = np.full((4, 64, 64), 120, np.uint8)
    rgba[3, :, :32] = 0  # left half transparent
    _write(tmp_path / "l" / "images" / "a.tif", rgba)
    _write(tmp_path / "l" / "images" / "g.tif", np.full((1, 64, 64), 77, np.uint8))
    for n in ("a", "g"):
        _write(tmp_path / "l" / "masks" / f"{n}.tif", np.ones((64, 64), np.uint8))
    a, g = sorted(discover(tmp_path).scenes, key=lambda s: s.name)
    pa = SceneReader(a).read(0, 0, 64)
    assert not pa.valid[:, :32].any() and pa.valid[:, 32:].all() and pa.mask[:, :32].sum() == 0
    with pytest.warns(UserWarning, match="single-band"):
        pg = SceneReader(g).read(0, 0, 64)
    assert pg.image.shape == (3, 64, 64) and (pg.image == 77).all()
    # a fourth band the file does not declare alpha (near infrared, as NAIP's) marks nothing invalid
    rgbn = tmp_path / "n" / "images" / "rgbn.tif"
    rgbn.parent.mkdir(parents=True)
    with rasterio.open(rgbn, "w", driver="GTiff", width=64, height=64, count=4, dtype="uint8", photometric="RGB",
                       crs="EPSG:32633", transform=from_origin(500000, 4000000, 0.5, 0.5)) as ds:
        ds.write(rgba)  # its fourth band dark on the left half, as water is in the near infrared
    _write(tmp_path / "n" / "masks" / "rgbn.tif", np.ones((64, 64), np.uint8))
    [n] = discover(tmp_path / "n").scenes
    with pytest.warns(UserWarning, match="fourth not marked alpha"):
        pn = SceneReader(n).read(0, 0, 64)
    assert pn.valid.all() and (pn.image == 120).all()


# --- bad input -----------------------------------------------------------------------------------

@pytest.fixture
def messy(tmp_path) -> Path:
    """One good location plus every kind of broken file, side by side."""
    root = make_synthetic(tmp_path / "root", n_locations=1, scenes_per_location=2, size=128)
    good = root / "loc0"
    img = np.full((3, 64, 64), 100, np.uint8)
    m = np.zeros((64, 64), np.uint8)
    for i in range(3):  # images with no label
        _write(good / "images" / f"nolabel{i}.tif", img)
    (good / "images" / "truncated.tif").write_bytes((good / "images" / "s0.tif").read_bytes()[:600])
    shutil.copy(good / "masks" / "s0.tif", good / "masks" / "truncated.tif")
    _write(good / "images" / "size.tif", img)
    _write(good / "masks" / "size.tif", np.zeros((32, 32), np.uint8))
    _write(good / "images" / "crs.tif", img)
    _write(good / "masks" / "crs.tif", m, crs="EPSG:32634")
    _write(good / "images" / "shift.tif", img)
    _write(good / "masks" / "shift.tif", m, transform=from_origin(500010, 4000000, 0.5, 0.5))
    _write(good / "images" / "values.tif", img)
    _write(good / "masks" / "values.tif", np.full((64, 64), 0.5, np.float32))
    (root / "empty" / "images").mkdir(parents=True)
    _write(root / "nolabels" / "images" / "x.tif", img)
    return root


def test_bad_inputs_are_named_and_the_rest_stays_usable(messy):
    cat = discover(messy)
    reports, sums = check_catalog(cat, progress=False)
    text = _problems(cat)
    assert "3 images have no label" in text
    assert "truncated.tif: unreadable or truncated" in text
    # masks georeferenced on grids of their own are placed by their georeference; too little of the image covered
    # (another image's mask) is refused
    assert "size.tif: covers 25 % of image size.tif (size 32x32 differs" in text
    assert "crs.tif: covers 0 % of image crs.tif (CRS EPSG:32634 differs" in text
    assert "shift.tif: mask on a grid of its own" in text and not any(p.fatal for p in cat.problems if "shift" in str(p))
    assert "values.tif: mask has negative or fractional values (0.5)" in text
    assert "empty/images: empty folder" in text
    assert "nolabels: location has no usable labelled image" in text
    loc0 = next(s for s in sums if s.location == "loc0")
    assert loc0.usable == 3  # the two good synthetic scenes and the shifted mask's
    prep = prepare(messy, DataConfig(patch_size=64))
    assert sorted(r.scene.name for r in prep.readers) == ["s0", "s1", "shift"]


def test_cli_check_exit_codes_and_show(messy, tmp_path):
    runner = CliRunner()
    bad = runner.invoke(app, ["data", "check", str(messy)])
    assert bad.exit_code == 1 and "fatal problem" in bad.output
    good = runner.invoke(app, ["data", "check", str(SAMPLE)])
    assert good.exit_code == 0, good.output
    for loc in ("austin", "banepa", "kampala"):
        assert loc in good.output
    out = tmp_path / "show.png"
    shown = runner.invoke(app, ["data", "show", str(SAMPLE), "--out", str(out), "--n", "6"])
    assert shown.exit_code == 0, shown.output
    with rasterio.open(out) as ds:
        assert ds.width > 300
    missing = runner.invoke(app, ["data", "check", str(tmp_path / "nope")])
    assert missing.exit_code == 1 and "no such dataset folder" in missing.output


def test_small_raster_is_padded_and_nodata_is_invalid(tmp_path):
    img = np.full((3, 40, 50), 90, np.uint8)
    img[:, :10, :] = 0
    _write(tmp_path / "l" / "images" / "small.tif", img, nodata=0)
    _write(tmp_path / "l" / "masks" / "small.tif", np.full((40, 50), 255, np.uint8))
    prep = prepare(tmp_path, DataConfig(patch_size=64, val_fraction=0.0))
    d = RandomPatchDataset(prep, 1, augment=False, min_valid=0.0)[0]
    assert d["image"].shape == (3, 64, 64)
    valid = d["valid"].numpy()
    assert valid.sum() == 30 * 50  # rows 10-40, cols 0-50 only
    assert d["mask"].numpy()[~valid].sum() == 0


# --- GSD -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "crs,res,origin,expected",
    [
        ("EPSG:26914", 0.75, (620000, 3350000), 0.75),  # UTM: metres as they are
        ("EPSG:3857", 0.29858, (0, 0), 0.29858),  # Web Mercator at the equator: exact
        # Web Mercator at 60 N: true size is half the nominal metre
        ("EPSG:3857", 0.29858, (0, 8399737.89), 0.29858 * 0.5),
        ("EPSG:4326", 1e-5, (0, 0), 1.11319),  # 1e-5 degree at the equator
        ("EPSG:4326", 1e-5, (0, 60), (1.11319 * 0.5 + 1.11319) / 2),  # x shrinks with latitude, y does not
        ("EPSG:2263", 1.0, (1000000, 200000), 0.3048006),  # US feet
    ],
)
def test_ground_sampling_distance(crs, res, origin, expected):
    from rasterio.crs import CRS

    grid = Grid(2, 2, CRS.from_string(crs), from_origin(origin[0] - res, origin[1] + res, res, res))
    assert ground_sampling_distance(grid) == pytest.approx(expected, rel=2e-3)


def test_real_gsd_and_resampling_to_a_target():
    cat = discover(SAMPLE)
    gsd = {s.location: SceneReader(s).gsd for s in cat.scenes}
    assert gsd["austin"] == pytest.approx(0.75) and gsd["banepa"] == pytest.approx(0.1323, abs=1e-3)
    assert gsd["kampala"] == pytest.approx(0.1493, abs=1e-3)
    r = SceneReader(next(s for s in cat.scenes if s.location == "banepa"), target_gsd=0.3)
    assert (r.height, r.width) == (round(512 * 0.1323 / 0.3),) * 2
    p = r.read(0, 0, r.width)
    assert p.valid.all() and 0.1 < p.mask.mean() < 0.9


# --- sampling, split, augmentation ---------------------------------------------------------------

def _overlap(a, b) -> bool:
    return a.scene == b.scene and a.col < b.col + b.size and b.col < a.col + a.size and a.row < b.row + b.size and b.row < a.row + a.size


def test_train_and_val_windows_never_overlap():
    prep = prepare(SAMPLE, DataConfig(patch_size=128, block_size=256, val_fraction=0.25))
    val = prep.windows("val")
    assert {prep.location_of(v) for v in val} == {"austin", "banepa", "kampala"}
    ds = RandomPatchDataset(prep, 10, augment=False)
    rng = np.random.default_rng(0)
    drawn = [ds.sampler.draw(rng) for _ in range(2000)]
    assert not any(_overlap(t, v) for t in drawn for v in val)
    assert not any(_overlap(t, v) for t in prep.windows("train") for v in val)


def test_validation_windows_are_capped_evenly_over_locations_and_spread_through_each():
    """On the shipped sample: every validation window below the cap; above it, each location its fair share (a small
    location keeps all of its windows and leaves the rest to the others), taken through its whole list, the same
    windows on every call, and train prints how many of how many it kept."""
    every = prepare(SAMPLE, DataConfig(patch_size=64, block_size=128, max_val_windows=None))
    full = every.windows("val")
    per = {loc: [r for r in full if every.location_of(r) == loc] for loc in every.locations}
    assert prepare(SAMPLE, DataConfig(patch_size=64, block_size=128, max_val_windows=len(full))).windows("val") == full
    small = min(per, key=lambda loc: len(per[loc]))
    cap = len(per[small]) + 2 * (len(per[small]) + 5)  # the smallest keeps all, the others share the rest
    prep = prepare(SAMPLE, DataConfig(patch_size=64, block_size=128, max_val_windows=cap))
    kept = prep.windows("val")
    assert len(kept) == cap and kept == prep.windows("val") and set(kept) <= set(full)
    by = {loc: [r for r in kept if prep.location_of(r) == loc] for loc in prep.locations}
    assert by[small] == per[small]
    for loc in set(per) - {small}:
        assert len(by[loc]) == len(per[small]) + 5 and by[loc][0] == per[loc][0] and by[loc][-1] == per[loc][-1]
    assert f"(of {len(per[loc])}: data.max_val_windows)" in "\n".join(prep.report.lines())


def test_grid_windows_are_not_padded_when_the_block_holds_a_window():
    """Austin's 1000 px scenes do not divide into 256 px windows: the last one is pulled inside."""
    prep = prepare(SAMPLE, DataConfig(patch_size=256, block_size=512))
    refs = [r for s in ("train", "val") for r in prep.windows(s) if prep.location_of(r) == "austin"]
    assert refs and all(r.col + 256 <= 1000 and r.row + 256 <= 1000 for r in refs)
    assert all(GridDataset(prep, [r])[0]["valid"].all() for r in refs[:6])


def test_balanced_sampler_draws_each_location_equally():
    prep = prepare(SAMPLE, DataConfig(patch_size=128))
    ds = RandomPatchDataset(prep, 900, augment=False)
    rng = np.random.default_rng(0)
    locs = [prep.location_of(ds.sampler.draw(rng)) for _ in range(3000)]
    counts = np.array([locs.count(x) for x in prep.locations])
    assert counts.min() > 900  # about 1000 each, although Banepa has far more tiles


def test_augment_moves_image_mask_and_valid_together():
    rng = np.random.default_rng(3)
    img = np.zeros((3, 8, 8), np.uint8)
    img[:, 0, 1] = 255
    mask = (img[0] > 0).astype(np.uint8)
    for _ in range(8):
        a, m, v = augment(rng, img, mask, mask.astype(bool))
        assert np.array_equal(a[0] > 0, m.astype(bool)) and np.array_equal(m.astype(bool), v)


def test_colour_jitter_changes_colours_only_and_keeps_the_patches_it_always_drew():
    """experts.colour_jitter: the same windows, flips and masks as without it (the geometry is drawn first), other
    colours within the stated factors, and the same colours again for the same (seed, index)."""
    prep = prepare(SAMPLE, DataConfig(patch_size=128))
    plain, jit = RandomPatchDataset(prep, 12, seed=4), RandomPatchDataset(prep, 12, seed=4, colour_jitter=0.2)
    changed = 0
    for i in range(12):
        a, b = plain[i], jit[i]
        assert torch.equal(a["mask"], b["mask"]) and torch.equal(a["valid"], b["valid"])
        x, y = a["image"].float(), b["image"].float()
        changed += int(not torch.equal(x, y))
        # brightness, contrast and saturation within 0.8-1.2 and a band's gain within 0.9-1.1: a band's mean moves
        # by at most about their product
        ratio = (y.mean((1, 2)) + 1) / (x.mean((1, 2)) + 1)
        assert ((ratio > 0.6) & (ratio < 1.5)).all()
        assert torch.equal(b["image"], jit[i]["image"])
    assert changed == 12
    # without augmentation (validation, statistics) nothing is jittered
    still = RandomPatchDataset(prep, 3, seed=4, augment=False, colour_jitter=0.2)
    bare = RandomPatchDataset(prep, 3, seed=4, augment=False)
    assert all(torch.equal(still[i]["image"], bare[i]["image"]) for i in range(3))


def test_without_turns_patches_keep_the_view_they_were_taken_in():
    """experts.turns off: the same windows as with flips and quarter turns, each as the reader gives it (a labels'
    displacement from the roofs keeps its direction), colour jitter still applied; on, some patches come turned or
    flipped, each one of the eight turns and flips of the patch as read."""
    prep = prepare(SAMPLE, DataConfig(patch_size=128))
    bare = RandomPatchDataset(prep, 12, seed=4, augment=False)
    kept = RandomPatchDataset(prep, 12, seed=4, turns=False)
    jit = RandomPatchDataset(prep, 12, seed=4, turns=False, colour_jitter=0.2)
    turned = RandomPatchDataset(prep, 12, seed=4)
    moved = 0
    for i in range(12):
        a, b, c, d = bare[i], kept[i], jit[i], turned[i]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
        assert torch.equal(a["mask"], c["mask"]) and not torch.equal(a["image"], c["image"])
        views = [torch.rot90(x, k, (-2, -1)) for k in range(4) for x in (a["image"], a["image"].flip(-1))]
        assert any(torch.equal(v, d["image"]) for v in views)
        moved += int(not torch.equal(a["image"], d["image"]))
    assert moved >= 6


def test_grid_dataset_and_normalisation_stats():
    prep = prepare(SAMPLE, DataConfig(patch_size=128))
    ds = GridDataset(prep, prep.windows("val"))
    d = ds[0]
    assert d["image"].dtype.is_floating_point is False and d["mask"].max() <= 1
    mean, std = compute_stats(prep, n=12)
    assert all(0.15 < m < 0.7 for m in mean) and all(0.03 < s < 0.4 for s in std)
    assert not math.isnan(sum(mean))


def test_resolution_from_locations_csv_and_mercator_wkt(tmp_path):
    """A raster without a CRS takes its GSD from locations.csv; Mercator given as WKT without a code is still
    scaled by cos(latitude); a bundle trained at native GSDs clamps inputs to the range it saw."""
    from rasterio.crs import CRS
    from geomoe.data.catalog import gsd_near
    from geomoe.data.reader import SceneReader
    from geomoe.raster import Grid, ground_sampling_distance

    loc = tmp_path / "village" / "images"
    loc.mkdir(parents=True)
    (tmp_path / "village" / "masks").mkdir()
    img = np.random.default_rng(0).integers(0, 255, (3, 64, 64), dtype=np.uint8)
    for p, data in ((loc / "a.png", img), (tmp_path / "village" / "masks" / "a.png", (img[:1] > 128).astype(np.uint8) * 255)):
        with rasterio.open(p, "w", driver="PNG", width=64, height=64, count=len(data), dtype="uint8") as ds:
            ds.write(data)
    (tmp_path / "locations.csv").write_text("location,lat,lon,gsd_m\nvillage,57.7,14.25,0.15\n")
    cat = discover(tmp_path)
    assert cat.scenes[0].gsd_hint == pytest.approx(0.15)
    assert SceneReader(cat.scenes[0]).gsd == pytest.approx(0.15)
    assert SceneReader(cat.scenes[0], target_gsd=0.3).width == 32  # so it is resampled like the others
    assert gsd_near(loc / "a.png") == pytest.approx(0.15)
    # training says what it used per location: the GSD, or that it is unknown once locations.csv is gone
    assert prepare(tmp_path, DataConfig(patch_size=32)).report.lines()[0].startswith(
        "village: 1 images, 1 labelled, 1 used, GSD 0.15 m;")
    (tmp_path / "locations.csv").unlink()
    report = prepare(tmp_path, DataConfig(patch_size=32)).report
    assert report.gsd == {"village": None} and "GSD unknown" in report.lines()[0]

    merc = CRS.from_epsg(3857)
    wkt = CRS.from_wkt(merc.to_wkt().replace('ID["EPSG",3857]', "").replace('AUTHORITY["EPSG","3857"]', ""))
    t = from_origin(9519000, 3204000, 0.149, 0.149)  # Banepa, zoom 19
    a = ground_sampling_distance(Grid(512, 512, merc, t))
    b = ground_sampling_distance(Grid(512, 512, wkt, t))
    assert a == pytest.approx(0.132, abs=0.002) and b == pytest.approx(a, rel=1e-6)


def test_bundle_input_gsd_clamps_to_the_trained_range():
    from types import SimpleNamespace

    from geomoe.bundle import Bundle

    b = SimpleNamespace(manifest={"gsd": None, "native_gsd": {"a": 0.15, "b": 0.5}})
    b.gsd = None
    b.gsd_range = Bundle.gsd_range.fget(b)
    assert Bundle.input_gsd(b, 0.3) == 0.3 and Bundle.input_gsd(b, 0.05) == 0.15 and Bundle.input_gsd(b, 2.0) == 0.5
    assert Bundle.input_gsd(b, None) is None


def test_outlines_beside_masks_tell_touching_buildings_apart_on_real_tiles():
    """Banepa's masks merge row houses that share a wall; its OSM outlines (labels.geojson beside the masks) keep
    them apart: more buildings than the mask's components, each a part of the mask, the mask still the pixel truth."""
    from scipy import ndimage

    cat = discover(SAMPLE)
    banepa = [s for s in cat.scenes if s.location == "banepa"]
    assert banepa and all(s.label_kind == "mask" and s.outlines.name == "labels.geojson" for s in banepa)
    assert all(s.outlines is None for s in cat.scenes if s.location == "austin")  # no outlines there: components
    comps = ids = 0
    for s in banepa:
        p = SceneReader(s).read(0, 0, 512)
        with rasterio.open(s.label) as ds:
            assert np.array_equal(p.mask.astype(bool), ds.read(1) > 0)  # the mask, not the outlines, is the truth
        assert np.array_equal(p.instances > 0, p.mask.astype(bool))
        n = int(p.instances.max())
        assert set(np.unique(p.instances)) == set(range(n + 1))  # ids 1..n, no gaps
        comps, ids = comps + ndimage.label(p.mask)[1], ids + n
    assert ids > 1.15 * comps  # tens of walls shared between houses in the sample's Banepa tiles
    _, sums = check_catalog(discover(SAMPLE), progress=False)  # `geomoe data check` says which locations have them
    assert {s.location: s.outlines for s in sums} == {"austin": False, "banepa": True, "kampala": False}


def test_unreadable_outlines_leave_the_masks_usable(tmp_path):
    loc = tmp_path / "banepa"
    (loc / "images").mkdir(parents=True)
    (loc / "masks").mkdir()
    tile = sorted((SAMPLE / "banepa" / "images").glob("*.tif"))[0]
    shutil.copy(tile, loc / "images" / tile.name)
    shutil.copy(SAMPLE / "banepa" / "masks" / tile.name, loc / "masks" / tile.name)
    (loc / "labels.geojson").write_text("{not json")
    prep = prepare(tmp_path, DataConfig(patch_size=128, val_fraction=0.0, test_fraction=0.0))
    bad = [p for p in prep.catalog.problems if p.path.name == "labels.geojson"]
    assert len(bad) == 1 and not bad[0].fatal and "mask alone" in bad[0].message
    p = prep.readers[0].read(0, 0, 512)
    assert p.mask.any() and int(p.instances.max()) == __import__("scipy").ndimage.label(p.mask)[1]


def test_vector_labels_of_points_are_refused_and_points_among_polygons_are_left_out(tmp_path):
    """Building centroids are not footprints: a file of points is named as such; points beside real Banepa
    polygons are left out, which leaves the rasterised labels as the polygons alone give them."""
    import geopandas as gpd
    import pandas as pd

    tile = sorted((SAMPLE / "banepa" / "images").glob("*.tif"))[0]
    polys = gpd.read_file(SAMPLE / "banepa" / "labels.geojson").to_crs("EPSG:3857")
    points = polys.assign(geometry=polys.centroid.translate(7, 7))  # most of them off any roof
    for name, gdf in (("dots", points), ("mixed", pd.concat([polys, points])), ("polys", polys)):
        (tmp_path / name / "images").mkdir(parents=True)
        shutil.copy(tile, tmp_path / name / "images" / tile.name)
        gpd.GeoDataFrame(gdf, crs=polys.crs).to_file(tmp_path / name / "labels.geojson", driver="GeoJSON")
    cat = discover(tmp_path)
    check_catalog(cat, progress=False)
    [bad] = [p for p in cat.problems if p.fatal and p.path.name == "labels.geojson"]
    assert bad.path.parent.name == "dots" and "hold no polygons" in bad.message and "Point" in bad.message
    read = {s.location: SceneReader(s).read(0, 0, 512) for s in cat.scenes if s.location != "dots"}
    assert read["mixed"].mask.any() and (read["mixed"].mask == read["polys"].mask).all()
