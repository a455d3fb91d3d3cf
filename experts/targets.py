"""Training targets for instance separation: building, building boundary, and contact between buildings.

The SpaceNet and Open Cities winners trained these three channels: a network that marks the narrow gaps between
neighbouring buildings lets a watershed cut touching roofs apart (``pipelines/instances.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

BIG = np.iinfo(np.int32).max
BOUNDARY_PX, CONTACT_PX = 2, 3  # the widths in pixels, and their floor when they are given on the ground


@dataclass(frozen=True)
class TargetWidths:
    """How wide the boundary band and the contact reach are, in metres on the ground (``experts.boundary_m``,
    ``experts.contact_m``), never under 2 and 3 pixels; None: those pixel widths at every resolution.

    In pixels alone the targets meant different things at each location: 3 pixels of contact reach are 1.6 m at
    0.54 m but 0.4 m at 0.13 m, where the gaps between the houses of a dense town (a metre or two) never got a
    contact target, and the watershed had nothing to cut them apart along."""

    boundary_m: float | None = None
    contact_m: float | None = None

    def pixels(self, gsd: float | None) -> tuple[int, int]:
        """(boundary width, contact reach) in pixels of ``gsd`` metres (None: resolution unknown, the floors)."""
        def px(m: float | None, floor: int) -> int:
            return floor if m is None or not gsd else max(floor, int(round(m / gsd)))

        return px(self.boundary_m, BOUNDARY_PX), px(self.contact_m, CONTACT_PX)


def contact_zone(labels: np.ndarray, reach: int) -> np.ndarray:
    """Pixels within ``reach`` of two or more different instances (gaps and the touching edges themselves)."""
    size = 2 * reach + 1
    mx = ndimage.maximum_filter(labels, size=size, mode="constant", cval=0)
    mn = ndimage.minimum_filter(np.where(labels > 0, labels, BIG).astype(np.int32), size=size, mode="constant", cval=BIG)
    return (mx > 0) & (mn < BIG) & (mx != mn)


def building_targets(mask: np.ndarray, boundary_width: int = BOUNDARY_PX, contact_reach: int = CONTACT_PX,
                     instances: np.ndarray | None = None) -> np.ndarray:
    """(3, H, W) float32: building, inner boundary band of each building, contact zone between buildings.

    Buildings are ``instances`` (one id each, from the location's outlines), so row houses that share a wall get
    a boundary and a contact zone along it; without them, the 4-connected components of ``mask`` (all a 0/255
    raster can tell apart).
    """
    m = mask > 0
    labels = ndimage.label(m)[0] if instances is None else np.where(m, instances, 0).astype(np.int32)
    eroded = ndimage.binary_erosion(m, iterations=boundary_width, border_value=1)
    boundary = m & ~eroded
    if instances is not None:  # a shared wall is boundary of both buildings, though inside the mask
        reach = ndimage.iterate_structure(ndimage.generate_binary_structure(2, 1), boundary_width)
        hi = ndimage.grey_dilation(labels, footprint=reach, mode="nearest")
        lo = ndimage.grey_erosion(np.where(labels > 0, labels, BIG).astype(np.int32), footprint=reach, mode="nearest")
        boundary |= m & ((hi > labels) | (lo < labels))
    contact = contact_zone(labels, contact_reach)
    return np.stack([m, boundary, contact]).astype(np.float32)
