"""``geomoe train``: embedding, regions, one expert per region and the baseline, into one bundle.

The work is a list of stages: ``embedding``, ``regions``, ``expert:0`` ... ``expert:k-1``, ``baseline``,
``assemble``. Each leaves its output in the bundle directory and is skipped when that output exists, so a rerun
never retrains a finished part and a killed run resumes from its last checkpoint. ``only`` runs some of them:
the experts of one bundle can be trained as independent jobs on several machines sharing the bundle directory,
then ``assemble`` checks that every part is there and writes the manifest.

Under DDP every process runs this code; only rank 0 writes, and the others wait at a barrier before reading.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from geomoe.backbone import pick_device
from geomoe.bundle import BundlePaths, load_bundle, write_manifest
from geomoe.config import Config
from geomoe.data.datasets import Prepared, prepare
from geomoe.data.sampling import PatchRef
from geomoe.embedding.extract import Embeddings, extract
from geomoe.embedding.model import load_embedding
from geomoe.embedding.plot import plot_cluster_samples, plot_space
from geomoe.embedding.regions import assign
from geomoe.embedding.report import fit_regions
from geomoe.embedding.train import train_embedding
from geomoe.experts.train import ExpertJob, train_expert
from geomoe.router.familiarity import Familiarity
from geomoe.router.routing import Router, majority_regions
from geomoe.trainer import barrier, is_rank_zero

log = logging.getLogger(__name__)


def stage_names(k: int, baseline: bool = True, generalist: bool = True) -> list[str]:
    return ["embedding", "regions", *(["generalist"] if generalist else []), *(f"expert:{i}" for i in range(k)),
            *(["baseline"] if baseline else []), "assemble"]


def parse_only(only: list[str] | None, k: int, baseline: bool, generalist: bool = True) -> list[str]:
    """The stages to run, in order; every name is checked against what this bundle has."""
    names = stage_names(k, baseline, generalist)
    if not only:
        return names
    asked = [s.strip() for item in only for s in item.split(",") if s.strip()]
    bad = [s for s in asked if s not in names and s != "experts"]
    if bad:
        raise ValueError(f"--only {', '.join(bad)}: unknown stage; this bundle has {', '.join(names)} (and 'experts')")
    wanted = set(asked) | ({f"expert:{i}" for i in range(k)} if "experts" in asked else set())
    return [n for n in names if n in wanted]


def refs_of(prep: Prepared, emb: Embeddings, keep: np.ndarray) -> list[PatchRef]:
    """The windows behind the selected embedding rows."""
    # by absolute path: the same data may be given as ../shared/data once and /abs/shared/data another time
    index = {str(Path(r.scene.image).resolve()): i for i, r in enumerate(prep.readers)}
    return [PatchRef(index[str(Path(s).resolve())], int(w[0]), int(w[1]), int(w[2]))
            for s, w in zip(emb.scene[keep], emb.window[keep])]


def embed_stage(prep: Prepared, cfg: Config, paths: BundlePaths, progress: bool = True) -> Embeddings:
    """Train (or reuse) the embedding network and embed every grid window of both splits."""
    train_embedding(prep, cfg, paths.embedding.parent, progress=progress)
    if not paths.embeddings.exists() and is_rank_zero():
        model, _ = load_embedding(paths.embedding, pick_device(cfg.device))
        extract(model, prep, min_valid=cfg.data.min_valid, progress=progress).save(paths.embeddings)
    barrier()
    return Embeddings.load(paths.embeddings)


def familiarity_of(emb: Embeddings, router: Router, cfg: Config) -> Familiarity:
    """Each region's distance threshold from its training tiles (beyond it a tile is flagged unfamiliar)."""
    train = emb.split == "train"
    ids, dist = router.route(emb.vectors[train])
    return Familiarity.fit(ids, dist, router.k, cfg.router.unfamiliar_quantile)


