"""`python -m pipelines run-local`: the whole training pipeline (`run_local`) or the retraining
pipeline (`run_retrain_local`, what `make demo` runs) on this machine, before it ever reaches a
cluster.

kfp.local's SubprocessRunner runs the same component functions the cluster runs, one after another,
in this Python environment (use_venv=False), on the CPU. Object storage is a SeaweedFS started here
on 127.0.0.1; the data is a generated shapes data set (train and val) plus a second one, stored in
the bucket, for the finetune step; the "pretrained" weights are this run's own random
initialisation saved to a local file (no download), which fetch_weights verifies and stores like any
other source. The model is Cascade Mask R-CNN R50-FPN with narrow layers and small inputs
(DEMO_OPTS), so every step finishes in seconds to a minute on two cores.

Two ways to get the pipeline:
- `package=None`: built from pipelines.training now, with local choices for what the cluster recipe
  would make slow here (one CPU process, no AMP, no retries): `pipeline_arguments`;
- `package=PATH`: a compiled YAML (the file users submit), loaded with
  kfp.components.load_component_from_file and run with its own defaults except what must shrink for a
  CPU and what only a cluster has (`package_arguments`). Its `detectron2://` weights default is served
  by a local mirror of detectron2's download site (CASCADE_RCNN_D2_BASE_URL) holding the random
  initialisation, and the steps run from the repository root, as they run from the image's WORKDIR
  (/opt/cascade-rcnn, which holds configs/), so the relative `config` default resolves.
"""

import contextlib
import functools
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from pipelines import retraining
from pipelines.tasks import CompileOptions
from pipelines.training import build_pipeline

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "Misc" / "cascade_mask_rcnn_R_50_FPN_1x.yaml"
BUCKET = "cascade-rcnn-demo"
# The detectron2 parity fixture's narrow R50-FPN (1/4 of the widths) on small images, with fewer
# proposals and ROI samples. From a random initialisation it needs trainable BN in every stage and
# gradient clipping; with frozen random stages it diverges within a few iterations.
DEMO_OPTS = [
    "MODEL.RESNETS.STEM_OUT_CHANNELS", "16",
    "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "MODEL.RESNETS.WIDTH_PER_GROUP", "16",
    "MODEL.RESNETS.NORM", "BN",
    "MODEL.BACKBONE.FREEZE_AT", "0",
    "MODEL.FPN.OUT_CHANNELS", "64",
    "MODEL.ROI_HEADS.NUM_CLASSES", "3",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64",
    "MODEL.ROI_BOX_HEAD.FC_DIM", "256",
    "MODEL.ROI_MASK_HEAD.CONV_DIM", "64",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "500",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "200",
    "MODEL.RPN.PRE_NMS_TOPK_TEST", "300",
    "MODEL.RPN.POST_NMS_TOPK_TEST", "100",
    "INPUT.MIN_SIZE_TRAIN", "(128,)",
    "INPUT.MAX_SIZE_TRAIN", "192",
    "INPUT.MIN_SIZE_TEST", "128",
    "INPUT.MAX_SIZE_TEST", "192",
    "DATALOADER.NUM_WORKERS", "0",
    "SOLVER.CLIP_GRADIENTS.ENABLED", "True",
    "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "full_model",
    "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "5.0",
    "SOLVER.CHECKPOINT_PERIOD", "100",
    "SEED", "3",
]  # fmt: skip


@dataclass
class LocalSettings:
    """Sizes of a local run; the defaults are the demo's (a few minutes on two cores)."""

    iterations: int = 240
    finetune_iterations: int = 40
    train_images: int = 48
    val_images: int = 12
    finetune_images: int = 16
    batch: int = 4
    learning_rate: float = 0.02
    finetune_learning_rate: float = 0.01
    min_size: int = 128
    max_size: int = 192
    # TEST.EVAL_PERIOD of the training steps: AP at iterations 80, 160 and 240 on the training curves
    # (a few seconds each here); the final one also comes after a shorter fine-tuning. 0: none.
    eval_period: int = 80


# Copies of the steps' HTML and Markdown outputs in the work directory, with extensions so that they
# open in a browser: {file name: (task name prefix, output name)}. KFP names artifact files after
# the outputs; the retraining pipeline's tasks inside conditions get numbered names (evaluate-2).
PAGES = {
    "training_curves.html": ("train", "curves"),
    "finetune_curves.html": ("finetune", "curves"),
    "report.html": ("evaluate", "report"),
    "report.md": ("evaluate", "table"),
}


