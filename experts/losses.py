"""alpha * BCE + (1 - alpha) * (1 - soft Jaccard), over valid (non-nodata) pixels only."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_jaccard(prob: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    v = valid.float()
    inter = (prob * target * v).sum()
    union = ((prob + target - prob * target) * v).sum()
    return (inter + eps) / (union + eps)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, alpha: float) -> torch.Tensor:
    """``logits`` (N, 1, H, W); ``target`` and ``valid`` (N, H, W)."""
    logits = logits[:, 0].float()
    v = valid.float()
    bce = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * v).sum() / v.sum().clamp(min=1)
    return alpha * bce + (1 - alpha) * (1 - soft_jaccard(torch.sigmoid(logits), target, valid))
