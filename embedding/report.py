"""Fit regions and write what a person needs to judge them: the k sweep and the location-by-region table."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geomoe.atomic import atomic_path
from geomoe.embedding.extract import Embeddings
from geomoe.embedding.regions import ClusterScores, fit_kmeans, score, sweep


def check_dims(vectors: np.ndarray, centroids: np.ndarray, vec_src: object, cen_src: object) -> None:
    if centroids.ndim != 2 or centroids.shape[1] != vectors.shape[1]:
        raise ValueError(f"{cen_src}: centroids of dimension {centroids.shape[-1]} do not match the "
                         f"{vectors.shape[1]}-d embeddings of {vec_src}; they come from a different model")


@dataclass
class RegionFit:
    centroids: np.ndarray
    chosen: ClusterScores
    sweep: list[ClusterScores]

    @property
    def markdown(self) -> str:
        lines = ["| k | silhouette | purity | NMI | ARI | held-out in majority cluster |", "|---|---|---|---|---|---|"]
        for s in self.sweep:
            lines.append(f"| {s.k} | {s.silhouette:.3f} | {s.purity:.3f} | {s.nmi:.3f} | {s.ari:.3f} | {s.held_out_majority:.3f} |")
        t = self.chosen.table
        lines += ["", f"Location by region (k = {self.chosen.k}, all patches):", "",
                  "| location | " + " | ".join(f"region {c}" for c in t.columns) + " |",
                  "|---" * (len(t.columns) + 1) + "|"]
        for loc, row in t.iterrows():
            lines.append(f"| {loc} | " + " | ".join(str(int(v)) for v in row.values) + " |")
        return "\n".join(lines)


def fit_regions(emb: Embeddings, k: int, ks: list[int], out: Path, seed: int = 0) -> RegionFit:
    """Centroids for ``k`` from the train split, scored on all patches; the sweep over ``ks`` beside it."""
    train = emb.subset(emb.split == "train") if (emb.split == "train").any() else emb
    centroids = fit_kmeans(train.vectors, k, seed)
    res = RegionFit(centroids, score(emb, centroids), sweep(emb, sorted(set(ks) - {k}), seed))
    res.sweep = sorted(res.sweep + [res.chosen], key=lambda s: s.k)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "centroids.npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, centroids)
    with atomic_path(out / "regions.json") as tmp:
        tmp.write_text(json.dumps({"k": k, "scores": res.chosen.row(), "sweep": [s.row() for s in res.sweep],
                                   "table": {str(c): {str(l): int(v) for l, v in res.chosen.table[c].items()}
                                             for c in res.chosen.table.columns}}, indent=2))
    with atomic_path(out / "regions.md") as tmp:
        tmp.write_text(res.markdown + "\n")
    return res
