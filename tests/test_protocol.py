"""The evaluation protocol: three spatial splits kept a patch apart, and the best-expert oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geomoe.config import DataConfig
from geomoe.data.datasets import RandomPatchDataset, prepare
from geomoe.data.sampling import Block, world_box
from geomoe.pipelines.evaluate import RoutedBatch

from conftest import SAMPLE, SHARED


def _gaps(prep, a_refs, b_refs) -> float:
    """Smallest distance (to 0.01 px: world coordinates in metres round), in resampled pixels, between a window of ``a_refs`` and one of ``b_refs`` in one space."""
    def boxes(refs):
        out = {}
        for r in refs:
            rd = prep.readers[r.scene]
            px = max(abs(rd.grid.transform.a), abs(rd.grid.transform.e)) * rd.grid.width / rd.width if rd.grid.crs else 1.0
            key = rd.grid.crs.to_string() if rd.grid.crs else str(rd.scene.image)
            out.setdefault(key, []).append(np.array(world_box(rd, r.col, r.row, r.size, r.size)) / px)
        return {k: np.array(v) for k, v in out.items()}
    A, B = boxes(a_refs), boxes(b_refs)
    best = np.inf
    for k in A.keys() & B.keys():
        a, b = A[k][:, None], B[k][None]
        dx = np.maximum(0, np.maximum(a[..., 0] - b[..., 2], b[..., 0] - a[..., 2]))
        dy = np.maximum(0, np.maximum(a[..., 1] - b[..., 3], b[..., 1] - a[..., 3]))
        best = min(best, float(np.hypot(dx, dy).min()))
    return best


@pytest.mark.parametrize("root", [SAMPLE, SHARED])
def test_windows_of_different_splits_stay_a_patch_apart(root):
    if not root.exists():
        pytest.skip(f"{root} is not here (../shared is beside the checkout only on the development machines)")
    prep = prepare(root, DataConfig(patch_size=128, block_size=256, full_check=False))
    win = {s: prep.windows(s) for s in ("train", "val", "test")}
    for s in win:  # every location has every split
        assert {prep.location_of(r) for r in win[s]} == set(prep.locations), s
    rng = np.random.default_rng(0)
    drawn = [RandomPatchDataset(prep, 10, augment=False).sampler.draw(rng) for _ in range(400)]
    for a, b in (("train", "test"), ("train", "val"), ("val", "test")):
        assert _gaps(prep, win[a], win[b]) >= 128 - 0.01, (a, b)
    assert _gaps(prep, drawn, win["test"]) >= 128 - 0.01
    assert _gaps(prep, drawn, win["val"]) >= 128 - 0.01


def test_a_location_of_touching_patch_sized_tiles_still_gets_test_and_validation_windows_a_patch_apart(tmp_path):
    """12 of Kampala's 256 px zoom-20 tiles (a 2 x 2 and a 2 x 4 block) with 256 px patches: split as every other
    location, each tile at a border gives up half a patch on each side and the location keeps no test window. It
    is split again (validation at the east end, training tiles giving up the gap) and gets every split, a patch
    apart; a location of larger tiles beside it keeps the regular split."""
    import shutil

    from geomoe.data.sampling import _assign_runs, _pull_apart

    tiles = sorted((SAMPLE / "kampala" / "images").glob("*.tif"))[:12]
    for loc, names in (("town", [t.name for t in tiles]),
                       ("banepa", [t.name for t in sorted((SAMPLE / "banepa" / "images").glob("*.tif"))[:8]])):
        for sub in ("images", "masks"):
            (tmp_path / loc / sub).mkdir(parents=True)
            for n in names:
                shutil.copy(SAMPLE / ("kampala" if loc == "town" else loc) / sub / n, tmp_path / loc / sub / n)
    cfg = DataConfig(patch_size=256, block_size=512, full_check=False)
    prep = prepare(tmp_path, cfg)
    regular = _pull_apart(prep.readers, _assign_runs(prep.readers, [Block(i, 0, 0, r.width, r.height, "train")
                                                                    for i, r in enumerate(prep.readers)
                                                                    if r.scene.location == "town"], 0.2, 0.2, 0), 256)
    assert not [b for b in regular if b.split == "test"]  # what the regular split leaves this location

    win = {s: prep.windows(s) for s in ("train", "val", "test")}
    for s in win:
        assert {prep.location_of(r) for r in win[s]} == {"town", "banepa"}, s
    for a, b in (("train", "test"), ("train", "val"), ("val", "test")):
        assert _gaps(prep, win[a], win[b]) >= 256 - 0.01, (a, b)
    banepa_alone = prepare(tmp_path / "banepa", cfg)  # the same tiles as a dataset of their own: the same blocks
    def blocks(p, loc):
        return sorted((p.readers[b.scene].scene.name, b.col, b.row, b.width, b.height, b.split) for b in p.blocks
                      if p.readers[b.scene].scene.location == loc)
    assert blocks(banepa_alone, "banepa") == blocks(prep, "banepa")
    w = prep.report.windows["town"]
    assert min(w.values()) > 0 and f"windows train {w['train']} / val {w['val']} / test {w['test']}" in "\n".join(prep.report.lines())


@pytest.mark.parametrize("root", [SAMPLE, SHARED])
def test_an_experts_shifted_windows_stay_in_their_split_and_near_their_window(root):
    """A region's windows are drawn shifted (random crops, as the single network gets) but never nearer than a
    patch to another split's windows, and each keeps at least half its window in each direction."""
    if not root.exists():
        pytest.skip(f"{root} is not here (../shared is beside the checkout only on the development machines)")
    prep = prepare(root, DataConfig(patch_size=128, block_size=256, full_check=False))
    refs = prep.windows("train")
    ds = RandomPatchDataset(prep, 10, augment=False, refs=refs)
    rng = np.random.default_rng(0)
    drawn = [ds.sampler.draw(rng) for _ in range(600)]
    assert _gaps(prep, drawn, prep.windows("test")) >= 128 - 0.01
    assert _gaps(prep, drawn, prep.windows("val")) >= 128 - 0.01
    moved = [d for d in drawn if (d.scene, d.col, d.row) not in {(r.scene, r.col, r.row) for r in refs}]
    assert len(moved) > len(drawn) / 2
    for d in moved:  # within half a window of one of the region's own windows
        assert any(r.scene == d.scene and abs(r.col - d.col) <= 64 and abs(r.row - d.row) <= 64 for r in refs)
        rd = prep.readers[d.scene]
        assert 0 <= d.col <= rd.width - 128 and 0 <= d.row <= rd.height - 128


