"""Work beside the model's thread: reads ahead on reader threads, and a consumer thread behind a bounded queue.

Both keep order (outputs are the same as doing the work in line) and both bound what is in flight, so memory stays
flat however large the raster. An error in a background thread is raised in the caller's thread.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")
_STOP = object()


def read_ahead(fn: Callable[[T], R], items: Iterable[T], workers: int, depth: int) -> Iterator[R]:
    """``fn(item)`` for each item, in order, computed by ``workers`` threads at most ``depth`` items ahead of the
    consumer (``workers`` 0: in the caller's thread, one at a time)."""
    if workers <= 0:
        for item in items:
            yield fn(item)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="geomoe-read")
    pending: deque[Future] = deque()
    it = iter(items)
    try:
        for item in it:
            pending.append(pool.submit(fn, item))
            if len(pending) >= max(depth, 1):
                break
        while pending:
            res = pending.popleft().result()
            nxt = next(it, _STOP)
            if nxt is not _STOP:
                pending.append(pool.submit(fn, nxt))
            yield res
    finally:  # the consumer stopped early (an error, an interrupt): drop what is queued, wait for what runs
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


class Consumer:
    """Runs ``fn(item)`` on one worker thread for items ``put`` in order; ``put`` blocks while ``depth`` items
    wait, so a slow consumer holds the producer back instead of growing memory.

    ``close()`` waits for every item and re-raises the worker's error; ``put`` raises it as soon as it is known.
    With ``threaded=False`` ``put`` calls ``fn`` in line (the reference the threaded path must equal).
    """

    def __init__(self, fn: Callable[[Any], None], depth: int = 2, threaded: bool = True, name: str = "geomoe-write"):
        self.fn, self.threaded = fn, threaded
        self.error: BaseException | None = None
        if threaded:
            self.q: queue.Queue = queue.Queue(maxsize=max(depth, 1))
            self.thread = threading.Thread(target=self._run, name=name, daemon=True)
            self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is _STOP:
                return
            if self.error is None:  # after an error, drain without working so the producer never blocks
                try:
                    self.fn(item)
                except BaseException as e:  # noqa: BLE001 - handed to the producer's thread
                    self.error = e

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def put(self, item: Any) -> None:
        if not self.threaded:
            self.fn(item)
            return
        self._raise()
        while True:
            try:
                self.q.put(item, timeout=0.2)
                return
            except queue.Full:
                self._raise()

    def close(self) -> None:
        """Wait until every item is done; raise the worker's error if there was one."""
        if self.threaded and self.thread.is_alive():
            self.q.put(_STOP)
            self.thread.join()
        self._raise()

    def abort(self) -> None:
        """Stop after the item in hand, dropping the rest (the caller is failing anyway)."""
        if not self.threaded or not self.thread.is_alive():
            return
        self.error = self.error or RuntimeError("aborted")
        while True:
            try:
                self.q.get_nowait()
            except queue.Empty:
                break
        self.q.put(_STOP)
        self.thread.join()
