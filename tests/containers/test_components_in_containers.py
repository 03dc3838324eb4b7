"""The components, run in the cpu image through kfp.local's DockerRunner, as a user testing them
locally before a run reaches the cluster: against the host's SeaweedFS over the host network, with
the S3 credentials given as run-time environment.

Every test also checks that the step ran as the image's non-root user: the files it wrote into the
mounted pipeline root belong to uid 1000.
"""

import json
from pathlib import Path

import pytest

from cascade_rcnn import storage
from cascade_rcnn.data.shapes import make_shapes

pytestmark = pytest.mark.containers

IMAGE_UID = 1000  # images/*/Dockerfile: USER 1000:1000
FIXTURE = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "d2_parity"
# Configs as the image holds them (WORKDIR /opt/cascade-rcnn).
CONFIG = "/opt/cascade-rcnn/configs/Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml"
# The parity fixture's slim widths (its config.yaml) on top of the full config, so its checkpoint
# loads; no DataLoader workers, to keep the container to the two cores.
SLIM_OPTS = [
    "MODEL.RESNETS.STEM_OUT_CHANNELS", "16",
    "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "MODEL.RESNETS.WIDTH_PER_GROUP", "16",
    "MODEL.FPN.OUT_CHANNELS", "64",
    "MODEL.ROI_HEADS.NUM_CLASSES", "3",
    "MODEL.ROI_BOX_HEAD.FC_DIM", "256",
    "MODEL.ROI_MASK_HEAD.CONV_DIM", "64",
    "INPUT.MIN_SIZE_TEST", "288",
    "INPUT.MAX_SIZE_TEST", "448",
    "DATALOADER.NUM_WORKERS", "0",
]  # fmt: skip


def upload_shapes(tmp_path: Path, bucket: str, num_train: int, num_val: int) -> tuple[str, Path]:
    """A generated shapes data set in COCO layout, put under s3://bucket/raw/shapes."""
    local = tmp_path / "shapes"
    make_shapes(str(local), num_train=num_train, num_val=num_val)
    uri = f"s3://{bucket}/raw/shapes"
    storage.upload_tree(str(local), uri, progress=False)
    return uri, local


def written_files(pipeline_root: Path) -> dict[str, int]:
    """{path relative to the root: owner uid} of every file under the pipeline root."""
    return {
        str(p.relative_to(pipeline_root)): p.stat().st_uid for p in pipeline_root.rglob("*") if p.is_file()
    }


def test_the_image_runs_as_a_numeric_non_root_user_and_holds_no_credentials(docker_client, cpu_image):
    config = docker_client.images.get(cpu_image).attrs["Config"]
    assert config["User"] == f"{IMAGE_UID}:{IMAGE_UID}"
    names = {entry.partition("=")[0] for entry in config.get("Env") or []}
    assert not {n for n in names if n.startswith("AWS_")}, names
    # The entry point runs what it is given, as KFP's command is given, as the image's user.
    out = docker_client.containers.run(cpu_image, ["sh", "-c", "id -u; cascade-rcnn --help"], remove=True)
    uid, usage = out.decode().split("\n", 1)
    assert uid == str(IMAGE_UID)
    assert "usage: cascade-rcnn" in usage


def test_ingest_coco_in_the_image(docker_runner, cpu_image, pipeline_root, tmp_path):
    from components import ingest_coco

    bucket = docker_runner
    source, local = upload_shapes(tmp_path, bucket, num_train=4, num_val=3)
    root = f"s3://{bucket}/data"
    ingest = ingest_coco.build(cpu_image)

    task = ingest(source=source, root=root, name="shapes", splits=["train2017", "val2017"], max_images=0)
    dataset = task.outputs["dataset"]
    manifest_uri = f"{root}/datasets/shapes/manifest.json"
    assert dataset.metadata["manifest_uri"] == manifest_uri
    assert dataset.metadata["reused"] is False
    assert dataset.metadata["counts"]["val2017"]["num_images"] == 3
    # The data set is in the bucket: the manifest, each split's annotations and images, checksums
    # verified by the storage layer on reading.
    manifest = json.loads(storage.get_bytes(manifest_uri))
    assert set(manifest["splits"]) == {"train2017", "val2017"}
    for split, count in (("train2017", 4), ("val2017", 3)):
        stored = json.loads(storage.get_bytes(manifest["splits"][split]["annotations"]))
        original = json.loads((local / "annotations" / f"instances_{split}.json").read_text())
        assert [i["file_name"] for i in stored["images"]] == [i["file_name"] for i in original["images"]]
        images = storage.list_prefix(f"{root}/datasets/shapes/{split}/")
        assert len(images) == count
        first = original["images"][0]["file_name"]
        assert (
            storage.get_bytes(f"{root}/datasets/shapes/{split}/{first}")
            == (local / split / first).read_bytes()
        )
    # Written inside the container by uid 1000, not root.
    owners = written_files(pipeline_root)
    assert any(p.endswith("/dataset") for p in owners), owners
    assert set(owners.values()) == {IMAGE_UID}, owners

    # A second run finds the manifest and transfers nothing.
    again = ingest(source=source, root=root, name="shapes", splits=["train2017", "val2017"], max_images=0)
    assert again.outputs["dataset"].metadata["reused"] is True
    assert again.outputs["dataset"].metadata["transferred_files"] == 0