def test_an_expert_replays_its_share_of_patches_from_every_location():
    """``experts.replay``: that share of a region's patches comes from every location's train blocks (so it
    keeps what the generalist knew), the rest from the region's own windows."""
    prep = prepare(SAMPLE, DataConfig(patch_size=64, block_size=256, full_check=False))
    own = [r for r in prep.windows("train") if prep.location_of(r) == "banepa"]
    banepa = prep.locations.index("banepa")
    other = {}
    for replay in (0.0, 0.5):
        ds = RandomPatchDataset(prep, 300, augment=False, refs=own, replay=replay)
        other[replay] = sum(ds[i]["location"] != banepa for i in range(300)) / 300
    assert other[0.0] == 0
    # half replayed, and a replayed patch is Banepa's a third of the time (three locations, each equally often)
    assert other[0.5] == pytest.approx(0.5 * 2 / 3, abs=0.08)


def test_location_allocation_gives_each_location_its_share_of_the_single_networks_draws():
    """``experts.allocation: locations``: a town whose few windows fall in a village's region is drawn as often
    by that expert as by the single network (a fifth of 5 locations), and the regions' shares add up to one."""
    from types import SimpleNamespace

    from geomoe.data.sampling import PatchRef, WindowSampler
    from geomoe.pipelines.train import expert_steps, location_weights

    names = ["village", "town", "city"]
    prep = SimpleNamespace(location_of=lambda r: names[r.scene])
    village = [PatchRef(0, 256 * i, 0, 256) for i in range(400)]
    town = [PatchRef(1, 256 * i, 0, 256) for i in range(12)]
    city = [PatchRef(2, 256 * i, 0, 256) for i in range(300)]
    refs = [village + town, city]
    w = location_weights(prep, refs)
    shares = [sum(x) for x in w]
    assert shares == pytest.approx([2 / 3, 1 / 3])
    assert expert_steps(shares, 900, 50) == [600, 300]
    readers = [SimpleNamespace(scene=SimpleNamespace(location=n)) for n in names]
    s = WindowSampler(readers, refs[0], weights=w[0])
    rng = np.random.default_rng(0)
    town_share = sum(s.draw(rng).scene == 1 for _ in range(3000)) / 3000
    assert town_share == pytest.approx(0.5, abs=0.03)  # by windows it would be 12 / 412


