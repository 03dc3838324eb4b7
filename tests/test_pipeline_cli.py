"""`python -m pipelines submit | schedule`: parameter and cron checks that stop a submission before any
network call, and what kfp.Client sends once they pass.

The KFP API server needs a cluster, so the last tests talk over real HTTP on 127.0.0.1 to a small
stand-in that answers the five endpoints kfp.Client uses here and records every request.
"""

import json
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

from pipelines.cli import main as cli_main  # noqa: E402
from pipelines.params import (  # noqa: E402
    ParameterError,
    check_params,
    kfp_cron,
    parse_params,
    pipeline_inputs,
    valid_accelerator_count,
)
from pipelines.submit import prepare  # noqa: E402
from pipelines.training import COMPILED  # noqa: E402

GOOD = ["--param", "root=s3://my-bucket/cascade-rcnn"]


@pytest.fixture(scope="module")
def inputs() -> dict:
    return pipeline_inputs(COMPILED)


def dead_endpoint() -> str:
    """http://127.0.0.1:PORT where nothing listens (the port was free a moment ago)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# ---- cron ----


@pytest.mark.parametrize(
    "five, six",
    [
        ("0 2 * * *", "0 0 2 * * *"),
        ("*/15 * * * 1-5", "0 */15 * * * 1-5"),
        ("30 4 1,15 * MON", "0 30 4 1,15 * MON"),
        ("  5   3 * * 0 ", "0 5 3 * * 0"),
    ],
)
def test_five_field_cron_becomes_kfps_six_fields(five, six):
    assert kfp_cron(five) == six


@pytest.mark.parametrize("bad, words", [("0 2 * *", "4 field"), ("0 0 2 * * *", "6 field"), ("", "0 field")])
def test_cron_with_wrong_number_of_fields_is_refused(bad, words):
    with pytest.raises(ParameterError, match=words):
        kfp_cron(bad)


def test_cron_field_with_garbage_is_refused():
    with pytest.raises(ParameterError, match="the hour field '2;rm'"):
        kfp_cron("0 2;rm * * *")


# ---- parameters ----


def test_params_are_typed_as_the_pipeline_declares(inputs):
    params = parse_params(
        [
            "root=s3://b-1/x",
            "accelerator_count=4",
            "learning_rate=0.1",
            "finetune=true",
            'config_opts=["SOLVER.CHECKPOINT_PERIOD", "2000"]',
            "weights_sha256=",
        ],
        inputs,
    )
    assert params == {
        "root": "s3://b-1/x",
        "accelerator_count": "4",  # a STRING parameter (pipelines/tasks.py)
        "learning_rate": 0.1,
        "finetune": True,
        "config_opts": ["SOLVER.CHECKPOINT_PERIOD", "2000"],
        "weights_sha256": "",
    }
    merged = check_params(params, inputs)
    assert merged["iterations"] == 22500 and isinstance(merged["iterations"], int)
    assert merged["batch_per_device"] == 16 and merged["amp"] is True


@pytest.mark.parametrize(
    "pair, words",
    [
        ("acclerator_count=8", "no such parameter"),
        ("nodes=two", "not a valid number_integer"),
        ("finetune=maybe", "not a valid boolean"),
        ("config_opts=SOLVER.BASE_LR 0.1", "not a valid list"),
        ("root", "write NAME=VALUE"),
    ],
)
def test_bad_param_syntax_is_refused(inputs, pair, words):
    with pytest.raises(ParameterError, match=words):
        parse_params([pair], inputs)


def test_accelerator_counts_follow_ascend_groups():
    assert [n for n in range(0, 33) if valid_accelerator_count(n)] == [1, 2, 4, 8, 16, 24, 32]


@pytest.mark.parametrize(
    "params, words",
    [
        ({}, "missing required parameter.*root"),
        ({"root": "s3://"}, "has no bucket"),
        ({"root": "s3:///prefix"}, "has no bucket"),
        ({"root": "/data/cascade"}, "not an s3:// URI"),
        ({"root": "s3://My_Bucket/x"}, "not a valid S3 bucket name"),
        ({"root": "s3://b-1/x", "accelerator_count": "3"}, "accelerator_count='3' is not a valid NPU group"),
        ({"root": "s3://b-1/x", "accelerator_count": 12}, "accelerator_count='12'"),
        # The backend parses the text as a Kubernetes quantity: only digits make a device count.
        ({"root": "s3://b-1/x", "accelerator_count": "8.0"}, "accelerator_count='8.0'.*digits only"),
        ({"root": "s3://b-1/x", "accelerator_count": "eight"}, "accelerator_count='eight'.*digits only"),
        ({"root": "s3://b-1/x", "accelerator_count": " 8"}, "accelerator_count=' 8'.*digits only"),
        ({"root": "s3://b-1/x", "iterations": 0}, "iterations=0 must be at least 1"),
        ({"root": "s3://b-1/x", "config_opts": ["SOLVER.BASE_LR"]}, "config_opts needs KEY, VALUE pairs"),
        ({"root": "s3://b-1/x", "finetune_data": "/tmp/x"}, "finetune_data='/tmp/x' must be an s3://"),
    ],
)
def test_bad_values_are_refused_with_the_parameter_named(inputs, params, words):
    with pytest.raises(ParameterError, match=words):
        check_params(params, inputs)


def test_every_problem_is_reported_at_once(inputs):
    with pytest.raises(ParameterError) as err:
        check_params({"root": "s3://", "accelerator_count": 6, "batch_per_device": 0}, inputs)
    text = str(err.value)
    assert "has no bucket" in text and "accelerator_count='6'" in text and "batch_per_device=0" in text


# ---- the command line stops before the network ----


@pytest.mark.parametrize(
    "argv, words",
    [
        (
            ["submit", "--param", "root=s3://my-bucket/x", "--param", "accelerator_count=3"],
            "accelerator_count='3'",
        ),
        (["submit", "--param", "root=s3:///x"], "has no bucket"),
        (["submit"], "missing required parameter(s): root"),
        (["submit", *GOOD, "--pipeline-root", "/tmp/kfp"], "--pipeline-root '/tmp/kfp'"),
        (["schedule", "--cron", "0 2 * *", *GOOD], "has 4 field(s)"),
        (["schedule", "--cron", "0 0 2 * * *", *GOOD], "has 6 field(s)"),
        (
            ["schedule", "--cron", "0 2 * * *", "--param", "accelerator_count=5", *GOOD],
            "accelerator_count='5'",
        ),
    ],
)
def test_cli_refuses_bad_input_before_any_network_call(argv, words, capsys):
    # Nothing listens at the endpoint: reaching it would fail with a connection error (after kfp's
    # retries), not with the validation message.
    rc = cli_main([argv[0], "--endpoint", dead_endpoint(), "--package", str(COMPILED), *argv[1:]])
    err = capsys.readouterr().err
    assert rc == 2
    assert words in err
    assert "Connection refused" not in err and "healthz" not in err


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--param", "amp=false"], "--param needs --package"),
        (["--package", str(COMPILED), "--param", "gpus=8"], "the pipeline has no such parameter"),
        (["--package", str(COMPILED), "--param", "amp=maybe"], "--param amp='maybe': not a valid boolean"),
        (["--package", "no/such.yaml"], "--package no/such.yaml: no such file"),
    ],
)
def test_run_local_refuses_bad_parameters_before_starting_anything(argv, words, tmp_path, capsys):
    rc = cli_main(["run-local", "--workdir", str(tmp_path / "w"), *argv])
    assert rc == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "w").exists()  # no data generated, no S3 server started


def test_cli_module_entry_point_reports_validation_errors():
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines", "submit", "--endpoint", dead_endpoint(), "--param", "root=s3://"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "python -m pipelines submit: error:" in proc.stderr and "has no bucket" in proc.stderr


def test_missing_bucket_is_found_on_the_object_store(s3_env):
    # The bucket of s3_env exists; a bucket nobody created does not.
    assert prepare(COMPILED, [f"root=s3://{s3_env}/cascade"], check_bucket=True) == {
        "root": f"s3://{s3_env}/cascade"
    }
    with pytest.raises(ParameterError, match="bucket 'no-such-bucket-4f1a' is not usable"):
        prepare(COMPILED, ["root=s3://no-such-bucket-4f1a/cascade"], check_bucket=True)


# ---- what kfp.Client sends once the checks pass ----


class KfpApiStandIn:
    """Answers healthz, experiment lookup/creation, run and recurring-run creation; records requests."""

    def __init__(self):
        self.requests: list[dict] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _record(self) -> dict:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                req = {
                    "method": self.command,
                    "path": self.path,
                    "body": body,
                    "auth": self.headers.get("Authorization"),
                }
                stand_in.requests.append(req)
                return req

            def do_GET(self):
                req = self._record()
                if req["path"].startswith("/apis/v2beta1/healthz"):
                    self._reply({"multi_user": False})
                elif req["path"].startswith("/apis/v2beta1/experiments"):
                    self._reply({"experiments": [], "total_size": 0})
                else:
                    self.send_error(404)

            def do_POST(self):
                req = self._record()
                if req["path"] == "/apis/v2beta1/experiments":
                    self._reply({"experiment_id": "exp-1", "display_name": req["body"]["display_name"]})
                elif req["path"] == "/apis/v2beta1/runs":
                    self._reply({"run_id": "run-42", "display_name": req["body"]["display_name"]})
                elif req["path"] == "/apis/v2beta1/recurringruns":
                    self._reply({"recurring_run_id": "rr-7", "display_name": req["body"]["display_name"]})
                else:
                    self.send_error(404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def posted(self, path: str) -> dict:
        return next(r["body"] for r in self.requests if r["method"] == "POST" and r["path"] == path)


def _tasks_caching(pipeline_spec: dict) -> list[bool]:
    flags = []
    for comp in [pipeline_spec["root"], *pipeline_spec["components"].values()]:
        for task in comp.get("dag", {}).get("tasks", {}).values():
            flags.append(task["cachingOptions"].get("enableCache", False))
    return flags


def test_submit_sends_the_run_and_prints_its_url(monkeypatch, capsys):
    monkeypatch.setenv("KFP_TOKEN", "token-123")
    with KfpApiStandIn() as api:
        rc = cli_main(
            [
                "submit", "--endpoint", api.url, "--package", str(COMPILED), "--namespace", "team-a",
                "--experiment", "nightly", "--run-name", "try-1", "--pipeline-root", "s3://kfp-root/v2",
                *GOOD, "--param", "accelerator_count=16", "--param", "finetune=true",
            ]
        )  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    assert f"run: {api.url}/#/runs/details/run-42" in out
    experiment = api.posted("/apis/v2beta1/experiments")
    assert experiment["display_name"] == "nightly" and experiment["namespace"] == "team-a"
    run = api.posted("/apis/v2beta1/runs")
    assert run["display_name"] == "try-1" and run["experiment_id"] == "exp-1"
    assert run["runtime_config"]["pipeline_root"] == "s3://kfp-root/v2"
    assert run["runtime_config"]["parameters"] == {
        "root": "s3://my-bucket/cascade-rcnn",
        "accelerator_count": "16",
        "finetune": True,
    }
    # The package goes inline: the pipeline spec and, with it, the Kubernetes settings (Secrets etc.).
    assert run["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "cascade-mask-rcnn-training"
    assert (
        "exec-train"
        in run["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    )
    assert all(r["auth"] == "Bearer token-123" for r in api.requests)


def test_schedule_sends_six_field_cron_without_caching_or_catch_up(capsys):
    with KfpApiStandIn() as api:
        rc = cli_main(
            ["schedule", "--endpoint", api.url, "--package", str(COMPILED), "--cron", "0 2 * * *",
             "--name", "nightly-retrain", *GOOD]
        )  # fmt: skip
    assert rc == 0
    assert "recurring run: rr-7" in capsys.readouterr().out
    job = api.posted("/apis/v2beta1/recurringruns")
    assert job["trigger"]["cron_schedule"]["cron"] == "0 0 2 * * *"
    assert int(job["max_concurrency"]) == 1
    assert job["no_catchup"] is True
    assert job["mode"] == "ENABLE" and job["display_name"] == "nightly-retrain"
    flags = _tasks_caching(job["pipeline_spec"]["pipeline_spec"])
    assert flags and not any(flags)


def test_submit_without_cache_turns_it_off_in_every_task():
    with KfpApiStandIn() as api:
        rc = cli_main(["submit", "--endpoint", api.url, "--package", str(COMPILED), "--no-cache", *GOOD])
    assert rc == 0
    flags = _tasks_caching(api.posted("/apis/v2beta1/runs")["pipeline_spec"]["pipeline_spec"])
    # The five steps, the two TrainJob launchers (nodes > 1), the finetune condition, and the
    # nodes == 1 / nodes > 1 branches of train and finetune (three condition tasks each).
    assert len(flags) == 14 and not any(flags)
