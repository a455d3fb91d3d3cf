"""Tiles of one grid as one scene: a GDAL VRT over them, so prediction sees the whole area at once.

Folders of map tiles (slippy-map tiles, orthophoto sheets) cut buildings at every tile border; predicted tile by
tile, each cut building comes out as two or four footprints and routing cannot look at a tile's neighbours. A VRT
stitches the tiles without copying a pixel: GDAL reads each window from the tiles under it, so memory and disk do
not grow with the mosaic. Gaps between tiles (a missing tile, an irregular block) are nodata: the VRT's mask is
each tile's own mask placed where the tile lies, and nothing where no tile does.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import rasterio
from rasterio import dtypes
from rasterio.crs import CRS
from rasterio.transform import Affine

from geomoe.atomic import atomic_path
from geomoe.raster import RasterError, explain

# a tile whose corner falls further than this from the mosaic's pixel grid is not on that grid
GRID_TOLERANCE_PX = 0.01


@dataclass(frozen=True)
class TileInfo:
    """What a tile must share with the others to join a mosaic, and where it lies."""

    path: Path
    width: int
    height: int
    crs: CRS
    transform: Affine
    count: int
    dtypes: tuple[str, ...]
    colorinterp: tuple[str, ...]
    block: tuple[int, int]  # (width, height) of band 1's blocks


def tile_info(path: Path) -> TileInfo:
    """Read a tile's header; a tile that cannot join a mosaic raises :class:`RasterError` naming it."""
    try:
        with rasterio.open(path) as ds:
            if ds.crs is None:
                raise RasterError(f"{path}: no CRS; a mosaic needs georeferenced tiles (predict them without --mosaic)")
            t = ds.transform
            if t.b != 0 or t.d != 0 or t.e >= 0:
                raise RasterError(f"{path}: rotated or south-up geotransform; a mosaic needs north-up tiles")
            bh, bw = ds.block_shapes[0]
            return TileInfo(path, ds.width, ds.height, ds.crs, t, ds.count, tuple(ds.dtypes),
                            tuple(ci.name for ci in ds.colorinterp), (bw, bh))
    except RasterError:
        raise
    except Exception as e:  # noqa: BLE001 - GDAL's own reason, with the file named
        raise RasterError(explain(e, path)) from e


@dataclass(frozen=True)
class MosaicGrid:
    """The grid the tiles share: CRS, pixel size, the mosaic's transform and size, and each tile's offset on it."""

    crs: CRS
    transform: Affine
    width: int
    height: int
    offsets: tuple[tuple[int, int], ...]  # (col, row) of each tile's top-left pixel


def mosaic_grid(tiles: list[TileInfo]) -> MosaicGrid:
    """The common grid of ``tiles``: all of one CRS, pixel size, band count and data type, and aligned on one pixel
    grid (map tiles of one zoom level are); the first tile that is not names itself and what differs."""
    if not tiles:
        raise RasterError("no tiles to mosaic")
    ref = tiles[0]
    rx, ry = ref.transform.a, -ref.transform.e
    for t in tiles[1:]:
        what = None
        if t.crs != ref.crs:
            what = f"CRS {t.crs.to_string()} differs from {ref.crs.to_string()} of {ref.path.name}"
        elif not (math.isclose(t.transform.a, rx, rel_tol=1e-6) and math.isclose(-t.transform.e, ry, rel_tol=1e-6)):
            what = f"pixel size {t.transform.a:g} x {-t.transform.e:g} differs from {rx:g} x {ry:g} of {ref.path.name}"
        elif t.count != ref.count or t.dtypes != ref.dtypes:
            what = (f"{t.count} bands of {t.dtypes[0]} differ from {ref.count} bands of {ref.dtypes[0]} of "
                    f"{ref.path.name}")
        if what:
            raise RasterError(f"{t.path}: {what}; a mosaic needs tiles of one grid (predict them without --mosaic)")
    x0 = min(t.transform.c for t in tiles)
    y0 = max(t.transform.f for t in tiles)
    offsets = []
    for t in tiles:
        col, row = (t.transform.c - x0) / rx, (y0 - t.transform.f) / ry
        if abs(col - round(col)) > GRID_TOLERANCE_PX or abs(row - round(row)) > GRID_TOLERANCE_PX:
            raise RasterError(f"{t.path}: its corner falls between pixels of {ref.path.name}'s grid "
                              f"({col:.3f}, {row:.3f}); a mosaic needs tiles on one pixel grid")
        offsets.append((round(col), round(row)))
    width = max(c + t.width for (c, _), t in zip(offsets, tiles))
    height = max(r + t.height for (_, r), t in zip(offsets, tiles))
    return MosaicGrid(ref.crs, Affine(rx, 0, x0, 0, -ry, y0), width, height, tuple(offsets))