def test_without_the_gap_splits_touch():
    """The check above can fail: with no gap, neighbouring blocks of different splits share an edge."""
    prep = prepare(SAMPLE, DataConfig(patch_size=128, block_size=256, split_gap=0, full_check=False))
    w = {s: prep.windows(s) for s in ("train", "val", "test")}
    assert min(_gaps(prep, w[a], w[b]) for a, b in (("train", "val"), ("val", "test"), ("train", "test"))) < 1


def test_best_expert_oracle_is_at_least_as_good_as_every_expert_on_every_tile():
    rng = np.random.default_rng(0)
    probs = torch.from_numpy(rng.random((4, 6, 16, 16)).astype(np.float32))
    truth = rng.random((6, 16, 16)) > 0.6
    valid = rng.random((6, 16, 16)) > 0.1
    rb = RoutedBatch(probs, None, np.zeros(6, np.int64), np.zeros(6), np.zeros((6, 1), np.int64), np.ones((6, 1)))
    best = rb.best_expert(truth, valid, 0.5)
    errors = (((probs.numpy() >= 0.5) != truth[None]) & valid[None]).sum((2, 3))  # (experts, tiles)
    chosen = rb.method_probs("best_expert", np.zeros(6, np.int64), None, best).numpy() >= 0.5
    chosen_err = ((chosen != truth) & valid).sum((1, 2))
    assert (chosen_err <= errors.min(0)).all() and (chosen_err == errors.min(0)).all()
    assert len(set(best.tolist())) > 1  # it really chooses per tile


def test_a_region_is_served_by_the_single_network_only_where_its_validation_windows_show_it_clearly_better():
    from geomoe.pipelines.serving import serving_of, single_better_share

    rng = np.random.default_rng(0)

    def windows(expert_tp, single_tp, n=12):
        """n windows of 100 true pixels: each network finds tp of them and adds 10 false ones."""
        out = np.zeros((n, 2, 3), np.int64)
        out[:, 0] = np.stack([expert_tp, np.full(n, 10), 100 - expert_tp], 1)
        out[:, 1] = np.stack([single_tp, np.full(n, 10), 100 - single_tp], 1)
        return out

    base = rng.integers(40, 80, 12)
    clearly_expert = windows(base + 10, base)
    clearly_single = windows(base, base + 10)
    noise = np.tile([1, -1], 6)
    a_hair = windows(base, base + noise)  # the single network ahead or behind by a pixel, window by window
    assert single_better_share(clearly_single) == 1.0 and single_better_share(clearly_expert) == 0.0
    assert 0.05 < single_better_share(a_hair) < 0.95
    regions = [clearly_expert, clearly_single, np.zeros((0, 2, 3), np.int64), a_hair]
    # the expert stays unless the single network is ahead in 95 % of resamples; no windows: the expert stays
    shares = [single_better_share(c) for c in regions]
    assert serving_of(shares, 0.95) == [0, 4, 2, 3]
    assert serving_of(shares, confidence=1.0) == [0, 4, 2, 3]


def test_routers_run_the_network_serving_their_region_and_the_best_expert_oracle_stays_their_upper_bound():
    rng = np.random.default_rng(2)
    probs = torch.from_numpy(rng.random((3, 8, 16, 16)).astype(np.float32))
    single = torch.from_numpy(rng.random((8, 16, 16)).astype(np.float32))
    truth, valid = rng.random((8, 16, 16)) > 0.6, rng.random((8, 16, 16)) > 0.1
    regions = np.array([0, 1, 2, 1, 0, 2, 1, 1])
    rb = RoutedBatch(probs, single, regions, np.zeros(8), regions[:, None], np.ones((8, 1)), smoothed=regions,
                     serving=np.array([0, 3, 2]))  # region 1 served by the single network
    rand, oracle = rng.integers(0, 3, 8), np.ones(8, np.int64)
    for method in ("embedding", "smoothed", "soft", "fallback"):
        got = rb.method_probs(method, rand, oracle)
        for j, r in enumerate(regions):
            assert torch.equal(got[j], single[j] if r == 1 else probs[r, j]), (method, j)
        assert rb.method_ids(method, rand, oracle).tolist() == [3 if r == 1 else r for r in regions]
    assert torch.equal(rb.method_probs("location_oracle", rand, oracle), single)  # every tile to region 1
    best = rb.best_expert(truth, valid, 0.5)
    assert 3 in best  # the single network is among the oracle's choices: a router can pick it

    def wrong(p):
        return (((p.numpy() >= 0.5) != truth) & valid).sum((1, 2))

    best_err = wrong(rb.method_probs("best_expert", rand, oracle, best))
    for method in ("single", "embedding", "smoothed", "random", "location_oracle", "soft", "fallback"):
        assert (best_err <= wrong(rb.method_probs(method, rand, oracle))).all(), method


