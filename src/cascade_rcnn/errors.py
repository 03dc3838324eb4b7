"""The project's own error type, and how a command reports it.

Every error the project raises for a problem it found and named (a bad config key, missing data or
weights, a storage or accelerator failure, a refused archive, a failed TrainJob, ...) derives from
`CascadeRCNNError`. A command prints one as a single line, `<command>: error: <message>`, and exits
with status 2, as argparse does for a bad flag: the message already says what and where, and a
traceback would only say "the program broke". Any other exception is a bug and keeps its traceback.
`--debug`, or CASCADE_RCNN_DEBUG=1, prints the traceback of every error.

In a process of a multi-process run (RANK and WORLD_SIZE > 1 in the environment, as torch's elastic
agent and torchrun set them) the line names the rank, and the message also goes to the agent's error
file (TORCHELASTIC_ERROR_FILE) in the format its ProcessFailure reads, marked as ours, so that the
launching process can report it as one line too (engine/launch.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable

DEBUG_ENV = "CASCADE_RCNN_DEBUG"
EXIT_STATUS = 2  # argparse's status for a usage error; a traceback exits with 1
# The key under which a worker's error file carries our message (torch reads only "message").
ERROR_FILE_KEY = "cascade_rcnn_error"


class CascadeRCNNError(Exception):
    """A problem the project found and named; the message says what and where (file, key, URI)."""


def debug_requested(flag: bool = False) -> bool:
    """--debug was given, or CASCADE_RCNN_DEBUG is set to something other than 0/false/no."""
    return flag or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def add_debug_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"print the traceback of every error (also {DEBUG_ENV}=1)",
    )


def _worker_rank() -> int | None:
    """This process's rank in a multi-process run, else None."""
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ:
            return int(os.environ["RANK"])
    except ValueError:
        pass
    return None


def error_message(error: BaseException) -> str:
    """The message of `error`, prefixed with this process's rank in a multi-process run."""
    rank = _worker_rank()
    return f"rank {rank}: {error}" if rank is not None else str(error)


def write_error_file(error: BaseException) -> None:
    """Leave `error` in the elastic agent's error file (TORCHELASTIC_ERROR_FILE), when there is one.

    The JSON is what torch's ErrorHandler.record_exception writes (torch/distributed/elastic/
    multiprocessing/errors/error_handler.py), so the agent's own report reads it as usual, plus our
    message under ERROR_FILE_KEY (ProcessFailure keeps the whole file as `error_file_data`)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    message = error_message(error)
    data = {
        "message": {
            "message": f"{type(error).__name__}: {message}",
            "extraInfo": {"py_callstack": message, "timestamp": str(int(time.time()))},
        },
        ERROR_FILE_KEY: message,
    }
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:
        pass  # the line on stderr still says it


def report_error(prog: str, error: BaseException) -> int:
    """Print `prog: error: message` to stderr (and the error file of a worker); returns EXIT_STATUS."""
    write_error_file(error)
    print(f"{prog}: error: {error_message(error)}", file=sys.stderr, flush=True)
    return EXIT_STATUS


def run_command(prog: str, body: Callable[[], int | None], debug: bool = False) -> int:
    """body()'s exit status (None: 0); a CascadeRCNNError becomes one line and EXIT_STATUS."""
    try:
        return int(body() or 0)
    except CascadeRCNNError as e:
        if debug_requested(debug):
            traceback.print_exc()
        return report_error(prog, e)
