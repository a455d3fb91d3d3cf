"""torchvision ResNet encoders shared by the embedding network and the experts, plus device helpers."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

CHANNELS = {
    "resnet18": (64, 64, 128, 256, 512),
    "resnet34": (64, 64, 128, 256, 512),
    "resnet50": (64, 256, 512, 1024, 2048),
    "resnet101": (64, 256, 512, 1024, 2048),
}


class ResNetEncoder(nn.Module):
    """A torchvision ResNet returning features at strides 2, 4, 8, 16 and 32."""

    def __init__(self, name: str, pretrained: str | Path | None = None):
        super().__init__()
        if name not in CHANNELS:
            raise ValueError(f"unknown encoder {name!r}; choose one of {', '.join(CHANNELS)}")
        net = getattr(torchvision.models, name)(weights=None)  # never download: weights come from a file
        if pretrained is not None:
            load_torchvision_weights(net, pretrained)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu)
        self.pool = net.maxpool
        self.layers = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        self.channels = CHANNELS[name]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = [self.stem(x)]
        x = self.pool(feats[0])
        for layer in self.layers:
            x = layer(x)
            feats.append(x)
        return feats


def load_torchvision_weights(net: nn.Module, path: str | Path) -> None:
    """Load an ImageNet state dict in torchvision's format from a local file (the classifier is ignored)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: pretrained weights file not found")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(f"{path}: not a torchvision ResNet state dict of this depth "
                         f"(missing {missing[:3]}, unexpected {list(unexpected)[:3]})")


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
            x = x.float() / 255.0
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


def autocast(device: torch.device):
    """bf16 autocast on CUDA; plain fp32 on CPU, where bf16 is slower on most processors."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def to_device(model: nn.Module, device: torch.device) -> nn.Module:
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def batch_to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if device.type == "cuda" and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x
