"""Footprint regularisation (buildingregulariser): in the writer's thread, or spread over a pool of processes.

buildingregulariser costs about 10 ms a building, more than polygonising; on a machine whose cores the model
leaves idle (a GPU machine) a pool of ``predict.footprint_workers`` processes keeps it off the writer's path.
Each building is regularised on its own (no neighbour alignment), so cutting a batch into chunks gives exactly
the outlines of one call on the whole batch. The pool is started once per process (spawned, never forked: the
predicting process has reader, writer and torch threads) and reused by every scene.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import signal
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import geopandas as gpd
import numpy as np
import pandas as pd

MIN_CHUNK = 32  # buildings: smaller chunks cost more in pickling than they save
_POOLS: dict[int, ProcessPoolExecutor] = {}


def regularise_frame(work: gpd.GeoDataFrame, parallel_threshold: float, tolerance: float,
                     diagonals: bool) -> gpd.GeoDataFrame:
    """buildingregulariser on every row of ``work`` in this process; a self-intersecting outline may give two rows."""
    from buildingregulariser import regularize_geodataframe

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return regularize_geodataframe(work, parallel_threshold=parallel_threshold, simplify_tolerance=tolerance,
                                       allow_45_degree=diagonals, allow_circles=False, num_cores=1)


def auto_workers() -> int:
    """Processes for regularisation by default: none on small machines, where the model needs every core."""
    cores = os.cpu_count() or 1
    return 0 if cores <= 4 else min(8, cores // 4)


def _ignore_sigint() -> None:
    """Workers leave Ctrl-C to the predicting process, which stops at a safe point (geomoe/interrupt.py)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _pool(workers: int) -> ProcessPoolExecutor:
    if workers not in _POOLS:
        _POOLS[workers] = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                              initializer=_ignore_sigint)
    return _POOLS[workers]


@atexit.register
def shutdown() -> None:
    """Stop the pools (also at exit, so no worker outlives the command)."""
    for p in _POOLS.values():
        p.shutdown(cancel_futures=True)
    _POOLS.clear()


def regularise(work: gpd.GeoDataFrame, parallel_threshold: float, tolerance: float, diagonals: bool,
               workers: int = 0) -> gpd.GeoDataFrame:
    """Regularise every footprint of ``work``, in chunks over ``workers`` processes when there are enough."""
    n_chunks = min(workers, len(work) // MIN_CHUNK)
    if n_chunks < 2:
        return regularise_frame(work, parallel_threshold, tolerance, diagonals)
    pool = _pool(workers)
    parts = [pool.submit(regularise_frame, work.iloc[idx], parallel_threshold, tolerance, diagonals)
             for idx in np.array_split(np.arange(len(work)), n_chunks)]
    try:
        out = pd.concat([p.result() for p in parts], ignore_index=True)
    except BrokenProcessPool:
        _POOLS.pop(workers, None)  # a worker died (killed, out of memory): the next batch starts a new pool
        raise
    return gpd.GeoDataFrame(out, geometry=work.geometry.name, crs=work.crs)
