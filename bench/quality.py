"""Quality on the honest protocol: train on ../shared/data, report the test split (never used to choose anything).

Methods, per location and overall: single network (as many steps as generalist + experts), generalist, random
expert, routed experts from the generalist (tile by tile and spatially smoothed), location oracle, best-expert
oracle, soft routing; and the paper's from-scratch experts routed by the same embedding. Metrics: IoU, building
F1 at IoU 0.5, boundary IoU. Also a picture of a dense test area (image, truth, single, routed, outlines).
Writes bench/results/quality.json and appends the tables to bench/RESULTS.md.
Usage: uv run python bench/quality.py [--config medium] [--root ../shared/data] [--out bench/runs/quality]
       [--parts main,scratch,k5]   (finished parts are reused: a rerun only adds what is missing)
       [--results quality_gpu]     (JSON and picture names; the GPU run: --config bench/configs/gpu.yaml)
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from skimage.measure import label
from common import SHARED, record, write_json

from geomoe.backbone import pick_device
from geomoe.bundle import BundlePaths, load_bundle, sha256
from geomoe.config import load_config
from geomoe.data.datasets import GridDataset, prepare
from geomoe.embedding.extract import Embeddings
from geomoe.metrics import ERRORS_LEGEND, drop_small
from geomoe.pipelines.evaluate import (Evaluation, as_footprints, evaluate, markdown_table, min_pixels, route_batch,
                                      route_windows)
from geomoe.pipelines.footprints import window_footprints
from geomoe.pipelines.regularise import Regularisation
from geomoe.pipelines.train import expert_jobs, train_all

METRICS = ("iou", "building_f1", "boundary_iou", "accuracy")
# evaluate's method for each ``predict.routing``: the targets are met or not by what `geomoe predict` runs by default
# (per-scene routing has no window-level counterpart; its nearest is the neighbourhood majority)
ROUTED = {"tile": "embedding", "smoothed": "smoothed", "scene": "smoothed"}


def timed(out: Path, name: str, fn):
    """Run ``fn`` once and remember its wall time in out/times.json (a rerun reuses finished parts)."""
    tf = out / "times.json"
    times = json.loads(tf.read_text()) if tf.exists() else {}
    t0 = time.perf_counter()
    result = fn()
    if name not in times:
        times[name] = time.perf_counter() - t0
        tf.write_text(json.dumps(times, indent=2))
    return result


def scratch_bundle(root: Path, cfg, base: Path, out: Path) -> Path:
    """The paper's experts (from scratch, same regions and expert budget) beside the generalist-started bundle."""
    out.mkdir(parents=True, exist_ok=True)
    for part in ("embedding", "regions"):
        if not (out / part).exists():
            shutil.copytree(base / part, out / part, ignore=shutil.ignore_patterns("run", "runs", "*.ckpt"))
    scfg = cfg.model_copy(update={"experts": cfg.experts.model_copy(update={"init": "scratch"})})
    return train_all(root, scfg, out, baseline=False, figures=False,
                     only=[*(f"expert:{i}" for i in range(cfg.regions.k)), "assemble"])


def k_bundle(root: Path, cfg, k: int, base: Path, out: Path) -> Path:
    """Another k on the same embedding and generalist, with the same total fine-tuning steps as ``base``.

    When the steps come out the same, the single network is the same job and is reused, not retrained.
    """
    (out / "embedding").mkdir(parents=True, exist_ok=True)
    (out / "experts").mkdir(parents=True, exist_ok=True)
    for f in ("embedding/embedding.pt", "embedding/embeddings.npz", "experts/generalist.pt"):
        if not (out / f).exists():
            shutil.copy(base / f, out / f)
    x = cfg.experts
    total = x.expert_steps_total or x.epochs * x.steps_per_epoch * cfg.regions.k
    kcfg = cfg.model_copy(update={"regions": cfg.regions.model_copy(update={"k": k}),
                                  "experts": x.model_copy(update={"expert_steps_total": total})})
    train_all(root, kcfg, out, figures=True, only=["regions"])
    prep = prepare(root, kcfg.data, kcfg.seed)
    jobs = expert_jobs(prep, Embeddings.load(out / "embedding" / "embeddings.npz"),
                       np.load(out / "regions" / "centroids.npy"), kcfg, BundlePaths(out))
    base_jobs = expert_jobs(prep, Embeddings.load(base / "embedding" / "embeddings.npz"),
                            np.load(base / "regions" / "centroids.npy"), cfg, BundlePaths(base))
    if jobs["baseline"].steps == base_jobs["baseline"].steps and not (out / "experts" / "baseline.pt").exists():
        shutil.copy(base / "experts" / "baseline.pt", out / "experts" / "baseline.pt")
    return train_all(root, kcfg, out, figures=False)


