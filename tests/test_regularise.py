"""Regularising footprints over a pool of processes gives exactly the outlines of one call in the writer's thread."""

from __future__ import annotations

from dataclasses import replace

import geopandas as gpd
import numpy as np
import shapely
from rasterio.crs import CRS
from rasterio.transform import from_origin

from geomoe.config import PredictConfig
from geomoe.pipelines.footprints import FrameSpec, Piece, pieces_to_frame
from geomoe.pipelines.regularise import (Regularisation, balanced_chunks, outline_iou, regularise,
                                         without_staircase)
from geomoe.pipelines.writers import footprint_workers

from conftest import ROOT


def _banepa_labels(n: int, crs: str, res: float = 0.15):
    """The first ``n`` of the sample's Banepa roofs rasterised at ``res`` in ``crs``, one id each: (ids, transform)."""
    from rasterio import features

    gdf = gpd.read_file(ROOT / "sample" / "train" / "banepa" / "labels.geojson").to_crs(crs)
    gdf = gdf[gdf.geom_type == "Polygon"].iloc[:n]
    x0, y0, x1, y1 = gdf.total_bounds
    t = from_origin(x0, y1, res, res)
    w, h = int((x1 - x0) / res) + 1, int((y1 - y0) / res) + 1
    return features.rasterize(((g, i + 1) for i, g in enumerate(gdf.geometry)), (h, w), transform=t,
                              dtype="int32"), t


def test_worker_processes_make_real_footprints_exactly_as_the_writer_thread():
    """Real Banepa outlines as pixel pieces (staircase rings, as polygonised masks give them): georeferencing,
    measuring, filtering and regularising in chunks over worker processes gives exactly the one-thread frame."""
    from rasterio import features
    from shapely.geometry import shape

    labels, t = _banepa_labels(160, "EPSG:3857")
    pieces = [Piece(shape(g), int((labels == v).sum()), float((labels == v).sum()))
              for g, v in features.shapes(labels, mask=labels > 0, connectivity=4)]
    assert len(pieces) >= 100
    spec = FrameSpec(t, CRS.from_epsg(3857), 0.15, 2.0, Regularisation.of(PredictConfig()))
    one = pieces_to_frame(pieces, spec, workers=0)
    pooled = pieces_to_frame(pieces, spec, workers=2)
    assert len(pooled) == len(one) >= 100 and pooled.crs == one.crs
    assert all(shapely.equals_exact(a, b, 0) for a, b in zip(one.geometry, pooled.geometry))
    assert one.drop(columns="geometry").equals(pooled.drop(columns="geometry"))
    raw = pieces_to_frame(pieces, replace(spec, regularize=None), workers=0)
    assert (one.area_m2.to_numpy() - raw.area_m2.to_numpy()).std() > 0.01  # regularising changed the outlines


def test_fine_rasters_are_squared_at_the_ground_tolerance_not_at_one_pixel():
    """Real Banepa outlines rasterised at 0.15 m (what a 0.15 m model's mask gives): squared at the default ground
    tolerance (0.25 m) a footprint keeps a handful of corners, at one pixel (0.15 m) it keeps the mask's wobble; on
    a coarse 1 m raster the floor of one pixel rules, so both settings give the same outlines."""
    from rasterio import features
    from shapely.geometry import shape

    gdf = gpd.read_file(ROOT / "sample" / "train" / "banepa" / "labels.geojson").to_crs("EPSG:3857")
    gdf = gdf[gdf.geom_type == "Polygon"].iloc[:60]
    x0, y0, x1, y1 = gdf.total_bounds

    def squared(res: float, reg: Regularisation):
        t = from_origin(x0, y1, res, res)
        w, h = int((x1 - x0) / res) + 1, int((y1 - y0) / res) + 1
        labels = features.rasterize(((g, i + 1) for i, g in enumerate(gdf.geometry)), (h, w), transform=t,
                                    dtype="int32")
        pieces = [Piece(shape(g), int((labels == v).sum()), 1.0)
                  for g, v in features.shapes(labels, mask=labels > 0, connectivity=4)]
        out = pieces_to_frame(pieces, FrameSpec(t, CRS.from_epsg(3857), res, 2.0, reg))
        return out, np.median(shapely.get_num_coordinates(out.geometry.to_numpy()))

    fine, corners = squared(0.15, Regularisation.of(PredictConfig()))
    wobbly, staircase = squared(0.15, Regularisation(False, tolerance_m=0.15, parallel_m=0.3))
    assert len(fine) == len(wobbly) >= 40
    assert corners <= 12 and staircase >= 2 * corners
    assert abs(fine.area_m2.sum() / wobbly.area_m2.sum() - 1) < 0.03  # squarer, not smaller
    coarse, _ = squared(1.0, Regularisation.of(PredictConfig()))
    floor, _ = squared(1.0, Regularisation(PredictConfig().allow_diagonals, tolerance_m=0.1, parallel_m=0.2,
                                          min_iou=PredictConfig().regularize_min_iou))
    assert all(shapely.equals_exact(a, b, 0) for a, b in zip(coarse.geometry, floor.geometry))


