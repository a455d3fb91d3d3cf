"""Embed a grid of patches and keep, with each vector, its location, scene, window and split."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader
from tqdm import tqdm

from geomoe.atomic import atomic_path
from geomoe.data.datasets import GridDataset, Prepared
from geomoe.embedding.model import LocationAutoencoder, embed_batches


@dataclass
class Embeddings:
    vectors: np.ndarray  # float32 (n, dim), unit norm
    location: np.ndarray  # str (n,)
    scene: np.ndarray  # str (n,): image path
    window: np.ndarray  # int (n, 3): col, row, size on the scene's resampled grid
    split: np.ndarray  # str (n,): train / val

    def __len__(self) -> int:
        return len(self.vectors)

    def subset(self, keep: np.ndarray) -> "Embeddings":
        return Embeddings(self.vectors[keep], self.location[keep], self.scene[keep], self.window[keep], self.split[keep])

    def save(self, path: Path) -> Path:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, vectors=self.vectors, location=self.location, scene=self.scene,
                                    window=self.window, split=self.split)
        return path

    @classmethod
    def load(cls, path: Path) -> "Embeddings":
        try:
            z = np.load(path, allow_pickle=False)
            return cls(z["vectors"], z["location"], z["scene"], z["window"], z["split"])
        except (OSError, KeyError, ValueError) as e:
            raise ValueError(f"{path}: not an embeddings file written by 'geomoe embed extract' ({e})") from e


def extract(model: LocationAutoencoder, prep: Prepared, batch_size: int = 32, min_valid: float = 0.5,
            progress: bool = True) -> Embeddings:
    """Embeddings of every grid window of every split with at least ``min_valid`` real data."""
    device = next(model.parameters()).device
    model.eval()
    refs = [(r, s) for s in ("train", "val", "test") for r in prep.windows(s)]
    ds = GridDataset(prep, [r for r, _ in refs])
    vecs, keep = [], []
    for batch in tqdm(DataLoader(ds, batch_size=batch_size), desc="embedding patches", unit="batch", disable=not progress):
        ok = batch["valid"].float().mean((1, 2)) >= min_valid
        vecs.append(embed_batches(model, batch["image"], device))
        keep.append(ok.numpy())
    keep_a = np.concatenate(keep)
    vectors = np.concatenate(vecs)[keep_a]
    kept = [refs[i] for i in np.flatnonzero(keep_a)]
    return Embeddings(
        vectors.astype(np.float32),
        np.array([prep.location_of(r) for r, _ in kept]),
        np.array([str(prep.readers[r.scene].scene.image) for r, _ in kept]),
        np.array([(r.col, r.row, r.size) for r, _ in kept], dtype=np.int64).reshape(-1, 3),
        np.array([s for _, s in kept]),
    )
