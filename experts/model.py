"""The expert: a U-Net on a torchvision ResNet encoder with one sigmoid output."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from geomoe.backbone import Normalize, ResNetEncoder


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _Up(nn.Module):
    def __init__(self, cin: int, skip: int, cout: int):
        super().__init__()
        self.block = nn.Sequential(_conv(cin + skip, cout), _conv(cout, cout))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], 1)
        return self.block(x)


class UNet(nn.Module):
    """Encoder features at strides 2-32, five upsampling blocks with skips, a 1-channel logit map."""

    def __init__(self, encoder: str = "resnet101", pretrained=None, decoder=(256, 128, 64, 32, 16)):
        super().__init__()
        self.encoder_name = encoder
        self.norm = Normalize()
        self.encoder = ResNetEncoder(encoder, pretrained)
        ch = self.encoder.channels  # strides 2, 4, 8, 16, 32
        skips = [ch[3], ch[2], ch[1], ch[0], 0]
        cins = [ch[4], *decoder[:-1]]
        self.decoder = nn.ModuleList(_Up(ci, s, co) for ci, s, co in zip(cins, skips, decoder))
        self.head = nn.Conv2d(decoder[-1], 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, 1, H, W); H and W are padded internally to a multiple of 32."""
        h, w = x.shape[-2:]
        x = self.norm(x)
        ph, pw = (-h) % 32, (-w) % 32
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="reflect")
        f = self.encoder(x)
        y = f[4]
        for up, skip in zip(self.decoder, [f[3], f[2], f[1], f[0], None]):
            y = up(y, skip)
        return self.head(y)[..., :h, :w]
