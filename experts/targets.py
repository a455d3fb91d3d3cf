"""Training targets for instance separation: building, building boundary, and contact between buildings.

The SpaceNet and Open Cities winners trained these three channels: a network that marks the narrow gaps between
neighbouring buildings lets a watershed cut touching roofs apart (``pipelines/instances.py``).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

BIG = np.iinfo(np.int32).max


def contact_zone(labels: np.ndarray, reach: int) -> np.ndarray:
    """Pixels within ``reach`` of two or more different instances (gaps and the touching edges themselves)."""
    size = 2 * reach + 1
    mx = ndimage.maximum_filter(labels, size=size, mode="constant", cval=0)
    mn = ndimage.minimum_filter(np.where(labels > 0, labels, BIG).astype(np.int32), size=size, mode="constant", cval=BIG)
    return (mx > 0) & (mn < BIG) & (mx != mn)


def building_targets(mask: np.ndarray, boundary_width: int = 2, contact_reach: int = 3) -> np.ndarray:
    """(3, H, W) float32: building, inner boundary band of each building, contact zone between buildings.

    Instances are the 4-connected components of ``mask`` (what a raster label can tell apart).
    """
    m = mask > 0
    labels, _ = ndimage.label(m)
    eroded = ndimage.binary_erosion(m, iterations=boundary_width, border_value=1)
    boundary = m & ~eroded
    contact = contact_zone(labels, contact_reach)
    return np.stack([m, boundary, contact]).astype(np.float32)
