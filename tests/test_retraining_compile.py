"""The compiled retraining pipeline: checked in and current, the data check before any accelerator
step, credentials only by Secret reference; `python -m pipelines schedule` sends it by default,
with its parameters checked before it connects."""

import secrets
from pathlib import Path

import pytest
import yaml
from test_pipeline_cli import GOOD, KfpApiStandIn, _tasks_caching
from test_pipeline_compile import _all_tasks, _docs, _without_sdk_version

from pipelines import retraining, training
from pipelines.cli import main as cli_main
from pipelines.params import ParameterError, check_params, pipeline_inputs

COMPILED = retraining.COMPILED
REPO = Path(__file__).resolve().parents[1]
ACCELERATOR_STEPS = ("train", "finetune")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return retraining.compile_pipeline(tmp_path_factory.mktemp("compiled") / "retraining.yaml")


def test_checked_in_yaml_is_what_the_code_compiles(compiled):
    assert COMPILED.is_file(), f"{COMPILED} is missing: run `python -m pipelines compile`"
    assert _without_sdk_version(COMPILED.read_text()) == _without_sdk_version(compiled.read_text()), (
        f"{COMPILED} is stale: run `python -m pipelines compile` and commit it"
    )


def test_training_runs_only_after_the_data_check_and_only_on_its_plan(compiled):
    spec, platform = _docs(compiled)
    tasks = _all_tasks(spec)
    trainers = [
        n for n, t in tasks.items() if t["componentRef"]["name"].startswith(("comp-train", "comp-finetune"))
    ]
    # In the step's pod (nodes == 1) or as a TrainJob launcher (nodes > 1), warm or from pretrained.
    assert sorted(trainers) == ["finetune", "finetune-trainjob", "train", "train-trainjob"]
    for name in trainers:
        assert "check-new-data" in tasks[name]["_after"], name
    # Each training branch sits under a condition on the check's output, one per plan.
    conditions = [
        t["triggerPolicy"]["condition"] for t in tasks.values() if t.get("triggerPolicy", {}).get("condition")
    ]
    on_plan = [c for c in conditions if "check-new-data" in c]
    assert len(on_plan) == 2
    assert any("'warm-start'" in c for c in on_plan) and any("'from-pretrained'" in c for c in on_plan)
    assert sum("nodes" in c for c in conditions) == 4  # in-pod / on-nodes under each plan
    # The check and the launchers need no accelerator; the in-pod trainers request one.
    executors = spec["deploymentSpec"]["executors"]
    for name in ("exec-check-new-data", "exec-train-trainjob", "exec-finetune-trainjob"):
        assert "accelerator" not in str(executors[name]["container"].get("resources", {})), name
    for name in ("exec-train", "exec-finetune"):
        assert "accelerator" in executors[name]["container"]["resources"], name
        assert "huawei.com/Ascend910" in str(platform["executors"][name]["tolerations"])
    promoters = [n for n, t in tasks.items() if t["componentRef"]["name"].startswith("comp-promote")]
    assert len(promoters) == 2  # one per branch


def test_credentials_only_by_secret_reference(tmp_path, monkeypatch):
    access, secret = f"AKIA{secrets.token_hex(8).upper()}", secrets.token_urlsafe(30)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", access)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    path = retraining.compile_pipeline(tmp_path / "p.yaml")
    text = path.read_text()
    assert access not in text and secret not in text
    spec, platform = _docs(path)
    for executor in spec["deploymentSpec"]["executors"].values():
        assert not [e for e in executor["container"].get("env", []) if e["name"].startswith("AWS_")]
    for name in spec["deploymentSpec"]["executors"]:
        assert "secretAsEnv" not in platform["executors"][name]  # see pipelines/tasks.py
        (volume,) = platform["executors"][name]["secretAsVolume"]
        assert volume["secretNameParameter"]["componentInputParameter"].endswith("s3_secret")


