"""Long runs that storage outages and preemption cannot break (issue 22), end to end through
`cascade-rcnn train` against a real SeaweedFS that the tests kill and restart.

Every run here ends with final weights identical to an undisturbed run of the same recipe: the
slim Cascade Mask R-CNN of test_engine_train.py on a 24-image shapes set, one data loader worker
(so worker processes must survive the waits), 10 iterations (all in the first epoch), a checkpoint
every 3. The server sits behind a byte-passing proxy (s3_proxy.py) that picks the moment of the
fault: a request is let through or not, the outage itself is the real server killed and restarted.

- an outage of 30 s while first-epoch images are read: the data loader worker waits, the batch is
  late, not failed;
- an outage of 45 s that starts once the first checkpoint is stored, with data and output on S3:
  the run finishes without a rerun;
- an outage during a checkpoint's multipart upload: training goes on meanwhile;
- an outage during periodic evaluation (its validation images are read from S3);
- SIGTERM to a 2-process run at a random moment, then the same command again (the step's retry);
- SIGTERM to the process group (as Argo forwards it) while a checkpoint upload is in flight.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import torch
from s3_proxy import S3Proxy
from s3_test_env import point_env_at
from test_engine_train import FAST, cli, final_weights, run_ok

from cascade_rcnn import storage
from cascade_rcnn.local_s3 import start_seaweedfs
from cascade_rcnn.storage.retry import RETRY_ENV

pytestmark = [pytest.mark.usefixtures("d2_parity"), pytest.mark.slow]

BUCKET = "faults"
RECIPE = [*FAST, "DATALOADER.NUM_WORKERS", "1", "SOLVER.MAX_ITER", "10", "SOLVER.CHECKPOINT_PERIOD", "3"]
VAL = ["INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "192", "TEST.EVAL_PERIOD", "3"]
RECOVERED = re.compile(r"(\w+) (s3://\S+) at \S+: recovered after ([\d.]+) s")


class Store:
    """A SeaweedFS of this module's own (killing it must not touch other tests) behind a proxy."""

    def __init__(self, root: Path):
        self.server = start_seaweedfs(root)
        self.proxy = S3Proxy(int(self.server.endpoint_url.rsplit(":", 1)[1]))
        self.struck_at = 0.0

    def kill(self) -> None:
        self.struck_at = time.monotonic()
        self.server.kill()

    def outage(self, rule, seconds: float, proc: subprocess.Popen) -> None:
        """Once `rule` has fired (its action killed the server), restart the server `seconds` later.
        From the test's thread: the server dies with the thread that started it."""
        while not rule.fired.is_set():
            assert proc.poll() is None, "the run ended before the fault could strike"
            time.sleep(0.02)
        while not self.struck_at:
            time.sleep(0.02)
        time.sleep(max(0.0, self.struck_at + seconds - time.monotonic()))
        self.struck_at = 0.0
        self.server.restart()

    def close(self) -> None:
        self.proxy.close()
        self.server.close()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    s = Store(tmp_path_factory.mktemp("faults-s3"))
    try:
        s.server.client().create_bucket(Bucket=BUCKET)
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def shapes24(tmp_path_factory) -> str:
    """12 batches of 2 in the first epoch: the 10 trained all read their images the first time."""
    from cascade_rcnn.data.shapes import make_shapes

    root = tmp_path_factory.mktemp("shapes24")
    make_shapes(str(root), num_train=24, num_val=4, seed=0, min_size=128, max_size=160)
    return str(root)


@pytest.fixture(scope="module")
def s3_data(store, shapes24) -> str:
    client = store.server.client()
    for path in Path(shapes24).rglob("*"):
        if path.is_file():
            client.upload_file(str(path), BUCKET, f"data/{path.relative_to(shapes24).as_posix()}")
    return f"s3://{BUCKET}/data"


@pytest.fixture
def env(store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Runs talk to the store through the proxy, with an empty image cache (the first epoch reads
    every image from S3) and a budget no test should come near."""
    point_env_at(store.server, monkeypatch)
    monkeypatch.setenv("AWS_ENDPOINT_URL", store.proxy.endpoint_url)
    monkeypatch.setenv(RETRY_ENV, "300")
    monkeypatch.setenv("CASCADE_RCNN_CACHE", str(tmp_path / "cache"))
    return tmp_path


@pytest.fixture(scope="module")
def reference(shapes24, tmp_path_factory) -> dict[str, torch.Tensor]:
    tmp = tmp_path_factory.mktemp("reference")
    run_ok(cli("train", shapes24, str(tmp / "out"), RECIPE), tmp / "log.txt")
    return final_weights(str(tmp / "out"), tmp)


@pytest.fixture(scope="module")
def reference_2proc(shapes24, tmp_path_factory) -> dict[str, torch.Tensor]:
    tmp = tmp_path_factory.mktemp("reference_2proc")
    run_ok(cli("train", shapes24, str(tmp / "out"), RECIPE, "--nproc-per-node", "2"), tmp / "log.txt")
    return final_weights(str(tmp / "out"), tmp)


def start(cmd: list[str], log: Path, **kwargs) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, **kwargs)


def finish(proc: subprocess.Popen, log: Path, returncode: int | None = 0) -> str:
    """The run's log once it has ended, with the exit status it must have (None: any)."""
    proc.wait()
    text = log.read_text()
    assert returncode is None or proc.returncode == returncode, text[-5000:]
    return text


def wait_for_line(proc: subprocess.Popen, log: Path, text: str) -> None:
    while text not in log.read_text():
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.02)


