"""Spatial block split, and the windows that training and evaluation draw from it.

Every scene's (resampled) grid is cut into square blocks; each block is train or val. Training
windows lie inside one train block and evaluation windows inside one val block, so no patch
straddles the split even when patches overlap.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from geomoe.data.catalog import Split
from geomoe.data.reader import SceneReader


@dataclass(frozen=True)
class Block:
    scene: int  # index into the reader list
    col: int
    row: int
    width: int
    height: int
    split: Split


@dataclass(frozen=True)
class PatchRef:
    """A window of a scene's resampled grid."""

    scene: int
    col: int
    row: int
    size: int


def _stable_u01(*parts: object) -> float:
    h = hashlib.sha1("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def split_blocks(readers: list[SceneReader], block: int, val_fraction: float, seed: int = 0) -> list[Block]:
    """Cut every scene into ``block``-sized blocks and assign each to train or val.

    Scenes whose split is fixed by the layout (Inria) keep it. Otherwise, per location, the
    ``val_fraction`` of blocks with the lowest stable hash go to val, so the split does not change
    when scenes are added elsewhere, and every location with two or more blocks gets a val block.
    """
    blocks: list[tuple[float, Block]] = []
    for i, r in enumerate(readers):
        for row in range(0, r.height, block):
            for col in range(0, r.width, block):
                b = Block(i, col, row, min(block, r.width - col), min(block, r.height - row), r.scene.split or "train")
                blocks.append((_stable_u01(seed, r.scene.location, r.scene.name, col, row), b))
    out: list[Block] = []
    by_loc: dict[str, list[tuple[float, Block]]] = {}
    for u, b in blocks:
        if readers[b.scene].scene.split is not None:
            out.append(b)
        else:
            by_loc.setdefault(readers[b.scene].scene.location, []).append((u, b))
    for items in by_loc.values():
        items.sort(key=lambda t: t[0])
        n_val = int(round(val_fraction * len(items))) if len(items) > 1 else 0
        if val_fraction > 0 and len(items) > 1:
            n_val = max(1, n_val)
        for j, (_, b) in enumerate(items):
            out.append(Block(b.scene, b.col, b.row, b.width, b.height, "val" if j < n_val else "train"))
    return out


def origins(length: int, size: int, stride: int) -> np.ndarray:
    """Window starts covering [0, length): regular steps, the last one aligned to the end."""
    if length <= size:
        return np.array([0])
    return np.array(sorted(set(range(0, length - size, stride)) | {length - size}))


def grid_windows(blocks: list[Block], size: int, split: Split) -> list[PatchRef]:
    """``size`` windows covering every block of ``split``, never crossing a block.

    The last window of a block is aligned to the block's far edge rather than padded past the
    raster (padding skews embeddings and scores); it may overlap its neighbour. Blocks smaller than
    a window get one padded window.
    """
    out = []
    for b in blocks:
        if b.split != split:
            continue
        for row in b.row + origins(b.height, size, size):
            for col in b.col + origins(b.width, size, size):
                out.append(PatchRef(b.scene, int(col), int(row), size))
    return out


def random_window(b: Block, size: int, rng: np.random.Generator) -> PatchRef:
    """A random ``size`` window inside block ``b`` (anchored at its corner when the block is smaller)."""
    col = b.col + int(rng.integers(0, max(0, b.width - size) + 1))
    row = b.row + int(rng.integers(0, max(0, b.height - size) + 1))
    return PatchRef(b.scene, col, row, size)


class BalancedSampler:
    """Draws training windows with a location label, each location equally often."""

    def __init__(self, readers: list[SceneReader], blocks: list[Block], size: int, split: Split = "train"):
        self.readers = readers
        self.size = size
        self.by_loc: dict[str, list[Block]] = {}
        for b in blocks:
            if b.split == split:
                self.by_loc.setdefault(readers[b.scene].scene.location, []).append(b)
        if not self.by_loc:
            raise ValueError(f"no {split} blocks to sample from")
        self.locations = sorted(self.by_loc)
        self.weights = {
            loc: np.array([b.width * b.height for b in bl], float) / sum(b.width * b.height for b in bl)
            for loc, bl in self.by_loc.items()
        }

    def draw(self, rng: np.random.Generator, location: str | None = None) -> PatchRef:
        loc = location or self.locations[int(rng.integers(len(self.locations)))]
        bl = self.by_loc[loc]
        return random_window(bl[int(rng.choice(len(bl), p=self.weights[loc]))], self.size, rng)


class WindowSampler:
    """Draws from a fixed list of windows (a region's share), each location equally often."""

    def __init__(self, readers: list[SceneReader], refs: list[PatchRef]):
        if not refs:
            raise ValueError("no windows to sample from")
        self.by_loc: dict[str, list[PatchRef]] = {}
        for r in refs:
            self.by_loc.setdefault(readers[r.scene].scene.location, []).append(r)
        self.locations = sorted(self.by_loc)

    def draw(self, rng: np.random.Generator, location: str | None = None) -> PatchRef:
        loc = location if location in self.by_loc else self.locations[int(rng.integers(len(self.locations)))]
        refs = self.by_loc[loc]
        return refs[int(rng.integers(len(refs)))]
