"""Train the location embedding through the shared Lightning set-up (``geomoe.trainer``)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import lightning as L

from geomoe.config import Config
from geomoe.data.datasets import Prepared, compute_stats
from geomoe.data.loaders import PatchDataModule, PatchPlan
from geomoe.embedding.model import LocationAutoencoder
from geomoe.embedding.task import EmbeddingTask
from geomoe.trainer import FitJob, fit

log = logging.getLogger(__name__)
MODEL_FILE = "embedding.pt"


def build(cfg: Config) -> LocationAutoencoder:
    e = cfg.embedding
    return LocationAutoencoder(e.encoder, e.dim, e.input_size, e.pretrained)


def train_embedding(prep: Prepared, cfg: Config, out: Path, triplet: bool = True, progress: bool = True) -> Path:
    """Train and write ``out/embedding.pt``; ``out/run/checkpoints/last.ckpt`` lets a killed run resume.

    With one location there are no negatives: it trains as a plain autoencoder, with a warning.
    """
    e = cfg.embedding
    if triplet and len(prep.locations) < 2:
        warnings.warn(f"only one location ({prep.locations[0]}): no negatives exist, training a plain autoencoder",
                      stacklevel=2)
        triplet = False
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model = build(cfg)
    # Deterministic in the seed, so every DDP process computes the same values (and DDP broadcasts rank 0's).
    model.norm.set(*compute_stats(prep, seed=cfg.seed))
    task = EmbeddingTask(model, e, e.epochs * e.steps_per_epoch, triplet, cfg.seed, {"locations": prep.locations})
    plan = PatchPlan(None, [], e.batch_size, e.steps_per_epoch, e.epochs, cycle_locations=True)
    data = PatchDataModule(prep, plan, cfg.seed, cfg.data.min_valid, cfg.data.workers)
    job = FitJob("embedding", out / "run", out / MODEL_FILE, e.epochs)
    return fit(task, data, cfg.trainer, job, progress)