def cached_evaluation(bundle_dir: Path, prep, dev, out: Path, tta: bool = False) -> Evaluation:
    """Evaluate ``bundle_dir`` on the test split once (``tta``: every model on the mean over flipped tiles, as
    ``predict --tta``); a rerun of the bench reads the written tables while the bundle's manifest is the one they
    were made with (a recalibrated bundle is evaluated again)."""
    stamp, sha = out / "bundle_manifest.sha256", sha256(BundlePaths(bundle_dir).manifest)
    if (out / "evaluation.csv").exists() and (out / "evaluation.json").exists() and stamp.exists() \
            and stamp.read_text().strip() == sha:
        return Evaluation.read(out)
    bundle = load_bundle(bundle_dir, dev)
    bundle.config.predict.tta = tta
    ev = evaluate(bundle, prep=prep, split="test")
    ev.write(out)
    stamp.write_text(sha + "\n")
    return ev


def served_by_single(bundle_dir: Path) -> dict[str, dict]:
    """The regions the single network serves (pipelines/serving.py), with the validation IoUs that decided it."""
    m = json.loads(BundlePaths(bundle_dir).manifest.read_text())
    serving, figures = m.get("serving") or [], m.get("serving_validation") or []
    return {f"region {r}": figures[r] if r < len(figures) else {} for r, s in enumerate(serving) if s != r}


