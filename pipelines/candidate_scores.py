"""Matched, false and missed buildings of each footprint candidate on a batch of validation windows: the costly part of
choosing the footprint rules (pipelines/calibrate.py: one watershed per threshold and separation per window), pure
and free of torch, so worker processes run it beside the model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from geomoe.metrics import match_by_size, truth_instances
from geomoe.pipelines.calibration import Calibration
from geomoe.pipelines.instances import Separation, footprint_mask


@dataclass(frozen=True)
class CandidateGrid:
    """The candidates as the scoring walks them: each (threshold, separation) cut once, its smallest areas filtering
    the one labelling."""

    cuts: tuple[tuple[float, Separation], ...]
    rows: tuple[tuple[int, ...], ...]  # for each cut, its candidates' indices in ``areas`` order
    areas: tuple[float, ...]  # the smallest footprints tried (m2), ascending
    size: int  # candidates

    @classmethod
    def of(cls, cands: list[Calibration]) -> CandidateGrid:
        areas = tuple(sorted({c.min_area_m2 for c in cands}))
        index = {(c.threshold, c.separation, c.min_area_m2): n for n, c in enumerate(cands)}
        cuts = tuple(sorted({(c.threshold, c.separation) for c in cands},
                            key=lambda t: (t[0], t[1].seed_threshold, t[1].seed_distance)))
        return cls(cuts, tuple(tuple(index[(th, sep, a)] for a in areas) for th, sep in cuts), areas, len(cands))


@dataclass
class WindowBatch:
    """What scoring needs of a batch of windows: the network's channels (N, C, H, W), the truth (N, H, W), its
    building ids (N, H, W), where data is (N, H, W), each window's group (its expert, or 0) and, per window, the
    smallest areas in pixels (one per ``CandidateGrid.areas``)."""

    probs: np.ndarray
    truth: np.ndarray
    ids: np.ndarray
    valid: np.ndarray
    groups: np.ndarray
    min_pixels: list[tuple[int, ...]]


def batch_counts(grid: CandidateGrid, groups: int, batch: WindowBatch) -> np.ndarray:
    """(groups, candidates, 3) counts of matched, false and missed buildings (TP, FP, FN) on ``batch``."""
    counts = np.zeros((groups, grid.size, 3), np.int64)
    for j in range(len(batch.probs)):
        valid = batch.valid[j]
        t = truth_instances(batch.truth[j] & valid, batch.ids[j])
        for (th, sep), rows in zip(grid.cuts, grid.rows):
            counts[batch.groups[j], list(rows)] += match_by_size(footprint_mask(batch.probs[j], th, sep) & valid, t,
                                                                  batch.min_pixels[j], void=~valid)
    return counts
