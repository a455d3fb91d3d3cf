"""The model bundle: one directory with everything prediction needs, checked when loaded."""

from __future__ import annotations

import hashlib
import json
import platform
import warnings
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

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


class BundlePaths:
    """The one place that knows a bundle's file names; the manifest records them, so later versions can move them."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @property
    def embedding(self) -> Path:
        return self.root / "embedding" / "embedding.pt"

    @property
    def embeddings(self) -> Path:
        return self.root / "embedding" / "embeddings.npz"

    @property
    def centroids(self) -> Path:
        return self.root / "regions" / "centroids.npy"

    @property
    def familiarity(self) -> Path:
        return self.root / "regions" / "familiarity.json"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    def expert(self, name: str) -> Path:
        return self.root / "experts" / f"{name}.pt"

    def rel(self, p: Path) -> str:
        return p.relative_to(self.root).as_posix()


class Manifest(BaseModel):
    """manifest.json: what a bundle holds, where, and each file's SHA-256 (checked when the bundle loads)."""

    model_config = ConfigDict(extra="allow")

    format: int
    k: int = Field(ge=1)
    locations: list[str]
    region_of_location: dict[str, int]
    embedding: str
    centroids: str
    familiarity: str | None = None
    experts: list[str]
    baseline: str | None = None
    generalist: str | None = None
    # the network serving each region, chosen on validation (pipelines/serving.py): the region's expert (its own id)
    # or the single network (id k); None: every region its expert
    serving: list[int] | None = None
    threshold: float
    # instance separation chosen on the validation windows (pipelines/calibrate.py); empty: the defaults
    separation: dict[str, float] = Field(default_factory=dict)
    # smallest footprint chosen with the threshold and separation on validation; None: the config's
    min_area_m2: float | None = Field(None, ge=0)
    gsd: float | None = None
    native_gsd: dict[str, float] = Field(default_factory=dict)
    tile_size: int
    bands: int = 3
    versions: dict[str, str] = Field(default_factory=dict)
    checksums: dict[str, str] = Field(default_factory=dict)

    @property
    def serves_single(self) -> bool:
        """True when the single network serves a region, so routed prediction needs it."""
        return bool(self.serving) and self.k in self.serving

    def loads_baseline(self, with_baseline: bool) -> bool:
        """Whether the single network is loaded: when asked for, and always when it serves a region."""
        return bool(self.baseline) and (with_baseline or self.serves_single)

    def files(self, with_baseline: bool = True) -> list[str]:
        """Every file prediction needs (and, ``with_baseline``, the single network and the generalist)."""
        out = [self.embedding, self.centroids, "config.yaml", *self.experts]
        out += [self.familiarity] if self.familiarity else []
        out += [self.baseline] if self.loads_baseline(with_baseline) else []
        out += [self.generalist] if self.generalist and with_baseline else []
        return out


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_manifest(root: Path, manifest: dict) -> Path:
    """Write manifest.json last (a bundle without one is incomplete), with a checksum of every file it lists."""
    m = Manifest.model_validate(manifest)
    m.checksums = {f: sha256(Path(root) / f) for f in m.files() if (Path(root) / f).exists()}
    with atomic_path(Path(root) / MANIFEST) as tmp:
        tmp.write_text(m.model_dump_json(indent=2))
    return Path(root) / MANIFEST


def write_manifest(root: Path, cfg: Config, *, k: int, locations: list[str], region_of_location: dict[str, int],
                   experts: list[str], baseline: str | None, gsd: float | None, native_gsd: dict[str, float],
                   extra: dict | None = None) -> Path:
    """Write config.yaml, then manifest.json."""
    paths = BundlePaths(root)
    dump_config(cfg, paths.config)
    return save_manifest(root, {
        "format": FORMAT, "k": k, "locations": locations, "region_of_location": region_of_location,
        "embedding": paths.rel(paths.embedding), "centroids": paths.rel(paths.centroids),
        "familiarity": paths.rel(paths.familiarity) if paths.familiarity.exists() else None,
        "experts": experts, "baseline": baseline, "threshold": cfg.experts.threshold, "gsd": gsd,
        "native_gsd": native_gsd, "tile_size": cfg.predict.tile_size, "bands": 3, "versions": versions(),
        **(extra or {}),
    })


