"""Training on several nodes as a Kubeflow Trainer TrainJob, created and watched through the `kubeflow`
SDK's TrainerClient (`run_trainjob`). The pipeline's train and finetune steps call it when nodes > 1;
the step's pod is then only this launcher.

What a node runs is `node_entry`: the SDK ships its source to every node, where the runtime's
torchrun starts `procs_per_node` workers that each call `launch.run_training` in place. Rank 0
writes the final record (what the step's Model carries) to `<output>/trainjob_record.json`, which
the launcher reads once the job is Complete.

Two backends, one path: on a cluster the TrainerClient's Kubernetes backend against our
ClusterTrainingRuntime (manifests/trainer/); locally its container backend, one container per node
(tests/containers/test_trainjob_multinode.py).

The SDK's CustomTrainer has no field for the process count per node, and Trainer's "auto" only
counts GPUs (with CPUs requested it starts one worker per CPU). `trainjob_manifest` builds the
TrainJob from the SDK's own pieces plus `numProcPerNode`, and the Kubernetes path creates that object
as the SDK's `train` would. Everything else (status, logs, events, delete) goes through TrainerClient.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .. import storage
from ..errors import CascadeRCNNError
from .run import TrainJob

log = logging.getLogger(__name__)

RUNTIME_NAME = "cascade-rcnn-torch"  # manifests/trainer/runtime.yaml
NODE = "node"  # the runtime's replicated job and trainer container
RECORD_NAME = "trainjob_record.json"
GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
RUN_LABEL = "cascade-rcnn.org/run"  # hash of the run key, so a retry finds its predecessor
PATCH_MANAGER = "cascade-rcnn.org/launcher"
# The Kubernetes backend writes these unquoted into a heredoc (`<< EOM`): the shell would expand them.
_SHELL_SPECIAL = re.compile(r"[$`\\]")


class TrainJobError(CascadeRCNNError, RuntimeError):
    """The TrainJob failed, could not be scheduled in time, or could not be created."""


@dataclass(frozen=True)
class Cluster:
    """Where and how the nodes run; fixed per compiled pipeline except nodes, accelerator_type,
    procs_per_node and s3_secret, which are run parameters.

    accelerator_type: the device plugin's resource name ("" for CPU-only nodes); each node asks for
    procs_per_node of it and starts that many workers.
    secret_env / optional_secret_env: env var -> key in the Secret s3_secret (the step's own S3
    environment, from the same Secret).
    env: plain environment of every node (HCCL settings, see docs/cluster.md).
    tolerations: taint keys tolerated (Exists, NoSchedule), as the single-node step has them.
    schedule_timeout_s: how long the nodes may stay unscheduled before the step fails.
    termination_grace_s: the node pods' terminationGracePeriodSeconds (0: Kubernetes' 30 s), the
    time between SIGTERM and SIGKILL in which the workers finish their iteration and upload its
    checkpoint (engine/preemption.py). torchrun's agent gets it as TORCH_ELASTIC_SHUTDOWN_TIMEOUT,
    its own SIGTERM-to-SIGKILL delay, which torch honours from pytorch/pytorch#172596 on (older
    torch, e.g. the ascend image's 2.5, keeps 30 s).
    """

    nodes: int
    image: str
    runtime: str = RUNTIME_NAME
    accelerator_type: str = ""
    procs_per_node: int = 1
    cpu_request: str = ""
    memory_request: str = ""
    memory_limit: str = ""
    s3_secret: str = ""
    secret_env: dict = field(default_factory=dict)
    optional_secret_env: dict = field(default_factory=dict)
    shm_size: str = ""
    node_selector: dict = field(default_factory=dict)
    tolerations: tuple = ()
    env: dict = field(default_factory=dict)
    schedule_timeout_s: int = 1800
    termination_grace_s: int = 0
    poll_s: float = 5.0
    namespace: Optional[str] = None

    def __post_init__(self):
        if not isinstance(self.nodes, int) or self.nodes < 1:
            raise ValueError(f"nodes={self.nodes!r} must be a positive integer")
        if not isinstance(self.procs_per_node, int) or self.procs_per_node < 1:
            raise ValueError(f"procs_per_node={self.procs_per_node!r} must be a positive integer")
        if not self.image:
            raise ValueError("Cluster.image is empty: name the image the nodes run")
        if self.schedule_timeout_s <= 0:
            raise ValueError(f"schedule_timeout_s={self.schedule_timeout_s!r} must be positive")
        if not isinstance(self.termination_grace_s, int) or self.termination_grace_s < 0:
            raise ValueError(f"termination_grace_s={self.termination_grace_s!r} must be 0 or more seconds")

    @classmethod
    def from_json(cls, text: str, **run: Any) -> Cluster:
        """The compile-time settings (JSON object of Cluster fields) with the run's values on top."""
        try:
            settings = json.loads(text) if text else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"trainjob settings are not JSON: {e}") from None
        if not isinstance(settings, dict):
            raise ValueError(f"trainjob settings must be a JSON object, got {type(settings).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"trainjob settings: unknown field(s) {unknown}; known: {sorted(known)}")
        settings.update(run)
        settings["tolerations"] = tuple(settings.get("tolerations", ()))
        return cls(**settings)


def trainjob_name(run_key: str, step: str) -> str:
    """A stable DNS-1035 name for the run's step: a retried step (same run key) gets the same one."""
    digest = hashlib.sha256(run_key.encode()).hexdigest()[:12]
    return f"cr-{re.sub(r'[^a-z0-9-]', '-', step.lower())[:20]}-{digest}"


def node_job(job: TrainJob, cluster: Cluster) -> dict:
    """The TrainJob's fields as every node gets them (plain values, shipped as source text).

    launch.run_training makes SOLVER.IMS_PER_BATCH batch_per_device x the node's workers; across
    nodes the global batch is that times the nodes, so it goes in as an override, before the
    user's opts (which still win, as on one node).
    """
    fields = dataclasses.asdict(job)
    fields["nproc_per_node"] = cluster.procs_per_node
    if job.batch_per_device is not None:
        total = int(job.batch_per_device) * cluster.procs_per_node * cluster.nodes
        fields["opts"] = ["SOLVER.IMS_PER_BATCH", str(total), *job.opts]
        fields["batch_per_device"] = None
    for key, value in fields.items():
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str) and _SHELL_SPECIAL.search(text):
                raise ValueError(
                    f"{key}={text!r}: '$', '`' and '\\' cannot be passed to TrainJob nodes "
                    "(the SDK embeds the arguments in a shell heredoc)"
                )
    return fields


