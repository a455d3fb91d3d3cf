"""Experts, router, bundle, evaluation, fine-tuning: the whole chain on tiny synthetic data."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import rasterio
import torch
from typer.testing import CliRunner

from geomoe.bundle import load_bundle
from geomoe.cli import app
from geomoe.config import load_config
from geomoe.data.synthetic import make_synthetic
from geomoe.experts.losses import segmentation_loss, soft_jaccard
from geomoe.experts.model import Expert
from geomoe.metrics import Scores, match_buildings
from geomoe.tasks import poly_lambda
from geomoe.pipelines.evaluate import evaluate
from geomoe.pipelines.train import train_all
from geomoe.router.routing import OracleRouter, RandomRouter, Router


@pytest.mark.parametrize("encoder", ["resnet18", "resnet50"])
def test_unet_output_matches_any_input_size(encoder):
    m = Expert(encoder).eval()
    with torch.no_grad():
        y = m(torch.randint(0, 255, (2, 3, 70, 90), dtype=torch.uint8))
    assert y.shape == (2, 1, 70, 90)


def test_decoder_widths_travel_with_the_model_file_and_a_mismatched_start_is_refused(tmp_path):
    from geomoe.config import Config, ExpertConfig
    from geomoe.experts.model import load_expert, save_expert
    from geomoe.experts.train import new_expert

    slim = Expert("resnet18", classes=3, decoder_channels=[64, 32, 16, 16, 8])
    wide = Expert("resnet18", classes=3)
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in wide.parameters()) - 2_000_000
    x = torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8)
    back, meta = load_expert(save_expert(slim.eval(), tmp_path / "slim.pt"))
    assert meta["decoder_channels"] == [64, 32, 16, 16, 8]
    with torch.no_grad():
        assert torch.allclose(back(x), slim(x), atol=1e-4)  # channels_last on load: same weights, other summation order
    cfg = Config(experts=ExpertConfig(encoder="resnet18", outputs="instances"))  # smp's default widths
    with pytest.raises(ValueError, match="decoder widths"):
        new_expert(None, cfg, tmp_path / "slim.pt")
    with pytest.raises(ValueError, match="decoder_channels"):
        ExpertConfig(decoder="FPN", decoder_channels=[64, 32, 16, 16, 8])


def test_loss_ignores_invalid_pixels_and_rewards_overlap():
    t = torch.zeros(1, 8, 8)
    t[:, :4] = 1
    v = torch.ones(1, 8, 8, dtype=torch.bool)
    good = (t * 20 - 10)[:, None]
    assert segmentation_loss(good, t, v, 0.5) < 0.01
    assert segmentation_loss(-good, t, v, 0.5) > 1.0
    v2 = v.clone()
    v2[:, :4] = False  # the wrong half is nodata: no penalty from it
    wrong_top = good.clone()
    wrong_top[:, :, :4] = -10
    assert segmentation_loss(wrong_top, t, v2, 0.5) < 0.01
    assert soft_jaccard(torch.sigmoid(good[:, 0]), t, v).item() == pytest.approx(1.0, abs=1e-3)


def test_an_image_without_buildings_is_scored_by_bce_alone():
    empty = torch.zeros(2, 64, 64)
    v = torch.ones(2, 64, 64, dtype=torch.bool)
    logits = torch.full((2, 1, 64, 64), -4.0, requires_grad=True)  # p = 0.018: a confident, correct background
    loss = segmentation_loss(logits, empty, v, 0.5)
    bce = torch.nn.functional.softplus(torch.tensor(-4.0)).item()  # BCE of logit -4 against 0
    assert loss.item() == pytest.approx(0.5 * bce, rel=1e-4)  # no Jaccard term near its maximum of 0.5
    loss.backward()
    assert logits.grad.abs().max() < 1e-5  # and no push to lower every pixel further
    t = empty.clone()
    t[1, :8, :8] = 1  # an image with a building keeps its Jaccard term
    assert segmentation_loss(logits, t, v, 0.5).item() > 0.5 * (1 - 1 / 65) / 2


def test_building_matches_for_several_smallest_sizes_equal_dropping_then_matching():
    """Calibration scores every smallest footprint from one labelling: the same counts as dropping small
    components and matching again, including a small piece that would otherwise take a building's match."""
    from scipy import ndimage

    from geomoe.metrics import drop_small, match_by_size

    truth = np.zeros((30, 30), bool)
    truth[2:8, 2:8] = truth[15:17, 15:18] = True  # a house and a 6-pixel shed
    pred = np.zeros_like(truth)
    pred[2:8, 2:7] = True  # the house, IoU 30/36
    pred[15:17, 15:17] = True  # the shed, IoU 4/6
    pred[25:27, 25:27] = pred[20, 5] = True  # two specks
    sizes = (0, 2, 5, 40)
    got = match_by_size(pred, ndimage.label(truth), sizes)
    assert [tuple(r) for r in got] == [(2, 2, 0), (2, 1, 0), (1, 0, 1), (0, 0, 2)]
    rng = np.random.default_rng(0)
    for _ in range(30):
        t = ndimage.gaussian_filter(rng.random((64, 64)), 2.5) > 0.52
        p = (ndimage.shift(t, rng.integers(-2, 3, 2), order=0) | (rng.random((64, 64)) > 0.97)) & ~(rng.random((64, 64)) > 0.95)
        got = match_by_size(p, ndimage.label(t), sizes)
        assert [tuple(r) for r in got] == [match_buildings(drop_small(p, s), t) for s in sizes]


