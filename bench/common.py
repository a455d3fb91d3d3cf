"""What every bench script shares: the machine's description and appending to bench/RESULTS.md."""

from __future__ import annotations

import datetime as dt
import logging
import os
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
logging.basicConfig(level=logging.INFO, format="%(message)s")
logging.getLogger("faiss.loader").setLevel(logging.WARNING)
logging.getLogger("pyogrio").setLevel(logging.WARNING)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


def record(title: str, body: str, config: str) -> None:
    """Append one dated section to bench/RESULTS.md and print it."""
    text = (f"\n## {title}\n\n{dt.datetime.now().strftime('%Y-%m-%d %H:%M')} | {machine()}\n\n"
            f"Configuration: {config}\n\n{body}\n")
    print(text)
    with RESULTS.open("a") as f:
        f.write(text)


def write_json(name: str, figures: dict, config: dict | str) -> Path:
    """The latest run's figures as bench/results/<name>.json, with the configuration and the machine."""
    import json

    out = Path(__file__).resolve().parent / "results" / f"{name}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"date": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
                               "config": config, **figures}, indent=2, default=float) + "\n")
    return out
