"""The report's interactive sections, shared by ``geomoe demo`` and ``geomoe report``: the embedding explorer,
maps of predicted scenes, and the metrics per location as a chart and a table."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from geomoe.bundle import Bundle
from geomoe.data.datasets import Prepared
from geomoe.metrics import ERRORS_LEGEND
from geomoe.pipelines.explorer import (embedded_patches, explorer, metrics_chart, patch_points, scene_map,
                                       scene_points)
from geomoe.pipelines.evaluate import Evaluation
from geomoe.pipelines.report import Section

log = logging.getLogger(__name__)


@dataclass
class PredictedScene:
    """One input of a prediction run and its outputs, as its run summary records them."""

    name: str
    image: Path
    routing: Path | None
    footprints: Path | None
    summary: dict


def predicted_scenes(folder: Path) -> list[PredictedScene]:
    """Every finished prediction in ``folder`` (one ``*_summary.json`` each), or one line saying there is none."""
    sums = sorted(p for p in folder.glob("*_summary.json") if p.name != "run_summary.json")
    if not sums:
        raise ValueError(f"{folder}: no finished predictions here (no *_summary.json); run 'geomoe predict ... -o {folder}' first")
    out = []
    for p in sums:
        s = json.loads(p.read_text())
        outs = [Path(o) for o in s.get("outputs", [])]
        routing = next((o for o in outs if o.name.endswith("_routing.gpkg")), None)
        fps = next((o for o in outs if o.name.endswith("_footprints.gpkg")), None)
        out.append(PredictedScene(p.name[: -len("_summary.json")], Path(s["input"]), routing, fps, s))
    return out


def bundle_of_predictions(scenes: list[PredictedScene]) -> Path | None:
    """The bundle the summaries name (``path#hash``), when it still exists."""
    for s in scenes:
        b = (s.summary.get("bundle") or "").split("#")[0]
        if b and (Path(b) / "manifest.json").exists():
            return Path(b)
    return None


def explorer_section(bundle: Bundle, prep: Prepared | None, scenes: list[PredictedScene], limit: int = 3000,
                     scene_limit: int = 400) -> Section:
    """Every embedded patch (at most ``limit``) and the predicted scenes' tiles in one interactive space."""
    data = patch_points(embedded_patches(bundle.root), prep, limit, bundle.config.seed)
    for s in scenes:
        if s.image.exists():
            data.sets.append(scene_points(bundle, s.image, bundle.config.predict, scene_limit, s.name))
        else:
            log.warning("%s: the scene's image is gone; its tiles are not in the explorer", s.image)
    text = ("Each point is a patch, placed by a UMAP of its 2048-d embedding; crosses are the region centroids. "
            "Tiles farther from their centroid than the region's training tiles are marked unfamiliar.")
    if prep is None:
        text += " The training imagery was not found, so tooltips show no picture."
    return Section("Embedding explorer", text, plots=[("embedding space: hover a point, click the legend to hide a "
                                                        "location, choose the colouring above", explorer(bundle, data))])


def maps_section(scenes: list[PredictedScene], table: bool = True) -> Section:
    """A zoomable map per predicted scene: image, footprint outlines, routing layer (and a table of the runs)."""
    plots, rows = [], []
    for s in scenes:
        if not s.image.exists():
            log.warning("%s: the scene's image is gone; no map", s.image)
            continue
        plots.append((f"{s.name}: footprints (yellow) and the expert that each tile was routed to",
                      scene_map(s.image, s.routing, s.footprints, s.name)))
        rows.append({"scene": s.name, "tiles": s.summary.get("tiles"), "footprints": s.summary.get("footprints"),
                     "unfamiliar tiles": s.summary.get("unfamiliar_tiles"), "routing": s.summary.get("routing"),
                     "tiles per expert": str(s.summary.get("tiles_per_expert"))})
    tables = [("Runs", pd.DataFrame(rows).set_index("scene"))] if rows and table else []
    return Section("Maps of predicted scenes", "Wheel to zoom, drag to pan; hover a tile for its expert and distance.",
                   tables, plots=plots)


def metrics_section(ev: Evaluation, split: str = "test") -> Section:
    """Per-location metrics as charts and tables."""
    tables = [("IoU by location and method", ev.pivot("iou")), ("Building F1 (IoU >= 0.5)", ev.pivot("building_f1")),
              ("Tiles per expert (embedding routing) and share flagged unfamiliar", ev.routing)]
    errors = ev.errors()
    if errors is not None:  # why building F1 is what it is
        tables.insert(2, (f"What became of the true buildings ({ERRORS_LEGEND})", errors.xs("overall", level="location")))
    return Section(f"Metrics per location ({split} split)", "Cumulative IoU over all pixels of a location; building F1 "
                   "counts a building found when a predicted footprint overlaps it at IoU 0.5 or more.", tables,
                   plots=[("IoU per location and method", metrics_chart(ev.table, "iou")),
                          ("building F1 per location and method", metrics_chart(ev.table, "building_f1"))])
