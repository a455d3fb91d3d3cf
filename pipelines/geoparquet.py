"""Footprints as GeoParquet (the format the field uses for large vector sets), converted from the finished GPKG
layer a chunk at a time so memory does not grow with the number of footprints."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import geopandas as gpd

import pyarrow as pa
import pyarrow.parquet as pq
import pyogrio
from geopandas.io.arrow import _geopandas_to_arrow  # what GeoDataFrame.to_parquet writes, chunk by chunk here

from geomoe.atomic import atomic_path


def _geo_metadata(schema: pa.Schema) -> pa.Schema:
    """The first chunk's GeoParquet metadata, minus what only describes that chunk (bbox, geometry types)."""
    geo = json.loads(schema.metadata[b"geo"])
    for col in geo["columns"].values():
        col.pop("bbox", None)
        col["geometry_types"] = []  # "unknown" is valid GeoParquet; a union would need a pass over every chunk
    return schema.with_metadata({**schema.metadata, b"geo": json.dumps(geo).encode()})


def layer_chunks(src: Path, layer: str, chunk: int) -> Iterator[gpd.GeoDataFrame]:
    """``layer`` of ``src`` read ``chunk`` features at a time (at least one frame, empty for an empty layer, so
    its schema is known)."""
    n = pyogrio.read_info(src, layer=layer)["features"]
    for start in range(0, max(n, 1), chunk):
        yield pyogrio.read_dataframe(src, layer=layer, skip_features=start, max_features=chunk)


def gpkg_to_geoparquet(src: Path, dst: Path, layer: str = "footprints", chunk: int = 50_000) -> Path:
    """Copy ``layer`` of ``src`` to the GeoParquet file ``dst`` (under its final name only when complete)."""
    with atomic_path(dst) as tmp:
        writer = None
        try:
            for gdf in layer_chunks(src, layer, chunk):
                table = _geopandas_to_arrow(gdf, index=False)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, _geo_metadata(table.schema), compression="zstd")
                writer.write_table(table.cast(writer.schema))
        finally:
            if writer is not None:
                writer.close()
    return dst
