"""Training and fine-tuning: `run_training(TrainJob)` starts the workers and returns the record of
the final checkpoint. The pipeline's train and finetune components build the TrainJob from their
parameters, `cascade-rcnn train|finetune` from its command line (`run_command`).

Process layout follows torchrun:
- already inside a torchrun/elastic worker (LOCAL_RANK set), or one process per pod as a PyTorchJob
  without nprocPerNode starts it (RANK and WORLD_SIZE set): run this process's share in place;
- --nproc-per-node N > 1, or PET_NNODES > 1: start N workers per node through torch's elastic agent
  (`torch.distributed.launcher.api.elastic_launch`), nodes meeting at MASTER_ADDR:MASTER_PORT with
  this node's rank from PET_NODE_RANK (as PyTorchJob sets them);
- otherwise: one process, no process group.

A worker's expected error (cascade_rcnn.errors) reaches the command as one line that names the
worker's rank, without the traceback (`_elastic_worker`, `WorkerError`).

SIGTERM (preemption): every worker finishes its iteration, the workers checkpoint it together and
exit with 143 (engine/preemption.py), and the step's retry resumes. torch's elastic agent would
instead SIGKILL the workers 30 s after passing SIGTERM on (PContext.close(timeout=30); configurable
only from the release with pytorch/pytorch#172596, TORCH_ELASTIC_SHUTDOWN_TIMEOUT), too soon for a
large checkpoint's upload. It installs that handler only from the main thread (PContext.start), so
`launch_elastic` runs the agent on another thread, and the main thread forwards SIGTERM to the
workers and waits for them.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import uuid

from .. import errors, storage
from ..accel import require_requested, resolve_device_type
from ..config import ConfigError
from ..errors import CascadeRCNNError
from ..logs import setup_training_logging
from .curves import write_training_curves
from .metrics import last_eval
from .preemption import EXIT_CODE, StopSignal, TrainingInterrupted
from .run import TrainJob, run_worker, train_splits

__all__ = ["TrainJob", "WorkerError", "run_training", "run_command"]

log = logging.getLogger(__name__)


class WorkerError(CascadeRCNNError):
    """A worker process stopped on an expected error; the message names its rank."""


def build_parser(command: str) -> argparse.ArgumentParser:
    finetune = command == "finetune"
    p = argparse.ArgumentParser(
        prog=f"cascade-rcnn {command}",
        description=(
            "Fine-tune from a checkpoint's weights with a fresh schedule."
            if finetune
            else "Train Cascade Mask R-CNN; resumes from the output's last checkpoint."
        ),
    )
    p.add_argument("--config", required=True, help="detectron2-style YAML config")
    if finetune:
        p.add_argument("--weights", required=True, help="checkpoint to start from (ours or detectron2's)")
    p.add_argument(
        "--data", required=True, help="COCO-layout root (local or s3://) or an ingest manifest URI"
    )
    p.add_argument(
        "--output",
        default=None,
        help="output folder or s3:// prefix (checkpoints, metrics); default: the config's OUTPUT_DIR",
    )
    p.add_argument(
        "--nproc-per-node", type=int, default=None, help="worker processes on this node (one per device)"
    )
    p.add_argument("--train-split", default=None, help="split to train on (default: from DATASETS.TRAIN)")
    p.add_argument(
        "--val-split",
        default=None,
        help="validation split for TEST.EVAL_PERIOD and --eval-after (default: each DATASETS.TEST entry)",
    )
    p.add_argument("--eval-after", action="store_true", help="evaluate model_final on the validation split")
    p.add_argument("--keep-checkpoints", type=int, default=0, help="periodic checkpoints to keep (0: all)")
    errors.add_debug_option(p)
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ...")
    return p


def job_from_args(command: str, args: argparse.Namespace) -> TrainJob:
    if len(args.opts) % 2:
        raise ConfigError(f"--opts needs KEY VALUE pairs, got {args.opts}")
    output = args.output
    if output is None:
        from ..config import load_config

        output = load_config(args.config, args.opts).OUTPUT_DIR  # as detectron2's trainers write there
        if not output:
            raise ConfigError("no --output and the config's OUTPUT_DIR is empty")
    return TrainJob(
        config=args.config,
        data=args.data,
        output=output,
        opts=list(args.opts),
        train_split=args.train_split,
        val_split=args.val_split,
        init_weights=getattr(args, "weights", None),
        finetune=command == "finetune",
        eval_after=args.eval_after,
        keep_checkpoints=args.keep_checkpoints,
        nproc_per_node=args.nproc_per_node,
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment {name}={raw!r} is not an integer") from None


def launch_elastic(cfg, job: TrainJob, nproc_per_node: int) -> str | None:
    """N workers on this node (and PET_NNODES nodes in all), as torchrun's static rendezvous does."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    nnodes = _env_int("PET_NNODES", 1)
    node_rank = _env_int("PET_NODE_RANK", _env_int("NODE_RANK", 0))
    if nnodes > 1 and "MASTER_ADDR" not in os.environ:
        raise ConfigError(
            f"PET_NNODES={nnodes} but MASTER_ADDR is not set: every node must know the master's address"
        )
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = _env_int("MASTER_PORT", 0) or _free_port()
    if "OMP_NUM_THREADS" not in os.environ:
        # As torchrun: N workers with a full thread pool each would oversubscribe the node's cores.
        os.environ["OMP_NUM_THREADS"] = "1"
        log.info("OMP_NUM_THREADS=1 for each worker (set it to override), as torchrun does")
    # The agent sets RANK/WORLD_SIZE/LOCAL_RANK for each worker; a pod's own values would mislead them.
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        os.environ.pop(key, None)
    config = LaunchConfig(
        min_nodes=nnodes,
        max_nodes=nnodes,
        nproc_per_node=nproc_per_node,
        run_id=os.environ.get("PET_RUN_ID", os.environ.get("TORCHELASTIC_RUN_ID", uuid.uuid4().hex[:12])),
        rdzv_backend="static",
        rdzv_endpoint=f"{addr}:{port}",
        rdzv_configs={"rank": node_rank},
        max_restarts=0,
        start_method="spawn",
    )
    log.info(
        "starting %d workers on node %d of %d (master %s:%d)", nproc_per_node, node_rank, nnodes, addr, port
    )
    agent_log = logging.getLogger(AGENT_LOGGER)
    quiet = None if errors.debug_requested() else _HideExpectedExit()
    if quiet:
        agent_log.addFilter(quiet)
    try:
        results = _run_agent(lambda: elastic_launch(config, _elastic_worker)(cfg, job))  # spawn pickles them
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        message = failure.error_file_data.get(errors.ERROR_FILE_KEY)
        if message is None or errors.debug_requested():
            raise
        raise WorkerError(message) from None
    finally:
        if quiet:
            agent_log.removeFilter(quiet)
    return results.get(0) if isinstance(results, dict) else None


