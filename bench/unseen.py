"""A place the bundle never saw: leave one location out of training, then score the bundle on it.

The project is also judged on places it never sees. Here one location (default Banepa) is left out of everything
a bundle learns (embedding, regions, experts, single network, calibration), and the bundle trained on the other
locations is scored on the left-out location's windows: its validation windows decide whether tiles the router
flags unfamiliar should get the single network (``predict.unfamiliar``: route or baseline; evaluate's ``fallback``
row), its test windows are reported. Beside it, a bundle that did train on the location (the quality bench's) on
the same test windows: what not having seen the place costs.
Writes bench/results/unseen_LOCATION.json.
Usage: uv run python bench/unseen.py [--leave-out banepa] [--config medium] [--out bench/runs/unseen]
       [--bundle B (one trained without the location: reused)] [--seen bench/runs/quality/bundle]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from common import SHARED, record, write_json

from geomoe.backbone import pick_device
from geomoe.bundle import load_bundle
from geomoe.config import load_config
from geomoe.data.datasets import prepare
from geomoe.pipelines.evaluate import Evaluation, evaluate
from geomoe.pipelines.train import train_all

SHOWN = ("single", "generalist", "embedding", "smoothed", "fallback", "soft", "random", "best_expert")


def linked_root(data: Path, folder: Path, keep) -> Path:
    """A data root in ``folder`` of links to the locations of ``data`` that ``keep`` accepts, and their rows of
    locations.csv (resolution and CRS of the tiles without one)."""
    folder.mkdir(parents=True, exist_ok=True)
    with (data / "locations.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if keep(r["location"])]
    if not rows:
        raise SystemExit(f"{data / 'locations.csv'}: no location to link here (is --leave-out one of its locations?)")
    for r in rows:
        link = folder / r["location"]
        if not link.exists():
            link.symlink_to((data / r["location"]).resolve(), target_is_directory=True)
    with (folder / "locations.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return folder


def scores(ev: Evaluation, loc: str) -> dict[str, dict[str, float]]:
    """IoU and building F1 of each shown method at ``loc``."""
    iou, f1 = ev.pivot("iou"), ev.pivot("building_f1")
    return {m: {"iou": float(iou.loc[loc, m]), "building_f1": float(f1.loc[loc, m])} for m in SHOWN if m in iou}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=SHARED)
    ap.add_argument("--leave-out", default="banepa")
    ap.add_argument("--config", default="medium")
    ap.add_argument("--out", type=Path, default=Path("bench/runs/unseen"))
    ap.add_argument("--bundle", type=Path, default=None, help="a bundle trained without the location (reused)")
    ap.add_argument("--seen", type=Path, default=Path("bench/runs/quality/bundle"),
                    help="a bundle that trained on every location, scored on the same test windows")
    a = ap.parse_args()
    cfg = load_config(a.config)
    dev = pick_device(cfg.device)
    loc = a.leave_out
    bundle_dir = a.bundle
    if bundle_dir is None:  # train_all resumes: a rerun reuses the finished stages
        others = linked_root(a.data, a.out / "data", lambda name: name != loc)
        bundle_dir = train_all(others, cfg, a.out / "bundle")
    bundle = load_bundle(bundle_dir, dev)
    if loc in bundle.region_of_location:
        raise SystemExit(f"{bundle_dir}: this bundle trained on {loc}; give one trained without it")
    held = prepare(linked_root(a.data, a.out / "held", lambda name: name == loc), bundle.config.data, bundle.config.seed)
    val = evaluate(bundle, prep=held, split="val")
    test = evaluate(bundle, prep=held, split="test")
    flagged = {s: float(ev.routing.loc[loc, "unfamiliar"]) for s, ev in (("val", val), ("test", test))}
    routed = {s: {c: int(n) for c, n in ev.routing.loc[loc].items() if c != "unfamiliar"}
              for s, ev in (("val", val), ("test", test))}
    figures = {"left_out": loc, "bundle": str(bundle_dir), "val": scores(val, loc), "test": scores(test, loc),
               "unfamiliar_share": flagged, "tiles_per_expert": routed,
               "region_of_location": bundle.region_of_location}
    # decided on the validation windows only, by IoU (building F1 breaks ties): does the single network on
    # unfamiliar tiles beat routing them?
    v = figures["val"]
    fallback_wins = (v["fallback"]["iou"], v["fallback"]["building_f1"]) > (v["smoothed"]["iou"], v["smoothed"]["building_f1"])
    figures["validation_prefers"] = "baseline" if fallback_wins else "route"
    if a.seen and (a.seen / "manifest.json").exists():
        seen = evaluate(load_bundle(a.seen, dev), prep=held, split="test")
        figures["seen_test"] = scores(seen, loc)
        figures["seen_bundle"] = str(a.seen)
    per = ", ".join(f"{c}: {routed['val'][c]} / {routed['test'][c]}" for c in routed["val"])
    lines = [f"**{loc}, left out of training: IoU / building F1 on its windows** (share flagged unfamiliar: "
             f"validation {flagged['val']:.2f}, test {flagged['test']:.2f}; tiles routed, validation / test: {per}; "
             f"regions of the locations it trained on: {bundle.region_of_location})", "",
             "| method | validation (decides) | test (reported) |" + (" test, bundle that saw it |" if "seen_test" in figures else ""),
             "|---|---|---|" + ("---|" if "seen_test" in figures else "")]
    for m in figures["test"]:
        row = f"| {m} | {v[m]['iou']:.4f} / {v[m]['building_f1']:.4f} | " \
              f"{figures['test'][m]['iou']:.4f} / {figures['test'][m]['building_f1']:.4f} |"
        if "seen_test" in figures and m in figures["seen_test"]:
            row += f" {figures['seen_test'][m]['iou']:.4f} / {figures['seen_test'][m]['building_f1']:.4f} |"
        elif "seen_test" in figures:
            row += " |"
        lines.append(row)
    t = figures["test"]
    lines += ["", f"Validation IoU prefers `predict.unfamiliar: {figures['validation_prefers']}` on the unseen place "
              f"(fallback {v['fallback']['iou']:.4f} / {v['fallback']['building_f1']:.4f} against smoothed "
              f"{v['smoothed']['iou']:.4f} / {v['smoothed']['building_f1']:.4f}); on test: routed (smoothed) minus "
              f"single {100 * (t['smoothed']['iou'] - t['single']['iou']):+.2f} IoU points, fallback minus single "
              f"{100 * (t['fallback']['iou'] - t['single']['iou']):+.2f}.",
              "", "Methods as in `geomoe evaluate`; fallback = smoothed routing with the single network on the tiles "
              "the router flags unfamiliar (`predict --unfamiliar baseline`). Everything the bundle chose "
              "(checkpoints, threshold, separation, familiarity thresholds) it chose on the other locations' "
              "validation windows."]
    write_json(f"unseen_{loc}", figures, {"config": a.config, "left_out": loc})
    record(f"A place never seen: {loc} left out of training", "\n".join(lines),
           f"`{a.config}`, bundle `{bundle_dir}` trained on every location of {a.data} but {loc}")


if __name__ == "__main__":
    main()