def test_a_piece_on_the_window_edge_is_not_dropped_as_small():
    """A window cuts buildings as a scene's edge does: a small piece on its border may be part of a house of any size,
    so the metrics hold it against a quarter of the smallest footprint, as prediction does (the shed inside, as
    large, is dropped; so is a speck on the edge)."""
    from scipy import ndimage

    from geomoe.metrics import drop_small, match_by_size

    truth = np.zeros((30, 30), bool)
    truth[10:14, 0:2] = truth[15:17, 15:18] = True  # the end of a house the window cuts (8 px), and a shed (6 px)
    pred = truth.copy()
    pred[29, 29] = True  # a speck in the corner
    assert np.array_equal(drop_small(pred, 7), truth & (np.arange(30) < 2)[None, :])
    got = match_by_size(pred, ndimage.label(truth), (0, 7, 33))
    assert [tuple(r) for r in got] == [(2, 1, 0), (1, 0, 1), (0, 0, 2)]
    # nodata inside the window cuts as its border does: the shed against it is held as the house's end is
    void = np.zeros((30, 30), bool)
    void[15:17, 18:22] = True
    assert np.array_equal(drop_small(pred, 7, void), truth)
    assert np.array_equal(drop_small(pred, 7, np.zeros_like(void)), drop_small(pred, 7))
    got = match_by_size(pred, ndimage.label(truth), (0, 7, 33), void=void)
    assert [tuple(r) for r in got] == [(2, 1, 0), (2, 0, 0), (0, 0, 2)]
    scores = Scores()
    scores.update(pred, truth, ~void, min_pixels=7)
    assert (scores.b_tp, scores.b_fp, scores.b_fn) == (2, 0, 0)


