"""Routing that respects space: a tile takes the expert most of its neighbours were routed to.

Neighbouring tiles of one town should not flip between experts; the majority over a tile and the tiles
touching it (in world coordinates, so separate files of one place count as neighbours) removes isolated flips
while keeping real boundaries between kinds of place.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def neighbours(boxes: np.ndarray, spaces: np.ndarray, reach: float = 1.0) -> Iterator[tuple[int, np.ndarray]]:
    """(tile, the tiles within ``reach`` tile sizes of it, itself included) for every tile.

    ``boxes`` (n, 4) are (xmin, ymin, xmax, ymax) in one unit per ``spaces`` entry; tiles of different spaces (CRSs,
    ungeoreferenced scenes) are never neighbours.
    """
    for space in np.unique(spaces):
        idx = np.flatnonzero(spaces == space)
        b = boxes[idx]
        size = np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])
        for m, j in enumerate(idx):
            d = reach * size[m]
            near = (b[:, 0] < b[m, 2] + d) & (b[:, 2] > b[m, 0] - d) & (b[:, 1] < b[m, 3] + d) & (b[:, 3] > b[m, 1] - d)
            yield int(j), idx[near]


def smooth_routes(ids: np.ndarray, boxes: np.ndarray, spaces: np.ndarray, k: int, reach: float = 1.0) -> np.ndarray:
    """Majority expert over each tile and its :func:`neighbours`; the tile's own expert wins ties."""
    ids = np.asarray(ids, np.int64)
    out = ids.copy()
    for j, near in neighbours(boxes, spaces, reach):
        votes = np.bincount(ids[near], minlength=k).astype(float)
        votes[ids[j]] += 0.5  # ties keep the tile's own choice
        out[j] = int(votes.argmax())
    return out


def smooth_grid(ids: np.ndarray, reach: int = 1) -> np.ndarray:
    """``smooth_routes`` on a scene's tile grid (rows x cols, -1 where no tile ran): the majority of each tile's
    (2 reach + 1)^2 neighbourhood, the tile's own expert winning ties. Linear in the number of tiles."""
    from scipy import ndimage

    ids = np.asarray(ids, np.int64)
    k = int(ids.max()) + 1 if (ids >= 0).any() else 0
    if k == 0:
        return ids.copy()
    size = 2 * reach + 1
    votes = np.stack([ndimage.convolve((ids == e).astype(np.float32), np.ones((size, size), np.float32),
                                       mode="constant") for e in range(k)])
    votes += 0.5 * (ids[None] == np.arange(k)[:, None, None])
    return np.where(ids >= 0, votes.argmax(0), -1)


def scene_majority(ids: np.ndarray) -> np.ndarray:
    """One expert for the whole scene: the one most of its tiles were routed to (-1 cells stay -1)."""
    ids = np.asarray(ids, np.int64)
    if not (ids >= 0).any():
        return ids.copy()
    return np.where(ids >= 0, np.bincount(ids[ids >= 0]).argmax(), -1)
