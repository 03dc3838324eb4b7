"""The pipeline `cascade-mask-rcnn-training`: ingest_coco -> fetch_weights -> train -> evaluate ->
finetune (behind the `finetune` switch).

Two kinds of settings:
- pipeline parameters (chosen per run, listed in `build_pipeline`): data, root, config, schedule,
  accelerator type and count, ...; their defaults reproduce the 8-NPU reference recipe
  (16 images per NPU = 128 per step, base LR 0.2, 22500 iterations, LR steps at 15000 and 20000,
  AMP);
- compile options (`CompileOptions`: fixed in the compiled YAML): images, node selector,
  toleration, /dev/shm size, timeout, retries, termination grace period, CPU/memory, the S3 Secret's
  key names. kfp-kubernetes
  takes only constants for the emptyDir and the timeout; the others describe the cluster rather than a
  run, so they sit with them.

The accelerator type and count are run parameters: kfp >= 2.10 compiles them as placeholders that
the KFP backend (2.4 and later) resolves when it creates the pod.

`nodes` (run parameter, default 1) picks one of two tasks per training step: nodes == 1 trains in
the step's pod on the accelerator image, as always; nodes > 1 runs the same component on the CPU
image as a launcher of a Kubeflow Trainer TrainJob (cascade_rcnn.engine.trainjob) of `nodes` nodes
with the accelerator image, the accelerators, CPU/memory, S3 Secret, /dev/shm and placement below
(`CompileOptions.trainjob_settings`). Evaluate and finetune take whichever ran (dsl.OneOf).
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from kfp import compiler, dsl, kubernetes

from components import evaluate, fetch_weights, finetune, ingest_coco, train

PIPELINE_NAME = "cascade-mask-rcnn-training"
COMPILED = Path(__file__).resolve().parent / "compiled" / "cascade_mask_rcnn_training.yaml"
DEFAULT_CONFIG = "configs/Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml"
DEFAULT_WEIGHTS = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
STEP_NAMES = ("ingest-coco", "fetch-weights", "train", "evaluate", "finetune")
# With nodes > 1 these run instead of train and finetune (TrainJob launchers).
LAUNCHER_STEPS = {"train": "train-trainjob", "finetune": "finetune-trainjob"}
# Environment variables the steps read from the S3 Secret. The credentials must be in it; endpoint
# and region may be left out (then boto3's defaults, i.e. AWS itself, apply).
REQUIRED_SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
OPTIONAL_SECRET_ENV = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")


def package_version() -> str:
    """The package version, which images/build.sh uses as the default image tag."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cascade-rcnn")
    except PackageNotFoundError:
        return "latest"


