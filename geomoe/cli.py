"""The ``geomoe`` command line."""

from __future__ import annotations

import logging
import math
import re
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import click
import typer
from rich.console import Console
from rich.table import Table

from geomoe.config import ExpertConfig, load_config

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Location-aware mixture of experts for building footprints.")
data_app = typer.Typer(no_args_is_help=True, help="Check, show and generate training data.")
app.add_typer(data_app, name="data")
embed_app = typer.Typer(no_args_is_help=True, help="Train, extract and plot the location embedding.")
app.add_typer(embed_app, name="embed")
regions_app = typer.Typer(no_args_is_help=True, help="Fit regions (k-means centroids) on embeddings.")
app.add_typer(regions_app, name="regions")
console = Console(width=None if Console().is_terminal else 160)

ConfigOpt = Annotated[Optional[str], typer.Option("--config", "-c", help="YAML config file, or a packaged name: tiny, small, medium, paper.")]


def _fail(msg: str, code: int = 1) -> None:
    console.print(f"[red]error:[/red] {msg}", highlight=False, soft_wrap=True)  # one line, however long
    raise typer.Exit(code)


def _warn_unflipped(e: ExpertConfig, model: str = "experts") -> None:
    """Flip averaging assumes networks that saw flipped patches in training; experts trained without turns keep the
    sun's side of every roof, and averaging their flipped answers loses it (bench/RESULTS.md, session 30: test IoU
    0.501 -> 0.456 on the `medium` run)."""
    if not (e.generalist_turned if model == "generalist" else e.turns):
        which = ("generalist", "experts.generalist_turns") if model == "generalist" else \
            ("experts and single network", "experts.turns")
        console.print(f"[yellow]warning:[/] --tta averages flipped tiles, but this bundle's {which[0]} trained without "
                      f"flips ({which[1]}: false), so flip averaging lowers the accuracy", highlight=False, soft_wrap=True)


