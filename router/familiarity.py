"""When the router does not know: a tile farther from its region's centroid than nearly all of that region's
training tiles were is *unfamiliar*: imagery unlike anything the experts learned from (a new kind of place, a
sensor never seen, clouds, a corrupted scene). Each region keeps a high quantile of its training tiles' distances.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geomoe.atomic import atomic_path


@dataclass
class Familiarity:
    """Per-region distance thresholds (d = 1 - cosine to the region's centroid)."""

    quantile: float
    thresholds: np.ndarray  # (k,); inf for a region without training tiles

    @classmethod
    def fit(cls, ids: np.ndarray, dist: np.ndarray, k: int, quantile: float = 0.99) -> "Familiarity":
        """From the training tiles' nearest region and distance to it."""
        th = np.full(k, np.inf)
        for r in range(k):
            d = dist[ids == r]
            if len(d):
                th[r] = float(np.quantile(d, quantile))
        return cls(quantile, th)

    def unfamiliar(self, ids: np.ndarray, dist: np.ndarray) -> np.ndarray:
        """True where a tile lies beyond its region's threshold."""
        ids = np.asarray(ids, np.int64)
        return np.asarray(dist) > self.thresholds[ids]

    def save(self, path: Path) -> Path:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps({"quantile": self.quantile,
                                       "thresholds": [None if not np.isfinite(t) else float(t) for t in self.thresholds]},
                                      indent=2))
        return path

    @classmethod
    def load(cls, path: Path) -> "Familiarity":
        d = json.loads(Path(path).read_text())
        return cls(float(d["quantile"]), np.array([np.inf if t is None else t for t in d["thresholds"]], float))
