"""``geomoe show-results``: image, truth, prediction and routed expert, side by side."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from geomoe.bundle import Bundle
from geomoe.data.datasets import GridDataset, Prepared
from geomoe.pipelines.evaluate import route_batch
from geomoe.plots import overlay, plt, save_figure


def show_results(bundle: Bundle, prep: Prepared, out: Path, n: int = 6, seed: int = 0, split: str = "test") -> Path:
    """``n`` windows spread over locations: image / truth / embedding-routed prediction / expert and distance."""
    refs = prep.windows(split)
    rng = np.random.default_rng(seed)
    by_loc: dict[str, list[int]] = {}
    for i, r in enumerate(refs):
        by_loc.setdefault(prep.location_of(r), []).append(i)
    picks: list[int] = []
    while len(picks) < min(n, len(refs)):
        for loc in sorted(by_loc):
            rest = [i for i in by_loc[loc] if i not in picks]
            if rest and len(picks) < n:
                picks.append(int(rng.choice(rest)))
    batch = next(iter(DataLoader(GridDataset(prep, [refs[i] for i in picks]), batch_size=len(picks))))
    rb = route_batch(bundle, batch["image"])
    # what prediction runs there: the region's expert, or the single network where it serves the region
    prob = rb.method_probs("embedding", np.zeros(len(picks), np.int64), None).numpy()
    ran = rb.method_ids("embedding", np.zeros(len(picks), np.int64), None)
    rules = bundle.calibrations("experts")
    fig, axes = plt.subplots(len(picks), 4, figsize=(12, 3 * len(picks)), squeeze=False)
    for j in range(len(picks)):
        img, truth, valid = batch["image"][j].numpy(), batch["mask"][j].numpy(), batch["valid"][j].numpy()
        pred = prob[j] >= rules.of(ran[j]).threshold  # as that network was calibrated
        inter, union = (pred & (truth > 0) & valid).sum(), ((pred | (truth > 0)) & valid).sum()
        loc = prep.locations[int(batch["location"][j])]
        e = int(rb.embedding[j])
        panels = [(overlay(img, None, valid), f"{loc}"), (overlay(img, truth, valid, (40, 220, 40)), "truth"),
                  (overlay(img, pred, valid), f"prediction (IoU {inter / union if union else float('nan'):.2f})"),
                  (np.full(img.shape[1:] + (3,), 255, np.uint8), "")]
        for ax, (pic, title) in zip(axes[j], panels):
            ax.imshow(pic)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        color = plt.cm.tab10(e % 10)
        axes[j, 3].add_patch(plt.Rectangle((0, 0), 1, 1, transform=axes[j, 3].transAxes, color=color, alpha=0.35))
        served = "" if ran[j] == e else "\nserved by the single network"
        axes[j, 3].text(0.5, 0.5, f"expert {e}{served}\ncosine distance {rb.distance[j]:.3f}\n"
                        f"(oracle: {bundle.region_of_location.get(loc, '?')})", ha="center", va="center",
                        transform=axes[j, 3].transAxes, fontsize=11)
        axes[j, 3].set_title("routed to", fontsize=9)
    return save_figure(fig, out, dpi=90)
