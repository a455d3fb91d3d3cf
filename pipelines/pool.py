"""Worker processes: one pool per process, shared by the footprint stage (band outlining, regularisation) and the
scoring of validation and test windows (calibration, evaluation).

Started once (spawned, never forked: the predicting process has reader, writer and torch threads) and reused by
every scene; stopped at exit so no worker outlives the command. A pool whose worker died (killed, out of memory)
is replaced when the next job is submitted (:func:`submit`).
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from geomoe.config import PredictConfig

log = logging.getLogger(__name__)
_POOLS: dict[int, ProcessPoolExecutor] = {}
T = TypeVar("T")
R = TypeVar("R")


def auto_workers() -> int:
    """Worker processes by default: none on small machines, where the model needs every core."""
    cores = os.cpu_count() or 1
    return 0 if cores <= 4 else min(8, cores // 4)


def scoring_workers(cfg: PredictConfig, batches: int) -> int:
    """Processes that score validation or test windows beside the model (calibration, evaluation): the predict
    configuration's ``footprint_workers`` where set; else one a core (at most 8) once there are enough batches to pay
    for starting them (a spawned worker takes seconds)."""
    if cfg.footprint_workers is not None:
        return cfg.footprint_workers
    cores = os.cpu_count() or 1
    return min(8, cores) if cores > 1 and batches >= 8 else 0


def _ignore_sigint() -> None:
    """Workers leave Ctrl-C to the predicting process, which stops at a safe point (geomoe/interrupt.py)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _pool(workers: int) -> ProcessPoolExecutor:
    if workers not in _POOLS:
        _POOLS[workers] = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                              initializer=_ignore_sigint)
    return _POOLS[workers]


def submit(workers: int, fn, *args) -> Future:
    """``fn(*args)`` on this process's pool of ``workers`` processes (started on first use; a pool broken by a
    dead worker is replaced by a fresh one)."""
    try:
        return _pool(workers).submit(fn, *args)
    except BrokenProcessPool:
        _POOLS.pop(workers, None)
        return _pool(workers).submit(fn, *args)


def result_or(f: Future, again: Callable[[], R], what: str) -> R:
    """``f``'s result; where its worker died (killed, out of memory), ``again()`` in this process instead, saying
    ``what`` happens then (the next job submitted gets a fresh pool)."""
    try:
        return f.result()
    except BrokenProcessPool as e:
        log.warning("a worker process died (%s); %s", e, what)
        return again()


def beside(workers: int, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
    """``fn(item)`` for each item, in order, on ``workers`` processes while the caller's generator makes the next
    items (a model answering the next batch); at most twice as many items wait as there are workers, so memory stays
    bounded. ``workers`` 0: in line. ``fn`` must be a module's function (or a partial of one): it is pickled. An item
    whose worker died (killed, out of memory) is worked again here; the next item gets a fresh pool."""
    if workers <= 0:
        for item in items:
            yield fn(item)
        return
    pending: deque[tuple[T, Future]] = deque()

    def result(item: T, f: Future) -> R:
        return result_or(f, partial(fn, item), "its item is worked again in this process")

    try:
        for item in items:
            pending.append((item, submit(workers, fn, item)))
            while len(pending) > 2 * workers:
                yield result(*pending.popleft())
        while pending:
            yield result(*pending.popleft())
    finally:  # stopped early (an error, an interrupt): what has not started is dropped
        for _, f in pending:
            f.cancel()


@atexit.register
def shutdown() -> None:
    """Stop the pools (also at exit, so no worker outlives the command)."""
    for p in _POOLS.values():
        p.shutdown(cancel_futures=True)
    _POOLS.clear()
