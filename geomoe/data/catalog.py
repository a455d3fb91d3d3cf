"""Find scenes in a dataset root: per-location folders, the Inria layout, optional locations.csv."""

from __future__ import annotations

import csv
import glob
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

IMAGE_SUFFIXES = {".tif", ".tiff", ".png", ".jpg", ".jpeg", ".jp2", ".vrt"}
VECTOR_SUFFIXES = {".geojson", ".gpkg", ".json", ".shp", ".fgb", ".parquet"}
# where a location's per-image labels live, and the tails their names may add to the image's name (searched in
# this order: masks/<name> first, as this project's layout has it)
LABEL_DIRS = ("masks", "mask", "labels", "label", "gt")
LABEL_TAILS = ("", "_mask", "-mask", "_label", "-label", "_labels", "_gt", "_buildings")
VECTOR_NAMES = ("labels.geojson", "labels.gpkg", "labels.json", "buildings.geojson", "buildings.gpkg")
INRIA_VAL_TILES = range(1, 6)  # the paper (and Inria's authors) validate on tiles 1-5 of each city

Split = Literal["train", "val", "test"]
# how a mask's values are read (the data check decides from every value the mask holds): binary, 0 background and
# anything else building (0/1, 0/255, 0/k); lossy, a 0/255 mask with values between (JPEG, smoothing), building at
# 128 or more; ids, one value per building (instance masks), which also tells touching buildings apart
MaskReading = Literal["binary", "lossy", "ids"]


@dataclass
class Scene:
    """One image with its label (a mask raster or a vector file rasterised onto the image's grid)."""

    location: str
    image: Path
    label: Path | None = None
    label_kind: Literal["mask", "vector"] | None = None
    split: Split | None = None  # fixed by the layout (Inria); None means the spatial block split decides
    gsd_hint: float | None = None  # metres per pixel from locations.csv, used only when the raster has no CRS
    # building outlines beside a mask (the location's labels.geojson): they tell touching buildings apart, which a
    # 0/255 mask cannot; the mask stays the pixel truth
    outlines: Path | None = None
    mask_reading: MaskReading | None = None  # None: not checked yet (see ``building_pixels``)
    # a georeferenced mask on a grid of its own (another resolution, extent or CRS) is read onto the image's grid
    mask_on_own_grid: bool = False

    @property
    def name(self) -> str:
        return self.image.stem


@dataclass
class Problem:
    path: Path
    message: str
    fatal: bool = True  # fatal for the file it names; the rest of the data stays usable

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def summarise(problems: list[Problem], verbose: bool = False) -> list[tuple[bool, str]]:
    """(fatal, line) per kind of problem: one repeated for many files is one line with a count and an example
    ("170 images: no CRS ..., e.g. barnarp/images/barnarp_0_7.jpg"); ``verbose`` lists every file."""
    if verbose:
        return [(p.fatal, str(p)) for p in problems]
    groups: dict[tuple[bool, str], list[Problem]] = {}
    for p in problems:
        groups.setdefault((p.fatal, p.message), []).append(p)
    out = []
    for (fatal, msg), ps in groups.items():
        out.append((fatal, str(ps[0]) if len(ps) == 1 else f"{len(ps)} files: {msg}, e.g. {ps[0].path} (--verbose lists them)"))
    return out


@dataclass
class Catalog:
    root: Path
    layout: str
    scenes: list[Scene] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    locations_meta: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def locations(self) -> list[str]:
        return sorted({s.location for s in self.scenes})

    def labelled(self) -> list[Scene]:
        return [s for s in self.scenes if s.label is not None]

    def by_location(self) -> dict[str, list[Scene]]:
        out: dict[str, list[Scene]] = {}
        for s in self.scenes:
            out.setdefault(s.location, []).append(s)
        return out


def _images_in(folder: Path) -> list[Path]:
    """Image files of ``folder``; hidden ones (macOS ._AppleDouble copies, .DS_Store) are junk, not imagery."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def _label_dirs(loc_dir: Path) -> list[Path]:
    """The folders of ``loc_dir`` that hold per-image labels, in the order they are searched."""
    return [loc_dir / d for d in LABEL_DIRS if (loc_dir / d).is_dir()]


def _find_label(label_dirs: list[Path], image: Path) -> tuple[Path, Literal["mask", "vector"]] | None:
    """The label of ``image``: a raster mask, or else a vector file of its own, with the image's name (any
    extension, or a suffix such as ``_mask``: the names datasets ship with) in one of ``label_dirs``."""
    for kind, suffixes in (("mask", IMAGE_SUFFIXES), ("vector", VECTOR_SUFFIXES)):
        for d in label_dirs:
            if kind == "mask" and (d / image.name).is_file():
                return d / image.name, "mask"
            for tail in LABEL_TAILS:
                for p in sorted(d.glob(glob.escape(image.stem + tail) + ".*")):
                    if p.suffix.lower() in suffixes and not p.name.startswith("."):
                        return p, kind
    return None


def _find_vector(loc_dir: Path) -> Path | None:
    for name in VECTOR_NAMES:
        if (loc_dir / name).exists():
            return loc_dir / name
    return None


def read_locations_csv(path: Path) -> dict[str, dict[str, str]]:
    """Per-location metadata keyed by the ``location`` column."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and "location" not in rows[0]:
        raise ValueError(f"{path}: no 'location' column (columns: {', '.join(rows[0])})")
    return {r["location"]: r for r in rows}


