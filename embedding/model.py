"""The paper's location embedding: a ResNet autoencoder with a 2048-d embedding head on its bottleneck."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from geomoe.backbone import Normalize, ResNetEncoder, resize


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

    def __init__(self, encoder: str = "resnet34", dim: int = 2048, input_size: int = 160, pretrained=None):
        super().__init__()
        self.input_size = input_size
        self.norm = Normalize()
        self.encoder = ResNetEncoder(encoder, pretrained)
        c = self.encoder.channels[-1]
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
