"""The compiled pipeline: the checked-in YAML is current, its graph, the train step's resources and
placement, credentials only by Secret reference, images from the compile options, and kfp's loader."""

import json
import re
import secrets
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

from pipelines.cli import main as cli_main  # noqa: E402
from pipelines.tasks import SECRET_FILES_ENV, SECRET_MOUNT  # noqa: E402
from pipelines.training import COMPILED, LAUNCHER_STEPS, STEP_NAMES, CompileOptions, compile_pipeline  # noqa: E402


def _without_sdk_version(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.startswith("sdkVersion:"))


def _docs(path: Path) -> tuple[dict, dict]:
    """(pipeline spec, kubernetes platform spec) of a compiled YAML."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    spec = next(d for d in docs if "root" in d)
    platform = next(d for d in docs if "platforms" in d)["platforms"]["kubernetes"]["deploymentSpec"]
    return spec, platform


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Path:
    return compile_pipeline(tmp_path_factory.mktemp("compiled") / "pipeline.yaml")


def _all_tasks(spec: dict) -> dict[str, dict]:
    """Every task of the root DAG and of the sub-DAGs it contains, by task name."""
    tasks: dict[str, dict] = {}

    def walk(dag: dict, parents: list[str], containers: list[str]) -> None:
        for name, task in dag["tasks"].items():
            task = {
                **task,
                "_after": set(task.get("dependentTasks", [])) | set(parents),
                "_in": set(containers),
            }
            tasks[name] = task
            comp = spec["components"][task["componentRef"]["name"]]
            if "dag" in comp:
                walk(comp["dag"], [*parents, *task.get("dependentTasks", []), name], [*containers, name])

    walk(spec["root"]["dag"], [], [])
    return tasks


def test_checked_in_yaml_is_what_the_code_compiles(compiled):
    assert COMPILED.is_file(), f"{COMPILED} is missing: run `python -m pipelines compile`"
    assert _without_sdk_version(COMPILED.read_text()) == _without_sdk_version(compiled.read_text()), (
        f"{COMPILED} is stale: run `python -m pipelines compile` and commit it"
    )


def test_five_steps_in_order(compiled):
    spec, _ = _docs(compiled)
    tasks = _all_tasks(spec)
    steps = {
        n: t for n, t in tasks.items() if not n.startswith("condition-") and n not in LAUNCHER_STEPS.values()
    }
    assert sorted(steps) == sorted(STEP_NAMES)
    # Each step runs after every step before it (directly or through the condition's DAG).
    for i, name in enumerate(STEP_NAMES):
        deps = steps[name]["_after"]
        ancestors = set(deps)
        frontier = list(deps)
        while frontier:
            for dep in tasks[frontier.pop()]["_after"]:
                if dep not in ancestors:
                    ancestors.add(dep)
                    frontier.append(dep)
        # Waiting for a condition's DAG is waiting for every task in it (train in its nodes branch).
        ancestors |= {n for n, t in tasks.items() if t["_in"] & ancestors and n != name}
        assert set(STEP_NAMES[:i]) <= ancestors, f"{name} does not wait for {set(STEP_NAMES[:i]) - ancestors}"
        assert not ancestors & set(STEP_NAMES[i:]), f"{name} waits for a later step"
    # finetune only when the switch is on.
    condition = next(t for n, t in tasks.items() if "finetune'] == true" in str(t.get("triggerPolicy")))
    assert "finetune" in condition["triggerPolicy"]["condition"]
    assert spec["root"]["inputDefinitions"]["parameters"]["finetune"]["defaultValue"] is False


def test_every_input_a_task_reads_is_declared_by_its_dag(compiled):
    # kfp does not always surface parameters into a condition's DAG (the accelerator placeholders
    # did not); the backend would then fail to resolve them at run time.
    spec, _ = _docs(compiled)
    dags = {"root": spec["root"], **{n: c for n, c in spec["components"].items() if "dag" in c}}
    placeholders = 0
    for dag_name, comp in dags.items():
        declared = set(comp.get("inputDefinitions", {}).get("parameters", {}))
        declared_artifacts = set(comp.get("inputDefinitions", {}).get("artifacts", {}))
        for task_name, task in comp["dag"]["tasks"].items():
            for name, value in task.get("inputs", {}).get("parameters", {}).items():
                ref = value.get("componentInputParameter")
                assert ref is None or ref in declared, f"{dag_name}/{task_name}.{name} reads undeclared {ref}"
                constant = str(value.get("runtimeValue", {}).get("constant", ""))
                for placeholder in re.findall(r"inputs\.parameters\['([^']+)'\]", constant):
                    placeholders += 1
                    assert placeholder in task["inputs"]["parameters"], f"{task_name}.{name}: {placeholder}"
            for name, value in task.get("inputs", {}).get("artifacts", {}).items():
                ref = value.get("componentInputArtifact")
                assert ref is None or ref in declared_artifacts, f"{dag_name}/{task_name}.{name}: {ref}"
    assert placeholders == 4  # accelerator type and count, of train and of finetune


def test_train_requests_the_accelerator_and_runs_one_process_per_device(compiled):
    spec, platform = _docs(compiled)
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["accelerator_type"]["defaultValue"] == "huawei.com/Ascend910"
    # Strings: the backend fills pod resources only from STRING parameters (test_backend_conformance).
    assert params["accelerator_count"] == {"defaultValue": "8", "isOptional": True, "parameterType": "STRING"}
    for step in ("train", "finetune"):
        container = spec["deploymentSpec"]["executors"][f"exec-{step}"]["container"]
        accelerator = container["resources"]["accelerator"]
        assert "accelerator_type" in accelerator["resourceType"]
        assert "accelerator_count" in accelerator["resourceCount"]
        assert container["image"] == CompileOptions().image("ascend")
        k8s = platform["executors"][f"exec-{step}"]
        assert k8s["nodeSelector"]["labels"] == {"accelerator": "huawei-Ascend910"}
        assert {"mountPath": "/dev/shm", "medium": "Memory"}.items() <= k8s["emptyDirMounts"][0].items()
        assert int(k8s["activeDeadlineSeconds"]) > 0
        assert {"key": "huawei.com/Ascend910", "operator": "Exists"}.items() <= k8s["tolerations"][0].items()
    tasks = _all_tasks(spec)
    train = tasks["train"]
    # The resource placeholders and the trainer's process count come from the same run parameter.
    assert train["inputs"]["parameters"]["pipelinechannel--accelerator_count"] == {
        "componentInputParameter": "pipelinechannel--accelerator_count"
    }
    assert train["inputs"]["parameters"]["nproc_per_node"] == {
        "componentInputParameter": "pipelinechannel--accelerator_count"
    }
    assert tasks["finetune"]["inputs"]["parameters"]["nproc_per_node"] == {
        "componentInputParameter": "pipelinechannel--accelerator_count"
    }
    assert train["retryPolicy"]["maxRetryCount"] >= 1
    # Retries resume: the output prefix is the run's id (stable across retries), not a pod's temp dir.
    assert train["inputs"]["parameters"]["job_id"] == {
        "runtimeValue": {"constant": "{{$.pipeline_job_uuid}}"}
    }


def test_credentials_only_by_secret_reference(tmp_path, monkeypatch):
    access, secret = f"AKIA{secrets.token_hex(8).upper()}", secrets.token_urlsafe(30)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", access)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    path = compile_pipeline(tmp_path / "p.yaml")
    text = path.read_text()
    from cascade_rcnn.local_s3 import DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY

    for value in (access, secret, DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY):
        assert value not in text
        assert value not in COMPILED.read_text()
    spec, platform = _docs(path)
    executors = spec["deploymentSpec"]["executors"]
    for step in (*STEP_NAMES, *LAUNCHER_STEPS.values()):
        # No env value but the map from variable to file of the mounted Secret.
        env = {e["name"]: e["value"] for e in executors[f"exec-{step}"]["container"]["env"]}
        assert set(env) == {SECRET_FILES_ENV}
        files = json.loads(env[SECRET_FILES_ENV])
        assert files["required"] == {
            k: f"{SECRET_MOUNT}/{k}" for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
        }
        assert files["optional"] == {
            k: f"{SECRET_MOUNT}/{k}" for k in ("AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")
        }
        k8s = platform["executors"][f"exec-{step}"]
        assert "secretAsEnv" not in k8s  # its `optional` field breaks KFP 2.14 (pipelines/tasks.py)
        (volume,) = k8s["secretAsVolume"]
        assert volume["mountPath"] == SECRET_MOUNT
        # The Secret's name is the run parameter s3_secret, not a constant.
        assert volume["secretNameParameter"]["componentInputParameter"].endswith("s3_secret")
    # Outside the file map (the variable and its file) and the launchers' settings (which map the
    # variable to its key in the Secret for the TrainJob's nodes), the names occur nowhere.
    launchers = len(LAUNCHER_STEPS)
    assert text.count("AWS_SECRET_ACCESS_KEY") == 2 * (len(STEP_NAMES) + launchers) + 2 * launchers


def test_reloads_with_kfps_loader():
    from kfp.components import load_component_from_file

    component = load_component_from_file(str(COMPILED))
    assert component.name == "cascade-mask-rcnn-training"
    inputs = component.component_spec.inputs
    assert {"root", "data_source", "accelerator_type", "accelerator_count", "finetune"} <= set(inputs)
    assert inputs["iterations"].default == 22500
    assert inputs["learning_rate"].default == 0.2


def test_compile_options_reach_the_yaml(tmp_path):
    out = tmp_path / "custom.yaml"
    rc = cli_main(
        [
            "compile", "--output", str(out), "--registry", "registry.example.com/ml/", "--tag", "2.0.1",
            "--node-selector", "accelerator-type=module-910b-8", "--toleration", "",
            "--secret-key", "AWS_ACCESS_KEY_ID=accesskey", "--shm-size", "16Gi", "--retries", "1",
        ]
    )  # fmt: skip
    assert rc == 0
    spec, platform = _docs(out)
    images = {name: e["container"]["image"] for name, e in spec["deploymentSpec"]["executors"].items()}
    assert images == {
        "exec-ingest-coco": "registry.example.com/ml/cascade-rcnn-cpu:2.0.1",
        "exec-fetch-weights": "registry.example.com/ml/cascade-rcnn-cpu:2.0.1",
        "exec-evaluate": "registry.example.com/ml/cascade-rcnn-cpu:2.0.1",
        "exec-train": "registry.example.com/ml/cascade-rcnn-ascend:2.0.1",
        "exec-finetune": "registry.example.com/ml/cascade-rcnn-ascend:2.0.1",
        # nodes > 1: the launchers on the CPU image
        "exec-train-trainjob": "registry.example.com/ml/cascade-rcnn-cpu:2.0.1",
        "exec-finetune-trainjob": "registry.example.com/ml/cascade-rcnn-cpu:2.0.1",
    }
    train = platform["executors"]["exec-train"]
    assert train["nodeSelector"]["labels"] == {"accelerator-type": "module-910b-8"}
    assert "tolerations" not in train
    assert train["emptyDirMounts"][0]["sizeLimit"] == "16Gi"
    env = {
        e["name"]: e["value"] for e in spec["deploymentSpec"]["executors"]["exec-train"]["container"]["env"]
    }
    files = json.loads(env[SECRET_FILES_ENV])["required"]
    assert files["AWS_ACCESS_KEY_ID"] == f"{SECRET_MOUNT}/accesskey"
    assert files["AWS_SECRET_ACCESS_KEY"] == f"{SECRET_MOUNT}/AWS_SECRET_ACCESS_KEY"
    assert _all_tasks(spec)["train"]["retryPolicy"]["maxRetryCount"] == 1


def test_no_accelerator_variant_runs_training_on_the_cpu_image(tmp_path):
    out = tmp_path / "cpu.yaml"
    assert cli_main(["compile", "--output", str(out), "--no-accelerator"]) == 0
    spec, platform = _docs(out)
    container = spec["deploymentSpec"]["executors"]["exec-train"]["container"]
    assert "accelerator" not in container.get("resources", {})
    assert container["image"].endswith(f"cascade-rcnn-cpu:{CompileOptions().tag}")
    assert "nodeSelector" not in platform["executors"]["exec-train"]
    # The explicit way to train on the CPU: device defaults to cpu, and the step requested nothing, so
    # it does not insist on finding devices.
    assert spec["root"]["inputDefinitions"]["parameters"]["device"]["defaultValue"] == "cpu"
    for task in ("train", "finetune", "train-trainjob", "finetune-trainjob"):
        assert _all_tasks(spec)[task]["inputs"]["parameters"]["accelerator"] == {
            "runtimeValue": {"constant": ""}
        }


def test_bad_compile_options_are_refused(tmp_path, capsys):
    out = tmp_path / "x.yaml"
    assert cli_main(["compile", "--output", str(out), "--secret-key", "AWS_TOKEN=x"]) == 2
    assert "AWS_TOKEN is not one of" in capsys.readouterr().err
    assert cli_main(["compile", "--output", str(out), "--retries", "-1"]) == 2
    assert not out.exists()