def test_metrics_cumulative_iou_building_f1_and_boundary():
    truth = np.zeros((20, 20), bool)
    truth[2:6, 2:6] = truth[10:16, 10:16] = True
    pred = np.zeros_like(truth)
    pred[2:6, 2:5] = True  # 12/16 = 0.75 IoU: a match
    pred[16:18, 2:4] = True  # false positive building (away from the edge, where it would be spared as cut)
    assert match_buildings(pred, truth) == (1, 1, 1)
    s = Scores()
    s.update(pred, truth)
    s.update(truth, truth)
    r = s.summary()
    tp, fp, fn = 12 + 52, 4, 4 + 36
    assert r["iou"] == pytest.approx(tp / (tp + fp + fn))
    assert r["building_f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    perfect = Scores()
    perfect.update(truth, truth)
    assert perfect.summary()["boundary_iou"] == 1.0 and perfect.summary()["accuracy"] == 1.0
    # footprints under prediction's smallest area are dropped for the building figures, not for the pixel figures
    small = Scores()
    small.update(pred, truth, min_pixels=5)
    assert small.summary()["building_f1"] == pytest.approx(2 * 1 / (2 * 1 + 0 + 1))
    assert small.summary()["iou"] == pytest.approx(12 / (12 + 4 + 4 + 36))


def test_footprint_errors_tell_merged_split_missed_partial_outline_and_false():
    from scipy import ndimage

    from geomoe.metrics import ERRORS, footprint_errors

    ids = np.zeros((40, 60), np.int32)
    ids[2:10, 2:10], ids[2:10, 10:18] = 1, 2  # two row houses, wall to wall
    ids[20:28, 2:10] = 3  # cut in two by the prediction
    ids[20:28, 20:28] = 4  # no footprint on it
    ids[30:38, 30:38] = 5  # a footprint shifted by 5 px: 3/8 of it covered
    ids[2:8, 30:36] = 6  # inside a footprint 3 x its size
    ids[20:28, 40:48] = 7  # predicted as it is
    truth = ids > 0
    pred = np.zeros_like(truth)
    pred[2:10, 2:20] = True  # one blob over houses 1 and 2 (and a little beside)
    pred[20:28, 2:5] = pred[20:28, 7:10] = True  # house 3 in two pieces
    pred[30:38, 35:43] = True
    pred[1:11, 28:38] = True  # 100 px around house 6's 36
    pred[20:28, 40:48] = True
    pred[35:39, 50:54] = True  # on no building
    got = dict(zip(ERRORS, footprint_errors(pred, (ids, 7)).tolist()))
    assert got == {"matched": 1, "missed": 1, "merged": 2, "split": 1, "partial": 1, "outline": 1, "false": 1}
    s = Scores()
    s.update(pred, truth, truth_ids=ids)
    s.update(pred, truth, truth_ids=ids)
    counts = s.error_counts()
    assert counts["buildings"] == 14 and counts["merged"] == 4 and counts["false"] == 2
    assert counts["matched"] == s.b_tp  # matched is building F1's true positives
    # the same blob over two buildings the truth cannot tell apart (no outlines) is one building, matched
    assert dict(zip(ERRORS, footprint_errors(pred, ndimage.label(truth))))["merged"] == 0


def test_poly_schedule_warms_up_then_decays():
    f = poly_lambda(100, 0.9, warmup_steps=10)
    assert f(0) == pytest.approx(0.1 * 1.0) and f(4) == pytest.approx(0.5 * (1 - 4 / 100) ** 0.9)
    assert f(9) == pytest.approx((1 - 9 / 100) ** 0.9) and f(50) == pytest.approx(0.5 ** 0.9)
    assert poly_lambda(100, 0.9)(0) == 1.0 and f(100) == 0.0


@pytest.mark.parametrize("name, kind", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
def test_optimizer_and_warmup_come_from_the_config(name, kind):
    from geomoe.config import ExpertConfig
    from geomoe.experts.task import SegmentationTask

    task = SegmentationTask(Expert("resnet18"), ExpertConfig(encoder="resnet18", optimizer=name), 100)
    task.warmup_steps = 10
    conf = task.configure_optimizers()
    assert type(conf["optimizer"]) is kind
    assert conf["optimizer"].param_groups[0]["lr"] == pytest.approx(1e-4 * 0.1)  # the ramp's first step


def test_router_nearest_centroid_by_cosine_and_soft_weights(tmp_path):
    c = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32)
    r = Router(c * np.array([[5.0], [1.0], [2.0]], np.float32))  # scale must not matter: cosine
    ids, d = r.route(np.array([[0.1, 0.9, 0.0], [3.0, 0.0, 0.1]], np.float32))
    assert ids.tolist() == [1, 0] and d[0] == pytest.approx(1 - 0.9 / np.hypot(0.1, 0.9), abs=1e-5)
    sids, w = r.soft(np.array([[0.6, 0.8, 0.0]], np.float32), 2, 0.05)
    assert sids[0].tolist() == [1, 0] and w.sum() == pytest.approx(1.0) and w[0, 0] > w[0, 1]
    back = Router.load(r.save(tmp_path / "r.faiss"))
    assert back.route(c)[0].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="dimension 2"):
        r.route(np.ones((1, 2), np.float32))
    assert set(RandomRouter(3, 0).route(300).tolist()) == {0, 1, 2}
    assert OracleRouter({"a": 2}).route(["a"]).tolist() == [2]
    with pytest.raises(ValueError, match="no region known"):
        OracleRouter({"a": 2}).route(["b"])


