"""Train/test loaders: worker-count independence, exact resume, rank sharding, error surfacing, and
reading a data set from s3:// (SeaweedFS) through the local cache."""

from __future__ import annotations

import json

import pytest
import torch

from cascade_rcnn import storage
from cascade_rcnn.config import get_cfg
from cascade_rcnn.data.coco import DataError, load_coco_json
from cascade_rcnn.data.loader import SerializedRecords, build_test_loader, build_train_loader
from cascade_rcnn.data.shapes import make_shapes
from cascade_rcnn.data.splits import load_split, resolve_dataset


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    make_shapes(str(root), num_train=12, num_val=5, seed=21, min_size=96, max_size=160, crowd_every=4)
    return root


@pytest.fixture(scope="module")
def train_records(shapes_root):
    ann = shapes_root / "annotations/instances_train2017.json"
    return load_coco_json(str(ann), str(shapes_root / "train2017"))[0]


def _cfg(grouping: bool = True):
    cfg = get_cfg()
    cfg.MODEL.MASK_ON = True
    cfg.INPUT.MIN_SIZE_TRAIN = (64, 80, 96)
    cfg.INPUT.MAX_SIZE_TRAIN = 160
    cfg.INPUT.MIN_SIZE_TEST = 72
    cfg.INPUT.MAX_SIZE_TEST = 160
    cfg.DATALOADER.ASPECT_RATIO_GROUPING = grouping
    return cfg


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _key(item: dict):
    """Everything a training step sees of one item, comparable with ==."""
    t = item["targets"]
    polys = [[p.tolist() for p in inst] for inst in t.polygons]
    return (item["file_name"], item["image"].numpy().tobytes(), t.boxes.tolist(), t.classes.tolist(), polys)


def _keys(batches):
    return [[_key(d) for d in b] for b in batches]


def test_workers_do_not_change_batches_and_resume_is_exact(train_records):
    cfg = _cfg()
    inline = _take(build_train_loader(cfg, train_records, batch_per_device=2, seed=7, num_workers=0), 8)
    loader = build_train_loader(cfg, train_records, batch_per_device=2, seed=7, num_workers=2)
    with_workers = _take(loader, 8)
    assert _keys(with_workers) == _keys(inline)
    assert loader.iteration == 8 and loader.state_dict()["iteration"] == 8

    for item in with_workers[0]:
        assert item["image"].dtype == torch.uint8 and item["image"].is_contiguous()
        assert item["targets"].boxes.dtype == torch.float32 and item["targets"].classes.dtype == torch.int64
    # Aspect grouping: each batch is all-wide or all-tall (original sizes).
    for batch in with_workers:
        assert len({d["width"] > d["height"] for d in batch}) == 1
    # Different seeds give different streams.
    other = _take(build_train_loader(cfg, train_records, batch_per_device=2, seed=8, num_workers=0), 8)
    assert _keys(other) != _keys(inline)

    resumed = build_train_loader(cfg, train_records, batch_per_device=2, seed=7, num_workers=2, start_iter=5)
    assert _keys(_take(resumed, 3)) == _keys(inline[5:8])

    restored = build_train_loader(cfg, train_records, batch_per_device=2, seed=7, num_workers=0)
    restored.load_state_dict({**loader.state_dict(), "iteration": 6})
    assert _keys(_take(restored, 2)) == _keys(inline[6:8])
    with pytest.raises(ValueError, match="train loader state has world_size=2 but this loader has 1"):
        restored.load_state_dict({**loader.state_dict(), "world_size": 2})


def test_two_ranks_see_the_single_process_global_batch(train_records):
    cfg = _cfg(grouping=False)
    single = _take(build_train_loader(cfg, train_records, batch_per_device=4, seed=3, num_workers=0), 3)
    ranks = [
        _take(
            build_train_loader(
                cfg, train_records, batch_per_device=2, rank=r, world_size=2, seed=3, num_workers=0
            ),
            3,
        )
        for r in range(2)
    ]
    for it in range(3):
        together = sorted(_key(d) for d in ranks[0][it] + ranks[1][it])
        assert together == sorted(_key(d) for d in single[it])


