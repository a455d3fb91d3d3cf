"""Instance separation: targets from a mask, watershed on three channels, one polygon per building."""

from __future__ import annotations

import numpy as np
import pandas as pd
from rasterio.transform import Affine

from geomoe.experts.targets import building_targets
from geomoe.pipelines.footprints import FootprintCollector, FrameSpec, pieces_to_frame
from geomoe.pipelines.instances import Separation, instance_labels, separate, separated_mask


def _two_houses_one_pixel_apart() -> np.ndarray:
    m = np.zeros((40, 60), np.uint8)
    m[10:30, 8:28] = 1
    m[10:30, 29:50] = 1  # a one-pixel gap: two buildings in the label
    return m


def test_targets_mark_boundaries_and_the_gap_between_buildings():
    t = building_targets(_two_houses_one_pixel_apart(), boundary_width=2, contact_reach=3)
    assert t.shape == (3, 40, 60) and t.dtype == np.float32
    assert t[2, 20, 28] == 1 and t[2, 20, 26] == 1 and t[2, 20, 30] == 1  # the gap and both facing edges
    assert t[2, 20, 15] == 0 and t[2, 5, 28] == 0  # far from the other building, or outside both
    assert t[1, 20, 8] == 1 and t[1, 20, 15] == 0  # boundary band, not the roof's middle
    single = np.zeros((40, 60), np.uint8)
    single[10:30, 8:50] = 1
    assert building_targets(single)[2].sum() == 0  # one building has no contact zone


def test_target_widths_on_the_ground_mark_a_dense_towns_gaps():
    """Two houses 1.2 m apart at 0.1 m: 12 pixels. Three pixels of reach leave the gap without a contact target;
    1 m of reach on the ground marks it. At a coarse resolution the pixel floors hold (the targets as before)."""
    from geomoe.experts.targets import TargetWidths

    w = TargetWidths(boundary_m=0.5, contact_m=1.0)
    assert w.pixels(0.1) == (5, 10) and w.pixels(0.54) == (2, 3) and w.pixels(None) == (2, 3)
    assert TargetWidths().pixels(0.1) == (2, 3)
    m = np.zeros((40, 80), np.uint8)
    m[10:30, 8:30] = 1
    m[10:30, 42:70] = 1  # 12 px apart
    narrow = building_targets(m, *TargetWidths().pixels(0.1))
    wide = building_targets(m, *w.pixels(0.1))
    assert narrow[2].sum() == 0 and wide[2, 20, 36] == 1 and wide[2, 20, 32] == 1  # within 1 m of both houses
    assert wide[2, 20, 31] == 0 and wide[2, 20, 15] == 0  # 11 px from the far house; a roof far from the other
    assert wide[1, 20, 12] == 1 and narrow[1, 20, 12] == 0  # a boundary band 5 px wide, not 2


def test_missing_the_rare_contact_zone_costs_as_much_as_missing_a_building():
    """The contact zone is a few percent of the image: a model that never fires there must still pay a loss of the
    order of the Jaccard term, not the BCE of a few pixels, or the watershed gets no cut between roofs."""
    import torch

    from geomoe.experts.losses import instance_loss

    big = np.zeros((1, 128, 128), np.uint8)
    big[0, 30:70, 20:60] = 1
    big[0, 30:70, 61:100] = 1  # two houses one pixel apart in a 128 px tile: contact is about 1 % of it
    t = torch.from_numpy(np.stack([building_targets(m) for m in big]))
    assert 0 < t[:, 2].mean() < 0.02
    valid = torch.ones(1, 128, 128, dtype=torch.bool)
    right = (t * 2 - 1) * 12  # confident and right on every channel
    blind = right.clone()
    blind[:, 2] = -12  # right on building and boundary, never fires on contact
    good, bad = (float(instance_loss(x, t, valid, alpha=0.5)) for x in (right, blind))
    assert good < 0.01
    assert bad - good > 0.5 * 0.5 * 0.9  # aux weight x (1 - alpha) x most of the Jaccard term