def _check_versions(mpath: Path, written: dict[str, str]) -> None:
    """Warn when the bundle was written by another major version of geomoe or torch."""
    now = versions()
    for pkg in ("geomoe", "torch"):
        a, b = written.get(pkg, "unknown"), now.get(pkg, "unknown")
        if "unknown" not in (a, b) and a.split(".")[0] != b.split(".")[0]:
            warnings.warn(f"{mpath}: written with {pkg} {a}, running {pkg} {b}; if loading fails, retrain the bundle",
                          stacklevel=3)


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
    def serving(self) -> np.ndarray:
        """(k,) the network serving each region, by the ids prediction uses: the region's expert, or k for the
        single network where it did better on the region's validation windows (pipelines/serving.py)."""
        s = self.manifest.get("serving")
        return np.asarray(s, np.int64) if s else np.arange(self.k)

    @property
    def threshold(self) -> float:
        return float(self.manifest["threshold"])

    @property
    def separation(self):
        """How touching buildings are cut apart (geomoe.pipelines.instances.Separation), as calibrated."""
        from geomoe.pipelines.instances import Separation

        return Separation(**(self.manifest.get("separation") or {}))

    def calibration(self, model: str = "experts"):
        """How ``model``'s probabilities become footprints (geomoe.pipelines.calibration.Calibration): "experts" (what
        prediction uses) or "single" (the single network's own choice on validation, else the experts')."""
        from geomoe.pipelines.calibration import Calibration

        own = (self.manifest.get("calibration") or {}).get(model) if model == "single" else None
        if own:
            return Calibration.from_dict(own)
        # the experts' choice is the manifest's threshold and separation and the (calibrated) config's smallest area
        return Calibration(self.threshold, self.separation, self.config.predict.min_area_m2)

    def calibrations(self, use: str = "experts"):
        """How each network's outputs become footprints (geomoe.pipelines.calibration.Calibrations), by the id
        prediction gives it: each expert its own where the bundle chose one per expert (else the experts' shared
        choice), the single network (id k) its own, the generalist (k + 1) the experts' shared choice. ``use``
        "single" or "generalist": that network runs everywhere, so its calibration is the default."""
        from geomoe.pipelines.calibration import Calibration, Calibrations

        shared, single = self.calibration("experts"), self.calibration("single")
        each = (self.manifest.get("calibration") or {}).get("each_expert") or []
        by_id = {i: Calibration.from_dict(d) for i, d in enumerate(each[:self.k])}
        by_id[self.k] = single
        default = {"single": single, "generalist": shared}.get(use, shared)
        return Calibrations(default, {} if use in ("single", "generalist") else by_id)

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
    try:
        man = Manifest.model_validate(m)
    except ValidationError as e:
        bad = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()[:3])
        raise ValueError(f"{mpath}: not a valid bundle manifest ({bad})") from None
    _check_versions(mpath, man.versions)
    files = man.files(with_baseline)
    missing = [f for f in files if not (root / f).exists()]
    if missing:
        raise ValueError(f"{root}: incomplete bundle, missing: {', '.join(missing)}")
    changed = [f for f in files if f in man.checksums and sha256(root / f) != man.checksums[f]]
    if changed:
        raise ValueError(f"{root}: {', '.join(changed)} changed since the bundle was written (checksum differs from "
                         f"the manifest): a corrupted copy, or a file replaced by hand; copy the bundle again or retrain")
    device = torch.device(device)
    cfg = load_config(root / "config.yaml")
    if man.min_area_m2 is not None:  # calibrated on validation: what predict and evaluate use unless overridden
        cfg = cfg.model_copy(update={"predict": cfg.predict.model_copy(update={"min_area_m2": man.min_area_m2})})
    emb, _ = load_embedding(root / man.embedding, device)
    centroids = np.load(root / man.centroids)
    router = Router(centroids)  # the centroids are stored once; the FAISS index is built from them
    experts = [load_expert(root / f, device)[0] for f in man.experts]
    baseline = load_expert(root / man.baseline, device)[0] if man.loads_baseline(with_baseline) else None
    generalist = load_expert(root / man.generalist, device)[0] if with_baseline and man.generalist else None
    problems = []
    dim = emb.head[-1].out_features
    if centroids.shape != (man.k, dim):
        problems.append(f"centroids are {centroids.shape}, expected ({man.k}, {dim}) for this embedding")
    if len(experts) != man.k:
        problems.append(f"{len(experts)} experts for k = {man.k} regions")
    if man.serving is not None and (len(man.serving) != man.k
                                    or any(s not in (r, man.k) for r, s in enumerate(man.serving))):
        problems.append(f"serving {man.serving}: each region is served by its own expert or the single network "
                        f"({man.k})")
    if man.serves_single and baseline is None:
        problems.append("a region is served by the single network, which the bundle does not have")
    if problems:
        raise ValueError(f"{root}: inconsistent bundle: " + "; ".join(problems))
    return Bundle(root, m, cfg, emb, centroids, router, experts, baseline, device, generalist,
                  _familiarity(root, m, router, cfg.router.unfamiliar_quantile))


def _familiarity(root: Path, m: dict, router: Router, quantile: float) -> Familiarity | None:
    """The bundle's thresholds; older bundles get them from their training embeddings when those are there."""
    f = root / (m.get("familiarity") or "regions/familiarity.json")
    if f.exists():
        fam = Familiarity.load(f)
        if len(fam.thresholds) == router.k:
            return fam
    npz = root / "embedding" / "embeddings.npz"
    if npz.exists():
        d = np.load(npz, allow_pickle=False)
        train = d["split"] == "train"
        ids, dist = router.route(d["vectors"][train])
        return Familiarity.fit(ids, dist, router.k, quantile)
    return None
