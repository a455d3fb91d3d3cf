"""One typed configuration for the whole chain: YAML in, validated object out."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

# Encoders and decoders from segmentation-models-pytorch that geomoe builds, tests and supports. "tu-" names are
# timm models through smp's universal encoder. Every name here is built and run by tests/test_models.py.
Encoder = Literal["resnet18", "resnet34", "resnet50", "resnet101",
                  "efficientnet-b0", "efficientnet-b1", "efficientnet-b2", "efficientnet-b3", "efficientnet-b4",
                  "mit_b0", "mit_b1", "mit_b2",
                  "tu-convnext_tiny", "tu-convnext_small"]
Decoder = Literal["Unet", "UnetPlusPlus", "FPN", "DeepLabV3Plus"]
# smp cannot pair these (UNet++ needs convolutional skips at every stride; Mix Transformers have none at stride 2).
UNSUPPORTED = {("UnetPlusPlus", "mit_b0"), ("UnetPlusPlus", "mit_b1"), ("UnetPlusPlus", "mit_b2")}
EmbeddingEncoder = Literal["resnet18", "resnet34", "resnet50", "resnet101"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    target_gsd: float | None = Field(None, gt=0, description="Resample every scene to this GSD (m); None keeps native.")
    patch_size: int = Field(256, ge=32)
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="Validation: checkpoint choice and any tuning.")
    test_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="Test: reported by 'evaluate', never used to choose.")
    block_size: int | None = Field(None, ge=32, description="Spatial split block in target pixels (default 2x patch).")
    split_gap: int | None = Field(None, ge=0, description="Pixels between windows of different splits (default: one patch).")
    alpha: Literal["drop", "mask"] = "mask"
    bands: list[int] | None = Field(None, description="Three 1-based band numbers to read as RGB from multispectral "
                                    "imagery (default: 1, 2, 3); stored with the bundle and used in prediction.")
    bit_depth: int | None = Field(None, ge=1, le=32, description="Bits per sample of the imagery (default: the NBITS "
                                  "tag, else detected from the data type and values; 11- and 12-bit sensors store uint16).")
    min_valid: float = Field(0.5, ge=0.0, le=1.0, description="Skip patches with less valid (non-nodata) area.")
    max_val_windows: int | None = Field(
        600, ge=1, description="Validation windows at most, shared evenly over the locations and spread through each: "
                               "validation runs after every epoch, and on a large dataset would cost more than the "
                               "training (null: every one).")
    train_patches_per_location: int = Field(64, ge=1)
    workers: int = Field(0, ge=0)
    skip_locations: list[str] = Field(default_factory=list, description="Locations to leave out (a location whose "
                                      "images are all unusable stops training unless it is named here).")
    full_check: bool = Field(True, description="Read every block before training (finds truncated files, bad mask values).")


class EmbeddingConfig(_Strict):
    encoder: EmbeddingEncoder = "resnet34"
    input_size: int = Field(160, ge=32, description="Patches are resized to this before embedding; 160 gives the paper's 5x5 bottleneck.")
    dim: int = Field(2048, ge=8)
    margin: float = Field(0.3, gt=0)
    triplet_weight: float = Field(1.0, ge=0)
    recon_weight: float = Field(1.0, ge=0)
    semi_hard: bool = False
    lr: float = 1e-4
    weight_decay: float = 5e-4
    epochs: int = Field(10, ge=1)
    steps_per_epoch: int = Field(50, ge=1)
    batch_size: int = Field(16, ge=2)
    pretrained: Path | None = None


class RegionsConfig(_Strict):
    k: int = Field(3, ge=1)
    sweep: list[int] = [2, 3, 4, 5]
    seed: int = 0


class ExpertConfig(_Strict):
    encoder: Encoder = "resnet101"
    decoder: Decoder = "Unet"
    pretrained: Path | None = Field(None, description="Local encoder weights (torchvision or timm state dict).")
    decoder_channels: list[int] | None = Field(
        None, min_length=5, max_length=5, description="Unet / UnetPlusPlus decoder widths, deepest first (default "
                                                      "smp's 256, 128, 64, 32, 16).")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="Weight of BCE against (1 - soft Jaccard).")
    lr: float = 1e-4
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    epochs: int = Field(30, ge=1)
    steps_per_epoch: int = Field(100, ge=1)
    batch_size: int = Field(8, ge=1)
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    outputs: Literal["building", "instances"] = Field(
        "building", description="building: one channel; instances: building, boundary and contact channels, whose "
                                "watershed separates touching buildings (pipelines/instances.py).")
    boundary_m: float | None = Field(
        None, gt=0, description="Width of the boundary target in metres on the ground (never under 2 pixels); "
                                "None: 2 pixels at every resolution.")
    contact_m: float | None = Field(
        None, gt=0, description="Reach of the contact target (the gap between two buildings it marks is up to twice "
                                "this) in metres on the ground, never under 3 pixels; None: 3 pixels at every "
                                "resolution (0.4 m at 0.13 m, where the gaps of a dense town get no target).")
    init: Literal["generalist", "scratch"] = Field(
        "generalist", description="generalist: train one network on every location first and fine-tune each region's "
                                  "expert from it; scratch: the paper's experts, each trained from scratch.")
    generalist_steps: int | None = Field(None, ge=1, description="Steps of the generalist (default: k x epochs x steps_per_epoch).")
    min_expert_steps: int | None = Field(None, ge=1, description="Floor of an expert's steps (default: a quarter of the mean).")
    expert_steps_total: int | None = Field(None, ge=1, description="Steps shared by all experts in proportion to their "
                                           "regions (default: k x epochs x steps_per_epoch); fixing it compares k fairly.")
    finetune_lr_scale: float = Field(
        0.25, gt=0.0, le=1.0, description="Jobs that start from a trained network (the experts and the single network's "
                                          "continuation from the generalist, finetune) use lr x this: restarting at the "
                                          "full rate undoes what the start had learnt.")
    finetune_warmup: float = Field(
        0.1, ge=0.0, lt=1.0, description="Jobs that start from a trained network raise their rate linearly over this "
                                         "share of their steps: Adam's fresh moments make its first steps about lr per "
                                         "weight whatever the gradient, which shakes a trained network.")
    optimizer: Literal["adam", "adamw"] = Field(
        "adam", description="adam: the paper's Adam with weight decay as an L2 term (normalised by Adam, so weights "
                            "with small gradients shrink by about lr per step); adamw: decoupled weight decay.")
    allocation: Literal["windows", "locations"] = Field(
        "windows", description="How the experts share their steps and draw their patches. windows: in proportion to "
                               "each region's training windows, each window equally often. locations: as the "
                               "generalist and the single network draw them, each location equally often; a region "
                               "gets each location's share of its windows (a town whose 12 windows all fall in a "
                               "village's region of 400 is still a fifth of the draws of 5 locations, not 3 %).")
    replay: float = Field(
        0.0, ge=0.0, lt=1.0, description="An expert fine-tuned from the generalist draws this share of its patches "
                                         "from every location's training windows (as the generalist did): it "
                                         "specialises on its region without forgetting what the generalist knew.")
    ema_decay: float | None = Field(
        None, gt=0.0, lt=1.0, description="Keep an exponential moving average of the weights with this decay per step "
                                          "(e.g. 0.99; every expert-type job): validation, checkpoints and the "
                                          "exported model use the average, which is less at the mercy of the last "
                                          "few batches than the weights themselves. None: off (0.99 lowered the "
                                          "medium run's validation IoU by 0.8 points).")
    colour_jitter: float = Field(
        0.2, ge=0.0, le=0.5, description="Random colour changes of every training patch (every expert-type job): "
                                         "saturation, contrast and brightness within 1 +- this, a gain per band "
                                         "within 1 +- half of it: roofs as another sensor, season or sun shows them. "
                                         "0: off (the paper: flips only). 0.2 by default: with Banepa, then Barnarp "
                                         "left out of training it lifted every network on the unseen place (routed "
                                         "+4 and +28 validation IoU points) at a cost of 1.1 to 1.4 on the places "
                                         "trained on (bench/RESULTS.md, sessions 21 and 22).")
    turns: bool = Field(
        False, description="Random flips and quarter turns of every training patch (every expert-type job; the "
                           "paper's flips). Off by default: a network then keeps the view its imagery was taken in, "
                           "the sun's side of the roofs and a displacement of the labels from the roofs that holds "
                           "one way across the imagery (off-nadir satellite imagery labelled with footprints at the "
                           "ground), which a turned patch shows pointing another way. Decided on validation "
                           "(session 26, `medium`, every network trained alike): routed experts 0.460 -> 0.522 IoU, "
                           "single network 0.469 -> 0.509 (bench/RESULTS.md). On a place left out of training it costs "
                           "(session 27, Banepa never seen: single network 0.507 -> 0.364 validation IoU, routed "
                           "0.252 -> 0.232), which the generalist's own turns (`generalist_turns`, on by default) "
                           "win back for the routed experts.")
    generalist_turns: bool | None = Field(
        True, description="Flips and quarter turns for the generalist alone (with `init: generalist`); None: as "
                          "`turns`. The generalist is what serves a place unlike the training data (`predict --model "
                          "generalist`) and where every expert and the single network start from: trained with turns "
                          "it learns roofs in any view, and the networks fine-tuned from it without turns then learn "
                          "the view of their imagery. On by default since session 29, by a rule fixed beforehand "
                          "(validation only): routed experts on a place never seen, against no network turned, "
                          "Banepa 0.232 -> 0.347 and Barnarp 0.232 -> 0.329 (mean +10.6 IoU points); on the places "
                          "trained on 0.5216 -> 0.5206, single network 0.5094 -> 0.4981, generalist 0.4881 -> 0.4384 "
                          "(`medium`, bench/RESULTS.md). `false`: the generalist does not turn (the default before).")
    calibration: Literal["each", "shared"] = Field(
        "each", description="each: every expert gets its own threshold, watershed seeds and smallest footprint, "
                            "chosen on the validation windows routed to it (the shared choice where they hold under "
                            "100 true buildings); shared: one choice for all experts. Each: the medium bundle's "
                            "validation building F1 0.229 -> 0.250, test 0.218 -> 0.240, merged buildings 283 -> 213 "
                            "of 1390, test IoU -0.3 points (bench/RESULTS.md, session 24).")
    keep_start: bool = Field(
        True, description="A job that starts from a trained network also scores that start on its validation windows "
                          "and keeps it when no fine-tuned checkpoint beats it (choice on validation, never test).")

    @property
    def generalist_turned(self) -> bool:
        """Whether the generalist trains on flipped and turned patches (``generalist_turns``, None: as ``turns``)."""
        return self.turns if self.generalist_turns is None else self.generalist_turns

    @model_validator(mode="after")
    def _pair_exists(self) -> "ExpertConfig":
        if (self.decoder, self.encoder) in UNSUPPORTED:
            raise ValueError(f"decoder {self.decoder} cannot be built on encoder {self.encoder}; choose Unet, FPN or DeepLabV3Plus")
        if self.decoder_channels is not None and self.decoder not in ("Unet", "UnetPlusPlus"):
            raise ValueError(f"decoder_channels sets a Unet or UnetPlusPlus decoder's widths; {self.decoder} has its own")
        return self


class TrainerConfig(_Strict):
    """PyTorch Lightning's Trainer settings, the same for every training job (embedding, experts, baseline)."""

    accelerator: Literal["auto", "cpu", "gpu", "cuda"] = "auto"
    devices: int = Field(1, ge=1, description="Processes per machine; more than one runs DDP.")
    num_nodes: int = Field(1, ge=1, description="Machines; under SLURM or torchrun Lightning reads the rank from the environment.")
    strategy: Literal["auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true"] = "auto"
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed", "64-true"] = Field(
        "auto", description="auto: bf16-mixed on CUDA and on processors with native bf16 (AVX512-BF16, AMX), "
                            "32-true on other CPUs (where bf16 is emulated and slower); "
                            "64-true for reproducibility checks.")
    sync_batchnorm: bool = True
    gradient_clip_val: float | None = Field(None, gt=0)
    logger: Literal["csv", "tensorboard", "mlflow"] = "csv"
    log_every_n_steps: int = Field(10, ge=1)