def _prob_of_touching_houses() -> np.ndarray:
    """What a good 3-channel model says where two roofs touch with no visible gap."""
    m = np.zeros((40, 60), np.float32)
    m[10:30, 8:50] = 0.95  # one blob in the building channel
    t = building_targets(_two_houses_one_pixel_apart())
    return np.stack([m, t[1] * 0.9, t[2] * 0.9])


def _polygons(mask: np.ndarray, band: int) -> int:
    found = []
    col = FootprintCollector(mask.shape[1], found.extend, batch=10)
    for r in range(0, mask.shape[0], band):
        col.add_band(r, mask[r:r + band], mask[r:r + band].astype(np.float32))
    col.finish()
    gdf = pieces_to_frame(found, FrameSpec(Affine.identity(), None, None, 0.0, None))
    return len(gdf)


def test_two_touching_buildings_give_two_polygons():
    prob = _prob_of_touching_houses()
    plain = prob[0] >= 0.5
    assert _polygons(plain, 40) == 1  # the single-channel mask merges them
    labels = instance_labels(prob)
    assert len(np.unique(labels[labels > 0])) == 2
    assert _polygons(separated_mask(labels), 40) == 2


def test_one_building_across_a_band_border_stays_one_polygon():
    prob = _prob_of_touching_houses()
    sep = separated_mask(instance_labels(prob))
    for band in (7, 13, 20):  # band borders cross both buildings
        assert _polygons(sep, band) == 2


def test_a_seed_distance_splits_roofs_joined_by_a_neck_the_boundary_channel_missed():
    building = np.zeros((40, 70), np.float32)
    building[10:30, 5:30] = 0.9
    building[10:30, 40:65] = 0.9
    building[18:21, 30:40] = 0.9  # a 3-pixel neck, no boundary or contact seen anywhere
    prob = np.stack([building, np.zeros_like(building), np.zeros_like(building)])
    assert len(np.unique(instance_labels(prob))) - 1 == 1
    labels = instance_labels(prob, 0.5, Separation(seed_distance=4))
    assert len(np.unique(labels)) - 1 == 2
    assert labels[20, 10] != labels[20, 60] and (labels > 0).sum() == (building >= 0.5).sum()
    assert _polygons(separated_mask(labels), 40) == 2


def _wide_band_of_a_town(seed: int = 0) -> np.ndarray:
    """Three noisy channels over a band 60 rows by 900 columns: rows of touching houses, a block with no gap for
    300 columns, houses joined by necks, and empty streets."""
    rng = np.random.default_rng(seed)
    m = np.zeros((60, 900), np.uint8)
    x = 5
    while x < 880:
        w, h, y = rng.integers(8, 30), rng.integers(8, 25), rng.integers(2, 30)
        m[y:y + h, x:x + w] = 1
        x += w + int(rng.choice([0, 1, 3, 9]))  # touching, one pixel apart, or across a street
    m[35:55, 300:600] = 1  # a block with no empty column for 300 px
    m[40:50, 300:600:37] = 0
    t = building_targets(m)
    noise = rng.normal(0, 0.15, t.shape).astype(np.float32)
    return np.clip(t * np.array([0.9, 0.7, 0.6], np.float32)[:, None, None] + 0.05 + noise, 0, 1)


def _one_watershed_over_the_band(prob: np.ndarray, threshold: float, sep: Separation | None) -> np.ndarray:
    """The plain marker-based watershed over the whole band: what :func:`instance_labels` must partition alike."""
    from scipy import ndimage
    from skimage.segmentation import watershed

    sep = sep or Separation()
    mask = (prob[0] >= threshold) & (prob[2] < 0.5)
    seeds = mask & (prob[1] < sep.seed_threshold) & (prob[2] < sep.seed_threshold * 0.5)
    if sep.seed_distance > 0:
        seeds = ndimage.distance_transform_edt(seeds) >= sep.seed_distance
    markers, n = ndimage.label(seeds)
    small = np.bincount(markers.ravel(), minlength=n + 1) < 4
    small[0] = False
    markers[small[markers]] = 0
    labels = watershed(-prob[0], markers, mask=mask)
    rest, _ = ndimage.label(mask & (labels == 0))
    return np.where(labels > 0, labels, rest + labels.max() * (rest > 0))


