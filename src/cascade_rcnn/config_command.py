"""What the commands that run a model from a config (`evaluate`, `predict`) share: the --config and
--opts options, logging, loading the config, and turning the errors a user can fix into
`PROG: error: MESSAGE` and an exit status (anything else is a bug and keeps its traceback)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)


def add_config_options(
    parser: argparse.ArgumentParser, opts_help: str = "config overrides, in pairs"
) -> None:
    parser.add_argument("--config", required=True, help="detectron2-style YAML config")
    parser.add_argument("--opts", nargs="*", default=[], metavar="KEY VALUE", help=opts_help)


def run_with_config(
    prog: str,
    args: argparse.Namespace,
    body: Callable[[Any], int],
    errors: tuple[type[BaseException], ...],
    error_status: int,
) -> int:
    """body(the config of args.config with args.opts applied) -> its exit status; `errors` print as
    `prog: error: ...` and give `error_status`. Odd --opts are a usage error (status 2)."""
    if len(args.opts) % 2:
        print(f"{prog}: error: --opts takes KEY VALUE pairs, got {args.opts}", file=sys.stderr)
        return 2
    from cascade_rcnn.config import load_config
    from cascade_rcnn.logs import setup_logging

    setup_logging()

    try:
        return body(load_config(args.config, args.opts))
    except errors as e:
        # Their messages name the file or key; the traceback is for --debug-level logging only.
        logger.debug("%s failed", prog, exc_info=True)
        print(f"{prog}: error: {e}", file=sys.stderr)
        return error_status