def node_entry(job: dict, record_uri: str):
    # Runs on every TrainJob node, under torchrun (its source is shipped; imports stay inside).
    import json

    from cascade_rcnn import storage
    from cascade_rcnn.engine.launch import TrainJob, run_training

    record = run_training(TrainJob(**job))
    if record:
        storage.put_bytes(json.dumps(record, indent=1).encode(), record_uri)
        print("final record written to " + record_uri)


def record_uri(job: TrainJob) -> str:
    return storage.join(job.output, RECORD_NAME)


def custom_trainer(job: TrainJob, cluster: Cluster):
    """The SDK's CustomTrainer for `job`: node_entry with its arguments, image, nodes, resources, env."""
    from kubeflow.trainer import CustomTrainer

    resources = {}
    if cluster.cpu_request:
        resources["cpu"] = cluster.cpu_request
    if cluster.memory_request:
        resources["memory"] = cluster.memory_request
    if cluster.accelerator_type:
        resources[cluster.accelerator_type] = cluster.procs_per_node
    env = dict(cluster.env)
    if cluster.termination_grace_s:
        env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(cluster.termination_grace_s))
    return CustomTrainer(
        func=node_entry,
        func_args={"job": node_job(job, cluster), "record_uri": record_uri(job)},
        image=cluster.image,
        num_nodes=cluster.nodes,
        resources_per_node=resources or None,
        env=env or None,
    )


