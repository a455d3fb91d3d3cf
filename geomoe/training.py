"""What every training loop here shares: poly schedule, atomic checkpoints that resume, a CSV log."""

from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from geomoe.atomic import atomic_path


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def poly_scheduler(opt: torch.optim.Optimizer, total_steps: int, power: float = 0.9):
    """lr = base * (1 - step / total) ** power, the paper's "poly" schedule, stepped per batch."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / max(1, total_steps)) ** power)


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """torch.save under a temporary name, renamed when complete: a kill never leaves a broken checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"{path}: checkpoint cannot be read ({e}); delete it to start over") from e


class CsvLog:
    """Append-only CSV of per-epoch figures; on resume, rows past the resumed epoch are dropped."""

    def __init__(self, path: Path, fields: list[str], resume_epoch: int = 0):
        self.path, self.fields = path, fields
        rows = []
        if resume_epoch > 0 and path.exists():
            with path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= resume_epoch]
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fields)
            w.writeheader()
            w.writerows(rows)

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.fields).writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})

    def read(self) -> list[dict[str, str]]:
        with self.path.open(newline="") as f:
            return list(csv.DictReader(f))


def load_model_file(path: Path, kind: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """A saved model's checkpoint dict, with a clear error when it is missing or of another kind."""
    ck = load_checkpoint(Path(path))
    if ck is None:
        raise FileNotFoundError(f"{path}: no {kind} model here")
    if not all(k in ck for k in keys):
        raise ValueError(f"{path}: not an {kind} model file")
    return ck
