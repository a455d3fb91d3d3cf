"""Quality on the honest protocol: train on ../shared/data, report the test split (never used to choose anything).

Methods, per location and overall: single network (as many steps as generalist + experts), generalist, random
expert, routed experts from the generalist (tile by tile and spatially smoothed), location oracle, best-expert
oracle, soft routing; and the paper's from-scratch experts routed by the same embedding. Metrics: IoU, building
F1 at IoU 0.5, boundary IoU. Also a picture of a dense test area (image, truth, single, routed, outlines).
Writes bench/results/quality.json and appends the tables to bench/RESULTS.md.
Usage: uv run python bench/quality.py [--config medium] [--root ../shared/data] [--out bench/runs/quality]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from common import SHARED, record, write_json

from geomoe.backbone import pick_device
from geomoe.bundle import load_bundle
from geomoe.config import load_config
from geomoe.data.datasets import GridDataset, prepare
from geomoe.experts.model import predict_probs
from geomoe.pipelines.evaluate import evaluate, markdown_table, route_batch
from geomoe.pipelines.train import train_all

METRICS = ("iou", "building_f1", "boundary_iou", "accuracy")


def scratch_bundle(root: Path, cfg, base: Path, out: Path) -> Path:
    """The paper's experts (from scratch, same regions and expert budget) beside the generalist-started bundle."""
    out.mkdir(parents=True, exist_ok=True)
    for part in ("embedding", "regions"):
        if not (out / part).exists():
            shutil.copytree(base / part, out / part, ignore=shutil.ignore_patterns("run", "runs", "*.ckpt"))
    shutil.copy(base / "router.faiss", out / "router.faiss")
    scfg = cfg.model_copy(update={"experts": cfg.experts.model_copy(update={"init": "scratch"})})
    return train_all(root, scfg, out, baseline=False, figures=False,
                     only=[*(f"expert:{i}" for i in range(cfg.regions.k)), "assemble"])