def test_pieces_to_frame_with_workers_equals_in_line():
    rng = np.random.default_rng(0)
    pieces = []
    for i in range(80):  # 80 separate jagged rectangles in pixel coordinates
        x, y = (i % 10) * 30, (i // 10) * 30
        w, h = rng.integers(8, 20, 2)
        ring = [(x, y), (x + w, y), (x + w, y + h // 2), (x + w - 1, y + h // 2), (x + w - 1, y + h), (x, y + h)]
        pieces.append(Piece(shapely.Polygon(ring), int(w * h), float(w * h) * 0.9))
    spec = FrameSpec(from_origin(500000, 4000000, 0.5, 0.5), CRS.from_epsg(32633), 0.5, 1.0,
                     Regularisation.of(PredictConfig()))
    a = pieces_to_frame(pieces, spec, workers=0)
    b = pieces_to_frame(pieces, spec, workers=2)
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
    spec = FrameSpec(from_origin(500000, 4000000, 0.5, 0.5), CRS.from_epsg(32633), 0.5, 4.0, None)
    gdf = pieces_to_frame([Piece(roof, 1600 - 4 - 144, 1000.0)], spec)
    g = gdf.to_crs(32633).geometry.iloc[0]
    assert len(g.interiors) == 1
    assert abs(shapely.Polygon(g.interiors[0]).area - 36.0) < 1e-6
    assert abs(g.area - (400 - 36)) < 1e-6


# a footprint the Banepa mosaic gave (a 0.13 m pixel outline in UTM metres, shifted to the origin) which the
# regulariser splits into the roof and a sliver of a few hundred square centimetres
_SPLIT_BY_THE_REGULARISER = [
    (0.994, 3.022), (0.996, 3.154), (1.26, 3.15), (1.257, 2.887), (1.39, 2.886), (1.391, 3.017),
    (1.523, 3.016), (1.525, 3.147), (1.79, 3.144), (1.788, 3.012), (2.185, 3.008), (2.184, 2.876),
    (2.316, 2.875), (2.314, 2.743), (2.447, 2.741), (2.445, 2.61), (2.71, 2.606), (2.708, 2.475),
    (2.973, 2.472), (2.971, 2.34), (3.104, 2.338), (3.102, 2.207), (3.631, 2.2), (3.633, 2.332),
    (3.765, 2.331), (3.764, 2.199), (4.293, 2.193), (4.29, 1.929), (4.422, 1.928), (4.421, 1.796),
    (4.818, 1.791), (4.814, 1.528), (5.079, 1.525), (5.077, 1.393), (5.342, 1.39), (5.344, 1.522),
    (5.476, 1.52), (5.478, 1.652), (5.742, 1.649), (5.744, 1.78), (5.876, 1.779), (5.878, 1.91),
    (6.01, 1.909), (6.008, 1.777), (6.141, 1.775), (6.139, 1.644), (5.875, 1.647), (5.865, 0.857),
    (5.733, 0.859), (5.731, 0.727), (5.467, 0.73), (5.463, 0.467), (4.669, 0.477), (4.668, 0.345),
    (4.271, 0.35), (4.272, 0.481), (4.14, 0.483), (4.143, 0.746), (3.746, 0.751), (3.749, 1.014),
    (3.485, 1.017), (3.49, 1.412), (2.96, 1.419), (2.962, 1.55), (2.565, 1.555), (2.568, 1.818),
    (2.436, 1.82), (2.437, 1.951), (2.305, 1.953), (2.306, 2.085), (2.042, 2.088), (2.043, 2.22),
    (1.382, 2.227), (1.386, 2.622), (1.122, 2.626), (1.126, 3.02), (0.994, 3.022),
]


def test_an_outline_the_regulariser_splits_stays_one_footprint_its_largest_part():
    from geomoe.pipelines.regularise import regularise_frame

    roof = shapely.Polygon(_SPLIT_BY_THE_REGULARISER)
    gdf = gpd.GeoDataFrame({"expert": [0, 1]}, geometry=[roof, shapely.box(20, 20, 26, 25)], crs="EPSG:32645")
    raw = regularise_frame(gdf.assign(_order=[0, 1]), 0.264, 0.132, False)
    assert (raw._order == 0).sum() == 2  # the regulariser alone gives this building two rows
    out = regularise(gdf, 0.264, 0.132, False)
    assert len(out) == 2 and out.expert.tolist() == [0, 1]  # one row per building, in order
    assert abs(out.geometry.iloc[0].area - raw[raw._order == 0].area.max()) < 1e-9
    assert out.geometry.iloc[0].area > 0.9 * roof.area


def test_a_building_the_regulariser_loses_keeps_its_raw_outline():
    from geomoe.pipelines.regularise import one_per_building

    work = gpd.GeoDataFrame({"expert": [3, 4]}, geometry=[shapely.box(0, 0, 5, 5), shapely.box(10, 0, 14, 6)])
    parts = gpd.GeoDataFrame({"_order": [0, 1]}, geometry=[shapely.box(0, 0, 5, 4.9), shapely.Polygon()])
    out = one_per_building(work, parts)
    assert out.expert.tolist() == [3, 4] and "_order" not in out
    assert out.geometry.iloc[0].equals(shapely.box(0, 0, 5, 4.9)) and out.geometry.iloc[1].equals(work.geometry.iloc[1])


def _pixel_outline(g: shapely.Polygon, res: float = 0.15) -> shapely.Polygon:
    """``g`` as a mask at ``res`` metres outlines it: a staircase ring."""
    from rasterio import features
    from shapely.geometry import shape

    x0, y0, x1, y1 = g.bounds
    t = from_origin(x0 - 1, y1 + 1, res, res)
    m = features.rasterize([(g, 1)], (int((y1 - y0 + 2) / res), int((x1 - x0 + 2) / res)), transform=t, dtype="uint8")
    return max((shape(p) for p, _ in features.shapes(m, mask=m > 0, transform=t)), key=lambda p: p.area)


def test_a_squared_outline_that_strays_from_the_mask_gives_way_to_the_simplified_outline():
    """Masks at 0.15 m of a house turned 20 degrees, a wedge, a round tank and an L-shaped block. Squared at the
    defaults, some no longer cover what the mask found (IoU with it under 0.9); with the guard those come out as
    the mask's outline simplified at the tolerance, the others as squared, and every footprint stays within the
    guard of its mask."""
    from shapely.affinity import rotate

    shapes = [rotate(shapely.box(0, 0, 10, 7), 20, origin=(0, 0)), shapely.Polygon([(0, 0), (12, 0), (0, 7)]),
              shapely.Point(0, 0).buffer(4), shapely.Polygon([(0, 0), (9, 0), (9, 3), (4, 3), (5, 8), (0, 8)])]
    gdf = gpd.GeoDataFrame({"n": range(4)}, geometry=[_pixel_outline(s) for s in shapes], crs="EPSG:32645")
    squared = regularise(gdf, 1.0, 0.5, False)
    guarded = regularise(gdf, 1.0, 0.5, False, min_iou=0.9)

    def iou(a, b):
        i = shapely.area(shapely.intersection(a, b))
        return i / (shapely.area(a) + shapely.area(b) - i)

    raw = gdf.geometry.to_numpy()
    strayed = iou(raw, squared.geometry.to_numpy()) < 0.9
    assert 0 < strayed.sum() < len(gdf)  # both kinds are here
    out = guarded.geometry.to_numpy()
    assert guarded.n.tolist() == [0, 1, 2, 3]
    assert (iou(raw, out) >= 0.9).all()
    for k in range(len(gdf)):
        want = shapely.simplify(raw[k], 0.5) if strayed[k] else squared.geometry.iloc[k]
        assert shapely.equals_exact(out[k], want, 0)
    assert (shapely.get_num_coordinates(out[strayed]) < shapely.get_num_coordinates(raw[strayed]) / 4).all()
    assert squared.squared.all() and guarded.squared.tolist() == (~strayed).tolist()  # a user can tell them apart
    assert all(shapely.equals_exact(a, b, 0) for a, b in zip(regularise(gdf, 1.0, 0.5, False, min_iou=0).geometry,
                                                              squared.geometry))


def test_the_pixel_staircase_goes_before_squaring_and_no_footprint_moves_for_it():
    """Real Banepa roofs rasterised at 0.15 m and polygonised (a step per pixel wherever an edge is not aligned with
    the raster): taken out at one pixel, the staircase leaves a fifth of the vertices or fewer and no outline moves
    by more than that pixel; squared and guarded from those outlines, the footprints are those squared from the
    staircases (the same buildings, as many squared, half of the outlines identical and none off by more than the
    guard)."""
    from rasterio import features
    from shapely.geometry import shape

    labels, t = _banepa_labels(80, "EPSG:32645")
    outlines = gpd.GeoDataFrame(geometry=[shape(g) for g, _ in features.shapes(labels, mask=labels > 0,
                                                                                transform=t)], crs="EPSG:32645")
    outlines = outlines[outlines.area > 4].reset_index(drop=True)
    raw = outlines.geometry.to_numpy()
    smooth = without_staircase(raw, 0.15)
    assert len(raw) >= 60
    assert shapely.get_num_coordinates(smooth).sum() * 5 <= shapely.get_num_coordinates(raw).sum()
    assert max(shapely.hausdorff_distance(a, b) for a, b in zip(raw, smooth)) <= 0.15 + 1e-9
    stairs = regularise(outlines, 1.0, 0.5, False, min_iou=0.9)
    cut = regularise(outlines, 1.0, 0.5, False, min_iou=0.9, pixel=0.15)
    assert len(cut) == len(stairs) and cut.squared.sum() >= 0.9 * stairs.squared.sum()
    same = outline_iou(stairs.geometry.to_numpy(), cut.geometry.to_numpy())
    assert same.min() > 0.9 and np.median(same) > 0.99  # the few that differ: squared one way, simplified the other
