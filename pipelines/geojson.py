"""Footprints as GeoJSON (WGS84, for web maps), written in one streamed pass from the finished GPKG layer.

Appending to a GeoJSON file batch by batch is quadratic: GDAL reads the whole document back at every append, so
its time and memory grow with the footprints already written. The layer is instead read a chunk at a time,
reprojected and streamed to GDAL as Arrow batches: one write, memory flat whatever the number of footprints.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pyarrow as pa
import pyogrio

from geomoe.atomic import atomic_path
from geomoe.pipelines.geoparquet import layer_chunks


def gpkg_to_geojson(src: Path, dst: Path, layer: str = "footprints", chunk: int = 20_000) -> Path:
    """Copy ``layer`` of ``src`` to the GeoJSON file ``dst`` in EPSG:4326 (under its final name only when complete)."""
    chunks = (pa.table(gdf.to_crs("EPSG:4326").to_arrow(index=False, geometry_encoding="WKB"))
              for gdf in layer_chunks(src, layer, chunk))
    first = next(chunks)  # the schema; an empty layer still gives one (empty) chunk
    batches = itertools.chain(first.to_batches(), (b for t in chunks for b in t.cast(first.schema).to_batches()))
    with atomic_path(dst) as tmp:
        pyogrio.write_arrow(pa.RecordBatchReader.from_batches(first.schema, batches), tmp, driver="GeoJSON",
                            layer=dst.stem, geometry_name="geometry", geometry_type="Unknown", crs="EPSG:4326")
    return dst
