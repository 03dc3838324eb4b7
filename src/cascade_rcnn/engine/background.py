"""Storage writes off the training loop's critical path: one background thread at a time.

The trainer hands it a checkpoint write (state already copied to host memory) or a metrics upload
and goes on training. A new job waits only for the one before it, so writes land in the order
they were submitted (the checkpoint before the pointer that names it, one checkpoint before the
next) and at most one state copy is held besides the live one. A job that fails (after the
storage layer's outage budget) is raised in the training thread at its next check, naming what
was being written.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable, Optional

from ..errors import CascadeRCNNError

log = logging.getLogger(__name__)


def _yield_cpu() -> None:
    """Lower this thread's CPU priority (nice +10; Linux's nice is per thread, and threads it starts
    inherit it): where training keeps every core busy (CPU training) the write takes what is left
    instead of slowing the steps down; with an accelerator the host has cores to spare anyway."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):  # not Linux, or not allowed: the write just competes
        pass


class BackgroundWriteError(CascadeRCNNError):
    """A background write failed; the message names what was being written (the URI)."""


class BackgroundWriter:
    """Runs submitted jobs one after another on a thread of their own."""

    def __init__(self) -> None:
        self._thread: Optional[threading.Thread] = None
        self._what = ""
        self._error: Optional[BaseException] = None
        self._started = 0.0

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Callable[[], None], what: str) -> float:
        """Run job() in the background once the previous job is done; returns the seconds spent
        waiting for that previous job (the part of a checkpoint's cost the loop still pays)."""
        waited = self.wait()
        self._what, self._error, self._started = what, None, time.monotonic()

        def run() -> None:
            _yield_cpu()
            try:
                job()
            except BaseException as exc:  # handed to the training thread
                self._error = exc

        self._thread = threading.Thread(target=run, name="checkpoint-writer", daemon=True)
        self._thread.start()
        return waited

    def wait(self) -> float:
        """Until the running job is done; raises BackgroundWriteError if it failed. Returns the
        seconds waited."""
        thread = self._thread
        if thread is None:
            return 0.0
        start = time.monotonic()
        if thread.is_alive():
            log.info(
                "waiting for the background write of %s (running for %.1f s)",
                self._what,
                start - self._started,
            )
        thread.join()
        waited = time.monotonic() - start
        self._thread = None
        self.raise_if_failed()
        return waited

    def raise_if_failed(self) -> None:
        """Raise the failure of a finished job (once); a no-op while it runs or when it succeeded."""
        error, self._error = self._error, None
        if error is not None:
            raise BackgroundWriteError(f"writing {self._what} failed: {error}") from error

    def drain(self) -> None:
        """Wait for the running job and log (not raise) its failure: for a run that is already
        failing for another reason, whose last checkpoint should still land."""
        try:
            self.wait()
        except BackgroundWriteError as exc:
            log.error("%s", exc)
