"""The one file format for trained networks (embedding, experts): weights plus what is needed to rebuild them.

Written atomically by one process (rank 0 under DDP); read without importing the training stack.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from geomoe.atomic import atomic_path

FORMAT = 2  # 1: geomoe 0.1, hand-written U-Net and torchvision ResNets (its weights do not map onto smp's)


def write_model_file(path: Path, kind: str, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in state.items()}
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, "kind": kind, "state": state, "meta": meta, "torch": torch.__version__}, tmp)
    return path


def load_file(path: Path, what: str, weights_only: bool) -> Any:
    """``torch.load`` onto the CPU, with a missing or unreadable file named in one line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found (expected {what})")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:
        raise ValueError(f"{path}: cannot be read as {what} ({str(e).splitlines()[0][:200]})") from e


def fill(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> torch.nn.Module:
    """Load ``state`` into ``model``; a mismatch names the file and what it should have held."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit {what} ({str(e)[:200]})") from e
    return model


def read_model_file(path: Path, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, metadata) of a ``kind`` model file, with one clear error for every way it can be wrong."""
    ck = load_file(path, f"a geomoe {kind} model file", weights_only=False)
    if not isinstance(ck, dict):
        raise ValueError(f"{path}: not a geomoe model file")
    if "format" not in ck and "state" in ck:
        raise ValueError(f"{path}: written by geomoe 0.1 (model file format 1), whose networks this version cannot "
                         f"load; retrain the bundle with 'geomoe train' (finished stages of a new run are kept)")
    if ck.get("format") != FORMAT:
        raise ValueError(f"{path}: model file format {ck.get('format')} is not the supported {FORMAT}")
    if ck.get("kind") != kind:
        raise ValueError(f"{path}: holds the '{ck.get('kind')}' model, expected the '{kind}' model")
    return ck["state"], ck["meta"]
