"""One polygon per building: a marker-based watershed on the building, boundary and contact channels.

Seeds are building pixels far from any boundary or contact; the watershed grows them over the building
probability inside the building mask (contact pixels excluded), so roofs that touch come out as separate
instances. ``separated_mask`` returns the binary mask with one-pixel cuts between instances, which the streaming
polygoniser (``pipelines/footprints.py``) turns into one polygon per building and still joins exactly across
band borders (a cut only falls between two different instances, never along a band border).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.segmentation import watershed


@dataclass(frozen=True)
class Separation:
    """How touching buildings are cut apart. Seeds are building pixels whose boundary probability is under
    ``seed_threshold`` (and contact under half of it); with ``seed_distance`` only the pixels at least that many
    pixels inside such a region stay seeds, so roofs joined by a neck the boundary channel misses still get a seed
    each. Chosen per bundle on its validation windows (``pipelines/calibrate.py``), one per expert. Either may be
    an array of the probabilities' (H, W): each pixel then is cut as the expert that ran there chose
    (:meth:`geomoe.pipelines.calibration.Calibrations.at`)."""

    seed_threshold: float | np.ndarray = 0.5
    seed_distance: float | np.ndarray = 0.0

    def columns(self, a: int, b: int) -> "Separation":
        """The separation of columns [a, b) of a band (per-pixel values sliced, single values kept)."""
        return Separation(*(v[:, a:b] if isinstance(v, np.ndarray) else v
                            for v in (self.seed_threshold, self.seed_distance)))


def building_mask(prob: np.ndarray, threshold: float | np.ndarray) -> np.ndarray:
    """The pixels instances are made of: building, and not in a contact zone (``threshold``: one value, or one per
    pixel)."""
    return (prob[0] >= threshold) & (prob[2] < 0.5)


def instance_labels(prob: np.ndarray, threshold: float | np.ndarray = 0.5, separation: Separation | None = None,
                    min_seed_pixels: int = 4) -> np.ndarray:
    """Instance labels (H, W) int32 from ``prob`` (3, H, W): building, boundary, contact probabilities."""
    sep = separation or Separation()
    building, boundary, contact = prob[0], prob[1], prob[2]
    mask = building_mask(prob, threshold)
    seeds = mask & (boundary < sep.seed_threshold) & (contact < sep.seed_threshold * 0.5)
    if np.any(sep.seed_distance > 0):  # a seed keeps its pixels that far inside (a distance of 0 keeps them all)
        seeds &= ndimage.distance_transform_edt(seeds) >= sep.seed_distance
    markers, n = ndimage.label(seeds)
    comps, n_comps = ndimage.label(mask)
    if n == 0:
        return comps.astype(np.int32)
    sizes = np.bincount(markers.ravel(), minlength=n + 1)
    small = sizes < min_seed_pixels
    small[0] = False
    markers[small[markers]] = 0
    # Only a component of the mask holding two seeds or more can be cut; every other one is a building as it is
    # (its one seed floods all of it; without a seed it stays whole). The watershed runs on those components' boxes
    # alone, most of a band being roofs with one seed or background: same instances, a fraction of the pixels.
    labels = comps.astype(np.int32)
    seeded = np.flatnonzero(markers.ravel())
    per_comp = np.bincount(comps.ravel()[seeded][np.unique(markers.ravel()[seeded], return_index=True)[1]],
                           minlength=n_comps + 1)
    next_id = n_comps + 1
    boxes = ndimage.find_objects(comps)
    for c in np.flatnonzero(per_comp >= 2):
        box = boxes[c - 1]
        inside = comps[box] == c
        ws = watershed(-building[box], np.where(inside, markers[box], 0), mask=inside)
        _, ids = np.unique(ws[inside], return_inverse=True)  # its basins, numbered after every label so far
        labels[box][inside] = ids.ravel() + next_id
        next_id += int(ids.max()) + 1
    return labels


def separated_mask(labels: np.ndarray) -> np.ndarray:
    """Binary mask of ``labels`` with the pixels where two instances meet (4-neighbours) set to background."""
    m = labels > 0
    cut = np.zeros_like(m)
    for a, b in ((labels[1:, :], labels[:-1, :]), (labels[:, 1:], labels[:, :-1])):
        meet = (a > 0) & (b > 0) & (a != b)
        if a.shape[0] != labels.shape[0]:
            cut[1:, :] |= meet
        else:
            cut[:, 1:] |= meet
    return m & ~cut


def separate(prob: np.ndarray, threshold: float | np.ndarray = 0.5, separation: Separation | None = None,
             chunk: int = 1024) -> np.ndarray:
    """``separated_mask(instance_labels(prob, ...))`` worked out in column chunks of about ``chunk`` pixels, so a
    band thousands of pixels wide costs the watershed's memory for ``chunk`` columns only.

    Chunks are cut at columns without any building pixel and each keeps that empty column: no instance, seed,
    watershed basin or cut crosses such a column, and the nearest background of every seed lies within its chunk,
    so the mask is exactly the whole band's. Where no empty column comes, a chunk grows until one does.
    """
    width = prob.shape[-1]
    if width <= chunk:
        return separated_mask(instance_labels(prob, threshold, separation))
    empty = np.flatnonzero(~building_mask(prob, threshold).any(axis=0))
    out = np.zeros(prob.shape[1:], bool)
    sep = separation or Separation()
    a = 0
    while True:
        nxt = empty[np.searchsorted(empty, a + chunk):]  # the first empty column at least ``chunk`` further on
        b = int(nxt[0]) + 1 if len(nxt) else width  # that column stays in this chunk (and starts the next)
        th = threshold[:, a:b] if isinstance(threshold, np.ndarray) else threshold
        out[:, a:b] = separated_mask(instance_labels(prob[:, :, a:b], th, sep.columns(a, b)))
        if b >= width:
            return out
        a = b - 1


def footprint_mask(prob: np.ndarray, threshold: float | np.ndarray,
                   separation: Separation | None = None) -> np.ndarray:
    """The building mask footprints come from, for a model's (C, H, W) probabilities: cut between touching
    buildings where the model has boundary and contact channels, the thresholded building channel where not."""
    return separate(prob, threshold, separation) if len(prob) >= 3 else prob[0] >= threshold
