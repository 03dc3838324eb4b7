"""What every step of both compiled packages gets: no cache, and, for every step that runs the model,
the same options from the same run parameters (pipelines/tasks.py ModelRun)."""

import json

import pytest
from test_backend_conformance import PACKAGES, dags, load, task_paths, the_task

from pipelines.tasks import SECRET_MOUNT

# What ModelRun hands to every model-running step; cascade_rcnn.step_options.StepOptions reads them.
SHARED = ("dataset", "config", "config_opts", "static_canvas", "device", "amp", "root", "run_id", "job_id")
MODEL_STEPS = {
    "training": {"train", "train-trainjob", "evaluate", "finetune", "finetune-trainjob"},
    "retraining": {
        "finetune", "finetune-trainjob", "train", "train-trainjob", "evaluate", "evaluate-2", "promote", "promote-2",
    },
}  # fmt: skip
READS_THE_STORE = ("ingest-coco", "check-new-data")


def origin(spec: dict, path: tuple, name: str, kind: str) -> str:
    """Where input `name` of the task at `path` comes from, followed up to the root: a run parameter,
    a constant, or a task's output."""
    task = the_task(spec, path[-1])
    source = task["inputs"][kind][name]
    upstream = source.get("componentInputParameter") or source.get("componentInputArtifact")
    if upstream is not None:
        return f"parameter {upstream}" if len(path) == 1 else origin(spec, path[:-1], upstream, kind)
    if "runtimeValue" in source:
        return f"constant {json.dumps(source['runtimeValue']['constant'])}"
    producer = source.get("taskOutputArtifact") or source.get("taskOutputParameter")
    return f"output {producer['producerTask']}.{producer.get('outputArtifactKey') or producer.get('outputParameterKey')}"


def model_steps(spec: dict) -> dict[str, tuple]:
    """Tasks whose component takes a `config`: the ones that build the model."""
    out = {}
    for path in task_paths(spec):
        comp = spec["components"][the_task(spec, path[-1])["componentRef"]["name"]]
        if "dag" not in comp and "config" in comp.get("inputDefinitions", {}).get("parameters", {}):
            out[path[-1][1]] = path
    return out


@pytest.mark.parametrize("package", PACKAGES)
def test_every_model_step_gets_the_same_options_from_the_same_parameters(package):
    spec, platform = load(PACKAGES[package])
    steps = model_steps(spec)
    assert set(steps) == MODEL_STEPS[package]
    origins: dict[str, set] = {name: set() for name in SHARED}
    for task_key, path in steps.items():
        for name in SHARED:
            kind = "artifacts" if name == "dataset" else "parameters"
            assert name in the_task(spec, path[-1])["inputs"].get(kind, {}), f"{task_key} does not get {name}"
            origins[name].add(origin(spec, path, name, kind))
        # ... and the S3 Secret named by the run parameter.
        executor = spec["components"][the_task(spec, path[-1])["componentRef"]["name"]]["executorLabel"]
        (volume,) = platform["executors"][executor]["secretAsVolume"]
        assert volume["mountPath"] == SECRET_MOUNT
        assert volume["secretNameParameter"]["componentInputParameter"].endswith("s3_secret")
    assert origins == {
        "dataset": {"output ingest-coco.dataset"},
        **{name: {f"parameter {name}"} for name in SHARED if name not in ("dataset", "job_id")},
        "job_id": {'constant "{{$.pipeline_job_uuid}}"'},
    }


@pytest.mark.parametrize("package", PACKAGES)
def test_no_step_is_cached(package):
    spec, _ = load(PACKAGES[package])
    containers = {}
    for comp in dags(spec).values():
        for key, task in comp["dag"]["tasks"].items():
            if "dag" not in spec["components"][task["componentRef"]["name"]]:
                containers[key] = task
    # kfp writes enableCache: true for a cached task; an empty cachingOptions is off.
    assert {k for k, t in containers.items() if t.get("cachingOptions", {}).get("enableCache")} == set()
    for key in READS_THE_STORE:
        if package == "training" and key == "check-new-data":
            continue
        assert key in containers, key
