"""Segmentation metrics, accumulated over all pixels of a location (the paper's cumulative IoU)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage


def _boundary(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels of ``mask`` within ``width`` of its edge (inner boundary band)."""
    eroded = ndimage.binary_erosion(mask, iterations=width, border_value=1)
    return mask & ~eroded


def truth_instances(truth: np.ndarray, instances: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """(labels 1..n, n): the true buildings of ``truth``. ``instances`` (one id per building, from the outlines) keeps
    touching buildings apart; without it they are the mask's connected components, as a 0/255 raster tells them.
    Building pixels no outline covers become buildings of their own (their connected components)."""
    truth = truth.astype(bool)
    if instances is None:
        return ndimage.label(truth)
    ids = np.where(truth, instances, 0).astype(np.int64)
    rest, n_rest = ndimage.label(truth & (ids == 0))
    if n_rest:
        ids = np.where(rest > 0, rest + ids.max(), ids)
    uniq, inv = np.unique(ids, return_inverse=True)
    inv = inv.reshape(ids.shape).astype(np.int32)
    if len(uniq) and uniq[0] != 0:  # every pixel a building: no 0 to take the first slot
        inv += 1
    return inv, int((uniq != 0).sum())


def match_buildings(pred: np.ndarray, truth: np.ndarray, iou: float = 0.5,
                    instances: np.ndarray | None = None) -> tuple[int, int, int]:
    """(TP, FP, FN) of building instances: SpaceNet's rule, one-to-one at IoU >= ``iou``. Predicted buildings are
    connected components; true ones as :func:`truth_instances` tells them."""
    return tuple(int(v) for v in match_by_size(pred, truth_instances(truth, instances), (0,), iou)[0])


# A piece on the edge of a window (or a scene) may be a building the edge cuts, of any size: it is held against a
# quarter of the smallest footprint (prediction's ``min_area_m2``), the margin below which pieces are specks. Chosen
# on session 14's validation windows: sparing edge pieces entirely raised the footprints' IoU (0.4778 -> 0.4820) but
# cost building F1 (0.2684 -> 0.2496: slivers); a quarter gives 0.4819 and 0.2714.
EDGE_FACTOR = 4


def held_size(size: np.ndarray, on_edge: np.ndarray) -> np.ndarray:
    """What each piece's ``size`` (pixels or m2) is held against the smallest footprint as: on the edge, four times
    it (:data:`EDGE_FACTOR`). The one rule for prediction, evaluation and calibration."""
    return size * np.where(on_edge, EDGE_FACTOR, 1)


def touch_void(labels: np.ndarray, n: int, void: np.ndarray | None) -> np.ndarray:
    """Which of ``labels``' components 1..n (index 0 unused) touch a ``void`` pixel (4-neighbours): nodata inside a
    raster (a collar, a skipped tile) ends what was seen as a scene's edge does, so a building there may be cut."""
    out = np.zeros(n + 1, bool)
    if void is None or n == 0 or not void.any():
        return out
    out[np.unique(labels[ndimage.binary_dilation(void) & ~void])] = True
    out[0] = False
    return out

# Why a true building fails to match at IoU 0.5, and footprints that touch no building (:func:`footprint_errors`)
ERRORS = ("matched", "missed", "merged", "split", "partial", "outline", "false")
ERRORS_LEGEND = ("matched: IoU >= 0.5; missed: under 20 % covered; merged: one footprint over several buildings; "
                 "split: several footprints over one; partial: under half covered; outline: covered, outline too far "
                 "off; false: footprints on no building")


@dataclass(frozen=True)
class Overlaps:
    """A prediction's buildings (connected components) against the true ones: their areas (label 0, background,
    counted but in no pair), the (pred, truth) pairs that overlap and their shared pixels. Labelled and counted
    once for both building F1's matching and the error counts."""

    n_p: int
    n_t: int
    area_p: np.ndarray
    area_t: np.ndarray
    keys: np.ndarray  # (pairs, 2): pred label, truth label
    counts: np.ndarray  # (pairs,)
    size_p: np.ndarray  # what each predicted building's area is held against the smallest footprint as (held_size)

    @classmethod
    def of(cls, pred: np.ndarray, truth_labels: tuple[np.ndarray, int],
           void: np.ndarray | None = None) -> "Overlaps":
        """``void``: the window's nodata, whose border is an edge as the window's is."""
        lp, n_p = ndimage.label(pred)
        lt, n_t = truth_labels
        keys, counts = np.zeros((0, 2), np.int64), np.zeros(0, np.int64)
        if n_p and n_t:
            pairs = np.stack([lp.ravel(), lt.ravel()], 1)
            pairs = pairs[(pairs[:, 0] > 0) & (pairs[:, 1] > 0)]
            if len(pairs):
                keys, counts = np.unique(pairs, axis=0, return_counts=True)
        area_p = np.bincount(lp.ravel(), minlength=n_p + 1)
        return cls(n_p, n_t, area_p, np.bincount(lt.ravel(), minlength=n_t + 1), keys, counts,
                   _held_sizes(lp, area_p, void))

    def match(self, min_pixels: tuple[int, ...], iou: float = 0.5) -> np.ndarray:
        """(TP, FP, FN) rows, one per entry of ``min_pixels``: predicted buildings under it are left out, those on the
        window's edge (or its nodata's) under a quarter of it (dropping a component changes no other, and no other pair's IoU)."""
        area_p, area_t, size = self.area_p, self.area_t, self.size_p
        out = np.zeros((len(min_pixels), 3), np.int64)
        cands = sorted(((c / (area_p[a] + area_t[b] - c), int(a), int(b)) for (a, b), c in zip(self.keys, self.counts)),
                       reverse=True)
        for row, px in enumerate(min_pixels):
            used_p, used_t, tp = set(), set(), 0
            for v, a, b in cands:
                if v < iou:
                    break
                if size[a] >= px and a not in used_p and b not in used_t:
                    used_p.add(a)
                    used_t.add(b)
                    tp += 1
            out[row] = tp, int((size[1:] >= px).sum()) - tp, self.n_t - tp
        return out

    def errors(self, iou: float = 0.5) -> np.ndarray:
        """:func:`footprint_errors` of these overlaps."""
        area_p, area_t, keys, counts = self.area_p, self.area_t, self.keys, self.counts
        out = dict.fromkeys(ERRORS, 0)
        p_on_truth = np.bincount(keys[:, 0], weights=counts, minlength=self.n_p + 1) if len(keys) \
            else np.zeros(self.n_p + 1)
        out["false"] = int((p_on_truth[1:] == 0).sum())
        by_truth: dict[int, list[tuple[int, int]]] = {}
        for (a, b), c in zip(keys.tolist(), counts.tolist()):
            by_truth.setdefault(b, []).append((a, c))
        for b in range(1, self.n_t + 1):
            over = by_truth.get(b, [])
            covered = sum(c for _, c in over)
            a, c = max(over, key=lambda x: x[1]) if over else (0, 0)
            if over and c / (area_p[a] + area_t[b] - c) >= iou:
                out["matched"] += 1
            elif covered < 0.2 * area_t[b]:
                out["missed"] += 1
            elif sum(1 for _, x in over if x >= 0.2 * area_t[b]) >= 2:
                out["split"] += 1
            elif p_on_truth[a] - c >= 0.3 * c:
                out["merged"] += 1
            elif c < 0.5 * area_t[b]:
                out["partial"] += 1
            else:
                out["outline"] += 1
        return np.array([out[k] for k in ERRORS], np.int64)


def match_by_size(pred: np.ndarray, truth_labels: tuple[np.ndarray, int], min_pixels: tuple[int, ...],
                  iou: float = 0.5, void: np.ndarray | None = None) -> np.ndarray:
    """(TP, FP, FN) rows, one per entry of ``min_pixels``: ``match_buildings(drop_small(pred, px, void), truth)`` for
    each ``px`` from one labelling (dropping a component changes no other, and no other pair's IoU)."""
    return Overlaps.of(pred, truth_labels, void).match(min_pixels, iou)


def footprint_errors(pred: np.ndarray, truth_labels: tuple[np.ndarray, int], iou: float = 0.5) -> np.ndarray:
    """Counts in :data:`ERRORS` order: each true building once, as the first that holds of

    - matched: one footprint overlaps it at IoU >= ``iou`` (building F1's true positives);
    - missed: footprints cover under 20 % of it;
    - split: two footprints or more each cover at least 20 % of it;
    - merged: its main footprint also covers other true buildings, at least 30 % as many of their pixels as of its;
    - partial: its main footprint covers under half of it (shifted, or too small);
    - outline: covered, but the outline is too far off (too large, wrong shape);

    and false: predicted footprints that touch no true building. What a mapper needs to know of a low building F1:
    blobs over dense blocks (merged) ask for better separation, missed buildings for recall, partial ones often
    for labels that are offset from the roofs.
    """
    return Overlaps.of(pred, truth_labels).errors(iou)


def _held_sizes(labels: np.ndarray, areas: np.ndarray, void: np.ndarray | None = None) -> np.ndarray:
    """:func:`held_size` of each label's pixel count ``areas``, the labels on the border of ``labels`` or touching
    ``void`` on the edge (a window, or nodata, cuts buildings as a scene's edge does)."""
    edge = touch_void(labels, len(areas) - 1, void)
    edge[np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))] = True
    return held_size(areas, edge)


