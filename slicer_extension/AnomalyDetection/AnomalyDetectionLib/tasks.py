"""Run blocking calls (network, file I/O) off the GUI thread; deliver results back on the thread that polls.

No Qt here: the Widget calls :meth:`TaskRunner.poll` from a ``qt.QTimer`` (every ~100 ms), so callbacks that touch
MRML or widgets always run on Slicer's main thread, and the event loop never waits for the network.
"""
from __future__ import annotations

import concurrent.futures
import threading
import time
from typing import Any, Callable, List, Optional, Tuple


class TaskRunner:
    """A small thread pool whose finished jobs are handed to callbacks by :meth:`poll`."""

    def __init__(self, max_workers: int = 2):
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="anomaly")
        self._lock = threading.Lock()
        self._pending: List[Tuple[str, concurrent.futures.Future, Optional[Callable], Optional[Callable]]] = []

    def submit(
        self,
        name: str,
        fn: Callable[..., Any],
        *args: Any,
        on_done: Optional[Callable[[Any], None]] = None,
        on_error: Optional[Callable[[BaseException], None]] = None,
        **kwargs: Any,
    ) -> concurrent.futures.Future:
        """Start ``fn(*args, **kwargs)`` in a worker thread; ``poll`` later calls ``on_done(result)`` or
        ``on_error(exception)`` on the polling thread."""
        future = self._pool.submit(fn, *args, **kwargs)
        with self._lock:
            self._pending.append((name, future, on_done, on_error))
        return future

    def busy(self, name: Optional[str] = None) -> bool:
        """True while a job (named ``name``, or any) has not been delivered by ``poll`` yet."""
        with self._lock:
            return any(name is None or n == name for n, *_ in self._pending)

    def poll(self) -> int:
        """Deliver the finished jobs' results to their callbacks; returns how many were delivered."""
        with self._lock:
            done = [p for p in self._pending if p[1].done()]
            self._pending = [p for p in self._pending if not p[1].done()]
        for _, future, on_done, on_error in done:
            exc = future.exception()
            if exc is not None:
                if on_error is not None:
                    on_error(exc)
            elif on_done is not None:
                on_done(future.result())
        return len(done)

    def wait(self, timeout: float = 30.0, interval: float = 0.02) -> None:
        """Poll until no job is pending (for tests and scripts; the GUI uses a timer instead)."""
        deadline = time.monotonic() + timeout
        while self.busy():
            self.poll()
            if time.monotonic() > deadline:
                raise TimeoutError("tasks still running")
            time.sleep(interval)
        self.poll()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
