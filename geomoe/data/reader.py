"""Read windows of a scene (image, label, valid-data mask) on its grid resampled to a target GSD."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import geopandas as gpd
import numpy as np
import rasterio
from rasterio import features
from rasterio.enums import Resampling
from rasterio.windows import Window
from rasterio.windows import transform as window_transform
from shapely.geometry import box

from geomoe.data.catalog import MaskReading, Scene
from geomoe.metrics import truth_instances
from geomoe.raster import (
    Grid,
    RasterError,
    bit_depth,
    fill_invalid,
    ground_sampling_distance,
    grid_of,
    image_bands,
    onto_grid,
    open_raster,
    read_window,
    scale_for,
    source_window,
    target_shape,
    to_uint8,
    valid_window_mask,
)


@dataclass
class Patch:
    image: np.ndarray  # uint8 (3, H, W)
    mask: np.ndarray | None  # uint8 (H, W) in {0, 1}, None for unlabelled scenes
    valid: np.ndarray  # bool (H, W): real, labelled data (False on nodata, transparent or padded pixels)
    instances: np.ndarray | None = None  # int32 (H, W): one id (1..n) per building, 0 elsewhere; None unlabelled


@lru_cache(maxsize=8)
def vector_labels(path: str, crs_wkt: str) -> gpd.GeoDataFrame:
    """Building polygons reprojected to one image CRS; cached since many tiles share a file."""
    try:
        gdf = gpd.read_file(path)
    except Exception as e:
        raise RasterError(f"{path}: cannot be read as vector labels ({e})") from e
    if gdf.crs is None:
        raise RasterError(f"{path}: vector labels have no CRS")
    gdf = gdf[gdf.geometry.notna() & ~gdf.geometry.is_empty]
    # footprints are areas: points (building centroids) or lines in the file would be burnt in as single pixels
    areas = gdf.geometry.geom_type.isin(["Polygon", "MultiPolygon"])
    if len(gdf) and not areas.any():
        kinds = ", ".join(sorted(set(gdf.geometry.geom_type)))
        raise RasterError(f"{path}: vector labels hold no polygons ({len(gdf)} features: {kinds}); building labels "
                          "must be footprint polygons")
    gdf = gdf[areas].to_crs(crs_wkt)
    gdf.sindex  # build the spatial index once
    return gdf


def building_from(reading: MaskReading | None, raw: np.ndarray) -> int:
    """The lowest mask value that is a building. A mask not checked (``data.full_check`` off) is read as 0/1 or
    0/255 from this window's values alone."""
    if reading is None:
        return 128 if raw.max(initial=0) > 1 else 1
    return 128 if reading == "lossy" else 1


class SceneReader:
    """Windowed access to one scene at a target GSD. Opens files lazily so it pickles into workers."""

    def __init__(self, scene: Scene, target_gsd: float | None = None, use_alpha: bool = True,
                 bands: list[int] | None = None, bits: int | None = None):
        self.scene = scene
        self.target_gsd = target_gsd
        self.use_alpha = use_alpha
        self._img: rasterio.io.DatasetReader | None = None
        self._lbl: rasterio.io.DatasetReader | None = None
        with open_raster(scene.image) as ds:
            self.grid: Grid = grid_of(ds)
            self.bands, self.alpha = image_bands(ds, scene.image, bands)
            self.top = bit_depth(ds, self.bands, bits)  # values are scaled from [0, top] to 8 bits
        # a raster without a CRS takes its resolution from locations.csv (Scene.gsd_hint), so it is resampled too
        self.gsd = ground_sampling_distance(self.grid) if self.grid.crs is not None else scene.gsd_hint
        self.scale = scale_for(self.gsd, target_gsd)
        self.height, self.width = target_shape(self.grid, self.scale)
        # vector labels are the outlines; beside a mask they only tell buildings apart, so a raster with no CRS
        # (where they cannot be placed) keeps the mask's connected components
        self.outlines = scene.label if scene.label_kind == "vector" else (
            scene.outlines if self.grid.crs is not None else None)

    def __getstate__(self) -> dict:
        d = self.__dict__.copy()
        d["_img"] = d["_lbl"] = None
        return d

    def _own(self) -> None:
        """Forget handles opened by another process: a GDAL handle inherited through fork (DataLoader workers)
        shares its file position and block cache with the parent, and concurrent reads then fail to decode
        ("ZIPDecode: Decoding error")."""
        if getattr(self, "_pid", None) != os.getpid():
            self._img = self._lbl = None  # not closed: the handle belongs to the other process
            self._pid = os.getpid()

    @property
    def img(self) -> rasterio.io.DatasetReader:
        self._own()
        if self._img is None:
            self._img = open_raster(self.scene.image)
        return self._img

    @property
    def lbl(self) -> rasterio.io.DatasetReader | None:
        self._own()
        if self._lbl is None and self.scene.label_kind == "mask":
            self._lbl = open_raster(self.scene.label)
            if self.scene.mask_on_own_grid:
                self._lbl = onto_grid(self._lbl, self.grid)
        return self._lbl

    def close(self) -> None:
        for ds in (self._img, self._lbl, getattr(self._lbl, "src_dataset", None)):
            if ds is not None:
                ds.close()
        self._img = self._lbl = None

    def read(self, col: int, row: int, size: int) -> Patch:
        """A ``size`` x ``size`` patch at (col, row) of the resampled grid; parts outside are padded, invalid."""
        win = source_window(col, row, size, size, self.scale)
        hw = (size, size)
        image = to_uint8(read_window(self.img, self.bands, win, hw, Resampling.bilinear if self.scale != 1 else Resampling.nearest),
                         self.top)
        valid = valid_window_mask(self.img, win, hw, self.alpha, self.use_alpha)
        mask = instances = None
        outline_ids = self._outline_ids(win, hw) if self.outlines is not None else None
        if self.scene.label_kind == "mask":
            raw = read_window(self.lbl, [1], win, hw, Resampling.nearest, fill=0)[0]
            lvalid = valid_window_mask(self.lbl, win, hw, None, False)
            valid &= lvalid
            mask = (raw >= building_from(self.scene.mask_reading, raw)).astype(np.uint8)
            if self.scene.mask_reading == "ids" and outline_ids is None:
                outline_ids = raw.astype(np.int32)
        elif self.scene.label_kind == "vector":
            mask = (outline_ids > 0).astype(np.uint8)
        if mask is not None:
            mask[~valid] = 0
            instances = truth_instances(mask, outline_ids)[0].astype(np.int32)
        return Patch(fill_invalid(image, valid), mask, valid, instances)

    def _outline_ids(self, win: Window, hw: tuple[int, int]) -> np.ndarray:
        """int32 (H, W): the building outlines rasterised onto the window, each with its own id (0: none)."""
        if self.grid.crs is None:
            raise RasterError(f"{self.scene.image}: has no CRS, so vector labels cannot be placed on it")
        gdf = vector_labels(str(self.outlines), self.grid.crs.to_wkt())
        t = window_transform(win, self.grid.transform) @ rasterio.Affine.scale(win.width / hw[1], win.height / hw[0])
        x0, y0 = t @ (0, 0)
        x1, y1 = t @ (hw[1], hw[0])
        idx = gdf.sindex.query(box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)))
        if len(idx) == 0:
            return np.zeros(hw, np.int32)
        return features.rasterize(
            ((g, int(i) + 1) for i, g in zip(idx, gdf.geometry.iloc[idx])), out_shape=hw, transform=t, fill=0,
            dtype="int32")
