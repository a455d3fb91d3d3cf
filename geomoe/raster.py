"""Raster geometry and windowed reads: ground sampling distance, grids, resampled windows."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import RasterioIOError
from rasterio.transform import Affine, array_bounds
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform as warp_transform
from rasterio.warp import transform_bounds
from rasterio.windows import Window

EARTH_RADIUS_M = 6378137.0  # WGS84 semi-major axis, the sphere Web Mercator uses


# rasterio warns on every open of a file without a georeference; geomoe checks for that itself and reports it once
# per dataset ("170 images have no CRS, e.g. ..."), so the per-file warning only buries the summary.
warnings.filterwarnings("ignore", category=rasterio.errors.NotGeoreferencedWarning)


class RasterError(ValueError):
    """A raster that cannot be used, with the file named in the message."""


@dataclass(frozen=True)
class Grid:
    """The pixel grid of a raster: enough to compare image and mask, and to compute GSD."""

    width: int
    height: int
    crs: CRS | None
    transform: Affine

    @property
    def center_lonlat(self) -> tuple[float, float] | None:
        if self.crs is None:
            return None
        x, y = self.transform @ (self.width / 2, self.height / 2)
        if self.crs.is_geographic:
            return float(x), float(y)
        lon, lat = warp_transform(self.crs, "EPSG:4326", [x], [y])
        return float(lon[0]), float(lat[0])


def grid_of(ds: rasterio.io.DatasetReader) -> Grid:
    return Grid(ds.width, ds.height, ds.crs, ds.transform)


def explain(e: BaseException, path: str | Path | None = None) -> str:
    """One line for an error: the file it concerns, and GDAL's own reason instead of rasterio's
    "See previous exception for details"."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    cause = e.__cause__ or e.__context__
    if "previous exception" in msg and cause is not None:
        msg = msg.replace("See previous exception for details.", "").strip() + f" ({str(cause).strip().splitlines()[0]})"
    if isinstance(e, OSError) and getattr(e, "filename", None) and str(e.filename) not in msg:
        msg = f"{e.filename}: {msg}"
    if not isinstance(e, (ValueError, rasterio.errors.RasterioError)):  # name the kind: OSError, MemoryError ...
        msg = f"{type(e).__name__}: {msg}"
    if path is not None and str(path) not in msg:
        msg = f"{path}: {msg}"
    return msg


def is_mercator(crs) -> bool:
    """Web Mercator and other Mercator projections, by EPSG code or by projection method (WKT without a code)."""
    if crs.to_epsg() in (3857, 900913, 3785, 102100, 3395):
        return True
    try:
        return crs.to_dict().get("proj") == "merc"
    except Exception:  # noqa: BLE001 - some WKT cannot be expressed as PROJ parameters
        return "mercator" in crs.to_wkt().lower()


def ground_sampling_distance(grid: Grid) -> float | None:
    """True ground size of one pixel in metres (mean of x and y), or None without a CRS.

    Projected CRSs use their linear unit; Web Mercator is scaled by cos(latitude) at the scene
    centre, since its metres are only true at the equator; geographic CRSs convert degrees to
    metres on the WGS84 sphere at the centre latitude.
    """
    if grid.crs is None:
        return None
    rx = math.hypot(grid.transform.a, grid.transform.d)
    ry = math.hypot(grid.transform.b, grid.transform.e)
    lonlat = grid.center_lonlat
    assert lonlat is not None
    coslat = math.cos(math.radians(lonlat[1]))
    if grid.crs.is_geographic:
        deg = math.pi / 180.0 * EARTH_RADIUS_M
        return float((rx * deg * coslat + ry * deg) / 2)
    unit = grid.crs.linear_units_factor[1] if grid.crs.linear_units_factor else 1.0
    gsd = (rx + ry) / 2 * unit
    if is_mercator(grid.crs):
        gsd *= coslat
    return float(gsd)


def open_raster(path: str | Path) -> rasterio.io.DatasetReader:
    """Open a raster, turning GDAL's errors into one naming the file."""
    try:
        return rasterio.open(path)
    except RasterioIOError as e:
        raise RasterError(f"{path}: cannot be read as a raster ({e})") from e


