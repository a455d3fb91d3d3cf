"""What the two LightningModules share: Adam with the paper's poly schedule, channels_last."""

from __future__ import annotations

import lightning as L
import torch


def poly_lambda(total_steps: int, power: float, warmup_steps: int = 0):
    """lr = base * (1 - step / total) ** power, the paper's "poly" schedule, stepped per batch; over the first
    ``warmup_steps`` it is also scaled by a linear ramp (step + 1) / warmup_steps."""
    total = max(1, total_steps)

    def factor(s: int) -> float:
        ramp = min(1.0, (s + 1) / warmup_steps) if warmup_steps > 0 else 1.0
        return ramp * max(0.0, 1 - s / total) ** power

    return factor


class GeomoeTask(L.LightningModule):
    """Base of the embedding and expert tasks: ``self.model``, ``self.lr``, ``self.weight_decay``."""

    model: torch.nn.Module
    lr: float
    weight_decay: float
    poly_power: float = 0.9
    total_steps: int
    warmup_steps: int = 0
    optimizer_name: str = "adam"

    def configure_optimizers(self):
        kind = torch.optim.AdamW if self.optimizer_name == "adamw" else torch.optim.Adam
        opt = kind(self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, poly_lambda(self.total_steps, self.poly_power, self.warmup_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def setup(self, stage: str) -> None:
        # channels_last: faster convolutions on CUDA and CPU alike. Here, before the strategy wraps the model: DDP
        # lays out its gradient buckets from the parameters it is given, and a layout changed after that (as
        # on_fit_start did) made two processes measurably diverge from one (1e-2 relative after a few steps)
        self.model.to(memory_format=torch.channels_last)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        if batch["image"].ndim == 4:
            batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
        return batch
