"""The paper's location embedding: a ResNet autoencoder with a 2048-d embedding head on its bottleneck.

Inference lives here (build, load, embed); training lives in ``embedding/task.py``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from geomoe.backbone import Normalize, autocast, batch_to, load_encoder_weights, resize, to_device
from geomoe.modelfile import fill, read_model_file, write_model_file

KIND = "embedding"


def _up(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class LocationAutoencoder(nn.Module):
    """Encoder -> bottleneck -> (decoder reconstructing the 3 bands, and pool + 2 FC giving the embedding).

    At the default 160 px input the bottleneck is 5x5, so the pool is the paper's 5x5 average pool;
    other sizes pool the whole bottleneck the same way.
    """

    def __init__(self, encoder: str = "resnet34", dim: int = 2048, input_size: int = 160,
                 pretrained: str | Path | None = None):
        super().__init__()
        self.encoder_name, self.dim, self.input_size = encoder, dim, input_size
        self.norm = Normalize()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.encoder = smp.encoders.get_encoder(encoder, in_channels=3, depth=5, weights=None)
        if pretrained is not None:
            load_encoder_weights(self.encoder, pretrained)
        c = self.encoder.out_channels[-1]
        self.decoder = nn.Sequential(_up(c, 256), _up(256, 128), _up(128, 64), _up(64, 32), _up(32, 16), nn.Conv2d(16, 3, 1))
        self.head = nn.Sequential(nn.Linear(c, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))

    def bottleneck(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised, resized input; bottleneck features)."""
        x = resize(self.norm(x), self.input_size)
        return x, self.encoder(x)[-1]

    def embed_features(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(F.adaptive_avg_pool2d(z, 1).flatten(1)).float(), dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(unit-norm embedding, reconstruction, reconstruction target)."""
        target, z = self.bottleneck(x)
        return self.embed_features(z), self.decoder(z), target

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed_features(self.bottleneck(x)[1])

    def spec(self) -> dict[str, Any]:
        return {"encoder": self.encoder_name, "dim": self.dim, "input_size": self.input_size}


def save_embedding(model: LocationAutoencoder, path: Path, meta: dict[str, Any] | None = None) -> Path:
    return write_model_file(path, KIND, model.state_dict(), {**model.spec(), **(meta or {})})


def load_embedding(path: Path, device: torch.device | str = "cpu") -> tuple[LocationAutoencoder, dict[str, Any]]:
    """The trained embedding network in eval mode, and its metadata (locations, whether the triplet term was used)."""
    state, meta = read_model_file(path, KIND)
    model = fill(LocationAutoencoder(meta["encoder"], int(meta["dim"]), int(meta["input_size"])), state, path,
                 f"a {meta['encoder']} embedding")
    return to_device(model, torch.device(device)).eval(), meta


@torch.no_grad()
def embed_batches(model: LocationAutoencoder, images: torch.Tensor, device: torch.device) -> np.ndarray:
    """Unit-norm embeddings (N, dim) as float32 numpy."""
    with autocast(device):
        return model.embed(batch_to(images, device)).float().cpu().numpy()