def drop_small(mask: np.ndarray, min_pixels: int, void: np.ndarray | None = None) -> np.ndarray:
    """``mask`` without its connected components (4-neighbours) of fewer than ``min_pixels`` pixels, or on its border
    (or ``void``'s, its nodata) of fewer than a quarter of them (:data:`EDGE_FACTOR`): a window cuts buildings as a
    scene's edge does, and prediction keeps a scene's edge pieces so."""
    if min_pixels <= 1:
        return mask
    lab, n = ndimage.label(mask)
    if n == 0:
        return mask
    keep = _held_sizes(lab, np.bincount(lab.ravel(), minlength=n + 1), void) >= min_pixels
    keep[0] = False
    return keep[lab]


@dataclass
class Scores:
    """Running pixel counts (and building and boundary counts) for one location and one method."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0
    b_tp: int = 0
    b_fp: int = 0
    b_fn: int = 0
    bd_inter: int = 0
    bd_union: int = 0
    patches: int = 0
    errors: np.ndarray = field(default_factory=lambda: np.zeros(len(ERRORS), np.int64))  # footprint_errors, summed

    def update(self, pred: np.ndarray, truth: np.ndarray, valid: np.ndarray | None = None, boundary_px: int = 2,
               instances: bool = True, min_pixels: int = 0, truth_ids: np.ndarray | None = None) -> None:
        """Add one patch; ``instances=False`` counts pixels only (cheap enough for every training epoch).
        ``truth_ids``: one id per true building (see :func:`truth_instances`).

        Pixel figures score the mask as predicted; building F1 and boundary IoU score its buildings as footprints
        come of them, so predicted buildings under ``min_pixels`` (prediction's ``min_area_m2``) are dropped for them
        first. (The polygons themselves, squared, are scored by passing them rasterised back: evaluate's
        ``*_footprints`` rows.)
        """
        pred, truth = pred.astype(bool), truth.astype(bool)
        v = np.ones_like(pred) if valid is None else valid.astype(bool)
        p, t = pred & v, truth & v
        self.tp += int((p & t).sum())
        self.fp += int((p & ~t).sum())
        self.fn += int((~p & t & v).sum())
        self.tn += int((~pred & ~truth & v).sum())
        self.patches += 1
        if not instances:
            return
        void = None if valid is None else ~v
        p = drop_small(p, min_pixels, void)
        ov = Overlaps.of(p, truth_instances(t, truth_ids), void)  # one labelling for the matching and the error counts
        (a, b, c), = ov.match((0,))
        self.b_tp, self.b_fp, self.b_fn = self.b_tp + int(a), self.b_fp + int(b), self.b_fn + int(c)
        self.errors = self.errors + ov.errors()
        bp, bt = _boundary(p, boundary_px), _boundary(t, boundary_px)
        self.bd_inter += int((bp & bt).sum())
        self.bd_union += int((bp | bt).sum())

    def __iadd__(self, o: "Scores") -> "Scores":
        for k in ("tp", "fp", "fn", "tn", "b_tp", "b_fp", "b_fn", "bd_inter", "bd_union", "patches", "errors"):
            setattr(self, k, getattr(self, k) + getattr(o, k))
        return self

    @staticmethod
    def _div(a: float, b: float) -> float:
        return a / b if b else float("nan")

    def summary(self) -> dict[str, float]:
        prec = self._div(self.tp, self.tp + self.fp)
        rec = self._div(self.tp, self.tp + self.fn)
        return {
            "iou": self._div(self.tp, self.tp + self.fp + self.fn),
            "accuracy": self._div(self.tp + self.tn, self.tp + self.tn + self.fp + self.fn),
            "precision": prec,
            "recall": rec,
            "f1": self._div(2 * self.tp, 2 * self.tp + self.fp + self.fn),
            # 0 when buildings exist but none matches; undefined (NaN) only with no building on either side
            "building_f1": self._div(2 * self.b_tp, 2 * self.b_tp + self.b_fp + self.b_fn),
            "boundary_iou": self._div(self.bd_inter, self.bd_union),
        }

    def error_counts(self) -> dict[str, int]:
        """True buildings by what became of them, and false footprints (:func:`footprint_errors`), with the
        number of true buildings as ``buildings``."""
        return {"buildings": int(self.errors[:-1].sum()), **{k: int(v) for k, v in zip(ERRORS, self.errors)}}