@dataclass(frozen=True)
class CompileOptions:
    """What the compiled YAML fixes. Images are `<registry>/cascade-rcnn-<cpu|ascend>:<tag>`, as
    images/build.sh names them; ingest, weights and evaluate run on the CPU image, train and finetune
    on the accelerator image (the CPU image too with accelerator=False, for clusters without NPUs)."""

    registry: str = "localhost"
    tag: str = field(default_factory=package_version)
    accelerator: bool = True
    accelerator_image: str = "ascend"
    node_selector: dict[str, str] = field(default_factory=lambda: {"accelerator": "huawei-Ascend910"})
    tolerations: tuple[str, ...] = ("huawei.com/Ascend910",)  # taint keys tolerated (Exists, NoSchedule)
    shm_size: str = "64Gi"
    train_timeout_s: int = 3 * 24 * 3600
    train_retries: int = 3
    # SIGTERM to SIGKILL for the training pods: one iteration and one checkpoint upload (R50-FPN
    # with momentum: 576 MB). KFP offers no way to set it on a step's pod (docs/cluster.md), so it
    # reaches the TrainJob nodes (nodes > 1) only.
    termination_grace_s: int = 300
    cpu_request: str = "32"
    memory_request: str = "128Gi"
    memory_limit: str = "256Gi"
    # env var -> key in the S3 Secret; the Secret's name is the run parameter s3_secret.
    secret_keys: dict[str, str] = field(
        default_factory=lambda: {k: k for k in (*REQUIRED_SECRET_ENV, *OPTIONAL_SECRET_ENV)}
    )
    # nodes > 1: the Trainer runtime (manifests/trainer/), how long the nodes may wait to be
    # scheduled before the step fails, and the launcher pod's own (CPU) resources.
    trainjob_runtime: str = "cascade-rcnn-torch"
    trainjob_schedule_timeout_s: int = 3600
    launcher_cpu_request: str = "500m"
    launcher_memory_request: str = "2Gi"
    launcher_memory_limit: str = "4Gi"

    def image(self, target: str) -> str:
        return f"{self.registry.rstrip('/')}/cascade-rcnn-{target}:{self.tag}"

    @property
    def cpu_image(self) -> str:
        return self.image("cpu")

    @property
    def train_image(self) -> str:
        return self.image(self.accelerator_image if self.accelerator else "cpu")

    def trainjob_settings(self) -> str:
        """The launcher's cascade_rcnn.engine.trainjob.Cluster fields fixed at compile time (JSON)."""
        settings = {
            "image": self.train_image,
            "runtime": self.trainjob_runtime,
            "cpu_request": self.cpu_request,
            "memory_request": self.memory_request,
            "memory_limit": self.memory_limit,
            "secret_env": {e: self.secret_keys[e] for e in REQUIRED_SECRET_ENV if e in self.secret_keys},
            "optional_secret_env": {
                e: self.secret_keys[e] for e in OPTIONAL_SECRET_ENV if e in self.secret_keys
            },
            "shm_size": self.shm_size,
            "schedule_timeout_s": self.trainjob_schedule_timeout_s,
            "termination_grace_s": self.termination_grace_s,
        }
        if self.accelerator:
            settings["node_selector"] = dict(self.node_selector)
            settings["tolerations"] = list(self.tolerations)
        return json.dumps(settings, sort_keys=True)


def _with_s3_secret(task: dsl.PipelineTask, secret: Any, opts: CompileOptions):
    required = {opts.secret_keys[e]: e for e in REQUIRED_SECRET_ENV if e in opts.secret_keys}
    optional = {opts.secret_keys[e]: e for e in OPTIONAL_SECRET_ENV if e in opts.secret_keys}
    kubernetes.use_secret_as_env(task, secret_name=secret, secret_key_to_env=required)
    if optional:
        kubernetes.use_secret_as_env(task, secret_name=secret, secret_key_to_env=optional, optional=True)
    return task


def _on_accelerators(task: dsl.PipelineTask, accelerator_type, accelerator_count, opts: CompileOptions):
    """Resources, placement, /dev/shm, timeout and retries of a training step."""
    if opts.accelerator:
        task.set_accelerator_type(accelerator_type).set_accelerator_limit(accelerator_count)
        for key, value in opts.node_selector.items():
            kubernetes.add_node_selector(task, label_key=key, label_value=value)
        for key in opts.tolerations:
            kubernetes.add_toleration(task, key=key, operator="Exists", effect="NoSchedule")
    task.set_cpu_request(opts.cpu_request)
    task.set_memory_request(opts.memory_request).set_memory_limit(opts.memory_limit)
    # DataLoader workers hand batches over in shared memory; a container's /dev/shm is 64 MiB.
    kubernetes.empty_dir_mount(
        task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=opts.shm_size
    )
    _timeout_and_retries(task, opts)
    return task


def _as_launcher(task: dsl.PipelineTask, opts: CompileOptions):
    """A nodes > 1 training step: the TrainJob's launcher, on the CPU image with CPU resources only,
    with the training step's timeout and retries (a retry deletes the leftover job and resumes)."""
    task.set_cpu_request(opts.launcher_cpu_request)
    task.set_memory_request(opts.launcher_memory_request).set_memory_limit(opts.launcher_memory_limit)
    _timeout_and_retries(task, opts)
    return task


