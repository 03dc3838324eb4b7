"""What a user sees for a mistake: every `cascade-rcnn` and `python -m pipelines` subcommand answers
a missing config, an unknown key, a wrongly typed value, missing data and missing weights (where they
apply) with one line `<command>: error: <message>`, exit status 2 and no traceback.

Each case runs the real command in a fresh process, as a user types it (the entry point, logging
setup and, for --nproc-per-node 2, torch's elastic agent and its spawned workers). Lines after the
error line are allowed only as its indented details (a list of invalid annotations, say).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cascade_rcnn import errors

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "Misc" / "cascade_mask_rcnn_R_50_FPN_1x.yaml")
COMPILED = str(REPO / "pipelines" / "compiled" / "cascade_mask_rcnn_training.yaml")
CPU = ["MODEL.DEVICE", "cpu"]
DEAD = "http://127.0.0.1:9"  # the discard port: nothing answers; every case fails before any call


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict[str, str]:
    """A small shapes data set, a copy with a wrongly typed bbox, an image and a non-directory."""
    from cascade_rcnn.data.shapes import make_shapes

    root = tmp_path_factory.mktemp("cli-errors")
    data = root / "shapes"
    make_shapes(str(data), num_train=2, num_val=1, seed=0, min_size=64, max_size=64)
    bad = root / "bad-shapes"
    shutil.copytree(data, bad)
    ann = bad / "annotations" / "instances_val2017.json"
    coco = json.loads(ann.read_text())
    coco["annotations"][0]["bbox"] = "12 34 56 78"  # a string where 4 numbers belong
    ann.write_text(json.dumps(coco))
    (root / "a-file").write_text("not a directory")
    return {
        "data": str(data),
        "bad": str(bad),
        "image": str(next((data / "val2017").glob("*.jpg"))),
        "out": str(root / "out"),
        "not_a_dir": str(root / "a-file"),
        "nowhere": str(root / "nowhere"),
    }


def cascade(command: str, *argv: str) -> tuple[str, list[str]]:
    return f"cascade-rcnn {command}", [sys.executable, "-m", "cascade_rcnn.cli", command, *argv]


def pipelines(command: str, *argv: str) -> tuple[str, list[str]]:
    return f"python -m pipelines {command}", [sys.executable, "-m", "pipelines", command, *argv]


# fmt: off
def cases(w: dict[str, str]) -> dict[str, tuple[str, list[str], str]]:
    """{case id: (prog, argv, a word the message must hold)}."""
    missing_config = str(Path(w["nowhere"]) / "config.yaml")
    missing_weights = str(Path(w["nowhere"]) / "model.pth")
    out = w["out"]
    c: dict[str, tuple[str, list[str], str]] = {}

    def add(case: str, spec: tuple[str, list[str]], words: str) -> None:
        c[case] = (*spec, words)

    train = ["--data", w["data"], "--output", out]
    for command in ("train", "finetune"):
        extra = ["--weights", missing_weights] if command == "finetune" else []
        add(f"{command}-missing-config", cascade(command, "--config", missing_config, *train, *extra), "config.yaml")
        add(f"{command}-unknown-key", cascade(command, "--config", CONFIG, *train, *extra, "--opts", "MODEL.ROI_HEADS.NUM_CLASES", "3"), "NUM_CLASES")
        add(f"{command}-wrong-type", cascade(command, "--config", CONFIG, *train, *extra, "--opts", "SOLVER.MAX_ITER", "abc"), "SOLVER.MAX_ITER")
        add(f"{command}-missing-data", cascade(command, "--config", CONFIG, "--data", w["nowhere"], "--output", out, *extra, "--opts", *CPU), "nowhere")
    add("train-missing-weights", cascade("train", "--config", CONFIG, *train, "--opts", *CPU, "MODEL.WEIGHTS", missing_weights), "model.pth")
    add("finetune-missing-weights", cascade("finetune", "--config", CONFIG, *train, "--weights", missing_weights, "--opts", *CPU), "model.pth")

    ev = ["--data", w["data"], "--output", out, "--split", "val2017", "--weights", missing_weights]
    add("evaluate-missing-config", cascade("evaluate", "--config", missing_config, *ev), "config.yaml")
    add("evaluate-unknown-key", cascade("evaluate", "--config", CONFIG, *ev, "--opts", "MODEL.NO_SUCH_KEY", "1"), "NO_SUCH_KEY")
    add("evaluate-wrong-type", cascade("evaluate", "--config", CONFIG, *ev, "--opts", "TEST.DETECTIONS_PER_IMAGE", "many"), "TEST.DETECTIONS_PER_IMAGE")
    add("evaluate-missing-data", cascade("evaluate", "--config", CONFIG, "--data", w["nowhere"], "--output", out, "--weights", missing_weights, "--opts", *CPU), "nowhere")
    add("evaluate-missing-weights", cascade("evaluate", "--config", CONFIG, *ev, "--opts", *CPU), "model.pth")

    pr = ["--output", str(Path(out) / "p.json"), "--weights", missing_weights]
    add("predict-missing-config", cascade("predict", "--config", missing_config, *pr, w["image"]), "config.yaml")
    add("predict-unknown-key", cascade("predict", "--config", CONFIG, *pr, "--opts", "MODEL.NO_SUCH_KEY", "1", "--", w["image"]), "NO_SUCH_KEY")
    add("predict-wrong-type", cascade("predict", "--config", CONFIG, *pr, "--opts", "INPUT.MIN_SIZE_TEST", "big", "--", w["image"]), "INPUT.MIN_SIZE_TEST")
    add("predict-missing-data", cascade("predict", "--config", CONFIG, *pr, "--opts", *CPU, "--", str(Path(w["nowhere"]) / "x.jpg")), "x.jpg")
    add("predict-missing-weights", cascade("predict", "--config", CONFIG, *pr, "--opts", *CPU, "--", w["image"]), "model.pth")

    root = ["--root", str(Path(out) / "store")]
    add("ingest-missing-data", cascade("ingest", "--source", w["nowhere"], *root), "nowhere")
    add("ingest-unknown-split", cascade("ingest", "--source", w["data"], *root, "--splits", "nosuch2017"), "nosuch2017")
    add("ingest-wrong-type", cascade("ingest", "--source", w["bad"], *root, "--splits", "val2017"), "bad bbox")
    add("ingest-wrong-type-option", cascade("ingest", "--source", w["data"], *root, "--max-images", "ten"), "--max-images")
    weights_out = ["--output", str(Path(out) / "w.pth")]
    add("fetch-weights-missing-weights", cascade("fetch-weights", missing_weights, *weights_out), "model.pth")
    add("fetch-weights-unknown-scheme", cascade("fetch-weights", "detectron3://R-50.pkl", *weights_out), "detectron3://")
    add("make-shapes-wrong-value", cascade("make-shapes", str(Path(out) / "s"), "--min-size", "8"), "--min-size")
    add("make-shapes-unwritable", cascade("make-shapes", str(Path(w["not_a_dir"]) / "s"), "--train", "1", "--val", "1"), "a-file")

    yaml_out = ["--output", str(Path(out) / "p.yaml")]
    add("compile-unwritable", pipelines("compile", "--output", str(Path(w["not_a_dir"]) / "p.yaml")), "a-file")
    add("compile-unknown-key", pipelines("compile", *yaml_out, "--secret-key", "AWS_TOKEN=x"), "AWS_TOKEN")
    add("compile-wrong-value", pipelines("compile", *yaml_out, "--retries", "-1"), "--retries")
    good_root = ["--param", "root=s3://my-bucket/cascade-rcnn"]
    for command, extra in (("submit", []), ("schedule", ["--cron", "0 2 * * *"])):
        run = [command, "--endpoint", DEAD, *extra]
        add(f"{command}-missing-config", pipelines(*run, "--package", missing_config, *good_root), "config.yaml")
        add(f"{command}-unknown-key", pipelines(*run, "--package", COMPILED, *good_root, "--param", "gpus=8"), "gpus")
        add(f"{command}-wrong-type", pipelines(*run, "--package", COMPILED, *good_root, "--param", "iterations=abc"), "iterations")
        add(f"{command}-missing-data", pipelines(*run, "--package", COMPILED), "root")
        add(f"{command}-missing-weights", pipelines(*run, "--package", COMPILED, *good_root, "--param", f"weights={missing_weights}"), "model.pth")
    add("schedule-wrong-cron", pipelines("schedule", "--endpoint", DEAD, "--cron", "0 2 * *", "--package", COMPILED, *good_root), "cron")
    local = ["run-local", "--workdir", str(Path(out) / "demo")]
    add("run-local-missing-config", pipelines(*local, "--package", missing_config), "config.yaml")
    add("run-local-unknown-key", pipelines(*local, "--package", COMPILED, "--param", "gpus=8"), "gpus")
    add("run-local-wrong-type", pipelines(*local, "--package", COMPILED, "--param", "amp=maybe"), "amp")
    add("run-local-wrong-value", pipelines(*local, "--eval-period", "-1"), "--eval-period")
    return c
# fmt: on


CASE_IDS = list(cases({k: "/x" for k in ("data", "bad", "image", "out", "not_a_dir", "nowhere")}))


def run(argv: list[str], **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != errors.DEBUG_ENV}
    environ["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO), environ.get("PYTHONPATH", "")])
    environ.update(env)
    return subprocess.run(argv, cwd=REPO, env=environ, capture_output=True, text=True, timeout=600)


def error_line(prog: str, proc: subprocess.CompletedProcess) -> str:
    """The one `prog: error: ...` line; only its indented details may follow it."""
    lines = proc.stderr.rstrip("\n").splitlines()
    found = [i for i, line in enumerate(lines) if line.startswith(f"{prog}: error: ")]
    assert len(found) == 1, proc.stderr[-3000:]
    after = lines[found[0] + 1 :]
    assert all(line.startswith("  ") for line in after), proc.stderr[-3000:]
    return lines[found[0]]


@pytest.mark.parametrize("case", CASE_IDS)
def test_a_mistake_is_one_line_with_status_2(case, work):
    prog, argv, words = cases(work)[case]
    proc = run(argv)
    assert proc.returncode == errors.EXIT_STATUS, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]
    assert words in error_line(prog, proc)


@pytest.mark.slow
def test_a_workers_mistake_is_one_line_naming_its_rank(work):
    # Two workers under torch's elastic agent; each fails to load the weights after building its
    # model. The agent's own record of the failed worker (a ProcessExitedException traceback) is
    # left out; the command prints the first failure's message.
    prog, argv = cascade(
        "train", "--config", CONFIG, "--data", work["data"], "--output", work["out"],
        "--nproc-per-node", "2", "--opts", *CPU, "MODEL.WEIGHTS", "/nowhere/model.pth",
    )  # fmt: skip
    proc = run(argv)
    assert proc.returncode == errors.EXIT_STATUS, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "ProcessExitedException" not in proc.stderr, proc.stderr[-3000:]
    line = error_line(prog, proc)
    assert line.startswith(f"{prog}: error: rank 0: ") or line.startswith(f"{prog}: error: rank 1: ")
    assert "/nowhere/model.pth" in line
    assert "starting 2 workers" in proc.stdout  # it did get as far as the workers

    # --debug shows the worker's traceback (torch's own report of the child's failure).
    proc = run([*argv[:4], "--debug", *argv[4:]])
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "CheckpointError" in proc.stderr


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_adds_the_traceback(how, work):
    prog, argv, _ = cases(work)["train-unknown-key"]
    proc = run([*argv[:4], "--debug", *argv[4:]]) if how == "flag" else run(argv, **{errors.DEBUG_ENV: "1"})
    assert proc.returncode == errors.EXIT_STATUS
    assert "Traceback (most recent call last)" in proc.stderr and "ConfigError" in proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1].startswith(f"{prog}: error: ")


def test_debug_before_the_command(work):
    prog, argv, _ = cases(work)["evaluate-unknown-key"]
    proc = run([*argv[:3], "--debug", *argv[3:]])  # cascade-rcnn --debug evaluate ...
    assert proc.returncode == errors.EXIT_STATUS
    assert "Traceback" in proc.stderr and "NO_SUCH_KEY" in proc.stderr


def test_only_the_projects_errors_are_one_line(capsys):
    def bug() -> int:
        raise KeyError("a bug")

    with pytest.raises(KeyError):  # an unexpected error keeps its traceback
        errors.run_command("prog", bug)

    def mistake() -> int:
        from cascade_rcnn.data.coco import DataError

        raise DataError("/data: no annotations")

    assert errors.run_command("prog", mistake) == errors.EXIT_STATUS
    assert capsys.readouterr().err == "prog: error: /data: no annotations\n"


def test_every_error_type_of_the_project_is_one_line():
    """Each exception class the project defines derives from CascadeRCNNError, except the few that
    never leave their module (internal control flow)."""
    import ast

    internal = {"_Retry", "_Stopped"}  # a retry signal and a stop signal, caught where raised
    found = []
    for path in sorted((REPO / "src").rglob("*.py")) + sorted((REPO / "pipelines").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name.endswith(("Error", "Exception")):
                found.append(node.name)
            elif isinstance(node, ast.ClassDef) and any(
                isinstance(b, ast.Name)
                and b.id in ("Exception", "BaseException", "RuntimeError", "ValueError")
                for b in node.bases
            ):
                found.append(node.name)
    assert len(found) > 15
    import importlib

    modules = [
        "cascade_rcnn.accel", "cascade_rcnn.checkpoint", "cascade_rcnn.config", "cascade_rcnn.data.coco",
        "cascade_rcnn.data.image_io", "cascade_rcnn.engine.background", "cascade_rcnn.engine.checkpointer",
        "cascade_rcnn.engine.launch", "cascade_rcnn.engine.preemption",
        "cascade_rcnn.engine.solver", "cascade_rcnn.engine.trainjob", "cascade_rcnn.ingest",
        "cascade_rcnn.ingest.download", "cascade_rcnn.ingest.validate", "cascade_rcnn.local_s3",
        "cascade_rcnn.predict", "cascade_rcnn.registry", "cascade_rcnn.storage", "cascade_rcnn.weight_sources",
        "pipelines.params", "pipelines.submit",
    ]  # fmt: skip
    classes = {}
    for name in modules:
        module = importlib.import_module(name)
        for attr in vars(module).values():
            if isinstance(attr, type) and issubclass(attr, BaseException):
                classes[attr.__name__] = attr
    for name in set(found) - internal:
        assert name in classes, f"{name}: add its module to this test"
        assert issubclass(classes[name], errors.CascadeRCNNError), name
