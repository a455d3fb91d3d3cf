"""The model bundle: one directory with everything prediction needs, checked when loaded."""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from geomoe.atomic import atomic_path
from geomoe.config import Config, dump_config, load_config
from geomoe.embedding.model import LocationAutoencoder
from geomoe.embedding.model import load_embedding
from geomoe.experts.model import Expert
from geomoe.experts.model import load_expert
from geomoe.router.familiarity import Familiarity
from geomoe.router.routing import Router

MANIFEST = "manifest.json"
FORMAT = 2  # 1: geomoe 0.1 (hand-written U-Net); 2: smp experts, Lightning-trained


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("geomoe", "torch", "segmentation-models-pytorch", "lightning", "faiss-cpu", "rasterio", "numpy"):
        try:
            out[pkg] = version(pkg)
        except Exception:
            out[pkg] = "unknown"
    return out


def write_manifest(root: Path, cfg: Config, *, k: int, locations: list[str], region_of_location: dict[str, int],
                   experts: list[str], baseline: str | None, gsd: float | None, native_gsd: dict[str, float],
                   extra: dict | None = None) -> Path:
    """Write config.yaml and manifest.json last: a bundle without a manifest is incomplete."""
    dump_config(cfg, root / "config.yaml")
    m = {
        "format": FORMAT,
        "k": k,
        "locations": locations,
        "region_of_location": region_of_location,
        "embedding": "embedding/embedding.pt",
        "centroids": "regions/centroids.npy",
        "index": "router.faiss",
        "familiarity": "regions/familiarity.json",
        "experts": experts,
        "baseline": baseline,
        "threshold": cfg.experts.threshold,
        "gsd": gsd,
        "native_gsd": native_gsd,
        "tile_size": cfg.predict.tile_size,
        "bands": 3,
        "versions": versions(),
        **(extra or {}),
    }
    with atomic_path(root / MANIFEST) as tmp:
        tmp.write_text(json.dumps(m, indent=2))
    return root / MANIFEST


@dataclass
class Bundle:
    root: Path
    manifest: dict
    config: Config
    embedding: LocationAutoencoder
    centroids: np.ndarray
    router: Router
    experts: list[Expert]
    baseline: Expert | None
    device: torch.device
    generalist: Expert | None = None  # what the experts were fine-tuned from (None: trained from scratch)
    familiarity: Familiarity | None = None  # per-region distance thresholds (None: nothing is flagged)

    def unfamiliar(self, ids: np.ndarray, dist: np.ndarray) -> np.ndarray:
        """True for tiles farther from their region's centroid than the region's training tiles (see router/familiarity.py)."""
        if self.familiarity is None:
            return np.zeros(len(ids), bool)
        return self.familiarity.unfamiliar(ids, dist)

    @property
    def k(self) -> int:
        return len(self.experts)

    @property
    def threshold(self) -> float:
        return float(self.manifest["threshold"])

    @property
    def gsd(self) -> float | None:
        return self.manifest.get("gsd")

    @property
    def gsd_range(self) -> tuple[float, float] | None:
        """Finest and coarsest ground resolution (m) the experts trained on, from each location's native GSD."""
        if self.gsd is not None:
            return (self.gsd, self.gsd)
        vals = [float(v) for v in (self.manifest.get("native_gsd") or {}).values() if v]
        return (min(vals), max(vals)) if vals else None

    def input_gsd(self, native: float | None) -> float | None:
        """The GSD an input of ``native`` m/pixel is resampled to before the models see it.

        A bundle trained at one GSD resamples everything to it; one trained at each location's native GSD leaves
        inputs inside the range it trained on alone and brings finer or coarser ones to the nearest end of it
        (a 5 cm drone mosaic is not shown to experts that never saw roofs that large). None: unknown, no resampling.
        """
        rng = self.gsd_range
        if native is None or rng is None:
            return None
        return min(max(native, rng[0]), rng[1])

    @property
    def region_of_location(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.manifest["region_of_location"].items()}


def load_bundle(root: str | Path, device: torch.device | str = "cpu", with_baseline: bool = True) -> Bundle:
    """Load and cross-check a bundle; every missing or inconsistent part is named in one error."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such bundle directory")
    mpath = root / MANIFEST
    if not mpath.exists():
        raise ValueError(f"{root}: incomplete bundle: {MANIFEST} is missing (training did not finish?)")
    try:
        m = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{mpath}: not valid JSON ({e})") from e
    if m.get("format") == 1:
        raise ValueError(f"{mpath}: bundle format 1, written by geomoe {m.get('versions', {}).get('geomoe', '0.1')}, "
                         f"whose networks this version cannot load; retrain it with 'geomoe train ROOT -o NEW_BUNDLE'")
    if m.get("format") != FORMAT:
        raise ValueError(f"{mpath}: bundle format {m.get('format')} is not the supported {FORMAT}")
    files = [m["embedding"], m["centroids"], m["index"], "config.yaml", *m["experts"]]
    if with_baseline and m.get("baseline"):
        files.append(m["baseline"])
    if with_baseline and m.get("generalist"):
        files.append(m["generalist"])
    missing = [f for f in files if not (root / f).exists()]
    if missing:
        raise ValueError(f"{root}: incomplete bundle, missing: {', '.join(missing)}")
    device = torch.device(device)
    cfg = load_config(root / "config.yaml")
    emb, _ = load_embedding(root / m["embedding"], device)
    centroids = np.load(root / m["centroids"])
    router = Router.load(root / m["index"])
    experts = [load_expert(root / f, device)[0] for f in m["experts"]]
    baseline = load_expert(root / m["baseline"], device)[0] if with_baseline and m.get("baseline") else None
    generalist = load_expert(root / m["generalist"], device)[0] if with_baseline and m.get("generalist") else None
    problems = []
    dim = emb.head[-1].out_features
    if centroids.shape != (m["k"], dim):
        problems.append(f"centroids are {centroids.shape}, expected ({m['k']}, {dim}) for this embedding")
    if router.k != m["k"] or router.dim != dim:
        problems.append(f"router index holds {router.k} centroids of dimension {router.dim}, expected {m['k']} of {dim}")
    if len(experts) != m["k"]:
        problems.append(f"{len(experts)} experts for k = {m['k']} regions")
    if problems:
        raise ValueError(f"{root}: inconsistent bundle: " + "; ".join(problems))
    return Bundle(root, m, cfg, emb, centroids, router, experts, baseline, device, generalist,
                  _familiarity(root, m, router, cfg.router.unfamiliar_quantile))


def _familiarity(root: Path, m: dict, router: Router, quantile: float) -> Familiarity | None:
    """The bundle's thresholds; older bundles get them from their training embeddings when those are there."""
    f = root / m.get("familiarity", "regions/familiarity.json")
    if f.exists():
        return Familiarity.load(f)
    npz = root / "embedding" / "embeddings.npz"
    if npz.exists():
        d = np.load(npz, allow_pickle=False)
        train = d["split"] == "train"
        ids, dist = router.route(d["vectors"][train])
        return Familiarity.fit(ids, dist, router.k, quantile)
    return None


def save_manifest(root: Path, manifest: dict) -> Path:
    with atomic_path(root / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2))
    return root / MANIFEST
