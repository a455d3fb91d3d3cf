"""Choose how probabilities become footprints on the bundle's validation windows, never on the test split.

Three choices decide the footprints a user gets: the probability threshold, how touching buildings are cut apart
(the watershed's seeds, pipelines/instances.py, depend on how sure the boundary channel is, which varies with how
long and on what the experts trained) and the smallest footprint kept (undertrained experts leave specks that cost
building F1). Every combination is scored by building F1 at IoU 0.5 on the validation windows: the routed experts'
outputs for the experts, the single network's for the single network (so the baseline is not judged with the
experts' choice). The experts' choice goes into the bundle's manifest, which ``predict`` and ``evaluate`` use; the
single network's is used by ``evaluate`` for its row.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from geomoe.bundle import Bundle, BundlePaths, save_manifest
from geomoe.config import load_config
from geomoe.data.datasets import GridDataset, Prepared
from geomoe.metrics import match_by_size, truth_instances
from geomoe.pipelines.evaluate import _channels, min_pixels, route_windows
from geomoe.pipelines.instances import Separation, footprint_mask

log = logging.getLogger(__name__)

# the defaults first: on a tie they stay
# The grid reaches past the choices it used to make: on seeds 0.3 / 0..8 px and areas 1..4 x, every medium bundle
# chose the largest distance, the largest area and the lower seed threshold (validation F1 still rising at the
# edge), so the grid goes on to 0.2, 16 px and 8 x.
SEPARATIONS = tuple(Separation(s, d) for s in (0.5, 0.3, 0.2) for d in (0.0, 2.0, 4.0, 6.0, 8.0, 12.0, 16.0))
THRESHOLD_STEPS = (0.0, -0.1, 0.1)  # around the configured threshold
AREA_FACTORS = (1.0, 2.0, 4.0, 8.0)  # times the configured smallest footprint (4 m2 -> 8, 16, 32 m2: sheds, not specks)


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


def candidates(threshold: float, min_area_m2: float, instances: bool = True) -> list[Calibration]:
    """Every combination tried, the configured one first (once each: a smallest footprint of 0 has no multiples).
    Models without boundary and contact channels (``instances`` False) have no watershed to choose."""
    seps = SEPARATIONS if instances else (Separation(),)
    out = [Calibration(float(np.clip(round(threshold + dt, 3), 0.05, 0.95)), s, min_area_m2 * a)
           for dt, s, a in itertools.product(THRESHOLD_STEPS, seps, AREA_FACTORS)]
    return list(dict.fromkeys(out))


def _probs(bundle: Bundle, which: str, images: torch.Tensor, ids: np.ndarray) -> np.ndarray:
    """(N, C, H, W) probabilities of the routed experts or the single network: the building channel, then boundary
    and contact where the models have them."""
    models = [bundle.baseline] if which == "single" else bundle.experts
    ids = np.zeros(len(images), np.int64) if which == "single" else ids
    out = np.zeros((len(images), 3 if models[0].classes >= 3 else 1, *images.shape[2:]), np.float32)
    for e in np.unique(ids):
        sel = np.flatnonzero(ids == e)
        p, aux = _channels(models[e], images[sel], bundle.device, bundle.config.predict.tta)
        out[sel] = (torch.cat([p[:, None], aux], 1) if aux is not None else p[:, None]).numpy()
    return out


def validation_f1(bundle: Bundle, prep: Prepared, refs: list, cands: list[Calibration], which: str = "experts",
                  batch_size: int = 8, progress: bool = True) -> list[float]:
    """Building F1 at IoU 0.5 on ``refs`` of each candidate, scored window by window (no window's outputs are kept,
    so memory does not grow with the validation set). ``which``: "experts" (routed) or "single"."""
    routes = route_windows(bundle, prep, refs, batch_size, progress=False) if which == "experts" else None
    counts = np.zeros((len(cands), 3), np.int64)  # TP, FP, FN
    areas = sorted({c.min_area_m2 for c in cands})
    cuts = {(c.threshold, c.separation) for c in cands}
    index = {(c.threshold, c.separation, c.min_area_m2): n for n, c in enumerate(cands)}
    rows = {(th, sep): [index[(th, sep, a)] for a in areas] for th, sep in cuts}
    for b in tqdm(DataLoader(GridDataset(prep, refs), batch_size=batch_size), unit="batch", disable=not progress,
                  desc=f"calibrating footprints ({which})"):
        i = b["index"].numpy()
        probs = _probs(bundle, which, b["image"], routes.ids[i] if routes is not None else i)
        truth, valid, ids = b["mask"].numpy() > 0, b["valid"].numpy().astype(bool), b["instances"].numpy()
        for j, k in enumerate(i):
            t = truth_instances(truth[j] & valid[j], ids[j])
            px = tuple(min_pixels(prep.readers[refs[k].scene], a) for a in areas)
            for th, sep in cuts:  # one watershed and one labelling per threshold and separation; areas filter it
                counts[rows[(th, sep)]] += match_by_size(footprint_mask(probs[j], th, sep) & valid[j], t, px,
                                                          void=~valid[j])
    tp, fp, fn = counts.T
    denom = 2 * tp + fp + fn
    return [float(2 * a / d) if d else 0.0 for a, d in zip(tp, denom)]


def choose(bundle: Bundle, prep: Prepared, refs: list, which: str, progress: bool) -> tuple[Calibration, dict]:
    """The best candidate for ``which`` and every candidate's validation F1."""
    cfg = load_config(BundlePaths(bundle.root).config)  # as trained, not as calibrated before
    model = bundle.baseline if which == "single" else bundle.experts[0]
    cands = candidates(cfg.experts.threshold, cfg.predict.min_area_m2, instances=model.classes >= 3)
    scores = validation_f1(bundle, prep, refs, cands, which, progress=progress)
    best = cands[int(np.argmax(scores))]  # the first of equals: the configured values stay on a tie
    log.info("%s: footprints from threshold %.2f, seeds %.2f / %.0f px, smallest %g m2: validation building F1 "
             "%.4f (configured values %.4f)", which, best.threshold, best.separation.seed_threshold,
             best.separation.seed_distance, best.min_area_m2, max(scores), scores[0])
    return best, {c.key(): round(f, 4) for c, f in zip(cands, scores)}


def calibrate(bundle: Bundle, prep: Prepared, progress: bool = True) -> Calibration | None:
    """Choose the experts' (and the single network's) calibration on the validation windows and write it into
    ``bundle``'s manifest; None (nothing written) when there are no validation windows."""
    refs = prep.windows("val")
    if not refs:
        log.warning("no validation windows: threshold, separation and smallest footprint left as configured")
        return None
    best, tried = choose(bundle, prep, refs, "experts", progress)
    m = bundle.manifest
    m.update(threshold=best.threshold, separation=asdict(best.separation), min_area_m2=best.min_area_m2)
    m["calibration"] = {"experts": {"validation_f1": tried}}  # the choice itself is the fields above
    if bundle.baseline is not None:
        single, tried = choose(bundle, prep, refs, "single", progress)
        m["calibration"]["single"] = {**single.as_dict(), "validation_f1": tried}
    m.pop("separation_validation_f1", None)  # written by earlier versions
    save_manifest(bundle.root, m)
    return best
