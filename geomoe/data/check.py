"""Validate a catalogue scene by scene, block by block, and summarise it per location."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from rasterio.enums import ColorInterp
from rasterio.errors import RasterioError
from tqdm import tqdm

from geomoe.data.catalog import Catalog, MaskReading, Problem, Scene
from geomoe.data.reader import SceneReader, vector_labels
from geomoe.raster import Grid, RasterError, covered_share, ground_sampling_distance, grid_of, open_raster


@dataclass
class SceneReport:
    scene: Scene
    ok: bool
    width: int = 0
    height: int = 0
    gsd: float | None = None
    crs: str | None = None
    building_pixels: int = 0
    labelled_pixels: int = 0


@dataclass
class LocationSummary:
    location: str
    images: int = 0
    labelled: int = 0
    usable: int = 0
    building_fraction: float = float("nan")
    gsd: list[float] = field(default_factory=list)
    crs: set[str] = field(default_factory=set)
    sizes: set[str] = field(default_factory=set)
    problems: int = 0
    outlines: bool = False  # buildings told apart by outlines (labels.geojson), not only by the mask's components
    ids: bool = False  # ... or by the mask's building ids


def mask_reading(values: dict[int, int]) -> tuple[MaskReading, str | None]:
    """How a mask is read, from its values and their pixel counts, and a line saying so where that is not plain
    0/1/255. Most of a lossy 0/255 mask's buildings stay near 255 and the compression adds a thin fringe of values
    between; an instance mask spreads its buildings over many values (and an 8-bit one rarely reaches 200)."""
    nz = {v: c for v, c in values.items() if v}
    if len(nz) <= 1 or set(nz) <= {1, 255}:
        return "binary", None
    near_top = sum(c for v, c in nz.items() if v >= 192)
    if 200 <= max(nz) <= 255 and near_top >= sum(nz.values()) / 2:
        return "lossy", ("mask has values between 0 and 255 (lossy compression or smoothing): read as building "
                         "where 128 or more")
    # one line for every such mask (no count in it), so that the check's summary groups them
    return "ids", ("mask has several building values: each read as the id of one building (touching buildings "
                   "kept apart); if they are classes, not buildings, write 0/255 masks")


MIN_COVER = 0.5  # a mask covering less of its image than this is likely another image's


def _misfit(gi: Grid, gl: Grid, image: str) -> str:
    """What differs between an image's grid and its mask's, in words."""
    if (gi.width, gi.height) != (gl.width, gl.height):
        return f"size {gl.width}x{gl.height} differs from image {image} ({gi.width}x{gi.height})"
    if gi.crs != gl.crs:
        return f"CRS {gl.crs} differs from image {image} ({gi.crs})"
    return f"transform differs from image {image}: grids are not aligned"


def _mask_stats(scene: Scene, problems: list[Problem], full: bool = True) -> tuple[int, int] | None:
    """(building, labelled) pixel counts of a mask raster, read block by block; None if the mask is bad."""
    with open_raster(scene.image) as img, open_raster(scene.label) as lbl:
        gi, gl = grid_of(img), grid_of(lbl)
        same_size = (gi.width, gi.height) == (gl.width, gl.height)
        # a mask with no georeferencing at all (a plain PNG or JPEG beside a GeoTIFF) of the image's size is on the
        # image's pixel grid: the reader reads both in pixels
        plain = same_size and gl.crs is None and gl.transform.is_identity
        aligned = same_size and gi.crs == gl.crs and gi.transform.almost_equals(gl.transform, precision=1e-6)
        if not (aligned or plain):
            if gi.crs is None or gl.crs is None:  # no georeference to place one on the other
                problems.append(Problem(scene.label, _misfit(gi, gl, scene.image.name)))
                return None
            # both georeferenced: placed by their georeference, as a GIS (or torchgeo) lays one layer on another
            share = covered_share(gi, gl)
            if share < MIN_COVER:
                problems.append(Problem(scene.label, f"covers {100 * share:.0f} % of image {scene.image.name} "
                                        f"({_misfit(gi, gl, scene.image.name)})"))
                return None
            scene.mask_on_own_grid = True
            problems.append(Problem(scene.label, "mask on a grid of its own: read onto its image's grid "
                                    "(nearest neighbour) where it covers it", fatal=False))
        # a grey mask saved as RGB or RGBA (as image editors and many PNG writers do) is its first band; a mask
        # whose colour bands differ is a colour map, which says nothing of which colour is a building
        colour = [b for b in range(1, lbl.count + 1) if lbl.colorinterp[b - 1] != ColorInterp.alpha]
        if len(colour) not in (1, 3):
            problems.append(Problem(scene.label, f"mask has {lbl.count} bands; expected 1"))
            return None
        if not full:
            return 0, 0
        counts: dict[float, int] = {}
        labelled = 0
        for _, win in lbl.block_windows(1):
            data = lbl.read(1, window=win, masked=True)
            if len(colour) == 3 and (lbl.read(colour[1:], window=win) != data.data).any():
                problems.append(Problem(scene.label, "mask is in colour (its red, green and blue differ): expected "
                                                     "one band, 0 background and 1 or 255 building"))
                return None
            vals, n = np.unique(data.compressed(), return_counts=True)
            for v, c in zip(vals.tolist(), n.tolist()):
                counts[v] = counts.get(v, 0) + c
            labelled += int(data.count())
        bad = [v for v in counts if v < 0 or v != int(v)]
        if bad:
            shown = ", ".join(f"{v:g}" for v in sorted(bad)[:5])
            problems.append(Problem(scene.label, f"mask has negative or fractional values ({shown}): expected 0 for "
                                                 "background and 1 or 255 for buildings, or one id per building"))
            return None
        values = {int(v): c for v, c in counts.items()}
        scene.mask_reading, note = mask_reading(values)
        if note:
            problems.append(Problem(scene.label, note, fatal=False))
        low = 128 if scene.mask_reading == "lossy" else 1
        return sum(c for v, c in values.items() if v >= low), labelled


def check_scene(scene: Scene, problems: list[Problem], full: bool = True) -> SceneReport:
    """Check ``scene``, appending what is wrong to ``problems``.

    ``full`` reads every block (finds truncated files and bad mask values and counts building
    pixels); otherwise only headers and grids are compared, which is fast enough before training.
    """
    try:
        with open_raster(scene.image) as ds:
            grid = grid_of(ds)
            gsd = ground_sampling_distance(grid) if ds.crs is not None else scene.gsd_hint
            rep = SceneReport(scene, False, ds.width, ds.height, gsd, str(ds.crs) if ds.crs else None)
            if ds.count == 2 or ds.count == 0:
                problems.append(Problem(scene.image, f"{ds.count} bands; expected RGB, RGBA or a single band"))
                return rep
            if ds.count == 1:
                problems.append(Problem(scene.image, "single band: will be replicated to 3 bands", fatal=False))
            if ds.crs is None:
                problems.append(Problem(scene.image, "no CRS: pixel coordinates only, " + (
                    f"GSD {scene.gsd_hint} m from locations.csv" if scene.gsd_hint else "GSD unknown (add gsd_m to locations.csv)"),
                    fatal=False))
            if full:
                for _, win in ds.block_windows(1):  # reading every block finds truncated files
                    ds.read(window=win)
        if scene.label_kind == "mask":
            stats = _mask_stats(scene, problems, full)
            if stats is None:
                return rep
            rep.building_pixels, rep.labelled_pixels = stats
            if scene.outlines is not None and grid.crs is not None:
                try:
                    vector_labels(str(scene.outlines), grid.crs.to_wkt())
                except RasterError as e:  # the mask is still a label: train on it, buildings apart as it tells them
                    problems.append(Problem(scene.outlines, f"unreadable building outlines ({e.__cause__ or e}); "
                                            "buildings told apart by the mask alone", fatal=False))
                    scene.outlines = None
        elif scene.label_kind == "vector" and grid.crs is not None:
            try:  # the file's own fault, named as such (not the image's)
                vector_labels(str(scene.label), grid.crs.to_wkt())
            except RasterError as e:
                problems.append(Problem(scene.label, str(e).removeprefix(f"{scene.label}: ")))
                return rep
        if scene.label_kind == "vector" and full:
            r, step = SceneReader(scene), 1024
            for row in range(0, r.height, step):
                for col in range(0, r.width, step):
                    m = r.read(col, row, step)
                    rep.building_pixels += int(m.mask.sum())
                    rep.labelled_pixels += int(m.valid.sum())
            r.close()
        rep.ok = True
        return rep
    except (RasterError, RasterioError) as e:
        msg = str(e)
        problems.append(Problem(scene.image, msg if msg.startswith(str(scene.image)) else f"unreadable or truncated ({msg})"))
        return SceneReport(scene, False)


def check_catalog(cat: Catalog, progress: bool = True) -> tuple[list[SceneReport], list[LocationSummary]]:
    """Check every scene; problems land in ``cat.problems``. Returns per-scene reports and per-location summaries."""
    reports = [check_scene(s, cat.problems) for s in tqdm(cat.scenes, desc="checking", unit="scene", disable=not progress)]
    summaries = []
    for loc in cat.locations:
        reps = [r for r in reports if r.scene.location == loc]
        s = LocationSummary(loc, images=len(reps), labelled=sum(r.scene.label is not None for r in reps))
        good = [r for r in reps if r.ok and r.scene.label is not None]
        s.usable = len(good)
        lab = sum(r.labelled_pixels for r in good)
        if lab:
            s.building_fraction = sum(r.building_pixels for r in good) / lab
        s.gsd = [r.gsd for r in reps if r.gsd is not None]
        s.crs = {r.crs for r in reps if r.crs}
        s.sizes = {f"{r.width}x{r.height}" for r in reps if r.width}
        s.outlines = any(r.scene.outlines is not None or r.scene.label_kind == "vector" for r in good)
        s.ids = any(r.scene.mask_reading == "ids" for r in good)
        paths = {r.scene.image for r in reps} | {r.scene.label for r in reps if r.scene.label is not None}
        s.problems = sum(1 for p in cat.problems if p.path in paths)
        if s.usable == 0:
            cat.problems.append(Problem(cat.root / loc, "location has no usable labelled image"))
        summaries.append(s)
    return reports, summaries

