"""Torch datasets over scene windows: random balanced patches for training, fixed grids for evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset

from geomoe.config import DataConfig
from geomoe.data.catalog import Catalog, Scene, discover
from geomoe.data.check import check_scene
from geomoe.data.reader import SceneReader
from geomoe.data.sampling import BalancedSampler, Block, PatchRef, WindowSampler, capped, grid_windows, split_blocks

if TYPE_CHECKING:
    from geomoe.experts.targets import TargetWidths


def augment(rng: np.random.Generator, *planes: np.ndarray) -> list[np.ndarray]:
    """Random flips and 90-degree rotations, the same for every plane (image, mask, valid mask, building ids)."""
    k = int(rng.integers(4))
    flip = bool(rng.integers(2))
    out = []
    for a in planes:
        if a is None:  # an unlabelled patch has no building ids
            out.append(a)
            continue
        a = np.rot90(a, k, axes=(-2, -1))
        if flip:
            a = a[..., ::-1]
        out.append(np.ascontiguousarray(a))
    return out


def jitter_colours(rng: np.random.Generator, image: np.ndarray, strength: float) -> np.ndarray:
    """A uint8 image (bands, H, W) with random saturation, contrast and brightness, each a factor within
    1 +- ``strength``, and a gain per band within 1 +- ``strength`` / 2 (another sensor's colour balance): the same
    roofs as another camera, season or sun would show them."""
    s = strength
    x = image.astype(np.float32)
    grey = x.mean(0, keepdims=True)
    x = grey + (x - grey) * rng.uniform(1 - s, 1 + s)
    mean = x.mean()
    x = (x - mean) * rng.uniform(1 - s, 1 + s) + mean
    x = x * rng.uniform(1 - s, 1 + s) * rng.uniform(1 - s / 2, 1 + s / 2, size=(len(x), 1, 1))
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def to_sample(image: np.ndarray, mask: np.ndarray | None, valid: np.ndarray, location: int, index: int,
              instances: np.ndarray | None = None) -> dict:
    return {
        "image": torch.from_numpy(image),  # uint8; models normalise with their stored statistics
        "mask": torch.from_numpy(mask if mask is not None else np.zeros(valid.shape, np.uint8)).float(),
        "valid": torch.from_numpy(valid),
        # one id per true building (touching ones apart where the location has outlines), 0 elsewhere
        "instances": torch.from_numpy(instances if instances is not None else np.zeros(valid.shape, np.int32)),
        "location": location,
        "index": index,
    }


@dataclass
class DataReport:
    """What training used: per location, images found, labelled and used; every scene left out and why."""

    locations: dict[str, dict[str, int]] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (image path, reason)
    skipped_locations: list[str] = field(default_factory=list)
    # median metres per pixel of each location's used images; None where none has a CRS or a gsd_m in locations.csv
    gsd: dict[str, float | None] = field(default_factory=dict)
    # windows of each split per location after the split and its gap
    windows: dict[str, dict[str, int]] = field(default_factory=dict)
    # validation windows of each location before data.max_val_windows kept some of them
    val_all: dict[str, int] = field(default_factory=dict)
    # masks of each location read other than as plain 0/1/255 on the image's grid: {lossy | ids | grid: images}
    masks: dict[str, dict[str, int]] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [f"{loc}: {c['images']} images, {c['labelled']} labelled, {c['used']} used{self._gsd_text(loc)}"
               f"{self._masks_text(loc)}{self._windows_text(loc)}" for loc, c in self.locations.items()]
        if self.skipped:
            out.append(f"{len(self.skipped)} scenes left out, e.g. {self.skipped[0][0]}: {self.skipped[0][1]}")
        if self.skipped_locations:
            out.append("locations left out as asked: " + ", ".join(self.skipped_locations))
        return out

    def _gsd_text(self, loc: str) -> str:
        if loc not in self.gsd:
            return ""
        g = self.gsd[loc]
        if g is None:
            return ", GSD unknown (no CRS, no gsd_m in locations.csv): used at its own pixel size, never resampled"
        return f", GSD {g:.3g} m"

    def _masks_text(self, loc: str) -> str:
        said = {"lossy": "read as 0/255 with values between (lossy), building from 128",
                "ids": "read as building ids, one per building",
                "grid": "on another grid than the image's, read onto it by georeference"}
        return "".join(f"; {n} mask{'s' if n > 1 else ''} {said[k]}" for k, n in self.masks.get(loc, {}).items())

    def _windows_text(self, loc: str) -> str:
        if loc not in self.windows:
            return ""
        w = self.windows[loc]
        of = self.val_all.get(loc, w["val"])
        val = f"{w['val']}" + (f" (of {of}: data.max_val_windows)" if of > w["val"] else "")
        text = f"; windows train {w['train']} / val {val} / test {w['test']}"
        if not w["val"] or not w["test"]:
            none = " and ".join(s for s in ("val", "test") if not w[s])
            text += (f" (no {none}: too few scenes, or tiles no larger than a patch that touch each other, for "
                     f"splits a patch apart; {'not reported by evaluate' if not w['test'] else 'not in checkpoint choice or calibration'})")
        return text

    def as_dict(self) -> dict:
        return {"locations": self.locations, "skipped_scenes": [{"image": p, "reason": r} for p, r in self.skipped],
                "skipped_locations": self.skipped_locations, "gsd_m": self.gsd, "windows": self.windows, "masks": self.masks}


@dataclass
class Prepared:
    """A dataset root made ready for training: usable scenes, their readers and the block split."""

    catalog: Catalog
    readers: list[SceneReader]
    blocks: list[Block]
    patch_size: int
    locations: list[str] = field(default_factory=list)
    report: DataReport = field(default_factory=DataReport)
    max_val_windows: int | None = None  # data.max_val_windows

    def location_of(self, ref: PatchRef) -> str:
        return self.readers[ref.scene].scene.location

    def windows(self, split: str, size: int | None = None) -> list[PatchRef]:
        refs = grid_windows(self.blocks, size or self.patch_size, split)  # type: ignore[arg-type]
        if split == "val" and self.max_val_windows is not None:
            refs = capped(refs, [self.location_of(r) for r in refs], self.max_val_windows)
        return refs


def reader_for(scene: Scene, cfg: DataConfig) -> SceneReader:
    """A reader of ``scene`` as training reads it (resolution, bands, bit depth, alpha)."""
    return SceneReader(scene, cfg.target_gsd, use_alpha=cfg.alpha == "mask", bands=cfg.bands, bits=cfg.bit_depth)


def prepare(root, cfg: DataConfig, seed: int = 0) -> Prepared:
    """Discover, check (every block, or headers only without ``cfg.full_check``) and split a dataset root."""
    cat = discover(root)
    readers = []
    report = DataReport(skipped_locations=sorted({s.location for s in cat.scenes} & set(cfg.skip_locations)))
    for s in cat.scenes:
        if s.location in cfg.skip_locations:
            continue
        counts = report.locations.setdefault(s.location, {"images": 0, "labelled": 0, "used": 0})
        counts["images"] += 1
        if s.label is None:
            report.skipped.append((str(s.image), "no label"))
            continue
        counts["labelled"] += 1
        seen = len(cat.problems)
        if check_scene(s, cat.problems, full=cfg.full_check).ok:
            readers.append(reader_for(s, cfg))
            counts["used"] += 1
            for said in ([s.mask_reading] if s.mask_reading in ("lossy", "ids") else []) + ["grid"] * s.mask_on_own_grid:
                by = report.masks.setdefault(s.location, {})
                by[said] = by.get(said, 0) + 1
        else:
            why = next((p.message for p in cat.problems[seen:] if p.fatal), "unusable")
            report.skipped.append((str(s.image), why))
    for loc in report.locations:
        known = [r.gsd for r in readers if r.scene.location == loc and r.gsd is not None]
        if any(r.scene.location == loc for r in readers):
            report.gsd[loc] = float(np.median(known)) if known else None
    lost = [loc for loc, c in report.locations.items() if c["labelled"] and not c["used"]]
    if lost:
        loc = lost[0]
        example = next((f"{p}: {r}" for p, r in report.skipped if f"/{loc}/" in p.replace("\\", "/")), "")
        raise ValueError(f"{root}: location {loc} lost all its {report.locations[loc]['labelled']} labelled images "
                         f"({example}); fix them, or leave the location out (data.skip_locations / --skip-location {loc})")
    if not readers:
        detail = "; ".join(str(p) for p in cat.problems[:5])
        raise ValueError(f"{root}: no usable labelled images ({detail or 'none found'})")
    block = cfg.block_size or 2 * cfg.patch_size
    gap = cfg.patch_size if cfg.split_gap is None else cfg.split_gap
    blocks = split_blocks(readers, block, cfg.val_fraction, seed, cfg.test_fraction, gap)
    locs = sorted({r.scene.location for r in readers})
    prep = Prepared(cat, readers, blocks, cfg.patch_size, locs, report, cfg.max_val_windows)
    for split in ("train", "val", "test"):
        for ref in prep.windows(split):
            counts = report.windows.setdefault(prep.location_of(ref), {"train": 0, "val": 0, "test": 0})
            counts[split] += 1
    for ref in grid_windows(blocks, cfg.patch_size, "val"):
        loc = prep.location_of(ref)
        report.val_all[loc] = report.val_all.get(loc, 0) + 1
    for loc in locs:
        report.windows.setdefault(loc, {"train": 0, "val": 0, "test": 0})
    return prep


class GridDataset(Dataset):
    """Fixed windows (evaluation, embedding extraction)."""

    def __init__(self, prep: Prepared, refs: list[PatchRef]):
        self.prep, self.refs = prep, refs

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> dict:
        ref = self.refs[i]
        p = self.prep.readers[ref.scene].read(ref.col, ref.row, ref.size)
        return to_sample(p.image, p.mask, p.valid, self.prep.locations.index(self.prep.location_of(ref)), i, p.instances)


class RandomPatchDataset(Dataset):
    """Random training patches, balanced across locations, augmented; item ``i`` is a pure function of (seed, i).

    Epochs are consecutive index ranges (see :class:`geomoe.data.loaders.EpochSampler`), so a resumed run, or a
    run on another number of processes, sees exactly the same patches. Patches with less than ``min_valid``
    real data are redrawn.
    """

    def __init__(self, prep: Prepared, length: int, seed: int = 0, augment: bool = True, min_valid: float = 0.5,
                 refs: list[PatchRef] | None = None, cycle_locations: bool = False, instance_targets: TargetWidths | None = None,
                 replay: float = 0.0, weights: list[float] | None = None, colour_jitter: float = 0.0,
                 turns: bool = True):
        self.prep, self.length, self.seed, self.aug, self.min_valid = prep, length, seed, augment, min_valid
        self.turns = turns  # flips and quarter turns (with augment)
        self.colour_jitter = colour_jitter if augment else 0.0
        self.instance_targets = instance_targets  # add building / boundary / contact channels ("targets") this wide
        # Given windows (a region's share) are drawn shifted inside their blocks; otherwise anywhere in the train blocks.
        balanced = BalancedSampler(prep.readers, prep.blocks, prep.patch_size) if refs is None or replay > 0 else None
        self.sampler = WindowSampler(prep.readers, refs, prep.blocks, weights) if refs is not None else balanced
        # an expert's share of patches from every location, as the generalist it started from saw them
        self.replay, self.everywhere = (replay, balanced) if refs is not None and replay > 0 else (0.0, None)
        self.cycle = cycle_locations  # item i comes from location i mod n: every batch holds every location

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng([self.seed, i])
        for _ in range(10):
            loc = self.sampler.locations[i % len(self.sampler.locations)] if self.cycle else None
            everywhere = self.everywhere is not None and rng.random() < self.replay
            ref = (self.everywhere if everywhere else self.sampler).draw(rng, loc)
            p = self.prep.readers[ref.scene].read(ref.col, ref.row, ref.size)
            if p.valid.mean() >= self.min_valid:
                break
        image, mask, valid, ids = p.image, p.mask, p.valid, p.instances
        if self.aug and self.turns:
            image, mask, valid, ids = augment(rng, image, mask, valid, ids)
        if self.colour_jitter > 0:  # drawn after the geometry: without it, every patch is the one it always was
            image = jitter_colours(rng, image, self.colour_jitter)
        sample = to_sample(image, mask, valid, self.prep.locations.index(self.prep.location_of(ref)), i, ids)
        if self.instance_targets is not None:
            from geomoe.experts.targets import building_targets

            reader = self.prep.readers[ref.scene]
            boundary, contact = self.instance_targets.pixels(reader.target_gsd or reader.gsd)
            sample["targets"] = torch.from_numpy(building_targets(mask, boundary, contact, instances=ids))
        return sample


def compute_stats(prep: Prepared, n: int = 64, seed: int = 0) -> tuple[list[float], list[float]]:
    """Per-band mean and std (0-1 scale) of valid training pixels, from ``n`` random patches."""
    ds = RandomPatchDataset(prep, n, seed, augment=False)
    s = np.zeros(3)
    ss = np.zeros(3)
    cnt = 0
    for i in range(n):
        d = ds[i]
        v = d["valid"].numpy()
        px = d["image"].numpy()[:, v].astype(np.float64) / 255.0
        s += px.sum(1)
        ss += (px**2).sum(1)
        cnt += v.sum()
    mean = s / max(cnt, 1)
    std = np.sqrt(np.maximum(ss / max(cnt, 1) - mean**2, 1e-6))
    return mean.tolist(), std.tolist()