def covered_share(grid: Grid, other: Grid) -> float:
    """The share of ``grid``'s extent that ``other`` (georeferenced too) covers, by their bounding boxes."""
    x0, y0, x1, y1 = array_bounds(grid.height, grid.width, grid.transform)
    ox0, oy0, ox1, oy1 = transform_bounds(other.crs, grid.crs, *array_bounds(other.height, other.width, other.transform),
                                          densify_pts=21)
    w, h = min(x1, ox1) - max(x0, ox0), min(y1, oy1) - max(y0, oy0)
    return max(w, 0) * max(h, 0) / ((x1 - x0) * (y1 - y0))


def onto_grid(ds: rasterio.io.DatasetReader, grid: Grid) -> WarpedVRT:
    """``ds`` read on ``grid`` (nearest neighbour: labels keep their values); pixels it does not cover are masked."""
    return WarpedVRT(ds, crs=grid.crs, transform=grid.transform, width=grid.width, height=grid.height,
                     resampling=Resampling.nearest, add_alpha=True)


def scale_for(native_gsd: float | None, target_gsd: float | None) -> float:
    """Source pixels per target pixel (1.0 when either GSD is unknown or no target is set)."""
    if native_gsd is None or target_gsd is None:
        return 1.0
    return target_gsd / native_gsd


def target_shape(grid: Grid, scale: float) -> tuple[int, int]:
    """(height, width) of a raster once resampled by ``scale`` source pixels per output pixel."""
    return max(1, round(grid.height / scale)), max(1, round(grid.width / scale))


def source_window(col: int, row: int, w: int, h: int, scale: float) -> Window:
    """The source window covering a window of the resampled grid."""
    return Window(col * scale, row * scale, w * scale, h * scale)


def image_bands(ds: rasterio.io.DatasetReader, path: Path | str, select: list[int] | None = None) -> tuple[list[int], int | None]:
    """Band indexes to read as RGB, and the alpha band if any.

    ``select`` (1-based, three bands) picks them from multispectral imagery. Single-band rasters are replicated
    to three bands (with a warning); RGBA's fourth band is returned separately so it can mark valid data. Only a
    band the file declares alpha is one: a fourth band it does not (NAIP's and most 4-band sensors' near infrared)
    is left unread, with a warning, instead of blanking every pixel where it is dark.
    """
    n = ds.count
    interp = [ci.name for ci in ds.colorinterp]
    alpha = interp.index("alpha") + 1 if "alpha" in interp else None
    if n == 4 and alpha is None and not select:
        warnings.warn(f"{path}: 4 bands, the fourth not marked alpha: read as red, green, blue and an unused band "
                      f"(another order: data.bands or --bands)", stacklevel=2)
    if select:
        bad = [b for b in select if not 1 <= b <= n]
        if len(select) != 3 or bad:
            raise RasterError(f"{path}: bands {select} asked for; give three band numbers between 1 and {n}")
        return list(select), alpha
    if n == 1:
        warnings.warn(f"{path}: single-band image, replicated to 3 bands", stacklevel=2)
        return [1, 1, 1], None
    if n == 2:
        raise RasterError(f"{path}: 2 bands; expected RGB, RGBA or a single band")
    if n > 4 and alpha is None:
        raise RasterError(f"{path}: {n} bands; choose the red, green and blue ones with data.bands (e.g. [3, 2, 1]) "
                          f"or --bands 3,2,1")
    return [1, 2, 3], alpha


def bit_depth(ds: rasterio.io.DatasetReader, bands: list[int], given: int | None = None) -> float:
    """The largest value the image's bands can hold: from ``given`` bits, the NBITS tag, the data type, or for
    16-bit and float data the values themselves (11- and 12-bit sensors store uint16; reflectance is 0-1 float).

    Every read divides by it and multiplies by 255, so 8-bit, 12-bit and reflectance copies of one scene look the
    same to the models, in training, evaluation and prediction alike.
    """
    if given:
        return float(2 ** given - 1)
    nbits = ds.tags(bands[0], ns="IMAGE_STRUCTURE").get("NBITS")
    if nbits:
        return float(2 ** int(nbits) - 1)
    dt = np.dtype(ds.dtypes[bands[0] - 1])
    if dt == np.uint8:
        return 255.0
    # a decimated read of the whole raster is enough to find the range the sensor used
    h, w = min(ds.height, 512), min(ds.width, 512)
    sample = ds.read(sorted(set(bands)), out_shape=(len(set(bands)), h, w), resampling=Resampling.nearest, masked=True)
    top = float(sample.max()) if sample.count() else 255.0
    if dt.kind == "f":
        return 1.0 if top <= 1.5 else 255.0 if top <= 255 else float(2 ** math.ceil(math.log2(top + 1)) - 1)
    if top <= 255:
        return 255.0
    return float(2 ** max(8, min(16, math.ceil(math.log2(top + 1)))) - 1)


