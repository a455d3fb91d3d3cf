"""The expert: a segmentation-models-pytorch network behind geomoe's input normalisation, and its model file.

Inference lives here (build, load, predict); training lives in ``experts/task.py``, so loading a bundle does not
import the training stack.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from geomoe.backbone import Normalize, autocast, batch_to, load_encoder_weights, to_device
from geomoe.modelfile import fill, read_model_file, write_model_file

KIND = "expert"


class Expert(nn.Module):
    """uint8 (or 0-1) images of any size in, logits (N, classes, H, W) out.

    smp networks need sides divisible by 32; the input is reflect-padded to that and the output cropped back.
    """

    def __init__(self, encoder: str = "resnet101", decoder: str = "Unet", classes: int = 1,
                 pretrained: str | Path | None = None, decoder_channels: list[int] | None = None):
        super().__init__()
        self.encoder_name, self.decoder_name, self.classes = encoder, decoder, classes
        self.decoder_channels = list(decoder_channels) if decoder_channels else None
        self.norm = Normalize()
        # smp's own decoder widths unless asked: a U-Net's decoder at full resolution costs as much as a ResNet18
        # encoder, and halving its widths nearly doubles the steps a CPU trains in the same time
        extra = {"decoder_channels": self.decoder_channels} if self.decoder_channels else {}
        with warnings.catch_warnings():  # smp warns about deprecated aliases we never use
            warnings.simplefilter("ignore")
            self.net = smp.create_model(decoder, encoder_name=encoder, encoder_weights=None, in_channels=3,
                                        classes=classes, **extra)
        if pretrained is not None:
            load_encoder_weights(self.net.encoder, pretrained)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = self.norm(x)
        ph, pw = (-h) % 32, (-w) % 32
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="reflect" if ph < h and pw < w else "replicate")
        return self.net(x)[..., :h, :w]

    def spec(self) -> dict[str, Any]:
        spec = {"encoder": self.encoder_name, "decoder": self.decoder_name, "classes": self.classes}
        return {**spec, "decoder_channels": self.decoder_channels} if self.decoder_channels else spec


def build_expert(encoder: str, decoder: str = "Unet", classes: int = 1, pretrained: str | Path | None = None,
                 decoder_channels: list[int] | None = None) -> Expert:
    return Expert(encoder, decoder, classes, pretrained, decoder_channels)


def save_expert(model: Expert, path: Path, meta: dict[str, Any] | None = None) -> Path:
    return write_model_file(path, KIND, model.state_dict(), {**model.spec(), **(meta or {})})


def load_expert(path: Path, device: torch.device | str = "cpu") -> tuple[Expert, dict[str, Any]]:
    """The expert in ``path`` in eval mode on ``device``, and its metadata."""
    state, meta = read_model_file(path, KIND)
    model = fill(Expert(meta["encoder"], meta.get("decoder", "Unet"), int(meta.get("classes", 1)),
                        decoder_channels=meta.get("decoder_channels")), state, path,
                 f"a {meta.get('decoder', 'Unet')} on {meta['encoder']}")
    return to_device(model, torch.device(device)).eval(), meta


@torch.no_grad()
def predict_logits(model: Expert, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    with autocast(device):
        return model(batch_to(images, device)).float().contiguous()


# Test-time augmentation: the identity and the three flips. They form a group, so the mean over them is exactly
# flip-equivariant (a flipped tile gets the flipped answer); a roof seen in a mirror is still a roof.
FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))


@torch.no_grad()
def predict_channels(model: Expert, images: torch.Tensor, device: torch.device, tta: bool = False) -> torch.Tensor:
    """Every output channel's probability (N, C, H, W) in float32 on the CPU (building first); with ``tta`` the
    mean over the tile and its flips (:data:`FLIPS`, four passes)."""
    if not tta:
        return torch.sigmoid(predict_logits(model, images, device)).cpu()
    images = images.to(device, non_blocking=True)  # one copy to the device; the flips are made there
    total = None
    for dims in FLIPS:
        p = torch.sigmoid(predict_logits(model, images.flip(dims) if dims else images, device))
        p = p.flip(dims) if dims else p
        total = p if total is None else total + p
    return (total / len(FLIPS)).cpu()


@torch.no_grad()
def predict_probs(model: Expert, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Building probability (N, H, W) in float32 on the CPU (channel 0 of the model's output)."""
    return torch.sigmoid(predict_logits(model, images, device)[:, 0]).cpu()
