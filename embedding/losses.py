"""Triplet margin loss with d = 1 - cosine, triplets mined inside a location-balanced batch."""

from __future__ import annotations

import torch


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise 1 - cos between rows of unit-norm ``a`` and ``b``."""
    return 1.0 - a @ b.T


def batch_triplet_loss(emb: torch.Tensor, labels: torch.Tensor, margin: float, semi_hard: bool = False,
                       generator: torch.Generator | None = None) -> torch.Tensor | None:
    """Mean of max(0, d(a,p) - d(a,n) + margin) over one triplet per anchor.

    The positive is a random patch of the anchor's location, the negative a random patch of another
    location or, with ``semi_hard``, the closest negative still farther than the positive (falling
    back to the hardest). Returns None when no anchor has both a positive and a negative.
    """
    d = cosine_distance(emb, emb)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=emb.device)
    pos_ok, neg_ok = same & ~eye, ~same
    anchors = pos_ok.any(1) & neg_ok.any(1)
    if not anchors.any():
        return None
    r = torch.rand(d.shape, generator=generator, device="cpu").to(emb.device)
    p = torch.where(pos_ok, r, -1.0).argmax(1)
    d_ap = d.gather(1, p[:, None]).squeeze(1)
    if semi_hard:
        semi = neg_ok & (d > d_ap[:, None])
        cand = torch.where(semi, d, float("inf"))
        hardest = torch.where(neg_ok, d, float("inf")).argmin(1)
        n = torch.where(semi.any(1), cand.argmin(1), hardest)
    else:
        n = torch.where(neg_ok, r, -1.0).argmax(1)
    d_an = d.gather(1, n[:, None]).squeeze(1)
    return torch.relu(d_ap - d_an + margin)[anchors].mean()