def test_watershed_on_the_components_with_two_seeds_equals_one_over_the_band():
    """The watershed runs only on the boxes of mask components holding two seeds or more: the same instances as
    one watershed over the band (each pair of pixels in one instance in both, or in neither)."""
    for seed in (0, 1, 2):
        prob = _wide_band_of_a_town(seed)
        for sep in (None, Separation(0.5, 4), Separation(0.3, 8)):
            ours, ref = instance_labels(prob, 0.5, sep), _one_watershed_over_the_band(prob, 0.5, sep)
            assert np.array_equal(ours > 0, ref > 0)
            pairs = np.unique(np.stack([ours[ours > 0], ref[ref > 0]]), axis=1)  # one-to-one: same partition
            assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1] > 20, (seed, sep)


def test_separation_in_column_chunks_equals_the_whole_band():
    for seed in (0, 1):
        prob = _wide_band_of_a_town(seed)
        for sep in (None, Separation(0.5, 4), Separation(0.3, 8)):
            whole = separated_mask(instance_labels(prob, 0.5, sep))
            assert whole.sum() > 5000 and len(np.unique(instance_labels(prob, 0.5, sep))) > 20
            for chunk in (16, 64, 250):
                assert np.array_equal(separate(prob, 0.5, sep, chunk=chunk), whole), (seed, sep, chunk)


def test_each_expert_cuts_the_pixels_it_ran_on_as_it_was_calibrated():
    """Per-pixel thresholds and seeds (each pixel as the expert that ran there chose) give, on each expert's part of
    a band, exactly what that expert's own single values give there; one expert over the whole band needs no
    per-pixel values at all."""
    from geomoe.pipelines.calibration import Calibration, Calibrations
    from geomoe.pipelines.instances import footprint_mask

    prob = _wide_band_of_a_town(1)
    prob[:, :, 449:452] = 0.0  # empty columns between the two experts' parts: nothing joins across them
    ran = np.zeros(prob.shape[1:], np.int64)
    ran[:, 450:] = 1
    a, b = Calibration(0.5, Separation(0.5, 0.0), 4.0), Calibration(0.65, Separation(0.3, 4.0), 16.0)
    rules = Calibrations(a, {0: a, 1: b})
    th, sep = rules.at(ran)
    assert th.shape == ran.shape and sep.seed_distance.shape == ran.shape
    both = footprint_mask(prob, th, sep)
    left, right = footprint_mask(prob, a.threshold, a.separation), footprint_mask(prob, b.threshold, b.separation)
    assert np.array_equal(both[:, :450], left[:, :450]) and np.array_equal(both[:, 450:], right[:, 450:])
    assert not np.array_equal(left[:, 450:], right[:, 450:])  # the two experts' choices do differ there
    assert rules.at(np.ones_like(ran)) == (b.threshold, b.separation)  # one expert: its single values
    assert list(rules.min_area(np.array([1, 0, 7]))) == [16.0, 4.0, 4.0]  # any other network: the default
    assert rules.least_min_area == 4.0 and Calibrations(b, {1: b, 2: a}).least_min_area == 4.0
    assert not rules.uniform and Calibrations(a, {0: a}).uniform


class _TwoExpertChannelModel:
    """Reads building, boundary and contact from the image (R, G, B); tiles with faint roofs (R under 200) go to
    expert 1, the rest to expert 0; ``calibrations`` as a bundle's model has them."""

    tile_size = 64
    gsd = None
    channels = 3

    def __init__(self, calibrations):
        self.calibrations = calibrations

    def route(self, tiles):
        r = tiles[:, 0].reshape(len(tiles), -1)
        faint = ((r > 100) & (r < 200)).any(1).long().numpy()
        return faint[:, None], np.ones((len(tiles), 1), np.float32), np.zeros(len(tiles), np.float32)

    def predict(self, expert, tiles):
        return tiles.float() / 255.0