@pytest.mark.parametrize(
    "params, words",
    [
        ({"min_improvement": -0.5}, "min_improvement=-0.5 must be 0 or more"),
        ({"metric": "AP"}, "metric='AP': use bbox/NAME or segm/NAME"),
        ({"model_name": "../prod"}, "model_name='../prod'"),
        ({"warm_start_iterations": 0}, "warm_start_iterations=0 must be at least 1"),
        ({"eval_split": ""}, "eval_split is empty"),
    ],
)
def test_bad_retraining_parameters_are_refused(params, words):
    with pytest.raises(ParameterError, match=words.replace("(", r"\(").replace(".", r"\.")):
        check_params({"root": "s3://b-1/x", **params}, pipeline_inputs(COMPILED))


def test_schedule_sends_the_retraining_pipeline_by_default(capsys):
    with KfpApiStandIn() as api:
        rc = cli_main(["schedule", "--endpoint", api.url, "--cron", "0 3 * * 1", *GOOD,
                       "--param", "min_improvement=0.5"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    job = api.posted("/apis/v2beta1/recurringruns")
    assert job["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == retraining.PIPELINE_NAME
    assert job["runtime_config"]["parameters"]["min_improvement"] == 0.5
    flags = _tasks_caching(job["pipeline_spec"]["pipeline_spec"])
    assert flags and not any(flags)


def test_schedule_refuses_bad_retraining_parameters_before_connecting(capsys):
    with KfpApiStandIn() as api:
        rc = cli_main(["schedule", "--endpoint", api.url, "--cron", "0 3 * * 1", *GOOD,
                       "--param", "metric=mAP"])  # fmt: skip
        assert api.requests == []
    assert rc == 2
    assert "metric='mAP'" in capsys.readouterr().err


def test_compile_writes_both_pipelines(tmp_path, capsys):
    assert cli_main(["compile", "--pipeline", "retraining", "--output", str(tmp_path / "r.yaml")]) == 0
    doc = next(d for d in yaml.safe_load_all((tmp_path / "r.yaml").read_text()) if d and "root" in d)
    assert doc["pipelineInfo"]["name"] == retraining.PIPELINE_NAME
    assert cli_main(["compile", "--pipeline", "all", "--output", str(tmp_path / "x.yaml")]) == 2
    assert "--output takes one pipeline" in capsys.readouterr().err


def test_run_local_retraining_refuses_bad_parameters_before_starting(tmp_path, capsys):
    workdir = tmp_path / "w"
    argv = [
        "run-local",
        "--pipeline",
        "retraining",
        "--workdir",
        str(workdir),
        "--param",
        "min_improvement=-1",
    ]
    assert cli_main(argv) == 2
    assert "min_improvement=-1.0 must be 0 or more" in capsys.readouterr().err
    assert not workdir.exists()


@pytest.mark.parametrize("package", [COMPILED, training.COMPILED], ids=["retraining", "training"])
def test_static_canvas_reaches_every_train_finetune_and_evaluate_task(package):
    spec, _ = _docs(package)
    assert spec["root"]["inputDefinitions"]["parameters"]["static_canvas"]["defaultValue"] == []
    tasks = _all_tasks(spec)
    wanted = ("comp-train", "comp-finetune", "comp-evaluate")
    reached = [n for n, t in tasks.items() if t["componentRef"]["name"].startswith(wanted)]
    assert reached
    for name in reached:
        assert "static_canvas" in tasks[name]["inputs"]["parameters"], name


def test_static_canvas_becomes_the_static_config_keys():
    from cascade_rcnn.config import ConfigError, load_config, static_opts

    assert static_opts([]) == []
    opts = static_opts([[800, 1344], [1344, 800]])
    cfg = load_config(str(REPO / training.DEFAULT_CONFIG), opts)
    assert cfg.MODEL.STATIC.ENABLED is True
    assert [tuple(c) for c in cfg.MODEL.STATIC.CANVAS] == [(800, 1344), (1344, 800)]
    # As KFP hands a list parameter to the step: JSON numbers, so floats.
    assert static_opts([[800.0, 1344.0], [1344.0, 800.0]]) == opts
    for bad in ([[800]], [[800.5, 1344]], [[True, 1344]], [["800", 1344]]):
        with pytest.raises(ConfigError, match="static_canvas entries"):
            static_opts(bad)
    with pytest.raises(ParameterError, match="multiple of 32"):
        check_params({"root": "s3://b-1/x", "static_canvas": [[800, 1333]]}, pipeline_inputs(COMPILED))