def test_fallback_gives_unfamiliar_tiles_the_single_network_and_the_others_their_smoothed_expert():
    rng = np.random.default_rng(1)
    probs = torch.from_numpy(rng.random((3, 5, 8, 8)).astype(np.float32))
    aux = torch.from_numpy(rng.random((3, 5, 2, 8, 8)).astype(np.float32))
    single = torch.from_numpy(rng.random((5, 8, 8)).astype(np.float32))
    single_aux = torch.from_numpy(rng.random((5, 2, 8, 8)).astype(np.float32))
    rb = RoutedBatch(probs, single, np.array([0, 1, 2, 0, 1]), np.zeros(5), np.zeros((5, 1), np.int64),
                     np.ones((5, 1)), aux=aux, baseline_aux=single_aux)
    rb.smoothed = np.array([2, 1, 2, 0, 0])
    rb.unfamiliar = np.array([False, True, False, False, True])
    none = np.zeros(5, np.int64)
    got = rb.method_probs("fallback", none, None)
    for t, (e, u) in enumerate(zip(rb.smoothed, rb.unfamiliar)):
        assert torch.equal(got[t], single[t] if u else probs[e, t])
    got_aux = rb._select(rb.aux, rb.baseline_aux, None, "fallback", none, None, None)
    assert torch.equal(got_aux[1], single_aux[1]) and torch.equal(got_aux[0], aux[2, 0])
    assert torch.equal(rb.probs, probs)  # the experts' answers are not overwritten
    rb.unfamiliar = np.zeros(5, bool)  # nothing flagged: the smoothed routing itself
    assert torch.equal(rb.method_probs("fallback", none, None), rb.method_probs("smoothed", none, None))
    no_single = RoutedBatch(probs, None, rb.embedding, rb.distance, rb.soft_ids, rb.soft_w, smoothed=rb.smoothed)
    assert no_single.method_probs("fallback", none, None) is None


def test_expert_budget_is_proportional_with_a_floor_and_adds_up_for_the_single_network():
    from geomoe.pipelines.train import expert_steps

    assert expert_steps([600, 300, 100], 900, 50) == [540, 270, 90]
    assert expert_steps([980, 10, 10], 900, 50) == [882, 50, 50]  # small regions still get the floor
    assert sum(expert_steps([5, 5], 10, 1)) == 10
    assert expert_steps([980, 10, 10], 900, 50, unit=30) == [870, 60, 60]  # whole epochs of 30 steps


def test_generalist_turns_apply_to_the_generalist_alone(synth_root, bundle_dir):
    """experts.generalist_turns (on by default): the generalist's patches turn, the experts and the single network
    fine-tuned from it keep experts.turns; None, every job follows experts.turns."""
    from geomoe.bundle import BundlePaths
    from geomoe.config import load_config
    from geomoe.data.datasets import prepare
    from geomoe.embedding.extract import Embeddings
    from geomoe.pipelines.train import expert_jobs

    cfg = load_config("tiny")
    paths = BundlePaths(bundle_dir)
    prep, emb = prepare(synth_root, cfg.data, cfg.seed), Embeddings.load(paths.embeddings)
    centroids = np.load(paths.centroids)
    assert cfg.experts.generalist_turns is True and cfg.experts.turns is False  # the defaults
    jobs = expert_jobs(prep, emb, centroids, cfg, paths)
    cfg.experts.generalist_turns = None
    unset = expert_jobs(prep, emb, centroids, cfg, paths)
    assert all(j.turns is None for j in unset.values())
    assert jobs["generalist"].turns is True
    assert all(j.turns is None for n, j in jobs.items() if n != "generalist")
    assert [j.steps for j in jobs.values()] == [j.steps for j in unset.values()]  # the budget does not move


