"""Large arrays handed to worker processes through files the system keeps in memory, not pickled through a pipe.

A band of three float32 probability channels across a wide scene is tens of megabytes; pickling it through the
process pool's pipe kept the pool's feeder thread busy for most of the footprint stage on a 16-core GPU machine
(bench/RESULTS.md, session 26). Written once with ``np.save`` into a folder under /dev/shm (where it exists) and
mapped read-only by the worker, it costs one memory copy. Each job's files are removed once its result is taken or
it is cancelled; the folder when the stage ends. Where /dev/shm is full (a container's is often 64 MB) a band is
not handed off (``put`` returns None) and the caller pickles it as before.
"""

from __future__ import annotations

import shutil
import tempfile
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

_IN_MEMORY = Path("/dev/shm")


class Handoff:
    """A folder of arrays in flight to worker processes (one per band writer)."""

    def __init__(self) -> None:
        self.folder: Path | None = None  # made at the first band: a writer that never gets one leaves nothing
        self.n = 0

    def put(self, arrays: dict[str, np.ndarray | None]) -> dict[str, Path | None] | None:
        """Write ``arrays`` (None stays None) and return where each one is; None where there is no room."""
        if self.folder is None:
            where = _IN_MEMORY if _IN_MEMORY.is_dir() else None
            self.folder = Path(tempfile.mkdtemp(prefix="geomoe-handoff-", dir=where))
        self.n += 1
        paths: dict[str, Path | None] = {}
        try:
            for name, a in arrays.items():
                if a is None:
                    paths[name] = None
                    continue
                paths[name] = p = self.folder / f"{self.n}_{name}.npy"
                np.save(p, np.ascontiguousarray(a), allow_pickle=False)
        except OSError:  # no space left: this band goes through the pipe
            remove(paths)
            return None
        return paths

    def close(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def take(paths: dict[str, Path | None]) -> dict[str, np.ndarray | None]:
    """The arrays at ``paths``, mapped read-only (in the worker)."""
    return {k: None if p is None else np.load(p, mmap_mode="r", allow_pickle=False) for k, p in paths.items()}


class HandedJob:
    """A worker's future whose handed-off files go once its result is taken or it is cancelled (the shape
    :class:`geomoe.pipelines.background.InOrder` expects)."""

    def __init__(self, future: Future, paths: dict[str, Path | None]):
        self.future, self.paths = future, paths

    def done(self) -> bool:
        return self.future.done()

    def result(self) -> Any:
        try:
            return self.future.result()
        finally:
            self._remove()

    def cancel(self) -> None:
        # a worker already reading keeps its mapping: removing a mapped file on POSIX leaves the mapping valid
        self.future.cancel()
        self._remove()

    def _remove(self) -> None:
        remove(self.paths)


def remove(paths: dict[str, Path | None]) -> None:
    for p in paths.values():
        if p is not None:
            try:
                p.unlink(missing_ok=True)
            except OSError:  # still mapped where the system refuses that (Windows): the folder goes at the end
                pass