def dense_picture(bundle, prep, out: Path, routed_by: str) -> Path:
    """The Banepa test window with the most separate buildings: image, truth, single, routed.

    Banepa, not Xiamen or Barnarp: this picture ships in docs/, and only the shipped sample's locations (Austin,
    Banepa, Kampala) may appear in what the project ships. Counted as connected building regions of the truth, not
    building pixels: the point is touching roofs, and the window with the most building pixels can be one large
    roof. Each model's mask as ``evaluate`` scores it (its calibrated threshold, watershed seeds and smallest
    footprint), outlined by the footprint polygons a user gets of it.
    """
    shipped = ("banepa", "kampala", "austin")
    refs = next((r for r in ([w for w in prep.windows("test") if prep.location_of(w) == loc] for loc in shipped)
                 if r), None)
    if refs is None:
        raise SystemExit("no test window of a shipped location (Banepa, Kampala, Austin) for the picture")
    ds = GridDataset(prep, refs)
    best = max(range(len(ds)), key=lambda i: int(label(ds[i]["mask"].numpy() > 0, connectivity=1).max()))
    d = ds[best]
    img = d["image"][None]
    routes = route_windows(bundle, prep, refs, progress=False)  # smoothing needs the window's neighbours
    one = [best]
    rb = route_batch(bundle, img, (routes.ids[one], routes.distance[one], routes.soft_ids[one], routes.soft_w[one]))
    rb.smoothed = routes.smoothed[one]
    none = np.zeros(1, np.int64)  # the random and oracle choices are not drawn
    px_of = prep.readers[refs[best].scene]
    valid = d["valid"].numpy().astype(bool)

    squaring = Regularisation.of(bundle.config.predict)

    rules = bundle.calibrations("experts")  # each network's calibration, as evaluate and predict use them

    def footprints(method: str) -> tuple[np.ndarray, list]:
        """The mask as evaluate scores it, and the polygons a user gets of it (as rows and columns)."""
        masks, cals = rb.method_masks(method, rules, none, None)
        m, c = masks[0] & valid, cals[0]
        scored, gsd = drop_small(m, min_pixels(px_of, c.min_area_m2), ~valid), px_of.target_gsd or px_of.gsd
        if not gsd:
            return scored, []
        gdf, t = window_footprints(m, gsd, c.min_area_m2, squaring, valid)
        rings = [np.asarray(p.exterior.coords) for g in gdf.geometry for p in getattr(g, "geoms", [g])]
        return scored, [np.c_[~t * (r[:, 0], r[:, 1])] for r in rings]  # back to columns and rows

    routed, single = footprints(routed_by), footprints("single")
    truth = d["mask"].numpy() > 0
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.4))
    rgb = d["image"].permute(1, 2, 0).numpy()
    for ax, (title, m) in zip(axes, (("image", None), ("truth", (truth, None)), ("single network", single),
                                      (f"routed (expert {int(getattr(rb, routed_by)[0])})", routed))):
        ax.imshow(rgb)
        if m is not None:
            mask, rings = m
            ax.imshow(np.ma.masked_where(~mask, mask), cmap="autumn", alpha=0.35, vmin=0, vmax=1)
            if rings is None and mask.any():
                ax.contour(mask.astype(float), levels=[0.5], colors="yellow", linewidths=0.7)
            for r in rings or []:  # the footprints as delivered: squared where faithful, simplified elsewhere
                ax.plot(r[:, 0] - 0.5, r[:, 1] - 0.5, color="yellow", linewidth=0.8)
            ax.set_xlim(-0.5, mask.shape[1] - 0.5)
            ax.set_ylim(mask.shape[0] - 0.5, -0.5)
        ax.set_title(title)
        ax.axis("off")
    fig.suptitle(f"dense test area ({int(label(truth, connectivity=1).max())} buildings in the truth): "
                 f"{prep.location_of(refs[best])}, {Path(prep.readers[refs[best].scene].scene.image).name}")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def targets_of(iou: pd.DataFrame, f1: pd.DataFrame, routed: str, single: str = "single",
               oracle: bool = True) -> dict:
    """The issue's targets for the routed experts as evaluate's method ``routed`` runs them, against ``single``;
    ``oracle`` False leaves out the location oracle (a mask: not comparable with footprint rows)."""
    locs = [l for l in iou.index if l != "overall"]
    return {
        "routed_method": routed,
        "routed_at_or_above_single_every_location": bool((iou.loc[locs, routed] >= iou.loc[locs, single]).all()),
        "routed_minus_single_overall_iou_points": float(100 * (iou.loc["overall", routed] - iou.loc["overall", single])),
        # not a target: the overall IoU pools every location's pixels, so a location of low IoU (Xiamen, whose
        # labels sit off its roofs) that gains pixels weighs more in it even where its own IoU rises; the mean
        # over locations counts each place once
        "routed_minus_single_mean_location_iou_points": float(100 * (iou.loc[locs, routed].mean()
                                                                     - iou.loc[locs, single].mean())),
        "routed_building_f1_overall": float(f1.loc["overall", routed]),
        "router_minus_location_oracle_iou_points": float(100 * (iou.loc["overall", routed] - iou.loc["overall", "location_oracle"]))
        if oracle and "location_oracle" in iou else float("nan"),
    }


def targets_line(t: dict) -> str:
    d = t["router_minus_location_oracle_iou_points"]
    oracle = "" if np.isnan(d) else \
        f"; router vs location oracle {d:+.2f} points (target within 1.0: {'met' if d >= -1.0 else 'NOT met'})"
    return (f"routed experts ({t['routed_method']}) at or above the single network at every location: "
            f"{'met' if t['routed_at_or_above_single_every_location'] else 'NOT met'}; "
            f"overall {t['routed_minus_single_overall_iou_points']:+.2f} IoU points (target +2.0: "
            f"{'met' if t['routed_minus_single_overall_iou_points'] >= 2.0 else 'NOT met'}; mean over locations "
            f"{t['routed_minus_single_mean_location_iou_points']:+.2f}, not a target); building F1 "
            f"{t['routed_building_f1_overall']:.3f} (target 0.5: {'met' if t['routed_building_f1_overall'] >= 0.5 else 'NOT met'})"
            f"{oracle}.")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", type=Path, default=SHARED)
    ap.add_argument("--out", type=Path, default=Path("bench/runs/quality"))
    ap.add_argument("--config", default="medium")
    ap.add_argument("--results", default="quality", help="name of the JSON under bench/results/ and of the picture "
                    "under docs/ (e.g. quality_gpu for the GPU run, so it does not replace the CPU run's figures)")
    ap.add_argument("--parts", default="main,scratch,k5,tta",
                    help="main (generalist-started experts, k from the config), scratch (the paper's experts, same "
                         "regions), k5 (k = 5 on the same embedding and generalist), tta (main's bundle, every model "
                         "on the mean over flipped tiles: predict --tta); finished parts are reused")
    a = ap.parse_args()
    parts = [p.strip() for p in a.parts.split(",")]
    cfg = load_config(a.config)
    dev = pick_device(cfg.device)
    a.out.mkdir(parents=True, exist_ok=True)
    base = timed(a.out, "train", lambda: train_all(a.root, cfg, a.out / "bundle"))
    prep = prepare(a.root, cfg.data, cfg.seed)
    ev = timed(a.out, "evaluate", lambda: cached_evaluation(base, prep, dev, a.out / "evaluation"))
    tables = {f"k{cfg.regions.k}": ev.table}
    table = ev.table.copy()
    if "scratch" in parts:
        sb = timed(a.out, "scratch", lambda: scratch_bundle(a.root, cfg, base, a.out / "scratch"))
        sev = timed(a.out, "evaluate_scratch", lambda: cached_evaluation(sb, prep, dev, a.out / "evaluation_scratch"))
        extra = sev.table[sev.table.method.isin(["embedding", "smoothed", "best_expert", "location_oracle"])].copy()
        extra["method"] = "scratch_" + extra["method"]
        table = pd.concat([table, extra], ignore_index=True)
    routing = {f"k{cfg.regions.k}": ev.routing}
    if "k5" in parts and cfg.regions.k != 5:
        kb = timed(a.out, "k5", lambda: k_bundle(a.root, cfg, 5, base, a.out / "k5"))
        kev = timed(a.out, "evaluate_k5", lambda: cached_evaluation(kb, prep, dev, a.out / "evaluation_k5"))
        tables["k5"] = kev.table
        routing["k5"] = kev.routing
    if "tta" in parts:  # the same bundles and footprint choices; only the models' answers are flip-averaged
        tev = timed(a.out, "evaluate_tta", lambda: cached_evaluation(base, prep, dev, a.out / "evaluation_tta", True))
        tables["tta"] = tev.table
    main_bundle = load_bundle(base, dev)
    routed_by = ROUTED[cfg.predict.routing]  # the configuration's default routing, chosen on validation
    pic = dense_picture(main_bundle, prep, Path("docs") / f"{a.results}_dense_test_area.png", routed_by)
    # threshold, separation and smallest footprint as chosen on the validation windows (pipelines/calibrate.py)
    calib = {w: main_bundle.calibration(w).as_dict() for w in ("experts", "single")}
    calib |= {f"expert {i}": c for i, c in enumerate((main_bundle.manifest.get("calibration") or {}).get("each_expert")
                                                     or [])}
    times = json.loads((a.out / "times.json").read_text())
    minutes = sum(times.values()) / 60

    piv = {m: table.pivot(index="location", columns="method", values=m) for m in METRICS}
    targets = targets_of(piv["iou"], piv["building_f1"], routed_by)
    tile_targets = targets_of(piv["iou"], piv["building_f1"], "embedding")
    # the same targets on the footprints a user gets (polygons, squared, rasterised back), where evaluate scored them
    delivered = targets_of(piv["iou"], piv["building_f1"], as_footprints(routed_by), as_footprints("single"),
                           oracle=False) if as_footprints(routed_by) in piv["iou"] else None
    md = []
    for m, title in (("iou", "IoU"), ("building_f1", "Building F1 (IoU >= 0.5)"), ("boundary_iou", "Boundary IoU")):
        md.append(f"**{title}, test split, k = {cfg.regions.k}**\n\n" + markdown_table(piv[m]))
    for name, t in tables.items():
        if name == f"k{cfg.regions.k}":
            continue
        kp = {m: t.pivot(index="location", columns="method", values=m) for m in ("iou", "building_f1")}
        md.append(f"**{name}: IoU and building F1, test split**\n\n" + markdown_table(kp["iou"]) + "\n\n"
                  + markdown_table(kp["building_f1"]))
        md.append(f"{name} targets: " + targets_line(targets_of(kp["iou"], kp["building_f1"], routed_by)))
    errors = ev.errors(["single", routed_by])
    if errors is not None:  # why building F1 is what it is: merged blobs, missed or shifted buildings
        md.append(f"**What became of the test split's true buildings** ({ERRORS_LEGEND})\n\n" + markdown_table(errors))
    for name, r in routing.items():
        md.append(f"**{name}: embedding routing, test tiles per expert**\n\n" + markdown_table(r))
    md.append("Footprints chosen on the validation windows (never the test split; experts: the shared choice, then "
              "each expert's own, which prediction and evaluation use): " + "; ".join(
        f"{w}: threshold {c['threshold']:g}, seeds {c['separation']['seed_threshold']:g} / "
        f"{c['separation']['seed_distance']:g} px, smallest {c['min_area_m2']:g} m2" for w, c in calib.items()) + ".")
    served = {"main": served_by_single(base), **({"k5": served_by_single(a.out / "k5")} if "k5" in tables else {})}
    md.append("Regions served by the single network, chosen on validation (pipelines/serving.py; the IoUs on the "
              "region's validation windows): " + "; ".join(
        f"{name}: " + (", ".join(f"{r} (expert {v.get('expert_iou')}, single {v.get('single_iou')}, "
                                 f"{v.get('windows')} windows)" for r, v in regions.items()) or "none")
        for name, regions in served.items()) + ".")
    md.append(f"Targets (k = {cfg.regions.k}, `predict.routing: {cfg.predict.routing}`): " + targets_line(targets))
    if routed_by != "embedding":
        md.append("Tile by tile, the same experts: " + targets_line(tile_targets))
    if delivered is not None:
        md.append("As delivered (both sides' footprint polygons, squared, rasterised back; the `*_footprints` "
                  "columns): " + targets_line(delivered))
    md.append(f"Wall time {minutes:.1f} min in all ("
              + ", ".join(f"{k} {v / 60:.1f}" for k, v in times.items()) + " min). "
              f"Picture: `{pic}`. Methods: single = generalist trained on for the experts' total steps; "
              f"embedding = routed experts (fine-tuned from the generalist), tile by tile; smoothed = majority of "
              f"neighbouring tiles; scratch_* = the paper's experts trained from scratch, same regions and budget.")
    if "tta" in tables:
        md.append("tta: the main bundle with every model (single network included) on the mean over the tile and "
                  "its three flips (`predict --tta`, `evaluate --tta`; four times the model's work), footprints "
                  "chosen on validation without flips.")
    record(f"Quality: honest protocol, `{a.config}`, k = {cfg.regions.k}" + (", k = 5" if "k5" in tables else "")
           + (", flip averaging" if "tta" in tables else ""),
           "\n\n".join(md), f"`{a.config}` on {a.root} (test split)")
    write_json(a.results, {
        "wall_minutes": minutes, "times_s": times, "targets": targets, "targets_tile_routing": tile_targets,
        "targets_footprints": delivered,
        "calibration": calib, "served_by_single": served,
        "footprint_errors": None if errors is None else {
            f"{method}/{loc}": {k: int(v) for k, v in row.items()} for (method, loc), row in errors.iterrows()},
        "table": {m: {loc: {k: (None if pd.isna(v) else float(v)) for k, v in row.items()}
                      for loc, row in piv[m].iterrows()} for m in METRICS},
        "other_runs": {name: {m: {loc: {k: (None if pd.isna(v) else float(v)) for k, v in row.items()}
                               for loc, row in t.pivot(index="location", columns="method", values=m).iterrows()}
                           for m in METRICS} for name, t in tables.items() if name != f"k{cfg.regions.k}"},
    }, {"config": a.config, "k": cfg.regions.k, **cfg.model_dump(mode="json")})


if __name__ == "__main__":
    main()
