"""The thread pool that runs a tree transfer file by file, for either backend."""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Callable, Iterable

from .base import StorageError
from .progress import Progress


def run_pool(
    label: str, items: Iterable[Any], fn: Callable[[Any], None], workers: int, progress: Progress
) -> None:
    """Run fn over items on `workers` threads with a bounded queue. On the first failure stop submitting,
    let running transfers finish, and raise that failure (same StorageError class) with a count."""
    workers = max(1, int(workers))
    failures: list = []
    it = iter(items)
    inflight: set[Future] = set()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="storage") as pool:

        def fill() -> None:
            while len(inflight) < workers * 4 and not failures:
                item = next(it, None)
                if item is None:
                    return
                fut = pool.submit(fn, item)
                fut.item = item  # type: ignore[attr-defined]
                inflight.add(fut)

        fill()
        while inflight:
            done, _ = wait(inflight, timeout=1.0, return_when=FIRST_COMPLETED)
            for fut in done:
                inflight.discard(fut)
                if fut.cancelled():
                    continue
                exc = fut.exception()
                if exc is not None:
                    failures.append((fut.item, exc))  # type: ignore[attr-defined]
            if failures:
                for fut in inflight:  # queued, not yet started: drop them
                    fut.cancel()
            progress.maybe_log()
            fill()
    if failures:
        item, exc = failures[0]
        cls = type(exc) if isinstance(exc, StorageError) else StorageError
        raise cls(
            f"{label}: {len(failures)} file(s) failed, {progress.files} done; first failure ({item}): {exc}"
        ) from exc