def _out_dir(path: Path) -> Path:
    """Create the output folder now, before any long computation, or end with one line saying why it cannot be."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        _fail(f"{path}: cannot be an output folder: it, or a folder above it, is a file")
    except PermissionError:
        _fail(f"{path}: no permission to create or write this output folder")
    return path


def _config(config: str | None):
    try:
        return load_config(config)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e).strip().splitlines()[0] + ("" if "\n" not in str(e) else " " + "; ".join(
            l.strip() for l in str(e).strip().splitlines()[1:3])))


@data_app.command("check")
def data_check(root: Path, full: bool = typer.Option(True, help="Read every block (finds truncated files)."),
               verbose: bool = typer.Option(False, "--verbose", "-v", help="list every file of a repeated problem")) -> None:
    """Per-location table of images, labels, building fraction, GSD, CRS and problems; exit 1 on fatal problems."""
    from geomoe.data.catalog import discover
    from geomoe.data.check import check_catalog

    try:
        cat = discover(root)
    except (FileNotFoundError, NotADirectoryError) as e:
        _fail(str(e))
    _, sums = check_catalog(cat)
    t = Table(title=f"{root} ({cat.layout} layout)")
    for col in ("location", "images", "labelled", "usable", "building %", "buildings apart by", "GSD (m)", "CRS", "size",
                "problems"):
        t.add_column(col, justify="right" if col not in ("location", "CRS", "buildings apart by") else "left")
    for s in sums:
        gsd = f"{min(s.gsd):.3f}" + (f"-{max(s.gsd):.3f}" if s.gsd and max(s.gsd) - min(s.gsd) > 1e-3 else "") if s.gsd else "?"
        bf = "?" if math.isnan(s.building_fraction) else f"{100 * s.building_fraction:.1f}"
        sizes = ", ".join(sorted(s.sizes)[:2]) + (" ..." if len(s.sizes) > 2 else "")
        t.add_row(s.location, str(s.images), str(s.labelled), str(s.usable), bf,
                  "outlines" if s.outlines else "mask ids" if s.ids else "mask",
                  gsd, ", ".join(sorted(s.crs)) or "none", sizes, str(s.problems))
    console.print(t)
    meta = cat.locations_meta
    if meta:
        console.print("locations.csv: " + "; ".join(f"{k} ({v.get('lat', '?')}, {v.get('lon', '?')})" for k, v in meta.items()))
    fatal = [p for p in cat.problems if p.fatal]
    from geomoe.data.catalog import summarise

    for is_fatal, line in summarise(cat.problems, verbose):
        console.print(f"[{'red' if is_fatal else 'yellow'}]{'error' if is_fatal else 'warning'}:[/] {line}", highlight=False,
                      soft_wrap=True)
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

    cfg = _config(config)
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


def _prepare(root: Path, cfg):
    from geomoe.data.datasets import prepare

    try:
        return prepare(root, cfg.data, cfg.seed)
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        _fail(str(e))


@embed_app.command("train")
def embed_train(root: Path, out: Path = typer.Option(..., "--out", "-o"), config: ConfigOpt = None,
                triplet: bool = typer.Option(True, help="--no-triplet trains the plain autoencoder (the ablation).")) -> None:
    """Train the triplet autoencoder; resumes from OUT/checkpoint.pt; logs both losses to OUT/log.csv."""
    from geomoe.embedding.train import train_embedding

    cfg = _config(config)
    try:
        path = train_embedding(_prepare(root, cfg), cfg, out, triplet=triplet)
    except _training_errors() as e:
        _fail(str(e).strip().splitlines()[0])
    console.print(f"wrote {path}")


@embed_app.command("extract")
def embed_extract(root: Path, model: Path = typer.Option(..., "--model", "-m"), out: Path = typer.Option(..., "--out", "-o"),
                  config: ConfigOpt = None) -> None:
    """Embed a grid of patches of both splits; writes vectors with location, scene, window and split (.npz)."""
    from geomoe.backbone import pick_device
    from geomoe.embedding.extract import extract
    from geomoe.embedding.model import load_embedding

    cfg = _config(config)
    net, _ = load_embedding(model, pick_device(cfg.device))
    emb = extract(net, _prepare(root, cfg), min_valid=cfg.data.min_valid)
    console.print(f"wrote {emb.save(out)} ({len(emb)} patches)")


@regions_app.command("fit")
def regions_fit(embeddings: Path, out: Path = typer.Option(..., "--out", "-o"), k: int = typer.Option(3, "--k"),
                sweep: str = typer.Option("2,3,4,5", help="k values to report on"), seed: int = 0) -> None:
    """k-means on the train-split embeddings; writes centroids.npy and a report of the k sweep."""
    from geomoe.embedding.extract import Embeddings
    from geomoe.embedding.report import fit_regions

    try:
        emb = Embeddings.load(embeddings)
        res = fit_regions(emb, k, [int(x) for x in sweep.split(",") if x], out, seed)
    except ValueError as e:
        _fail(str(e))
    console.print(res.markdown)
    console.print(f"wrote {out / 'centroids.npy'}")


@embed_app.command("plot")
def embed_plot(embeddings: Path, out: Path = typer.Option(..., "--out", "-o"),
               centroids: Optional[Path] = typer.Option(None, help="centroids.npy from 'regions fit'"),
               config: ConfigOpt = None) -> None:
    """UMAP and t-SNE pictures by location and region, and sample patches per region."""
    import numpy as np

    from geomoe.embedding.extract import Embeddings
    from geomoe.embedding.plot import plot_cluster_samples, plot_space
    from geomoe.embedding.report import check_dims

    cfg = _config(config)
    try:
        emb = Embeddings.load(embeddings)
        c = np.load(centroids) if centroids else None
        if c is not None:
            check_dims(emb.vectors, c, embeddings, centroids)
    except ValueError as e:
        _fail(str(e))
    out.mkdir(parents=True, exist_ok=True)
    console.print(f"wrote {plot_space(emb, c, out / 'embedding_space.png', seed=cfg.seed)}")
    if c is not None:
        console.print(f"wrote {plot_cluster_samples(emb, c, out / 'region_samples.png', data=cfg.data)}")


def _bundle(path: Path, config: str | None = None, with_baseline: bool = True):
    from geomoe.backbone import pick_device
    from geomoe.bundle import load_bundle

    device = pick_device(_config(config).device if config else "auto")
    try:
        return load_bundle(path, device, with_baseline)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))


def _with_trainer(cfg, devices: int | None, num_nodes: int | None, accelerator: str | None):
    """The config with the command line's trainer options applied (they win over the YAML)."""
    upd = {k: v for k, v in {"devices": devices, "num_nodes": num_nodes, "accelerator": accelerator}.items() if v is not None}
    if not upd:
        return cfg
    try:
        tc = cfg.trainer.model_validate({**cfg.trainer.model_dump(), **upd})
    except ValueError as e:
        _fail(f"trainer options: {e}")
    return cfg.model_copy(update={"trainer": tc})


