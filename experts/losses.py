"""alpha * BCE + (1 - alpha) * (1 - soft Jaccard), over valid (non-nodata) pixels only.

Both terms are computed per image and averaged over the batch, so the loss of a batch split over several
processes (DDP) averages to the loss of the whole batch, and the two runs take the same steps.

The Jaccard term counts only images with building pixels: on an image without any, soft Jaccard is
1 / (sum of probabilities + 1), about 0 unless every pixel is near 0, so the term sits near its maximum and
its only pull is to lower every probability in the image. Regions with many empty patches (villages, fields)
then learn to under-predict; BCE alone scores the empty images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_jaccard(prob: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Per-image soft Jaccard (N,) of ``prob``, ``target``, ``valid`` (N, H, W)."""
    v = valid.to(prob.dtype)
    inter = (prob * target * v).sum((-2, -1))
    union = ((prob + target - prob * target) * v).sum((-2, -1))
    return (inter + eps) / (union + eps)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, alpha: float) -> torch.Tensor:
    """``logits`` (N, 1, H, W); ``target`` and ``valid`` (N, H, W)."""
    logits = logits[:, 0]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 in, float32 (or float64) loss
    target, v = target.to(logits.dtype), valid.to(logits.dtype)
    bce = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * v).sum((-2, -1)) / v.sum((-2, -1)).clamp(min=1)
    jac = soft_jaccard(torch.sigmoid(logits), target, valid)
    has = ((target * v).sum((-2, -1)) > 0).to(logits.dtype)
    return (alpha * bce + (1 - alpha) * (1 - jac) * has).mean()


def instance_loss(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, alpha: float,
                  aux_weight: float = 0.5) -> torch.Tensor:
    """Building channel as :func:`segmentation_loss`; boundary and contact channels each by the same
    alpha * BCE + (1 - alpha) * (1 - soft Jaccard). Contact pixels are a fraction of a percent of an image: by BCE
    alone the channel learns to stay near 0 everywhere and the watershed gets no cut between touching roofs (the
    SpaceNet 4 and Open Cities winners put a Dice or Jaccard term on every channel for this reason)."""
    loss = segmentation_loss(logits[:, :1], targets[:, 0], valid, alpha)
    aux = sum(segmentation_loss(logits[:, c:c + 1], targets[:, c], valid, alpha) for c in (1, 2))
    return loss + aux_weight * aux
