"""Spatial block split, and the windows that training and evaluation draw from it.

Every scene's (resampled) grid is cut into square blocks; each block is train, val or test. Training
windows lie inside one train block, validation windows inside one val block, and test windows inside one
test block; blocks of different splits are pulled apart so windows of different splits keep a gap.
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


def space_of(r: SceneReader) -> str:
    """Blocks are compared only within one space: a CRS (scenes that may touch), or one ungeoreferenced scene."""
    return r.grid.crs.to_string() if r.grid.crs is not None else f"pixels:{r.scene.image}"


def world_box(r: SceneReader, col: float, row: float, w: float, h: float) -> tuple[float, float, float, float]:
    """(xmin, ymin, xmax, ymax) of a window of the resampled grid, in the space's coordinates."""
    if r.grid.crs is None:
        return col, row, col + w, row + h
    fx, fy = r.grid.width / r.width, r.grid.height / r.height  # source pixels per resampled pixel
    xs, ys = zip(*(r.grid.transform * (c * fx, rr * fy) for c in (col, col + w) for rr in (row, row + h)))
    return min(xs), min(ys), max(xs), max(ys)


def _to_pixels(r: SceneReader, box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    """A world box as (col0, row0, col1, row1) on ``r``'s resampled grid (may lie outside the scene)."""
    if r.grid.crs is None:
        return box
    fx, fy = r.grid.width / r.width, r.grid.height / r.height
    inv = ~r.grid.transform
    cs, rs = zip(*(inv * (x, y) for x in (box[0], box[2]) for y in (box[1], box[3])))
    return min(cs) / fx, min(rs) / fy, max(cs) / fx, max(rs) / fy


def _order_key(r: SceneReader, b: Block, seed: int) -> tuple:
    """West to east, then north to south, in world coordinates; ungeoreferenced scenes in a stable shuffled order."""
    if r.grid.crs is None:
        return (1, _stable_u01(seed, r.scene.name), b.col, b.row)
    x0, y0, x1, y1 = world_box(r, b.col, b.row, b.width, b.height)
    return (0, round((x0 + x1) / 2, 6), -round((y0 + y1) / 2, 6))


def split_blocks(readers: list[SceneReader], block: int, val_fraction: float, seed: int = 0,
                 test_fraction: float = 0.0, gap: int = 0) -> list[Block]:
    """Cut every scene into ``block``-sized blocks, give each a split, and pull blocks apart by ``gap`` pixels.

    Per location, blocks are ordered west to east (world coordinates, so separate tiles of one place are
    neighbours) and cut into contiguous runs: the first ``test_fraction`` is test, the next ``val_fraction``
    validation, the rest training. Contiguous runs keep the borders between splits short. Scenes whose split is
    fixed by the layout as test (Inria's tiles 1-5) keep it. Then every block gives up ``ceil(gap / 2)`` pixels on each side that
    faces a block of another split within that distance, so no window of one split comes within ``gap`` pixels
    of a window of another; blocks left smaller than ``gap`` hold no window and are dropped.

    A location of tiles no larger than a patch (slippy-map tiles, say) can lose every test window that way: each
    of its tiles at a border gives up half a patch on each side, which leaves nothing. Where that happens, and only
    there, it is split again: validation at the east end (so it borders training, not test), its test and
    validation tiles whole, and the training tiles beside them giving up the whole gap. That costs training tiles,
    and is taken only where it gives the location test windows back: without them it could not be reported.
    """
    raw: list[Block] = []
    for i, r in enumerate(readers):
        for row in range(0, r.height, block):
            for col in range(0, r.width, block):
                raw.append(Block(i, col, row, min(block, r.width - col), min(block, r.height - row), r.scene.split or "train"))
    assigned = _assign_runs(readers, raw, val_fraction, test_fraction, seed)
    if gap <= 0:
        return assigned
    out = _pull_apart(readers, assigned, gap)
    tested = {readers[b.scene].scene.location for b in assigned if b.split == "test"}

    def without_test(blocks: list[Block]) -> frozenset[str]:
        return frozenset(tested - {readers[b.scene].scene.location for b in blocks if b.split == "test"})

    short = without_test(out)
    if not short:
        return out
    alt = _pull_apart(readers, _assign_runs(readers, raw, val_fraction, test_fraction, seed, short), gap, short)
    helped = short - without_test(alt)
    if helped == short:
        return alt
    if not helped:
        return out
    return _pull_apart(readers, _assign_runs(readers, raw, val_fraction, test_fraction, seed, helped), gap, helped)


def _assign_runs(readers: list[SceneReader], raw: list[Block], val_fraction: float, test_fraction: float, seed: int,
                 val_east: frozenset[str] = frozenset()) -> list[Block]:
    """Each location's blocks, west to east, as runs of test, validation and training (for the locations in
    ``val_east``: test, training, validation); blocks of scenes the layout holds out as test stay test."""
    by_loc: dict[str, list[Block]] = {}
    assigned: list[Block] = []
    fixed_test = set()
    for b in raw:
        if readers[b.scene].scene.split == "test":  # held out by the layout; its train scenes still give a val split
            assigned.append(b)
            fixed_test.add(readers[b.scene].scene.location)
        else:
            by_loc.setdefault(readers[b.scene].scene.location, []).append(b)
    for loc, items in by_loc.items():
        items.sort(key=lambda b: _order_key(readers[b.scene], b, seed))
        n = len(items)
        n_test = max(1, int(round(test_fraction * n))) if test_fraction > 0 and n > 2 and loc not in fixed_test else 0
        n_val = max(1, int(round(val_fraction * n))) if val_fraction > 0 and n - n_test > 1 else 0
        for j, b in enumerate(items):
            if loc in val_east:
                split = "test" if j < n_test else "val" if j >= n - n_val else "train"
            else:
                split = "test" if j < n_test else "val" if j < n_test + n_val else "train"
            assigned.append(Block(b.scene, b.col, b.row, b.width, b.height, split))
    return assigned


# which split keeps its side of a border where a location's blocks are too small to share the gap
RANK = {"test": 2, "val": 1, "train": 0}


def _pull_apart(readers: list[SceneReader], blocks: list[Block], gap: int, whole: frozenset[str] = frozenset()) -> list[Block]:
    """Shrink blocks so that blocks of different splits end at least ``gap`` pixels apart.

    At a border each side gives up half the gap. Where either block's location is in ``whole``, the
    rarer split keeps its side whole (test over validation over training) and the other gives up all of it: tiles
    no larger than a patch would otherwise lose their only window on both sides of every border.
    """
    half = -(-gap // 2)
    spaces: dict[str, list[int]] = {}
    for j, b in enumerate(blocks):
        spaces.setdefault(space_of(readers[b.scene]), []).append(j)
    world = [world_box(readers[b.scene], b.col, b.row, b.width, b.height) for b in blocks]
    locs = [readers[b.scene].scene.location for b in blocks]
    out = []
    for members in spaces.values():
        boxes = np.array([world[j] for j in members])
        splits = np.array([blocks[j].split for j in members])
        for m, j in enumerate(members):
            b = blocks[j]
            r = readers[b.scene]
            c0, r0, c1, r1 = float(b.col), float(b.row), float(b.col + b.width), float(b.row + b.height)
            # candidates: other-split blocks whose world box comes within (generously) two gaps of this one
            px = max(abs(r.grid.transform.a), abs(r.grid.transform.e)) * (r.grid.width / r.width) if r.grid.crs else 1.0
            reach = 2 * gap * px
            x0, y0, x1, y1 = world[j]
            near = np.flatnonzero((splits != b.split) & (boxes[:, 0] < x1 + reach) & (boxes[:, 2] > x0 - reach)
                                  & (boxes[:, 1] < y1 + reach) & (boxes[:, 3] > y0 - reach))
            for k in near:
                other = members[k]
                if locs[j] in whole or locs[other] in whole:
                    if RANK[b.split] > RANK[str(splits[k])]:
                        continue  # the rarer split keeps its side; the other block gives up the whole gap
                    give = gap
                else:
                    give = half  # each side gives up half
                n0, m0, n1, m1 = _to_pixels(r, tuple(boxes[k]))
                rows_meet = m0 < r1 + give and m1 > r0 - give
                cols_meet = n0 < c1 + give and n1 > c0 - give
                if rows_meet and n1 <= c0 + 0.5 and n1 > c0 - give:
                    c0 = max(c0, n1 + give)
                if rows_meet and n0 >= c1 - 0.5 and n0 < c1 + give:
                    c1 = min(c1, n0 - give)
                if cols_meet and m1 <= r0 + 0.5 and m1 > r0 - give:
                    r0 = max(r0, m1 + give)
                if cols_meet and m0 >= r1 - 0.5 and m0 < r1 + give:
                    r1 = min(r1, m0 - give)
            w, h = int(np.floor(c1 - np.ceil(c0))), int(np.floor(r1 - np.ceil(r0)))
            if (w, h) == (b.width, b.height):
                out.append(b)
            elif w >= gap and h >= gap:
                out.append(Block(b.scene, int(np.ceil(c0)), int(np.ceil(r0)), w, h, b.split))
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


def capped(refs: list[PatchRef], group: list[str], cap: int) -> list[PatchRef]:
    """At most ``cap`` of ``refs``, shared evenly over their groups (locations): a group with fewer than its share
    keeps all of them and leaves the rest to the others. Within a group the kept windows are spread evenly through
    its list (raster order, block by block), so every part of every location stays represented."""
    if len(refs) <= cap:
        return refs
    by: dict[str, list[int]] = {}
    for i, g in enumerate(group):
        by.setdefault(g, []).append(i)
    quota, left = {}, cap
    for done, g in enumerate(sorted(by, key=lambda g: len(by[g]))):  # smallest first: what it leaves goes on
        quota[g] = min(len(by[g]), left // (len(by) - done))
        left -= quota[g]
    keep = sorted(by[g][int(j)] for g in by for j in np.linspace(0, len(by[g]) - 1, quota[g]).round())
    return [refs[i] for i in keep]


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
    """Draws from a fixed list of windows (a region's share), each window equally often, each shifted at random
    by up to half a window inside the block that holds it.

    Not each location equally often: a region holds most of some locations' windows and a few strays of
    others (3 of one town's windows among 400 of a village's), and balancing by location would draw those few
    strays a third of the time each, so the expert would learn them instead of its region. The shift gives an
    expert the random crops the generalist and the single network get from :class:`BalancedSampler`: without
    it a region of 128 windows is seen as the same 128 crops a dozen times over. Half a window keeps most of
    each crop on the window the embedding assigned to the region, and the block keeps it inside its split.
    """

    def __init__(self, readers: list[SceneReader], refs: list[PatchRef], blocks: list[Block] | None = None,
                 weights: list[float] | None = None):
        if not refs:
            raise ValueError("no windows to sample from")
        self.refs = list(refs)
        # how often each window is drawn (``experts.allocation: locations``); None: each equally often
        self.p = None if weights is None else np.asarray(weights, float) / float(np.sum(weights))
        self.by_loc: dict[str, list[int]] = {}
        for j, r in enumerate(self.refs):
            self.by_loc.setdefault(readers[r.scene].scene.location, []).append(j)
        self.locations = sorted(self.by_loc)
        if blocks:
            by_scene: dict[int, list[Block]] = {}
            for b in blocks:
                by_scene.setdefault(b.scene, []).append(b)
            self.room = [_room(r, by_scene.get(r.scene, [])) for r in self.refs]
        else:
            self.room = None

    def draw(self, rng: np.random.Generator, location: str | None = None) -> PatchRef:
        idx = self.by_loc.get(location) if location is not None else None
        if idx:
            j = idx[int(rng.integers(len(idx)))]
        else:
            j = int(rng.integers(len(self.refs))) if self.p is None else int(rng.choice(len(self.refs), p=self.p))
        ref = self.refs[j]
        if self.room is None:
            return ref
        (c0, c1), (r0, r1) = self.room[j]
        return PatchRef(ref.scene, int(rng.integers(c0, c1 + 1)), int(rng.integers(r0, r1 + 1)), ref.size)


def _room(ref: PatchRef, blocks: list[Block]) -> tuple[tuple[int, int], tuple[int, int]]:
    """((col_min, col_max), (row_min, row_max)) of the window's corner: within half a window of ``ref`` and
    inside the block of ``blocks`` (its scene's) holding ``ref``; no room (the window itself) when none holds it."""
    half = ref.size // 2
    for b in blocks:
        if (b.scene == ref.scene and b.col <= ref.col and b.row <= ref.row
                and ref.col + ref.size <= b.col + b.width and ref.row + ref.size <= b.row + b.height):
            return ((max(b.col, ref.col - half), min(b.col + b.width - ref.size, ref.col + half)),
                    (max(b.row, ref.row - half), min(b.row + b.height - ref.size, ref.row + half)))
    return (ref.col, ref.col), (ref.row, ref.row)