def _training_errors():
    """Exceptions a training run reports as one line (Lightning's configuration errors included)."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    return (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, MisconfigurationException)


DevicesOpt = Annotated[Optional[int], typer.Option("--devices", help="processes (GPUs) per machine; >1 runs DDP")]
NodesOpt = Annotated[Optional[int], typer.Option("--num-nodes", help="machines (torchrun or SLURM sets the ranks)")]
AccelOpt = Annotated[Optional[str], typer.Option("--accelerator", help="auto, cpu, gpu")]


@app.command()
def train(root: Path, out: Path = typer.Option(..., "--out", "-o", help="bundle directory to write"),
          config: ConfigOpt = None, baseline: bool = typer.Option(True, help="also train the single-network baseline"),
          only: Optional[list[str]] = typer.Option(None, "--only", help="run only these stages: embedding, regions, "
                                                   "expert:N, experts, baseline, assemble (repeat or comma-separate)"),
          devices: DevicesOpt = None, num_nodes: NodesOpt = None, accelerator: AccelOpt = None,
          skip_location: Optional[list[str]] = typer.Option(None, "--skip-location", help="leave this location out "
                                                            "(repeat); needed to go on when all its images are unusable")) -> None:
    """Train the whole chain (embedding, regions, experts, baseline) into a bundle; rerun to resume."""
    from geomoe.pipelines.train import train_all

    cfg = _with_trainer(_config(config), devices, num_nodes, accelerator)
    if skip_location:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"skip_locations": [*cfg.data.skip_locations, *skip_location]})})
    _out_dir(out)
    try:
        train_all(root, cfg, out, baseline=baseline, only=only)
    except _training_errors() as e:
        _fail(str(e).strip().splitlines()[0])
    from geomoe.trainer import is_rank_zero

    if is_rank_zero():
        console.print(f"wrote bundle {out}" if not only else f"finished {', '.join(only)} in {out}")


@app.command()
def evaluate(root: Path, bundle: Path = typer.Option(..., "--bundle", "-b"), out: Optional[Path] = typer.Option(None, "--out", "-o"),
             split: str = typer.Option("test", help="test (held out, never used to choose anything), val, train or all"),
             tta: bool = typer.Option(False, help="score the mean over flipped tiles, as predict --tta")) -> None:
    """The paper's table on the test split, per location and overall, for every way of choosing an expert."""
    from geomoe.pipelines.evaluate import evaluate as run_eval

    b = _bundle(bundle)
    b.config.predict.tta = b.config.predict.tta or tta
    if b.config.predict.tta:
        _warn_unflipped(b.config.experts)
    out = _out_dir(out or bundle / "evaluation")
    try:
        ev = run_eval(b, root, split=split)
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        _fail(str(e))
    console.print(ev.markdown(), highlight=False)
    for p in ev.write(out):
        console.print(f"wrote {p}")


