"""``geomoe evaluate``: the paper's table, per location and overall, for every way of choosing an expert."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from geomoe.atomic import atomic_path
from geomoe.bundle import Bundle
from geomoe.data.datasets import GridDataset, Prepared, prepare
from geomoe.embedding.model import embed_batches
from geomoe.experts.model import predict_channels
from geomoe.metrics import ERRORS, ERRORS_LEGEND, Scores
from geomoe.data.sampling import space_of, world_box
from geomoe.pipelines.calibration import Calibration, Calibrations
from geomoe.pipelines.pool import beside, scoring_workers
from geomoe.pipelines.regularise import Regularisation
from geomoe.pipelines.window_scores import MethodOutputs, ScoringBatch, score_batch
from geomoe.router.routing import OracleRouter, RandomRouter
from geomoe.router.smoothing import smooth_routes

# single: one network on everything (as many steps as generalist + experts); generalist: what the experts were
# fine-tuned from; random: a random expert; embedding: the router (nearest centroid);
# smoothed: the router's choice, then the majority over each tile and its neighbours (router/smoothing.py);
# location_oracle: each location's majority region; best_expert: per tile, the expert with the fewest wrong pixels
# (the upper bound of any router that picks one expert on pixel accuracy; not on IoU, which does not add up tile by
# tile: on sparse tiles fewest wrong pixels picks the expert that predicts least); soft: top-k experts by distance;
# fallback: smoothed, but the tiles the router flags unfamiliar get the single network (predict --unfamiliar baseline).
# Every method that picks a region runs the network serving it (pipelines/serving.py: the region's expert, or the
# single network where that did better on the region's validation windows), and best_expert then chooses among the
# single network too, so it stays the upper bound of every router.
METHODS = ("single", "generalist", "random", "embedding", "smoothed", "location_oracle", "best_expert", "soft",
           "fallback")
# Scored again as the footprints a user gets (polygons, specks dropped, pinholes filled, squared) rasterised back:
# rows "<method>_footprints". The other rows score masks, which squaring can move (bench/footprints.py).
DELIVERED = ("single", "embedding", "smoothed")


def as_footprints(method: str) -> str:
    """The row that scores ``method``'s footprint polygons."""
    return f"{method}_footprints"


FOOTPRINTS = tuple(as_footprints(m) for m in DELIVERED)
METRICS = ("iou", "accuracy", "precision", "recall", "f1", "building_f1", "boundary_iou")