def test_streaming_prediction_cuts_each_experts_tiles_with_its_own_calibration(tmp_path):
    """Houses on the left, seen clearly, go to expert 0; houses on the right, seen faintly (0.6), to expert 1.
    With expert 1's own threshold (0.7) or smallest footprint (500 m2) its houses are not footprints; with one
    calibration for both they are; expert 0's houses stay whatever expert 1 chose, and each footprint records the
    expert that made it."""
    import geopandas as gpd
    from rasterio.transform import from_origin

    from geomoe.config import PredictConfig
    from geomoe.data.synthetic import write_geotiff
    from geomoe.pipelines.calibration import Calibration, Calibrations
    from geomoe.pipelines.predict import predict_raster

    label = np.zeros((128, 320), np.uint8)
    label[20:50, 10:40] = label[70:100, 10:40] = 1  # two houses on the left
    label[20:50, 250:280] = label[70:100, 250:280] = 1  # two on the right, 200 columns away
    t = building_targets(label)
    roof = np.where(np.arange(320) < 160, 0.95, 0.6)[None, :] * label
    img = (np.stack([roof, t[1] * 0.9, t[2] * 0.9]) * 255).astype(np.uint8)
    src = tmp_path / "houses.tif"
    write_geotiff(src, img, "EPSG:32633", from_origin(500000, 4000000, 0.5, 0.5), None)
    cfg = PredictConfig(tile_size=64, overlap=16, batch_size=4, min_area_m2=1.0, regularize=False)
    a = Calibration(0.5, Separation(), 1.0)
    cases = {"one": Calibrations(a), "threshold": Calibrations(a, {0: a, 1: Calibration(0.7, Separation(), 1.0)}),
             "area": Calibrations(a, {0: a, 1: Calibration(0.5, Separation(), 500.0)})}
    got = {}
    for name, rules in cases.items():
        outs, _ = predict_raster(_TwoExpertChannelModel(rules), src, tmp_path / name, cfg, 0.5, progress=False)
        gdf = gpd.read_file(outs.footprints)
        got[name] = sorted(gdf.expert.tolist())
    assert got["one"] == [0, 0, 1, 1]
    assert got["threshold"] == got["area"] == [0, 0]


