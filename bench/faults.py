"""Broken and unusual inputs through the real CLI: per case, the exit code and the first line of the message.

Trains a tiny bundle on synthetic data (about two minutes on 2 CPU cores), writes each broken input, runs
``geomoe predict | evaluate | train`` on it in a fresh process, and checks that a failure is one line naming
the file and the problem, with exit code 1, and that unusual but valid imagery (12-bit, rotated, AppleDouble junk
beside it) succeeds. Writes bench/results/faults.json and appends the table to bench/RESULTS.md.
Usage: uv run python bench/faults.py
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import record, write_json
from rasterio.transform import Affine, from_origin

from geomoe.config import load_config
from geomoe.data.synthetic import make_synthetic, write_geotiff
from geomoe.pipelines.train import train_all

GEOMOE = [sys.executable, "-m", "geomoe.cli"]


def run(args: list[str]) -> tuple[int, str, bool]:
    """(exit code, the message a user reads first, whether a traceback was printed).

    For predict, whose run goes on past a failed input, that is the input's logged reason ("path: why"); for the
    other commands the ``error:`` line; for a success the run's last line.
    """
    p = subprocess.run([*GEOMOE, *args], capture_output=True, text=True, timeout=600)
    text = p.stdout + p.stderr
    lines = [l.strip() for l in text.splitlines() if l.strip().startswith("error") or "interrupted" in l]
    lines += [l.strip() for l in p.stderr.splitlines() if l.startswith("/") and ": " in l and "Warning" not in l]
    if not lines:
        lines = [l.strip() for l in p.stdout.splitlines() if " done, " in l] or [l.strip() for l in text.splitlines() if l.strip()][-1:]
    return p.returncode, (lines[0] if lines else ""), "Traceback (most recent call last)" in text


def cases(tmp: Path, root: Path, bundle: Path) -> list[tuple[str, str, list[str], int]]:
    """(command, what is wrong, arguments, expected exit code)."""
    t = from_origin(500000, 4000000, 0.5, 0.5)
    good = sorted((root / "loc0" / "images").glob("*.tif"))[0]
    out = tmp / "out"
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (3, 160, 160), dtype=np.uint8)

    trunc = tmp / "truncated.tif"
    data = good.read_bytes()
    trunc.write_bytes(data[: len(data) // 2])
    vrt = tmp / "missing_source.vrt"
    vrt.write_text(f'<VRTDataset rasterXSize="160" rasterYSize="160"><VRTRasterBand dataType="Byte" band="1">'
                   f'<SimpleSource><SourceFilename relativeToVRT="0">{tmp}/gone.tif</SourceFilename>'
                   f'<SourceBand>1</SourceBand></SimpleSource></VRTRasterBand></VRTDataset>')
    text = tmp / "not_a_raster.tif"
    text.write_text("this is not an image\n")
    two = tmp / "two_bands.tif"
    write_geotiff(two, img[:2], "EPSG:32633", t)
    six = tmp / "six_bands.tif"
    write_geotiff(six, np.concatenate([img, img]), "EPSG:32633", t)
    u16 = tmp / "twelve_bit.tif"
    write_geotiff(u16, img.astype(np.uint16) * 16, "EPSG:32633", t)
    rot = tmp / "rotated.tif"
    write_geotiff(rot, img, "EPSG:32633", Affine.translation(500000, 4000000) * Affine.rotation(15) * Affine.scale(0.5, -0.5))
    nodata = tmp / "all_nodata.tif"
    write_geotiff(nodata, np.zeros((3, 160, 160), np.uint8), "EPSG:32633", t, nodata=0)
    junk = tmp / "folder_with_junk"
    junk.mkdir()
    shutil.copy(good, junk / "scene.tif")
    (junk / "._scene.tif").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
    afile = tmp / "a_file"
    afile.write_text("x")

    nokey = tmp / "bundle_missing_key"
    shutil.copytree(bundle, nokey, ignore=shutil.ignore_patterns("runs", "*.ckpt"))
    m = json.loads((nokey / "manifest.json").read_text())
    del m["experts"]
    (nokey / "manifest.json").write_text(json.dumps(m))
    corrupt = tmp / "bundle_corrupt_expert"
    shutil.copytree(bundle, corrupt, ignore=shutil.ignore_patterns("runs", "*.ckpt"))
    p = corrupt / "experts" / "region_0.pt"
    p.write_bytes(p.read_bytes()[:-100] + b"\x00" * 100)

    mixed = tmp / "mixed_dtypes"
    for loc in ("a", "b"):
        (mixed / loc / "images").mkdir(parents=True)
        (mixed / loc / "masks").mkdir(parents=True)
        tt = from_origin(500000 + 5000 * (loc == "b"), 4000000, 0.5, 0.5)
        write_geotiff(mixed / loc / "images" / "s.tif", rng.integers(0, 4095, (3, 256, 256), dtype=np.uint16), "EPSG:32633", tt)
        write_geotiff(mixed / loc / "masks" / "s.tif", (rng.random((256, 256)) > 0.8).astype(np.uint8) * 255, "EPSG:32633", tt)
    broken_loc = tmp / "location_all_broken"
    shutil.copytree(root, broken_loc)
    for f in (broken_loc / "loc1" / "masks").glob("*.tif"):
        f.write_bytes(b"broken")
    typo = tmp / "typo.yaml"
    typo.write_text("experts:\n  encodr: resnet18\n")
    empty = tmp / "empty"
    (empty / "x" / "images").mkdir(parents=True)

    b = ["-b", str(bundle)]
    return [
        ("predict", "truncated GeoTIFF", [str(trunc), *b, "-o", str(out)], 1),
        ("predict", "VRT whose source is missing", [str(vrt), *b, "-o", str(out)], 1),
        ("predict", "text file named .tif", [str(text), *b, "-o", str(out)], 1),
        ("predict", "two-band raster", [str(two), *b, "-o", str(out)], 1),
        ("predict", "six bands, no --bands", [str(six), *b, "-o", str(out)], 1),
        ("predict", "six bands with --bands 3,2,1", [str(six), *b, "-o", str(out), "--bands", "3,2,1"], 0),
        ("predict", "12-bit imagery in uint16", [str(u16), *b, "-o", str(out)], 0),
        ("predict", "rotated geotransform", [str(rot), *b, "-o", str(out)], 0),
        ("predict", "all nodata", [str(nodata), *b, "-o", str(out)], 0),
        ("predict", "AppleDouble file in the folder", [str(junk), *b, "-o", str(out)], 0),
        ("predict", "input that does not exist", [str(tmp / "nope.tif"), *b, "-o", str(out)], 1),
        ("predict", "output folder under a file", [str(good), *b, "-o", str(afile / "sub")], 1),
        ("predict", "manifest missing a key", [str(good), "-b", str(nokey), "-o", str(out)], 1),
        ("predict", "expert file corrupted", [str(good), "-b", str(corrupt), "-o", str(out)], 1),
        ("predict", "--routing typo", [str(good), *b, "-o", str(out), "--routing", "smooth"], 1),
        ("predict", "--device gpu without CUDA", [str(good), *b, "-o", str(out), "--device", "cuda"], 1),
        ("evaluate", "dataset folder missing", [str(tmp / "nowhere"), *b], 1),
        ("evaluate", "uint16 images with uint8 masks", [str(mixed), *b, "--split", "all", "-o", str(tmp / "ev")], 0),
        ("evaluate", "output folder under a file", [str(root), *b, "-o", str(afile / "ev")], 1),
        ("train", "config key typo", [str(root), "-o", str(tmp / "t1"), "-c", str(typo)], 1),
        ("train", "unknown packaged config", [str(root), "-o", str(tmp / "t2"), "-c", "tinyy"], 1),
        ("train", "a location loses every mask", [str(broken_loc), "-o", str(tmp / "t3"), "-c", "tiny"], 1),
        ("train", "location folder without images", [str(empty), "-o", str(tmp / "t4"), "-c", "tiny"], 1),
    ]


def main() -> None:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        root = make_synthetic(tmp / "synth", n_locations=3, scenes_per_location=2, size=256, seed=1)
        bundle = train_all(root, load_config("tiny"), tmp / "bundle", progress=False, figures=False)
        rows = []
        for cmd, what, args, expect in cases(tmp, root, bundle):
            rc, line, tb = run([cmd, *args])
            line = line.replace(td, "$TMPDIR")
            ok = rc == expect and not tb
            rows.append({"command": cmd, "input": what, "exit": rc, "expected": expect, "traceback": tb, "ok": ok,
                         "message": line})
            print(f"{'ok  ' if ok else 'FAIL'} {cmd:8s} {what:34s} exit {rc}  {line[:150]}")
    body = ["| command | input | exit | expected | message (first line) |", "|---|---|---|---|---|"]
    for r in rows:
        msg = r["message"].replace("|", "/")[:160]
        body.append(f"| {r['command']} | {r['input']} | {r['exit']} | {r['expected']}{'' if r['ok'] else ' (NOT MET)'} | {msg} |")
    passed = sum(r["ok"] for r in rows)
    body.append(f"\n{passed} of {len(rows)} cases as expected (one line, the right exit code, no traceback); "
                f"{(time.perf_counter() - t0) / 60:.1f} min.")
    record("Faults: broken inputs through the CLI", "\n".join(body), "tiny bundle on synthetic data")
    write_json("faults", {"cases": rows, "as_expected": passed, "total": len(rows)}, "tiny")


if __name__ == "__main__":
    main()
