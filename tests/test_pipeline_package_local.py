"""The file users submit, run: pipelines/compiled/cascade_mask_rcnn_training.yaml loaded with
kfp.components.load_component_from_file and run by kfp.local's SubprocessRunner (use_venv=False)
against SeaweedFS, through `run_local(package=...)`.

Three kinds of run arguments are set (pipelines.run_local.package_arguments):
- what must shrink for two CPU cores: the data (a generated shapes set as `data_source`), the model's
  widths and image sizes (`config_opts`), `iterations`, `batch_per_device` and the learning rates
  of the demo's small batches (the default 0.2 is for 128 images per step), the fine-tuning
  schedule; `finetune` is switched on so that its step and the condition around it run too;
- device=cpu, the explicit way to train on a CPU: the training steps' pods requested 8 NPUs, and with
  the default auto a step that finds none fails at once (tests/test_accel.py runs that case);
- what only a cluster has, given as environment rather than arguments: the object store (the
  AWS_* variables of the S3 Secret, here the SeaweedFS fixture's) and the internet (the `weights`
  default detectron2://ImageNetPretrained/MSRA/R-50.pkl resolves through CASCADE_RCNN_D2_BASE_URL to
  a mirror on 127.0.0.1 serving a random initialisation of the narrow model under that name).
Everything else keeps the package's default: amp true, accelerator_type
huawei.com/Ascend910, accelerator_count 8, the relative config path, the names and splits,
eval_max_images 0, run_id "" (the run's id), s3_secret.

What kfp.local runs of the package, and what it cannot (kfp 2.17, kfp/local/):
- it runs the DAG, the finetune condition (dsl.If on a bool parameter), artifact passing, the
  pipeline channels into the condition's DAG and `{{$.pipeline_job_uuid}}` (job_id). The task inputs
  kfp adds for the resources, `{{$.inputs.parameters['pipelinechannel--accelerator_type']}}` and
  `..._count`, it resolves too (to "huawei.com/Ascend910" and "8"), and the train step reads the
  type as the resource its pod requested;
- it ignores container resources (task_executor._warn_local_only_noops: cpu/memory requests and
  limits, the accelerator type and count; a warning, no check) and every kfp-kubernetes setting of
  the platform spec: the S3 Secret as env (so the credentials come from this process's environment),
  node selector, toleration, the /dev/shm emptyDir and the pod timeout. Those are checked on the
  YAML itself by tests/test_pipeline_compile.py;
- accelerator_count still matters here: it is the trainer's --nproc-per-node, so the default starts 8
  CPU worker processes (gloo) per training step, each with OMP_NUM_THREADS=1 and about 1 GB;
- images are not used (SubprocessRunner warns that the cpu/ascend images are not Python images and
  runs in this environment); the steps run from the repository root, as in the image's WORKDIR
  /opt/cascade-rcnn, which holds configs/ (images/*/Dockerfile), so the relative config resolves;
- it honours the package's retries (3, backoff 60 s doubling): a failing train step fails the test
  only after about 7 minutes of back-off.
"""

import uuid
from pathlib import Path

import pytest
import torch
import yaml

from cascade_rcnn import storage
from pipelines.params import pipeline_inputs
from pipelines.run_local import LocalSettings, package_arguments, run_local
from pipelines.training import COMPILED, STEP_NAMES

pytestmark = pytest.mark.slow

# One image per process: 8 per iteration with the default 8 processes.
SMALL = LocalSettings(
    iterations=2, finetune_iterations=2, train_images=6, val_images=3, finetune_images=4, batch=1
)
# What this test may set; every other parameter must run at the package's default.
SHRUNK = {
    "device",
    "data_source",
    "config_opts",
    "iterations",
    "learning_rate",
    "batch_per_device",
    "finetune",
    "finetune_data",
    "finetune_iterations",
    "finetune_learning_rate",
    "finetune_opts",
}
REQUIRED = {"root"}  # no default: the cluster's bucket, here the fixture's


@pytest.fixture(scope="module")
def defaults() -> dict:
    inputs = pipeline_inputs(COMPILED)
    return {k: v["defaultValue"] for k, v in inputs.items() if "defaultValue" in v}