@app.command()
def report(out: Path = typer.Option(Path("report/report.html"), "--out", "-o", help="the HTML file to write"),
           bundle: Optional[Path] = typer.Option(None, "--bundle", "-b", help="default: the bundle the predictions name"),
           predictions: Optional[Path] = typer.Option(None, "--predictions", "-p", help="a 'geomoe predict' output folder"),
           evaluation: Optional[Path] = typer.Option(None, "--evaluation", "-e", help="a 'geomoe evaluate' output folder"),
           data: Optional[Path] = typer.Option(None, "--data", help="the training imagery, for the patches' pictures "
                                               "(default: where the bundle trained)"),
           limit: int = typer.Option(3000, help="at most this many patches in the explorer (a stated random subset)")) -> None:
    """An interactive HTML report (offline): embedding explorer, maps of predicted scenes, metrics per location."""
    from geomoe.pipelines.report import write_report
    from geomoe.pipelines.evaluate import Evaluation
    from geomoe.pipelines.report_sections import (bundle_of_predictions, explorer_section, maps_section,
                                                  metrics_section, predicted_scenes)

    try:
        scenes = predicted_scenes(predictions) if predictions else []
        bundle = bundle or bundle_of_predictions(scenes)
        if bundle is None:
            named = next((s.summary.get("bundle") for s in scenes if s.summary.get("bundle")), None)
            _fail("the report needs the bundle the predictions were made with: give -b BUNDLE"
                  + (f" (the predictions name {named.split('#')[0]}, which is not there)" if named else ""))
        b = _bundle(bundle)
        root = data or Path(b.manifest.get("training_root", ""))
        prep = None
        if root and root.is_dir():
            from geomoe.data.datasets import prepare

            prep = prepare(root, b.config.data, b.config.seed)
        elif data is not None:
            _fail(f"{data}: not a folder of training imagery")
        sections = [explorer_section(b, prep, scenes, limit)]
        if scenes:
            sections.append(maps_section(scenes))
        ev = evaluation or (bundle / "evaluation" if (bundle / "evaluation" / "evaluation.csv").exists() else None)
        if ev is not None:
            sections.append(metrics_section(Evaluation.read(ev)))
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        _fail(str(e))
    _out_dir(out.parent)
    write_report(out, "geomoe report", f"bundle {bundle.resolve()}" + (f"; predictions {predictions}" if predictions else ""),
                 sections)
    console.print(f"[green]report:[/green] {out.resolve()}")


@app.command("show-results")
def show_results_cmd(root: Path, bundle: Path = typer.Option(..., "--bundle", "-b"), out: Path = typer.Option(..., "--out", "-o"),
                     n: int = 6, seed: int = 0) -> None:
    """Draw image / truth / prediction / routed expert for held-out windows."""
    from geomoe.pipelines.show import show_results

    b = _bundle(bundle, with_baseline=False)
    console.print(f"wrote {show_results(b, _prepare(root, b.config), out, n, seed)}")


@app.command("lr-find")
def lr_find(root: Path, out: Path = typer.Option(..., "--out", "-o", help="PNG of the curve"), config: ConfigOpt = None,
            steps: int = 60) -> None:
    """Learning-rate range test for an expert; draws the curve and suggests a rate."""
    from geomoe.experts.lr_find import find_lr, plot_lr

    cfg = _config(config)
    try:
        curve = find_lr(_prepare(root, cfg), cfg, steps)
    except _training_errors() as e:
        _fail(str(e).strip().splitlines()[0])
    plot_lr(curve, out)
    console.print(f"suggested learning rate: {curve.suggestion:.2e}  (curve: {out})")


