"""Quality: train the small configuration on ../shared/data and print the paper's table for every router.

Also trains the embedding without its triplet term (the ablation) and compares the regions.
Usage: uv run python bench/quality.py [--root ../shared/data] [--out bench/runs/quality] [--embed-epochs 12]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import SHARED, record

from geomoe.backbone import pick_device
from geomoe.bundle import load_bundle
from geomoe.config import load_config
from geomoe.data.datasets import prepare
from geomoe.embedding.extract import extract
from geomoe.embedding.plot import plot_space
from geomoe.embedding.report import fit_regions
from geomoe.embedding.train import load_embedding, train_embedding
from geomoe.pipelines.evaluate import evaluate
from geomoe.pipelines.train import train_all


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", type=Path, default=SHARED)
    ap.add_argument("--out", type=Path, default=Path("bench/runs/quality"))
    ap.add_argument("--config", default="small")
    ap.add_argument("--embed-epochs", type=int, default=12)
    ap.add_argument("--embed-steps", type=int, default=30)
    a = ap.parse_args()
    cfg = load_config(a.config)
    cfg = cfg.model_copy(update={"embedding": cfg.embedding.model_copy(update={"epochs": a.embed_epochs, "steps_per_epoch": a.embed_steps})})
    desc = f"`{a.config}` with embedding {a.embed_epochs}x{a.embed_steps} steps; data {a.root}"
    t0 = time.perf_counter()
    bundle = train_all(a.root, cfg, a.out / "bundle")
    t_train = time.perf_counter() - t0
    ev = evaluate(load_bundle(a.out / "bundle", pick_device(cfg.device)), a.root)
    ev.write(a.out / "evaluation")
    regions = (bundle / "regions" / "regions.md").read_text()

    # Ablation: the same autoencoder without the triplet term.
    prep = prepare(a.root, cfg.data, cfg.seed)
    abl = a.out / "ablation"
    path = abl / "embedding.pt" if (abl / "embedding.pt").exists() else train_embedding(prep, cfg, abl, triplet=False)
    model, _ = load_embedding(path, pick_device(cfg.device))
    emb = extract(model, prep, min_valid=cfg.data.min_valid)
    fit = fit_regions(emb, cfg.regions.k, cfg.regions.sweep, abl / "regions", cfg.regions.seed)
    plot_space(emb, fit.centroids, a.out / "ablation_embedding_space.png", title="without the triplet term")
    body = (f"Training (embedding, regions, {cfg.regions.k} experts, baseline): {t_train / 60:.1f} min.\n\n"
            f"### Regions, triplet autoencoder\n\n{regions}\n\n### Regions, autoencoder without triplet term (ablation)\n\n"
            f"{fit.markdown}\n\n### Segmentation on the spatial hold-out\n\n{ev.markdown()}")
    record("Quality: location embedding, regions and routed experts", body, desc)


if __name__ == "__main__":
    main()
