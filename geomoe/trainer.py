"""The one training set-up: a Lightning Trainer factory and ``fit`` for every job (embedding, experts, baseline,
fine-tuning; the learning-rate finder uses the same factory).

Lightning brings checkpoints (last, and best by the validation metric), resume (``last.ckpt``), loggers,
progress bars, bf16-mixed on CUDA and on processors with native bf16, gradient clipping, DDP (torchrun and SLURM included) and SyncBatchNorm.
What geomoe adds: checkpoints written atomically, a finished job recognised by its exported model file so a
rerun never retrains it, and export by rank 0 only.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import torch
from lightning.fabric.utilities.cloud_io import _atomic_save
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from geomoe.atomic import atomic_path
from geomoe.backbone import cpu_bf16
from geomoe.config import TrainerConfig

log = logging.getLogger(__name__)
# Lightning sets its loggers to INFO on import ("GPU available: False", tips): geomoe logs its own stages instead.
for _name in ("lightning.pytorch", "lightning.fabric"):
    logging.getLogger(_name).setLevel(logging.WARNING)
# Lightning's notices that say nothing to a geomoe user: our epochs are short by design, the batch hook is meant to
# be the module's, the embedding has no validation, and a torch deprecation inside Lightning itself.
QUIET = (r".*(does not have many workers|smaller than the logging interval|on_after_batch_transfer|"
         r"no `validation_step`|LeafSpec|GPU available but not used|Checkpoint directory .* exists|litlogger|"
         r"Total length of `list` across ranks is zero).*")  # the last: a job without validation windows, said in its log line


class AtomicCheckpointIO(TorchCheckpointIO):
    """A checkpoint appears under its name only when complete: a run killed while saving can still resume."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        with atomic_path(Path(path)) as tmp:
            _atomic_save(checkpoint, tmp)


class ExportingTask(Protocol):
    def export(self, path: Path) -> Path: ...


@dataclass
class FitJob:
    """One training job: where its checkpoints and logs go, where its finished model goes, how long it runs."""

    name: str
    run_dir: Path  # Lightning checkpoints and logs
    export: Path  # the finished model file; its presence marks the job done
    epochs: int
    monitor: str | None = None  # keep the best checkpoint by this validation metric (higher is better)
    keep_start: bool = False  # the starting weights are a candidate too (fine-tuning may only make things worse)
    callbacks: list[Callback] = field(default_factory=list)

    @property
    def last(self) -> Path:
        return self.run_dir / "checkpoints" / "last.ckpt"

    @property
    def start_score(self) -> Path:
        return self.run_dir / "start_score.json"


def precision_for(tc: TrainerConfig) -> str:
    if tc.precision != "auto":
        return tc.precision
    on_cuda = tc.accelerator != "cpu" and torch.cuda.is_available()
    return "bf16-mixed" if on_cuda or cpu_bf16() else "32-true"  # bf16 where the hardware computes it natively


def make_logger(tc: TrainerConfig, run_dir: Path):
    if tc.logger == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(run_dir, name="logs")
    if tc.logger == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger
        from lightning.pytorch.loggers.tensorboard import _TENSORBOARD_AVAILABLE, _TENSORBOARDX_AVAILABLE

        if not (_TENSORBOARD_AVAILABLE or _TENSORBOARDX_AVAILABLE):
            raise ValueError("trainer.logger is tensorboard, but neither tensorboard nor tensorboardX is installed")
        return TensorBoardLogger(run_dir, name="logs")
    from lightning.pytorch.loggers import MLFlowLogger
    from lightning.pytorch.loggers.mlflow import _MLFLOW_AVAILABLE

    if not _MLFLOW_AVAILABLE:
        raise ValueError("trainer.logger is mlflow, but mlflow is not installed (pip install mlflow)")
    uri = os.environ.get("MLFLOW_TRACKING_URI", (run_dir / "mlruns").resolve().as_uri())
    return MLFlowLogger(experiment_name="geomoe", run_name=run_dir.name, tracking_uri=uri)


