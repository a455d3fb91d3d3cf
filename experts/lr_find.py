"""Learning-rate finder: Lightning's range test (``Tuner.lr_find``) on a fresh expert, through the shared Trainer."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from lightning.pytorch.tuner import Tuner

from geomoe.config import Config
from geomoe.data.datasets import Prepared
from geomoe.data.loaders import PatchDataModule, PatchPlan
from geomoe.experts.task import SegmentationTask
from geomoe.experts.train import new_expert
from geomoe.plots import line_plot
from geomoe.trainer import FitJob, make_trainer


@dataclass
class LrCurve:
    lrs: list[float]
    losses: list[float]  # Lightning's exponentially smoothed loss
    suggestion: float


def find_lr(prep: Prepared, cfg: Config, steps: int = 60, start: float = 1e-6, end: float = 1.0,
            progress: bool = True) -> LrCurve:
    """Range test over ``steps`` batches from ``start`` to ``end``; stops early when the loss diverges."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    x = cfg.experts
    task = SegmentationTask(new_expert(prep, cfg), x, steps)
    # patches as training sees them (colour jitter, turns)
    plan = PatchPlan(None, [], x.batch_size, steps, 1, colour_jitter=x.colour_jitter, turns=x.turns)
    data = PatchDataModule(prep, plan, cfg.seed, cfg.data.min_valid, cfg.data.workers)
    with tempfile.TemporaryDirectory() as td:
        job = FitJob("lr_find", Path(td), Path(td) / "unused.pt", 1)
        trainer = make_trainer(cfg.trainer, job, progress, logger=False, enable_checkpointing=False, callbacks=[])
        res = Tuner(trainer).lr_find(task, datamodule=data, min_lr=start, max_lr=end, num_training=steps,
                                     early_stop_threshold=4.0, update_attr=False)
    lrs, losses = list(res.results["lr"]), list(res.results["loss"])
    sug = res.suggestion()
    return LrCurve(lrs, losses, float(sug) if sug is not None else float(lrs[int(min(range(len(losses)), key=losses.__getitem__))]))


def plot_lr(curve: LrCurve, out: Path) -> Path:
    return line_plot(curve.lrs, {"smoothed loss": curve.losses}, out, "learning rate", "loss", logx=True,
                     title="learning-rate finder", mark_x=curve.suggestion)
