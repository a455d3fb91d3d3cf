"""Routing that respects space: a tile takes the expert most of its neighbours were routed to.

Neighbouring tiles of one town should not flip between experts; the majority over a tile and the tiles
touching it (in world coordinates, so separate files of one place count as neighbours) removes isolated flips
while keeping real boundaries between kinds of place.
"""

from __future__ import annotations

import numpy as np


def smooth_routes(ids: np.ndarray, boxes: np.ndarray, spaces: np.ndarray, k: int, reach: float = 1.0) -> np.ndarray:
    """Majority expert over each tile and its neighbours; the tile's own expert wins ties.

    ``boxes`` (n, 4) are (xmin, ymin, xmax, ymax) in one unit per ``spaces`` entry; a neighbour lies within
    ``reach`` tile sizes of the tile. Tiles of different spaces (CRSs, ungeoreferenced scenes) never vote together.
    """
    ids = np.asarray(ids, np.int64)
    out = ids.copy()
    for space in np.unique(spaces):
        idx = np.flatnonzero(spaces == space)
        b = boxes[idx]
        size = np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])
        for m, j in enumerate(idx):
            d = reach * size[m]
            near = (b[:, 0] < b[m, 2] + d) & (b[:, 2] > b[m, 0] - d) & (b[:, 1] < b[m, 3] + d) & (b[:, 3] > b[m, 1] - d)
            votes = np.bincount(ids[idx[near]], minlength=k).astype(float)
            votes[ids[j]] += 0.5  # ties keep the tile's own choice
            out[j] = int(votes.argmax())
    return out
