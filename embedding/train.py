"""Train the location embedding: SmoothL1 reconstruction and cosine triplet loss, jointly, resumable."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from geomoe.backbone import autocast, batch_to, pick_device, to_device
from geomoe.config import Config
from geomoe.data.datasets import Prepared, RandomPatchDataset, compute_stats
from geomoe.embedding.losses import batch_triplet_loss
from geomoe.embedding.model import LocationAutoencoder
from geomoe.training import CsvLog, load_checkpoint, load_model_file, poly_scheduler, save_checkpoint, seed_everything

log = logging.getLogger(__name__)
MODEL_FILE = "embedding.pt"


def build(cfg: Config) -> LocationAutoencoder:
    e = cfg.embedding
    return LocationAutoencoder(e.encoder, e.dim, e.input_size, e.pretrained)


def save_embedding(model: LocationAutoencoder, path: Path, cfg: Config, locations: list[str], triplet: bool) -> None:
    save_checkpoint({"state": model.state_dict(), "embedding": cfg.embedding.model_dump(mode="json"),
                     "locations": locations, "triplet": triplet}, path)


def load_embedding(path: Path, device: torch.device | str = "cpu") -> tuple[LocationAutoencoder, dict]:
    """The trained embedding network and its metadata (locations, whether the triplet term was used)."""
    ck = load_model_file(path, "embedding", ("state", "embedding"))
    e = ck["embedding"]
    model = LocationAutoencoder(e["encoder"], e["dim"], e["input_size"])
    model.load_state_dict(ck["state"])
    return to_device(model, torch.device(device)).eval(), ck


def train_embedding(prep: Prepared, cfg: Config, out: Path, triplet: bool = True, progress: bool = True) -> Path:
    """Train and write ``out/embedding.pt``; ``out/checkpoint.pt`` after every epoch lets a killed run resume.

    With one location there are no negatives: it trains as a plain autoencoder, with a warning.
    """
    e = cfg.embedding
    out.mkdir(parents=True, exist_ok=True)
    if triplet and len(prep.locations) < 2:
        warnings.warn(f"only one location ({prep.locations[0]}): no negatives exist, training a plain autoencoder",
                      stacklevel=2)
        triplet = False
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    model = build(cfg)
    ck_path = out / "checkpoint.pt"
    ck = load_checkpoint(ck_path)
    if ck is None:
        model.norm.set(*compute_stats(prep, seed=cfg.seed))
    model = to_device(model, device)
    opt = torch.optim.Adam(model.parameters(), lr=e.lr, weight_decay=e.weight_decay)
    total = e.epochs * e.steps_per_epoch
    sched = poly_scheduler(opt, total, 0.9)
    start = 0
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        start = ck["epoch"]
        log.info("resuming embedding training at epoch %d/%d", start + 1, e.epochs)
    csv = CsvLog(out / "log.csv", ["epoch", "reconstruction", "triplet", "total", "lr"], start)
    ds = RandomPatchDataset(prep, e.steps_per_epoch * e.batch_size, seed=cfg.seed, cycle_locations=True,
                            min_valid=cfg.data.min_valid)
    gen = torch.Generator().manual_seed(cfg.seed)
    for epoch in range(start, e.epochs):
        ds.epoch = epoch
        loader = DataLoader(ds, batch_size=e.batch_size, num_workers=cfg.data.workers, drop_last=True)
        model.train()
        sums = {"reconstruction": 0.0, "triplet": 0.0, "total": 0.0}
        bar = tqdm(loader, desc=f"embedding {epoch + 1}/{e.epochs}", unit="batch", disable=not progress, leave=False)
        for batch in bar:
            x = batch_to(batch["image"], device)
            labels = batch["location"].to(device)
            with autocast(device):
                emb, rec, target = model(x)
                l_rec = F.smooth_l1_loss(rec.float(), target.float())
            l_tri = batch_triplet_loss(emb, labels, e.margin, e.semi_hard, gen) if triplet else None
            loss = e.recon_weight * l_rec + (e.triplet_weight * l_tri if l_tri is not None else 0.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            sums["reconstruction"] += l_rec.item()
            sums["triplet"] += l_tri.item() if l_tri is not None else 0.0
            sums["total"] += loss.item()
            bar.set_postfix(rec=f"{l_rec.item():.3f}", tri=f"{l_tri.item() if l_tri is not None else 0:.3f}")
        n = max(1, len(loader))
        row = {"epoch": epoch + 1, **{k: v / n for k, v in sums.items()}, "lr": sched.get_last_lr()[0]}
        csv.write(row)
        log.info("embedding epoch %d/%d  reconstruction %.4f  triplet %.4f", epoch + 1, e.epochs,
                 row["reconstruction"], row["triplet"])
        save_checkpoint({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                         "epoch": epoch + 1}, ck_path)
    path = out / MODEL_FILE
    save_embedding(model, path, cfg, prep.locations, triplet)
    return path