def regions_stage(emb: Embeddings, cfg: Config, paths: BundlePaths, figures: bool) -> np.ndarray:
    """Fit (once) the k-means centroids and the router; a rerun keeps them, so finished experts keep their regions."""
    if not paths.centroids.exists() and is_rank_zero():
        fit = fit_regions(emb, cfg.regions.k, cfg.regions.sweep, paths.centroids.parent, cfg.regions.seed)
        log.info("regions (k = %d): purity %.3f, held-out patches in their location's majority region %.3f",
                 cfg.regions.k, fit.chosen.purity, fit.chosen.held_out_majority)
        familiarity_of(emb, Router(fit.centroids), cfg).save(paths.familiarity)
        if figures:
            plot_space(emb, fit.centroids, paths.root / "figures" / "embedding_space.png", seed=cfg.seed)
            plot_cluster_samples(emb, fit.centroids, paths.root / "figures" / "region_samples.png",
                                 data=cfg.data)
    if not paths.familiarity.exists() and is_rank_zero():  # bundles from before the unfamiliar flag
        familiarity_of(emb, Router(np.load(paths.centroids)), cfg).save(paths.familiarity)
    barrier()
    centroids = np.load(paths.centroids)
    if len(centroids) != cfg.regions.k:
        raise ValueError(f"{paths.centroids}: holds {len(centroids)} regions but the config asks for k = "
                         f"{cfg.regions.k}; train into a new bundle directory to change k")
    return centroids


def location_weights(prep: Prepared, refs: list[list[PatchRef]]) -> list[list[float]]:
    """Per region, each training window's share of the draws when every location is drawn equally often (as the
    generalist and the single network draw them): 1 / (locations x the location's windows in all regions)."""
    per_loc: dict[str, int] = {}
    for region in refs:
        for r in region:
            per_loc[prep.location_of(r)] = per_loc.get(prep.location_of(r), 0) + 1
    return [[1.0 / (len(per_loc) * per_loc[prep.location_of(r)]) for r in region] for region in refs]