def assert_same(got: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert got.keys() == reference.keys()
    different = [k for k in reference if not torch.equal(got[k], reference[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"


def recovered(text: str) -> list[tuple[str, str, float]]:
    """(operation, URI, seconds waited) of every request that waited out an outage."""
    return [(op, uri, float(s)) for op, uri, s in RECOVERED.findall(text)]


def pointer(output: str) -> str:
    return storage.get_bytes(storage.join(output, "last_checkpoint")).decode()


def part_two(output: str, name: str) -> str:
    """The request that uploads part 2 of `name`'s multipart upload (36 MB in 16 MB parts)."""
    return rf"PUT /{re.escape(output[5:])}/{re.escape(name)}\?\S*partNumber=2\b"


def run_id() -> str:
    return uuid.uuid4().hex[:8]


# ---- outages ----


def test_outage_while_first_epoch_images_are_read(store, s3_data, env, reference):
    """The store dies as the 9th training image is fetched (batch 4; the loader's one worker runs at
    most 2 batches ahead of iteration 2) and stays down 30 s. The worker waits it out: the loop gets
    its batches late, not failed. The output is local, so nothing else holds the loop up."""
    out = env / "out"
    rule = store.proxy.on(rf"GET /{BUCKET}/data/train2017/", skip=8, before=store.kill)
    proc = start(cli("train", s3_data, str(out), RECIPE), env / "log.txt")
    store.outage(rule, 30, proc)
    text = finish(proc, env / "log.txt")

    assert_same(final_weights(str(out), env), reference)
    image_waits = [
        (m.start(), float(m.group(3)))
        for m in RECOVERED.finditer(text)
        if m.group(1) in ("get", "head") and "/train2017/" in m.group(2)
    ]
    assert image_waits and max(w for _, w in image_waits) >= 30, text[-4000:]
    # The last iteration ran after the first image read recovered: the loop was waiting for data.
    assert text.index("iter: 9 ") > image_waits[0][0]


def test_outage_after_the_first_checkpoint_costs_time_not_the_run(store, s3_data, env, reference):
    """Data and output on S3; the store goes down for 45 s right after the first checkpoint's
    pointer is stored. The run waits where it must (image reads in the data loader worker, the
    next checkpoint's write), finishes without a rerun and trains the same model."""
    out = f"s3://{BUCKET}/runs/{run_id()}"
    rule = store.proxy.on(rf"PUT /{out[5:]}/last_checkpoint ", after_answer=store.kill)
    proc = start(cli("train", s3_data, out, RECIPE), env / "log.txt")
    store.outage(rule, 45, proc)
    text = finish(proc, env / "log.txt")

    assert_same(final_weights(out, env), reference)
    assert "resuming from" not in text and pointer(out) == "model_final.pth"
    assert max(s for _, _, s in recovered(text)) >= 40, text[-4000:]  # the run felt the outage


def test_outage_during_a_checkpoint_upload(store, shapes24, env, reference):
    """The store dies between two parts of the first checkpoint's multipart upload (36 MB in 16 MB
    parts) and stays down 15 s. The upload is repeated once it is back; training goes on meanwhile
    and the next checkpoint waits for the first one's write."""
    out = f"s3://{BUCKET}/runs/{run_id()}"
    rule = store.proxy.on(part_two(out, "model_0000002.pth"), before=store.kill)
    proc = start(cli("train", shapes24, out, RECIPE), env / "log.txt")
    store.outage(rule, 15, proc)
    text = finish(proc, env / "log.txt")

    assert_same(final_weights(out, env), reference)
    assert ("put", f"{out}/model_0000002.pth") in [(op, uri) for op, uri, _ in recovered(text)], text[-4000:]
    assert f"waiting for the background write of {out}/model_0000002.pth" in text
    assert pointer(out) == "model_final.pth"


def test_outage_during_periodic_evaluation(store, s3_data, env, reference):
    """TEST.EVAL_PERIOD 3 with the validation images on S3; the store dies at the first one and
    stays down 15 s. The evaluation waits, all four evaluations land, and the weights are those of
    the undisturbed run without evaluation (evaluation leaves training unchanged:
    test_engine_eval_period.py)."""
    import json

    out = env / "out"
    rule = store.proxy.on(rf"GET /{BUCKET}/data/val2017/", before=store.kill)
    proc = start(cli("train", s3_data, str(out), [*RECIPE, *VAL], "--val-split", "val2017"), env / "log.txt")
    store.outage(rule, 15, proc)
    text = finish(proc, env / "log.txt")

    assert_same(final_weights(str(out), env), reference)
    assert [op for op, uri, _ in recovered(text) if "/val2017/" in uri], text[-4000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "bbox/AP" in r] == [2, 5, 8, 9]


# ---- preemption ----


def test_sigterm_at_a_random_moment_then_the_same_command(shapes24, tmp_path, reference_2proc):
    """SIGTERM to the launcher of 2 workers (as `kill`, `docker stop`): it passes the signal on, both
    ranks finish their iteration and agree on it, its checkpoint is written, and the run exits 143.
    The same command resumes from that iteration and ends with the undisturbed run's weights.

    The moment is random, and each of its three outcomes is checked: stopped after some iteration;
    stopped after the final checkpoint, while the workers shut down (exit 143, the rerun has
    nothing to train); or not stopped at all, because the run had ended (exit 0). The 10 iterations
    took 2.3 s (a CI run, 2 cores) to 10 s (loaded), so a delay of up to 3 s meets all three."""
    out = str(tmp_path / "out")
    cmd = cli("train", shapes24, out, RECIPE, "--nproc-per-node", "2")
    delay = random.Random(os.urandom(8)).uniform(0.0, 3.0)
    proc = start(cmd, tmp_path / "stopped.txt")
    wait_for_line(proc, tmp_path / "stopped.txt", "starting training at iteration 0")
    time.sleep(delay)
    proc.send_signal(signal.SIGTERM)
    text = finish(proc, tmp_path / "stopped.txt", returncode=None)
    stopped = sorted(set(re.findall(r"stopped on request \(SIGTERM\) after iteration (\d+)", text)))
    if proc.returncode == 0:  # the signal came after the workers had ended: nothing was left to stop
        assert pointer(out) == "model_final.pth", text[-3000:]
    elif not stopped:  # after the final checkpoint, while the workers shut down
        assert proc.returncode == 143, (delay, text[-5000:])
        assert pointer(out) == "model_final.pth", (delay, text[-5000:])
        again = run_ok(cmd, tmp_path / "again.txt")
        assert "already holds the final checkpoint of 10 iterations; nothing to train" in again
    else:
        assert proc.returncode == 143, (delay, text[-5000:])
        assert len(stopped) == 1, (delay, stopped, text[-5000:])  # both ranks, the same iteration
        iteration = int(stopped[0])
        assert pointer(out) == f"model_{iteration:07d}.pth", (delay, text[-3000:])
        resumed = run_ok(cmd, tmp_path / "resumed.txt")
        assert f"resuming from {out}/model_{iteration:07d}.pth: iteration {iteration + 1}" in resumed
    assert_same(final_weights(out, tmp_path), reference_2proc)


def test_the_same_command_after_the_final_checkpoint_trains_nothing(shapes24, tmp_path, reference):
    """What a retry meets when the step was stopped after its final checkpoint (the SIGTERM came
    while the workers shut down): the final checkpoint is there, nothing is trained again, and the
    weights stay the undisturbed run's."""
    out = str(tmp_path / "out")
    cmd = cli("train", shapes24, out, RECIPE)
    run_ok(cmd, tmp_path / "first.txt")
    again = run_ok(cmd, tmp_path / "again.txt")
    assert "already holds the final checkpoint of 10 iterations; nothing to train" in again
    assert "starting training" not in again
    assert pointer(out) == "model_final.pth"
    assert_same(final_weights(out, tmp_path), reference)


def test_sigterm_while_a_checkpoint_upload_is_in_flight(store, shapes24, env, reference):
    """SIGTERM to the whole process group (as Argo's emissary forwards it in a KFP pod: the trainer
    and its data loader worker get it) while the first checkpoint's upload hangs for 8 s. The
    trainer finishes its iteration, waits for that upload, writes the checkpoint of the iteration
    it stopped at, and exits 143; the same command resumes from it."""
    out = f"s3://{BUCKET}/runs/{run_id()}"
    procs: list[subprocess.Popen] = []

    def preempt_and_hang() -> None:
        os.killpg(procs[0].pid, signal.SIGTERM)
        time.sleep(8)  # this part of the upload is held back while the trainer reacts

    rule = store.proxy.on(part_two(out, "model_0000002.pth"), before=preempt_and_hang)
    cmd = cli("train", shapes24, out, RECIPE)
    procs.append(start(cmd, env / "stopped.txt", start_new_session=True))
    text = finish(procs[0], env / "stopped.txt", returncode=143)
    assert rule.fired.is_set()
    iteration = int(re.findall(r"stopped on request \(SIGTERM\) after iteration (\d+)", text)[0])
    assert iteration >= 2
    assert f"waiting for the background write of {out}/model_0000002.pth" in text
    assert "DataLoader worker" not in text  # the loader's worker ignored the signal
    assert pointer(out) == f"model_{iteration:07d}.pth"

    resumed = run_ok(cmd, env / "resumed.txt")
    assert f"resuming from {out}/model_{iteration:07d}.pth: iteration {iteration + 1}" in resumed
    assert_same(final_weights(out, env), reference)