@dataclass
class RoutedBatch:
    """One batch of tiles with every expert's probabilities and each method's choice.

    ``probs`` is the building channel; experts trained with ``outputs: instances`` also give ``aux`` (boundary and
    contact), from which building masks are separated into instances before scoring.
    """

    probs: torch.Tensor  # (k, N, H, W)
    baseline: torch.Tensor | None  # (N, H, W)
    embedding: np.ndarray  # (N,) expert id
    distance: np.ndarray  # (N,)
    soft_ids: np.ndarray  # (N, top)
    soft_w: np.ndarray  # (N, top)
    generalist: torch.Tensor | None = None  # (N, H, W)
    smoothed: np.ndarray | None = None  # (N,) expert id after spatial smoothing
    aux: torch.Tensor | None = None  # (k, N, 2, H, W): boundary, contact
    baseline_aux: torch.Tensor | None = None  # (N, 2, H, W)
    generalist_aux: torch.Tensor | None = None  # (N, 2, H, W)
    unfamiliar: np.ndarray | None = None  # (N,) bool: beyond its region's training distances
    serving: np.ndarray | None = None  # (k,) the network serving each region (k: the single network); None: its expert

    def serve(self, regions: np.ndarray | None) -> np.ndarray | None:
        """The networks that run for tiles routed to ``regions`` (prediction's ids: k is the single network)."""
        return regions if regions is None or self.serving is None else self.serving[regions]

    def _networks(self, stack: torch.Tensor | None, single: torch.Tensor | None) -> torch.Tensor | None:
        """The experts' outputs, then the single network's where it serves a region (indexed by network id)."""
        if stack is None or single is None or self.serving is None or not (self.serving == len(stack)).any():
            return stack
        return torch.cat([stack, single[None]])

    def best_expert(self, truth: np.ndarray, valid: np.ndarray, threshold: float) -> np.ndarray:
        """Per tile, the network with the fewest misclassified valid pixels among those a router can pick: the
        experts, and the single network where it serves a region."""
        nets = self._networks(self.probs, self.baseline)
        wrong = ((nets.numpy() >= threshold) != truth[None]) & valid[None]
        return wrong.reshape(wrong.shape[0], wrong.shape[1], -1).sum(-1).argmin(0)

    def _select(self, stack: torch.Tensor | None, single: torch.Tensor | None, generalist: torch.Tensor | None,
                method: str, random_ids: np.ndarray, oracle_ids: np.ndarray | None,
                best_ids: np.ndarray | None) -> torch.Tensor | None:
        if method == "single":
            return single
        if method == "generalist":
            return generalist
        nets = self._networks(stack, single)
        if nets is None:
            return None
        n = torch.arange(nets.shape[1])
        ids = {"embedding": self.serve(self.embedding), "smoothed": self.serve(self.smoothed),
               "random": self.serve(random_ids), "location_oracle": self.serve(oracle_ids), "best_expert": best_ids}
        if method in ids:
            return None if ids[method] is None else nets[torch.from_numpy(ids[method]), n]
        if method == "fallback":
            if self.smoothed is None or single is None:
                return None
            out = nets[torch.from_numpy(self.serve(self.smoothed)), n]
            if self.unfamiliar is not None and self.unfamiliar.any():
                u = torch.from_numpy(self.unfamiliar)
                out[u] = single[u]
            return out
        if method == "soft":
            w = torch.from_numpy(self.soft_w).reshape(*self.soft_w.shape, *([1] * (nets.ndim - 2)))
            return (nets[torch.from_numpy(self.serve(self.soft_ids)), n[:, None]] * w).sum(1)
        raise ValueError(method)

    def method_probs(self, method: str, random_ids: np.ndarray, oracle_ids: np.ndarray | None,
                     best_ids: np.ndarray | None = None) -> torch.Tensor | None:
        """The building probability (N, H, W) that ``method`` gives each tile."""
        return self._select(self.probs, self.baseline, self.generalist, method, random_ids, oracle_ids, best_ids)

    def method_ids(self, method: str, random_ids: np.ndarray, oracle_ids: np.ndarray | None,
                   best_ids: np.ndarray | None = None) -> np.ndarray | None:
        """Per tile, the network whose output ``method`` gives it, by the ids prediction uses (experts 0..k-1, k the
        single network, k + 1 the generalist; soft: the nearest of the experts it blends)."""
        k, n = self.probs.shape[0], len(self.embedding)
        if method in ("single", "generalist"):
            return np.full(n, k if method == "single" else k + 1)
        if method == "fallback":
            if self.smoothed is None:
                return None
            served = self.serve(self.smoothed)
            return np.where(self.unfamiliar, k, served) if self.unfamiliar is not None else served
        if method == "best_expert":
            return best_ids  # network ids already
        ids = {"embedding": self.embedding, "smoothed": self.smoothed, "random": random_ids,
               "location_oracle": oracle_ids, "soft": self.soft_ids[:, 0]}
        return self.serve(ids[method])

    def method_channels(self, method: str, rules: Calibrations, random_ids: np.ndarray,
                        oracle_ids: np.ndarray | None, best_ids: np.ndarray | None = None
                        ) -> tuple[np.ndarray, list[Calibration]] | None:
        """The (N, C, H, W) channels ``method`` gives each tile (building, then boundary and contact where the
        networks have them) and the calibration in ``rules`` of the network that gave each."""
        p = self.method_probs(method, random_ids, oracle_ids, best_ids)
        if p is None:
            return None
        cals = [rules.of(i) for i in self.method_ids(method, random_ids, oracle_ids, best_ids)]
        aux = self._select(self.aux, self.baseline_aux, self.generalist_aux, method, random_ids, oracle_ids, best_ids)
        return (torch.cat([p[:, None], aux], 1) if aux is not None else p[:, None]).numpy(), cals

    def method_masks(self, method: str, rules: Calibrations, random_ids: np.ndarray, oracle_ids: np.ndarray | None,
                     best_ids: np.ndarray | None = None) -> tuple[np.ndarray, list[Calibration]] | None:
        """Building masks (N, H, W), each cut as the network that gave it is calibrated in ``rules`` (separated
        into instances, one-pixel cuts, where the experts give aux channels), and those calibrations."""
        got = self.method_channels(method, rules, random_ids, oracle_ids, best_ids)
        if got is None:
            return None
        out = MethodOutputs(*got, [0] * len(got[1]))
        return np.stack([out.mask(j) for j in range(len(got[1]))]), got[1]