class RouterConfig(_Strict):
    unfamiliar_quantile: float = Field(0.99, gt=0.0, le=1.0, description="A tile farther from its region's centroid "
                                       "than this quantile of the region's training tiles is flagged unfamiliar.")
    # a region keeps its expert unless the single network clearly beat it on the region's validation windows
    # (pipelines/serving.py): a region of a few strays from other places is better served by the network that
    # trained on every place than by an expert fine-tuned on someone else's majority
    single_fallback: bool = Field(True, description="Serve a region with the single network where it scored a higher "
                                  "IoU than the region's expert on the region's validation windows, in at least "
                                  "single_fallback_confidence of bootstrap resamples of them.")
    single_fallback_confidence: float = Field(
        0.95, gt=0.5, le=1.0, description="Share of bootstrap resamples of a region's validation windows in which the "
                                          "single network must lead (a one-sided test at 5 %, by convention).")
    soft_top_k: int = Field(2, ge=1)
    soft_temperature: float = Field(0.05, gt=0)


# prediction settings that change its speed or memory, never its outputs
SPEED_ONLY = frozenset({"batch_size", "gdal_cache_mb", "readers", "read_ahead", "footprint_workers", "write_behind"})


class PredictConfig(_Strict):
    tile_size: int = Field(512, ge=32)
    unfamiliar: Literal["route", "baseline", "skip"] = Field(
        "route", description="What runs on unfamiliar tiles: route (the nearest region's expert, flagged), baseline "
                             "(the single network), skip (no prediction: nodata).")
    # smoothed by default: chosen on validation (session 14's medium bundle, validation windows: IoU 0.493 smoothed
    # against 0.486 tile by tile, building F1 0.269 against 0.263), and a town keeps one expert instead of flipping
    routing: Literal["tile", "smoothed", "scene"] = Field(
        "smoothed", description="tile: each tile to its nearest region's expert; smoothed: the majority over each tile "
                                "and its 8 neighbours (settled in the same pass once the row below is routed); scene: "
                                "one expert per scene (a first routing pass over it).")
    overlap: int = Field(128, ge=0)
    batch_size: int = Field(8, ge=1)
    tta: bool = False
    min_area_m2: float = Field(4.0, ge=0)
    regularize: bool = True
    # squaring chosen on the validation windows of session 24's medium bundle (bench/footprints.py, guard 0.9):
    # building F1 0.2466 at 0.25 / 0.5 m with or without diagonals against 0.2417 at the library's 0.5 / 1 m, and
    # with diagonals the higher IoU (0.4447) and twice the share of outlines squared within the guard (70 % vs 38 %):
    # a roof turned against the raster's axes, squared without 45-degree edges, strays from its mask
    allow_diagonals: bool = Field(True, description="Let squared outlines have edges at 45 degrees to a "
                                  "footprint's main direction.")
    regularize_tolerance_m: float = Field(0.25, gt=0, description="buildingregulariser's simplification tolerance "
                                          "on the ground (m; at least one pixel): larger squares noisier outlines.")
    regularize_parallel_m: float = Field(0.5, gt=0, description="Distance under which nearly parallel edges of an "
                                         "outline are joined (m; at least two pixels).")
    # 0.9: chosen on session 14's medium bundle's validation windows (bench/footprints.py): the footprints' building
    # F1 0.250 squaring every outline, 0.268 with 0.9 (a third of the outlines squared), 0.271 unsquared; session
    # 25, at the squaring above: 0.2430 / 0.2466 / 0.2480 with 0.85 / 0.9 / 0.95 (90 / 70 / 21 % squared), 0.2504
    # unsquared: 0.95 would square a fifth of the outlines for 0.0014, so 0.9 stays
    regularize_min_iou: float = Field(0.9, ge=0, le=1, description="A squared outline is kept where its IoU with "
                                      "the mask's outline is at least this; elsewhere the outline is simplified "
                                      "instead (0: square every footprint).")
    gdal_cache_mb: int = Field(32, ge=8, description="Least GDAL block cache during prediction (MB); raised to what the input's blocks need (a striped raster: a tile row of strips).")
    geoparquet: bool = Field(True, description="Also write the footprints as GeoParquet (NAME_footprints.parquet).")
    readers: int | None = Field(None, ge=0, description="Threads reading tiles ahead of the model (0: read in the "
                                "model's thread; default: 1 beside a CPU model, enough to feed a GPU).")
    read_ahead: int | None = Field(None, ge=1, description="Tile rows read ahead of the model (memory: that many rows "
                                   "of tiles); default one per reader thread, so each reader has a row to read.")
    footprint_workers: int | None = Field(None, ge=0, description="Processes for the footprint stage: each band's "
                                          "watershed and polygons, and regularisation (0: on the writer thread; "
                                          "default: none up to 4 cores, then a quarter of them, at most 8).")
    write_behind: bool = Field(True, description="Write rasters and polygonise footprints on a worker thread, off the "
                                                 "model's critical path (False: in line, the reference path).")

    def output_settings(self) -> dict:
        """The settings that change what prediction writes (not those that only change its speed or memory):
        resume redoes a scene made with others."""
        return self.model_dump(mode="json", exclude=SPEED_ONLY)

    @model_validator(mode="after")
    def _overlap_fits(self) -> "PredictConfig":
        if self.overlap * 2 >= self.tile_size:
            raise ValueError(f"overlap ({self.overlap}) must be less than half the tile size ({self.tile_size})")
        return self


class Config(_Strict):
    seed: int = 0
    device: str = "auto"
    data: DataConfig = DataConfig()
    embedding: EmbeddingConfig = EmbeddingConfig()
    regions: RegionsConfig = RegionsConfig()
    experts: ExpertConfig = ExpertConfig()
    router: RouterConfig = RouterConfig()
    predict: PredictConfig = PredictConfig()
    trainer: TrainerConfig = TrainerConfig()


def load_config(path: str | Path | None) -> Config:
    """Read a YAML file (or a packaged name such as ``small``) into a validated :class:`Config`."""
    if path is None:
        return Config()
    p = Path(path)
    if not p.exists():
        packaged = Path(__file__).parent / "configs" / f"{path}.yaml"
        if packaged.exists():
            p = packaged
        else:
            raise FileNotFoundError(f"config {path}: no such file, and no packaged config of that name")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"config {p}: not valid YAML: {e}") from e
    try:
        return Config.model_validate(raw)
    except Exception as e:  # pydantic's message already names the field
        raise ValueError(f"config {p}: {e}") from e


def dump_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
