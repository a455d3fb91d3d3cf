"""Footprints as GeoJSON (WGS84, for web maps), written in one streamed pass from the finished GPKG layer.

Appending to a GeoJSON file batch by batch is quadratic: GDAL reads the whole document back at every append, so
its time and memory grow with the footprints already written. The layer is instead read a chunk at a time,
reprojected and streamed to GDAL as Arrow batches: one write, memory flat whatever the number of footprints.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyogrio

from geomoe.atomic import atomic_path


def gpkg_to_geojson(src: Path, dst: Path, layer: str = "footprints", chunk: int = 20_000) -> Path:
    """Copy ``layer`` of ``src`` to the GeoJSON file ``dst`` in EPSG:4326 (under its final name only when complete)."""
    n = pyogrio.read_info(src, layer=layer)["features"]
    first = pyogrio.read_dataframe(src, layer=layer, max_features=min(max(n, 1), chunk)).to_crs("EPSG:4326")
    schema = first.to_arrow(index=False, geometry_encoding="WKB")
    schema = pa.table(schema).schema

    def batches() -> Iterator[pa.RecordBatch]:
        for start in range(0, n, chunk):
            gdf = first if start == 0 else pyogrio.read_dataframe(src, layer=layer, skip_features=start,
                                                                  max_features=chunk).to_crs("EPSG:4326")
            yield from pa.table(gdf.to_arrow(index=False, geometry_encoding="WKB")).cast(schema).to_batches()

    with atomic_path(dst) as tmp:
        pyogrio.write_arrow(pa.RecordBatchReader.from_batches(schema, batches()), tmp, driver="GeoJSON",
                            layer=dst.stem, geometry_name=first.geometry.name, geometry_type="Unknown", crs="EPSG:4326")
    return dst
