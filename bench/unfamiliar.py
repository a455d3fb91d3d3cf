"""How often the router flags tiles as unfamiliar: on the test split of places it knows, and on a place it never saw.

No sixth place with imagery is on this machine, so a place is left out instead: for each location L, regions
(k-means, k from the bundle) and their familiarity thresholds (router/familiarity.py) are fitted on the training
tiles of the other locations only, and the share of flagged test tiles is measured for L (never seen by the
regions) and for the others. The embedding network itself did see every location while it trained, which makes
a left-out place easier to tell apart than a truly new one would be.
Usage: uv run python bench/unfamiliar.py [--bundle bench/runs/quality/bundle]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from common import record, write_json

from geomoe.bundle import load_bundle
from geomoe.embedding.extract import Embeddings
from geomoe.embedding.regions import fit_kmeans
from geomoe.router.familiarity import Familiarity
from geomoe.router.routing import Router


def flagged(emb: Embeddings, centroids: np.ndarray, fam: Familiarity, keep: np.ndarray) -> float:
    ids, dist = Router(centroids).route(emb.vectors[keep])
    return float(fam.unfamiliar(ids, dist).mean()) if keep.any() else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", type=Path, default=Path("bench/runs/quality/bundle"))
    a = ap.parse_args()
    b = load_bundle(a.bundle, with_baseline=False)
    emb = Embeddings.load(a.bundle / "embedding" / "embeddings.npz")
    q = b.config.router.unfamiliar_quantile
    train, test = emb.split == "train", emb.split == "test"
    rows = {}
    # the bundle as trained: every location known
    for loc in sorted(set(emb.location)):
        rows.setdefault(loc, {})["known"] = flagged(emb, b.centroids, b.familiarity, test & (emb.location == loc))
    for out in sorted(set(emb.location)):
        fit = train & (emb.location != out)
        c = fit_kmeans(emb.vectors[fit], b.k, seed=0)
        ids, dist = Router(c).route(emb.vectors[fit])
        fam = Familiarity.fit(ids, dist, b.k, q)
        rows[out]["left_out"] = flagged(emb, c, fam, test & (emb.location == out))
        rows[out]["others_when_left_out"] = flagged(emb, c, fam, test & (emb.location != out))
    lines = ["| location | flagged, bundle as trained (test split) | flagged when this location is left out of the "
             "regions | other locations' test tiles flagged then |", "|---|---|---|---|"]
    for loc, r in rows.items():
        lines.append(f"| {loc} | {r['known']:.3f} | {r['left_out']:.3f} | {r['others_when_left_out']:.3f} |")
    lines.append(f"\nThreshold: the {q:.2f} quantile of each region's training distances. The embedding network saw "
                 f"every location in training; only the regions and thresholds leave one out.")
    record("Unfamiliar tiles: known places and a left-out place", "\n".join(lines), f"{a.bundle}, k = {b.k}")
    write_json("unfamiliar", {"rows": rows, "quantile": q}, {"bundle": str(a.bundle), "k": b.k})


if __name__ == "__main__":
    main()