def dense_picture(bundle, prep, out: Path) -> Path:
    """The test window with the most buildings in Banepa (or Xiamen): image, truth, single, routed, outlines."""
    refs = [r for r in prep.windows("test") if prep.location_of(r) in ("banepa", "xiamen")] or prep.windows("test")
    ds = GridDataset(prep, refs)
    best = max(range(len(ds)), key=lambda i: float(ds[i]["mask"].mean()))
    d = ds[best]
    img = d["image"][None]
    rb = route_batch(bundle, img)
    routed = rb.probs[int(rb.embedding[0]), 0].numpy() >= bundle.threshold
    single = predict_probs(bundle.baseline, img, bundle.device)[0].numpy() >= bundle.threshold
    truth = d["mask"].numpy() > 0
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.4))
    rgb = d["image"].permute(1, 2, 0).numpy()
    for ax, (title, m) in zip(axes, (("image", None), ("truth", truth), ("single network", single),
                                      (f"routed (expert {int(rb.embedding[0])})", routed))):
        ax.imshow(rgb)
        if m is not None:
            ax.imshow(np.ma.masked_where(~m, m), cmap="autumn", alpha=0.35, vmin=0, vmax=1)
            if m.any():
                ax.contour(m.astype(float), levels=[0.5], colors="yellow", linewidths=0.7)
        ax.set_title(title)
        ax.axis("off")
    fig.suptitle(f"dense test area: {prep.location_of(refs[best])}, {Path(prep.readers[refs[best].scene].scene.image).name}")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", type=Path, default=SHARED)
    ap.add_argument("--out", type=Path, default=Path("bench/runs/quality"))
    ap.add_argument("--config", default="medium")
    ap.add_argument("--no-scratch", action="store_true", help="skip the from-scratch experts")
    a = ap.parse_args()
    cfg = load_config(a.config)
    dev = pick_device(cfg.device)
    t0 = time.perf_counter()
    train_all(a.root, cfg, a.out / "bundle")
    t_train = time.perf_counter() - t0
    prep = prepare(a.root, cfg.data, cfg.seed)
    bundle = load_bundle(a.out / "bundle", dev)
    ev = evaluate(bundle, prep=prep, split="test")
    ev.write(a.out / "evaluation")
    table = ev.table.copy()
    t_scratch = 0.0
    if not a.no_scratch:
        t1 = time.perf_counter()
        sb = scratch_bundle(a.root, cfg, a.out / "bundle", a.out / "scratch")
        t_scratch = time.perf_counter() - t1
        sev = evaluate(load_bundle(sb, dev), prep=prep, split="test")
        extra = sev.table[sev.table.method.isin(["embedding", "smoothed", "best_expert"])].copy()
        extra["method"] = "scratch_" + extra["method"]
        table = pd.concat([table, extra], ignore_index=True)
    pic = dense_picture(bundle, prep, Path("docs") / "quality_dense_test_area.png")
    minutes = (time.perf_counter() - t0) / 60

    piv = {m: table.pivot(index="location", columns="method", values=m) for m in METRICS}
    iou = piv["iou"]
    locs = [l for l in iou.index if l != "overall"]
    targets = {
        "routed_at_or_above_single_every_location": bool((iou.loc[locs, "embedding"] >= iou.loc[locs, "single"]).all()),
        "routed_minus_single_overall_iou_points": float(100 * (iou.loc["overall", "embedding"] - iou.loc["overall", "single"])),
        "routed_building_f1_overall": float(piv["building_f1"].loc["overall", "embedding"]),
        "router_minus_location_oracle_iou_points": float(100 * (iou.loc["overall", "embedding"] - iou.loc["overall", "location_oracle"]))
        if "location_oracle" in iou else float("nan"),
    }
    md = []
    for m, title in (("iou", "IoU"), ("building_f1", "Building F1 (IoU >= 0.5)"), ("boundary_iou", "Boundary IoU")):
        md.append(f"**{title}, test split**\n\n" + markdown_table(piv[m]))
    md.append("**Embedding routing: test tiles per expert**\n\n" + markdown_table(ev.routing))
    md.append(
        f"Targets: routed experts at or above the single network at every location: "
        f"{'met' if targets['routed_at_or_above_single_every_location'] else 'NOT met'}; "
        f"overall {targets['routed_minus_single_overall_iou_points']:+.2f} IoU points (target +2.0: "
        f"{'met' if targets['routed_minus_single_overall_iou_points'] >= 2.0 else 'NOT met'}); building F1 "
        f"{targets['routed_building_f1_overall']:.3f} (target 0.5: {'met' if targets['routed_building_f1_overall'] >= 0.5 else 'NOT met'}); "
        f"router vs location oracle {targets['router_minus_location_oracle_iou_points']:+.2f} points (target within 1.0: "
        f"{'met' if abs(targets['router_minus_location_oracle_iou_points']) <= 1.0 or targets['router_minus_location_oracle_iou_points'] > 0 else 'NOT met'}).")
    md.append(f"Wall time {minutes:.1f} min (training {t_train / 60:.1f} min, from-scratch experts {t_scratch / 60:.1f} min). "
              f"Picture: `{pic}`. Methods: single = generalist trained on for the experts' total steps; "
              f"embedding = routed experts (fine-tuned from the generalist), tile by tile; smoothed = majority of "
              f"neighbouring tiles; scratch_* = the paper's experts trained from scratch, same regions and budget.")
    record(f"Quality: honest protocol, `{a.config}`, k = {cfg.regions.k}", "\n\n".join(md),
           f"`{a.config}` on {a.root} (test split)")
    write_json("quality", {
        "wall_minutes": minutes, "targets": targets,
        "table": {m: {loc: {k: (None if pd.isna(v) else float(v)) for k, v in row.items()}
                      for loc, row in piv[m].iterrows()} for m in METRICS},
    }, {"config": a.config, "k": cfg.regions.k, **cfg.model_dump(mode="json")})


if __name__ == "__main__":
    main()