@pytest.fixture(scope="module")
def package_run(s3_server, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("package-local")
    bucket = f"package-{uuid.uuid4().hex[:12]}"
    return run_local(workdir, SMALL, server=s3_server, bucket=bucket, package=COMPILED)


def test_only_the_cpu_shrinks_are_set_and_every_other_parameter_has_a_default(package_run, defaults):
    inputs = pipeline_inputs(COMPILED)
    assert set(package_run.arguments) == SHRUNK | REQUIRED
    assert set(package_arguments("s3://b/p", Path("d"), "s3://b/f", SMALL)) == SHRUNK | REQUIRED
    # The run depends on these defaults being what the README promises.
    assert set(inputs) - set(defaults) == REQUIRED
    assert defaults["device"] == "auto" and defaults["amp"] is True
    assert defaults["accelerator_type"] == "huawei.com/Ascend910" and defaults["accelerator_count"] == "8"
    assert defaults["weights"] == "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
    assert defaults["config"] == "configs/Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml"


def test_the_package_is_the_file_with_its_kubernetes_config(package_run):
    from google.protobuf import json_format
    from kfp.components import load_component_from_file

    component = load_component_from_file(str(COMPILED))
    # kfp.local ran a pipeline whose platform spec (Secret env, node selector, ...) it ignores.
    k8s = json_format.MessageToDict(component.platform_spec.platforms["kubernetes"].deployment_spec)
    assert {f"exec-{s}" for s in STEP_NAMES} <= set(k8s["executors"])
    assert "nodeSelector" in k8s["executors"]["exec-train"]
    assert sorted(package_run.outputs) == sorted(STEP_NAMES)


def test_default_weights_come_through_the_detectron2_scheme(package_run, s3_env, tmp_path):
    weights = package_run.metadata("fetch-weights", "model")
    assert weights["source"] == "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
    assert weights["url"].startswith("http://127.0.0.1:")
    assert weights["url"].endswith("/ImageNetPretrained/MSRA/R-50.pkl")
    served = package_run.workdir / "mirror" / "ImageNetPretrained" / "MSRA" / "R-50.pkl"
    assert weights["sha256"] == storage.sha256_file(served)
    assert storage.exists(weights["checkpoint_uri"])
    assert package_run.metadata("train", "model")["source"] == weights["checkpoint_uri"]


@pytest.mark.parametrize("step", ["train", "finetune"])
def test_training_ran_the_defaults_on_8_cpu_processes(package_run, defaults, step, s3_env, tmp_path):
    model = package_run.metadata(step, "model")
    # 8 processes (accelerator_count's default) on the CPU, as device=cpu asked.
    assert model["accelerator"] == "8 x cpu"
    assert model["config"] == defaults["config"]  # relative, resolved in the working directory
    local = tmp_path / "model_final.pth"
    storage.get_file(model["checkpoint_uri"], local, require_checksum=True)
    ckpt = torch.load(local, weights_only=True)
    iterations = SMALL.iterations if step == "train" else SMALL.finetune_iterations
    assert ckpt["trainer"]["iteration"] == iterations - 1
    assert ckpt["trainer"]["world_size"] == 8
    assert len(ckpt["trainer"]["rng"]) == 8  # one RNG state gathered from each worker
    cfg = yaml.safe_load(ckpt["meta"]["config"])
    assert cfg["MODEL"]["DEVICE"] == "cpu"
    assert cfg["SOLVER"]["AMP"]["ENABLED"] is True
    assert cfg["SOLVER"]["AMP"]["DTYPE"] == "float16"  # the config's; on CPU accel runs float32 instead
    assert cfg["SOLVER"]["IMS_PER_BATCH"] == SMALL.batch * 8


def test_evaluation_of_the_trained_model(package_run, defaults):
    metrics = package_run.metadata("evaluate", "metrics")
    for key in ("bbox/AP", "segm/AP"):
        assert 0.0 <= metrics[key] <= 100.0, key
    assert metrics["output_uri"].startswith(f"{package_run.root}/runs/")
    assert package_run.outputs["evaluate"]["metrics"]["metrics_json"]["segm"]["AP"] == pytest.approx(
        metrics["segm/AP"]
    )
    assert "| mask |" in (package_run.workdir / "report.md").read_text()
