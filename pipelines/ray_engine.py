"""``geomoe predict --engine ray``: many scenes over a Ray cluster.

Each worker is a Ray actor that loads the bundle once and predicts whole scenes with the local engine's own
``predict_scene``, so outputs are the local engine's. The driver skips complete scenes (resume), hands the rest out
as workers free up, records a scene whose worker fails or dies (out of memory) with its reason while the others
finish, and writes the same run summary. Inputs, bundle and output folder must be paths every node can reach (a
shared filesystem). Ray is optional: the local engine never imports it.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from geomoe.pipelines.inference import ModelSpec
from geomoe.pipelines.outputs import InputResult, Provenance, RunRequest, write_run_summary
from geomoe.pipelines.predict import predict_scene, scenes_to_do

log = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """The Ray engine cannot run (Ray missing, cluster unreachable); the message is one line for the user."""


@dataclass
class RayOptions:
    address: str | None = None  # None: RAY_ADDRESS, else a local cluster started for this run
    workers: int | None = None  # None: one per cpus_per_worker CPUs of the cluster (per GPU with gpus_per_worker)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    num_cpus: int | None = None  # CPUs of a local cluster started for this run (None: all)
    strip_rows: int | None = None  # split scenes of more tile rows than this into strips over several workers


def _reachable(address: str, timeout: float = 5.0) -> bool:
    """Whether host:port answers, so an address that does not fails in seconds with one line, not after Ray's
    long retries."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return True  # 'auto', 'local', ray:// client URLs: Ray itself says what is wrong
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def connect(opts: RayOptions) -> None:
    """Join the cluster at ``opts.address`` (or RAY_ADDRESS), or start a local one."""
    try:
        import ray
    except ImportError as e:
        raise EngineError("--engine ray needs Ray: pip install 'geomoe[ray]' (the local engine needs nothing)") from e
    if ray.is_initialized():
        return
    address = opts.address or os.environ.get("RAY_ADDRESS") or None
    if address and not _reachable(address):
        raise EngineError(f"cannot reach the Ray cluster at {address} (is 'ray start --head' running there, and the "
                          f"port open?)")
    try:
        ray.init(address=address, num_cpus=None if address else opts.num_cpus, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    except Exception as e:  # noqa: BLE001 - ConnectionError, RuntimeError, ...: one line either way
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EngineError(f"cannot connect to the Ray cluster at {address or 'a new local cluster'}: {first}") from e


def _worker_class():
    import ray

    @ray.remote(max_restarts=0)
    class SceneWorker:
        """Holds one loaded bundle; predicts whole scenes, plans and predicts strips of large ones, merges strips."""

        def __init__(self, spec: ModelSpec, threads: int):
            import torch

            torch.set_num_threads(max(1, threads))
            self.model = spec.load()

        def predict(self, src: str, name: str, out: str, req: RunRequest) -> InputResult:
            return predict_scene(self.model, Path(src), name, Path(out), req, progress=False)

        def plan(self, src: str, name: str, out: str, req: RunRequest, rows: int):
            from geomoe.pipelines.strips import plan_strips

            return plan_strips(self.model, Path(src), name, Path(out), req, rows)

        def strip(self, strip, req: RunRequest):
            from geomoe.pipelines.strips import predict_strip

            return predict_strip(self.model, strip, req)

        def merge(self, results, out: str, req: RunRequest, made_by: Provenance, started: float) -> InputResult:
            from geomoe.pipelines.strips import merge_strips

            return merge_strips(results, Path(out), req, made_by, started)

    return SceneWorker


def _worker_count(opts: RayOptions, scenes: int) -> int:
    import ray

    if opts.workers:
        return max(1, min(opts.workers, scenes))
    res = ray.cluster_resources()
    n = int(res.get("CPU", 1) // max(opts.cpus_per_worker, 1e-9))
    if opts.gpus_per_worker > 0:
        n = min(n, int(res.get("GPU", 0) // opts.gpus_per_worker))
    return max(1, min(n, scenes))


def predict_many_ray(spec: ModelSpec, model_id: str, inputs: list[Path], out: Path, req: RunRequest,
                     opts: RayOptions, resume: bool = False, progress: bool = True) -> list[InputResult]:
    """Predict each input on the Ray cluster; the same outputs, resume and run summary as ``predict_many``."""
    connect(opts)
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    t0 = time.perf_counter()
    out = out.resolve()
    # what the workers' summaries will record: their models are loaded from ``spec``, so they have its options
    made_by = Provenance(model_id, req.settings(spec.options))
    todo, results, order = scenes_to_do(inputs, out, resume, made_by)
    if todo:
        worker = _worker_class().options(num_cpus=opts.cpus_per_worker, num_gpus=opts.gpus_per_worker)
        threads = max(1, int(opts.cpus_per_worker))

        def start():
            return worker.remote(spec, threads)

        # strips let one scene use many workers; whole scenes use at most one each
        idle = [start() for _ in range(_worker_count(opts, 10**6 if opts.strip_rows else len(todo)))]
        # work items, first in first out: ("scene" | "plan", src, name), ("strip", src, Strip), ("merge", src, results)
        queue: deque = deque(("plan" if opts.strip_rows else "scene", src, name) for src, name in todo)
        running: dict = {}
        strips: dict[Path, dict] = {}  # per scene in strips: its start, how many strips, the results so far
        failed: set[Path] = set()
        bar = tqdm(total=len(todo), desc="scenes (ray)", unit="scene", disable=not progress)

        def submit(item, actor):
            kind, src = item[0], item[1]
            if kind == "scene":
                return actor.predict.remote(str(src.resolve()), item[2], str(out), req)
            if kind == "plan":
                return actor.plan.remote(str(src.resolve()), item[2], str(out), req, opts.strip_rows)
            if kind == "strip":
                return actor.strip.remote(item[2], req)
            return actor.merge.remote(item[2], str(out), req, made_by, strips[src]["started"])

        def finish(res: InputResult) -> None:
            if not res.ok:
                log.error("%s", res.message)
                failed.add(res.path)
            results.append(res)
            bar.update(1)

        try:
            while queue or running:
                while queue and idle:
                    item = queue.popleft()
                    if item[1] in failed:  # a strip of a scene that already failed
                        continue
                    actor = idle.pop()
                    running[submit(item, actor)] = (actor, item)
                if not running:
                    continue
                done, _ = ray.wait(list(running), num_returns=1)
                for ref in done:
                    actor, item = running.pop(ref)
                    kind, src = item[0], item[1]
                    try:
                        value = ray.get(ref)
                        idle.append(actor)
                    except RayActorError as e:  # the worker died (killed, out of memory): this scene failed
                        reason = str(e).strip().splitlines()[0] if str(e).strip() else "no reason given"
                        value = InputResult(src, False, f"{src}: its Ray worker died ({type(e).__name__}: {reason})")
                        idle.append(start())
                    except RayTaskError as e:
                        value = InputResult(src, False, f"{src}: {str(e).strip().splitlines()[-1]}")
                        idle.append(actor)
                    if src in failed:
                        continue
                    if isinstance(value, InputResult):  # a whole scene, a merge, or a failure of any step
                        value.path = src
                        finish(value)
                    elif kind == "plan":
                        if not value.strips:
                            queue.append(("scene", src, item[2]))
                        else:
                            strips[src] = {"started": time.time(), "count": len(value.strips), "done": []}
                            queue.extend(("strip", src, st) for st in value.strips)
                    else:  # a strip's result
                        entry = strips[src]
                        entry["done"].append(value)
                        if len(entry["done"]) == entry["count"]:
                            queue.appendleft(("merge", src, entry.pop("done")))
        finally:
            bar.close()
            for actor, _ in running.values():  # interrupted: stop the work in flight (its outputs stay partial)
                ray.kill(actor)
        if not running:  # every scene ended: the parts of scenes whose strips failed go too
            import shutil

            shutil.rmtree(out / ".strips", ignore_errors=True)
    results.sort(key=lambda r: order.get(r.path, 0))
    write_run_summary(out, results, time.perf_counter() - t0)
    return results