def _timeout_and_retries(task: dsl.PipelineTask, opts: CompileOptions):
    kubernetes.set_timeout(task, opts.train_timeout_s)
    if opts.train_retries > 0:
        # A retry resumes from the output prefix's last checkpoint (the prefix is the run's, not the pod's).
        task.set_retry(
            num_retries=opts.train_retries,
            backoff_duration="60s",
            backoff_factor=2.0,
            backoff_max_duration="3600s",
        )
    return task


def _renamed(component, name: str):
    component.component_spec.name = name
    component.name = name
    return component


def training_ops(opts: CompileOptions) -> tuple:
    """(train, train launcher, finetune, finetune launcher) components: for nodes > 1 the same
    components run as TrainJob launchers on the CPU image, under their own names."""
    return (
        train.build(opts.train_image),
        _renamed(train.build(opts.cpu_image), LAUNCHER_STEPS["train"]),
        finetune.build(opts.train_image),
        _renamed(finetune.build(opts.cpu_image), LAUNCHER_STEPS["finetune"]),
    )


def training_step(
    op,
    launcher_op,
    args: dict,
    name: str,
    *,
    nodes: Any,
    trainjob: str,
    s3_secret: Any,
    accelerator_type: Any,
    accelerator_count: Any,
    opts: CompileOptions,
    display_name: Optional[str] = None,
    after: Optional[dsl.PipelineTask] = None,
    one_of: bool = True,
):
    """A train or finetune step as both pipelines run it: in the step's pod when nodes == 1, else
    launcher_op (the same component on the CPU image) runs it as a TrainJob of `nodes` nodes.
    Returns the step's Model, whichever branch made it (dsl.OneOf), with one_of."""
    display_name = display_name or name
    with dsl.If(nodes == 1, name=f"{name}-in-pod"):
        task = op(**args).set_display_name(display_name)
        _on_accelerators(task, accelerator_type, accelerator_count, opts)
        _with_s3_secret(task, s3_secret, opts)
    with dsl.Else(name=f"{name}-on-nodes"):
        launcher = launcher_op(**args, nodes=nodes, trainjob=trainjob, s3_secret=s3_secret)
        launcher.set_display_name(f"{display_name} (TrainJob)")
        _as_launcher(launcher, opts)
        _with_s3_secret(launcher, s3_secret, opts)
    if after is not None:
        task.after(after)
        launcher.after(after)
    return dsl.OneOf(launcher.outputs["model"], task.outputs["model"]) if one_of else None


