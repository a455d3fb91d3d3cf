"""One polygon per building: a marker-based watershed on the building, boundary and contact channels.

Seeds are building pixels far from any boundary or contact; the watershed grows them over the building
probability inside the building mask (contact pixels excluded), so roofs that touch come out as separate
instances. ``separated_mask`` returns the binary mask with one-pixel cuts between instances, which the streaming
polygoniser (``pipelines/footprints.py``) turns into one polygon per building and still joins exactly across
band borders (a cut only falls between two different instances, never along a band border).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.segmentation import watershed


def instance_labels(prob: np.ndarray, threshold: float = 0.5, seed_threshold: float = 0.5,
                    min_seed_pixels: int = 4) -> np.ndarray:
    """Instance labels (H, W) int32 from ``prob`` (3, H, W): building, boundary, contact probabilities."""
    building, boundary, contact = prob[0], prob[1], prob[2]
    mask = (building >= threshold) & (contact < 0.5)
    seeds = mask & (boundary < seed_threshold) & (contact < seed_threshold * 0.5)
    markers, n = ndimage.label(seeds)
    if n == 0:
        return ndimage.label(mask)[0].astype(np.int32)
    sizes = np.bincount(markers.ravel(), minlength=n + 1)
    small = sizes < min_seed_pixels
    small[0] = False
    markers[small[markers]] = 0
    labels = watershed(-building, markers, mask=mask)
    # building pixels no seed reached (thin parts, small buildings without a seed) keep their own components
    rest, _ = ndimage.label(mask & (labels == 0))
    rest[rest > 0] += labels.max()
    return np.where(labels > 0, labels, rest).astype(np.int32)


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