def test_train_loader_filters_empty_images(train_records):
    records = [dict(r) for r in train_records]
    for r in records[1:]:
        r["annotations"] = [dict(a, iscrowd=1) for a in r["annotations"]]
    batches = _take(build_train_loader(_cfg(), records, batch_per_device=2, seed=0, num_workers=0), 2)
    assert {d["file_name"] for b in batches for d in b} == {records[0]["file_name"]}
    with pytest.raises(DataError, match="no training images left"):
        build_train_loader(_cfg(), records[1:], batch_per_device=2, seed=0, num_workers=0)


def test_worker_errors_name_the_file(train_records, tmp_path):
    junk = tmp_path / "corrupt.jpg"
    junk.write_bytes(b"\xff\xd8\xff not really a jpeg")
    bad = dict(train_records[0], file_name=str(junk), image_id=4242)
    loader = build_train_loader(_cfg(), [bad, *train_records[1:3]], batch_per_device=1, seed=0, num_workers=2)
    with pytest.raises(DataError, match=r"corrupt\.jpg \(image id=4242\): cannot read image"):
        _take(loader, 6)


def test_inference_loader_shards_in_order(shapes_root):
    records, _ = load_split(str(shapes_root), "shapes_val")
    cfg = _cfg()
    seen = []
    for rank in range(2):
        loader = build_test_loader(cfg, records, rank=rank, world_size=2, num_workers=2)
        batches = list(loader)
        assert len(batches) == len(loader) == (3 if rank == 0 else 2)
        for (item,) in batches:
            assert "targets" not in item and min(item["image"].shape[1:]) == 72
            seen.append(item["image_id"])
    assert seen == [r["image_id"] for r in records]
    two = list(build_test_loader(cfg, records, batch_size=2, num_workers=0))
    assert [len(b) for b in two] == [2, 2, 1]


def test_serialized_records_round_trip(train_records):
    packed = SerializedRecords(train_records)
    assert len(packed) == len(train_records)
    assert [packed[i] for i in range(len(packed))] == json.loads(json.dumps(train_records))
    assert packed[-1] == packed[len(packed) - 1]
    with pytest.raises(IndexError):
        packed[len(packed)]


