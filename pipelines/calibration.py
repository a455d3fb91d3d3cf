"""How a network's probabilities become footprints: threshold, watershed seeds, smallest footprint
(:class:`Calibration`), and each network's own in a bundle (:class:`Calibrations`). Chosen on validation windows by
pipelines/calibrate.py; used by prediction (pipelines/writers.py, pipelines/footprints.py) and evaluation."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np

from geomoe.pipelines.instances import Separation


@dataclass(frozen=True)
class Calibration:
    """How one model's probabilities become footprints."""

    threshold: float
    separation: Separation
    min_area_m2: float

    def key(self) -> str:
        return f"t{self.threshold:g}/s{self.separation.seed_threshold:g}/d{self.separation.seed_distance:g}" \
               f"/a{self.min_area_m2:g}"

    def as_dict(self) -> dict:
        return {"threshold": self.threshold, "separation": asdict(self.separation), "min_area_m2": self.min_area_m2}

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        return cls(float(d["threshold"]), Separation(**d["separation"]), float(d["min_area_m2"]))


@dataclass(frozen=True)
class Calibrations:
    """Each network's calibration by the id prediction gives it (experts 0..k-1, then the single network and the
    generalist, :class:`geomoe.pipelines.inference.BundleModel`); ``default`` for any other."""

    default: Calibration
    by_id: dict[int, Calibration] = field(default_factory=dict)

    def of(self, i: int) -> Calibration:
        return self.by_id.get(int(i), self.default)

    @property
    def uniform(self) -> bool:
        """True when every network is cut alike (no per-pixel lookup needed)."""
        return all(c == self.default for c in self.by_id.values())

    @property
    def least_min_area(self) -> float:
        """The smallest of the networks' smallest footprints (m2): what no footprint can be under."""
        return min([self.default.min_area_m2, *(c.min_area_m2 for c in self.by_id.values())])

    def with_min_area(self, min_area_m2: float) -> "Calibrations":
        """The same with one smallest footprint for every network (``predict --min-area``)."""
        return Calibrations(replace(self.default, min_area_m2=min_area_m2),
                            {i: replace(c, min_area_m2=min_area_m2) for i, c in self.by_id.items()})

    def _table(self, ids: np.ndarray, get) -> np.ndarray:
        """``get`` of each id's calibration, element by element (a lookup table over the ids' range: a band of
        millions of pixels costs one indexing, not a sort)."""
        lo = int(ids.min())
        vals = np.array([get(self.of(k)) for k in range(lo, int(ids.max()) + 1)], float)
        return vals[ids - lo]

    def at(self, ids: np.ndarray | None) -> tuple[float | np.ndarray, Separation]:
        """(threshold, separation) for pixels where networks ``ids`` ran: single values where one calibration
        covers them all (``ids`` None: the default), else one value per pixel."""
        if ids is None or ids.size == 0:
            return self.default.threshold, self.default.separation
        lo = int(ids.min())
        present = np.flatnonzero(np.bincount((ids - lo).ravel())) + lo
        if len({self.of(k) for k in present}) == 1:
            c = self.of(present[0])
            return c.threshold, c.separation
        return (self._table(ids, lambda c: c.threshold),
                Separation(self._table(ids, lambda c: c.separation.seed_threshold),
                           self._table(ids, lambda c: c.separation.seed_distance)))

    def min_area(self, ids: np.ndarray) -> np.ndarray:
        """The smallest footprint (m2) of each footprint, by the network that ran under it."""
        return self._table(np.asarray(ids), lambda c: c.min_area_m2) if len(ids) else np.zeros(0)
