"""`cascade-rcnn` command line: one sub-command per module, each with its own `main(argv)`.

Every sub-command reports the project's own errors as one line, `cascade-rcnn COMMAND: error: ...`,
with exit status 2 (cascade_rcnn.errors); `--debug` (before or after COMMAND) or CASCADE_RCNN_DEBUG=1
adds the traceback."""

from __future__ import annotations

import importlib
import os
import sys

from cascade_rcnn.errors import DEBUG_ENV

# Sub-command -> module that owns it. Imports are lazy so `--help` stays fast and
# an optional stack (torch_npu, kfp) is only touched by the command that needs it.
COMMANDS = {
    "predict": ("cascade_rcnn.predict", "run a model on images and write detections as JSON"),
    "train": ("cascade_rcnn.engine.launch", "train from a config (one process per device)"),
    "finetune": ("cascade_rcnn.engine.launch", "train from a checkpoint's weights with a fresh schedule"),
    "evaluate": ("cascade_rcnn.evaluation.cli", "COCO box and mask AP of a checkpoint on a split"),
    "ingest": ("cascade_rcnn.ingest", "fetch, validate and store COCO in object storage"),
    "fetch-weights": ("cascade_rcnn.weights", "fetch and convert pretrained weights"),
    "make-shapes": ("cascade_rcnn.data.shapes", "write a small synthetic COCO-format shapes data set"),
}


def _usage() -> str:
    lines = ["usage: cascade-rcnn [--debug] COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<14} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines.append("\nRun `cascade-rcnn COMMAND --help` for a command's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--debug"]:
        os.environ[DEBUG_ENV] = "1"  # read by the command and by any worker process it starts
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"cascade-rcnn: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    # Modules that own two commands (train/finetune) take the command name.
    if hasattr(module, "run_command"):
        return int(module.run_command(name, rest) or 0)
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