def test_bundle_is_complete_and_resumes(bundle_dir, synth_root):
    m = json.loads((bundle_dir / "manifest.json").read_text())
    assert m["k"] == 3 and len(m["experts"]) == 3 and m["baseline"] == "experts/baseline.pt"
    assert set(m["region_of_location"]) == {"loc0", "loc1", "loc2"} and "torch" in m["versions"]
    b = load_bundle(bundle_dir)
    assert b.k == 3 and b.baseline is not None and b.centroids.shape == (3, 32)
    # baseline gets as many optimisation steps as all experts together
    def steps(name):  # steps trained, from the job's log (last.ckpt follows the best epoch in Lightning 2.6)
        import pandas as pd

        log = pd.read_csv(next((bundle_dir / "experts" / "runs" / name / "logs").glob("version_*/metrics.csv")))
        return int(log.step.max()) + 1

    # fair budget: the single network trains on from the generalist for as many steps as all experts together
    assert steps("baseline") == sum(steps(f"region_{i}") for i in range(3))
    assert m["generalist"] == "experts/generalist.pt" and steps("generalist") == 3 * 2 * 2
    assert load_bundle(bundle_dir).manifest["experts"][0] == "experts/region_0.pt"
    # each region's network chosen on its validation windows: the single network (id 3) where it was ahead in at
    # least 95 % of resamples of them
    assert len(m["serving"]) == len(m["serving_validation"]) == 3
    for r, (s, v) in enumerate(zip(m["serving"], m["serving_validation"])):
        assert s == (3 if v["single_better_share"] >= 0.95 else r)
        assert v["single_better_share"] < 0.5 or v["single_iou"] > v["expert_iou"]
    import pandas as pd

    log = pd.read_csv(next((bundle_dir / "experts" / "runs" / "region_0" / "logs").glob("version_*/metrics.csv")))
    # the start's score (it is fine-tuned from the generalist), then one per epoch
    start = json.loads((bundle_dir / "experts" / "runs" / "region_0" / "start_score.json").read_text())["score"]
    assert log.val_iou.notna().sum() == 1 + 2 and "train_loss_epoch" in log
    assert abs(log.val_iou.dropna().iloc[0] - start) < 1e-6
    assert (bundle_dir / "experts" / "runs" / "region_0" / "checkpoints" / "best.ckpt").exists()
    assert (bundle_dir / "figures" / "embedding_space.png").exists()
    # rerunning finds every stage done and changes nothing
    before = (bundle_dir / "experts" / "region_0.pt").stat().st_mtime
    centroids = (bundle_dir / "regions" / "centroids.npy").stat().st_mtime
    train_all(synth_root, load_config("tiny"), bundle_dir, progress=False, figures=False)
    assert (bundle_dir / "experts" / "region_0.pt").stat().st_mtime == before
    # the regions are not refitted either: finished experts stay paired with the centroids they were trained for
    assert (bundle_dir / "regions" / "centroids.npy").stat().st_mtime == centroids


