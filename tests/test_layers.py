"""The footprint layer's copies made from the finished GeoPackage: GeoJSON in WGS84, streamed in chunks."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import shapely

from geomoe.pipelines.geojson import gpkg_to_geojson

from conftest import ROOT


def test_geojson_streamed_in_chunks_is_the_layer_in_wgs84(tmp_path):
    """Real Banepa outlines appended to a GPKG in batches, copied to GeoJSON in chunks smaller than a batch: every
    footprint once, in order, with its attributes, in EPSG:4326; an empty layer gives an empty, valid GeoJSON."""
    gdf = gpd.read_file(ROOT / "sample" / "train" / "banepa" / "labels.geojson").to_crs("EPSG:3857")
    gdf = gdf[gdf.geom_type == "Polygon"].reset_index(drop=True)
    gdf = gpd.GeoDataFrame({"area_m2": gdf.area.to_numpy(), "expert": np.arange(len(gdf), dtype=np.int32) % 3,
                            "mean_prob": np.linspace(0.5, 1, len(gdf)).astype(np.float32),
                            "pixels": np.arange(len(gdf))}, geometry=gdf.geometry.to_numpy(), crs=gdf.crs)
    src = tmp_path / "f.gpkg"
    for part in np.array_split(np.arange(len(gdf)), 3):
        gdf.iloc[part].to_file(src, driver="GPKG", layer="footprints", append=src.exists(), engine="pyogrio")
    out = gpkg_to_geojson(src, tmp_path / "f.geojson", chunk=37)
    got, want = gpd.read_file(out), gdf.to_crs("EPSG:4326")
    assert len(got) == len(want) > 37 * 2 and got.crs == "EPSG:4326"
    assert got.pixels.tolist() == want.pixels.tolist() and got.expert.tolist() == want.expert.tolist()
    assert all(shapely.equals_exact(a, b, 1e-9) for a, b in zip(got.geometry, want.geometry))
    empty = tmp_path / "e.gpkg"
    gdf.iloc[:0].to_file(empty, driver="GPKG", layer="footprints")
    e = gpd.read_file(gpkg_to_geojson(empty, tmp_path / "e.geojson"))
    assert len(e) == 0 and e.crs == "EPSG:4326"
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind
