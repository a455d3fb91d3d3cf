"""``geomoe finetune``: adapt a bundle to a new geography, starting from the expert that fits it best."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from geomoe.bundle import MANIFEST, BundlePaths, load_bundle, save_manifest
from geomoe.data.datasets import prepare
from geomoe.embedding.extract import extract
from geomoe.experts.train import ExpertJob, train_expert
from geomoe.pipelines.train import refs_of
from geomoe.router.familiarity import Familiarity
from geomoe.router.routing import Router

log = logging.getLogger(__name__)


def finetune(bundle_dir: Path, root: Path, out: Path, region: int | None = None, new_region: bool = False,
             epochs: int | None = None, progress: bool = True) -> Path:
    """Write a copy of the bundle to ``out`` whose expert for ``root``'s imagery is fine-tuned on it.

    Without ``new_region`` the expert the router picks for most of ``root``'s patches (or ``region``)
    is fine-tuned in place. With ``new_region`` a centroid is added at the mean embedding of
    ``root``'s patches and its expert starts from the nearest existing one.
    """
    b = load_bundle(bundle_dir, with_baseline=False)
    cfg = b.config
    if epochs is not None:
        cfg = cfg.model_copy(update={"experts": cfg.experts.model_copy(update={"epochs": epochs})})
    prep = prepare(root, cfg.data, cfg.seed)
    emb = extract(b.embedding, prep, min_valid=cfg.data.min_valid, progress=progress)
    train, val = emb.split == "train", emb.split == "val"
    ids, _ = b.router.route(emb.vectors[train])
    nearest = int(np.bincount(ids, minlength=b.k).argmax())
    if out.resolve() != Path(bundle_dir).resolve():
        if out.exists():
            raise FileExistsError(f"{out}: already exists; choose a new output bundle")
        shutil.copytree(bundle_dir, out, ignore=shutil.ignore_patterns("*.ckpt", "runs", MANIFEST))
    m = dict(b.manifest)
    start = region if region is not None else nearest
    if not 0 <= start < b.k:
        raise ValueError(f"region {start} does not exist (the bundle has {b.k})")
    target = b.k if new_region else start
    # a new name for every fine-tune: into the same bundle, an earlier run's finished model must not count as done
    name = f"region_{target}_ft{len(m.get('finetuned', [])) + 1}"
    steps = cfg.experts.epochs * cfg.experts.steps_per_epoch
    job = ExpertJob(name, refs_of(prep, emb, train), refs_of(prep, emb, val), steps,
                    init_from=Path(bundle_dir) / b.manifest["experts"][start])
    log.info("fine-tuning from expert %d on %d patches of %s", start, int(train.sum()), ", ".join(prep.locations))
    train_expert(prep, cfg, job, out / "experts", progress)
    experts = list(m["experts"])
    if new_region:
        c = emb.vectors[train].mean(0)
        centroids = np.vstack([b.centroids, c / np.linalg.norm(c)]).astype(np.float32)
        with open(out / m["centroids"], "wb") as f:
            np.save(f, centroids)
        experts.append(f"experts/{name}.pt")
        m["k"] = b.k + 1
    else:
        experts[target] = f"experts/{name}.pt"
    # the region's familiarity threshold now also covers the new data (a new region gets its own)
    router = Router(np.load(out / m["centroids"]))
    ids2, dist2 = router.route(emb.vectors[train])
    fresh = Familiarity.fit(ids2, dist2, router.k, cfg.router.unfamiliar_quantile)
    old = b.familiarity.thresholds if b.familiarity is not None else np.full(b.k, np.inf)
    th = np.concatenate([old, np.full(router.k - len(old), -np.inf)])
    th = np.where(np.isfinite(fresh.thresholds), np.maximum(th, fresh.thresholds), th)
    fam_path = BundlePaths(out).familiarity
    Familiarity(fresh.quantile, np.where(np.isfinite(th), th, np.inf)).save(fam_path)
    m["familiarity"] = BundlePaths(out).rel(fam_path)
    # the fine-tuned expert serves its region (the user asked for it); regions the single network served keep it,
    # under its id after the experts (k + 1 with a new region)
    k = len(experts)
    serving = [r if s == r else k for r, s in enumerate(b.serving)] + ([target] if new_region else [])
    serving[target] = target
    m["serving"] = serving
    m["experts"] = experts
    m["region_of_location"] = {**m["region_of_location"], **{loc: target for loc in prep.locations}}
    m["finetuned"] = [*m.get("finetuned", []), {"root": str(Path(root).resolve()), "region": target, "from": start}]
    save_manifest(out, m)
    return out