def _resources(cluster: Cluster) -> dict:
    """requests and limits per node: the accelerator in both (extended resources need that), the
    memory limit apart from its request, as the single-node step has them."""
    requests: dict = {}
    limits: dict = {}
    if cluster.cpu_request:
        requests["cpu"] = cluster.cpu_request
    if cluster.memory_request:
        requests["memory"] = cluster.memory_request
    if cluster.memory_limit:
        limits["memory"] = cluster.memory_limit
    if cluster.accelerator_type:
        # A string: the API models would write an int quantity as 8.0.
        requests[cluster.accelerator_type] = limits[cluster.accelerator_type] = str(cluster.procs_per_node)
    out = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def runtime_patch(cluster: Cluster) -> dict:
    """The node pods' S3 Secret environment, /dev/shm, node selector, tolerations and termination
    grace period, as a runtimePatches entry (Trainer >= 2.3)."""
    env = [
        {"name": var, "valueFrom": {"secretKeyRef": {"name": cluster.s3_secret, "key": key}}}
        for var, key in cluster.secret_env.items()
    ]
    env += [
        {
            "name": var,
            "valueFrom": {"secretKeyRef": {"name": cluster.s3_secret, "key": key, "optional": True}},
        }
        for var, key in cluster.optional_secret_env.items()
    ]
    container: dict = {"name": NODE}
    pod: dict = {}
    if cluster.s3_secret and env:
        container["env"] = env
    if cluster.shm_size:
        # DataLoader workers hand batches over in shared memory; a container's /dev/shm is 64 MiB.
        pod["volumes"] = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": cluster.shm_size}}]
        container["volumeMounts"] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    if cluster.node_selector:
        pod["nodeSelector"] = dict(cluster.node_selector)
    if cluster.termination_grace_s:
        pod["terminationGracePeriodSeconds"] = cluster.termination_grace_s
    if cluster.tolerations:
        pod["tolerations"] = [
            {"key": k, "operator": "Exists", "effect": "NoSchedule"} for k in cluster.tolerations
        ]
    if len(container) > 1:
        pod["containers"] = [container]
    return {
        "manager": PATCH_MANAGER,
        "trainingRuntimeSpec": {
            "template": {
                "spec": {
                    "replicatedJobs": [{"name": NODE, "template": {"spec": {"template": {"spec": pod}}}}]
                }
            }
        },
    }


def trainjob_manifest(
    name: str, job: TrainJob, cluster: Cluster, runtime, labels: Optional[dict] = None
) -> dict:
    """The TrainJob object for the Kubernetes backend. `runtime` is the SDK's Runtime (from
    TrainerClient.get_runtime, or `runtime_from_manifest`): it decides the entry command (torchrun)."""
    from kubeflow.trainer.backends.kubernetes import utils as k8s_utils
    from kubeflow_trainer_api import models

    trainer = k8s_utils.get_trainer_cr_from_custom_trainer(runtime, custom_trainer(job, cluster))
    trainer.num_proc_per_node = cluster.procs_per_node
    trainer.resources_per_node = models.IoK8sApiCoreV1ResourceRequirements.from_dict(_resources(cluster))
    spec = models.TrainerV1alpha1TrainJobSpec(
        runtimeRef=models.TrainerV1alpha1RuntimeRef(
            name=runtime.name, kind=runtime.kind.value, apiGroup="trainer.kubeflow.org"
        ),
        trainer=trainer,
        runtimePatches=[models.TrainerV1alpha1RuntimePatch.from_dict(runtime_patch(cluster))],
    )
    obj = models.TrainerV1alpha1TrainJob(
        apiVersion=f"{GROUP}/{VERSION}",
        kind="TrainJob",
        metadata=models.IoK8sApimachineryPkgApisMetaV1ObjectMeta(
            name=name, namespace=cluster.namespace, labels=labels or None
        ),
        spec=spec,
    )
    return obj.to_dict()


def runtime_from_manifest(doc: dict):
    """The SDK's Runtime for a ClusterTrainingRuntime/TrainingRuntime document, as the Kubernetes
    backend reads one from the cluster."""
    from kubeflow.trainer.backends.kubernetes import utils as k8s_utils
    from kubeflow.trainer.types import types
    from kubeflow_trainer_api import models

    model = (
        models.TrainerV1alpha1ClusterTrainingRuntime
        if doc.get("kind") == "ClusterTrainingRuntime"
        else models.TrainerV1alpha1TrainingRuntime
    ).from_dict(doc)
    return types.Runtime(
        name=model.metadata.name,
        kind=types.RuntimeKind(doc["kind"]),
        trainer=k8s_utils.get_runtime_trainer(
            model.metadata.labels["trainer.kubeflow.org/framework"],
            model.spec.template.spec.replicated_jobs,
            model.spec.ml_policy,
        ),
    )


# ---- the launcher ----


def _is_kubernetes(client) -> bool:
    from kubeflow.trainer.backends.kubernetes.backend import KubernetesBackend

    return isinstance(client.backend, KubernetesBackend)


def _exists(client, name: str) -> bool:
    try:
        client.get_job(name)
    except (ValueError, RuntimeError) as e:
        # The container backend says "No TrainJob with name"; Kubernetes a 404 under RuntimeError.
        cause = getattr(e, "__cause__", None)
        if isinstance(e, ValueError) or getattr(cause, "status", None) == 404:
            return False
        raise
    return True