# The agent logs each failed worker with the traceback of the parent's ProcessExitedException
# (torch/distributed/elastic/multiprocessing/api.py, MultiprocessContext._poll: logger.exception).
AGENT_LOGGER = "torch.distributed.elastic.multiprocessing.api"


class _HideExpectedExit(logging.Filter):
    """Drops the agent's record of a worker that exited with EXIT_STATUS (it reported an expected
    error, which the command prints as one line) or with preemption.EXIT_CODE (it stopped on SIGTERM
    after its checkpoint, and said so)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return getattr(exc, "exit_code", None) not in (errors.EXIT_STATUS, EXIT_CODE)


def _child_pids() -> list[int]:
    """This process's children (the agent's workers; multiprocessing's resource tracker ignores
    SIGTERM), from /proc."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:
            found.append(int(entry))
    return found


def _run_agent(launch):
    """launch() (the elastic agent) on a thread of its own, SIGTERM handled here: passed on to the
    workers, which checkpoint and exit; their failure then comes back as TrainingInterrupted."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = launch()
        except BaseException as exc:  # re-raised in the main thread
            outcome["error"] = exc

    stop = StopSignal()

    def forward(signum: int, frame: object) -> None:
        stop.handle(signum, frame)
        for pid in _child_pids():
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, forward)
    agent = threading.Thread(target=run, name="elastic-agent", daemon=True)
    agent.start()
    try:
        while agent.is_alive():
            agent.join(0.5)  # wakes up for signal handlers
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    error = outcome.get("error")
    if error is not None:
        if stop:
            raise TrainingInterrupted(
                "stopped on request (SIGTERM): the workers checkpointed their last finished iteration "
                "(see their log); the same command (the step's retry) resumes from it"
            ) from None
        raise error
    return outcome.get("result")


def _elastic_worker(cfg, job: TrainJob) -> str | None:
    """run_worker in a process that the elastic agent started.

    An expected error goes to the agent's error file, marked as ours (errors.write_error_file), and
    the process ends with status 2 and no traceback; launch_elastic then raises it as a WorkerError.
    The agent wraps this function in torch's `record`, which re-raises a SystemExit without writing
    an error file of its own (torch/distributed/elastic/multiprocessing/errors/__init__.py, record;
    multiprocessing/api.py, _wrap). With --debug the error propagates with its traceback."""
    try:
        return run_worker(cfg, job)
    except TrainingInterrupted:
        sys.exit(EXIT_CODE)  # run_worker said where it stopped; no traceback for a preemption
    except CascadeRCNNError as e:
        if errors.debug_requested():
            raise
        errors.write_error_file(e)
        sys.exit(errors.EXIT_STATUS)


def _device_used(job: TrainJob, cfg) -> str:
    """The requested resource when the run used it, else the device type (cpu with device=cpu)."""
    device_type = resolve_device_type(str(cfg.MODEL.DEVICE))
    return job.accelerator if job.accelerator and device_type != "cpu" else device_type


def run_training(job: TrainJob) -> dict | None:
    """Run `job` on this node's workers; return the record the step's Model artifact carries.

    The config is loaded here once, with job.overrides(), and the CfgNode itself goes to the workers
    (elastic_launch's spawn pickles it). With TEST.EVAL_PERIOD > 0 the record also carries the last
    evaluation: "eval" ({"bbox/AP": ..., "segm/AP": ..., ...}, detectron2's names) and
    "eval_iteration". None in a process that does not hold rank 0 (a torchrun worker, another node).
    """
    from ..config import load_config
    from ..data.splits import resolve_dataset

    setup_training_logging()
    nproc = job.nproc_per_node or _env_int("PET_NPROC_PER_NODE", 1)
    if nproc < 1:
        raise ConfigError(f"--nproc-per-node must be at least 1, got {nproc}")
    overrides = job.overrides(nproc)
    log.info("%s %s with the overrides %s", "finetune" if job.finetune else "train", job, overrides)
    cfg = load_config(job.config, overrides)
    cfg.OUTPUT_DIR = job.output  # the checkpoints' config names where the run wrote
    # Before any worker starts: a pod that asked for devices and got none fails here, in seconds.
    require_requested(job.accelerator, nproc, str(cfg.MODEL.DEVICE))
    # Missing data shows here in a moment, not in every worker once its model is built.
    for split in train_splits(cfg, job):
        resolve_dataset(job.data, split)
    if "LOCAL_RANK" not in os.environ and (nproc > 1 or _env_int("PET_NNODES", 1) > 1):
        final = launch_elastic(cfg, job, nproc)
    else:
        # A torchrun worker, one process of a per-pod PyTorchJob (RANK/WORLD_SIZE), or a lone process.
        final = run_worker(cfg, job)
    if not final:
        return None
    record = {
        "checkpoint_uri": final,
        "output_uri": job.output,
        "source": job.init_weights or cfg.MODEL.WEIGHTS,
        "sha256": storage.head(final).sha256,
        "format": "cascade_rcnn",
        "iterations": int(cfg.SOLVER.MAX_ITER) if job.iterations is None else job.iterations,
        "accelerator": f"{nproc} x {_device_used(job, cfg)}",
        "data": job.data,
        "config": job.config,
    }
    evaluation = last_eval(job.output)  # TEST.EVAL_PERIOD: the evaluation after the last iteration
    if evaluation is not None:
        record["eval_iteration"] = evaluation.pop("iteration")
        record["eval"] = evaluation
    try:
        title = "Fine-tuning curves" if job.finetune else "Training curves"
        record["training_curves"] = write_training_curves(job.output, title)
    except Exception:  # a page must not fail the training that produced the checkpoint
        log.warning("could not draw the training curves of %s", job.output, exc_info=True)
    return record


def run_command(command: str, argv: list[str]) -> int:
    """`cascade-rcnn COMMAND ARGV...` for COMMAND "train" or "finetune" (the `cascade-rcnn` CLI's entry)."""
    if command not in ("train", "finetune"):
        raise ValueError(f"cascade_rcnn.engine.launch handles train and finetune, not {command!r}")
    args = build_parser(command).parse_args(argv)
    if args.debug:
        os.environ[errors.DEBUG_ENV] = "1"  # the workers' too

    def train() -> int:
        try:
            record = run_training(job_from_args(command, args))
        except TrainingInterrupted as e:
            print(f"cascade-rcnn {command}: {e}", file=sys.stderr, flush=True)
            return EXIT_CODE
        if record:
            print(f"final checkpoint: {record['checkpoint_uri']}")
        return 0

    return errors.run_command(f"cascade-rcnn {command}", train, args.debug)


def main(argv: list[str] | None = None) -> int:
    return run_command("train", list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
