"""``geomoe train``: embedding, regions, one expert per region and the baseline, into one bundle.

Each stage leaves its output in the bundle directory and is skipped when that output exists, and
each training loop checkpoints every epoch, so a killed run picks up where it stopped.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from geomoe.backbone import pick_device
from geomoe.bundle import write_manifest
from geomoe.config import Config
from geomoe.data.datasets import Prepared, prepare
from geomoe.data.sampling import PatchRef
from geomoe.embedding.extract import Embeddings, extract
from geomoe.embedding.plot import plot_cluster_samples, plot_space
from geomoe.embedding.regions import assign
from geomoe.embedding.report import fit_regions
from geomoe.embedding.train import load_embedding, train_embedding
from geomoe.experts.train import ExpertJob, train_expert
from geomoe.router.routing import Router, majority_regions

log = logging.getLogger(__name__)


def refs_of(prep: Prepared, emb: Embeddings, keep: np.ndarray) -> list[PatchRef]:
    """The windows behind the selected embedding rows."""
    index = {str(r.scene.image): i for i, r in enumerate(prep.readers)}
    return [PatchRef(index[str(s)], int(w[0]), int(w[1]), int(w[2])) for s, w in zip(emb.scene[keep], emb.window[keep])]


def embed_stage(prep: Prepared, cfg: Config, out: Path, progress: bool = True) -> Embeddings:
    """Train (or reuse) the embedding network and embed every grid window of both splits."""
    model_path = out / "embedding" / "embedding.pt"
    if not model_path.exists():
        train_embedding(prep, cfg, out / "embedding", progress=progress)
    emb_path = out / "embedding" / "embeddings.npz"
    if emb_path.exists():
        return Embeddings.load(emb_path)
    model, _ = load_embedding(model_path, pick_device(cfg.device))
    emb = extract(model, prep, min_valid=cfg.data.min_valid, progress=progress)
    emb.save(emb_path)
    return emb


def train_all(root: Path, cfg: Config, out: Path, progress: bool = True, baseline: bool = True,
              figures: bool = True) -> Path:
    """Run the whole chain on ``root`` and write a complete bundle to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    prep = prepare(root, cfg.data, cfg.seed)
    log.info("data: %d scenes at %s, %d train / %d val windows", len(prep.readers), ", ".join(prep.locations),
             len(prep.windows("train")), len(prep.windows("val")))
    emb = embed_stage(prep, cfg, out, progress)
    fit = fit_regions(emb, cfg.regions.k, cfg.regions.sweep, out / "regions", cfg.regions.seed)
    log.info("regions (k = %d): purity %.3f, held-out patches in their location's majority region %.3f",
             cfg.regions.k, fit.chosen.purity, fit.chosen.held_out_majority)
    router = Router(fit.centroids)
    router.save(out / "router.faiss")
    if figures:
        plot_space(emb, fit.centroids, out / "figures" / "embedding_space.png", seed=cfg.seed)
        plot_cluster_samples(emb, fit.centroids, out / "figures" / "region_samples.png", target_gsd=cfg.data.target_gsd)

    regions = assign(emb.vectors, fit.centroids)
    train, val = emb.split == "train", emb.split == "val"
    steps = cfg.experts.epochs * cfg.experts.steps_per_epoch
    experts = []
    for i in range(cfg.regions.k):
        tr = refs_of(prep, emb, train & (regions == i))
        if not tr:
            raise ValueError(f"region {i} holds no training patch; lower regions.k (now {cfg.regions.k})")
        job = ExpertJob(f"region_{i}", tr, refs_of(prep, emb, val & (regions == i)), steps)
        log.info("expert %d: %d train / %d val windows", i, len(tr), len(job.val_refs))
        train_expert(prep, cfg, job, out / "experts", progress)
        experts.append(f"experts/region_{i}.pt")
    base = None
    if baseline:
        # The same number of optimisation steps as all experts together, so the comparison is fair.
        job = ExpertJob("baseline", None, prep.windows("val"), steps * cfg.regions.k)
        train_expert(prep, cfg, job, out / "experts", progress)
        base = "experts/baseline.pt"
    native = {loc: float(np.median([r.gsd for r in prep.readers if r.scene.location == loc and r.gsd]))
              for loc in prep.locations if any(r.gsd for r in prep.readers if r.scene.location == loc)}
    write_manifest(out, cfg, k=cfg.regions.k, locations=prep.locations,
                   region_of_location=majority_regions(emb.location[train], regions[train]),
                   experts=experts, baseline=base, gsd=cfg.data.target_gsd, native_gsd=native,
                   extra={"training_root": str(Path(root).resolve()), "regions": fit.chosen.row()})
    return out
