"""`python -m pipelines compile | submit | schedule | run-local`."""

import argparse
import logging
import tempfile
from pathlib import Path
from typing import Optional

from cascade_rcnn.errors import add_debug_option, run_command
from cascade_rcnn.logs import setup_logging
from pipelines import retraining, training
from pipelines.params import ParameterError, kfp_cron
from pipelines.tasks import CompileOptions

PIPELINES = {"training": training, "retraining": retraining}

log = logging.getLogger("pipelines")


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _add_compile_options(p: argparse.ArgumentParser) -> None:
    d = CompileOptions()
    g = p.add_argument_group("compile options (fixed in the compiled YAML)")
    g.add_argument("--registry", default=d.registry, help=f"image registry (default: {d.registry})")
    g.add_argument("--tag", default=d.tag, help=f"image tag (default: the package version, {d.tag})")
    g.add_argument(
        "--no-accelerator",
        action="store_true",
        help="train and finetune on the CPU image, with device defaulting to cpu and no accelerator "
        "requests, node selector or "
        "toleration (clusters without NPUs)",
    )
    g.add_argument(
        "--accelerator-image",
        default=d.accelerator_image,
        help=f"image target of train/finetune: cascade-rcnn-TARGET (default: {d.accelerator_image})",
    )
    g.add_argument(
        "--node-selector",
        type=_key_value,
        action="append",
        metavar="KEY=VALUE",
        help="node label of the training steps, repeatable (default: "
        + ", ".join(f"{k}={v}" for k, v in d.node_selector.items())
        + ")",
    )
    g.add_argument(
        "--toleration",
        action="append",
        metavar="TAINT_KEY",
        help="taint key the training steps tolerate (Exists, NoSchedule), repeatable; '' for none "
        f"(default: {', '.join(d.tolerations)})",
    )
    g.add_argument(
        "--shm-size", default=d.shm_size, help=f"/dev/shm of the training steps (default: {d.shm_size})"
    )
    g.add_argument(
        "--timeout-hours",
        type=float,
        default=d.train_timeout_s / 3600,
        help=f"deadline of each training pod (default: {d.train_timeout_s // 3600})",
    )
    g.add_argument("--retries", type=int, default=d.train_retries, help="retries of the training steps")
    g.add_argument(
        "--termination-grace-seconds",
        type=int,
        default=d.termination_grace_s,
        help="SIGTERM to SIGKILL for the training pods: time to checkpoint the last iteration on "
        f"preemption; TrainJob nodes only, KFP cannot set it on a step (default: {d.termination_grace_s})",
    )
    g.add_argument(
        "--cpu", default=d.cpu_request, help=f"CPU request of the training steps (default: {d.cpu_request})"
    )
    g.add_argument("--memory", default=d.memory_request, help=f"memory request (default: {d.memory_request})")
    g.add_argument("--memory-limit", default=d.memory_limit, help=f"memory limit (default: {d.memory_limit})")
    g.add_argument(
        "--secret-key",
        type=_key_value,
        action="append",
        metavar="ENV=KEY",
        help="read env var ENV from key KEY of the S3 Secret, repeatable (default: each of "
        + ", ".join(d.secret_keys)
        + " from the key of the same name)",
    )


def compile_options(args: argparse.Namespace) -> CompileOptions:
    d = CompileOptions()
    if args.retries < 0:
        raise ParameterError(f"--retries {args.retries}: must be 0 or more")
    if args.timeout_hours <= 0:
        raise ParameterError(f"--timeout-hours {args.timeout_hours}: must be positive")
    if args.termination_grace_seconds < 0:
        raise ParameterError(
            f"--termination-grace-seconds {args.termination_grace_seconds}: must be 0 or more"
        )
    secret_keys = dict(d.secret_keys)
    for env, key in args.secret_key or []:
        if env not in secret_keys:
            raise ParameterError(f"--secret-key {env}={key}: {env} is not one of {', '.join(secret_keys)}")
        secret_keys[env] = key
    tolerations = d.tolerations if args.toleration is None else tuple(t for t in args.toleration if t)
    return CompileOptions(
        registry=args.registry,
        tag=args.tag,
        accelerator=not args.no_accelerator,
        accelerator_image=args.accelerator_image,
        node_selector=dict(args.node_selector) if args.node_selector else d.node_selector,
        tolerations=tolerations,
        shm_size=args.shm_size,
        train_timeout_s=round(args.timeout_hours * 3600),
        train_retries=args.retries,
        termination_grace_s=args.termination_grace_seconds,
        cpu_request=args.cpu,
        memory_request=args.memory,
        memory_limit=args.memory_limit,
        secret_keys=secret_keys,
    )


