"""TrainJobs of several nodes through the kubeflow SDK's container backend on the local podman engine:
the same launcher (cascade_rcnn.engine.trainjob.run_trainjob) a nodes > 1 train step runs on a
cluster, here creating one container per node on a per-job network, nodes meeting through
torchrun's static rendezvous and training over gloo against the host's SeaweedFS.

The runtime is images/local/trainer-runtime.yaml (pull_policy Never): the cpu image with a
login-shell PATH fix (images/local/build-trainer-node.sh). The nodes reach SeaweedFS, which listens
on 127.0.0.1 only, through a relay on the host that the job network's gateway
(host.containers.internal) answers on.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from cascade_rcnn import storage
from cascade_rcnn.engine.launch import TrainJob
from cascade_rcnn.engine.trainjob import Cluster, TrainJobError, run_trainjob, trainjob_name

pytestmark = [pytest.mark.containers, pytest.mark.multinode, pytest.mark.usefixtures("d2_parity")]

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT.parent / "shared" / "fixtures" / "d2_parity"
RUNTIME = ROOT / "images" / "local" / "trainer-runtime.yaml"
NODE_IMAGE_ENV = "CASCADE_RCNN_TEST_NODE_IMAGE"
DEFAULT_NODE_IMAGE = "localhost/cascade-rcnn-cpu:local-node"
CONFIG_IN_IMAGE = "/opt/cascade-rcnn/configs/Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml"
CONFIG_HERE = str(ROOT / "configs" / "Misc" / "cascade_mask_rcnn_R_50_FPN_1x.yaml")

# The parity fixture's slim widths (as in test_components_in_containers.py), then the settings of
# tests/test_engine_train.py's DDP test, under which 2 workers of 1 image each update exactly as 1
# worker of 2 images does (see the reasoning there): no masks, huge RPN batch, every RoI used, no
# gt appending, equal-size images without aspect grouping.
SLIM = [
    "MODEL.RESNETS.STEM_OUT_CHANNELS", "16",
    "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "MODEL.RESNETS.WIDTH_PER_GROUP", "16",
    "MODEL.FPN.OUT_CHANNELS", "64",
    "MODEL.ROI_HEADS.NUM_CLASSES", "3",
    "MODEL.ROI_BOX_HEAD.FC_DIM", "256",
    "MODEL.ROI_MASK_HEAD.CONV_DIM", "64",
    "MODEL.DEVICE", "cpu",
    "DATALOADER.NUM_WORKERS", "0",
]  # fmt: skip
DDP = [
    *SLIM,
    "MODEL.MASK_ON", "False",
    "INPUT.MIN_SIZE_TRAIN", "(128,)",
    "INPUT.MAX_SIZE_TRAIN", "128",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "300",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64",
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "100000",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "512",
    "MODEL.ROI_HEADS.POSITIVE_FRACTION", "1.0",
    "MODEL.ROI_HEADS.PROPOSAL_APPEND_GT", "False",
    "DATALOADER.ASPECT_RATIO_GROUPING", "False",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.BASE_LR", "0.02",
    "SOLVER.WARMUP_ITERS", "0",
    "SOLVER.MAX_ITER", "2",
    "SOLVER.CHECKPOINT_PERIOD", "1000",
    "SEED", "5",
]  # fmt: skip


# ---- a relay from the job networks to the host's SeaweedFS ----


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class Relay:
    """TCP relay 0.0.0.0:port -> 127.0.0.1:target, bytes passed unchanged (SigV4 signs the Host
    header the client sent, which the server then sees as is)."""

    def __init__(self, target: int):
        self.target = target
        self.listener = socket.create_server(("0.0.0.0", 0))
        self.port = self.listener.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=_pipe, args=(client, upstream), daemon=True).start()
            threading.Thread(target=_pipe, args=(upstream, client), daemon=True).start()

    def close(self) -> None:
        self.closed = True
        self.listener.close()


@pytest.fixture(scope="module")
def relay(s3_server):
    r = Relay(s3_server.ports["s3"])
    yield r
    r.close()


@pytest.fixture(scope="module")
def node_image(docker_client) -> str:
    import docker

    name = os.environ.get(NODE_IMAGE_ENV, DEFAULT_NODE_IMAGE)
    try:
        docker_client.images.get(name)
    except docker.errors.ImageNotFound:
        pytest.fail(f"image {name} is not in the engine: build it with images/local/build-trainer-node.sh")
    return name


@pytest.fixture(scope="module")
def client(docker_client):
    from kubeflow.trainer import TrainerClient
    from kubeflow.trainer.backends.container.types import ContainerBackendConfig, TrainingRuntimeSource

    host = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    config = ContainerBackendConfig(
        container_host=host,
        container_runtime="docker",  # podman serving the Docker API
        pull_policy="Never",
        runtime_source=TrainingRuntimeSource(sources=[str(RUNTIME)]),
    )
    return TrainerClient(backend_config=config)


@pytest.fixture
def cluster(relay, node_image, s3_server):
    env = dict(s3_server.env())
    env["AWS_ENDPOINT_URL"] = f"http://host.containers.internal:{relay.port}"
    env["OMP_NUM_THREADS"] = "1"  # two nodes on a 2-core machine
    return Cluster(nodes=2, image=node_image, procs_per_node=1, env=env, poll_s=1.0, schedule_timeout_s=900)


@pytest.fixture
def data(s3_env, tmp_path) -> tuple[str, str]:
    """(square shapes in COCO layout, the parity fixture's weights) under s3://bucket/raw/."""
    from cascade_rcnn.data.shapes import make_shapes

    local = tmp_path / "square_shapes"
    make_shapes(str(local), num_train=8, num_val=2, seed=1, min_size=128, max_size=128)
    shapes = f"s3://{s3_env}/raw/square_shapes"
    storage.upload_tree(str(local), shapes, progress=False)
    weights = f"s3://{s3_env}/raw/model_final.pkl"
    storage.put_file(str(FIXTURE / "model_final.pkl"), weights)
    return shapes, weights


def job_containers(docker_client, name: str) -> list:
    return docker_client.containers.list(
        all=True, filters={"label": f"trainer.kubeflow.org/trainjob-name={name}"}
    )


def final_weights(uri: str, tmp: Path) -> dict[str, torch.Tensor]:
    local = tmp / f"final-{abs(hash(uri))}.pth"
    storage.get_file(uri, str(local))
    return torch.load(local, weights_only=True)["model"]


def test_two_nodes_train_as_one_node_with_two_workers(client, cluster, data, s3_env, tmp_path, docker_client):
    import subprocess
    import sys

    from cascade_rcnn.checkpoint import load_weights

    shapes, weights = data
    two_nodes = f"s3://{s3_env}/runs/two-nodes/train"
    job = TrainJob(
        config=CONFIG_IN_IMAGE,
        data=shapes,
        output=two_nodes,
        train_split="train2017",
        init_weights=weights,
        opts=DDP,
    )
    record = run_trainjob(job, cluster, client, run_key=two_nodes)
    assert record["checkpoint_uri"] == f"{two_nodes}/model_final.pth"
    assert record["accelerator"].startswith("2 nodes x 1 x")
    assert not job_containers(docker_client, trainjob_name(two_nodes, "train"))  # deleted when done

    # The reference: one node, two workers, here on the host.
    one_node = f"s3://{s3_env}/runs/one-node/train"
    cmd = [
        sys.executable, "-m", "cascade_rcnn.cli", "train", "--config", CONFIG_HERE, "--data", shapes,
        "--output", one_node, "--train-split", "train2017", "--nproc-per-node", "2",
        "--opts", "MODEL.WEIGHTS", weights, *DDP,
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    start = load_weights(str(FIXTURE / "model_final.pkl"))
    w1 = final_weights(f"{one_node}/model_final.pth", tmp_path)
    w2 = final_weights(record["checkpoint_uri"], tmp_path)
    trained = [k for k in w1 if k in start and not torch.equal(w1[k], start[k].to(w1[k].dtype))]
    assert len(trained) > 50
    step = torch.cat([(w1[k] - start[k]).flatten() for k in trained])
    gap = torch.cat([(w2[k] - w1[k]).flatten() for k in trained])
    # The DDP test's tolerance: float32 summation-order noise; a missing all-reduce across the
    # nodes would leave a gap of the size of the update itself.
    assert step.norm() > 1e-3
    assert gap.norm() / step.norm() < 1e-3, (gap.norm().item(), step.norm().item())
    meta = torch.load(tmp_path / f"final-{abs(hash(record['checkpoint_uri']))}.pth", weights_only=True)[
        "meta"
    ]
    assert meta["world_size"] == 2


def test_a_failing_job_fails_the_launcher_with_the_jobs_error(client, cluster, data, s3_env, docker_client):
    shapes, weights = data
    output = f"s3://{s3_env}/runs/bad-key/train"
    job = TrainJob(
        config=CONFIG_IN_IMAGE,
        data=shapes,
        output=output,
        train_split="train2017",
        init_weights=weights,
        opts=[*DDP, "MODEL.NO_SUCH_KEY", "1"],
    )
    with pytest.raises(TrainJobError) as failure:
        run_trainjob(job, cluster, client, run_key=output)
    message = str(failure.value)
    assert f"TrainJob {trainjob_name(output, 'train')} failed" in message
    assert "NO_SUCH_KEY" in message  # the nodes' own error, from their log
    assert "node-0" in message and "node-1" in message
    assert not job_containers(docker_client, trainjob_name(output, "train"))


def test_a_node_killed_mid_run_and_the_retry_resumes(client, cluster, data, s3_env, docker_client, capsys):
    shapes, weights = data
    output = f"s3://{s3_env}/runs/killed/train"
    name = trainjob_name(output, "train")
    opts = [*DDP, "SOLVER.MAX_ITER", "40", "SOLVER.CHECKPOINT_PERIOD", "3"]
    job = TrainJob(
        config=CONFIG_IN_IMAGE,
        data=shapes,
        output=output,
        train_split="train2017",
        init_weights=weights,
        opts=opts,
    )
    outcome: dict = {}

    def first_attempt():
        try:
            outcome["record"] = run_trainjob(job, cluster, client, run_key=output)
        except TrainJobError as e:
            outcome["error"] = e

    attempt = threading.Thread(target=first_attempt)
    attempt.start()
    while not storage.exists(f"{output}/last_checkpoint") and attempt.is_alive():
        time.sleep(0.5)
    assert attempt.is_alive(), outcome
    (node1,) = [c for c in job_containers(docker_client, name) if c.name.endswith("-node-1")]
    node1.kill()
    attempt.join()
    assert "error" in outcome, outcome  # the killed node failed the job, and so the step
    assert f"TrainJob {name} failed" in str(outcome["error"])
    assert not job_containers(docker_client, name)

    capsys.readouterr()
    record = run_trainjob(job, cluster, client, run_key=output)  # the step's retry
    log = capsys.readouterr().out
    resumed = [line for line in log.splitlines() if "resuming from" in line]
    assert resumed, log[-3000:]
    iteration = int(resumed[0].rsplit("iteration", 1)[1].split()[0])
    assert 0 < iteration < 40
    assert record["checkpoint_uri"] == f"{output}/model_final.pth"
    assert not job_containers(docker_client, name)


LAUNCHER = """
import json, os, sys
from kubeflow.trainer import TrainerClient
from kubeflow.trainer.backends.container.types import ContainerBackendConfig, TrainingRuntimeSource
from cascade_rcnn.engine.launch import TrainJob
from cascade_rcnn.engine.trainjob import Cluster, run_trainjob

args = json.loads(sys.argv[1])
client = TrainerClient(backend_config=ContainerBackendConfig(
    container_host=args["host"], container_runtime="docker", pull_policy="Never",
    runtime_source=TrainingRuntimeSource(sources=[args["runtime"]])))
run_trainjob(TrainJob(**args["job"]), Cluster(**args["cluster"]), client, run_key=args["job"]["output"])
"""


def test_a_stopped_launcher_deletes_its_job(cluster, data, s3_env, docker_client, tmp_path):
    import dataclasses
    import json
    import signal
    import subprocess
    import sys

    shapes, weights = data
    output = f"s3://{s3_env}/runs/stopped/train"
    name = trainjob_name(output, "train")
    job = TrainJob(
        config=CONFIG_IN_IMAGE,
        data=shapes,
        output=output,
        train_split="train2017",
        init_weights=weights,
        opts=[*DDP, "SOLVER.MAX_ITER", "1000"],
    )
    args = {
        "host": os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock",
        "runtime": str(RUNTIME),
        "job": dataclasses.asdict(job),
        "cluster": {**dataclasses.asdict(cluster), "tolerations": []},
    }
    log = tmp_path / "launcher.txt"
    with open(log, "w") as f:
        launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, json.dumps(args)], stdout=f, stderr=f)
    try:
        while len(job_containers(docker_client, name)) < 2 and launcher.poll() is None:
            time.sleep(0.5)
        assert launcher.poll() is None, log.read_text()[-3000:]
        launcher.send_signal(signal.SIGTERM)  # what the kubelet sends when the step's pod goes
        assert launcher.wait() != 0
    finally:
        if launcher.poll() is None:
            launcher.kill()
    text = log.read_text()
    assert f"launcher stopped (signal {int(signal.SIGTERM)}); TrainJob {name} deleted" in text, text[-3000:]
    assert not job_containers(docker_client, name)
