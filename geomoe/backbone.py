"""What the embedding network and the experts share: input normalisation, local encoder weights, device helpers."""

from __future__ import annotations

from contextlib import nullcontext
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

def load_encoder_weights(encoder: nn.Module, path: str | Path) -> None:
    """Load ImageNet weights into an smp encoder from a local torchvision or timm state dict.

    Classifier heads (``fc.``, ``head.``, ``classifier.``) are ignored; any other missing or unexpected key
    means the file belongs to another architecture, and the error names the file.
    """
    from geomoe.modelfile import load_file

    state = load_file(Path(path), "a PyTorch state dict of pretrained weights", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    heads = ("fc.", "head.", "classifier.", "_fc.")
    state = {k: v for k, v in state.items() if not k.startswith(heads)}
    # timm encoders sit under ``model.`` in smp's universal encoder
    target = getattr(encoder, "model", encoder) if not any(k.startswith("model.") for k in state) else encoder
    own = target.state_dict()
    missing = [k for k in own if k not in state and not k.startswith(heads)]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{path}: weights for another architecture (missing {missing[:2]}, unexpected "
                         f"{unexpected[:2]}, wrong shape {wrong[:2]})")
    target.load_state_dict(state, strict=False)


class Normalize(nn.Module):
    """uint8 or 0-1 images in, standardised floats out; the statistics travel with the model."""

    def __init__(self, mean: list[float] | None = None, std: list[float] | None = None):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean or [0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std or [0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def set(self, mean: list[float], std: list[float]) -> None:
        self.mean.copy_(torch.tensor(mean).view(1, 3, 1, 1))
        self.std.copy_(torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.to(self.mean.dtype) / 255.0  # float64 when the model is (Lightning's 64-true precision)
        return (x - self.mean) / self.std


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available")
    return dev


@cache
def cpu_bf16() -> bool:
    """True where the processor computes bf16 itself (AVX512-BF16 or AMX). There bf16 autocast runs a U-Net about
    twice as fast as fp32 (measured on 2 Zen 4 cores: ResNet18 U-Net 113 -> 60 ms a 256 px tile, 43 with
    channels_last); elsewhere bf16 is emulated and slower than fp32, so it stays off."""
    checks = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    try:
        return any(bool(f()) for f in checks if f is not None)
    except Exception:  # a torch without the probes: assume the common case, no native bf16
        return False


def uses_bf16(device: torch.device) -> bool:
    """bf16 autocast on CUDA, and on processors with native bf16."""
    return device.type == "cuda" or (device.type == "cpu" and cpu_bf16())


def autocast(device: torch.device):
    """bf16 autocast where it is fast (:func:`uses_bf16`); plain fp32 elsewhere."""
    if uses_bf16(device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def to_device(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` on ``device`` in channels_last: faster convolutions on CUDA and on CPU (oneDNN) alike."""
    return model.to(device).to(memory_format=torch.channels_last)


def batch_to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x