def to_uint8(image: np.ndarray, top: float) -> np.ndarray:
    """Scale values in [0, top] to uint8 [0, 255] (identity for 8-bit data)."""
    if image.dtype == np.uint8 and top == 255.0:
        return image
    return np.clip(np.asarray(image, np.float32) * (255.0 / top) + 0.5, 0, 255).astype(np.uint8)


def _inside(ds: rasterio.io.DatasetReader, window: Window, out_hw: tuple[int, int]):
    """The part of ``window`` inside the raster, and the output rows and columns it fills (None if none)."""
    h, w = out_hw
    sx, sy = window.width / w, window.height / h  # source pixels per output pixel
    c0, r0 = max(window.col_off, 0), max(window.row_off, 0)
    c1, r1 = min(window.col_off + window.width, ds.width), min(window.row_off + window.height, ds.height)
    if c1 <= c0 or r1 <= r0:
        return None
    oc0, oc1 = round((c0 - window.col_off) / sx), round((c1 - window.col_off) / sx)
    or0, or1 = round((r0 - window.row_off) / sy), round((r1 - window.row_off) / sy)
    oc0, or0 = min(max(oc0, 0), w), min(max(or0, 0), h)
    oc1, or1 = min(max(oc1, oc0), w), min(max(or1, or0), h)
    if oc1 == oc0 or or1 == or0:
        return None
    return Window(c0, r0, c1 - c0, r1 - r0), slice(or0, or1), slice(oc0, oc1)


def read_window(
    ds: rasterio.io.DatasetReader,
    indexes: list[int] | int,
    window: Window,
    out_hw: tuple[int, int],
    resampling: Resampling,
    fill: float = 0,
) -> np.ndarray:
    """Read ``window`` (may extend past the edges) into an array of ``out_hw``, padding with ``fill``.

    Only the part inside the raster is read, in pixel space: rasterio's boundless reads go through a warped VRT,
    which resamples rasters whose geotransform has rotation or shear (shifting their pixels) and is slower.
    """
    idx = [indexes] if isinstance(indexes, int) else list(indexes)
    out = np.full((len(idx), *out_hw), fill, dtype=ds.dtypes[idx[0] - 1])
    part = _inside(ds, window, out_hw)
    if part is not None:
        win, rows, cols = part
        out[:, rows, cols] = ds.read(idx, window=win, out_shape=(len(idx), rows.stop - rows.start, cols.stop - cols.start),
                                     resampling=resampling)
    return out[0] if isinstance(indexes, int) else out


def fill_invalid(image: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Give every invalid pixel (outside the raster, nodata, transparent) the value of the nearest valid one.

    Training and prediction both complete patches this way, so a tile at a raster edge or next to a nodata border
    looks to the model like the inside of a scene rather than a black frame (which it reads as roofs or shadows).
    """
    if valid.all() or not valid.any():
        return image
    from scipy import ndimage

    _, (iy, ix) = ndimage.distance_transform_edt(~valid, return_indices=True)
    return image[:, iy, ix]


def valid_window_mask(
    ds: rasterio.io.DatasetReader,
    window: Window,
    out_hw: tuple[int, int],
    alpha: int | None,
    use_alpha: bool,
) -> np.ndarray:
    """Boolean mask of pixels with real data: inside the raster, not nodata, not transparent."""
    valid = np.zeros(out_hw, bool)  # outside the raster: invalid
    part = _inside(ds, window, out_hw)
    if part is None:
        return valid
    win, rows, cols = part
    shape = (rows.stop - rows.start, cols.stop - cols.start)
    inner = ds.read_masks(1, window=win, out_shape=shape, resampling=Resampling.nearest) > 0
    if alpha is not None and use_alpha:
        inner &= ds.read(alpha, window=win, out_shape=shape, resampling=Resampling.nearest) > 0
    valid[rows, cols] = inner
    return valid