@app.command()
def finetune(root: Path, bundle: Path = typer.Option(..., "--bundle", "-b"), out: Path = typer.Option(..., "--out", "-o"),
             region: Optional[int] = typer.Option(None, help="expert to start from (default: where ROOT routes)"),
             new_region: bool = typer.Option(False, help="add ROOT as a new region instead of replacing an expert"),
             epochs: Optional[int] = None) -> None:
    """Fine-tune a bundle's expert on a new geography (ROOT), writing a new bundle."""
    from geomoe.pipelines.finetune import finetune as run_ft

    try:
        run_ft(bundle, root, out, region, new_region, epochs)
    except _training_errors() as e:
        _fail(str(e))
    console.print(f"wrote bundle {out}")


@app.command()
def predict(inputs: list[Path], bundle: Path = typer.Option(..., "--bundle", "-b"), out: Path = typer.Option(..., "--out", "-o"),
            overlap: Optional[int] = typer.Option(None, help="tile overlap in pixels (default: the bundle's)"),
            batch_size: Optional[int] = typer.Option(None, "--batch-size"), device: str = "auto",
            tta: bool = typer.Option(False, help="average flipped predictions"),
            soft: bool = typer.Option(False, help="blend the top-k experts by distance instead of the nearest"),
            model_: str = typer.Option("experts", "--model", help="what runs on every tile: experts (each tile's "
                                       "routed expert), single (the single network) or generalist (what the experts "
                                       "were fine-tuned from: the best of the three on places the bundle never saw)"),
            routing: Optional[str] = typer.Option(None, help="tile (each tile to its nearest region's expert), smoothed "
                                                  "(majority of each tile and its neighbours) or scene (one expert per scene)"),
            unfamiliar: Optional[str] = typer.Option(None, help="on tiles unlike the training data: route (the nearest "
                                                     "region's expert, flagged), baseline (the single network), skip (nodata)"),
            bands: Optional[str] = typer.Option(None, help="three 1-based bands to read as RGB, e.g. 3,2,1 (default: the bundle's)"),
            bit_depth: Optional[int] = typer.Option(None, "--bit-depth", help="bits per sample of the inputs (default: "
                                                    "NBITS tag, else detected)"),
            gsd: Optional[float] = typer.Option(None, help="metres per pixel of inputs without a CRS (default: a "
                                                "locations.csv above them, else not resampled)"),
            mosaic: Optional[str] = typer.Option(None, help="predict the inputs as tiles of one scene named NAME (a "
                                                 "VRT over them in OUT): buildings across tile borders become one "
                                                 "footprint; tiles must share CRS, pixel size and pixel grid"),
            resume: bool = typer.Option(False, help="skip inputs whose outputs are complete"),
            no_regularize: bool = typer.Option(False, "--no-regularize"),
            min_area: Optional[float] = typer.Option(None, help="drop footprints smaller than this (m^2)"),
            engine: str = typer.Option("local", help="local (this process) or ray (scenes spread over a Ray cluster)"),
            address: Optional[str] = typer.Option(None, help="Ray cluster address for --engine ray (default: "
                                                  "RAY_ADDRESS, else a local cluster on this machine)"),
            workers: Optional[int] = typer.Option(None, help="Ray workers, each loading the bundle once (default: one "
                                                  "per --cpus-per-worker CPUs of the cluster)"),
            cpus_per_worker: float = typer.Option(1.0, "--cpus-per-worker"),
            gpus_per_worker: float = typer.Option(0.0, "--gpus-per-worker"),
            strip_rows: Optional[int] = typer.Option(None, "--strip-rows", help="--engine ray: split scenes of more "
                                                     "tile rows than this into strips over several workers")) -> None:
    """Predict GeoTIFF/VRT/PNG/JPEG files, folders or .txt lists into COG masks, routing and footprints."""
    from geomoe.bundle import load_bundle
    from geomoe.pipelines.inference import MODELS, ModelSpec
    from geomoe.pipelines.outputs import RunRequest
    from geomoe.pipelines.predict import predict_many

    if model_ not in MODELS:
        _fail(f"--model {model_}: choose {', '.join(MODELS)}")
    if model_ != "experts" and soft:
        _fail(f"--soft blends experts; it cannot be combined with --model {model_}")
    if unfamiliar not in (None, "route", "baseline", "skip"):
        _fail(f"--unfamiliar {unfamiliar}: choose route, baseline or skip")
    if routing not in (None, "tile", "smoothed", "scene"):
        _fail(f"--routing {routing}: choose tile, smoothed or scene")
    if engine not in ("local", "ray"):
        _fail(f"--engine {engine}: choose local or ray")
    band_list = None
    if bands is not None:
        try:
            band_list = [int(x) for x in bands.split(",")]
        except ValueError:
            _fail(f"--bands {bands}: give three band numbers, e.g. 3,2,1")
    spec = ModelSpec(str(bundle.resolve()), device, soft, tta, with_baseline=unfamiliar == "baseline", bands=band_list,
                     bit_depth=bit_depth, use=model_)
    try:
        model = spec.load() if engine == "local" else None
        if model is None:  # the Ray engine: checked here (a missing network fails before any worker starts)
            from geomoe.pipelines.inference import BundleModel

            model = BundleModel(load_bundle(bundle, "cpu", with_baseline=spec.with_baseline or model_ != "experts"),
                                use=model_)
        b = model.b
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    _out_dir(out)
    if mosaic is not None:
        inputs = [_mosaic(inputs, mosaic, out)]
    if unfamiliar == "baseline" and b.baseline is None:
        _fail(f"{bundle}: --unfamiliar baseline needs the single network, which this bundle does not have "
              f"(train with --baseline, or use --unfamiliar route or skip)")
    if gsd is not None and gsd <= 0:
        _fail(f"--gsd {gsd}: must be a positive number of metres per pixel")
    if soft and routing not in (None, "tile"):
        _fail(f"--soft blends experts per tile; it cannot be combined with --routing {routing}")
    if soft:
        routing = "tile"  # whatever the bundle's default: soft routing weighs each tile's own nearest experts
    cal = model.calibration  # threshold and smallest footprint of the network that runs
    upd = {k: v for k, v in {"overlap": overlap, "batch_size": batch_size, "tta": tta or None, "routing": routing, "unfamiliar": unfamiliar,
                             "min_area_m2": cal.min_area_m2 if min_area is None else min_area,
                             "regularize": False if no_regularize else None}.items() if v is not None}
    try:
        pcfg = b.config.predict.model_validate({**b.config.predict.model_dump(), **upd})
    except ValueError as e:
        _fail(str(e))
    if pcfg.tta:
        _warn_unflipped(b.config.experts, model_)
    req = RunRequest(pcfg, cal.threshold, gsd)  # the same request for either engine
    if engine == "local":
        model.tta = pcfg.tta
        results = predict_many(model, inputs, out, req, resume=resume)
    else:
        from geomoe.pipelines.ray_engine import EngineError, RayOptions, predict_many_ray

        spec.tta = pcfg.tta
        try:
            results = predict_many_ray(spec, model.identity, inputs, out, req,
                                       RayOptions(address, workers, cpus_per_worker, gpus_per_worker, strip_rows=strip_rows),
                                       resume=resume)
        except EngineError as e:
            _fail(str(e))
    t = Table(title="predict")
    for c in ("input", "status", "details"):
        t.add_column(c)
    for r in results:
        t.add_row(str(r.path), "[green]ok[/green]" if r.ok else "[red]failed[/red]", r.message)
    console.print(t)
    failed = sum(not r.ok for r in results)
    console.print(f"{len(results) - failed} done, {failed} failed; outputs in {out} (run summary: {out / 'run_summary.json'})")
    if failed:
        raise typer.Exit(1)