def _channels(model, images: torch.Tensor, device: torch.device,
              tta: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(building probability (N, H, W), boundary and contact (N, 2, H, W) or None); ``tta`` as in prediction."""
    p = predict_channels(model, images, device, tta)
    return p[:, 0], (p[:, 1:3] if p.shape[1] >= 3 else None)


@dataclass
class Routes:
    """The router's choices for every evaluated window, from one embedding pass."""

    ids: np.ndarray  # (n,) nearest region
    distance: np.ndarray  # (n,)
    soft_ids: np.ndarray  # (n, top)
    soft_w: np.ndarray  # (n, top)
    smoothed: np.ndarray  # (n,) after the neighbourhood majority


def route_images(bundle: Bundle, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(nearest region, distance, soft ids, soft weights) for a batch of images."""
    emb = embed_batches(bundle.embedding, images, bundle.device)
    ids, dist = bundle.router.route(emb)
    r = bundle.config.router
    sids, sw = bundle.router.soft(emb, r.soft_top_k, r.soft_temperature)
    return ids, dist, sids, sw


def route_batch(bundle: Bundle, images: torch.Tensor, routes: tuple | None = None) -> RoutedBatch:
    """Every expert's (and the single network's) output on ``images``; ``routes`` from ``route_images`` when the
    windows were routed already."""
    ids, dist, sids, sw = routes if routes is not None else route_images(bundle, images)
    tta = bundle.config.predict.tta  # scored as ``predict`` would run them
    outs = [_channels(e, images, bundle.device, tta) for e in bundle.experts]
    probs = torch.stack([o[0] for o in outs])
    aux = torch.stack([o[1] for o in outs]) if all(o[1] is not None for o in outs) else None
    base, base_aux = _channels(bundle.baseline, images, bundle.device, tta) if bundle.baseline is not None else (None, None)
    gen, gen_aux = (_channels(bundle.generalist, images, bundle.device, tta) if bundle.generalist is not None
                    else (None, None))
    serving = bundle.serving if base is not None else None  # a region served by the single network needs it
    return RoutedBatch(probs, base, ids, dist, sids, sw, gen, None, aux, base_aux, gen_aux, serving=serving)


def route_windows(bundle: Bundle, prep: Prepared, refs: list, batch_size: int = 8, progress: bool = True) -> Routes:
    """Route every window (one embedding pass), then smooth each choice over its neighbouring windows."""
    n, top = len(refs), min(bundle.config.router.soft_top_k, bundle.k)
    ids, dist = np.zeros(n, np.int64), np.zeros(n, np.float32)
    sids, sw = np.zeros((n, top), np.int64), np.zeros((n, top), np.float32)
    for b in tqdm(DataLoader(GridDataset(prep, refs), batch_size=batch_size), desc="routing", unit="batch",
                  disable=not progress, leave=False):
        i = b["index"].numpy()
        ids[i], dist[i], sids[i], sw[i] = route_images(bundle, b["image"])
    boxes = np.array([world_box(prep.readers[r.scene], r.col, r.row, r.size, r.size) for r in refs], float)
    spaces = np.array([space_of(prep.readers[r.scene]) for r in refs])
    return Routes(ids, dist, sids, sw, smooth_routes(ids, boxes, spaces, bundle.k))


@dataclass
class Evaluation:
    table: pd.DataFrame  # one row per (method, location), "overall" included
    routing: pd.DataFrame  # location x expert counts under embedding routing

    def pivot(self, metric: str = "iou") -> pd.DataFrame:
        return self.table.pivot(index="location", columns="method", values=metric).reindex(
            columns=[m for m in METHODS + FOOTPRINTS if m in set(self.table.method)])

    def markdown(self) -> str:
        parts = []
        for metric, title in (("iou", "IoU (building class, cumulative over all pixels)"), ("accuracy", "Pixel accuracy"),
                              ("f1", "F1"), ("building_f1", "Building F1 (IoU >= 0.5)"), ("boundary_iou", "Boundary IoU")):
            p = self.pivot(metric)
            parts.append(f"**{title}**\n\n" + markdown_table(p))
        full = self.table[["method", "location", *METRICS, "patches"]]
        parts.append("**All figures**\n\n" + markdown_table(full.set_index(["method", "location"])))
        errors = self.errors()
        if errors is not None:
            parts.append(f"**What became of the true buildings** (footprints as a user gets them; {ERRORS_LEGEND})\n\n"
                         + markdown_table(errors))
        parts.append("**Embedding routing: tiles per expert, and the share flagged unfamiliar**\n\n"
                     + markdown_table(self.routing))
        return "\n\n".join(parts)

    def errors(self, methods: list[str] | None = None) -> pd.DataFrame | None:
        """What became of the true buildings (:data:`geomoe.metrics.ERRORS`, and their number), by method and
        location; None for an evaluation written before the counts."""
        if "buildings" not in self.table:
            return None
        t = self.table if methods is None else self.table[self.table.method.isin(methods)]
        return t[["method", "location", "buildings", *ERRORS]].set_index(["method", "location"])

    @classmethod
    def read(cls, folder: Path) -> "Evaluation":
        """What ``write`` wrote to ``folder``, or one line saying what is missing."""
        csv, js = folder / "evaluation.csv", folder / "evaluation.json"
        if not csv.exists() or not js.exists():
            raise ValueError(f"{folder}: no evaluation.csv and evaluation.json; run 'geomoe evaluate ROOT -b BUNDLE -o {folder}' first")
        routing = pd.DataFrame(json.loads(js.read_text())["routing"]).T.rename_axis("location")
        counts = [c for c in routing.columns if c != "unfamiliar"]  # tile counts stay integers in the tables
        routing[counts] = routing[counts].astype(int)
        return cls(pd.read_csv(csv), routing)

    def write(self, out: Path) -> list[Path]:
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / "evaluation.md", out / "evaluation.csv", out / "evaluation.json"]
        with atomic_path(paths[0]) as t:
            t.write_text(self.markdown() + "\n")
        with atomic_path(paths[1]) as t:
            self.table.to_csv(t, index=False, float_format="%.4f")
        with atomic_path(paths[2]) as t:
            t.write_text(json.dumps({"rows": self.table.to_dict(orient="records"),
                                     "routing": {str(k): {str(c): (float(v) if c == "unfamiliar" else int(v)) for c, v in row.items()}
                                                 for k, row in self.routing.iterrows()}}, indent=2, default=float))
        return paths


def markdown_table(df: pd.DataFrame) -> str:
    idx = list(df.index.names) if df.index.names[0] is not None else ["location"]
    head = "| " + " | ".join([*(str(n) for n in idx), *map(str, df.columns)]) + " |"
    lines = [head, "|" + "---|" * (len(idx) + len(df.columns))]
    for key, *values in df.itertuples(name=None):  # by column, so counts stay integers beside float columns
        keys = key if isinstance(key, tuple) else (key,)
        cells = [f"{v:.4f}" if isinstance(v, float) else str(v) for v in values]
        lines.append("| " + " | ".join([*map(str, keys), *cells]) + " |")
    return "\n".join(lines)


def min_pixels(reader, min_area_m2: float) -> int:
    """Prediction's smallest footprint (``predict.min_area_m2``) in pixels of ``reader``'s grid (0: size unknown)."""
    pixel = reader.target_gsd or reader.gsd
    return int(np.ceil(min_area_m2 / pixel ** 2)) if pixel else 0


def evaluate(bundle: Bundle, root: Path | None = None, prep: Prepared | None = None, split: str = "test",
             batch_size: int = 8, seed: int = 0, progress: bool = True, workers: int | None = None) -> Evaluation:
    """Score every method on the ``split`` windows of ``root`` (the bundle's own split when it trained there).
    ``workers``: processes scoring batches while the model answers the next (None: :func:`scoring_workers`; 0: in
    line); the scores are counts, the same however many."""
    cfg = bundle.config
    prep = prep or prepare(root, cfg.data, cfg.seed)
    if split not in ("train", "val", "test", "all"):
        raise ValueError(f"split {split!r}: choose test (reported), val, train or all")
    refs = [r for s in ("train", "val", "test") for r in prep.windows(s)] if split == "all" else prep.windows(split)
    if not refs:
        raise ValueError(f"{prep.catalog.root}: no {split} windows to evaluate")
    known = set(bundle.region_of_location)
    oracle = OracleRouter(bundle.region_of_location) if set(prep.locations) <= known else None
    rand = RandomRouter(bundle.k, seed)
    routes = route_windows(bundle, prep, refs, batch_size, progress)
    # threshold, separation and smallest footprint as chosen on validation: each expert's, the single network's own
    rules = bundle.calibrations("experts")
    methods = [m for m in METHODS if not (m in ("single", "fallback") and bundle.baseline is None)
               and not (m == "generalist" and bundle.generalist is None)
               and not (m == "location_oracle" and oracle is None)]
    delivered = [m for m in DELIVERED if m in methods]
    rows_of = [*methods, *map(as_footprints, delivered)]
    squaring = Regularisation.of(cfg.predict)
    scores = {(m, loc): Scores() for m in rows_of for loc in prep.locations}
    routing = np.zeros((len(prep.locations), bundle.k), np.int64)
    flagged = np.zeros(len(prep.locations), np.int64)
    loader = DataLoader(GridDataset(prep, refs), batch_size=batch_size)
    if workers is None:
        workers = scoring_workers(cfg.predict, len(loader))

    def batches() -> Iterator[ScoringBatch]:
        """Each batch's outputs, method by method, and the routing counts as the router goes."""
        for b in tqdm(loader, desc="evaluating", unit="batch", disable=not progress):
            i = b["index"].numpy()
            rb = route_batch(bundle, b["image"], (routes.ids[i], routes.distance[i], routes.soft_ids[i],
                                                  routes.soft_w[i]))
            rb.smoothed = routes.smoothed[i]
            locs = [prep.locations[i] for i in b["location"].tolist()]
            rids = rand.route(len(locs))
            oids = oracle.route(locs) if oracle else None
            unf = rb.unfamiliar = bundle.unfamiliar(rb.embedding, rb.distance)
            for li, e, u in zip(b["location"].tolist(), rb.embedding, unf):
                routing[li, e] += 1
                flagged[li] += int(u)
            truth, valid, ids = b["mask"].numpy() > 0, b["valid"].numpy(), b["instances"].numpy()
            bids = rb.best_expert(truth, valid, bundle.threshold)
            readers = [prep.readers[refs[k].scene] for k in i]
            outputs = {}
            for m in methods:
                full, cals = rb.method_channels(m, rules, rids, oids, bids)
                outputs[m] = MethodOutputs(full, cals, [min_pixels(r, c.min_area_m2) for r, c in zip(readers, cals)])
            yield ScoringBatch(locs, truth, ids, valid, [r.target_gsd or r.gsd for r in readers], outputs,
                               {m: as_footprints(m) for m in delivered}, squaring)

    for part in beside(workers, score_batch, batches()):
        for key, sc in part.items():
            scores[key] += sc
    rows = []
    for m in rows_of:
        overall = Scores()
        for loc in prep.locations:
            overall += scores[(m, loc)]
            sc = scores[(m, loc)]
            rows.append({"method": m, "location": loc, **sc.summary(), "patches": sc.patches, **sc.error_counts()})
        rows.append({"method": m, "location": "overall", **overall.summary(), "patches": overall.patches,
                     **overall.error_counts()})
    table = pd.DataFrame(rows)
    # a region the single network serves (chosen on validation) is named so: its tiles ran there
    names = [f"expert {i}" if s == i else f"region {i} (single network)" for i, s in enumerate(bundle.serving)]
    rt = pd.DataFrame(routing, index=pd.Index(prep.locations, name="location"), columns=names)
    # the share of each location's tiles the router flags as unlike its training data (router/familiarity.py)
    rt["unfamiliar"] = flagged / np.maximum(routing.sum(1), 1)
    return Evaluation(table, rt)