def _add_pipeline_choice(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument(
        "--pipeline",
        choices=sorted(PIPELINES),
        default=default,
        help=f"which pipeline: training (train once) or retraining (train when the data changed, "
        f"promote when better) (default: {default})",
    )


def _add_run_options(p: argparse.ArgumentParser, default_pipeline: str) -> None:
    _add_pipeline_choice(p, default_pipeline)
    p.add_argument(
        "--package", type=Path, help="a compiled pipeline to send (default: compile --pipeline now)"
    )
    p.add_argument(
        "--endpoint", help="KFP API endpoint, e.g. http://localhost:8080 (default: $KF_PIPELINES_ENDPOINT)"
    )
    p.add_argument("--ui-endpoint", help="KFP UI address for the printed link (default: the endpoint)")
    p.add_argument("--namespace", help="namespace of the run (multi-user Kubeflow: your profile)")
    p.add_argument("--experiment", default="cascade-rcnn", help="experiment name (default: cascade-rcnn)")
    p.add_argument("--pipeline-root", help="s3://... for the run's KFP artifacts (default: kfp-launcher's)")
    p.add_argument("--service-account", help="Kubernetes service account of the run's pods")
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="pipeline parameter, repeatable (lists as JSON); root is required",
    )
    p.add_argument(
        "--check-bucket",
        action="store_true",
        help="also check from this machine (AWS_ENDPOINT_URL and AWS credentials) that root's bucket exists",
    )
    _add_compile_options(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines",
        description="Compile, submit, schedule or locally run the training and retraining pipelines.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compile", help="compile the pipelines to YAML")
    p.add_argument(
        "--pipeline",
        choices=[*sorted(PIPELINES), "all"],
        help="which pipeline to compile (default: all, each to pipelines/compiled/; with --output: training)",
    )
    p.add_argument("--output", type=Path, help="YAML to write (one pipeline)")
    _add_compile_options(p)

    p = sub.add_parser("submit", help="start one run on a KFP cluster and print its URL")
    p.add_argument("--run-name", help="display name of the run")
    p.add_argument("--no-cache", action="store_true", help="run every step even if a cached result exists")
    _add_run_options(p, "training")

    p = sub.add_parser("schedule", help="create a recurring run (caching off, one at a time, no catch-up)")
    p.add_argument(
        "--cron", required=True, help="five-field cron in the cluster's time zone, e.g. '0 2 * * *'"
    )
    p.add_argument("--name", default="cascade-rcnn-retraining", help="recurring run name")
    _add_run_options(p, "retraining")

    p = sub.add_parser("run-local", help="run a whole pipeline here (kfp.local, CPU, local SeaweedFS)")
    _add_pipeline_choice(p, "training")
    p.add_argument(
        "--workdir", type=Path, default=Path("demo_out"), help="where everything goes (default: demo_out)"
    )
    p.add_argument("--iterations", type=int, help="training iterations")
    p.add_argument("--finetune-iterations", type=int, help="fine-tuning iterations")
    p.add_argument("--train-images", type=int, help="generated training images")
    p.add_argument("--val-images", type=int, help="generated validation images")
    p.add_argument(
        "--eval-period",
        type=int,
        help="evaluate every N training iterations, for the AP on the training curves (0: never)",
    )
    p.add_argument(
        "--package",
        type=Path,
        help="run this compiled pipeline (e.g. pipelines/compiled/cascade_mask_rcnn_training.yaml) with "
        "its defaults, only data and sizes shrunk: 8 CPU trainer processes, AMP (default: the pipeline "
        "built from the code, on one CPU process without AMP)",
    )
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="with --package or --pipeline retraining: a run parameter on top (e.g. accelerator_count=1, "
        "amp=false, force=true, min_improvement=1.0); repeatable",
    )
    for command in sub.choices.values():
        add_debug_option(command)
    return parser


