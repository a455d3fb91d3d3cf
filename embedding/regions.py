"""Regions: spherical k-means on the embeddings, and how well clusters agree with locations."""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
import pandas as pd
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score

from geomoe.embedding.extract import Embeddings


def fit_kmeans(vectors: np.ndarray, k: int, seed: int = 0, niter: int = 50) -> np.ndarray:
    """Unit-norm centroids of spherical k-means (cosine, like the embedding's triplet distance)."""
    n, d = vectors.shape
    if k > n:
        raise ValueError(f"k = {k} is larger than the number of patches ({n})")
    km = faiss.Kmeans(d, k, niter=niter, seed=seed, spherical=True, nredo=3, verbose=False,
                      min_points_per_centroid=1, max_points_per_centroid=100000)
    km.train(np.ascontiguousarray(vectors, dtype=np.float32))
    c = km.centroids.astype(np.float32)
    return c / np.linalg.norm(c, axis=1, keepdims=True).clip(1e-12)


def assign(vectors: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    return np.argmax(vectors @ centroids.T, axis=1)


@dataclass
class ClusterScores:
    k: int
    silhouette: float
    purity: float
    nmi: float
    ari: float
    held_out_majority: float  # val patches in their location's (train) majority cluster
    table: pd.DataFrame  # location x cluster counts

    def row(self) -> dict:
        return {"k": self.k, "silhouette": self.silhouette, "purity": self.purity, "nmi": self.nmi, "ari": self.ari,
                "held_out_majority": self.held_out_majority}


def score(emb: Embeddings, centroids: np.ndarray) -> ClusterScores:
    """Cluster quality of ``centroids`` (fit on the train split) on all patches, and on held-out ones."""
    labels = assign(emb.vectors, centroids)
    k = len(centroids)
    sil = float(silhouette_score(emb.vectors, labels, metric="cosine")) if 1 < len(set(labels)) < len(labels) else float("nan")
    table = pd.crosstab(pd.Series(emb.location, name="location"), pd.Series(labels, name="cluster"))
    purity = float(table.max(axis=0).sum() / table.values.sum())
    train = emb.split == "train"
    majority = pd.crosstab(emb.location[train], labels[train]).idxmax(axis=1) if train.any() else pd.Series(dtype=int)
    val = ~train
    hom = float(np.mean([labels[i] == majority.get(emb.location[i], -1) for i in np.flatnonzero(val)])) if val.any() else float("nan")
    return ClusterScores(k, sil, purity, float(normalized_mutual_info_score(emb.location, labels)),
                         float(adjusted_rand_score(emb.location, labels)), hom, table)


def sweep(emb: Embeddings, ks: list[int], seed: int = 0) -> list[ClusterScores]:
    """Fit on the train split for each k (those not larger than the patch count) and score."""
    train = emb.subset(emb.split == "train") if (emb.split == "train").any() else emb
    return [score(emb, fit_kmeans(train.vectors, k, seed)) for k in ks if 1 < k <= len(train)]
