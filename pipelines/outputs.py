"""What a prediction run leaves behind: each scene's output names, whether they are complete (resume), and the
summaries of a scene and of a run over many scenes. The one place that knows prediction's file names."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from geomoe.atomic import atomic_path
from geomoe.config import PredictConfig
from geomoe.data.catalog import IMAGE_SUFFIXES


@dataclass
class Outputs:
    prob: Path
    mask: Path
    routing: Path
    footprints: Path
    geojson: Path | None
    summary: Path
    parquet: Path | None = None  # the footprints again, as GeoParquet

    def all(self) -> list[Path]:
        return [p for p in (self.prob, self.mask, self.routing, self.footprints, self.geojson, self.parquet,
                            self.summary) if p]


def outputs_for(src: Path, out: Path, geojson: bool = True, name: str | None = None,
                parquet: bool = False) -> Outputs:
    """Output paths of ``src``; ``name`` (default: the file's stem) keeps inputs of the same name apart."""
    s = name or src.stem
    return Outputs(out / f"{s}_prob.tif", out / f"{s}_mask.tif", out / f"{s}_routing.gpkg",
                   out / f"{s}_footprints.gpkg", out / f"{s}_footprints.geojson" if geojson else None,
                   out / f"{s}_summary.json", out / f"{s}_footprints.parquet" if parquet else None)


def expand_inputs(inputs: list[Path]) -> list[Path]:
    """Files as given; folders become their rasters; a .txt lists one path per line (relative to it)."""
    out: list[Path] = []
    for p in inputs:
        if p.is_dir():  # hidden files (macOS ._AppleDouble, .DS_Store) are not imagery
            out += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES and not q.name.startswith("."))
        elif p.suffix.lower() == ".txt" and p.exists():
            for line in p.read_text().splitlines():
                if line.strip() and not line.startswith("#"):
                    q = Path(line.strip())
                    out.append(q if q.is_absolute() else p.parent / q)
        else:
            out.append(p)
    return out


@dataclass
class RunStats:
    tiles: int = 0
    skipped_tiles: int = 0
    unfamiliar: int = 0
    seconds: float = 0.0
    footprints: int = 0
    per_expert: dict[int, int] = field(default_factory=dict)


def output_names(inputs: list[Path]) -> dict[Path, str]:
    """A distinct output name per input: the file's stem, or where stems collide its path below the inputs'
    common folder (``a/scene.tif`` and ``b/scene.tif`` give ``a_scene`` and ``b_scene``), plus a short hash if needed."""
    stems: dict[str, int] = {}
    for p in inputs:
        stems[p.stem] = stems.get(p.stem, 0) + 1
    res = [p.resolve() for p in inputs]
    common = Path(os.path.commonpath([str(r.parent) for r in res])) if res else Path(".")
    names = {}
    for p, r in zip(inputs, res):
        names[p] = p.stem if stems[p.stem] == 1 else "_".join(r.relative_to(common).with_suffix("").parts)
    seen: dict[str, int] = {}
    for n in names.values():
        seen[n] = seen.get(n, 0) + 1
    for p, r in zip(inputs, res):
        if seen[names[p]] > 1:  # the same file given twice, or names that still collide
            names[p] += "_" + hashlib.sha1(str(r).encode()).hexdigest()[:8]
    return names


