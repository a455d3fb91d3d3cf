"""``geomoe evaluate``: the paper's table, per location and overall, for every way of choosing an expert."""

from __future__ import annotations

import json
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
from geomoe.embedding.extract import embed_batches
from geomoe.experts.train import predict_probs
from geomoe.metrics import Scores
from geomoe.router.routing import OracleRouter, RandomRouter

METHODS = ("single", "random", "embedding", "oracle", "soft")
METRICS = ("iou", "accuracy", "precision", "recall", "f1", "building_f1", "boundary_iou")


@dataclass
class RoutedBatch:
    """One batch of tiles with every expert's probabilities and each method's choice."""

    probs: torch.Tensor  # (k, N, H, W)
    baseline: torch.Tensor | None  # (N, H, W)
    embedding: np.ndarray  # (N,) expert id
    distance: np.ndarray  # (N,)
    soft_ids: np.ndarray  # (N, top)
    soft_w: np.ndarray  # (N, top)

    def method_probs(self, method: str, random_ids: np.ndarray, oracle_ids: np.ndarray | None) -> torch.Tensor | None:
        n = torch.arange(self.probs.shape[1])
        if method == "single":
            return self.baseline
        if method == "embedding":
            return self.probs[torch.from_numpy(self.embedding), n]
        if method == "random":
            return self.probs[torch.from_numpy(random_ids), n]
        if method == "oracle":
            return None if oracle_ids is None else self.probs[torch.from_numpy(oracle_ids), n]
        if method == "soft":
            w = torch.from_numpy(self.soft_w)[..., None, None]
            return (self.probs[torch.from_numpy(self.soft_ids), n[:, None]] * w).sum(1)
        raise ValueError(method)


def route_batch(bundle: Bundle, images: torch.Tensor) -> RoutedBatch:
    emb = embed_batches(bundle.embedding, images, bundle.device)
    ids, dist = bundle.router.route(emb)
    r = bundle.config.router
    sids, sw = bundle.router.soft(emb, r.soft_top_k, r.soft_temperature)
    probs = torch.stack([predict_probs(e, images, bundle.device) for e in bundle.experts])
    base = predict_probs(bundle.baseline, images, bundle.device) if bundle.baseline is not None else None
    return RoutedBatch(probs, base, ids, dist, sids, sw)


@dataclass
class Evaluation:
    table: pd.DataFrame  # one row per (method, location), "overall" included
    routing: pd.DataFrame  # location x expert counts under embedding routing

    def pivot(self, metric: str = "iou") -> pd.DataFrame:
        return self.table.pivot(index="location", columns="method", values=metric).reindex(
            columns=[m for m in METHODS if m in set(self.table.method)])

    def markdown(self) -> str:
        parts = []
        for metric, title in (("iou", "IoU (building class, cumulative over all pixels)"), ("accuracy", "Pixel accuracy"),
                              ("f1", "F1"), ("building_f1", "Building F1 (IoU >= 0.5)"), ("boundary_iou", "Boundary IoU")):
            p = self.pivot(metric)
            parts.append(f"**{title}**\n\n" + _md(p))
        full = self.table[["method", "location", *METRICS, "patches"]]
        parts.append("**All figures**\n\n" + _md(full.set_index(["method", "location"])))
        parts.append("**Embedding routing: tiles per expert**\n\n" + _md(self.routing))
        return "\n\n".join(parts)

    def write(self, out: Path) -> list[Path]:
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / "evaluation.md", out / "evaluation.csv", out / "evaluation.json"]
        with atomic_path(paths[0]) as t:
            t.write_text(self.markdown() + "\n")
        with atomic_path(paths[1]) as t:
            self.table.to_csv(t, index=False, float_format="%.4f")
        with atomic_path(paths[2]) as t:
            t.write_text(json.dumps({"rows": self.table.to_dict(orient="records"),
                                     "routing": {str(k): {str(c): int(v) for c, v in row.items()}
                                                 for k, row in self.routing.iterrows()}}, indent=2, default=float))
        return paths


def _md(df: pd.DataFrame) -> str:
    idx = list(df.index.names) if df.index.names[0] is not None else ["location"]
    head = "| " + " | ".join([*(str(n) for n in idx), *map(str, df.columns)]) + " |"
    lines = [head, "|" + "---|" * (len(idx) + len(df.columns))]
    for key, row in df.iterrows():
        keys = key if isinstance(key, tuple) else (key,)
        cells = [f"{v:.4f}" if isinstance(v, float) else str(v) for v in row.values]
        lines.append("| " + " | ".join([*map(str, keys), *cells]) + " |")
    return "\n".join(lines)


def evaluate(bundle: Bundle, root: Path | None = None, prep: Prepared | None = None, split: str = "val",
             batch_size: int = 8, seed: int = 0, progress: bool = True) -> Evaluation:
    """Score every method on the ``split`` windows of ``root`` (the bundle's own split when it trained there)."""
    cfg = bundle.config
    prep = prep or prepare(root, cfg.data, cfg.seed)
    refs = prep.windows("train") + prep.windows("val") if split == "all" else prep.windows(split)
    if not refs:
        raise ValueError(f"{prep.catalog.root}: no {split} windows to evaluate")
    known = set(bundle.region_of_location)
    oracle = OracleRouter(bundle.region_of_location) if set(prep.locations) <= known else None
    rand = RandomRouter(bundle.k, seed)
    methods = [m for m in METHODS if not (m == "single" and bundle.baseline is None) and not (m == "oracle" and oracle is None)]
    scores = {(m, loc): Scores() for m in methods for loc in prep.locations}
    routing = np.zeros((len(prep.locations), bundle.k), np.int64)
    for b in tqdm(DataLoader(GridDataset(prep, refs), batch_size=batch_size), desc="evaluating", unit="batch",
                  disable=not progress):
        rb = route_batch(bundle, b["image"])
        locs = [prep.locations[i] for i in b["location"].tolist()]
        rids = rand.route(len(locs))
        oids = oracle.route(locs) if oracle else None
        for li, e in zip(b["location"].tolist(), rb.embedding):
            routing[li, e] += 1
        truth, valid = b["mask"].numpy() > 0, b["valid"].numpy()
        for m in methods:
            pred = (rb.method_probs(m, rids, oids) >= bundle.threshold).numpy()
            for j, loc in enumerate(locs):
                scores[(m, loc)].update(pred[j], truth[j], valid[j])
    rows = []
    for m in methods:
        overall = Scores()
        for loc in prep.locations:
            overall += scores[(m, loc)]
            rows.append({"method": m, "location": loc, **scores[(m, loc)].summary(), "patches": scores[(m, loc)].patches})
        rows.append({"method": m, "location": "overall", **overall.summary(), "patches": overall.patches})
    table = pd.DataFrame(rows)
    rt = pd.DataFrame(routing, index=pd.Index(prep.locations, name="location"), columns=[f"expert {i}" for i in range(bundle.k)])
    return Evaluation(table, rt)
