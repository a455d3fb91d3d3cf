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
    wait (0: while the worker is busy), so a slow consumer holds the producer back instead of growing memory.

    ``close()`` waits for every item and re-raises the worker's error; ``put`` raises it as soon as it is known.
    With ``threaded=False`` ``put`` calls ``fn`` in line (the reference the threaded path must equal).
    """

    def __init__(self, fn: Callable[[Any], None], depth: int = 2, threaded: bool = True, name: str = "geomoe-write"):
        self.fn, self.threaded = fn, threaded
        self.error: BaseException | None = None
        if threaded:
            # items alive: ``depth`` waiting and the one in the worker's hands; an item is made only once it has
            # a place (``put_made``), so a producer that waits holds no extra copy
            self.slots = threading.Semaphore(max(depth, 0) + 1)
            self.q: queue.Queue = queue.Queue()
            self.thread = threading.Thread(target=self._run, name=name, daemon=True)
            self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is _STOP:
                return
            try:
                if self.error is None:  # after an error, drain without working so the producer never blocks
                    self.fn(item)
            except BaseException as e:  # noqa: BLE001 - handed to the producer's thread
                self.error = e
            finally:
                del item  # its memory goes before the producer may make the next one
                self.slots.release()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def put(self, item: Any) -> None:
        self.put_made(lambda: item)

    def put_made(self, make: Callable[[], Any]) -> None:
        """Queue ``make()``, called once the item has a place (blocks until then)."""
        if not self.threaded:
            self.fn(make())
            return
        self._raise()
        while not self.slots.acquire(timeout=0.2):
            self._raise()
        self.q.put(make())

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
            self.slots.release()
        self.q.put(_STOP)
        self.thread.join()


class InOrder:
    """Jobs (futures, or anything with ``done``, ``result`` and ``cancel``) started in order and finished in that
    order: ``finish(job.result())`` for the oldest ones done, waiting for the oldest while more than ``keep`` are
    under way, so what is in flight stays bounded and outputs keep the order of the inputs."""

    def __init__(self, finish: Callable[[Any], None]):
        self.finish, self.jobs = finish, deque()

    def add(self, job: Any, keep: int) -> None:
        self.jobs.append(job)
        self.drain(keep)

    def drain(self, keep: int = 0) -> None:
        while self.jobs and (len(self.jobs) > keep or self.jobs[0].done()):
            self.finish(self.jobs.popleft().result())

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel()
        self.jobs.clear()
