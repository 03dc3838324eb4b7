"""What the commands that run a model from a config (`evaluate`, `predict`) share: the --config,
--opts and --debug options, logging, loading the config, and reporting the errors a user can fix as
`PROG: error: MESSAGE` with status 2 (cascade_rcnn.errors; anything else keeps its traceback)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from cascade_rcnn.errors import EXIT_STATUS, add_debug_option, run_command


def add_config_options(
    parser: argparse.ArgumentParser, opts_help: str = "config overrides, in pairs"
) -> None:
    parser.add_argument("--config", required=True, help="detectron2-style YAML config")
    parser.add_argument("--opts", nargs="*", default=[], metavar="KEY VALUE", help=opts_help)
    add_debug_option(parser)


def run_with_config(prog: str, args: argparse.Namespace, body: Callable[[Any], int]) -> int:
    """body(the config of args.config with args.opts applied) -> its exit status, through
    errors.run_command. Odd --opts are a usage error."""
    if len(args.opts) % 2:
        print(f"{prog}: error: --opts takes KEY VALUE pairs, got {args.opts}", file=sys.stderr)
        return EXIT_STATUS
    from cascade_rcnn.config import load_config
    from cascade_rcnn.logs import setup_logging

    setup_logging()
    return run_command(prog, lambda: body(load_config(args.config, args.opts)), args.debug)