def _delete_and_wait(client, name: str, poll_s: float, timeout_s: float = 600) -> None:
    client.delete_job(name)
    end = time.monotonic() + timeout_s
    while _exists(client, name):
        if time.monotonic() > end:
            raise TrainJobError(f"TrainJob {name} is still there {timeout_s:.0f} s after its deletion")
        time.sleep(poll_s)


def create(client, name: str, job: TrainJob, cluster: Cluster, labels: dict) -> None:
    """Create the TrainJob: on Kubernetes the object `trainjob_manifest` builds, elsewhere (the
    container backend) through TrainerClient.train."""
    from kubeflow.trainer.options import Name

    if not _is_kubernetes(client):
        if cluster.procs_per_node != 1:
            raise ValueError(
                f"procs_per_node={cluster.procs_per_node}: the SDK's container backend starts one "
                "worker per container (it counts GPUs only); use 1"
            )
        client.train(runtime=cluster.runtime, trainer=custom_trainer(job, cluster), options=[Name(name)])
        return
    backend = client.backend
    body = trainjob_manifest(name, job, cluster, client.get_runtime(cluster.runtime), labels)
    try:
        backend.custom_api.create_namespaced_custom_object(GROUP, VERSION, backend.namespace, PLURAL, body)
    except Exception as e:
        raise TrainJobError(f"could not create TrainJob {backend.namespace}/{name}: {e}") from e


def _stream_logs(client, name: str, stop: threading.Event, sink: Callable[[str], None]) -> None:
    """Node 0's log into the step's log. On Kubernetes there is none while the pod is pending."""
    while not stop.is_set():
        streamed = False
        try:
            for chunk in client.get_job_logs(name, follow=True, step=f"{NODE}-0"):
                streamed = True
                sink(chunk)
        except Exception as e:  # a node gone mid-stream: the status loop reports why
            log.debug("log stream of %s ended: %s", name, e)
        if streamed:
            return
        stop.wait(2.0)


def _print_chunk(chunk: str) -> None:
    print(chunk if chunk.endswith("\n") else chunk + "\n", end="", flush=True)


def failure_detail(client, name: str, tail: int = 25) -> str:
    """The job's conditions (Kubernetes), its nodes' states, events and the last log lines of each node."""
    lines: list[str] = []
    if _is_kubernetes(client):
        backend = client.backend
        try:
            obj = backend.custom_api.get_namespaced_custom_object(
                GROUP, VERSION, backend.namespace, PLURAL, name
            )
            for c in (obj.get("status") or {}).get("conditions") or []:
                lines.append(
                    f"condition {c.get('type')}={c.get('status')}: {c.get('reason')}: {c.get('message')}"
                )
        except Exception as e:
            lines.append(f"(conditions unavailable: {e})")
    try:
        steps = client.get_job(name).steps
    except Exception as e:
        lines.append(f"(job unavailable: {e})")
        steps = []
    for step in steps:
        lines.append(f"{step.name} ({step.pod_name}): {step.status}")
    try:
        for event in client.get_job_events(name)[-tail:]:
            lines.append(
                f"event {event.involved_object_kind}/{event.involved_object_name} {event.reason}: {event.message}"
            )
    except NotImplementedError:
        pass  # the container backend has none
    except Exception as e:
        lines.append(f"(events unavailable: {e})")
    for step in steps:
        if not step.name.startswith(NODE):
            continue
        lines_of_node: list[str] = []
        try:
            for chunk in client.get_job_logs(name, follow=False, step=step.name):
                lines_of_node.extend(chunk.splitlines())
        except Exception as e:
            lines_of_node.append(f"(log unavailable: {e})")
        errors = _exceptions(lines_of_node)
        if errors:
            lines.append(f"errors in {step.name}'s log:")
            lines.extend(f"  {line}" for line in errors)
        last: deque = deque(lines_of_node, maxlen=tail)
        if last:
            lines.append(f"last lines of {step.name}:")
            lines.extend(f"  {line}" for line in last)
    return "\n".join(lines)


