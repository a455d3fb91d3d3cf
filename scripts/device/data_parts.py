"""All of ../shared/data in two parts small enough to travel to a GPU machine beside the wheels (64 MiB a call), for
the quality bench there: part A (with the wheels) Austin, Banepa and Kampala with their imagery recompressed as
JPEG-in-GeoTIFF (quality 95, as session 7's GPU run) and their outlines; part B (the next call) Xiamen and Barnarp
as they are (JPEG already). Never shipped: written to ignored folders for the calls only.
Usage: data_parts.py PART_A_DIR PART_B_DIR"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from data_subset import S, copy, jpeg


def main(a: Path, b: Path) -> None:
    for loc in ("austin", "banepa", "kampala"):
        for f in sorted((S / loc / "images").glob("*.tif")):
            jpeg(f, a / loc / "images" / f.name, quality=95)
        for f in sorted((S / loc / "masks").glob("*")):
            copy(f, a / loc / "masks" / f.name)
        if (S / loc / "labels.geojson").exists():
            copy(S / loc / "labels.geojson", a / loc / "labels.geojson")
    copy(S / "locations.csv", a / "locations.csv")
    for loc in ("xiamen", "barnarp"):
        shutil.copytree(S / loc, b / loc, dirs_exist_ok=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
