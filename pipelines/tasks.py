"""How both pipelines configure their tasks: the compile options, the S3 Secret, caching, the
training steps' accelerators, placement and retries, and `ModelRun`, what every step that runs the
model shares.

Supported KFP backends: 2.14.0 and later (docs/cluster.md). The package uses only what those
backends do as kfp.local does; tests/test_backend_conformance.py derives the minimum version from the
compiled YAML and checks these rules, each read in kubeflow/pipelines backend/src/v2:

- Resource placeholders: the driver (driver.go `initPodSpecPatch`, resolve.go
  `resolvePodSpecInputRuntimeParameter`) reads a placeholder's parameter with GetStringValue(), so a
  NUMBER parameter resolves to "" and the accelerator limit is dropped without a word. Every value
  that feeds a resource field is therefore a STRING run parameter (`accelerator_type`,
  `accelerator_count`).
- dsl.OneOf: a DAG output of artifacts with several selectors resolves to the last selector before
  2.17.0 (resolve.go `GetProducerTask`; PR 13437), whichever branch ran. A OneOf of parameters takes
  the branch whose DAG is COMPLETE or CACHED since 2.4.0 (PR 11196). The in-pod and TrainJob
  branches of a training step therefore merge the checkpoint's URI (a string), not the Model.
- Retries of tasks inside condition DAGs (the training steps sit in `nodes == 1` branches) and
  display names that differ from task keys: 2.14.0 (PRs 11861, 11938). These set the floor.
- The S3 Secret: kfp-kubernetes 2.17 writes `optional` into every secretAsEnv, a field of
  SecretAsEnv only since 2.15.0 (PR 12216); 2.14's API server and compiler parse the platform spec
  with strict protojson (template/v2_template.go, argocompiler/container.go) and reject the run. The
  Secret is mounted as a volume instead (SecretAsVolume has had `optional` since 2.3.0 and a name
  from a parameter since 2.5.0), and cascade_rcnn.storage.secret_files turns its files into the
  AWS_* variables, the optional keys (endpoint, region) only when present.
- Caching: the backend fingerprints a task's inputs, not the object store it reads. Every step here
  reads or writes the store (a data set that changed under the same source, the registry's
  champion), so caching is off for all of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

from kfp import dsl, kubernetes

# Environment variables the steps read from the S3 Secret. The credentials must be in it; endpoint
# and region may be left out (then boto3's defaults, i.e. AWS itself, apply).
REQUIRED_SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
OPTIONAL_SECRET_ENV = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
# Where each step sees the whole Secret as files (its optional keys are read from here).
SECRET_MOUNT = "/var/run/secrets/cascade-rcnn/s3"
SECRET_FILES_ENV = "CASCADE_RCNN_ENV_FROM_FILES"  # read by cascade_rcnn.storage.secret_files


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
    on the accelerator image. accelerator=False (`--no-accelerator`, clusters without NPUs) trains on
    the CPU image, requests no devices, and makes `device` default to cpu."""

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

    @property
    def default_device(self) -> str:
        return "auto" if self.accelerator else "cpu"

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


def configure(
    task: dsl.PipelineTask, secret: Any, opts: CompileOptions, display_name: str
) -> dsl.PipelineTask:
    """What every task gets: its display name, no caching, and the S3 Secret, mounted as files that
    cascade_rcnn.storage.secret_files turns into the AWS_* variables."""
    task.set_display_name(display_name)
    task.set_caching_options(enable_caching=False)
    kubernetes.use_secret_as_volume(task, secret_name=secret, mount_path=SECRET_MOUNT)
    files = {
        kind: {e: f"{SECRET_MOUNT}/{opts.secret_keys[e]}" for e in names if e in opts.secret_keys}
        for kind, names in (("required", REQUIRED_SECRET_ENV), ("optional", OPTIONAL_SECRET_ENV))
    }
    task.set_env_variable(SECRET_FILES_ENV, json.dumps(files, sort_keys=True))
    return task


def _shm(task: dsl.PipelineTask, size: str) -> None:
    # DataLoader workers hand batches over in shared memory; a container's /dev/shm is 64 MiB.
    kubernetes.empty_dir_mount(
        task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=size
    )


def _timeout_and_retries(task: dsl.PipelineTask, opts: CompileOptions) -> None:
    kubernetes.set_timeout(task, opts.train_timeout_s)
    if opts.train_retries > 0:
        # A retry resumes from the output prefix's last checkpoint (the prefix is the run's, not the pod's).
        task.set_retry(
            num_retries=opts.train_retries,
            backoff_duration="60s",
            backoff_factor=2.0,
            backoff_max_duration="3600s",
        )


