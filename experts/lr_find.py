"""Learning-rate finder (Smith's range test): loss against an exponentially growing learning rate."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from geomoe.backbone import autocast, batch_to, pick_device, to_device
from geomoe.config import Config
from geomoe.data.datasets import Prepared, RandomPatchDataset, compute_stats
from geomoe.experts.losses import segmentation_loss
from geomoe.experts.model import UNet
from geomoe.plots import line_plot


@dataclass
class LrCurve:
    lrs: list[float]
    losses: list[float]  # exponentially smoothed
    suggestion: float


def suggest(lrs: list[float], losses: list[float]) -> float:
    """The learning rate where the smoothed loss falls fastest (steepest negative slope in log lr)."""
    if len(lrs) < 4:
        return lrs[int(np.argmin(losses))]
    g = np.gradient(np.asarray(losses), np.log10(lrs))
    cut = int(np.argmin(losses)) + 1  # only the part before the loss bottoms out
    return float(lrs[int(np.argmin(g[:max(cut, 2)]))])


def find_lr(prep: Prepared, cfg: Config, steps: int = 60, start: float = 1e-6, end: float = 1.0,
            progress: bool = True) -> LrCurve:
    """Train a copy of a fresh expert for ``steps`` batches with lr from ``start`` to ``end``; stop on divergence."""
    device = pick_device(cfg.device)
    model = UNet(cfg.experts.encoder, cfg.experts.pretrained)
    model.norm.set(*compute_stats(prep, seed=cfg.seed))
    model = to_device(model, device).train()
    opt = torch.optim.Adam(model.parameters(), lr=start, weight_decay=cfg.experts.weight_decay)
    mult = (end / start) ** (1 / max(1, steps - 1))
    ds = RandomPatchDataset(prep, steps * cfg.experts.batch_size, seed=cfg.seed, min_valid=cfg.data.min_valid)
    lrs, losses, avg, best = [], [], 0.0, math.inf
    for i, b in enumerate(tqdm(DataLoader(ds, batch_size=cfg.experts.batch_size), total=steps, desc="lr finder",
                               disable=not progress)):
        lr = start * mult**i
        for g in opt.param_groups:
            g["lr"] = lr
        with autocast(device):
            logits = model(batch_to(b["image"], device))
        loss = segmentation_loss(logits, b["mask"].to(device), b["valid"].to(device), cfg.experts.alpha)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        avg = 0.8 * avg + 0.2 * loss.item()
        smooth = avg / (1 - 0.8 ** (i + 1))
        lrs.append(lr)
        losses.append(smooth)
        best = min(best, smooth)
        if smooth > 4 * best or not math.isfinite(smooth):
            break
    return LrCurve(lrs, losses, suggest(lrs, losses))


def plot_lr(curve: LrCurve, out: Path) -> Path:
    return line_plot(curve.lrs, {"smoothed loss": curve.losses}, out, "learning rate", "loss", logx=True,
                     title="learning-rate finder", mark_x=curve.suggestion)