def copy_pages(outputs: dict[str, dict[str, dict]], workdir: Path, pages: dict[str, tuple[str, str]]) -> dict:
    """Copy each page whose step ran (the first task of that name) into workdir; {file: path}."""
    copied = {}
    for file, (task_prefix, output) in pages.items():
        task = next((t for t in sorted(outputs) if t.startswith(task_prefix) and output in outputs[t]), None)
        if task is not None:
            shutil.copyfile(outputs[task][output]["uri"], workdir / file)
            copied[file] = str(workdir / file)
    return copied


@dataclass
class LocalRun:
    """What a local run left: the S3 root, the work directory (with report.html, report.md and the
    training curves of train and finetune, training_curves.html and finetune_curves.html),
    kfp.local's folder of this run, and each step's output artifacts ({task: {output name: {"uri": local path, "metadata": {...}}}})."""

    root: str
    workdir: Path
    run_dir: Path
    outputs: dict[str, dict[str, dict]] = field(default_factory=dict)
    seconds: float = 0.0
    arguments: dict[str, Any] = field(default_factory=dict)  # the run arguments given to the pipeline

    def metadata(self, task: str, output: str) -> dict:
        return self.outputs[task][output]["metadata"]

    def local_path(self, task: str, output: str) -> Path:
        return Path(self.outputs[task][output]["uri"])


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables (inherited by kfp.local's subprocesses) and restore them after."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[None]:
    """chdir to `path` (kfp.local's subprocesses inherit it) and back after."""
    saved = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(saved)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def http_mirror(directory: Path) -> Iterator[str]:
    """Serve `directory` over HTTP on 127.0.0.1 (a thread of this process); yields the base URL."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(directory)))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def local_options() -> CompileOptions:
    """The demo's compile options: a CPU cluster's (`--no-accelerator`: no device requested, device cpu),
    and no retries (kfp.local honours them, with minutes of backoff: a local failure should show at
    once)."""
    return CompileOptions(accelerator=False, train_retries=0)


def demo_opts(settings: LocalSettings) -> list[str]:
    warmup = max(1, min(50, settings.iterations // 4))
    return [*DEMO_OPTS, "SOLVER.WARMUP_ITERS", str(warmup), "TEST.EVAL_PERIOD", str(settings.eval_period)]


def write_seed_weights(path: Path, opts: list[str]) -> str:
    """A randomly initialised model of the demo config saved as our checkpoint; returns its sha256."""
    import torch

    from cascade_rcnn import storage
    from cascade_rcnn.checkpoint import save_checkpoint
    from cascade_rcnn.config import load_config
    from cascade_rcnn.modeling import build_model

    torch.manual_seed(0)
    cfg = load_config(str(DEMO_CONFIG), opts)
    model = build_model(cfg)
    save_checkpoint(str(path), model.state_dict(), {"source": "random initialisation (run-local)"})
    return storage.sha256_file(path)


def _init_kfp_local(workdir: Path) -> None:
    import kfp.local

    kfp.local.init(
        runner=kfp.local.SubprocessRunner(use_venv=False),
        pipeline_root=str(workdir / "kfp"),
        workspace_root=str(workdir / "workspace"),
        raise_on_error=True,
    )


def _read_outputs(run_dir: Path) -> dict[str, dict[str, dict]]:
    outputs: dict[str, dict[str, dict]] = {}
    for executor_output in sorted(run_dir.glob("*/executor_output.json")):
        data = json.loads(executor_output.read_text())
        arts = {}
        for name, entry in data.get("artifacts", {}).items():
            first = entry["artifacts"][0]
            arts[name] = {"uri": first.get("uri", ""), "metadata": first.get("metadata", {})}
        outputs[executor_output.parent.name] = arts
    return outputs


def _demo_arguments(
    root: str, data_dir: Path, weights: Path, weights_sha256: str, settings: LocalSettings
) -> dict[str, Any]:
    """What the training and retraining pipelines take alike here: the demo's data, model and sizes."""
    return {
        "root": root,
        "data_source": str(data_dir),
        "dataset_name": "shapes",
        "weights": str(weights),
        "weights_sha256": weights_sha256,
        "config": str(DEMO_CONFIG),
        "config_opts": demo_opts(settings),
        "iterations": settings.iterations,
        "learning_rate": settings.learning_rate,
        "batch_per_device": settings.batch,
        "accelerator_count": "1",  # one trainer process
        # The pipeline is compiled for CPUs (local_options: no accelerator requested, device cpu);
        # amp keeps its default, True, which on a CPU means float32.
    }


def pipeline_arguments(
    root: str, data_dir: Path, weights: Path, weights_sha256: str, finetune_data: str, settings: LocalSettings
) -> dict[str, Any]:
    return {
        **_demo_arguments(root, data_dir, weights, weights_sha256, settings),
        "finetune": True,
        "finetune_data": finetune_data,
        "finetune_iterations": settings.finetune_iterations,
        "finetune_learning_rate": settings.finetune_learning_rate,
        "finetune_opts": ["SOLVER.WARMUP_ITERS", str(max(1, settings.finetune_iterations // 4))],
    }


def package_arguments(
    root: str, data_dir: Path, finetune_data: str, settings: LocalSettings
) -> dict[str, Any]:
    """The arguments a compiled package gets here: only what must shrink for a CPU (the data, model
    widths and image sizes in config_opts, iterations, batch and the demo's learning rates for its
    small batches: the default 0.2 is for 128 images per step), `finetune` on, so that step runs
    too, and device cpu: the training steps requested accelerators, and with device auto a step that
    finds none fails at once. Everything else keeps the package's default: amp, accelerator type and
    count (8 trainer processes), weights, config, names, splits, run_id, s3_secret."""
    return {
        "root": root,
        "device": "cpu",
        "data_source": str(data_dir),
        "config_opts": demo_opts(settings),
        "iterations": settings.iterations,
        "learning_rate": settings.learning_rate,
        "batch_per_device": settings.batch,
        "finetune": True,
        "finetune_data": finetune_data,
        "finetune_iterations": settings.finetune_iterations,
        "finetune_learning_rate": settings.finetune_learning_rate,
        "finetune_opts": ["SOLVER.WARMUP_ITERS", str(max(1, settings.finetune_iterations // 4))],
    }


D2_SCHEME = "detectron2://"


def run_local(
    workdir: Path,
    settings: Optional[LocalSettings] = None,
    server: Any = None,
    bucket: str = BUCKET,
    package: Union[str, Path, None] = None,
    overrides: Optional[dict[str, Any]] = None,
) -> LocalRun:
    """Run the pipeline under `workdir` (its data/, kfp/ and s3/ are replaced), with everything it
    stores under s3://<bucket>/.

    server: a running cascade_rcnn.local_s3.SeaweedServer to use (the bucket must not exist yet);
    without one, a SeaweedFS is started for the run and stopped after it.
    package: a compiled pipeline YAML to run with its defaults (see the module's docstring); without
    one, the pipeline is built from pipelines.training with local choices.
    overrides: run arguments set on top of either (e.g. accelerator_count for a package).
    """
    import kfp.components
    import kfp.local

    from cascade_rcnn import storage
    from cascade_rcnn.data.shapes import make_shapes
    from cascade_rcnn.local_s3 import start_seaweedfs
    from pipelines.params import pipeline_inputs

    settings = settings or LocalSettings()
    workdir = Path(workdir).resolve()
    for sub in ("data", "finetune-data", "kfp", "s3", "workspace", "weights", "mirror"):
        shutil.rmtree(workdir / sub, ignore_errors=True)
    for name in PAGES:
        (workdir / name).unlink(missing_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()

    data_dir = workdir / "data"
    sizes = dict(min_size=settings.min_size, max_size=settings.max_size)
    make_shapes(str(data_dir), num_train=settings.train_images, num_val=settings.val_images, seed=0, **sizes)
    ft_dir = workdir / "finetune-data"
    make_shapes(str(ft_dir), num_train=settings.finetune_images, num_val=1, seed=1, **sizes)
    opts = demo_opts(settings)
    weights = workdir / "weights" / "random-init.pth"
    weights_sha256 = write_seed_weights(weights, opts)

    mirrored = None  # the package's detectron2:// weights default, served from workdir/mirror
    if package is not None:
        package = Path(package).resolve()
        default_weights = str(pipeline_inputs(package).get("weights", {}).get("defaultValue", ""))
        if default_weights.startswith(D2_SCHEME) and "weights" not in (overrides or {}):
            mirrored = workdir / "mirror" / default_weights[len(D2_SCHEME) :].lstrip("/")
            mirrored.parent.mkdir(parents=True)
            shutil.copyfile(weights, mirrored)

    own_server = server is None
    if own_server:
        # Default keys and kept data, so `python -m cascade_rcnn.local_s3 --data <workdir>/s3` serves
        # the run's bucket again afterwards.
        server = start_seaweedfs(workdir / "s3", remove_data=False)
    try:
        with contextlib.ExitStack() as stack:
            env = dict(server.env())
            if mirrored is not None:
                env["CASCADE_RCNN_D2_BASE_URL"] = stack.enter_context(http_mirror(workdir / "mirror"))
            stack.enter_context(environment(env))
            server.client().create_bucket(Bucket=bucket)
            root = f"s3://{bucket}/cascade-rcnn"
            finetune_data = f"s3://{bucket}/finetune-data"
            storage.upload_tree(str(ft_dir), finetune_data, progress=False)
            _init_kfp_local(workdir)
            if package is None:
                pipeline = build_pipeline(local_options())
                arguments = pipeline_arguments(
                    root, data_dir, weights, weights_sha256, finetune_data, settings
                )
            else:
                pipeline = kfp.components.load_component_from_file(str(package))
                arguments = package_arguments(root, data_dir, finetune_data, settings)
                if mirrored is None and "weights" not in (overrides or {}):
                    arguments.update(weights=str(weights), weights_sha256=weights_sha256)
                # The image's WORKDIR holds configs/ as the repository does: relative configs resolve alike.
                stack.enter_context(working_directory(REPO))
            arguments.update(overrides or {})
            log.info("running %s locally under %s", pipeline.name, workdir)
            pipeline(**arguments)
            (run_dir,) = [p for p in (workdir / "kfp").iterdir() if p.is_dir() and not p.name.startswith(".")]
            run = LocalRun(root, workdir, run_dir, _read_outputs(run_dir), arguments=arguments)
            copy_pages(run.outputs, workdir, PAGES)
            # Read while the server is up: the caller may print them after it is gone.
            eval_uri = run.metadata("evaluate", "metrics")["output_uri"]
            run.outputs["evaluate"]["metrics"]["metrics_json"] = json.loads(
                storage.get_bytes(storage.join(eval_uri, "metrics.json"))
            )
    finally:
        if own_server:
            server.close()
    run.seconds = time.monotonic() - start
    return run


def summary(run: LocalRun, s3_data: Optional[Path] = None) -> str:
    """The metrics table and where the reports are."""
    from cascade_rcnn.evaluation import format_table

    metrics = run.outputs["evaluate"]["metrics"]["metrics_json"]
    eval_uri = run.metadata("evaluate", "metrics")["output_uri"]
    lines = [
        f"local pipeline run finished in {run.seconds / 60:.1f} min",
        "",
        format_table(metrics),
        "",
        f"HTML report: {run.workdir / 'report.html'}",
        f"Markdown table: {run.workdir / 'report.md'}",
        f"training curves: {run.workdir / 'training_curves.html'} and {run.workdir / 'finetune_curves.html'}",
        f"kfp.local's outputs of each step: {run.run_dir}",
        f"evaluation files: {eval_uri}/",
        f"trained model: {run.metadata('train', 'model')['checkpoint_uri']}",
        f"fine-tuned model: {run.metadata('finetune', 'model')['checkpoint_uri']}",
    ]
    if s3_data is not None:
        lines.append(f"(serve the bucket again: python -m cascade_rcnn.local_s3 --data {s3_data})")
    return "\n".join(lines)


SUMMARY_JSON = "summary.json"
# The retraining run's pages: the challenger's training curves (warm start or from pretrained), its
# evaluation and the comparison with the champion.
RETRAIN_PAGES = {
    "training_curves.html": ("", "curves"),
    "report.html": ("evaluate", "report"),
    "report.md": ("evaluate", "table"),
    "comparison.html": ("promote", "report"),
    "comparison.md": ("promote", "comparison"),
}


def retrain_arguments(
    root: str, data_dir: Path, weights: Path, weights_sha256: str, settings: LocalSettings
) -> dict:
    """The retraining pipeline's arguments here; the promotion rule, warm start and force keep the
    pipeline's defaults."""
    return {
        **_demo_arguments(root, data_dir, weights, weights_sha256, settings),
        "model_name": "shapes-demo",
        "warm_start_iterations": settings.finetune_iterations,
        "warm_start_learning_rate": settings.finetune_learning_rate,
    }


def run_retrain_local(
    workdir: Path,
    settings: Optional[LocalSettings] = None,
    server: Any = None,
    bucket: str = BUCKET,
    overrides: Optional[dict[str, Any]] = None,
) -> dict:
    """One run of the retraining pipeline under `workdir`, keeping what a schedule keeps between runs:
    the generated data (workdir/data, made once), the bucket (workdir/s3, or `server`'s) and with it
    the model registry. A first run trains and promotes; a second on the same workdir finds the data
    unchanged and skips. Writes and returns workdir/summary.json: trained, promoted, decision, reason,
    champion (the registry's record), history (every decision so far) and where the reports are.

    server: a running SeaweedServer to use instead of one on workdir/s3 (the bucket is created when
    missing). overrides: run arguments on top (e.g. force, data_source)."""

    from cascade_rcnn import registry
    from cascade_rcnn.data.shapes import make_shapes
    from cascade_rcnn.local_s3 import start_seaweedfs

    settings = settings or LocalSettings()
    workdir = Path(workdir).resolve()
    for sub in ("kfp", "workspace"):
        shutil.rmtree(workdir / sub, ignore_errors=True)
    for name in (*RETRAIN_PAGES, SUMMARY_JSON):
        (workdir / name).unlink(missing_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    data_dir = workdir / "data"
    if not (data_dir / "annotations").is_dir():
        sizes = dict(min_size=settings.min_size, max_size=settings.max_size)
        make_shapes(
            str(data_dir), num_train=settings.train_images, num_val=settings.val_images, seed=0, **sizes
        )
    opts = demo_opts(settings)
    weights = workdir / "weights" / "random-init.pth"
    weights_sha256 = write_seed_weights(weights, opts)  # seeded: the same bytes every run

    own_server = server is None
    if own_server:
        server = start_seaweedfs(workdir / "s3", remove_data=False)
    try:
        with environment(dict(server.env())):
            client = server.client()
            if bucket not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
                client.create_bucket(Bucket=bucket)
            root = f"s3://{bucket}/cascade-rcnn"
            _init_kfp_local(workdir)
            arguments = retrain_arguments(root, data_dir, weights, weights_sha256, settings)
            arguments.update(overrides or {})
            pipeline = retraining.build_pipeline(local_options())
            log.info("running %s locally under %s", pipeline.name, workdir)
            pipeline(**arguments)
            (run_dir,) = [p for p in (workdir / "kfp").iterdir() if p.is_dir() and not p.name.startswith(".")]
            outputs = _read_outputs(run_dir)
            parameters = _read_parameters(run_dir)
            model_name = arguments["model_name"]
            champion, _ = registry.read_champion(root, model_name)
            history = registry.read_history(root, model_name)
    finally:
        if own_server:
            server.close()

    plan = parameters.get("check-new-data", {}).get("Output", "skip")
    # The promote task of whichever branch ran (kfp numbers same-named tasks: promote, promote-2).
    promote = next((t for t in sorted(parameters) if t.startswith("promote")), None)
    decision = parameters[promote]["Output"] if promote else "skipped"
    latest = history[-1] if history else {}
    summary = {
        "trained": plan != "skip",
        "plan": plan,
        "promoted": decision == "promoted",
        "decision": decision,
        "reason": latest.get("reason", ""),
        "champion": champion.to_json() if champion else None,
        "history": [{k: h.get(k) for k in ("time", "run_id", "decision", "reason", "uri")} for h in history],
        "steps": sorted(parameters),  # the tasks that ran
        "root": root,
        "kfp_run": str(run_dir),
        "seconds": round(time.monotonic() - start, 1),
    }
    summary["pages"] = copy_pages(outputs, workdir, RETRAIN_PAGES)
    if promote:
        summary["comparison"] = str(workdir / "comparison.md")
    (workdir / SUMMARY_JSON).write_text(json.dumps(summary, indent=1))
    return summary


def _read_parameters(run_dir: Path) -> dict[str, dict]:
    """{task: {output parameter: value}} from kfp.local's executor outputs."""
    params: dict[str, dict] = {}
    for executor_output in sorted(run_dir.glob("*/executor_output.json")):
        data = json.loads(executor_output.read_text())
        params[executor_output.parent.name] = dict(data.get("parameterValues", {}))
    return params


def retrain_summary(summary: dict, workdir: Path) -> str:
    champion = summary["champion"] or {}
    lines = [
        f"retraining run finished in {summary['seconds'] / 60:.1f} min: "
        f"{'trained' if summary['trained'] else 'did not train'}, {summary['decision']}",
        f"reason: {summary['reason']}",
        f"champion: {champion.get('checkpoint_uri', 'none')} (run {champion.get('run_id', '-')})",
        f"decisions so far: {', '.join(h['decision'] for h in summary['history']) or 'none'}",
        f"summary: {workdir / SUMMARY_JSON}",
    ]
    if "comparison" in summary:
        lines.append(f"comparison: {workdir / 'comparison.html'} and {summary['comparison']}")
    pages = summary.get("pages", {})
    for file, label in (("training_curves.html", "training curves"), ("report.html", "evaluation report")):
        if file in pages:
            lines.append(f"{label}: {pages[file]}")
    return "\n".join(lines)
