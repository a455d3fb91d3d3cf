"""Training speed: geomoe's Lightning trainer against a bare PyTorch loop on the same model and batches.

In one run, on the same expert (U-Net, Adam, poly schedule, the same loss) and the same batches held in memory:
1. a bare loop: forward, loss, backward, step, schedule;
2. geomoe's Trainer (``geomoe.trainer.make_trainer``: CSV logger, checkpoints, progress off) on those batches;
3. geomoe's Trainer with the real data loader on ../shared/data (the data pipeline's cost).
Target: Lightning at most 5% slower than the bare loop. On a GPU it also reports images/s of the paper's expert
step (ResNet101, 512 px, batch 8, bf16).
Usage: uv run python bench/trainer.py [--config small] [--steps 20] [--paper-gpu]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from common import SHARED, record, write_json
from torch.utils.data import DataLoader

from geomoe.backbone import autocast, batch_to, pick_device, to_device
from geomoe.config import load_config
from geomoe.data.datasets import RandomPatchDataset, prepare
from geomoe.data.loaders import PatchDataModule, PatchPlan
from geomoe.experts.losses import segmentation_loss
from geomoe.experts.model import build_expert
from geomoe.experts.task import SegmentationTask
from geomoe.tasks import poly_lambda
from geomoe.trainer import FitJob, make_trainer


class Listed(torch.utils.data.Dataset):
    """Batches already in memory, served one per item (batch_size=None)."""

    def __init__(self, batches: list[dict]):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        return self.batches[i]


class InMemory(L.LightningDataModule):
    def __init__(self, batches: list[dict]):
        super().__init__()
        self.batches = batches

    def train_dataloader(self) -> DataLoader:
        return DataLoader(Listed(self.batches), batch_size=None)


def bare_loop(model: torch.nn.Module, batches: list[dict], cfg, device: torch.device) -> float:
    x = cfg.experts
    model = to_device(model, device).train()  # channels_last, as the Lightning task puts it
    opt = torch.optim.Adam(model.parameters(), lr=x.lr, weight_decay=x.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, poly_lambda(len(batches), x.poly_power))
    t0 = time.perf_counter()
    for b in batches:
        with autocast(device):
            logits = model(batch_to(b["image"], device))
        loss = segmentation_loss(logits, b["mask"].to(device), b["valid"].to(device), x.alpha)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def lightning_fit(model: torch.nn.Module, data: L.LightningDataModule, cfg, steps: int, run: Path) -> float:
    task = SegmentationTask(model, cfg.experts, steps)
    trainer = make_trainer(cfg.trainer, FitJob("bench", run, run / "x.pt", 1), progress=False, max_steps=steps)
    t0 = time.perf_counter()
    trainer.fit(task, datamodule=data)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="small")
    ap.add_argument("--root", type=Path, default=SHARED)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--patch", type=int, default=256)
    ap.add_argument("--paper-gpu", action="store_true", help="also time the paper's expert step (needs a GPU)")
    a = ap.parse_args()
    cfg = load_config(a.config)
    cfg = cfg.model_copy(update={"experts": cfg.experts.model_copy(update={"batch_size": a.batch}),
                                 "data": cfg.data.model_copy(update={"patch_size": a.patch})})
    dev = pick_device(cfg.device)
    prep = prepare(a.root, cfg.data, cfg.seed)
    ds = RandomPatchDataset(prep, (a.steps + 2) * a.batch, seed=0)
    batches = list(DataLoader(ds, batch_size=a.batch))
    warm, batches = batches[:2], batches[2:2 + a.steps]

    L.seed_everything(0, verbose=False)
    init = build_expert(cfg.experts.encoder, cfg.experts.decoder, decoder_channels=cfg.experts.decoder_channels).state_dict()

    def fresh():
        m = build_expert(cfg.experts.encoder, cfg.experts.decoder, decoder_channels=cfg.experts.decoder_channels)
        m.load_state_dict(init)
        return m

    bare_loop(fresh(), warm, cfg, dev)  # warm-up: allocator, kernels
    with tempfile.TemporaryDirectory() as td:
        # Interleaved, twice each, best of two: the two loops see the same machine state.
        t_bare, t_light = [], []
        for i in range(2):
            t_bare.append(bare_loop(fresh(), batches, cfg, dev))
            t_light.append(lightning_fit(fresh(), InMemory(batches), cfg, a.steps, Path(td) / f"l{i}"))
        plan = PatchPlan(None, [], a.batch, a.steps, 1)
        t_real = lightning_fit(fresh(), PatchDataModule(prep, plan, 0, cfg.data.min_valid, cfg.data.workers), cfg,
                               a.steps, Path(td) / "real")
    tb, tl = min(t_bare), min(t_light)
    fig = {"bare_steps_per_s": a.steps / tb, "lightning_steps_per_s": a.steps / tl,
           "lightning_real_loader_steps_per_s": a.steps / t_real, "lightning_overhead_pct": 100 * (tl / tb - 1),
           "data_pipeline_overhead_pct": 100 * (t_real / tl - 1), "runs_bare_s": t_bare, "runs_lightning_s": t_light}
    lines = ["| loop | steps/s | images/s |", "|---|---|---|",
             f"| bare PyTorch loop, batches in memory | {a.steps / tb:.3f} | {a.steps * a.batch / tb:.2f} |",
             f"| geomoe Lightning trainer, same batches | {a.steps / tl:.3f} | {a.steps * a.batch / tl:.2f} |",
             f"| geomoe Lightning trainer, real data loader | {a.steps / t_real:.3f} | {a.steps * a.batch / t_real:.2f} |", "",
             f"{cfg.experts.decoder} on {cfg.experts.encoder}, batch {a.batch}, {a.patch} px, {a.steps} steps, device {dev}. "
             f"**Lightning overhead: {fig['lightning_overhead_pct']:.1f}%** (target at most 5%; the Trainer's time "
             f"includes its set-up, the epoch-end checkpoint and the CSV log). Data pipeline on top: "
             f"{fig['data_pipeline_overhead_pct']:.1f}%."]
    if a.paper_gpu:
        if dev.type != "cuda":
            lines.append("\nPaper expert step on a GPU: not measured, no GPU on this machine.")
        else:
            paper = load_config("paper")
            m = build_expert(paper.experts.encoder, paper.experts.decoder).to(dev).to(memory_format=torch.channels_last)
            opt = torch.optim.Adam(m.parameters(), lr=1e-4)
            xb = torch.randint(0, 255, (8, 3, 512, 512), dtype=torch.uint8, device=dev)
            yb = (torch.rand(8, 512, 512, device=dev) > 0.7).float()
            vb = torch.ones(8, 512, 512, dtype=torch.bool, device=dev)

            def step():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = segmentation_loss(m(xb.contiguous(memory_format=torch.channels_last)), yb, vb, 0.5)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            for _ in range(5):
                step()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(20):
                step()
            torch.cuda.synchronize()
            ips = 20 * 8 / (time.perf_counter() - t0)
            fig["paper_expert_images_per_s_gpu"] = ips
            lines.append(f"\nPaper expert step (ResNet101 U-Net, 512 px, batch 8, bf16, channels_last) on "
                         f"{torch.cuda.get_device_name(0)}: **{ips:.1f} images/s**.")
    record("Training: Lightning trainer against a bare loop", "\n".join(lines), f"`{a.config}`")
    write_json("trainer", fig, {"config": a.config, "encoder": cfg.experts.encoder, "batch": a.batch,
                                "patch": a.patch, "steps": a.steps, "device": str(dev)})


if __name__ == "__main__":
    main()
