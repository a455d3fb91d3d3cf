"""``geomoe demo``: the whole product on the shipped sample, ending in an HTML report."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pandas as pd

from geomoe.backbone import pick_device
from geomoe.bundle import load_bundle
from geomoe.config import Config
from geomoe.data.catalog import discover
from geomoe.data.check import check_catalog
from geomoe.data.datasets import prepare
from geomoe.data.show import show_patches
from geomoe.pipelines.evaluate import evaluate
from geomoe.pipelines.inference import BundleModel
from geomoe.pipelines.predict import predict_raster
from geomoe.pipelines.report import Section, write_report
from geomoe.pipelines.report_sections import explorer_section, maps_section, metrics_section, predicted_scenes
from geomoe.pipelines.scene_plots import plot_scene
from geomoe.pipelines.show import show_results
from geomoe.pipelines.train import train_all

log = logging.getLogger(__name__)
SAMPLE = Path(__file__).resolve().parents[1] / "sample"


class Stopwatch:
    """Wall time of each demo step, logged as it ends and kept for the report."""

    def __init__(self):
        self.t = time.perf_counter()
        self.steps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.steps[name] = now - self.t
        self.t = now
        log.info("demo: %s took %.0f s", name, self.steps[name])


def run_demo(out: Path, cfg: Config, sample: Path = SAMPLE, progress: bool = True) -> Path:
    """Check, train, evaluate, predict two unseen scenes and write ``out/report.html``."""
    t0 = time.perf_counter()
    watch = Stopwatch()
    root, scenes = sample / "train", sample / "scenes"
    fig = out / "figures"
    cat = discover(root)
    _, sums = check_catalog(cat, progress=progress)
    data_table = pd.DataFrame([{"location": s.location, "images": s.images, "usable": s.usable,
                                "building %": 100 * s.building_fraction, "GSD (m)": min(s.gsd) if s.gsd else None,
                                "CRS": ", ".join(sorted(s.crs))} for s in sums]).set_index("location")
    prep = prepare(root, cfg.data, cfg.seed)
    show_patches(prep, fig / "patches.png", n=8)
    watch.lap("data check")
    log.info("training the %s-expert bundle on %s", cfg.regions.k, root)
    bundle_dir = train_all(root, cfg, out / "bundle", progress=progress)
    watch.lap("training")
    bundle = load_bundle(bundle_dir, pick_device(cfg.device))
    ev = evaluate(bundle, prep=prep, progress=progress)
    ev.write(out / "evaluation")
    show_results(bundle, prep, fig / "results.png", n=6)
    watch.lap("evaluation")
    model = BundleModel(bundle)
    scene_imgs, scene_rows = [], []
    for img in sorted(p for p in scenes.glob("*.tif") if not p.stem.endswith("_mask")):
        truth = img.with_name(f"{img.stem}_mask.tif")
        truth = truth if truth.exists() else None
        outs, st = predict_raster(model, img, out / "predictions", bundle.config.predict, bundle.threshold, progress)
        pic = plot_scene(img, outs, fig / f"scene_{img.stem}.png", truth)
        scene_imgs.append((f"{img.name}: not seen in training", pic))
        scene_rows.append({"scene": img.name, "tiles": st.tiles, "tiles/s": st.tiles / st.seconds,
                           "footprints": st.footprints, "unfamiliar tiles": st.unfamiliar,
                           "tiles per expert": str(dict(sorted(st.per_expert.items())))})
    watch.lap("prediction")
    predicted = predicted_scenes(out / "predictions")
    explore = explorer_section(bundle, prep, predicted)
    watch.lap("explorer")
    minutes = (time.perf_counter() - t0) / 60
    regions = bundle.manifest.get("regions", {})
    sections = [
        Section("Data", f"Shipped sample ({cat.layout} layout): real imagery from three places. See NOTICE for licences.",
                [("Per location", data_table)], [("random training patches, buildings in red", fig / "patches.png")]),
        explore,
        Section("Embedding space and regions",
                f"k = {bundle.k} regions. Purity {regions.get('purity', float('nan')):.3f}; held-out patches in their "
                f"location's majority region: {regions.get('held_out_majority', float('nan')):.3f}.",
                [], [("UMAP and t-SNE, by location and by region", bundle_dir / "figures" / "embedding_space.png"),
                     ("sample patches per region", bundle_dir / "figures" / "region_samples.png")]),
        Section("Held-out evaluation", "Spatial hold-out of the sample; cumulative IoU over all pixels of a location.",
                [("Pixel accuracy", ev.pivot("accuracy"))],
                [("image / truth / prediction / routed expert", fig / "results.png")]),
        metrics_section(ev, "held-out"),
        Section("Prediction on unseen scenes", "Streamed, routed tile by tile, blended without seams; footprints regularised.",
                [("Runs", pd.DataFrame(scene_rows).set_index("scene"))], scene_imgs),
        maps_section(predicted, table=False),
    ]
    report = write_report(out / "report.html", "geomoe demo",
                          f"small configuration; finished in {minutes:.1f} min ("
                          + ", ".join(f"{k} {v / 60:.1f}" for k, v in watch.steps.items()) + " min)", sections)
    log.info("demo finished in %.1f min", minutes)
    return report
