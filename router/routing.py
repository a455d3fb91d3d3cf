"""Routing a tile's embedding to an expert: nearest centroid by cosine (FAISS), and the comparison routers."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from geomoe.atomic import atomic_path


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)


class Router:
    """Nearest centroid under d = 1 - cosine, the distance the embedding was trained with.

    An inner-product index over unit centroids, queried with unit vectors, ranks by cosine.
    """

    def __init__(self, centroids: np.ndarray | None = None, index: faiss.Index | None = None):
        if index is None:
            if centroids is None:
                raise ValueError("a Router needs centroids or an index")
            index = faiss.IndexFlatIP(centroids.shape[1])
            index.add(_unit(centroids))
        self.index = index

    @property
    def k(self) -> int:
        return self.index.ntotal

    @property
    def dim(self) -> int:
        return self.index.d

    def topk(self, emb: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(expert ids, cosine distances), each (len(emb), n), nearest first."""
        emb = np.atleast_2d(emb)
        if emb.shape[1] != self.dim:
            raise ValueError(f"embeddings have dimension {emb.shape[1]}; the router's centroids have {self.dim}")
        sim, ids = self.index.search(_unit(emb), min(n, self.k))
        return ids.astype(np.int64), (1.0 - sim).astype(np.float32)

    def route(self, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(expert id, distance to its centroid) per row."""
        ids, dist = self.topk(emb, 1)
        return ids[:, 0], dist[:, 0]

    def soft(self, emb: np.ndarray, n: int, temperature: float) -> tuple[np.ndarray, np.ndarray]:
        """(top-n expert ids, blend weights summing to 1): softmax of -distance / temperature."""
        ids, dist = self.topk(emb, n)
        w = np.exp(-(dist - dist[:, :1]) / temperature)
        return ids, (w / w.sum(1, keepdims=True)).astype(np.float32)

    def save(self, path: Path) -> Path:
        with atomic_path(path) as tmp:
            faiss.write_index(self.index, str(tmp))
        return path

    @classmethod
    def load(cls, path: Path) -> "Router":
        try:
            return cls(index=faiss.read_index(str(path)))
        except RuntimeError as e:
            raise ValueError(f"{path}: not a FAISS index ({str(e).splitlines()[0]})") from e


class RandomRouter:
    """A uniformly random expert per tile: the paper's second baseline."""

    def __init__(self, k: int, seed: int = 0):
        self.k, self.rng = k, np.random.default_rng(seed)

    def route(self, n: int) -> np.ndarray:
        return self.rng.integers(0, self.k, size=n)


class OracleRouter:
    """Each tile goes to its true location's majority region (an upper bound on location routing)."""

    def __init__(self, region_of_location: dict[str, int]):
        self.map = region_of_location

    def route(self, locations: list[str] | np.ndarray) -> np.ndarray:
        missing = sorted({str(l) for l in locations} - set(self.map))
        if missing:
            raise ValueError(f"oracle routing: no region known for location(s) {', '.join(missing)}")
        return np.array([self.map[str(l)] for l in locations], dtype=np.int64)


def majority_regions(locations: np.ndarray, regions: np.ndarray) -> dict[str, int]:
    """Each location's most frequent region."""
    out = {}
    for loc in np.unique(locations):
        out[str(loc)] = int(np.bincount(regions[locations == loc]).argmax())
    return out
