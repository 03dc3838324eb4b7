"""Logging setup for the commands, the pipeline steps and the training workers.

Both functions leave a root logger that already has handlers alone (logging.basicConfig's rule), so
a test's or an embedding program's configuration wins.
"""

from __future__ import annotations

import logging
import os
import sys

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: int = logging.INFO, fmt: str = LOG_FORMAT) -> None:
    """Records at `level` and above to stderr, as `fmt`."""
    logging.basicConfig(level=level, format=fmt)


def setup_training_logging() -> None:
    """A training process's records to stdout, tagged with its rank; ranks other than 0 log only
    warnings, so a job's log is not N copies of the same lines."""
    rank = os.environ.get("RANK", "0")
    level = logging.INFO if rank == "0" else logging.WARNING
    logging.basicConfig(
        level=level,
        format=f"[%(asctime)s r{rank} %(name)s] %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
    )
