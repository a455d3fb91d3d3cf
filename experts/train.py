"""Train one expert (or the single-network baseline): resumable, validated each epoch, best kept."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from geomoe.backbone import autocast, batch_to, pick_device, to_device
from geomoe.config import Config
from geomoe.data.datasets import GridDataset, Prepared, RandomPatchDataset, compute_stats
from geomoe.data.sampling import PatchRef
from geomoe.experts.losses import segmentation_loss
from geomoe.experts.model import UNet
from geomoe.metrics import Scores
from geomoe.training import CsvLog, load_checkpoint, load_model_file, poly_scheduler, save_checkpoint, seed_everything

log = logging.getLogger(__name__)


@dataclass
class ExpertJob:
    """What to train: a name, its training windows (None: all train blocks), its validation windows."""

    name: str
    train_refs: list[PatchRef] | None
    val_refs: list[PatchRef]
    steps: int  # optimisation steps in all
    init_from: Path | None = None  # fine-tune from this expert file


def save_expert(model: UNet, path: Path, meta: dict) -> None:
    save_checkpoint({"state": model.state_dict(), "encoder": model.encoder_name, **meta}, path)


def load_expert(path: Path, device: torch.device | str = "cpu") -> tuple[UNet, dict]:
    ck = load_model_file(path, "expert", ("state", "encoder"))
    model = UNet(ck["encoder"])
    model.load_state_dict(ck["state"])
    return to_device(model, torch.device(device)).eval(), ck


@torch.no_grad()
def predict_probs(model: UNet, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Building probability (N, H, W) in float32 on the CPU."""
    with autocast(device):
        return torch.sigmoid(model(batch_to(images, device)).float())[:, 0].cpu()


def validate(model: UNet, prep: Prepared, refs: list[PatchRef], device: torch.device, threshold: float,
             batch_size: int = 8) -> dict[str, float]:
    model.eval()
    s = Scores()
    for b in DataLoader(GridDataset(prep, refs), batch_size=batch_size):
        prob = predict_probs(model, b["image"], device).numpy()
        for p, t, v in zip(prob, b["mask"].numpy(), b["valid"].numpy()):
            s.update(p >= threshold, t > 0, v, instances=False)
    return {k: v for k, v in s.summary().items() if k in ("iou", "accuracy")}


def train_expert(prep: Prepared, cfg: Config, job: ExpertJob, out: Path, progress: bool = True) -> Path:
    """Train ``job`` into ``out/<name>.pt`` (best by validation IoU); ``out/<name>.ckpt`` resumes a killed run."""
    x = cfg.experts
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    model = UNet(x.encoder, x.pretrained)
    if job.init_from is not None:
        src, meta = load_expert(job.init_from)
        if meta["encoder"] != x.encoder:
            raise ValueError(f"{job.init_from}: a {meta['encoder']} expert cannot start a {x.encoder} one")
        model.load_state_dict(src.state_dict())
    else:
        model.norm.set(*compute_stats(prep, seed=cfg.seed))
    model = to_device(model, device)
    opt = torch.optim.Adam(model.parameters(), lr=x.lr, weight_decay=x.weight_decay)
    sched = poly_scheduler(opt, job.steps, x.poly_power)
    epochs = max(1, round(job.steps / x.steps_per_epoch))
    per_epoch = -(-job.steps // epochs)
    ck_path, best_path = out / f"{job.name}.ckpt", out / f"{job.name}.pt"
    start, best = 0, -1.0
    ck = load_checkpoint(ck_path)
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        start, best = ck["epoch"], ck["best"]
        log.info("%s: resuming at epoch %d/%d", job.name, start + 1, epochs)
    csv = CsvLog(out / f"{job.name}.log.csv", ["epoch", "loss", "val_iou", "val_accuracy", "lr"], start)
    ds = RandomPatchDataset(prep, per_epoch * x.batch_size, seed=cfg.seed, refs=job.train_refs,
                            min_valid=cfg.data.min_valid)
    for epoch in range(start, epochs):
        ds.epoch = epoch
        model.train()
        total, n = 0.0, 0
        loader = DataLoader(ds, batch_size=x.batch_size, num_workers=cfg.data.workers, shuffle=False)
        for b in tqdm(loader, desc=f"{job.name} {epoch + 1}/{epochs}", unit="batch", disable=not progress, leave=False):
            with autocast(device):
                logits = model(batch_to(b["image"], device))
            loss = segmentation_loss(logits, b["mask"].to(device), b["valid"].to(device), x.alpha)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total, n = total + loss.item(), n + 1
        val = validate(model, prep, job.val_refs, device, x.threshold) if job.val_refs else {"iou": float("nan"), "accuracy": float("nan")}
        row = {"epoch": epoch + 1, "loss": total / max(n, 1), "val_iou": val["iou"], "val_accuracy": val["accuracy"],
               "lr": sched.get_last_lr()[0]}
        csv.write(row)
        log.info("%s epoch %d/%d  loss %.4f  val IoU %.4f", job.name, epoch + 1, epochs, row["loss"], val["iou"])
        score = val["iou"] if not np.isnan(val["iou"]) else -row["loss"]
        if score > best or not best_path.exists():
            best = score
            save_expert(model, best_path, {"name": job.name, "epoch": epoch + 1, "val_iou": val["iou"]})
        save_checkpoint({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                         "epoch": epoch + 1, "best": best}, ck_path)
    return best_path
