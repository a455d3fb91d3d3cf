"""Pictures of the embedding space (the paper's Fig. 2 and 3) and of what each region looks like."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from sklearn.manifold import TSNE

from geomoe.config import DataConfig
from geomoe.data.catalog import Scene, gsd_near
from geomoe.data.datasets import reader_for
from geomoe.data.reader import SceneReader
from geomoe.embedding.extract import Embeddings
from geomoe.embedding.regions import assign
from geomoe.plots import overlay, patch_grid, plt, save_figure


def project(vectors: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    """2-D coordinates by UMAP or t-SNE (cosine metric, as the embedding is trained)."""
    n = len(vectors)
    if method == "umap":
        import umap

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return umap.UMAP(n_neighbors=min(15, n - 1), metric="cosine", random_state=seed).fit_transform(vectors)
    return TSNE(2, metric="cosine", perplexity=min(30.0, max(2.0, (n - 1) / 3)), random_state=seed,
                init="pca").fit_transform(vectors)


def _scatter(ax, xy: np.ndarray, labels: np.ndarray, title: str, held_out: np.ndarray | None = None) -> None:
    for i, lab in enumerate(sorted(set(labels.tolist()), key=str)):
        sel = labels == lab
        ax.scatter(xy[sel, 0], xy[sel, 1], s=10, color=plt.cm.tab10(i % 10), label=str(lab), alpha=0.8)
        if held_out is not None:
            h = sel & held_out
            ax.scatter(xy[h, 0], xy[h, 1], s=28, facecolors="none", edgecolors="k", linewidths=0.6)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=8, markerscale=1.5)


def plot_space(emb: Embeddings, centroids: np.ndarray | None, out: Path, methods=("umap", "tsne"), seed: int = 0,
               title: str = "") -> Path:
    """One row per projection: coloured by location, and by region; held-out patches ringed."""
    clusters = assign(emb.vectors, centroids) if centroids is not None else None
    cols = 2 if clusters is not None else 1
    fig, axes = plt.subplots(len(methods), cols, figsize=(6 * cols, 5 * len(methods)), squeeze=False)
    held = emb.split != "train"
    for r, m in enumerate(methods):
        xy = project(emb.vectors, m, seed)
        _scatter(axes[r, 0], xy, emb.location, f"{m.upper()}: by location (ringed = held out)", held)
        if clusters is not None:
            _scatter(axes[r, 1], xy, np.array([f"region {c}" for c in clusters]), f"{m.upper()}: by region (k={len(centroids)})")
    if title:
        fig.suptitle(title)
    return save_figure(fig, out)


def plot_cluster_samples(emb: Embeddings, centroids: np.ndarray, out: Path, per_cluster: int = 6,
                         data: DataConfig | None = None, seed: int = 0) -> Path:
    """Random patches from each region, so a person can see what a region means (read as ``data`` says, the
    configuration the windows were embedded with)."""
    data = data or DataConfig()
    clusters = assign(emb.vectors, centroids)
    rng = np.random.default_rng(seed)
    readers: dict[str, SceneReader] = {}
    tiles, titles = [], []
    for c in range(len(centroids)):
        idx = np.flatnonzero(clusters == c)
        pick = rng.choice(idx, size=min(per_cluster, len(idx)), replace=False) if len(idx) else []
        for j in range(per_cluster):
            if j < len(pick):
                i = pick[j]
                path = str(emb.scene[i])
                if path not in readers:
                    # the resolution of a raster without a CRS from locations.csv, as discovery gave it
                    readers[path] = reader_for(Scene(str(emb.location[i]), Path(path), gsd_hint=gsd_near(Path(path))),
                                               data)
                col, row, size = emb.window[i]
                p = readers[path].read(int(col), int(row), int(size))
                tiles.append(overlay(p.image, None, p.valid))
                titles.append(f"region {c}: {emb.location[i]}")
            else:
                tiles.append(np.full((8, 8, 3), 255, np.uint8))
                titles.append(f"region {c}: (none)")
    for r in readers.values():
        r.close()
    return patch_grid(tiles, titles, out, cols=per_cluster, suptitle="sample patches per region")