def test_incomplete_or_inconsistent_bundle_is_named(bundle_dir, tmp_path):
    import json

    from geomoe.bundle import save_manifest

    broken = tmp_path / "broken"
    shutil.copytree(bundle_dir, broken)
    (broken / "experts" / "region_1.pt").unlink()
    (broken / "regions" / "familiarity.json").unlink()
    with pytest.raises(ValueError, match=r"missing: experts/region_1.pt, regions/familiarity.json"):
        load_bundle(broken)
    shutil.copy(bundle_dir / "regions" / "familiarity.json", broken / "regions" / "familiarity.json")
    shutil.copy(bundle_dir / "experts" / "region_1.pt", broken / "experts" / "region_1.pt")
    np.save(broken / "regions" / "centroids.npy", np.ones((2, 32), np.float32))
    with pytest.raises(ValueError, match=r"regions/centroids.npy changed since the bundle was written"):
        load_bundle(broken)  # the manifest's checksum catches a replaced or corrupted file
    m = json.loads((broken / "manifest.json").read_text())
    save_manifest(broken, m)  # as if written that way: the shapes disagree
    with pytest.raises(ValueError, match="inconsistent bundle: centroids are"):
        load_bundle(broken)
    np.save(broken / "regions" / "centroids.npy", np.load(bundle_dir / "regions" / "centroids.npy"))
    save_manifest(broken, {**m, "serving": [0, 2, 2]})  # region 1 served by another region's expert
    with pytest.raises(ValueError, match=r"serving \[0, 2, 2\]: each region is served by its own expert or the single"):
        load_bundle(broken)
    save_manifest(broken, {**m, "serving": [0, 3, 2], "baseline": None})  # the single network serves a region: needed
    with pytest.raises(ValueError, match="served by the single network, which the bundle does not have"):
        load_bundle(broken)
    del m["k"]
    (broken / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"not a valid bundle manifest \(k: Field required\)"):
        load_bundle(broken)
    (broken / "manifest.json").unlink()
    with pytest.raises(ValueError, match="manifest.json is missing"):
        load_bundle(broken)


def test_evaluation_table_has_every_method(bundle_dir, synth_root, tmp_path):
    ev = evaluate(load_bundle(bundle_dir), synth_root, progress=False)
    assert set(ev.table.method) == {"single", "generalist", "random", "embedding", "smoothed", "location_oracle",
                                    "best_expert", "soft", "fallback", "single_footprints", "embedding_footprints",
                                    "smoothed_footprints"}  # the last three: polygons as a user gets them
    assert set(ev.table.location) == {"loc0", "loc1", "loc2", "overall"}
    for col in ("iou", "accuracy", "precision", "recall", "f1", "building_f1", "boundary_iou"):
        assert col in ev.table
    acc = ev.table.accuracy.dropna()
    assert ((acc >= 0) & (acc <= 1)).all() and len(acc) == len(ev.table)
    experts = ev.routing.drop(columns="unfamiliar")  # tiles per region, named for the network serving it
    serving = load_bundle(bundle_dir).serving
    assert [c.startswith("expert ") for c in experts] == [s == r for r, s in enumerate(serving)]
    assert experts.values.sum() == ev.table[(ev.table.method == "embedding") & (ev.table.location == "overall")].patches.item()
    assert ((ev.routing.unfamiliar >= 0) & (ev.routing.unfamiliar <= 1)).all()
    # fallback is the smoothed routing with the single network on the tiles flagged unfamiliar. Which tiles cross a
    # region's distance threshold moves with the processor's arithmetic, so the two ends are set here: nothing
    # flagged gives the smoothed scores, everything flagged the single network's, at every location
    bundle = load_bundle(bundle_dir)
    bundle.familiarity = None
    none = evaluate(bundle, synth_root, progress=False)
    assert (none.routing.unfamiliar == 0).all()
    assert np.allclose(none.pivot("iou")["fallback"], none.pivot("iou")["smoothed"])
    bundle = load_bundle(bundle_dir)
    bundle.familiarity.thresholds = np.full_like(bundle.familiarity.thresholds, -1.0)
    every = evaluate(bundle, synth_root, progress=False)
    assert (every.routing.unfamiliar == 1).all()
    assert np.allclose(every.pivot("iou")["fallback"], every.pivot("iou")["single"])
    assert not np.allclose(every.pivot("iou")["fallback"], every.pivot("iou")["smoothed"])
    # every true building is counted once, in one kind; the same buildings for every method
    kinds = ["matched", "missed", "merged", "split", "partial", "outline"]
    assert (ev.table[kinds].sum(1) == ev.table.buildings).all()
    per_loc = ev.table[ev.table.location != "overall"].groupby("method").buildings.sum()
    assert (per_loc == ev.table[ev.table.location == "overall"].set_index("method").buildings[per_loc.index]).all()
    assert (ev.table.groupby("location").buildings.nunique() == 1).all() and (ev.table.buildings > 0).all()
    # matched are building F1's true positives: F1 = 2 TP / (buildings + TP + FP) <= 2 TP / (buildings + TP)
    bound = 2 * ev.table.matched / (ev.table.buildings + ev.table.matched)
    assert (ev.table.building_f1 <= bound + 1e-9).all() and (ev.table.matched <= ev.table.buildings).all()
    paths = ev.write(tmp_path / "ev")
    assert "IoU (building class" in paths[0].read_text() and paths[1].read_text().startswith("method,location,iou")
    assert "What became of the true buildings" in paths[0].read_text()