def test_a_failing_step_fails_the_local_run_with_the_cause_in_its_log(docker_runner, cpu_image, capfd):
    from components import ingest_coco

    bucket = docker_runner
    missing = f"s3://{bucket}/raw/nothing-here"
    with pytest.raises(RuntimeError, match="FAILURE"):
        ingest_coco.build(cpu_image)(
            source=missing, root=f"s3://{bucket}/data", name="shapes", splits=["val2017"], max_images=0
        )
    log = capfd.readouterr().out
    assert f"{missing}/annotations/instances_val2017.json" in log  # the container's error, relayed


@pytest.mark.usefixtures("d2_parity")
def test_pipeline_ingest_fetch_weights_evaluate(docker_runner, cpu_image, pipeline_root, tmp_path):
    """ingest_coco -> fetch_weights -> evaluate, artifacts passed between containers by kfp.local.
    The weights are the parity fixture's detectron2 checkpoint (trained on drawn shapes), so the
    AP on generated shapes is high only when the whole chain (conversion, loading, inference,
    COCO evaluation) is right in the image."""
    from kfp import dsl

    from components import evaluate, fetch_weights, ingest_coco

    bucket = docker_runner
    source, _ = upload_shapes(tmp_path, bucket, num_train=1, num_val=6)
    weights_source = f"s3://{bucket}/raw/model_final.pkl"
    storage.put_file(str(FIXTURE / "model_final.pkl"), weights_source)
    root = f"s3://{bucket}/data"
    ingest, fetch, evaluate_ = (m.build(cpu_image) for m in (ingest_coco, fetch_weights, evaluate))

    @dsl.pipeline(name="containers-smoke")
    def smoke(source: str, weights: str, root: str):
        data = ingest(source=source, root=root, name="shapes", splits=["val2017"], max_images=0)
        model = fetch(source=weights, sha256="", root=root)
        evaluate_(
            dataset=data.outputs["dataset"],
            checkpoint=model.outputs["Output"],
            config=CONFIG,
            config_opts=SLIM_OPTS,
            static_canvas=[],
            device="auto",  # what the pipeline passes by default
            amp=True,
            root=root,
            run_id="smoke",
            job_id="",
            split="val2017",
            max_images=0,
        )

    smoke(source=source, weights=weights_source, root=root)

    checkpoints = storage.list_prefix(f"{root}/weights/")
    assert len(checkpoints) == 1 and checkpoints[0].endswith(".pth"), checkpoints
    storage.get_bytes(checkpoints[0])  # present, and its sha256 matches
    out = f"{root}/runs/smoke/eval"
    metrics = json.loads(storage.get_bytes(f"{out}/metrics.json"))
    assert metrics["bbox"]["AP"] > 60 and metrics["segm"]["AP"] > 60, metrics
    assert b"<html" in storage.get_bytes(f"{out}/report.html").lower()
    assert storage.exists(f"{out}/report.md")

    # KFP's artifacts, written by the containers into the pipeline root as uid 1000; the Metrics
    # artifact holds the AP families as metadata.
    owners = written_files(pipeline_root)
    produced = {Path(p).parent.name + "/" + Path(p).name for p in owners}
    expected = {"ingest-coco/dataset", "fetch-weights/model", "evaluate/table", "evaluate/report"}
    assert expected <= produced, sorted(owners)
    assert set(owners.values()) == {IMAGE_UID}, owners
    (output_file,) = [pipeline_root / p for p in owners if p.endswith("evaluate/executor_output.json")]
    logged = json.loads(output_file.read_text())["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert logged["bbox/AP"] == pytest.approx(metrics["bbox"]["AP"])
    assert logged["segm/AP"] == pytest.approx(metrics["segm"]["AP"])
