"""Stopping on SIGTERM (preemption, a drained node, a deleted pod) without losing a finished iteration.

Kubernetes sends SIGTERM, waits the pod's terminationGracePeriodSeconds, then sends SIGKILL. In a
KFP step Argo's emissary (PID 1) forwards the signal to the whole process group of the step's
command (argoproj/argo-workflows cmd/argoexec/commands/signal.go forwardSignals ->
workflow/executor/osspecific Kill(-pgid)), so every trainer process and data loader worker gets it.

A trainer process only notes the signal (`StopSignal`); the loop finishes the iteration it is in,
the ranks agree on stopping after that iteration (`comm.any_rank`), write its checkpoint, wait for
the upload and raise `TrainingInterrupted`: the process exits non-zero and the step's retry (KFP's,
or Trainer's) resumes from that checkpoint. Data loader workers ignore SIGTERM (data/loader.py):
their death would make the DataLoader raise in the middle of the iteration being finished.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Optional

from ..errors import CascadeRCNNError

log = logging.getLogger(__name__)

EXIT_CODE = 128 + signal.SIGTERM  # what a process killed by SIGTERM reports; a retry resumes


class TrainingInterrupted(CascadeRCNNError):
    """Training stopped on SIGTERM after a checkpoint of its last finished iteration was stored (a
    command reports it as one line and exits with EXIT_CODE, not as an error)."""

    def __init__(self, message: str, iteration: int = -1, checkpoint: str = ""):
        super().__init__(message)
        self.iteration = iteration
        self.checkpoint = checkpoint


class StopSignal:
    """Notes SIGTERM for the training loop to act on."""

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous: dict = {}

    def __bool__(self) -> bool:
        return self.received is not None

    def handle(self, signum: int, frame: object) -> None:
        if self.received is None:
            log.warning(
                "%s received: finishing the current iteration, then checkpointing it and exiting",
                signal.Signals(signum).name,
            )
        self.received = signum

    def install(self, signals: tuple = (signal.SIGTERM,)) -> StopSignal:
        """Handle `signals` in this process (from the main thread; elsewhere a no-op)."""
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self.handle)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