def test_reads_dataset_from_s3_through_the_cache(s3_env, shapes_root, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("CASCADE_RCNN_CACHE", str(cache))
    prefix = f"s3://{s3_env}/datasets/shapes"
    storage.upload_tree(str(shapes_root), prefix, progress=False)

    ann, images = resolve_dataset(prefix, "coco_2017_val")
    assert (ann, images) == (f"{prefix}/annotations/instances_val2017.json", f"{prefix}/val2017")
    remote, meta = load_coco_json(ann, images, check_images=True)
    local, _ = load_split(str(shapes_root), "val2017")
    assert meta.thing_classes == ["circle", "square", "triangle"]
    assert [r["file_name"] for r in remote] == [f"{images}/{r['file_name'].rsplit('/', 1)[1]}" for r in local]

    cfg = _cfg()
    from_s3 = list(build_test_loader(cfg, remote, num_workers=2))
    from_disk = list(build_test_loader(cfg, local, num_workers=0))
    for (a,), (b,) in zip(from_s3, from_disk):
        assert torch.equal(a["image"], b["image"]) and a["image_id"] == b["image_id"]
    cached = sorted(p.name for p in (cache / "s3" / s3_env / "datasets/shapes/val2017").iterdir())
    assert cached == sorted(r["file_name"].rsplit("/", 1)[1] for r in local)

    # An ingest-style manifest on s3 with relative entries resolves against its "root".
    manifest = {
        "name": "shapes",
        "root": prefix,
        "splits": {
            "val2017": {
                "annotations": "annotations/instances_val2017.json",
                "images": "val2017",
                "num_images": 5,
            }
        },
    }
    storage.put_bytes(json.dumps(manifest).encode(), f"{prefix}/manifest.json")
    assert resolve_dataset(f"{prefix}/manifest.json", "val2017") == (ann, images)

    # A missing object is a clear error naming the URI, raised in the main process.
    storage.delete(f"{images}/val2017_00002.jpg")
    with pytest.raises(
        DataError, match=r"1 image file\(s\) missing: s3://.*val2017_00002\.jpg \(image id=2\)"
    ):
        load_coco_json(ann, images, check_images=True)
    (cache / "s3" / s3_env / "datasets/shapes/val2017/val2017_00002.jpg").unlink()  # not cached any more
    gone = [r for r in remote if r["image_id"] == 2]
    with pytest.raises(DataError, match=r"s3://.*/val2017_00002\.jpg \(image id=2\): cannot read image"):
        list(build_test_loader(cfg, gone, num_workers=2))


_WORKER_SIGTERM = """
import json, os, signal, sys, time
from pathlib import Path
from cascade_rcnn.config import get_cfg
from cascade_rcnn.data.coco import load_coco_json
from cascade_rcnn.data.loader import build_train_loader
from cascade_rcnn.data.mapper import DatasetMapper

root, flag = Path(sys.argv[1]), Path(sys.argv[2])


class Mapper(DatasetMapper):
    def __call__(self, record, rng=None):
        if flag.exists():  # stands for a read that waits out a storage outage
            time.sleep(120)
            (flag.parent / "finished").write_text("the wait ran to its end")
        return super().__call__(record, rng)


cfg = get_cfg()
cfg.INPUT.MIN_SIZE_TRAIN = (64,)
cfg.INPUT.MAX_SIZE_TRAIN = 160
records = load_coco_json(str(root / "annotations/instances_train2017.json"), str(root / "train2017"))[0]
mapper = Mapper.from_config(cfg, is_train=True)
loader = build_train_loader(cfg, records, batch_per_device=1, seed=0, num_workers=1, mapper=mapper)
signal.signal(signal.SIGTERM, lambda *a: None)  # the trainer notes it (engine/preemption.py)
it = iter(loader)
next(it)


def workers():
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == os.getpid() and fields[0] != "Z":
                found.append(int(entry))
    return found


print(json.dumps(workers()), flush=True)
sys.stdin.readline()  # the test has sent SIGTERM to the whole process group
after = [next(it) for _ in range(4)]  # batches still come
alive_after_sigterm = workers()
flag.write_text("")
next(it)  # hands the worker another item: it is now stuck in the mapper
time.sleep(1)
it.close()  # the DataLoader shuts down: join, then the trainer's own SIGTERM (no join after it)
while workers() and not (flag.parent / "finished").exists():
    time.sleep(0.05)
print(json.dumps({"after": len(after), "alive": alive_after_sigterm, "left": workers()}), flush=True)
"""


def test_workers_ignore_a_group_sigterm_but_not_their_trainers(shapes_root, tmp_path):
    """Preemption's SIGTERM reaches the whole process group: the loader's worker must live on while
    the trainer finishes its iteration. The trainer's own SIGTERM (the DataLoader shutting a stuck
    worker down) must still end it, even in the middle of a long read."""
    import os
    import signal
    import subprocess
    import sys

    script = tmp_path / "worker_sigterm.py"
    script.write_text(_WORKER_SIGTERM)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(shapes_root), str(tmp_path / "stuck")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    workers = json.loads(proc.stdout.readline())
    assert len(workers) == 1
    os.killpg(proc.pid, signal.SIGTERM)
    proc.stdin.write("go\n")
    proc.stdin.flush()
    result = json.loads(proc.stdout.readline())
    assert proc.wait() == 0
    assert result["after"] == 4 and result["alive"] == workers  # the group's SIGTERM was ignored
    assert result["left"] == []  # the trainer's ended it
    assert not (tmp_path / "finished").exists()  # in the middle of its read