def test_smoothed_routing_removes_isolated_flips_and_keeps_boundaries():
    from geomoe.router.smoothing import smooth_routes

    # a 6 x 4 grid of tiles: left half expert 0, right half expert 1, one stray tile routed to 2
    boxes, ids = [], []
    for y in range(4):
        for x in range(6):
            boxes.append((x, y, x + 1, y + 1))
            ids.append(0 if x < 3 else 1)
    ids[7] = 2
    out = smooth_routes(np.array(ids), np.array(boxes, float), np.array(["s"] * 24), 3)
    assert out[7] == 0 and 2 not in out
    assert (out.reshape(4, 6)[:, :3] == 0).all() and (out.reshape(4, 6)[:, 3:] == 1).all()
    # another space does not vote: the same stray alone in its own space keeps its expert
    spaces = np.array(["s"] * 24)
    spaces[7] = "other"
    assert smooth_routes(np.array(ids), np.array(boxes, float), spaces, 3)[7] == 2


def test_grid_smoothing_and_scene_routing():
    from geomoe.router.smoothing import scene_majority, smooth_grid

    g = np.zeros((5, 6), np.int64)
    g[:, 4:] = 2  # a real boundary between two kinds of place
    g[2, 1] = 1  # an isolated flip inside the first
    g[0, 0] = -1  # a tile that did not run (nodata) stays without an expert
    s = smooth_grid(g)
    assert s[2, 1] == 0 and s[0, 0] == -1
    assert (s[:, 4:] == 2).all() and (s[1:, :3] == 0).all()
    assert set(np.unique(scene_majority(g))) == {-1, 0}


def test_predict_with_smoothed_and_scene_routing(tmp_path):
    """predict --routing smoothed removes a lone tile's flip on a real scene; scene gives one expert."""
    import geopandas as gpd

    from geomoe.config import PredictConfig
    from geomoe.data.synthetic import write_geotiff
    from geomoe.pipelines.predict import predict_raster
    from rasterio.transform import from_origin

    img = np.full((3, 200, 200), 60, np.uint8)
    img[:, 96:144, 96:144] = 200  # one bright tile in a dark scene: the router flips it alone

    class Bright:
        tile_size, gsd = 64, None

        def route(self, tiles):
            ids = (tiles.float().mean((1, 2, 3)) > 120).long().numpy()
            return ids[:, None], np.ones((len(ids), 1), np.float32), np.zeros(len(ids), np.float32)

        def predict(self, expert, tiles):
            return torch.full((len(tiles), 64, 64), 0.1 + 0.5 * expert)

    src = tmp_path / "s.tif"
    write_geotiff(src, img, "EPSG:32633", from_origin(500000, 4000000, 0.5, 0.5), None)
    experts = {}
    for how in ("tile", "smoothed", "scene"):
        cfg = PredictConfig(tile_size=64, overlap=16, batch_size=4, min_area_m2=0.0, regularize=False, routing=how)
        outs, st = predict_raster(Bright(), src, tmp_path / how, cfg, 0.5, progress=False)
        experts[how] = gpd.read_file(outs.routing).expert.value_counts().to_dict()
    assert experts["tile"].get(1, 0) >= 1
    assert set(experts["smoothed"]) == {0} and set(experts["scene"]) == {0}


def test_a_region_draws_each_window_equally_often_not_each_location():
    """A region with 400 of one location's windows and 3 strays of another trains on its own data, not the strays."""
    from types import SimpleNamespace

    from geomoe.data.sampling import PatchRef, WindowSampler

    readers = [SimpleNamespace(scene=SimpleNamespace(location="village")),
               SimpleNamespace(scene=SimpleNamespace(location="town"))]
    refs = [PatchRef(0, 256 * i, 0, 256) for i in range(400)] + [PatchRef(1, 256 * i, 0, 256) for i in range(3)]
    s = WindowSampler(readers, refs)
    rng = np.random.default_rng(0)
    draws = [s.draw(rng) for _ in range(4000)]
    strays = sum(r.scene == 1 for r in draws) / len(draws)
    assert strays == pytest.approx(3 / 403, abs=0.006)
    assert len({(r.scene, r.col) for r in draws}) > 390  # nearly every window of the region is seen
    assert all(s.draw(rng, "town").scene == 1 for _ in range(20))  # a location asked for is still honoured