def _package(args: argparse.Namespace, tmp: str) -> Path:
    if args.package is not None:
        if not args.package.is_file():
            raise ParameterError(f"--package {args.package}: no such file")
        return args.package
    return PIPELINES[args.pipeline].compile_pipeline(Path(tmp) / "pipeline.yaml", compile_options(args))


def _run_local(args: argparse.Namespace) -> int:
    from pipelines.run_local import LocalSettings, run_local, summary

    settings = LocalSettings()
    for name in ("iterations", "finetune_iterations", "train_images", "val_images", "eval_period"):
        value = getattr(args, name)
        lowest = 0 if name == "eval_period" else 1
        if value is not None:
            if value < lowest:
                raise ParameterError(f"--{name.replace('_', '-')} {value}: must be at least {lowest}")
            setattr(settings, name, value)
    from pipelines.params import check_params, parse_params, pipeline_inputs

    if args.pipeline == "retraining":
        from pipelines.run_local import retrain_summary, run_retrain_local

        if args.package is not None:
            raise ParameterError("--package runs the training pipeline; drop it with --pipeline retraining")
        inputs = pipeline_inputs(retraining.COMPILED)
        overrides = parse_params(args.param, inputs)
        check_params(
            {"root": "s3://placeholder-bucket/x", **overrides}, inputs
        )  # the local root is set later
        summary_ = run_retrain_local(args.workdir, settings, overrides=overrides)
        print(retrain_summary(summary_, args.workdir.resolve()))
        return 0
    overrides = None
    if args.package is not None:
        if not args.package.is_file():
            raise ParameterError(f"--package {args.package}: no such file")
        overrides = parse_params(args.param, pipeline_inputs(args.package))
    elif args.param:
        raise ParameterError(
            "--param needs --package or --pipeline retraining (the built training pipeline takes the "
            "demo's arguments)"
        )
    run = run_local(args.workdir, settings, package=args.package, overrides=overrides)
    print(summary(run, args.workdir.resolve() / "s3"))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    return run_command(f"python -m pipelines {args.command}", lambda: _run(args), args.debug)


def _run(args: argparse.Namespace) -> int:
    if args.command == "compile":
        choice = args.pipeline or ("all" if args.output is None else "training")
        names = sorted(PIPELINES) if choice == "all" else [choice]
        if args.output is not None and len(names) > 1:
            raise ParameterError("--output takes one pipeline: --pipeline training or retraining")
        for name in names:
            module = PIPELINES[name]
            output = args.output or module.COMPILED
            try:
                path = module.compile_pipeline(output, compile_options(args))
            except OSError as e:
                raise ParameterError(f"--output {output}: cannot write it: {e}") from e
            print(f"wrote {path}")
        return 0
    if args.command == "run-local":
        return _run_local(args)

    from pipelines.submit import Connection, prepare, schedule, submit

    if args.command == "schedule":
        kfp_cron(args.cron)  # before anything else, so a bad schedule costs nothing
    with tempfile.TemporaryDirectory(prefix="cascade-rcnn-pipeline-") as tmp:
        package = _package(args, tmp)
        params = prepare(
            package, args.param, pipeline_root=args.pipeline_root, check_bucket=args.check_bucket
        )
        conn = Connection(args.endpoint, args.namespace, args.ui_endpoint)
        if args.command == "submit":
            url = submit(
                package,
                params,
                conn,
                experiment=args.experiment,
                run_name=args.run_name,
                pipeline_root=args.pipeline_root,
                enable_caching=False if args.no_cache else None,
                service_account=args.service_account,
            )
            print(f"run: {url}")
        else:
            job_id = schedule(
                package,
                params,
                conn,
                args.cron,
                name=args.name,
                experiment=args.experiment,
                pipeline_root=args.pipeline_root,
                service_account=args.service_account,
            )
            print(f"recurring run: {job_id} (cron {args.cron!r} -> KFP {kfp_cron(args.cron)!r})")
        return 0