def _source(parent: ET.Element, tile: TileInfo, band: str, dtype: str, at: tuple[int, int]) -> None:
    s = ET.SubElement(parent, "SimpleSource")
    ET.SubElement(s, "SourceFilename", relativeToVRT="0").text = str(tile.path.resolve())
    ET.SubElement(s, "SourceBand").text = band
    # the tile's size and blocks, so GDAL opens a tile only when a read reaches it, not every tile on open
    ET.SubElement(s, "SourceProperties", RasterXSize=str(tile.width), RasterYSize=str(tile.height), DataType=dtype,
                  BlockXSize=str(tile.block[0]), BlockYSize=str(tile.block[1]))
    ET.SubElement(s, "SrcRect", xOff="0", yOff="0", xSize=str(tile.width), ySize=str(tile.height))
    ET.SubElement(s, "DstRect", xOff=str(at[0]), yOff=str(at[1]), xSize=str(tile.width), ySize=str(tile.height))


def mosaic_vrt(tiles: list[TileInfo], grid: MosaicGrid) -> str:
    """The VRT document of ``tiles`` on ``grid``: each band from the tiles' bands, and a dataset mask from the
    tiles' masks (nodata where no tile lies)."""
    root = ET.Element("VRTDataset", rasterXSize=str(grid.width), rasterYSize=str(grid.height))
    ET.SubElement(root, "SRS").text = grid.crs.to_wkt()
    t = grid.transform
    ET.SubElement(root, "GeoTransform").text = ", ".join(repr(float(v)) for v in (t.c, t.a, t.b, t.f, t.d, t.e))
    ref = tiles[0]
    for b in range(ref.count):
        dtype = dtypes.typename_fwd[dtypes.dtype_rev[ref.dtypes[b]]]  # GDAL's name of the type
        band = ET.SubElement(root, "VRTRasterBand", dataType=dtype, band=str(b + 1))
        if ref.colorinterp[b] not in ("undefined",):
            ET.SubElement(band, "ColorInterp").text = ref.colorinterp[b].capitalize()
        for tile, at in zip(tiles, grid.offsets):
            _source(band, tile, str(b + 1), dtype, at)
    mask = ET.SubElement(ET.SubElement(root, "MaskBand"), "VRTRasterBand", dataType="Byte")
    for tile, at in zip(tiles, grid.offsets):
        _source(mask, tile, "mask,1", "Byte", at)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode") + "\n"


def write_mosaic(paths: list[Path], dst: Path) -> Path:
    """Write the VRT of the tiles ``paths`` to ``dst`` (sorted, so the same tiles give the same file). An unchanged
    VRT is left as it is: its modification time is what ``predict --resume`` recognises a finished scene by."""
    tiles = [tile_info(p) for p in sorted(paths, key=lambda p: str(p.resolve()))]
    doc = mosaic_vrt(tiles, mosaic_grid(tiles))
    if dst.exists() and dst.read_text() == doc:
        return dst
    with atomic_path(dst) as tmp:
        tmp.write_text(doc)
    return dst
