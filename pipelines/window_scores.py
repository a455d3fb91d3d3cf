"""Scores of each method's outputs on a batch of windows, for ``geomoe evaluate``: each window's mask cut as its
network is calibrated (watershed where there are instance channels), scored against the truth, and for the methods
users get as polygons the polygons too. Pure and free of torch: the costly part of an evaluation, so worker
processes run it while the model answers the next batch. Every score is a count, so batches add up exactly in any
order."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from geomoe.metrics import Scores
from geomoe.pipelines.calibration import Calibration
from geomoe.pipelines.footprints import as_delivered
from geomoe.pipelines.instances import footprint_mask
from geomoe.pipelines.regularise import Regularisation


@dataclass
class MethodOutputs:
    """One method's outputs on a batch: (N, C, H, W) channels (building first; boundary and contact where the
    networks have them), each window's calibration, and its smallest footprint in pixels."""

    channels: np.ndarray
    calibrations: list[Calibration]
    min_pixels: list[int]

    def mask(self, j: int) -> np.ndarray:
        """Window ``j``'s building mask as its network's calibration cuts it."""
        c = self.calibrations[j]
        return footprint_mask(self.channels[j], c.threshold, c.separation)


@dataclass
class ScoringBatch:
    """A batch of windows to score: their locations, truth (N, H, W), building ids, where data is, ground
    resolution (None: unknown), and each method's outputs; ``delivered``: the methods also scored as polygons,
    under the key ``footprints_of[method]``."""

    locations: list[str]
    truth: np.ndarray
    ids: np.ndarray
    valid: np.ndarray
    gsd: list[float | None]
    outputs: dict[str, MethodOutputs]
    footprints_of: dict[str, str]
    squaring: Regularisation | None


def score_batch(batch: ScoringBatch) -> dict[tuple[str, str], Scores]:
    """Scores by (row, location) of ``batch``: one row per method, and one per delivered method's polygons."""
    out: dict[tuple[str, str], Scores] = {}
    for m, o in batch.outputs.items():
        for j, loc in enumerate(batch.locations):
            pred, small = o.mask(j), o.min_pixels[j]
            out.setdefault((m, loc), Scores()).update(pred, batch.truth[j], batch.valid[j], min_pixels=small,
                                                      truth_ids=batch.ids[j])
            if m in batch.footprints_of:
                v = batch.valid[j].astype(bool)
                got = as_delivered(pred & v, batch.gsd[j], o.calibrations[j].min_area_m2, batch.squaring, v)
                out.setdefault((batch.footprints_of[m], loc), Scores()).update(
                    got, batch.truth[j], batch.valid[j], min_pixels=small, truth_ids=batch.ids[j])
    return out