def _exceptions(lines: list[str], limit: int = 5) -> list[str]:
    """The exception lines after each Python traceback in a log: a node's own error, which the elastic
    agent's report would otherwise push out of the log's tail."""
    found: list[str] = []
    inside, taking = False, 0
    for line in lines:
        if line.startswith("Traceback (most recent call last)"):
            inside, taking = True, 0
        elif inside and line and not line[0].isspace():
            inside, taking = False, limit
        if taking and not inside:
            if not line.strip() or line.startswith("["):
                taking = 0
                continue
            if line not in found:
                found.append(line)
            taking -= 1
    return found


# Container waiting reasons with which the kubelet reports an image it cannot pull
# (kubernetes pkg/kubelet/images/types.go: ErrImagePull, ImagePullBackOff, InvalidImageName,
# ErrImageNeverPull, ImageInspectError; RegistryUnavailable in older releases). Retrying hides them
# behind a back-off of minutes, so the launcher reports them at once.
PULL_ERRORS = frozenset(
    {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull", "ImageInspectError",
     "RegistryUnavailable"}
)  # fmt: skip


@dataclass(frozen=True)
class NodePod:
    """What the launcher needs of a node's pod. scheduled: bound to a node (spec.nodeName, or the
    PodScheduled condition True), so pulling the image or creating the container is progress, not
    a wait for the scheduler. pull_error: why the kubelet cannot pull the image, with the image."""

    name: str
    scheduled: bool
    pull_error: str = ""


def node_pod(pod: Any) -> NodePod:
    """A kubernetes.client V1Pod (as CoreV1Api returns it) as a NodePod."""
    status = pod.status
    bound = bool(pod.spec and pod.spec.node_name) or any(
        c.type == "PodScheduled" and c.status == "True" for c in (status and status.conditions) or []
    )
    images = {c.name: c.image for c in [*(pod.spec.init_containers or []), *(pod.spec.containers or [])]}
    error = ""
    for cs in [
        *((status and status.init_container_statuses) or []),
        *((status and status.container_statuses) or []),
    ]:
        waiting = cs.state.waiting if cs.state else None
        if waiting is not None and waiting.reason in PULL_ERRORS:
            image = cs.image or images.get(cs.name, "?")
            error = f"{waiting.reason}: image {image} of container {cs.name}: {waiting.message or ''}".rstrip(
                ": "
            )
            break
    return NodePod(pod.metadata.name, bound, error)


def _node_pods(client, name: str) -> Optional[list[NodePod]]:
    """The TrainJob's node pods on Kubernetes; None on other backends (the container backend pulls
    before it creates anything)."""
    if not _is_kubernetes(client):
        return None
    from kubeflow.trainer.constants import constants

    backend = client.backend
    pods = backend.core_api.list_namespaced_pod(
        backend.namespace,
        label_selector=f"{constants.JOBSET_NAME_LABEL}={name},{constants.JOBSET_RJOB_NAME_LABEL}={NODE}",
    )
    return [node_pod(p) for p in pods.items]


def _scheduled(tj, pods: Optional[list[NodePod]]) -> bool:
    from kubeflow.trainer.constants import constants

    if tj.status in (constants.TRAINJOB_RUNNING, constants.TRAINJOB_COMPLETE, constants.TRAINJOB_FAILED):
        return True
    if pods is not None:  # Kubernetes: a bound pod that pulls its image is scheduled
        return len(pods) >= tj.num_nodes and all(p.scheduled for p in pods)
    nodes = [s for s in tj.steps if s.name.startswith(NODE)]
    return bool(nodes) and all(s.status not in (None, "Pending", "Created", "Unknown") for s in nodes)


def wait(client, name: str, cluster: Cluster, clock: Callable[[], float] = time.monotonic) -> None:
    """Until the TrainJob is Complete; TrainJobError when it fails, when a node cannot pull its image,
    or when its nodes stay unscheduled too long (pulling the image is not waiting to be scheduled:
    a large image's first pull may take longer than the scheduling timeout)."""
    from kubeflow.trainer.constants import constants

    created = clock()
    scheduled = False
    while True:
        tj = client.get_job(name)
        if tj.status == constants.TRAINJOB_COMPLETE:
            return
        if tj.status == constants.TRAINJOB_FAILED:
            raise TrainJobError(f"TrainJob {name} failed:\n{failure_detail(client, name)}")
        if tj.status != constants.TRAINJOB_RUNNING:
            pods = _node_pods(client, name)
            for pod in pods or []:
                if pod.pull_error:
                    raise TrainJobError(
                        f"TrainJob {name}: node pod {pod.name} cannot pull its image: {pod.pull_error}\n"
                        f"{failure_detail(client, name)}"
                    )
            if not scheduled:
                scheduled = _scheduled(tj, pods)
                if scheduled:
                    log.info("TrainJob %s: every node is scheduled (pulling the image or starting)", name)
                elif clock() - created > cluster.schedule_timeout_s:
                    raise TrainJobError(
                        f"TrainJob {name}: {cluster.nodes} node(s) not all scheduled after "
                        f"{cluster.schedule_timeout_s} s (each asks for {_resources(cluster)}):\n"
                        f"{failure_detail(client, name)}"
                    )
        time.sleep(cluster.poll_s)


