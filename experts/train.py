"""Train one expert (or the single network, or a fine-tuned expert) through the shared Lightning set-up."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging

from geomoe.config import Config, ExpertConfig
from geomoe.data.datasets import Prepared, compute_stats
from geomoe.data.loaders import PatchDataModule, PatchPlan
from geomoe.data.sampling import PatchRef
from geomoe.experts.model import Expert, build_expert, load_expert
from geomoe.experts.targets import TargetWidths
from geomoe.experts.task import SegmentationTask
from geomoe.trainer import FitJob, fit

log = logging.getLogger(__name__)


@dataclass
class ExpertJob:
    """What to train: a name, its training windows (None: all train blocks), its validation windows."""

    name: str
    train_refs: list[PatchRef] | None
    val_refs: list[PatchRef]
    steps: int  # optimisation steps in all
    init_from: Path | None = None  # start from this expert file (fine-tuning)
    weights: list[float] | None = None  # how often each training window is drawn (None: each equally often)
    turns: bool | None = None  # flips and quarter turns of its patches (None: experts.turns)


def epochs_for(steps: int, steps_per_epoch: int) -> tuple[int, int]:
    """(epochs, steps per epoch) covering ``steps`` in epochs of about ``steps_per_epoch``."""
    epochs = max(1, round(steps / steps_per_epoch))
    return epochs, -(-steps // epochs)


def new_expert(prep: Prepared, cfg: Config, init_from: Path | None = None) -> Expert:
    x = cfg.experts
    if init_from is None:
        model = build_expert(x.encoder, x.decoder, 3 if x.outputs == "instances" else 1, x.pretrained, x.decoder_channels)
        model.norm.set(*compute_stats(prep, seed=cfg.seed))  # deterministic: the same on every DDP process
        return model
    src, meta = load_expert(init_from)
    have = (meta["encoder"], meta["decoder"], meta.get("classes", 1), meta.get("decoder_channels"))
    if have != (x.encoder, x.decoder, 3 if x.outputs == "instances" else 1, x.decoder_channels):
        raise ValueError(f"{init_from}: a {meta['decoder']} on {meta['encoder']} (decoder widths "
                         f"{meta.get('decoder_channels') or 'default'}) cannot start a {x.decoder} on {x.encoder} "
                         f"(decoder widths {x.decoder_channels or 'default'})")
    return src.train()


def weight_averaging(x: ExpertConfig) -> list[Callback]:
    """Lightning's exponential moving average of the weights when ``experts.ema_decay`` is set: validation, the
    checkpoints (and so the best one, which is exported) and a resumed run all use the average."""
    return [] if x.ema_decay is None else [EMAWeightAveraging(decay=x.ema_decay)]


def train_expert(prep: Prepared, cfg: Config, job: ExpertJob, out: Path, progress: bool = True) -> Path:
    """Train ``job`` into ``out/<name>.pt`` (best by validation IoU); ``out/runs/<name>/`` holds checkpoints and logs."""
    x = cfg.experts
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    epochs, per_epoch = epochs_for(job.steps, x.steps_per_epoch)
    model = new_expert(prep, cfg, job.init_from)
    meta = {"name": job.name, "init_from": str(job.init_from) if job.init_from else None}
    task = SegmentationTask(model, x, epochs * per_epoch, meta)
    if job.init_from is not None:
        task.lr = x.lr * x.finetune_lr_scale
        task.warmup_steps = round(x.finetune_warmup * epochs * per_epoch)
    plan = PatchPlan(job.train_refs, job.val_refs, x.batch_size, per_epoch, epochs,
                     instance_targets=TargetWidths(x.boundary_m, x.contact_m) if x.outputs == "instances" else None,
                     train_weights=job.weights, colour_jitter=x.colour_jitter,
                     turns=x.turns if job.turns is None else job.turns,
                     replay=x.replay if job.train_refs is not None and job.init_from is not None else 0.0)
    data = PatchDataModule(prep, plan, cfg.seed, cfg.data.min_valid, cfg.data.workers)
    fj = FitJob(job.name, out / "runs" / job.name, out / f"{job.name}.pt", epochs,
                monitor="val_iou" if job.val_refs else None,
                keep_start=job.init_from is not None and x.keep_start, callbacks=weight_averaging(x))
    return fit(task, data, cfg.trainer, fj, progress)
