"""Routing and expert inference over rows of tiles: what the model does, between the tile source and blending.

Tiles are grouped by expert across a whole tile row, so each expert runs on full batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from geomoe.bundle import Bundle, BundlePaths, sha256
from geomoe.config import PredictConfig
from geomoe.embedding.model import embed_batches
from geomoe.experts.model import predict_channels
from geomoe.pipelines.outputs import RunStats
from geomoe.pipelines.tile_source import TileRow, TileSource
from geomoe.router.smoothing import scene_majority, smooth_grid


class TileModel(Protocol):
    """What prediction needs from a model: tile size, routing, and per-expert probabilities.

    ``channels`` (optional, default 1): 3 when the experts give building, boundary and contact probabilities,
    which are separated into one instance per building before polygonising (pipelines/instances.py).
    """

    tile_size: int
    gsd: float | None  # the GSD every input is resampled to (None: inputs keep theirs unless ``input_gsd`` says)

    def route(self, tiles: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(expert ids (N, top), blend weights (N, top), distance to the nearest centroid (N,))."""

    def predict(self, expert: int, tiles: torch.Tensor) -> torch.Tensor:
        """Probabilities (n, T, T), or (n, channels, T, T), for uint8 tiles (n, 3, T, T)."""


# What ``predict --model`` can run on every tile: the routed experts (the default), or one of the bundle's two
# networks trained on every location: the single network, or the generalist the experts were fine-tuned from (the
# better of the three on places the bundle never saw: README, "Places the bundle never saw").
MODELS = ("experts", "single", "generalist")