def build_pipeline(opts: Optional[CompileOptions] = None):
    """The pipeline function (a kfp GraphComponent) for these compile options."""
    opts = opts or CompileOptions()
    ingest_op = ingest_coco.build(opts.cpu_image)
    weights_op = fetch_weights.build(opts.cpu_image)
    evaluate_op = evaluate.build(opts.cpu_image)
    train_op, train_launcher_op, finetune_op, finetune_launcher_op = training_ops(opts)
    trainjob = opts.trainjob_settings()

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="COCO ingest, pretrained weights, Cascade Mask R-CNN training on accelerators, "
        "COCO evaluation with reports, optional fine-tuning. Artifacts live under `root`.",
    )
    def cascade_mask_rcnn_training(
        root: str,
        data_source: str = "coco-official",
        dataset_name: str = "coco2017",
        splits: list = ["train2017", "val2017"],  # noqa: B006 (kfp reads the default from here)
        max_images: int = 0,
        ingest_strict: bool = False,
        weights: str = DEFAULT_WEIGHTS,
        weights_sha256: str = "",
        config: str = DEFAULT_CONFIG,
        config_opts: list = [],  # noqa: B006
        static_canvas: list = [],  # noqa: B006
        iterations: int = 22500,
        learning_rate: float = 0.2,
        batch_per_device: int = 16,
        accelerator_type: str = "huawei.com/Ascend910",
        accelerator_count: int = 8,
        nodes: int = 1,
        device: str = "auto",
        amp: bool = True,
        eval_split: str = "val2017",
        eval_max_images: int = 0,
        finetune: bool = False,
        finetune_data: str = "",
        finetune_iterations: int = 2000,
        finetune_learning_rate: float = 0.02,
        finetune_opts: list = [],  # noqa: B006
        run_id: str = "",
        s3_secret: str = "cascade-rcnn-s3",
    ):
        """root: s3://bucket/prefix for data sets, weights and runs (`<root>/runs/<run id>/`).
        run_id: empty uses the KFP run's id; reuse an id to resume a run's training in a new run.
        nodes: training nodes of accelerator_count accelerators each; more than 1 runs train and
        finetune as Kubeflow Trainer TrainJobs (docs/cluster.md).
        static_canvas: [[height, width], ...] trains and evaluates in static-shape mode on those
        canvases (MODEL.STATIC, e.g. [[800, 1344], [1344, 800]]); empty: dynamic shapes."""
        job_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER

        ingest_task = ingest_op(
            source=data_source,
            root=root,
            name=dataset_name,
            splits=splits,
            max_images=max_images,
            strict=ingest_strict,
        ).set_display_name("ingest COCO")
        _with_s3_secret(ingest_task, s3_secret, opts)

        weights_task = weights_op(source=weights, sha256=weights_sha256, root=root)
        weights_task.set_display_name("fetch weights").after(ingest_task)
        _with_s3_secret(weights_task, s3_secret, opts)

        # What train, evaluate and finetune share: the ingested data set, the config, and the run's
        # output prefix (<root>/runs/<run_id, else the KFP job's id>/).
        run_inputs = dict(
            dataset=ingest_task.outputs["dataset"], config=config, root=root, run_id=run_id, job_id=job_id
        )
        train_args = dict(
            **run_inputs,
            weights=weights_task.outputs["model"],
            iterations=iterations,
            learning_rate=learning_rate,
            batch_per_device=batch_per_device,
            # One process per accelerator. (Not named accelerator_count: kfp adds task inputs named
            # after the resource fields set from parameters, which would overwrite it.)
            nproc_per_node=accelerator_count,
            accelerator=accelerator_type,
            device=device,
            amp=amp,
            config_opts=config_opts,
            static_canvas=static_canvas,
        )
        placement = dict(
            nodes=nodes,
            trainjob=trainjob,
            s3_secret=s3_secret,
            accelerator_type=accelerator_type,
            accelerator_count=accelerator_count,
            opts=opts,
        )
        trained = training_step(train_op, train_launcher_op, train_args, "train", **placement)

        eval_task = evaluate_op(
            **run_inputs,
            model=trained,
            split=eval_split,
            max_images=eval_max_images,
            device=device,
            config_opts=config_opts,
            static_canvas=static_canvas,
        ).set_display_name("evaluate")
        kubernetes.empty_dir_mount(
            eval_task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit="8Gi"
        )
        _with_s3_secret(eval_task, s3_secret, opts)

        with dsl.If(finetune == True, name="finetune-enabled"):  # noqa: E712 (builds a kfp condition)
            finetune_args = dict(
                **run_inputs,
                base_model=trained,
                data=finetune_data,
                iterations=finetune_iterations,
                learning_rate=finetune_learning_rate,
                batch_per_device=batch_per_device,
                nproc_per_node=accelerator_count,
                # Recorded in the Model; passing it also makes kfp hand the parameter to the condition's
                # DAG, which the accelerator type placeholder needs (kfp does not do that on its own).
                accelerator=accelerator_type,
                device=device,
                amp=amp,
                config_opts=config_opts,
                static_canvas=static_canvas,
                finetune_opts=finetune_opts,
            )
            # Fine-tune once the trained model has been evaluated, so the steps read in order.
            training_step(
                finetune_op, finetune_launcher_op, finetune_args, "finetune", **placement,
                after=eval_task, one_of=False,
            )  # fmt: skip

    return cascade_mask_rcnn_training


def compile_pipeline(output: Union[str, Path] = COMPILED, opts: Optional[CompileOptions] = None) -> Path:
    """Compile to `output` (YAML); returns its path."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline_func=build_pipeline(opts), package_path=str(output))
    return output
