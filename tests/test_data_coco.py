"""COCO reader (mapping, crowd, empty filtering, drops, bad-data errors), split resolution and the
synthetic shapes generator."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from cascade_rcnn.data.coco import DataError, DatasetMeta, filter_empty, load_coco_json
from cascade_rcnn.data.shapes import main as shapes_main
from cascade_rcnn.data.shapes import make_shapes
from cascade_rcnn.data.splits import load_split, resolve_dataset, split_of


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    make_shapes(str(root), num_train=16, num_val=4, seed=3, crowd_every=4)
    return root


def _coco(tmp_path: Path, images: list, annotations: list, categories=None, name="ann.json") -> str:
    categories = categories or [{"id": 5, "name": "b"}, {"id": 2, "name": "a"}]
    path = tmp_path / name
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return str(path)


def _img(i: int, w: int = 100, h: int = 80) -> dict:
    return {"id": i, "file_name": f"{i}.jpg", "width": w, "height": h}


def _ann(i: int, image_id: int, cat: int = 2, bbox=(10, 10, 20, 20), **kw) -> dict:
    x, y, w, h = (list(bbox) + [1, 1])[:4]
    d = {"id": i, "image_id": image_id, "category_id": cat, "bbox": list(bbox), "iscrowd": 0}
    d["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    d.update(kw)
    return d


# ---- reader semantics --------------------------------------------------------------------------


def test_categories_sorted_and_mapped_to_contiguous_ids(tmp_path):
    cats = [{"id": 7, "name": "seven"}, {"id": 1, "name": "one"}, {"id": 3, "name": "three"}]
    anns = [_ann(1, 1, cat=7), _ann(2, 1, cat=1), _ann(3, 1, cat=3)]
    records, meta = load_coco_json(_coco(tmp_path, [_img(1)], anns, cats), str(tmp_path), dataset_name="x")
    assert meta.thing_classes == ["one", "three", "seven"]
    assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 3: 1, 7: 2}
    assert meta.contiguous_id_to_dataset_id == {0: 1, 1: 3, 2: 7}
    assert [a["category_id"] for a in records[0]["annotations"]] == [2, 0, 1]  # file order kept
    assert DatasetMeta.from_dict(json.loads(json.dumps(meta.to_dict()))) == meta


def test_records_match_pycocotools_on_shapes(shapes_root):
    ann = shapes_root / "annotations" / "instances_train2017.json"
    records, meta = load_coco_json(str(ann), str(shapes_root / "train2017"), check_images=True)
    api = COCO(str(ann))
    assert [r["image_id"] for r in records] == sorted(api.imgs)
    to_contig = {1: 0, 3: 1, 7: 2}
    assert meta.thing_dataset_id_to_contiguous_id == to_contig
    for r in records:
        info = api.imgs[r["image_id"]]
        assert r["file_name"] == str(shapes_root / "train2017" / info["file_name"])
        assert (r["height"], r["width"]) == (info["height"], info["width"])
        expected = api.imgToAnns[r["image_id"]]
        assert [a["id"] for a in r["annotations"]] == [a["id"] for a in expected]
        for ours, theirs in zip(r["annotations"], expected):
            assert ours["bbox"] == theirs["bbox"]
            assert ours["category_id"] == to_contig[theirs["category_id"]]
            assert ours["iscrowd"] == theirs["iscrowd"]


def test_crowd_rle_is_kept_and_compressed(shapes_root):
    records, _ = load_split(str(shapes_root), "shapes_train")
    crowds = [a for r in records for a in r["annotations"] if a["iscrowd"]]
    assert len(crowds) == 4  # every 4th of 16 images
    api = COCO(str(shapes_root / "annotations" / "instances_train2017.json"))
    for a in crowds:
        assert isinstance(a["segmentation"]["counts"], str)
        ours = mask_util.decode({**a["segmentation"], "counts": a["segmentation"]["counts"].encode()})
        np.testing.assert_array_equal(ours, api.annToMask(api.anns[a["id"]]))


def test_filter_empty_drops_images_with_only_crowd_or_nothing(tmp_path, caplog):
    anns = [_ann(1, 1), _ann(2, 2, iscrowd=1), _ann(3, 3, iscrowd=1), _ann(4, 3)]
    records, _ = load_coco_json(_coco(tmp_path, [_img(i) for i in (4, 3, 2, 1)], anns), str(tmp_path))
    assert [r["image_id"] for r in records] == [1, 2, 3, 4]
    with caplog.at_level(logging.WARNING):
        kept = filter_empty(records)
    assert [r["image_id"] for r in kept] == [1, 3]
    assert "Removed 2 images" in caplog.text


def test_short_polygons_are_dropped_and_counted(tmp_path, caplog):
    anns = [
        _ann(11, 1),
        _ann(12, 1, segmentation=[[1, 1, 5, 5]]),  # 2 points: instance left without polygon
        _ann(13, 1, segmentation=[[1, 1, 9, 1, 9, 9], [2, 2, 3, 3], [1, 2, 3]]),  # 2 of 3 dropped
    ]
    with caplog.at_level(logging.WARNING):
        records, _ = load_coco_json(_coco(tmp_path, [_img(1)], anns), str(tmp_path))
    kept = records[0]["annotations"]
    assert [a["id"] for a in kept] == [11, 13]
    assert kept[1]["segmentation"] == [[1.0, 1.0, 9.0, 1.0, 9.0, 9.0]]
    assert "dropped 3 polygon(s) with fewer than 3 points" in caplog.text
    assert "1 instance(s)" in caplog.text and "annotation ids 12" in caplog.text


def test_orphan_annotations_are_dropped_with_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        records, _ = load_coco_json(_coco(tmp_path, [_img(1)], [_ann(1, 1), _ann(2, 99)]), str(tmp_path))
    assert [a["id"] for a in records[0]["annotations"]] == [1]
    assert "1 annotation(s) whose image_id is not in 'images'" in caplog.text


# ---- bad data ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ann, needle",
    [
        (_ann(42, 1, cat=99), "annotation id=42 (image 1.jpg) has unknown category_id=99"),
        (
            _ann(43, 1, bbox=(90, 10, 30, 20)),
            "annotation id=43 (image 1.jpg, 100x80) has bbox [90, 10, 30, 20] outside",
        ),
        (_ann(44, 1, bbox=(-5, 10, 3, 3)), "annotation id=44"),
        (
            _ann(45, 1, bbox=(10, 10, -1, 3)),
            "annotation id=45 (image 1.jpg, 100x80) has a bbox with negative width",
        ),
        (_ann(46, 1, bbox=(10, 10, 3)), "annotation id=46 (image 1.jpg, 100x80) has bbox [10, 10, 3]"),
    ],
)
def test_bad_annotation_errors_name_file_and_annotation(tmp_path, ann, needle):
    path = _coco(tmp_path, [_img(1)], [_ann(1, 1), ann])
    with pytest.raises(DataError) as e:
        load_coco_json(path, str(tmp_path))
    assert path in str(e.value) and needle in str(e.value)


def test_small_overhang_is_tolerated(tmp_path):
    records, _ = load_coco_json(
        _coco(tmp_path, [_img(1)], [_ann(1, 1, bbox=(90, 70, 11, 11.5))]), str(tmp_path)
    )
    assert records[0]["annotations"][0]["bbox"] == [90.0, 70.0, 11.0, 11.5]


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda d: d.pop("images"), "the top level has no 'images' field"),
        (lambda d: d["annotations"][0].pop("bbox"), "annotation id=1 has no 'bbox' field"),
        (lambda d: d["annotations"][0].pop("id"), "annotations[0] has no 'id' field"),
        (lambda d: d["images"][0].pop("width"), "image id=1 has no 'width' field"),
        (
            lambda d: d["images"][0].update(height=-3),
            "image id=1 (1.jpg) has invalid size height=-3 width=100",
        ),
        (lambda d: d["categories"][0].pop("name"), "category id=5 has no 'name' field"),
        (
            lambda d: d["annotations"].append(dict(d["annotations"][0])),
            "annotation id=1 appears more than once",
        ),
        (
            lambda d: d["annotations"][0].update(segmentation=7),
            "annotation id=1 has a segmentation of type int",
        ),
    ],
)
def test_missing_fields_name_file_and_field(tmp_path, mutate, needle):
    data = {
        "images": [_img(1)],
        "annotations": [_ann(1, 1)],
        "categories": [{"id": 5, "name": "b"}, {"id": 2, "name": "a"}],
    }
    data = copy.deepcopy(data)
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError) as e:
        load_coco_json(str(path), str(tmp_path))
    assert str(path) in str(e.value) and needle in str(e.value)


def test_broken_json_names_file_and_position(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [')
    with pytest.raises(DataError, match=r"broken\.json: not valid JSON: .*line 1 column 13"):
        load_coco_json(str(path), str(tmp_path))
    with pytest.raises(DataError, match=r"nope\.json: annotation file does not exist"):
        load_coco_json(str(tmp_path / "nope.json"), str(tmp_path))


def test_missing_image_files_are_reported_when_checked(tmp_path):
    (tmp_path / "1.jpg").write_bytes(b"x")
    path = _coco(tmp_path, [_img(1), _img(2)], [_ann(1, 1), _ann(2, 2)])
    load_coco_json(path, str(tmp_path))  # not checked: loads
    with pytest.raises(DataError, match=r"1 image file\(s\) missing: .*2\.jpg \(image id=2\)"):
        load_coco_json(path, str(tmp_path), check_images=True)


# ---- splits ------------------------------------------------------------------------------------


def test_split_names_follow_detectron2():
    assert split_of("coco_2017_train") == "train2017"
    assert split_of("coco_2017_val") == "val2017"
    assert split_of("coco_2017_test-dev") == "test2017"
    assert split_of("shapes_val") == "val2017"
    assert split_of("val2017") == "val2017"
    with pytest.raises(ValueError, match="unknown dataset name 'coco_2017_nope'"):
        split_of("coco_2017_nope")


def test_resolve_local_layout_and_manifest(shapes_root, tmp_path):
    ann, images = resolve_dataset(str(shapes_root), "coco_2017_val")
    assert (ann, images) == (
        str(shapes_root / "annotations/instances_val2017.json"),
        str(shapes_root / "val2017"),
    )
    with pytest.raises(
        DataError, match=r"no annotations for split 'test2017'; looked for .*instances_test2017"
    ):
        resolve_dataset(str(shapes_root), "test2017")

    manifest = tmp_path / "manifest.json"
    manifest.write_text(
        json.dumps(
            {
                "name": "shapes",
                "root": str(shapes_root),
                "splits": {
                    "val2017": {"annotations": "annotations/instances_val2017.json", "images": "val2017"}
                },
            }
        )
    )
    assert resolve_dataset(str(manifest), "shapes_val") == (ann, images)
    records, _ = load_split(str(manifest), "val2017", check_images=True)
    assert len(records) == 4
    with pytest.raises(DataError, match=r"manifest.json: manifest has no split 'train2017'; it has val2017"):
        resolve_dataset(str(manifest), "train2017")


# ---- shapes generator ---------------------------------------------------------------------------


def test_shapes_are_deterministic_and_polygons_match_pixels(shapes_root, tmp_path):
    make_shapes(str(tmp_path), num_train=4, num_val=1, seed=3, crowd_every=4)
    ann = "annotations/instances_train2017.json"
    first4 = json.loads((shapes_root / ann).read_text())
    again = json.loads((tmp_path / ann).read_text())
    assert again["images"] == first4["images"][:4]
    assert again["annotations"] == [a for a in first4["annotations"] if a["image_id"] <= 4]
    for i in (1, 4):
        name = f"train2017/train2017_{i:05d}.jpg"
        assert (tmp_path / name).read_bytes() == (shapes_root / name).read_bytes()

    api = COCO(str(shapes_root / ann))
    assert sorted(api.cats) == [1, 3, 7]
    for img_id, info in api.imgs.items():
        pixels = np.asarray(
            Image.open(shapes_root / "train2017" / info["file_name"]).convert("L"), dtype=float
        )
        for a in api.imgToAnns[img_id]:
            if a["iscrowd"]:
                continue
            m = api.annToMask(a).astype(bool)
            inner, outer = _grow(m, -2), _grow(m, 3) & ~_grow(m, 1)
            # A painted shape: bright and flat inside its polygon, with dark background around it.
            assert pixels[inner].mean() > 100 and pixels[inner].std() < 8
            assert (pixels[outer] < 100).mean() > 0.5


def _grow(mask: np.ndarray, r: int) -> np.ndarray:
    """Dilate (r > 0) or erode (r < 0) a bool mask by |r| pixels (square neighbourhood)."""
    out = mask.copy()
    for dy in range(-abs(r), abs(r) + 1):
        for dx in range(-abs(r), abs(r) + 1):
            shifted = np.roll(mask, (dy, dx), axis=(0, 1))
            out = out | shifted if r > 0 else out & shifted
    return out


def test_make_shapes_cli(tmp_path, capsys):
    from cascade_rcnn.cli import main as cli_main

    assert cli_main(["make-shapes", str(tmp_path / "out"), "--train", "3", "--val", "2", "--seed", "1"]) == 0
    assert len(list((tmp_path / "out" / "train2017").glob("*.jpg"))) == 3
    assert len(list((tmp_path / "out" / "val2017").glob("*.jpg"))) == 2
    with pytest.raises(SystemExit) as exit_info:  # argparse's usage error
        shapes_main([str(tmp_path / "bad"), "--min-size", "8"])
    assert exit_info.value.code == 2
    assert "--min-size" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
