"""cascade_rcnn.ingest over real HTTP on 127.0.0.1, a real S3 server (SeaweedFS) and local directories."""

from __future__ import annotations

import hashlib
import io
import json
import stat
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from http_server import RangeServer
from PIL import Image
from pycocotools import mask as mask_utils

from cascade_rcnn import storage
from cascade_rcnn.ingest import (
    DownloadError,
    IngestError,
    InvalidAnnotations,
    download_file,
    extract_zip,
    ingest_coco,
    main,
    validate_annotations,
)
from cascade_rcnn.ingest.download import file_digests

SIZES = [(48, 64), (40, 56), (64, 48), (32, 40), (56, 72), (36, 50)]  # (height, width)


# ---------------------------------------------------------------------------------------------
# A tiny COCO data set: real JPEGs, polygons, a crowd RLE, non-contiguous category ids.
# ---------------------------------------------------------------------------------------------


def _jpeg(h: int, w: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _coco_json(split: str, num_images: int, first_id: int) -> tuple[dict, dict[str, bytes]]:
    images, annotations, files = [], [], {}
    ann_id = 1000 * first_id
    for i in range(num_images):
        h, w = SIZES[i % len(SIZES)]
        iid = first_id + i
        name = f"{iid:012d}.jpg"
        files[name] = _jpeg(h, w, iid)
        images.append({"id": iid, "file_name": name, "height": h, "width": w})
        poly = [2.0, 2.0, w - 3.0, 4.0, w / 2, h - 3.0]
        annotations.append(
            {
                "id": ann_id,
                "image_id": iid,
                "category_id": 1 + 2 * (i % 2),
                "bbox": [2.0, 2.0, w - 5.0, h - 5.0],
                "area": 100.0,
                "iscrowd": 0,
                "segmentation": [poly],
            }
        )
        ann_id += 1
        m = np.zeros((h, w), dtype=np.uint8, order="F")
        m[5:15, 5:20] = 1
        rle = mask_utils.encode(m)
        rle["counts"] = rle["counts"].decode("ascii")
        annotations.append(
            {
                "id": ann_id,
                "image_id": iid,
                "category_id": 1,
                "bbox": [5.0, 5.0, 15.0, 10.0],
                "area": 150.0,
                "iscrowd": 1,
                "segmentation": rle,
            }
        )
        ann_id += 1
    categories = [{"id": 1, "name": "circle"}, {"id": 3, "name": "square"}]
    return {"images": images, "annotations": annotations, "categories": categories}, files


def make_coco_dir(root: Path, splits: dict[str, int]) -> dict[str, dict]:
    """Writes `root/annotations/instances_<split>.json` and `root/<split>/*.jpg`; returns the JSONs."""
    out = {}
    for k, (split, n) in enumerate(splits.items()):
        data, files = _coco_json(split, n, first_id=1 + 100 * k)
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
        (root / split).mkdir(parents=True, exist_ok=True)
        for name, blob in files.items():
            (root / split / name).write_bytes(blob)
        out[split] = data
    return out


def zip_coco_dir(root: Path) -> dict[str, bytes]:
    """URL path -> zip bytes, laid out like images.cocodataset.org (images stored, not deflated)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("annotations/", b"")
        for path in sorted((root / "annotations").iterdir()):
            zf.write(path, f"annotations/{path.name}")
        zf.writestr("annotations/captions_val2017.json", b'{"not": "needed"}')
    files = {"/annotations/annotations_trainval2017.zip": buf.getvalue()}
    for split_dir in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "annotations"):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
            zf.writestr(f"{split_dir.name}/", b"")
            for path in sorted(split_dir.iterdir()):
                zf.write(path, f"{split_dir.name}/{path.name}")
            zf.writestr(f"{split_dir.name}/unlisted.jpg", _jpeg(8, 8, 99))  # not in the JSON
        files[f"/zips/{split_dir.name}.zip"] = buf.getvalue()
    return files


@pytest.fixture
def coco_dir(tmp_path: Path) -> tuple[Path, dict[str, dict]]:
    root = tmp_path / "coco_src"
    return root, make_coco_dir(root, {"val2017": 4, "train2017": 6})


@pytest.fixture
def coco_server(coco_dir):
    root, _ = coco_dir
    with RangeServer(zip_coco_dir(root)) as server:
        yield server


def _check_stored_dataset(manifest_uri: str, expected: dict[str, dict], source_dir: Path) -> dict:
    manifest = json.loads(storage.get_bytes(manifest_uri))
    assert manifest["version"] == 1 and manifest["name"] == "coco2017"
    assert manifest_uri == storage.join(manifest["root"], "manifest.json")
    assert set(manifest["splits"]) == set(expected)
    for split, data in expected.items():
        entry = manifest["splits"][split]
        assert entry["annotations"] == storage.join(
            manifest["root"], "annotations", f"instances_{split}.json"
        )
        assert entry["images"] == storage.join(manifest["root"], split)
        assert json.loads(storage.get_bytes(entry["annotations"])) == data
        assert (entry["num_images"], entry["num_annotations"], entry["num_categories"]) == (
            len(data["images"]),
            len(data["annotations"]),
            len(data["categories"]),
        )
        for img in data["images"]:
            blob = storage.get_bytes(storage.join(entry["images"], img["file_name"]))
            assert blob == (source_dir / split / img["file_name"]).read_bytes()
    # Exactly the listed images and the instances JSONs, each with a correct size and sha256.
    paths = {f["path"] for f in manifest["files"]}
    want = {f"annotations/instances_{s}.json" for s in expected}
    want |= {f"{s}/{img['file_name']}" for s, d in expected.items() for img in d["images"]}
    assert paths == want
    for f in manifest["files"]:
        blob = storage.get_bytes(storage.join(manifest["root"], f["path"]))
        assert len(blob) == f["size"]
        assert f["sha256"] == hashlib.sha256(blob).hexdigest()
    return manifest


# ---------------------------------------------------------------------------------------------
# Resumable download
# ---------------------------------------------------------------------------------------------


def test_download_resumes_after_connection_drop(coco_server, tmp_path):
    path = "/zips/val2017.zip"
    blob = coco_server.files[path]
    coco_server.drop_after(path, len(blob) // 2)
    result = download_file(coco_server.url + path, tmp_path / "val2017.zip", backoff_s=0.01)
    gets = coco_server.requests_for(path)
    assert [r.range for r in gets] == [None, f"bytes={len(blob) // 2}-"]
    assert [r.status for r in gets] == [200, 206]
    assert gets[1].if_range == f'"{hashlib.md5(blob).hexdigest()}"'  # resumes only the same version
    # The second attempt fetched only the rest: the file crossed the wire once, not twice.
    assert coco_server.bytes_served(path) == len(blob)
    assert result.bytes_fetched == len(blob)
    assert (tmp_path / "val2017.zip").read_bytes() == blob
    assert not (tmp_path / "val2017.zip.part").exists()


def test_download_continues_partial_file_of_earlier_run(coco_server, tmp_path):
    path = "/zips/train2017.zip"
    blob = coco_server.files[path]
    (tmp_path / "train2017.zip.part").write_bytes(blob[:1000])
    result = download_file(coco_server.url + path, tmp_path / "train2017.zip", size=len(blob))
    assert [r.range for r in coco_server.requests_for(path)] == ["bytes=1000-"]
    assert coco_server.bytes_served(path) == len(blob) - 1000
    assert (result.resumed_from, result.bytes_fetched) == (1000, len(blob) - 1000)
    assert result.sha256 == file_digests(tmp_path / "train2017.zip")["sha256"]
    # A finished file passing the checks is not fetched again.
    again = download_file(coco_server.url + path, tmp_path / "train2017.zip", size=len(blob))
    assert again.bytes_fetched == 0 and len(coco_server.requests_for(path)) == 1


def test_download_restarts_when_the_file_changed_since_the_partial_one(coco_server, tmp_path):
    path = "/zips/val2017.zip"
    old = coco_server.files[path]
    coco_server.drop_after(path, 3000)
    with pytest.raises(DownloadError, match="3000 bytes kept"):
        download_file(coco_server.url + path, tmp_path / "v.zip", retries=0)
    new = old[:2000] + b"X" * 2000 + old[4000:]
    coco_server.files[path] = new  # same size, other bytes: only the ETag tells
    result = download_file(coco_server.url + path, tmp_path / "v.zip")
    last = coco_server.requests_for(path)[-1]
    assert (last.range, last.status) == ("bytes=3000-", 200)  # If-Range did not match: whole file
    assert (tmp_path / "v.zip").read_bytes() == new and result.bytes_fetched == len(new)


def test_download_retries_server_errors_then_succeeds(coco_server, tmp_path):
    path = "/annotations/annotations_trainval2017.zip"
    coco_server.fail_next(path, 503, 502)
    result = download_file(coco_server.url + path, tmp_path / "a.zip", backoff_s=0.01)
    assert [r.status for r in coco_server.requests_for(path)] == [503, 502, 200]
    assert result.size == len(coco_server.files[path])


def test_download_checksum_and_size_mismatch_and_404_are_refused(coco_server, tmp_path):
    path = "/zips/val2017.zip"
    blob = coco_server.files[path]
    with pytest.raises(DownloadError, match=r"md5 of .* is [0-9a-f]{32}, expected 0{32}"):
        download_file(coco_server.url + path, tmp_path / "v.zip", md5="0" * 32)
    assert not (tmp_path / "v.zip").exists() and not (tmp_path / "v.zip.part").exists()
    with pytest.raises(DownloadError, match=rf"server reports {len(blob)} bytes, expected {len(blob) + 1}"):
        download_file(coco_server.url + path, tmp_path / "v.zip", size=len(blob) + 1)
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_file(coco_server.url + "/zips/nope.zip", tmp_path / "n.zip", backoff_s=0.01)
    assert len(coco_server.requests_for("/zips/nope.zip")) == 1  # a 404 is not retried


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------


def _zip_with(entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("good/ok.txt", b"fine")
        for info, data in entries:
            zf.writestr(info, data)
    return buf.getvalue()


@pytest.mark.parametrize("name", ["../evil.txt", "good/../../evil.txt", "/abs/evil.txt", "C:/evil.txt"])
def test_extract_refuses_entries_escaping_target(tmp_path, name):
    archive = tmp_path / "bad.zip"
    archive.write_bytes(_zip_with([(name, b"owned")]))
    target = tmp_path / "out" / "inner"
    with pytest.raises(IngestError, match=r"bad\.zip.*refusing"):
        extract_zip(archive, target)
    # Nothing at all was written, not even the harmless entry before the bad one.
    assert not list(tmp_path.rglob("evil.txt")) and not list(tmp_path.rglob("ok.txt"))


def test_extract_refuses_symlink_entry(tmp_path):
    link = zipfile.ZipInfo("good/link")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    archive = tmp_path / "link.zip"
    archive.write_bytes(_zip_with([(link, b"/etc/passwd")]))
    with pytest.raises(IngestError, match=r"link\.zip: refusing symlink entry 'good/link'"):
        extract_zip(archive, tmp_path / "out")


def test_extract_names_truncated_and_corrupt_archives(coco_server, tmp_path):
    blob = coco_server.files["/zips/val2017.zip"]
    truncated = tmp_path / "val2017.zip"
    truncated.write_bytes(blob[: len(blob) * 2 // 3])
    with pytest.raises(IngestError, match=r"val2017\.zip: not a readable zip archive, truncated or corrupt"):
        extract_zip(truncated, tmp_path / "out")
    # Same length, one flipped byte inside a stored image: the CRC check names archive and entry.
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith("000000000002.jpg"))
    corrupt = bytearray(blob)
    corrupt[info.header_offset + 30 + len(info.filename) + 100] ^= 0xFF
    bad = tmp_path / "corrupt.zip"
    bad.write_bytes(bytes(corrupt))
    with pytest.raises(IngestError, match=r"corrupt\.zip: entry 'val2017/000000000002\.jpg' is truncated"):
        extract_zip(bad, tmp_path / "out2")
    assert not list((tmp_path / "out2").rglob("*.jpg"))  # nothing moved into place


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def test_validate_accepts_good_data(coco_dir):
    root, data = coco_dir
    report = validate_annotations(root / "annotations" / "instances_val2017.json", root / "val2017")
    assert report.ok and report.images_checked == 4
    assert (report.num_images, report.num_annotations, report.num_categories) == (4, 8, 2)


def test_validate_reports_every_kind_of_problem(coco_dir):
    root, data = coco_dir
    d = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    imgs, anns = d["images"], d["annotations"]
    imgs.append(dict(imgs[0]))  # duplicate image id 1
    imgs.append({"id": 77, "file_name": "missing.jpg", "height": 10, "width": 10})
    anns[0]["bbox"] = [1.0, 1.0, -4.0, 3.0]  # negative width
    anns[2]["bbox"] = [30.0, 2.0, 50.0, 10.0]  # image 2 is 56 wide: repaired, not an error
    anns[2]["category_id"] = 2  # not a category: an error all the same
    anns[4]["segmentation"] = [[1.0, 2.0, 3.0, 4.0, 5.0]]  # repaired: its annotation is dropped
    anns[5]["segmentation"]["size"] = [1, 1]
    anns[6]["id"] = anns[7]["id"]  # duplicate annotation id
    del anns[3]["image_id"]
    anns.append({**anns[1], "id": 999, "image_id": 555})  # dangling image
    (root / "val2017" / imgs[3]["file_name"]).write_bytes(_jpeg(48, 64, 5)[:300])  # truncated JPEG
    imgs[1]["height"] += 1  # size differs from the file
    path = root / "annotations" / "bad.json"
    path.write_text(json.dumps(d))

    with pytest.raises(InvalidAnnotations) as err:
        validate_annotations(path, root / "val2017", max_listed=50)
    report = err.value.report
    assert report.error_kinds == {
        "duplicate id": 2,
        "missing image": 1,
        "bad bbox": 1,
        "dangling category_id": 1,
        "dangling image_id": 1,
        "bad segmentation": 1,
        "missing field": 1,
        "undecodable image": 1,
        "size mismatch": 1,
    }
    text = str(err.value)
    assert str(path) in text
    for needle in (
        "image id=1 appears more than once",
        "image id=77 file",
        "missing.jpg does not exist",
        f"annotation id={anns[0]['id']} (image_id=1): bbox [1.0, 1.0, -4.0, 3.0]",
        "has category_id=2 not in categories",
        "RLE size [1, 1] differs",
        f"annotation id={anns[7]['id']} appears more than once",
        "lacks image_id",
        "image id=4 file",
        "is 56x40, the JSON says 56x41",
    ):
        assert needle in text, needle
    assert [(c["annotation_id"], c["action"]) for c in report.repairs.changes] == [
        (anns[2]["id"], "clip_bbox"),
        (anns[4]["id"], "drop_annotation"),
    ]
    # The list is capped but the count is not.
    capped = validate_annotations(path, root / "val2017", max_listed=3, raise_on_error=False)
    assert len(capped.errors) == 3 and capped.num_errors == 10 and "and 7 more" in capped.summary()
    # strict: the two repairs are errors too.
    strict = validate_annotations(path, root / "val2017", max_listed=50, raise_on_error=False, strict=True)
    assert strict.num_errors == 12
    assert strict.error_kinds["bbox outside image"] == strict.error_kinds["unusable annotation"] == 1
    assert f"annotation id={anns[4]['id']} (image_id=3): polygon 0 has 5 coordinates" in strict.summary()


def test_validate_names_unparseable_json(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(IngestError, match=r"x\.json: cannot read annotation JSON"):
        validate_annotations(tmp_path / "x.json", tmp_path)
    (tmp_path / "y.json").write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(IngestError, match=r"y\.json: missing or non-list field 'categories'"):
        validate_annotations(tmp_path / "y.json", tmp_path)


# ---------------------------------------------------------------------------------------------
# Repairs of real-world defects
# ---------------------------------------------------------------------------------------------

TRIANGLE = [1.0, 6.0, 6.0, 6.0, 3.0, 12.0]


def _ann(ann_id: int, image_id: int, bbox: list, segmentation: list, **extra) -> dict:
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": 1,
        "bbox": bbox,
        "area": 10.0,
        "iscrowd": 0,
        "segmentation": segmentation,
        **extra,
    }


# One annotation per kind of defect, on the val2017 images of `coco_dir`: image 1 is 64x48 (w x h),
# image 2 56x40, image 3 48x64, image 4 40x32.
DEFECTS = [
    _ann(5001, 1, [-3.0, 5.0, 10.0, 10.0], [TRIANGLE]),  # past the left border
    _ann(5002, 1, [5.0, -2.5, 10.0, 10.0], [TRIANGLE]),  # top
    _ann(5003, 1, [60.0, 5.0, 10.0, 10.0], [TRIANGLE]),  # right
    _ann(5004, 1, [5.0, 45.0, 10.0, 10.0], [TRIANGLE]),  # bottom
    _ann(5005, 2, [0.0, 0.0, 56.5, 40.0], [TRIANGLE]),  # half a pixel: strict clips it too
    _ann(5006, 2, [10.0, 10.0, 10.0, 10.0], [[10.0, 10.0, 20.0, 20.0]]),  # a 2-point polygon only
    _ann(5007, 2, [1.0, 6.0, 5.0, 6.0], [TRIANGLE, [1.0, 2.0, 3.0, 4.0]]),  # a good and a 2-point one
    # COCO 2017 train's annotation 918 (cocoapi issue 355), moved into a 48x64 image: zero height,
    # a polygon of 4 points that are 2 points repeated.
    _ann(918, 3, [29.65, 38.33, 1.03, 0.0], [[29.65, 38.33, 29.65, 38.33, 30.68, 38.33, 30.68, 38.33]]),
    _ann(5008, 3, [50.0, 5.0, 10.0, 10.0], [TRIANGLE]),  # wholly right of the image
    _ann(5009, 4, [0.0, 0.0, 2.0, 2.0], [[0.0, 0.0, 2.0, 2.0, 2.0, 0.0, 0.0, 2.0]]),  # a bow tie: kept
]


def _write_val(src_dir: Path, data: dict, extra: list[dict]) -> dict:
    d = json.loads(json.dumps(data))
    d["annotations"] += json.loads(json.dumps(extra))
    (src_dir / "annotations" / "instances_val2017.json").write_text(json.dumps(d))
    return d


def test_ingest_repairs_each_defect_and_reports_it_by_id(coco_dir, s3_env, tmp_path):
    src_dir, data = coco_dir
    source = _write_val(src_dir, data["val2017"], DEFECTS)
    source_bytes = (src_dir / "annotations" / "instances_val2017.json").read_bytes()
    root = f"s3://{s3_env}/store"
    result = ingest_coco(str(src_dir), root, splits=("val2017",), workers=2)
    counts = {"clip_bbox": 5, "drop_polygon": 1, "drop_annotation": 3, "strict_errors": 8}
    assert result.repairs == {"val2017": counts}
    assert result.counts["val2017"]["num_annotations"] == 8 + 10 - 3

    # The stored JSON is the source with exactly these changes; the fine ones and the crowd RLE are
    # untouched, and so is the bow tie (no signed area, but it covers pixels).
    by_id = {a["id"]: a for a in source["annotations"]}
    want = json.loads(json.dumps(source))
    new_bbox = {
        5001: [0.0, 5.0, 7.0, 10.0],
        5002: [5.0, 0.0, 10.0, 7.5],
        5003: [60.0, 5.0, 4.0, 10.0],
        5004: [5.0, 45.0, 10.0, 3.0],
        5005: [0.0, 0.0, 56.0, 40.0],
    }
    want["annotations"] = [a for a in want["annotations"] if a["id"] not in (5006, 918, 5008)]
    for a in want["annotations"]:
        a["bbox"] = new_bbox.get(a["id"], a["bbox"])
        if a["id"] == 5007:
            a["segmentation"] = [TRIANGLE]
    manifest = json.loads(storage.get_bytes(result.manifest_uri))
    entry = manifest["splits"]["val2017"]
    assert json.loads(storage.get_bytes(entry["annotations"])) == want
    assert entry["num_annotations"] == len(want["annotations"]) and entry["repairs"] == counts
    # The file as it came is kept beside it, byte for byte, and both are in the manifest's files.
    assert entry["original_annotations"] == storage.join(
        manifest["root"], "annotations/original/instances_val2017.json"
    )
    assert storage.get_bytes(entry["original_annotations"]) == source_bytes
    files = {f["path"]: f["sha256"] for f in manifest["files"]}
    assert files["annotations/original/instances_val2017.json"] == hashlib.sha256(source_bytes).hexdigest()
    stored = storage.get_bytes(entry["annotations"])
    assert files["annotations/instances_val2017.json"] == hashlib.sha256(stored).hexdigest()

    # The report, beside the manifest, which records its sha256.
    assert result.report_uri == storage.join(manifest["root"], "ingest_report.json")
    blob = storage.get_bytes(result.report_uri)
    assert manifest["report"] == {
        "uri": result.report_uri,
        "size": len(blob),
        "sha256": hashlib.sha256(blob).hexdigest(),
    }
    split = json.loads(blob)["splits"]["val2017"]
    assert split["counts"] == counts
    assert (split["num_annotations_before"], split["num_annotations_after"]) == (18, 15)
    assert split["source_annotations"] == f"{src_dir.resolve()}/annotations/instances_val2017.json"
    changes = {(c["annotation_id"], c["action"]): c for c in split["changes"]}
    assert len(changes) == len(split["changes"]) == 9
    sides = {5001: "left", 5002: "top", 5003: "right", 5004: "bottom", 5005: "right"}
    for ann_id, after in new_bbox.items():
        c = changes[(ann_id, "clip_bbox")]
        assert (c["field"], c["before"], c["after"]) == ("bbox", by_id[ann_id]["bbox"], after)
        assert f"past the {sides[ann_id]} border of the" in c["why"]
        assert c["strict"] is (ann_id != 5005)  # half a pixel is rounding
    c = changes[(5007, "drop_polygon")]
    assert (c["before"], c["after"]) == (by_id[5007]["segmentation"], [TRIANGLE])
    assert c["why"] == "polygon 1 has 4 coordinates (fewer than 3 points)"
    for ann_id, why in (
        (5006, "polygon 0 has 4 coordinates (fewer than 3 points), and no polygon is left"),
        (918, "bbox [29.65, 38.33, 1.03, 0.0] has zero height; polygon 0 has no area (its 4 points "),
        (5008, "bbox [50.0, 5.0, 10.0, 10.0] has no area inside the 48x64 image 000000000003.jpg"),
    ):
        c = changes[(ann_id, "drop_annotation")]
        assert (c["field"], c["before"], c["after"], c["strict"]) == ("annotation", by_id[ann_id], None, True)
        assert c["why"].startswith(why), c["why"]

    # Training reads the repaired file: the loader (which refuses boxes far outside their image)
    # takes it and sees exactly the stored annotations.
    from cascade_rcnn.data.splits import load_split

    records, _ = load_split(result.manifest_uri, "val2017")
    assert sorted(a["id"] for r in records for a in r["annotations"]) == sorted(
        a["id"] for a in want["annotations"]
    )

    # A second ingest transfers nothing and reports the same repairs from the manifest.
    again = ingest_coco(str(src_dir), root, splits=("val2017",))
    assert again.reused and again.transferred_files == 0
    assert (again.repairs, again.report_uri) == (result.repairs, result.report_uri)
    assert storage.get_bytes(result.report_uri) == blob


def test_ingest_strict_refuses_repairs_naming_the_annotation(coco_dir, tmp_path, capsys):
    src_dir, data = coco_dir
    root = tmp_path / "store"
    fine, two_point = DEFECTS[4], DEFECTS[5]  # a half-pixel overhang and a 2-point polygon
    _write_val(src_dir, data["val2017"], [fine, two_point])
    with pytest.raises(InvalidAnnotations) as err:
        ingest_coco(str(src_dir), str(root), splits=("val2017",), strict=True)
    assert err.value.report.error_kinds == {"unusable annotation": 1}
    msg = str(err.value)
    assert msg.startswith(f"{src_dir.resolve()}/annotations/instances_val2017.json: ")
    assert "annotation id=5006 (image_id=2): polygon 0 has 4 coordinates" in msg
    assert "not repaired (annotation dropped) because strict is set" in msg
    assert not list(root.rglob("manifest.json"))

    # Clipping by half a pixel passes strict, and is still recorded.
    _write_val(src_dir, data["val2017"], [fine])
    ok = ingest_coco(str(src_dir), str(root), splits=("val2017",), strict=True)
    assert ok.repairs["val2017"] == {
        "clip_bbox": 1,
        "drop_polygon": 0,
        "drop_annotation": 0,
        "strict_errors": 0,
    }
    stored = json.loads(
        storage.get_bytes(storage.join(str(root), "datasets/coco2017/annotations/instances_val2017.json"))
    )
    assert stored["annotations"][-1]["bbox"] == [0.0, 0.0, 56.0, 40.0]

    # Stored without strict, the data set does not pass a later strict run that would reuse it.
    _write_val(src_dir, data["val2017"], [fine, two_point])
    assert ingest_coco(str(src_dir), str(root), splits=("val2017",)).repairs["val2017"]["strict_errors"] == 1
    with pytest.raises(
        IngestError, match=r"strict is set, and the stored data set was ingested with 1 "
    ) as e:
        ingest_coco(str(src_dir), str(root), splits=("val2017",), strict=True)
    assert "val2017: annotation id=5006 (image_id=2): polygon 0 has 4 coordinates" in str(e.value)
    assert "ingest_report.json" in str(e.value)
    # The CLI's --strict is the same switch.
    args = ["--source", str(src_dir), "--root", str(root), "--splits", "val2017"]
    assert main([*args, "--strict"]) == 2
    assert "annotation id=5006" in capsys.readouterr().err
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["repairs"]["val2017"]["drop_annotation"] == 1


def test_ingest_unrepairable_defects_fail_even_on_annotations_a_repair_would_drop(coco_dir, tmp_path):
    src_dir, data = coco_dir
    two_point = [[10.0, 10.0, 20.0, 20.0]]
    _write_val(
        src_dir,
        data["val2017"],
        [
            _ann(6001, 555, [1.0, 1.0, 5.0, 5.0], two_point),  # no such image
            _ann(6002, 2, [1.0, 1.0, 5.0, 5.0], two_point, category_id=42),  # no such category
            _ann(6003, 2, [60.0, 1.0, 5.0, 5.0], [TRIANGLE], category_id=42),  # outside, and no category
        ],
    )
    root = tmp_path / "store"
    with pytest.raises(InvalidAnnotations) as err:
        ingest_coco(str(src_dir), str(root), splits=("val2017",))
    assert err.value.report.error_kinds == {"dangling image_id": 1, "dangling category_id": 2}
    msg = str(err.value)
    assert "annotation id=6001 (image_id=555) refers to an image id not in images" in msg
    assert "annotation id=6002 (image_id=2) has category_id=42 not in categories" in msg
    assert "annotation id=6003 (image_id=2) has category_id=42 not in categories" in msg
    assert not list(root.rglob("manifest.json")) and not list(root.rglob("ingest_report.json"))


# ---------------------------------------------------------------------------------------------
# ingest_coco end to end
# ---------------------------------------------------------------------------------------------


def test_ingest_over_http_to_local_root_then_reuse(coco_dir, coco_server, tmp_path):
    src_dir, data = coco_dir
    root = tmp_path / "store"
    coco_server.drop_after("/zips/train2017.zip", 5000)  # one dropped connection mid-archive
    result = ingest_coco(coco_server.url, str(root), splits=("val2017", "train2017"), workers=4)
    assert not result.reused and result.transferred_files == 2 + 4 + 6
    assert result.counts == {
        "val2017": {"num_images": 4, "num_annotations": 8, "num_categories": 2},
        "train2017": {"num_images": 6, "num_annotations": 12, "num_categories": 2},
    }
    assert result.manifest_uri == str(root.resolve() / "datasets" / "coco2017" / "manifest.json")
    manifest = _check_stored_dataset(result.manifest_uri, data, src_dir)
    assert manifest["source"]["kind"] == "http" and manifest["source"]["uri"] == coco_server.url
    gets = coco_server.requests_for("/zips/train2017.zip")
    assert [r.range for r in gets] == [None, "bytes=5000-"]
    assert coco_server.bytes_served("/zips/train2017.zip") == len(coco_server.files["/zips/train2017.zip"])
    assert result.downloaded_bytes == sum(len(b) for b in coco_server.files.values())
    assert not (root / "datasets" / "coco2017" / "annotations" / "captions_val2017.json").exists()
    assert not (root / "datasets" / "coco2017" / "val2017" / "unlisted.jpg").exists()

    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    n_get = len([r for r in coco_server.requests if r.method == "GET"])
    again = ingest_coco(coco_server.url, str(root), splits=("val2017", "train2017"))
    assert again.reused and again.transferred_files == 0 and again.downloaded_bytes == 0
    assert again.manifest_uri == result.manifest_uri and again.counts == result.counts
    assert len([r for r in coco_server.requests if r.method == "GET"]) == n_get  # HEADs only
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before

    # Different parameters mean a different data set: ingested again.
    subset = ingest_coco(coco_server.url, str(root), splits=("val2017",), max_images=2)
    assert not subset.reused and subset.counts["val2017"]["num_images"] == 2


def test_ingest_over_http_to_s3_then_reuse(coco_dir, coco_server, s3_env, tmp_path):
    src_dir, data = coco_dir
    root = f"s3://{s3_env}/runs"
    workdir = tmp_path / "work"
    result = ingest_coco(
        "coco-official", root, base_url=coco_server.url, splits=("val2017",), workdir=workdir, workers=4
    )
    assert result.manifest_uri == f"s3://{s3_env}/runs/datasets/coco2017/manifest.json"
    assert result.transferred_files == 1 + 4 and not result.reused
    manifest = _check_stored_dataset(result.manifest_uri, {"val2017": data["val2017"]}, src_dir)
    # Uploaded objects carry their sha256 for verified downloads.
    for f in manifest["files"]:
        assert storage.head(storage.join(manifest["root"], f["path"])).sha256 == f["sha256"]
    # The work dir keeps the downloads (for resuming) but not the staged copy.
    assert sorted(p.name for p in (workdir / "downloads").iterdir()) == [
        "annotations_trainval2017.zip",
        "val2017.zip",
    ]
    assert not (workdir / "stage" / "coco2017").exists()
    again = ingest_coco("coco-official", root, base_url=coco_server.url, splits=("val2017",))
    assert again.reused and again.transferred_files == 0


def test_ingest_truncated_archive_fails_naming_it_and_writes_no_manifest(coco_server, tmp_path):
    blob = coco_server.files["/zips/val2017.zip"]
    coco_server.files["/zips/val2017.zip"] = blob[: len(blob) // 2]
    root = tmp_path / "store"
    with pytest.raises(IngestError, match=r"val2017\.zip: not a readable zip archive, truncated or corrupt"):
        ingest_coco(coco_server.url, str(root), splits=("val2017",))
    assert not list(root.rglob("manifest.json"))


def test_ingest_invalid_annotations_fail_and_write_no_manifest(coco_dir, tmp_path):
    src_dir, data = coco_dir
    bad = data["val2017"]
    bad["annotations"][0]["category_id"] = 42
    (src_dir / "annotations" / "instances_val2017.json").write_text(json.dumps(bad))
    root = tmp_path / "store"
    with pytest.raises(InvalidAnnotations, match="category_id=42 not in categories") as err:
        ingest_coco(str(src_dir), str(root), splits=("val2017",))
    # Named by where the data came from, not by the temporary staging copy.
    assert str(err.value).startswith(f"{src_dir.resolve()}/annotations/instances_val2017.json: ")
    assert f"checked in {src_dir.resolve()}/val2017" in str(err.value)
    assert not list(root.rglob("*"))


def test_ingest_from_s3_prefix(coco_dir, s3_env, tmp_path):
    src_dir, data = coco_dir
    (src_dir / "val2017" / "stray.txt").write_text("not an image")
    prefix = f"s3://{s3_env}/incoming/coco"
    storage.upload_tree(str(src_dir), prefix, workers=4, progress=False)
    root = f"s3://{s3_env}/store"
    result = ingest_coco(prefix, root, workers=4)
    assert result.transferred_files == 2 + 4 + 6
    _check_stored_dataset(result.manifest_uri, data, src_dir)  # stray.txt is not part of it
    assert ingest_coco(prefix, root).reused
    # A subset fetches only the listed images.
    sub = ingest_coco(prefix, root, name="coco_small", splits=("train2017",), max_images=3)
    assert sub.counts["train2017"] == {"num_images": 3, "num_annotations": 6, "num_categories": 2}
    names = storage.list_prefix(f"s3://{s3_env}/store/datasets/coco_small/train2017/")
    assert len(names) == 3


def test_ingest_from_local_dir_and_change_detection(coco_dir, tmp_path):
    src_dir, data = coco_dir
    root = tmp_path / "store"
    first = ingest_coco(str(src_dir), str(root), splits=("val2017",), workers=2)
    _check_stored_dataset(first.manifest_uri, {"val2017": data["val2017"]}, src_dir)
    assert ingest_coco(str(src_dir), str(root), splits=("val2017",)).reused
    # Editing the source changes its fingerprint: the next run ingests again.
    data["val2017"]["annotations"].pop()
    (src_dir / "annotations" / "instances_val2017.json").write_text(json.dumps(data["val2017"]))
    second = ingest_coco(str(src_dir), str(root), splits=("val2017",))
    assert not second.reused and second.counts["val2017"]["num_annotations"] == 7
    # Unchanged files were not copied again.
    assert second.transferred_files == 1


_real_sha256 = hashlib.sha256  # unwrapped, for the tests' own checks


class _CountingHash:
    """A real hashlib object that counts, by hex digest, each content it finished hashing."""

    def __init__(self, real, counts: Counter):
        self._real, self._counts = real, counts

    def update(self, data) -> None:
        self._real.update(data)

    def hexdigest(self) -> str:
        digest = self._real.hexdigest()
        self._counts[digest] += 1
        return digest

    def __getattr__(self, name):
        return getattr(self._real, name)


@pytest.fixture
def hash_counts(monkeypatch) -> Counter:
    """How many times each content's sha256 is computed: storage and ingest hash files and in-memory
    bytes through hashlib.sha256 / hashlib.new, which are wrapped (the hashing itself is real)."""
    counts: Counter = Counter()
    real_sha256, real_new = hashlib.sha256, hashlib.new
    monkeypatch.setattr(hashlib, "sha256", lambda *a, **k: _CountingHash(real_sha256(*a, **k), counts))
    monkeypatch.setattr(hashlib, "new", lambda *a, **k: _CountingHash(real_new(*a, **k), counts))
    return counts


def _hashes_per_file(manifest_uri: str, counts: Counter) -> dict[str, int]:
    seen = dict(counts)  # before this function's own hashing
    manifest = json.loads(storage.get_bytes(manifest_uri))
    for f in manifest["files"]:  # each digest describes the bytes stored, in the manifest and on S3
        uri = storage.join(manifest["root"], f["path"])
        assert f["sha256"] == _real_sha256(storage.get_bytes(uri)).hexdigest()
        if storage.is_s3(uri):
            assert storage.head(uri).sha256 == f["sha256"]
    return {f["path"]: seen.get(f["sha256"], 0) for f in manifest["files"]}


def test_ingest_hashes_each_file_once(coco_dir, s3_env, tmp_path, hash_counts):
    src_dir, data = coco_dir
    _write_val(src_dir, data["val2017"], DEFECTS[:6])  # repaired: the original JSON is stored too
    prefix = f"s3://{s3_env}/incoming/coco"
    storage.upload_tree(str(src_dir), prefix, workers=2, progress=False)
    root = f"s3://{s3_env}/store"
    # From S3: verified while downloading, that digest goes into the manifest and onto the objects.
    hash_counts.clear()
    first = ingest_coco(prefix, root, workers=2)
    per_file = _hashes_per_file(first.manifest_uri, hash_counts)
    assert "annotations/original/instances_val2017.json" in per_file and len(per_file) == 3 + 4 + 6
    assert set(per_file.values()) == {1}, per_file
    # Again (forced): every object is found unchanged by the manifest's digest, none read twice.
    hash_counts.clear()
    again = ingest_coco(prefix, root, workers=2, force=True)
    assert again.transferred_files == 0
    assert set(_hashes_per_file(again.manifest_uri, hash_counts).values()) == {1}
    # A subset (the JSON rewritten after its download) from S3 to a local root.
    hash_counts.clear()
    sub = ingest_coco(prefix, str(tmp_path / "store"), splits=("train2017",), max_images=3, workers=2)
    assert set(_hashes_per_file(sub.manifest_uri, hash_counts).values()) == {1}

    # From a local directory to a local root: hashed for the manifest, copied without hashing again.
    hash_counts.clear()
    local = ingest_coco(str(src_dir), str(tmp_path / "local"), name="c", workers=2)
    assert set(_hashes_per_file(local.manifest_uri, hash_counts).values()) == {1}
    # Forced again: the stored copy has no metadata, so it is read once too, to find it unchanged.
    hash_counts.clear()
    local = ingest_coco(str(src_dir), str(tmp_path / "local"), name="c", workers=2, force=True)
    assert local.transferred_files == 0
    assert set(_hashes_per_file(local.manifest_uri, hash_counts).values()) == {2}


def test_cli_ingest(coco_dir, tmp_path, capsys):
    src_dir, _ = coco_dir
    root = tmp_path / "store"
    rc = main(["--source", str(src_dir), "--root", str(root), "--splits", "val2017", "--name", "tiny"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["manifest_uri"].endswith("datasets/tiny/manifest.json") and out["transferred_files"] == 5
    assert main(["--source", str(tmp_path / "nowhere"), "--root", str(root)]) == 2
    assert "source directory" in capsys.readouterr().err
    assert main(["--source", str(src_dir), "--root", str(root), "--name", "../up"]) == 2
    assert "invalid data set name '../up'" in capsys.readouterr().err


def test_component_shows_repair_counts_in_its_log_and_metadata(coco_dir, tmp_path, capfd):
    import kfp.local

    from components import ingest_coco as component

    src_dir, data = coco_dir
    _write_val(src_dir, data["val2017"], DEFECTS[:6])  # 5 clips (one within 1 px), 1 dropped annotation
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"))
    op = component.build("python:3.11")
    args = dict(source=str(src_dir), root=str(tmp_path / "store"), name="coco2017", splits=["val2017"])
    task = op(**args, max_images=0)
    meta = task.outputs["dataset"].metadata
    counts = {"clip_bbox": 5, "drop_polygon": 0, "drop_annotation": 1, "strict_errors": 5}
    assert meta["repairs"] == {"val2017": counts}
    assert meta["report_uri"] == str((tmp_path / "store/datasets/coco2017/ingest_report.json").resolve())
    assert meta["counts"]["val2017"]["num_annotations"] == 8 + 5
    log = capfd.readouterr().out
    assert "val2017: repairs: 5 clip_bbox, 0 drop_polygon, 1 drop_annotation" in log
    assert "annotation id=5006 (image_id=2): polygon 0 has 4 coordinates" in log  # each change, logged
    # Run again: nothing is transferred, and the counts come back from the manifest.
    again = op(**args, max_images=0).outputs["dataset"].metadata
    assert (again["reused"], again["transferred_files"], again["repairs"]) == (True, 0, meta["repairs"])
    # The component's strict parameter fails the step, naming the annotation.
    with pytest.raises(RuntimeError, match="FAILURE"):
        op(**args, max_images=0, strict=True)
    assert "annotation id=5006 (image_id=2)" in capfd.readouterr().out