def test_cli_evaluate_show_lr_find_and_finetune(bundle_dir, synth_root, tmp_path):
    r = CliRunner()
    res = r.invoke(app, ["evaluate", str(synth_root), "-b", str(bundle_dir), "-o", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "ev" / "evaluation.json").exists()
    res = r.invoke(app, ["evaluate", str(synth_root), "-b", str(bundle_dir), "-o", str(tmp_path / "ev_tta"), "--tta"])
    assert res.exit_code == 0, res.output
    # tiny trains without turns: flip averaging is scored, and the user told it works against such networks
    assert not load_config("tiny").experts.turns and "trained without flips" in res.output
    plain, flips = (pd.read_csv(tmp_path / d / "evaluation.csv") for d in ("ev", "ev_tta"))
    assert plain.shape == flips.shape and not np.allclose(plain.iou, flips.iou)  # the models' answers changed
    res = r.invoke(app, ["show-results", str(synth_root), "-b", str(bundle_dir), "-o", str(tmp_path / "show.png"), "--n", "3"])
    assert res.exit_code == 0, res.output
    res = r.invoke(app, ["lr-find", str(synth_root), "-o", str(tmp_path / "lr.png"), "-c", "tiny", "--steps", "8"])
    assert res.exit_code == 0 and "suggested learning rate" in res.output, res.output
    assert (tmp_path / "lr.png").exists()
    # a new geography: fine-tune as a new region started from the nearest expert
    new = make_synthetic(tmp_path / "new", n_locations=4, scenes_per_location=2, size=128, seed=5)
    shutil.rmtree(new / "loc0"), shutil.rmtree(new / "loc1"), shutil.rmtree(new / "loc2")
    res = r.invoke(app, ["finetune", str(new), "-b", str(bundle_dir), "-o", str(tmp_path / "ft"), "--new-region", "--epochs", "1"])
    assert res.exit_code == 0, res.output
    ft = load_bundle(tmp_path / "ft")
    assert ft.k == 4 and ft.region_of_location["loc3"] == 3 and ft.router.k == 4
    # the new region is served by its new expert; a region the single network served keeps it, under its new id
    old = load_bundle(bundle_dir).serving
    assert ft.serving.tolist() == [r if s == r else 4 for r, s in enumerate(old)] + [3]
    assert len(ft.familiarity.thresholds) == 4 and np.isfinite(ft.familiarity.thresholds).all()
    # fine-tuning again into the same bundle trains a new expert: the earlier one is not taken as already done
    res = r.invoke(app, ["finetune", str(new), "-b", str(tmp_path / "ft"), "-o", str(tmp_path / "ft"), "--region", "3",
                         "--epochs", "1"])
    assert res.exit_code == 0, res.output
    assert load_bundle(tmp_path / "ft").manifest["experts"][3] == "experts/region_3_ft2.pt"
    res = r.invoke(app, ["evaluate", str(synth_root), "-b", str(tmp_path / "nope")])
    assert res.exit_code == 1 and "no such bundle" in res.output


def test_evaluation_on_png_without_crs(bundle_dir, tmp_path):
    src = make_synthetic(tmp_path / "tif", n_locations=3, scenes_per_location=2, size=128, seed=9)
    for tif in src.rglob("*.tif"):
        with rasterio.open(tif) as ds:
            data = ds.read()
        png = tmp_path / "png" / tif.relative_to(src).with_suffix(".png")
        png.parent.mkdir(parents=True, exist_ok=True)
        with rasterio.open(png, "w", driver="PNG", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                           dtype="uint8") as out:
            out.write(data)
    ev = evaluate(load_bundle(bundle_dir), tmp_path / "png", split="all", progress=False)
    assert ev.table.patches.sum() > 0 and set(ev.table.location) == {"loc0", "loc1", "loc2", "overall"}


def test_bf16_inference_stays_within_rounding_of_fp32_on_a_real_tile(bundle_dir):
    """Where the processor computes bf16 natively (and on CUDA) experts run in bf16 autocast and channels_last: on
    a real aerial tile (the shipped Austin sample) a trained expert's probabilities must be those of fp32 to within
    bf16's rounding, and the building masks nearly the same pixels."""
    from pathlib import Path

    from rasterio.windows import Window

    from geomoe.backbone import batch_to, cpu_bf16, uses_bf16

    cpu = torch.device("cpu")
    assert uses_bf16(torch.device("cuda")) and uses_bf16(cpu) == cpu_bf16()
    model = load_bundle(bundle_dir).experts[0]
    with rasterio.open(Path(__file__).parents[1] / "sample" / "scenes" / "austin3_sw.tif") as ds:
        x = torch.from_numpy(ds.read(window=Window(100, 100, 256, 256)))[None]
    with torch.no_grad():
        p32 = torch.sigmoid(model(batch_to(x, cpu)).float())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            p16 = torch.sigmoid(model(batch_to(x, cpu)).float())
    diff = (p32 - p16).abs()
    assert p32.std() > 0.01  # a real answer that varies over the tile, not a constant
    assert diff.max() < 0.1 and diff.mean() < 0.01, (diff.max(), diff.mean())
    assert ((p32[:, 0] >= 0.5) != (p16[:, 0] >= 0.5)).float().mean() < 0.01


def test_flip_averaging_gives_a_flipped_tile_the_flipped_answer(bundle_dir):
    """``--tta`` averages the tile and its three flips: on a real aerial tile a trained expert alone answers a
    mirrored tile differently, the average answers it with exactly the mirrored probabilities."""
    from pathlib import Path

    from rasterio.windows import Window

    from geomoe.experts.model import predict_channels

    cpu = torch.device("cpu")
    model = load_bundle(bundle_dir).experts[0]
    with rasterio.open(Path(__file__).parents[1] / "sample" / "scenes" / "austin3_sw.tif") as ds:
        x = torch.from_numpy(ds.read(window=Window(100, 100, 128, 96)))[None]
    for dims in ((-1,), (-2,), (-2, -1)):
        plain = (predict_channels(model, x.flip(dims), cpu) - predict_channels(model, x, cpu).flip(dims)).abs().max()
        tta = predict_channels(model, x, cpu, tta=True)
        averaged = (predict_channels(model, x.flip(dims), cpu, tta=True) - tta.flip(dims)).abs().max()
        assert plain > 1e-3 and averaged < 1e-5, (dims, plain, averaged)
    assert tta.shape == (1, model.classes, 96, 128) and 0 <= tta.min() and tta.max() <= 1


def test_single_channel_bundle_chooses_threshold_and_smallest_footprint_on_validation(bundle_dir):
    """Bundles without instance channels are calibrated too (threshold and smallest footprint; no watershed), and
    prediction then uses the choice."""
    from geomoe.bundle import BundlePaths
    from geomoe.pipelines.calibrate import candidates
    from geomoe.pipelines.instances import Separation

    b = load_bundle(bundle_dir)
    cfg = load_config(BundlePaths(bundle_dir).config)
    tried = candidates(cfg.experts.threshold, cfg.predict.min_area_m2, instances=False)
    thresholds = {c.threshold for c in tried}
    assert len(thresholds) == 3 and len(tried) == len(thresholds) * len({c.min_area_m2 for c in tried})
    for which in ("experts", "single"):
        f1 = b.manifest["calibration"][which]["validation_f1"]
        c = b.calibration(which)
        assert set(f1) == {t.key() for t in tried} and f1[c.key()] == max(f1.values())
        assert c.separation == Separation()
    c = b.calibration()
    assert (b.threshold, b.config.predict.min_area_m2) == (c.threshold, c.min_area_m2)
