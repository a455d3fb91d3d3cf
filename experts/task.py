"""Training a building-segmentation expert (or the single network) as a LightningModule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torchmetrics import Metric

from geomoe.config import ExpertConfig
from geomoe.experts.losses import instance_loss, segmentation_loss
from geomoe.experts.model import Expert, save_expert
from geomoe.tasks import GeomoeTask


class PixelCounts(Metric):
    """TP, FP, FN, TN over valid pixels, summed over batches and (under DDP) over processes."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        for name in ("tp", "fp", "fn", "tn"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, truth: torch.Tensor, valid: torch.Tensor) -> None:
        p, t, v = pred.bool(), truth.bool(), valid.bool()
        self.tp += (p & t & v).sum()
        self.fp += (p & ~t & v).sum()
        self.fn += (~p & t & v).sum()
        self.tn += (~p & ~t & v).sum()

    def compute(self) -> dict[str, torch.Tensor]:
        tp, fp, fn, tn = (x.double() for x in (self.tp, self.fp, self.fn, self.tn))
        iou = tp / (tp + fp + fn) if (tp + fp + fn) > 0 else torch.tensor(float("nan"), dtype=torch.double)
        return {"iou": iou, "accuracy": (tp + tn) / (tp + fp + fn + tn).clamp(min=1)}


class SegmentationTask(GeomoeTask):
    """alpha * BCE + soft Jaccard, Adam with poly decay; validation IoU chooses the checkpoint."""

    def __init__(self, model: Expert, cfg: ExpertConfig, total_steps: int, meta: dict[str, Any] | None = None):
        super().__init__()
        self.model, self.cfg, self.total_steps, self.meta = model, cfg, total_steps, meta or {}
        self.lr, self.weight_decay, self.poly_power = cfg.lr, cfg.weight_decay, cfg.poly_power
        self.optimizer_name = cfg.optimizer
        self.val_counts = PixelCounts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self.model(batch["image"])
        if "targets" in batch:
            loss = instance_loss(out, batch["targets"], batch["valid"], self.cfg.alpha)
        else:
            loss = segmentation_loss(out, batch["mask"], batch["valid"], self.cfg.alpha)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(batch["image"]),
                 sync_dist=False)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        prob = torch.sigmoid(self.model(batch["image"])[:, 0])
        self.val_counts.update(prob >= self.cfg.threshold, batch["mask"] > 0, batch["valid"])

    def on_validation_epoch_end(self) -> None:
        r = self.val_counts.compute()  # already summed over processes
        self.val_counts.reset()
        iou = r["iou"] if not torch.isnan(r["iou"]) else torch.tensor(0.0, dtype=torch.double)
        self.log("val_iou", iou.float(), prog_bar=True, sync_dist=False, rank_zero_only=False)
        self.log("val_accuracy", r["accuracy"].float(), sync_dist=False)

    def export(self, path: Path) -> Path:
        meta = {**self.meta, "epoch": int(self.current_epoch), "steps": int(self.global_step),
                "lr": self.lr}
        if getattr(self, "kept_start", None) is not None:  # fine-tuning never beat its start on validation
            meta.update(kept_start=True, val_iou=float(self.kept_start))
        elif self.trainer.checkpoint_callback is not None and self.trainer.checkpoint_callback.best_model_score is not None:
            meta["val_iou"] = float(self.trainer.checkpoint_callback.best_model_score)
        elif "val_iou" in self.trainer.callback_metrics:
            meta["val_iou"] = float(self.trainer.callback_metrics["val_iou"])
        return save_expert(self.model, path, meta)