class BundleModel:
    """A bundle as a TileModel: embeds the centre patch (what the embedding saw in training), routes by FAISS.

    With ``use`` "single" or "generalist" that network runs on every tile instead of the routed expert; the tiles
    are still routed, so the routing layer shows where the experts would have run and which tiles are unfamiliar.
    """

    def __init__(self, bundle: Bundle, soft: bool = False, tta: bool = False, use: str = "experts"):
        if use not in MODELS:
            raise ValueError(f"model {use!r}: choose {', '.join(MODELS)}")
        # the networks beyond the experts, by the id prediction gives them (after the experts' 0..k-1): the one
        # place that knows these ids
        k = bundle.k
        self.networks = {k: ("single network", bundle.baseline), k + 1: ("generalist", bundle.generalist)}
        self.fixed_id = {"single": k, "generalist": k + 1}.get(use)  # what runs on every tile; None: the experts
        self.serving = bundle.serving  # the network serving each region: its expert, or the single network (id k)
        if self.fixed_id is not None and self.networks[self.fixed_id][1] is None:
            raise ValueError(f"{bundle.root}: this bundle has no {self.networks[self.fixed_id][0]} loaded "
                             f"({'train with --baseline' if use == 'single' else 'its experts were trained from scratch'})")
        self.b, self.soft, self.tta, self.use = bundle, soft, tta, use
        # what was asked of the model beyond its bundle: scene summaries record it, and resume compares it
        self.options = {"soft": soft, "bands": None, "bit_depth": None, "model": use}
        self.tile_size = bundle.config.predict.tile_size
        self.patch = min(bundle.config.data.patch_size, self.tile_size)
        self.gsd = bundle.gsd
        self.device = bundle.device  # pinned tiles and more readers when it is a GPU
        self.channels = 3 if all(e.classes >= 3 for e in bundle.experts) else 1
        # threshold, watershed seeds and smallest footprint: the single network's as calibrated on its own
        # validation outputs, the experts' for the experts and the generalist they were fine-tuned from
        # (``calibrations``: each network's own, by the id prediction gives it: each expert as chosen on the
        # validation windows routed to it)
        self.calibrations = bundle.calibrations(use)
        self.use_alpha = bundle.config.data.alpha == "mask"  # as in training
        self.bands, self.bit_depth = bundle.config.data.bands, bundle.config.data.bit_depth
        # resume only trusts outputs of the same bundle: its manifest (which holds every file's checksum) and its place
        self.identity = f"{bundle.root.resolve()}#{sha256(BundlePaths(bundle.root).manifest)[:12]}"

    def input_gsd(self, native: float | None) -> float | None:
        return self.b.input_gsd(native)

    @property
    def calibration(self):
        """The calibration of the network that runs everywhere (the experts' shared choice for the experts)."""
        return self.calibrations.default

    @property
    def baseline_id(self) -> int | None:
        """The id ``predict`` takes for the single network (after the experts), when the bundle has one loaded."""
        return self.b.k if self.b.baseline is not None else None

    @property
    def run_names(self) -> dict[int, str]:
        """What the routing layer calls the networks beyond the experts."""
        return {i: name for i, (name, _) in self.networks.items()}

    def unfamiliar(self, ids: np.ndarray, dist: np.ndarray) -> np.ndarray:
        return self.b.unfamiliar(ids, dist)

    def embed(self, tiles: torch.Tensor) -> np.ndarray:
        """Unit-norm embeddings of uint8 tiles (n, 3, T, T): their centre patch, the size the embedding trained on."""
        o = (tiles.shape[-1] - self.patch) // 2
        return embed_batches(self.b.embedding, tiles[..., o:o + self.patch, o:o + self.patch], self.b.device)

    def route(self, tiles: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        emb = self.embed(tiles)
        ids, dist = self.b.router.route(emb)
        if self.soft:
            r = self.b.config.router
            sids, w = self.b.router.soft(emb, r.soft_top_k, r.soft_temperature)
            return sids, w, dist
        return ids[:, None], np.ones((len(ids), 1), np.float32), dist

    def predict(self, expert: int, tiles: torch.Tensor) -> torch.Tensor:
        model = self.b.experts[expert] if expert < self.b.k else self.networks[expert][1]
        return predict_channels(model, tiles, self.b.device, self.tta)[:, :self.channels]


@dataclass
class ModelSpec:
    """How to build a BundleModel: small and picklable, so each Ray worker builds its own (loads the bundle once)."""

    bundle: str
    device: str = "auto"
    soft: bool = False
    tta: bool = False
    with_baseline: bool = True
    bands: list[int] | None = None  # None: the bundle's
    bit_depth: int | None = None  # None: the bundle's (NBITS tag, else detected)
    use: str = "experts"  # what runs on every tile (MODELS)

    @property
    def options(self) -> dict:
        """What is asked of the model beyond its bundle (as the loaded model's ``options``)."""
        return {"soft": self.soft, "bands": self.bands, "bit_depth": self.bit_depth, "model": self.use}

    def load(self) -> BundleModel:
        from geomoe.backbone import pick_device
        from geomoe.bundle import load_bundle

        device = pick_device(self.device)  # "auto" is resolved where the model runs (a Ray worker may hold a GPU)
        model = BundleModel(load_bundle(self.bundle, device, with_baseline=self.with_baseline or self.use != "experts"),
                            self.soft, self.tta, self.use)
        if self.bands is not None:
            model.bands = self.bands
        if self.bit_depth is not None:
            model.bit_depth = self.bit_depth
        model.options = self.options
        return model


@dataclass
class RoutingLayer:
    """Expert and distance per tile; ``fixed`` holds routes decided before prediction (smoothed or per scene)."""

    experts: np.ndarray  # (rows, cols) int16: the region's expert; -1 where no tile ran
    distance: np.ndarray  # (rows, cols) float32, distance to the nearest centroid
    fixed: bool = False
    unfamiliar: np.ndarray | None = None  # (rows, cols) bool: beyond the region's training distances
    ran: np.ndarray | None = None  # (rows, cols) int16: what ran (expert id, k = single network, -2 skipped)

    @classmethod
    def empty(cls, rows: int, cols: int, fixed: bool = False) -> "RoutingLayer":
        return cls(np.full((rows, cols), -1, np.int16), np.full((rows, cols), np.nan, np.float32), fixed,
                   np.zeros((rows, cols), bool), np.full((rows, cols), -1, np.int16))

    def flag(self, model: TileModel, iy: int, cols: list[int], ids: np.ndarray, dist: np.ndarray) -> None:
        """Record route and distance of tiles (iy, cols) and whether each is unfamiliar."""
        self.experts[iy, cols] = ids
        self.distance[iy, cols] = dist
        if hasattr(model, "unfamiliar"):
            self.unfamiliar[iy, cols] = model.unfamiliar(ids, dist)


def route_tiles(model: TileModel, tiles: torch.Tensor, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``model.route`` over a row of tiles, ``batch`` tiles at a time (the embedding's memory stays bounded)."""
    parts = [model.route(tiles[s:s + batch]) for s in range(0, len(tiles), batch)]
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))  # type: ignore[return-value]


def route_scene(model: TileModel, src: TileSource, how: str, cfg: PredictConfig, readers: int = 0,
                progress: bool = False, name: str = "") -> RoutingLayer:
    """A first, embedding-only pass over the scene; then each tile takes its neighbourhood's (or the scene's)
    majority expert. The experts run in the second pass on these routes. (Prediction smooths in its one pass,
    :class:`InlineSmoothing`; this pass is for per-scene routing.)"""
    layer = RoutingLayer.empty(len(src.grid.ys), len(src.grid.xs), fixed=True)
    with tqdm(total=len(src.grid), desc=f"{name} routing", unit="tile", disable=not progress, leave=False) as bar:
        for row in src.rows(readers):
            if row.cols:
                ids, _, dist = route_tiles(model, row.tiles, 4 * cfg.batch_size)
                layer.flag(model, row.iy, row.cols, ids[:, 0], dist)
            bar.update(len(row.cols) + row.empty)
    layer.experts = (smooth_grid(layer.experts) if how == "smoothed" else scene_majority(layer.experts)).astype(np.int16)
    return layer


class InlineSmoothing:
    """Smoothed routing within the prediction pass: each tile row is routed as it is read, and its routes are settled
    (the majority of each tile's 3 x 3 neighbourhood, as :func:`smooth_grid` over the whole scene gives) once the
    row below it is routed. The scene is read once, and one row of tiles waits for the next."""

    def __init__(self, layer: RoutingLayer):
        layer.fixed = True  # route_row takes the settled routes as given
        self.layer, self.raw = layer, np.full_like(layer.experts, -1)

    def route(self, model: TileModel, row: TileRow, batch: int) -> None:
        """The nearest regions of ``row``'s tiles (and their distances and unfamiliar flags), not yet smoothed."""
        if row.cols:
            ids, _, dist = route_tiles(model, row.tiles, batch)
            self.layer.flag(model, row.iy, row.cols, ids[:, 0], dist)
            self.raw[row.iy, row.cols] = ids[:, 0]

    def settle(self, iy: int) -> None:
        """Row ``iy``'s smoothed routes; the rows above and below it must be routed (or be beyond the scene)."""
        lo, hi = max(iy - 1, 0), min(iy + 2, len(self.raw))
        self.layer.experts[iy] = smooth_grid(self.raw[lo:hi])[iy - lo]

    def in_order(self, model: TileModel, rows: Iterable[TileRow], batch: int, first: int,
                 stop: int) -> Iterator[TileRow]:
        """``rows`` routed as they come; each of rows [first, stop) given back, in order, once its routes are
        settled (a row later). Rows outside that range are only routed: a strip's neighbours."""
        pending: TileRow | None = None
        for row in rows:
            self.route(model, row, batch)
            if pending is not None:
                self.settle(pending.iy)
                yield pending
            pending = row if first <= row.iy < stop else None
        if pending is not None:
            self.settle(pending.iy)
            yield pending


@dataclass
class PredictedRow:
    """Probabilities of the tiles of one row that ran, at the raster's resolution, and their valid masks."""

    iy: int
    cols: list[int]
    probs: torch.Tensor  # float32 (n, channels, t_src, t_src)
    valid: list[np.ndarray]


@dataclass
class RoutedRow:
    """The tiles of one row that run, each with its experts and their weights (several under soft routing)."""

    iy: int
    cols: list[int]
    tiles: torch.Tensor  # uint8 (n, bands, T, T)
    ids: np.ndarray  # (n, m) expert ids
    weights: np.ndarray  # (n, m) float32
    valid: list[np.ndarray]


def route_row(model: TileModel, row: TileRow, cfg: PredictConfig, layer: RoutingLayer,
              stats: RunStats) -> RoutedRow | None:
    """Route (unless routed already) one row of tiles and decide what runs on each (the network serving each tile's
    region, unless the tile is unfamiliar or one network runs everywhere); None when nothing runs."""
    stats.skipped_tiles += row.empty
    stats.tiles += len(row.cols)  # tiles with data, whether predicted or skipped as unfamiliar
    if not row.cols:
        return None
    iy, keep, batch, valid = row.iy, row.cols, row.tiles, row.valid
    if layer.fixed:
        ids = layer.experts[iy, keep].astype(np.int64)[:, None]
        weights = np.ones((len(keep), 1), np.float32)
    else:
        ids, weights, dist = route_tiles(model, batch, 4 * cfg.batch_size)
        layer.flag(model, iy, keep, ids[:, 0], dist)
    serving = getattr(model, "serving", None)
    if serving is not None:  # regions whose expert lost to the single network on validation get the single network
        ids = serving[ids]
    unf = layer.unfamiliar[iy, keep]
    stats.unfamiliar += int(unf.sum())
    if unf.any() and cfg.unfamiliar != "route":
        if cfg.unfamiliar == "skip":  # these tiles get no prediction; their cells are written as nodata
            layer.ran[iy, np.asarray(keep)[unf]] = -2
            sel = np.flatnonzero(~unf)
            batch, ids, weights = batch[sel], ids[sel], weights[sel]
            keep, valid = [keep[j] for j in sel], [valid[j] for j in sel]
            if not keep:
                return None
        else:  # the single network on every unfamiliar tile
            base = getattr(model, "baseline_id", None)
            if base is None:
                raise ValueError("--unfamiliar baseline needs a bundle with its single network (trained with --baseline)")
            ids, weights = ids.copy(), weights.copy()
            ids[unf] = base
            weights[unf] = 0
            weights[unf, 0] = 1
    fixed = getattr(model, "fixed_id", None)
    if fixed is not None:  # one network on every tile (predict --model): routed above for the layer's record only
        ids, weights = np.full((len(keep), 1), fixed, np.int64), np.ones((len(keep), 1), np.float32)
    layer.ran[iy, keep] = ids[:, 0]
    for e in np.unique(ids):
        stats.per_expert[int(e)] = stats.per_expert.get(int(e), 0) + int((ids[:, 0] == e).sum())
    return RoutedRow(iy, keep, batch, ids, weights, valid)


def predict_batches(model: TileModel, routed: RoutedRow, t_src: int,
                    cfg: PredictConfig) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """(positions in the row, weighted probabilities (b, channels, t_src, t_src)) batch by batch, grouped by expert
    across the row: a tile routed softly comes back once per expert, and its parts add up. Blending each batch as
    it comes keeps a tile row's outputs out of memory (a row of a wide raster is hundreds of tiles)."""
    for e in np.unique(routed.ids):
        rows, slots = np.nonzero(routed.ids == e)
        for s in range(0, len(rows), cfg.batch_size):
            r = rows[s:s + cfg.batch_size]
            p = model.predict(int(e), routed.tiles[r])
            p = p[:, None] if p.ndim == 3 else p
            p = p * torch.from_numpy(routed.weights[r, slots[s:s + cfg.batch_size]])[:, None, None, None]
            if t_src != p.shape[-1]:
                p = F.interpolate(p, size=(t_src, t_src), mode="bilinear", align_corners=False)
            yield r, p


def infer_row(model: TileModel, row: TileRow, t_src: int, cfg: PredictConfig, layer: RoutingLayer,
              stats: RunStats) -> PredictedRow | None:
    """Route and predict one row of tiles, all of its outputs at once (the model's work without the rest of the
    pipeline, as the speed bench times it); None when nothing ran."""
    routed = route_row(model, row, cfg, layer, stats)
    if routed is None:
        return None
    probs = torch.zeros(len(routed.cols), getattr(model, "channels", 1), t_src, t_src)
    for r, p in predict_batches(model, routed, t_src, cfg):
        probs[r] += p
    return PredictedRow(routed.iy, routed.cols, probs, routed.valid)
