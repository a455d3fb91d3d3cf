"""The ``geomoe`` command line."""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from geomoe.config import load_config

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Location-aware mixture of experts for building footprints.")
data_app = typer.Typer(no_args_is_help=True, help="Check, show and generate training data.")
app.add_typer(data_app, name="data")
console = Console(width=None if Console().is_terminal else 160)

ConfigOpt = Annotated[Optional[str], typer.Option("--config", "-c", help="YAML config file, or a packaged name: small, paper, tiny.")]


def _fail(msg: str, code: int = 1) -> None:
    console.print(f"[red]error:[/red] {msg}")
    raise typer.Exit(code)


@data_app.command("check")
def data_check(root: Path, full: bool = typer.Option(True, help="Read every block (finds truncated files).")) -> None:
    """Per-location table of images, labels, building fraction, GSD, CRS and problems; exit 1 on fatal problems."""
    from geomoe.data.catalog import discover
    from geomoe.data.check import check_catalog

    try:
        cat = discover(root)
    except (FileNotFoundError, NotADirectoryError) as e:
        _fail(str(e))
    _, sums = check_catalog(cat)
    t = Table(title=f"{root} ({cat.layout} layout)")
    for col in ("location", "images", "labelled", "usable", "building %", "GSD (m)", "CRS", "size", "problems"):
        t.add_column(col, justify="right" if col not in ("location", "CRS") else "left")
    for s in sums:
        gsd = f"{min(s.gsd):.3f}" + (f"-{max(s.gsd):.3f}" if s.gsd and max(s.gsd) - min(s.gsd) > 1e-3 else "") if s.gsd else "?"
        bf = "?" if math.isnan(s.building_fraction) else f"{100 * s.building_fraction:.1f}"
        sizes = ", ".join(sorted(s.sizes)[:2]) + (" ..." if len(s.sizes) > 2 else "")
        t.add_row(s.location, str(s.images), str(s.labelled), str(s.usable), bf, gsd, ", ".join(sorted(s.crs)) or "none",
                  sizes, str(s.problems))
    console.print(t)
    meta = cat.locations_meta
    if meta:
        console.print("locations.csv: " + "; ".join(f"{k} ({v.get('lat', '?')}, {v.get('lon', '?')})" for k, v in meta.items()))
    fatal = [p for p in cat.problems if p.fatal]
    for p in cat.problems:
        console.print(f"[{'red' if p.fatal else 'yellow'}]{'error' if p.fatal else 'warning'}:[/] {p}", highlight=False)
    if fatal:
        console.print(f"[red]{len(fatal)} fatal problem(s)[/red]; the other scenes are still usable.")
        raise typer.Exit(1)
    console.print("[green]ok[/green]")


@data_app.command("show")
def data_show(root: Path, out: Path = typer.Option(..., "--out", "-o"), n: int = 12, seed: int = 0,
              config: ConfigOpt = None) -> None:
    """Draw a grid of random training patches with their masks overlaid, titled by location."""
    from geomoe.data.datasets import prepare
    from geomoe.data.show import show_patches

    cfg = load_config(config)
    try:
        prep = prepare(root, cfg.data, cfg.seed)
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        _fail(str(e))
    console.print(f"wrote {show_patches(prep, out, n, seed)}")


@data_app.command("synth")
def data_synth(out: Path, locations: int = 3, scenes: int = 2, size: int = 256, seed: int = 0) -> None:
    """Generate a synthetic multi-location dataset (roof colour, density and texture differ by location)."""
    from geomoe.data.synthetic import make_synthetic

    make_synthetic(out, n_locations=locations, scenes_per_location=scenes, size=size, seed=seed)
    console.print(f"wrote {out}")


@app.command()
def demo(out: Path = typer.Option(Path("demo_out"), "--out", "-o")) -> None:
    """Run the demo on the shipped sample (for now: check the data and show patches)."""
    root = Path(__file__).resolve().parents[1] / "sample" / "train"
    data_check(root, full=True)
    data_show(root, out / "patches.png", 12, 0, None)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.simplefilter("once")
    warnings.filterwarnings("ignore", category=PendingDeprecationWarning)  # affine's '*' notice, from rasterio itself
    app()


if __name__ == "__main__":
    main()