@dataclass(frozen=True)
class ModelRun:
    """What every step that runs the model receives, built once per pipeline from its parameters: the
    data set, the config file and overrides, the static canvases, device and AMP, the run's output
    prefix (root, run_id, the KFP job's id) and the S3 Secret. `task` hands all of it to a step, so a
    new step cannot forget one (the components take them under these names, and
    cascade_rcnn.step_options.StepOptions turns them into config overrides)."""

    dataset: Any
    config: Any
    config_opts: Any
    static_canvas: Any
    device: Any
    amp: Any
    root: Any
    run_id: Any
    s3_secret: Any
    opts: CompileOptions
    job_id: str = dsl.PIPELINE_JOB_ID_PLACEHOLDER

    def inputs(self) -> dict:
        return dict(
            dataset=self.dataset,
            config=self.config,
            config_opts=self.config_opts,
            static_canvas=self.static_canvas,
            device=self.device,
            amp=self.amp,
            root=self.root,
            run_id=self.run_id,
            job_id=self.job_id,
        )

    def task(self, op, display_name: str, *, shm: str = "8Gi", **args) -> dsl.PipelineTask:
        """A CPU step that runs the model (evaluate, promote)."""
        task = configure(op(**self.inputs(), **args), self.s3_secret, self.opts, display_name)
        _shm(task, shm)
        return task

    def training_step(
        self,
        op,
        launcher_op,
        name: str,
        display_name: str,
        *,
        nodes: Any,
        trainjob: str,
        accelerator_type: Any,
        accelerator_count: Any,
        after: Optional[dsl.PipelineTask] = None,
        **args,
    ):
        """A train or finetune step: in the step's pod on accelerator_count accelerators when
        nodes == 1, else launcher_op (the same component on the CPU image) runs it as a TrainJob of
        `nodes` nodes. Returns the final checkpoint's URI from whichever branch ran (a dsl.OneOf of
        parameters)."""
        args = dict(
            **self.inputs(),
            **args,
            # One process per accelerator. (Not named accelerator_count: kfp adds task inputs named
            # after the resource fields set from parameters, which would overwrite it.)
            nproc_per_node=accelerator_count,
            # The resource the pod requests, which the step then insists on finding; passing it also
            # makes kfp hand the parameter to the condition's DAG, which the placeholder needs.
            accelerator=accelerator_type if self.opts.accelerator else "",
        )
        with dsl.If(nodes == 1, name=f"{name}-in-pod"):
            task = configure(op(**args), self.s3_secret, self.opts, display_name)
            if self.opts.accelerator:
                task.set_accelerator_type(accelerator_type).set_accelerator_limit(accelerator_count)
                for key, value in self.opts.node_selector.items():
                    kubernetes.add_node_selector(task, label_key=key, label_value=value)
                for key in self.opts.tolerations:
                    kubernetes.add_toleration(task, key=key, operator="Exists", effect="NoSchedule")
            task.set_cpu_request(self.opts.cpu_request)
            task.set_memory_request(self.opts.memory_request).set_memory_limit(self.opts.memory_limit)
            _shm(task, self.opts.shm_size)
            _timeout_and_retries(task, self.opts)
        with dsl.Else(name=f"{name}-on-nodes"):
            launcher = launcher_op(**args, nodes=nodes, trainjob=trainjob, s3_secret=self.s3_secret)
            configure(launcher, self.s3_secret, self.opts, f"{display_name} (TrainJob)")
            # The launcher only watches the job: the CPU image, CPU resources, the step's timeout and
            # retries (a retry deletes the leftover job and resumes).
            launcher.set_cpu_request(self.opts.launcher_cpu_request)
            launcher.set_memory_request(self.opts.launcher_memory_request)
            launcher.set_memory_limit(self.opts.launcher_memory_limit)
            _timeout_and_retries(launcher, self.opts)
        if after is not None:
            task.after(after)
            launcher.after(after)
        return dsl.OneOf(task.outputs["Output"], launcher.outputs["Output"])


# With nodes > 1 these run instead of train and finetune (TrainJob launchers).
LAUNCHER_STEPS = {"train": "train-trainjob", "finetune": "finetune-trainjob"}


def _renamed(component, name: str):
    component.component_spec.name = name
    component.name = name
    return component


def training_ops(opts: CompileOptions) -> tuple:
    """(train, train launcher, finetune, finetune launcher) components: for nodes > 1 the same
    components run as TrainJob launchers on the CPU image, under their own names."""
    from components import finetune, train

    return (
        train.build(opts.train_image),
        _renamed(train.build(opts.cpu_image), LAUNCHER_STEPS["train"]),
        finetune.build(opts.train_image),
        _renamed(finetune.build(opts.cpu_image), LAUNCHER_STEPS["finetune"]),
    )