def _mosaic(inputs: list[Path], name: str, out: Path) -> Path:
    """The VRT of ``inputs``' tiles as OUT/NAME.vrt, or one line naming the tile that cannot join it."""
    from geomoe.pipelines.mosaic import write_mosaic
    from geomoe.pipelines.outputs import expand_inputs, outputs_for
    from geomoe.raster import RasterError

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        _fail(f"--mosaic {name}: give a plain name (letters, digits, '.', '_', '-'); the scene's outputs are named after it")
    dst = out / f"{name}.vrt"
    made = {q.resolve() for q in (dst, *outputs_for(dst, out).all())}  # a rerun's inputs may hold its own outputs
    tiles = [p for p in expand_inputs(inputs) if p.resolve() not in made]
    missing = [p for p in tiles if not p.exists()]
    if missing:
        _fail(f"{missing[0]}: no such file")
    try:
        vrt = write_mosaic(tiles, dst)
    except RasterError as e:
        _fail(str(e))
    console.print(f"mosaic of {len(tiles)} tiles: {vrt}")
    return vrt


@app.command()
def demo(out: Path = typer.Option(Path("demo_out"), "--out", "-o"), config: ConfigOpt = None,
         data: Optional[Path] = typer.Option(None, "--data", help="the sample folder (with train/ and scenes/); "
                                             "default: sample/ of the source checkout")) -> None:
    """Train the small configuration on the shipped sample, predict unseen scenes, write an HTML report."""
    from geomoe.pipelines.demo import SAMPLE, run_demo

    sample = data or SAMPLE
    if not (sample / "train").is_dir() or not (sample / "scenes").is_dir():
        _fail(f"{sample}: no demo sample here (it needs train/ and scenes/); the sample ships in the source "
              f"repository's sample/ folder: clone it and run 'geomoe demo --data PATH/TO/geomoe/sample'")
    report = run_demo(out, _config(config or "small"), sample)
    console.print(f"[green]report:[/green] {report.resolve()}")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line for the user ("warning: ..."), not Python's file, line and source (--debug keeps those)."""
    print(f"warning: {message}", file=file or sys.stderr, flush=True)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it logs every SIMD variant it tries
    logging.getLogger("pyogrio").setLevel(logging.WARNING)  # "Created N records" for every write
    # Lightning prints its own lines (and would print them twice through the root handler): keep its warnings only.
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.simplefilter("once")
    warnings.filterwarnings("ignore", category=ImportWarning)  # optional back-ends a library lacks (umap: TensorFlow)
    warnings.filterwarnings("ignore", category=PendingDeprecationWarning)  # affine's '*' notice, from rasterio itself
    # an input without a CRS is already named in one warning of ours; pyogrio would repeat it for every layer
    warnings.filterwarnings("ignore", message="'crs' was not provided")
    debug = "--debug" in sys.argv[1:]
    if debug:  # accepted anywhere on the line, not only before the command
        sys.argv.remove("--debug")
    else:
        warnings.showwarning = _show_warning
    from geomoe import interrupt

    interrupt.install()
    try:
        rc = app(standalone_mode=False)
        interrupt.check()  # a Ctrl-C whose KeyboardInterrupt Python dropped still ends as an interruption
    except (KeyboardInterrupt, click.exceptions.Abort):
        rc = 130
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except Exception as e:  # noqa: BLE001 - one line for the user; --debug shows the traceback
        if debug:
            raise
        from geomoe.raster import explain

        console.print(f"[red]error:[/red] {explain(e)} (rerun with --debug for the traceback)", highlight=False, soft_wrap=True)
        sys.exit(1)
    if rc == 130:  # Ctrl-C (typer turns it into exit code 130 without a word)
        print("interrupted: outputs are renamed into place only when complete, so none is partial; run the same "
              "command again to resume (predict: add --resume)", file=sys.stderr, flush=True)
    sys.exit(rc if isinstance(rc, int) else 0)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="show the full traceback of an error")) -> None:
    """Location-aware mixture of experts for building footprints."""


if __name__ == "__main__":
    main()