def test_instance_experts_train_and_evaluate_end_to_end(synth_root, tmp_path):
    from geomoe.bundle import load_bundle
    from geomoe.config import load_config
    from geomoe.pipelines.evaluate import evaluate
    from geomoe.pipelines.train import train_all

    cfg = load_config("tiny")
    # target widths on the ground: each patch's targets from its own scene's resolution
    cfg = cfg.model_copy(update={"experts": cfg.experts.model_copy(update={"outputs": "instances", "boundary_m": 0.5,
                                                                             "contact_m": 1.0})})
    b = load_bundle(train_all(synth_root, cfg, tmp_path / "b", progress=False, figures=False))
    assert b.experts[0].classes == 3 and b.baseline.classes == 3 and b.generalist.classes == 3
    # threshold, separation and smallest footprint were chosen on the validation windows: the best tried there,
    # for the experts (what prediction uses) and, on its own outputs, for the single network
    from geomoe.pipelines.calibrate import candidates

    tried = candidates(cfg.experts.threshold, cfg.predict.min_area_m2)
    for which in ("experts", "single"):
        c = b.calibration(which)
        f1 = b.manifest["calibration"][which]["validation_f1"]
        assert c in tried and len(f1) == len(tried) and f1[c.key()] == max(f1.values())
    e = b.calibration("experts")
    assert (b.threshold, b.separation, b.config.predict.min_area_m2) == (e.threshold, e.separation, e.min_area_m2)
    # each expert its own, chosen on the validation windows routed to it: never worse there than the shared choice;
    # on too few buildings to choose among the candidates, the shared one
    from geomoe.pipelines.calibrate import MIN_BUILDINGS

    each, rules = b.manifest["calibration"]["each_expert"], b.calibrations()
    assert len(each) == b.k
    for i, d in enumerate(each):
        assert rules.of(i) in tried and d["validation_f1"] >= d["shared_validation_f1"]
        if d["validation_buildings"] < MIN_BUILDINGS:
            assert rules.of(i) == e
    assert rules.of(b.k) == b.calibration("single") and b.calibrations("single").default == b.calibration("single")
    # the candidates scored in worker processes beside the model count exactly what scoring in line counts
    from geomoe.data.datasets import prepare
    from geomoe.pipelines.calibrate import validation_counts

    prep = prepare(synth_root, b.config.data, b.config.seed)
    refs = prep.windows("val")
    inline = validation_counts(b, prep, refs, tried, batch_size=2, progress=False, workers=0)
    pooled = validation_counts(b, prep, refs, tried, batch_size=2, progress=False, workers=2)
    assert inline.shape == (b.k, len(tried), 3) and inline[..., [0, 2]].sum() > 0
    assert np.array_equal(inline, pooled)
    ev = evaluate(b, synth_root, progress=False, workers=0)
    # scored in worker processes beside the model: the very same table (every score is a count)
    pooled_ev = evaluate(b, synth_root, progress=False, workers=2)
    pd.testing.assert_frame_equal(ev.table, pooled_ev.table)
    overall = ev.table[ev.table.location == "overall"].set_index("method")
    assert overall.loc[["embedding", "single", "soft"], "iou"].notna().all()


class _ChannelModel:
    """A model that reads its three output channels from the image (building, boundary, contact = R, G, B)."""

    tile_size = 64
    gsd = None

    def __init__(self, channels: int):
        self.channels = channels

    def route(self, tiles):
        n = len(tiles)
        return np.zeros((n, 1), np.int64), np.ones((n, 1), np.float32), np.zeros(n, np.float32)

    def predict(self, expert, tiles):
        return tiles[:, :self.channels].float() / 255.0


def test_streaming_prediction_separates_touching_buildings_and_joins_across_bands(tmp_path):
    """Through predict_raster (tiles of 64, bands flushed every 48 rows): two touching roofs are two polygons, a
    building crossing a band border is one, and the single-channel model merges the pair."""
    import geopandas as gpd

    from geomoe.config import PredictConfig
    from geomoe.data.synthetic import write_geotiff
    from geomoe.pipelines.predict import predict_raster
    from rasterio.transform import from_origin

    label = np.zeros((160, 170), np.uint8)
    label[100:130, 20:50] = 1
    label[100:130, 51:80] = 1  # two houses, one pixel apart in the label ...
    label[30:70, 100:140] = 1  # ... and one house across the band border at row 48 (and 96 for the others)
    t = building_targets(label)
    building = label.copy()
    building[100:130, 50] = 1  # ... but touching in what the building channel sees
    img = (np.stack([building * 0.95, t[1] * 0.9, t[2] * 0.9]) * 255).astype(np.uint8)
    src = tmp_path / "houses.tif"
    write_geotiff(src, img, "EPSG:32633", from_origin(500000, 4000000, 0.5, 0.5), None)
    cfg = PredictConfig(tile_size=64, overlap=16, batch_size=4, min_area_m2=0.0, regularize=False)
    counts = {}
    for channels in (3, 1):
        outs, st = predict_raster(_ChannelModel(channels), src, tmp_path / f"out{channels}", cfg, 0.5, progress=False)
        counts[channels] = len(gpd.read_file(outs.footprints))
        assert st.footprints == counts[channels]
    assert counts == {3: 3, 1: 2}


