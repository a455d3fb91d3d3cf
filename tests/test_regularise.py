"""Regularising footprints over a pool of processes gives exactly the outlines of one call in the writer's thread."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import shapely
from rasterio.crs import CRS
from rasterio.transform import from_origin

from geomoe.config import PredictConfig
from geomoe.pipelines.footprints import Piece, pieces_to_frame
from geomoe.pipelines.regularise import balanced_chunks, regularise
from geomoe.pipelines.writers import footprint_workers

from conftest import ROOT


def test_a_pool_of_processes_regularises_real_outlines_exactly_as_one_call():
    gdf = gpd.read_file(ROOT / "sample" / "train" / "banepa" / "labels.geojson")
    gdf = gdf[gdf.geom_type == "Polygon"].iloc[:160]
    gdf = gdf.to_crs(gdf.estimate_utm_crs()).reset_index(drop=True)
    # ragged outlines, as polygonised masks give them: the regulariser has work to do
    gdf["geometry"] = gdf.geometry.buffer(0.4, quad_segs=2).simplify(0.05)
    assert len(gdf) >= 100
    one = regularise(gdf, 0.3, 0.15, False, workers=0)
    pooled = regularise(gdf, 0.3, 0.15, False, workers=2)
    assert len(pooled) == len(one) and pooled.crs == one.crs
    assert all(shapely.equals_exact(a, b, 0) for a, b in zip(one.geometry, pooled.geometry))
    assert (one.geometry.area - gdf.geometry.area).abs().mean() > 0.01  # regularising changed the outlines


def test_pieces_to_frame_with_workers_equals_in_line():
    rng = np.random.default_rng(0)
    pieces = []
    for i in range(80):  # 80 separate jagged rectangles in pixel coordinates
        x, y = (i % 10) * 30, (i // 10) * 30
        w, h = rng.integers(8, 20, 2)
        ring = [(x, y), (x + w, y), (x + w, y + h // 2), (x + w - 1, y + h // 2), (x + w - 1, y + h), (x, y + h)]
        pieces.append(Piece(shapely.Polygon(ring), int(w * h), float(w * h) * 0.9))
    args = (from_origin(500000, 4000000, 0.5, 0.5), CRS.from_epsg(32633), 0.5, 1.0, True, False,
            lambda c, r: np.zeros(len(c)))
    a = pieces_to_frame(pieces, *args, workers=0)
    b = pieces_to_frame(pieces, *args, workers=2)
    assert len(a) == len(b) == 80
    assert all(shapely.equals_exact(p, q, 0) for p, q in zip(a.geometry, b.geometry))


def test_footprint_workers_default_keeps_small_machines_in_the_writer_thread(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert footprint_workers(PredictConfig()) == 0
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert footprint_workers(PredictConfig()) == 4
    assert footprint_workers(PredictConfig(footprint_workers=3)) == 3


def test_balanced_chunks_cover_every_building_once_with_even_cost():
    cost = np.array([70000.0, 5, 8, 12, 400, 30000, 6, 9, 20000, 7, 11, 300])
    chunks = balanced_chunks(cost, 3)
    flat = np.concatenate(chunks)
    assert sorted(flat.tolist()) == list(range(len(cost)))
    assert all((np.diff(c) > 0).all() for c in chunks)  # ascending: in-line order within a chunk
    # the three large outlines go to three different chunks (in order, they would hold up one worker)
    assert all(len({0, 5, 8} & set(c.tolist())) == 1 for c in chunks)


def test_pinholes_in_a_roof_are_filled_and_a_courtyard_stays():
    # pixel coordinates at 0.5 m: a 20 x 20 m roof (40 px) with a 1 m2 pinhole and a 6 x 6 m courtyard
    roof = shapely.Polygon([(0, 0), (40, 0), (40, 40), (0, 40)],
                           [[(4, 4), (6, 4), (6, 6), (4, 6)], [(20, 20), (32, 20), (32, 32), (20, 32)]])
    args = (from_origin(500000, 4000000, 0.5, 0.5), CRS.from_epsg(32633), 0.5, 4.0, False, False,
            lambda c, r: np.zeros(len(c)))
    gdf = pieces_to_frame([Piece(roof, 1600 - 4 - 144, 1000.0)], *args)
    g = gdf.to_crs(32633).geometry.iloc[0]
    assert len(g.interiors) == 1
    assert abs(shapely.Polygon(g.interiors[0]).area - 36.0) < 1e-6
    assert abs(g.area - (400 - 36)) < 1e-6
