"""Training the location embedding as a LightningModule: SmoothL1 reconstruction and cosine triplet loss, jointly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from geomoe.config import EmbeddingConfig
from geomoe.embedding.losses import batch_triplet_loss
from geomoe.embedding.model import LocationAutoencoder, save_embedding
from geomoe.tasks import GeomoeTask


class EmbeddingTask(GeomoeTask):
    """With ``triplet`` off it is the plain autoencoder (the ablation)."""

    def __init__(self, model: LocationAutoencoder, cfg: EmbeddingConfig, total_steps: int, triplet: bool = True,
                 seed: int = 0, meta: dict[str, Any] | None = None):
        super().__init__()
        self.model, self.cfg, self.total_steps, self.triplet, self.seed = model, cfg, total_steps, triplet, seed
        self.lr, self.weight_decay, self.meta = cfg.lr, cfg.weight_decay, meta or {}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        emb, rec, target = self.model(batch["image"])
        l_rec = F.smooth_l1_loss(rec.float(), target.float())
        l_tri = None
        if self.triplet:
            # Triplets are drawn from a generator seeded by the step: a resumed run draws the same ones.
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.global_step))
            l_tri = batch_triplet_loss(emb.float(), batch["location"], self.cfg.margin, self.cfg.semi_hard, gen)
        loss = self.cfg.recon_weight * l_rec + (self.cfg.triplet_weight * l_tri if l_tri is not None else 0.0)
        n = len(batch["image"])
        self.log("reconstruction", l_rec, prog_bar=True, on_step=True, on_epoch=True, batch_size=n)
        self.log("triplet", l_tri if l_tri is not None else torch.zeros(()), prog_bar=True, on_step=True, on_epoch=True,
                 batch_size=n)
        return loss

    def export(self, path: Path) -> Path:
        return save_embedding(self.model, path, {**self.meta, "triplet": self.triplet, "steps": int(self.global_step)})