def _row_houses() -> tuple[np.ndarray, np.ndarray]:
    """Three houses in a row, sharing walls: one blob in the 0/255 mask, three ids in the outlines."""
    ids = np.zeros((40, 60), np.int32)
    ids[10:30, 8:28] = 7
    ids[10:30, 28:46] = 9
    ids[10:30, 46:58] = 11
    return (ids > 0).astype(np.uint8), ids


def test_outline_ids_give_a_shared_wall_its_boundary_and_contact_targets():
    mask, ids = _row_houses()
    blob, apart = building_targets(mask), building_targets(mask, instances=ids)
    assert blob[2].sum() == 0 and blob[1, 20, 27] == 0  # from the mask alone the wall is the middle of one roof
    assert apart[2, 20, 27] == 1 and apart[2, 20, 28] == 1 and apart[2, 20, 15] == 0
    assert apart[1, 20, 26:30].all() and apart[1, 20, 15] == 0  # the wall is both houses' boundary
    assert np.array_equal(apart[0], blob[0]) and (apart[1] >= blob[1]).all()


def test_building_f1_counts_row_houses_as_the_outlines_do():
    from geomoe.metrics import match_buildings, truth_instances

    mask, ids = _row_houses()
    split = ids > 0
    split[:, [28, 46]] = False  # a prediction with one-pixel cuts between the houses
    assert match_buildings(mask, mask, instances=ids) == (0, 1, 3)  # one blob matches no house
    assert match_buildings(split, mask, instances=ids) == (3, 0, 0)
    assert match_buildings(mask, mask) == (1, 0, 0)  # by the mask's components the blob was "right"
    extra = mask.copy()
    extra[35:38, 2:5] = 1  # a building in the mask that no outline covers stays a building of its own
    lab, n = truth_instances(extra, ids)
    assert n == 4 and set(np.unique(lab)) == {0, 1, 2, 3, 4}


def test_footprints_scored_as_delivered_are_the_mask_until_squared():
    """Footprints rasterised back onto their window (how evaluate scores what a user gets): the mask's own outlines
    give back the mask pixel for pixel, two roofs the watershed cut apart stay two buildings, a speck under the
    smallest footprint goes; squared at 0.15 m with the guard, each building stays within it of its mask."""
    from scipy import ndimage
    from skimage.draw import polygon as fill

    from geomoe.config import PredictConfig
    from geomoe.pipelines.footprints import as_delivered
    from geomoe.pipelines.regularise import Regularisation

    labels = np.zeros((120, 160), np.int32)
    labels[10:50, 8:40] = 1
    labels[10:50, 40:75] = 2  # touching roofs: separated_mask cuts a pixel between them
    rr, cc = fill([60, 75, 110, 95], [90, 140, 120, 70], labels.shape)  # a house turned about 25 degrees
    labels[rr, cc] = 3
    labels[100:102, 10:12] = 4  # a speck
    mask = separated_mask(labels)
    assert ndimage.label(mask)[1] == 4
    same = as_delivered(mask, 0.15, 0.0, None)
    assert np.array_equal(same, mask)
    kept = as_delivered(mask, 0.15, 1.0, None)  # 4 pixels of 0.0225 m2 are under 1 m2
    assert ndimage.label(kept)[1] == 3 and not kept[100:102, 10:12].any() and np.array_equal(kept[:90], mask[:90])
    squared = as_delivered(mask, 0.15, 1.0, Regularisation.of(PredictConfig()))
    lab, n = ndimage.label(squared)
    assert n == 3 and not np.array_equal(squared, kept)
    for k in (1, 2, 3):
        mine = lab == lab[tuple(np.argwhere(labels == k).mean(0).astype(int))]
        truth = labels == k
        assert (mine & truth).sum() / (mine | truth).sum() >= 0.85  # the guard's 0.9 on outlines, less pixel cuts
    assert as_delivered(mask, None, 1.0, Regularisation.of(PredictConfig())) is mask  # no ground size: as masked
