"""Lightning data module over prepared scenes: the same patches whatever the number of processes.

``batch_size`` is the global batch. Each of W processes takes every W-th item of an epoch's index range, so global
batch j of a DDP run holds exactly the items of batch j of a one-process run, and a run can resume on another
number of devices. Lightning's own distributed sampler is switched off (``use_distributed_sampler=False``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from geomoe.data.datasets import GridDataset, Prepared, RandomPatchDataset
from geomoe.data.sampling import PatchRef
from geomoe.experts.targets import TargetWidths


class EpochSampler(Sampler[int]):
    """Epoch ``e`` yields the indices ``e * n + i`` with ``i = rank, rank + world, ...`` below ``n``."""

    def __init__(self, n: int, rank: int = 0, world: int = 1):
        self.n, self.rank, self.world, self.epoch = n, rank, world, 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at the start of every epoch
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.epoch * self.n + self.rank, (self.epoch + 1) * self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


class ShardSampler(Sampler[int]):
    """Every ``world``-th index from ``rank``, without padding: each item is scored exactly once over all ranks."""

    def __init__(self, n: int, rank: int = 0, world: int = 1):
        self.n, self.rank, self.world = n, rank, world

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


@dataclass
class PatchPlan:
    """What a training job reads: its windows (None: anywhere in the train blocks), how many, in what batches."""

    train_refs: list[PatchRef] | None
    val_refs: list[PatchRef]
    batch_size: int  # global
    steps_per_epoch: int
    epochs: int
    cycle_locations: bool = False  # the embedding wants every location in every batch
    instance_targets: TargetWidths | None = None  # experts with building / boundary / contact outputs: how wide
    replay: float = 0.0  # with train_refs: the share of patches drawn from every location's train blocks instead
    train_weights: list[float] | None = None  # with train_refs: how often each is drawn (None: equally often)
    colour_jitter: float = 0.0  # random colour changes of training patches (experts.colour_jitter)
    turns: bool = True  # random flips and quarter turns of training patches (experts.turns for expert-type jobs)


class PatchDataModule(L.LightningDataModule):
    def __init__(self, prep: Prepared, plan: PatchPlan, seed: int = 0, min_valid: float = 0.5, workers: int = 0):
        super().__init__()
        self.prep, self.plan, self.seed, self.min_valid, self.workers = prep, plan, seed, min_valid, workers

    def _rank_world(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def per_device_batch(self) -> int:
        _, world = self._rank_world()
        b = self.plan.batch_size
        if b % world:
            raise ValueError(f"batch size {b} is the global batch and must divide evenly over {world} processes")
        return b // world

    def _loader(self, ds, sampler: Sampler, batch_size: int) -> DataLoader:
        return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=self.workers,
                          pin_memory=torch.cuda.is_available(),
                          # workers live for the whole job rather than restart at every epoch and validation (the GPU
                          # quality run spent half its time or more outside its steps); items are pure functions of
                          # (seed, index), so which worker reads one does not change it
                          persistent_workers=self.workers > 0)

    def train_dataloader(self) -> DataLoader:
        p = self.plan
        rank, world = self._rank_world()
        per_epoch = p.steps_per_epoch * p.batch_size
        ds = RandomPatchDataset(self.prep, per_epoch * p.epochs, seed=self.seed, refs=p.train_refs,
                                min_valid=self.min_valid, cycle_locations=p.cycle_locations,
                                instance_targets=p.instance_targets, replay=p.replay, weights=p.train_weights,
                                colour_jitter=p.colour_jitter, turns=p.turns)
        return self._loader(ds, EpochSampler(per_epoch, rank, world), self.per_device_batch())

    def val_dataloader(self) -> DataLoader | list:
        if not self.plan.val_refs:
            return []
        rank, world = self._rank_world()
        ds = GridDataset(self.prep, self.plan.val_refs)
        return self._loader(ds, ShardSampler(len(ds), rank, world), max(1, self.per_device_batch()))