class _Stopped(BaseException):
    """SIGTERM (the step's pod deleted, the run terminated): leave through the cleanup."""


def run_trainjob(job: TrainJob, cluster: Cluster, client, run_key: str, step: str = "train") -> dict:
    """Run `job` as a TrainJob of cluster.nodes nodes and return the final record (launch.run_training's).

    The job's name comes from (run_key, step): a leftover of an earlier attempt of the same step
    (a launcher killed before its cleanup) is deleted first, and the new job resumes from the
    output's last checkpoint. The job is deleted when this returns or raises, and on SIGTERM.
    """
    name = trainjob_name(run_key, step)
    labels = {RUN_LABEL: hashlib.sha256(run_key.encode()).hexdigest()[:40], "cascade-rcnn.org/step": step}
    if _exists(client, name):
        log.warning("TrainJob %s is left over from an earlier attempt: deleting it first", name)
        _delete_and_wait(client, name, cluster.poll_s)
    uri = record_uri(job)
    if storage.exists(uri):
        storage.delete(uri)  # an earlier attempt's record must not pass for this one's

    previous = None
    if threading.current_thread() is threading.main_thread():

        def stop(signum, frame):
            raise _Stopped(f"signal {signum}")

        previous = signal.signal(signal.SIGTERM, stop)
    stop_logs = threading.Event()
    try:
        log.info(
            "creating TrainJob %s: %d node(s) x %d worker(s), runtime %s, image %s",
            name, cluster.nodes, cluster.procs_per_node, cluster.runtime, cluster.image,
        )  # fmt: skip
        create(client, name, job, cluster, labels)
        streamer = threading.Thread(
            target=_stream_logs, args=(client, name, stop_logs, _print_chunk), daemon=True
        )
        streamer.start()
        wait(client, name, cluster)
        streamer.join(timeout=30)  # the rest of node 0's log
    except _Stopped as e:
        raise TrainJobError(f"launcher stopped ({e}); TrainJob {name} deleted") from None
    finally:
        stop_logs.set()
        try:
            if _exists(client, name):
                client.delete_job(name)
                log.info("TrainJob %s deleted", name)
        except Exception as e:
            log.error("could not delete TrainJob %s: %s", name, e)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    try:
        record = json.loads(storage.get_bytes(uri))
    except storage.StorageError as e:
        raise TrainJobError(f"TrainJob {name} completed but left no record at {uri}: {e}") from e
    record["accelerator"] = (
        f"{cluster.nodes} nodes x {cluster.procs_per_node} x {cluster.accelerator_type or job.device or 'cpu'}"
    )
    record["trainjob"] = name
    return record


def trainer_client(namespace: Optional[str] = None):
    """TrainerClient on the cluster the step runs in (its ServiceAccount, its namespace)."""
    from kubeflow.common.types import KubernetesBackendConfig
    from kubeflow.trainer import TrainerClient

    return TrainerClient(backend_config=KubernetesBackendConfig(namespace=namespace))


def run_step(job: TrainJob, *, step: str, nodes: int = 1, trainjob: str = "", s3_secret: str = "") -> dict:
    """What the train and finetune components run: `job` in this pod (launch.run_training) when
    nodes == 1, else as a TrainJob of `nodes` nodes built from `trainjob` (the compiled Cluster
    settings) and the Secret `s3_secret`, keyed by the job's output prefix so a retry finds a
    leftover of its own run."""
    if nodes <= 1:
        from cascade_rcnn.engine.launch import run_training

        return run_training(job)
    cluster = Cluster.from_json(
        trainjob,
        nodes=nodes,
        accelerator_type=job.accelerator,
        procs_per_node=job.nproc_per_node,
        s3_secret=s3_secret,
    )
    return run_trainjob(job, cluster, trainer_client(cluster.namespace), run_key=job.output, step=step)