def make_trainer(tc: TrainerConfig, job: FitJob, progress: bool = True, **overrides: Any) -> L.Trainer:
    """The Trainer every geomoe job uses; ``overrides`` are for tools such as the LR finder and benches."""
    ckpt = ModelCheckpoint(dirpath=job.run_dir / "checkpoints", filename="best", monitor=job.monitor, mode="max",
                           save_last=True, save_top_k=1 if job.monitor else 0, enable_version_counter=False)
    multi = tc.devices * tc.num_nodes > 1
    strategy = tc.strategy if tc.strategy != "auto" or not multi else "ddp"
    plugins: list[Any] = [AtomicCheckpointIO()]
    if multi and tc.sync_batchnorm:
        from geomoe.syncbn import AnyDeviceSyncBatchNorm

        plugins.append(AnyDeviceSyncBatchNorm(cuda=tc.accelerator in ("gpu", "cuda") or (
            tc.accelerator == "auto" and torch.cuda.is_available())))
    kwargs: dict[str, Any] = dict(
        accelerator=tc.accelerator, devices=tc.devices, num_nodes=tc.num_nodes, strategy=strategy,
        precision=precision_for(tc), gradient_clip_val=tc.gradient_clip_val,
        max_epochs=job.epochs, logger=make_logger(tc, job.run_dir), callbacks=[ckpt, *job.callbacks],
        log_every_n_steps=tc.log_every_n_steps, enable_progress_bar=progress, enable_model_summary=False,
        num_sanity_val_steps=0, use_distributed_sampler=False, plugins=plugins,
        # no_grad rather than inference_mode: a job scores its start with trainer.validate before fit, and metric
        # states reset under inference mode could not be updated in fit's validation
        inference_mode=False,
        default_root_dir=job.run_dir,
    )
    kwargs.update(overrides)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=QUIET)
        return L.Trainer(**kwargs)


def barrier() -> None:
    """Wait for every process of a DDP run (a no-op in one process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def is_rank_zero() -> bool:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0 and int(os.environ.get("NODE_RANK", "0") or 0) == 0


def fit(task: L.LightningModule, data: L.LightningDataModule, tc: TrainerConfig, job: FitJob,
        progress: bool = True) -> Path:
    """Train ``task`` (resuming from ``job.last`` when it exists) and export its best weights to ``job.export``.

    A job whose export exists is finished and is not trained again.
    """
    if job.export.exists():
        log.info("%s: finished earlier (%s)", job.name, job.export)
        return job.export
    trainer = make_trainer(tc, job, progress)
    if str(trainer.precision) == "64-true":
        # Lightning restores a checkpoint into the module before casting it: a float32 module would round a resumed
        # float64 run's weights once, and Adam's nearly sign-only first steps can turn that into a learning rate
        task.double()
    resume = job.last if job.last.exists() else None
    if resume is not None:
        log.info("%s: resuming from %s", job.name, resume)
    keep_start = job.keep_start and job.monitor is not None
    if keep_start:  # the task holds its starting weights now, on a resumed run too (it was built from them)
        start_state = {k: v.detach().clone() for k, v in task.state_dict().items()}
        start = start_score(trainer, task, data, job)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=QUIET)
        trainer.fit(task, datamodule=data, ckpt_path=str(resume) if resume else None)
    best = trainer.checkpoint_callback.best_model_path if job.monitor else ""
    if best and Path(best).exists():
        state = torch.load(best, map_location="cpu", weights_only=False)["state_dict"]
        task.load_state_dict(state)
    score = trainer.checkpoint_callback.best_model_score if job.monitor else None
    if keep_start and (score is None or start >= float(score)):
        log.info("%s: no fine-tuned checkpoint beats the start on validation (%s %.4f >= %s); keeping the start",
                 job.name, job.monitor, start, "none" if score is None else f"{float(score):.4f}")
        task.load_state_dict(start_state)
        task.kept_start = start  # type: ignore[attr-defined]
    if trainer.is_global_zero:
        task.export(job.export)  # type: ignore[attr-defined]
        slim_checkpoints(job.run_dir / "checkpoints")
    barrier()
    return job.export


def slim_checkpoints(folder: Path) -> None:
    """Drop the optimizer state from a finished job's checkpoints: a finished job is never resumed, and Adam's two
    moment buffers made a bundle's training checkpoints twice the size of its weights again."""
    for ck in sorted(folder.glob("*.ckpt")):
        state = torch.load(ck, map_location="cpu", weights_only=False)
        if not state.get("optimizer_states"):
            continue
        state["optimizer_states"], state["lr_schedulers"] = [], []
        with atomic_path(ck) as tmp:
            torch.save(state, tmp)


def start_score(trainer: L.Trainer, task: L.LightningModule, data: L.LightningDataModule, job: FitJob) -> float:
    """The validation score of the starting weights (computed once; a resumed run reads it back)."""
    if job.start_score.exists():
        return float(json.loads(job.start_score.read_text())["score"])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=QUIET)
        out = trainer.validate(task, datamodule=data, verbose=False)
    score = float(out[0][job.monitor])
    if trainer.is_global_zero:
        job.start_score.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(job.start_score) as tmp:
            tmp.write_text(json.dumps({"metric": job.monitor, "score": score}))
    log.info("%s: the start scores %s %.4f on validation", job.name, job.monitor, score)
    return score