def input_identity(src: Path) -> dict:
    """What makes a finished output belong to this input: its absolute path, size and modification time."""
    st = src.stat()
    return {"path": str(src.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


@dataclass(frozen=True)
class Provenance:
    """What, beside the input file, made a scene's outputs: the bundle (its path and manifest hash) and the settings
    that change them (:meth:`RunRequest.settings`)."""

    bundle: str | None
    settings: dict


@dataclass(frozen=True)
class RunRequest:
    """What a prediction run asks of each of its scenes, whichever engine runs them: the prediction settings, the
    mask threshold and the ground resolution given for rasters without a CRS (``--gsd``)."""

    cfg: PredictConfig
    threshold: float
    gsd: float | None = None

    def settings(self, options: dict) -> dict:
        """The settings its scene summaries record: those of ``cfg`` that change outputs, the threshold, ``--gsd``
        and the model's ``options`` (soft routing, bands, bit depth), in JSON's own types."""
        return json.loads(json.dumps({**self.cfg.output_settings(), "threshold": self.threshold, "gsd": self.gsd,
                                      **options}))

    def provenance(self, model) -> Provenance:
        """The provenance of what ``model`` predicts for this request (a model without identity: none)."""
        return Provenance(getattr(model, "identity", None), self.settings(getattr(model, "options", {})))


def is_complete(src: Path, out: Path, name: str | None = None,
                made_by: Provenance | None = None) -> bool:
    """True when every output of ``src`` exists and was made from this very file (path, size, modification
    time) and, given ``made_by``, by the same bundle with the same settings; outputs of another input, bundle or
    setting (``--tta``, ``--min-area``, a threshold...) under the same names are redone."""
    s = outputs_for(src, out, name=name)
    if not s.summary.exists():
        return False
    try:
        summary = json.loads(s.summary.read_text())
    except json.JSONDecodeError:
        return False
    if src.exists() and summary.get("input_identity") != input_identity(src):
        return False
    if made_by is not None and (summary.get("bundle") != made_by.bundle
                                or summary.get("settings") != made_by.settings):
        return False
    return all(Path(p).exists() for p in summary.get("outputs", []))


@dataclass
class InputResult:
    path: Path
    ok: bool
    message: str
    seconds: float = 0.0
    stats: RunStats | None = None  # None: skipped as complete, or failed


def write_run_summary(out: Path, results: list[InputResult], seconds: float) -> Path:
    """One summary of a run over many scenes: scenes done, skipped and failed (with reasons), tiles, footprints,
    tiles per expert, time; written as OUT/run_summary.json."""
    done = [r for r in results if r.stats is not None]
    per_expert: dict[str, int] = {}
    for r in done:
        for e, n in r.stats.per_expert.items():
            per_expert[str(e)] = per_expert.get(str(e), 0) + n
    tiles = sum(r.stats.tiles for r in done)
    summary = {"scenes": len(results), "predicted": len(done), "skipped_complete": sum(r.ok and r.stats is None for r in results),
               "failed": [{"input": str(r.path), "reason": r.message} for r in results if not r.ok],
               "tiles": tiles, "unfamiliar_tiles": sum(r.stats.unfamiliar for r in done),
               "footprints": sum(r.stats.footprints for r in done), "tiles_per_expert": dict(sorted(per_expert.items())),
               "seconds": round(seconds, 2), "tiles_per_second": round(tiles / seconds, 2) if seconds > 0 else None}
    out.mkdir(parents=True, exist_ok=True)
    path = out / "run_summary.json"
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    return path


def write_scene_summary(outs: Outputs, src: Path, made_by: Provenance, stats: RunStats, grid_tiles: int,
                        details: dict) -> None:
    """NAME_summary.json: what made the outputs (input identity, bundle, settings), what was done and the outputs it
    lists; written last, so its presence (with every output it lists) marks the scene complete."""
    record = {"input": str(src), "input_identity": input_identity(src), "bundle": made_by.bundle,
              "settings": made_by.settings,
              "tiles": stats.tiles, "empty_tiles": stats.skipped_tiles, "seconds": round(stats.seconds, 2),
              "tiles_per_second": round(grid_tiles / stats.seconds, 2) if stats.seconds > 0 else None,
              "footprints": stats.footprints, "tiles_per_expert": stats.per_expert, **details,
              "unfamiliar_tiles": stats.unfamiliar,
              "outputs": [str(p) for p in outs.all() if p != outs.summary]}
    with atomic_path(outs.summary) as tmp:
        tmp.write_text(json.dumps(record, indent=2))