def expert_steps(counts: list[float], total: int, floor: int, unit: int = 1) -> list[int]:
    """Split ``total`` steps over experts in proportion to ``counts`` (their training windows, or their share of
    the draws), none below ``floor``.

    Each share is a whole number of ``unit``-step epochs, so the steps trained are exactly the steps counted.
    """
    n = sum(counts)
    return [unit * max(-(-floor // unit), round(total * c / n / unit)) for c in counts]


def expert_jobs(prep: Prepared, emb: Embeddings, centroids: np.ndarray, cfg: Config, paths: BundlePaths) -> dict[str, ExpertJob]:
    """The generalist, one job per region (its train and validation windows), and the single network.

    Budget: with ``init: generalist``, the generalist trains on everything, each expert is fine-tuned from it
    for steps in proportion to its region's share of the training windows, and the reported single network
    is the generalist trained on for as many steps as all experts together, so single and routed experts cost
    the same. With ``init: scratch`` (the paper) there is no generalist and the single network trains from
    scratch for the experts' total.
    """
    x = cfg.experts
    regions = assign(emb.vectors, centroids)
    train, val = emb.split == "train", emb.split == "val"
    k = len(centroids)
    per = x.epochs * x.steps_per_epoch
    refs = [refs_of(prep, emb, train & (regions == i)) for i in range(k)]
    for i, tr in enumerate(refs):
        if not tr:
            raise ValueError(f"region {i} holds no training patch; lower regions.k (now {cfg.regions.k})")
    unit = x.steps_per_epoch
    weights = location_weights(prep, refs) if x.allocation == "locations" else [None] * k
    shares = [sum(w) for w in weights] if x.allocation == "locations" else [len(r) for r in refs]
    steps = expert_steps(shares, x.expert_steps_total or per * k, x.min_expert_steps or max(1, per // 4), unit)
    gen = paths.expert("generalist") if x.init == "generalist" else None
    jobs = {}
    if gen is not None:
        jobs["generalist"] = ExpertJob("generalist", None, prep.windows("val"),
                                       unit * -(-(x.generalist_steps or per * k) // unit), turns=x.generalist_turns)
    for i in range(k):
        jobs[f"expert:{i}"] = ExpertJob(f"region_{i}", refs[i], refs_of(prep, emb, val & (regions == i)), steps[i], gen,
                                        weights[i])
    jobs["baseline"] = ExpertJob("baseline", None, prep.windows("val"), sum(steps), gen)
    return jobs


def assemble(prep: Prepared, emb: Embeddings, centroids: np.ndarray, cfg: Config, paths: BundlePaths,
             root: Path, baseline: bool, steps: dict[str, int] | None = None) -> Path:
    """Check every part is present and write the manifest (last: a bundle without one is incomplete)."""
    experts = [paths.expert(f"region_{i}") for i in range(len(centroids))]
    generalist = paths.expert("generalist") if cfg.experts.init == "generalist" else None
    missing = (["generalist"] if generalist is not None and not generalist.exists() else [])
    missing += [f"expert:{i}" for i, p in enumerate(experts) if not p.exists()]
    if baseline and not paths.expert("baseline").exists():
        missing.append("baseline")
    if missing:
        raise ValueError(f"{paths.root}: cannot assemble, stages not finished: {', '.join(missing)} "
                         f"(run them with --only, e.g. --only {missing[0]})")
    regions = assign(emb.vectors, centroids)
    train = emb.split == "train"
    native = {loc: float(np.median([r.gsd for r in prep.readers if r.scene.location == loc and r.gsd]))
              for loc in prep.locations if any(r.gsd for r in prep.readers if r.scene.location == loc)}
    scores = {}
    rj = paths.centroids.parent / "regions.json"
    if rj.exists():
        scores = json.loads(rj.read_text()).get("scores", {})
    return write_manifest(paths.root, cfg, k=len(centroids), locations=prep.locations,
                          region_of_location=majority_regions(emb.location[train], regions[train]),
                          experts=[paths.rel(p) for p in experts],
                          baseline=paths.rel(paths.expert("baseline")) if baseline else None,
                          gsd=cfg.data.target_gsd, native_gsd=native,
                          extra={"training_root": str(Path(root).resolve()), "regions": scores,
                                 "generalist": paths.rel(generalist) if generalist is not None else None,
                                 "expert_init": cfg.experts.init, "steps": steps or {},
                                 "data": prep.report.as_dict()})


def train_all(root: Path, cfg: Config, out: Path, progress: bool = True, baseline: bool = True,
              figures: bool = True, only: list[str] | None = None) -> Path:
    """Run the stages of ``geomoe train`` (all, or ``only`` those named) on ``root`` into the bundle ``out``."""
    stages = parse_only(only, cfg.regions.k, baseline, cfg.experts.init == "generalist")
    paths = BundlePaths(Path(out))
    paths.root.mkdir(parents=True, exist_ok=True)
    prep = prepare(root, cfg.data, cfg.seed)
    log.info("data: %d scenes at %s, %d train / %d val / %d test windows", len(prep.readers), ", ".join(prep.locations),
             len(prep.windows("train")), len(prep.windows("val")), len(prep.windows("test")))
    for line in prep.report.lines():
        log.info("  %s", line)
    needs_embeddings = any(s != "embedding" for s in stages)
    if "embedding" in stages or (needs_embeddings and not paths.embeddings.exists() and "regions" in stages):
        emb = embed_stage(prep, cfg, paths, progress)
    elif needs_embeddings:
        if not paths.embeddings.exists():
            raise ValueError(f"{paths.root}: the embedding stage has not run; run it first (--only embedding)")
        emb = Embeddings.load(paths.embeddings)
    if not needs_embeddings:
        return paths.root
    if "regions" in stages:
        centroids = regions_stage(emb, cfg, paths, figures)
    elif paths.centroids.exists():
        centroids = np.load(paths.centroids)
    else:
        raise ValueError(f"{paths.root}: the regions stage has not run; run it first (--only regions)")
    jobs = expert_jobs(prep, emb, centroids, cfg, paths)
    for name in stages:
        if name in jobs:
            job = jobs[name]
            if job.init_from is not None and not job.init_from.exists():
                raise ValueError(f"{paths.root}: {name} starts from the generalist, which is not trained yet "
                                 f"(run --only generalist first)")
            log.info("%s (%s): %d train / %d val windows, %d steps%s", name, job.name,
                     len(job.train_refs) if job.train_refs is not None else len(prep.windows("train")),
                     len(job.val_refs), job.steps,
                     "" if job.val_refs else " (no validation windows: nothing to choose a checkpoint on, so its "
                                             "last weights are kept)")
            train_expert(prep, cfg, job, paths.root / "experts", progress)
    if "assemble" in stages and is_rank_zero():
        assemble(prep, emb, centroids, cfg, paths, root, baseline, {n: j.steps for n, j in jobs.items()})
        # threshold, smallest footprint (and, with instance outputs, the watershed's seeds), chosen on validation
        from geomoe.pipelines.calibrate import calibrate
        from geomoe.pipelines.serving import choose_serving

        calibrate(load_bundle(paths.root, pick_device(cfg.device)), prep, progress=progress)
        # then, with each network cut as calibrated: the expert or the single network for each region, on validation
        choose_serving(load_bundle(paths.root, pick_device(cfg.device)), prep, progress=progress)
    barrier()
    return paths.root