def csv_gsd(row: dict[str, str]) -> float | None:
    """The ``gsd_m`` of a locations.csv row (metres per pixel), or None when absent or not a positive number."""
    try:
        v = float(row.get("gsd_m", "") or "nan")
    except ValueError:
        return None
    return v if v > 0 else None


def gsd_near(path: Path, levels: int = 3) -> float | None:
    """A raster's GSD from a locations.csv in one of its parent folders, whose location names a folder on the way."""
    path = Path(path).resolve()
    for up in list(path.parents)[:levels]:
        csv_path = up / "locations.csv"
        if csv_path.exists():
            try:
                meta = read_locations_csv(csv_path)
            except (ValueError, csv.Error, OSError):
                return None
            for part in path.relative_to(up).parts[:-1]:
                if part in meta:
                    return csv_gsd(meta[part])
            return None
    return None


def _inria_dir(root: Path) -> Path | None:
    for cand in (root / "AerialImageDataset" / "train", root / "train", root):
        if (cand / "images").is_dir() and (cand / "gt").is_dir():
            return cand
    return None


def _discover_inria(train_dir: Path, cat: Catalog) -> None:
    pattern = re.compile(r"^([A-Za-z_-]+?)-?(\d+)$")
    for img in _images_in(train_dir / "images"):
        m = pattern.match(img.stem)
        if not m:
            cat.problems.append(Problem(img, "name is not <city><number>, as the Inria layout needs", fatal=True))
            continue
        city, n = m.group(1), int(m.group(2))
        found = _find_label([train_dir / "gt"], img)
        mask = found[0] if found and found[1] == "mask" else None
        split: Split = "test" if n in INRIA_VAL_TILES else "train"  # the paper's held-out tiles; val comes from train
        cat.scenes.append(Scene(city, img, mask, "mask" if mask else None, split))


def _discover_folder(loc_dir: Path, cat: Catalog) -> None:
    images_dir = loc_dir / "images"
    images = _images_in(images_dir)
    if not images:
        cat.problems.append(Problem(images_dir, "empty folder: no images", fatal=True))
        return
    vector = _find_vector(loc_dir)
    label_dirs = _label_dirs(loc_dir)
    for img in images:
        found = _find_label(label_dirs, img)
        if found is not None and found[1] == "mask":
            cat.scenes.append(Scene(loc_dir.name, img, found[0], "mask", outlines=vector))
        elif found is not None:
            cat.scenes.append(Scene(loc_dir.name, img, found[0], "vector"))
        elif vector is not None:
            cat.scenes.append(Scene(loc_dir.name, img, vector, "vector"))
        else:
            cat.scenes.append(Scene(loc_dir.name, img))


def discover(root: str | Path) -> Catalog:
    """Catalogue every scene under ``root``; problems are collected, never raised, so the rest stays usable."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such dataset folder")
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a folder (give the dataset root)")
    inria = _inria_dir(root)
    if inria is not None:
        cat = Catalog(root, "inria")
        _discover_inria(inria, cat)
    elif (root / "images").is_dir():
        cat = Catalog(root, "single-location")
        _discover_folder(root, cat)
    else:
        cat = Catalog(root, "locations")
        for loc_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if (loc_dir / "images").is_dir():
                _discover_folder(loc_dir, cat)
    csv_path = root / "locations.csv"
    if csv_path.exists():
        try:
            cat.locations_meta = read_locations_csv(csv_path)
        except (ValueError, csv.Error) as e:
            cat.problems.append(Problem(csv_path, str(e), fatal=False))
        for sc in cat.scenes:
            sc.gsd_hint = csv_gsd(cat.locations_meta.get(sc.location, {}))
    if not cat.scenes and not cat.problems:
        cat.problems.append(
            Problem(root, "no images found (expected <location>/images/, or the Inria train/images + train/gt layout)")
        )
    for loc, scenes in cat.by_location().items():
        unlabelled = [s for s in scenes if s.label is None]
        if unlabelled:
            names = ", ".join(s.image.name for s in unlabelled[:5]) + (" ..." if len(unlabelled) > 5 else "")
            where = unlabelled[0].image.parent
            looked = "gt/" if cat.layout == "inria" else "/, ".join(LABEL_DIRS) + "/"
            cat.problems.append(Problem(where, f"{len(unlabelled)} images have no label (skipped): {names} (looked in "
                                               f"{looked} for the image's name, also with _mask, _label or _gt; and "
                                               f"for {VECTOR_NAMES[0]} beside images/)", fatal=False))
    return cat
