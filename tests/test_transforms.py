"""Image reading (EXIF, PIL modes) and resize/flip transforms, checked against PIL and the d2 fixture."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from cascade_rcnn.data.image_io import ImageReadError, read_image
from cascade_rcnn.data.transforms import (
    HFlipTransform,
    ResizeTransform,
    resize_image,
    resize_shortest_edge_shape,
)

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "d2_parity"


def _encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _asymmetric_rgb(h: int = 5, w: int = 7) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


# ---- resize shape -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hw, short, max_size, expected",
    [
        ((480, 640), 800, 1333, (800, 1067)),  # 1066.67 rounds up
        ((640, 480), 800, 1333, (1067, 800)),
        ((100, 1000), 800, 1333, (133, 1333)),  # long side capped
        ((4, 13), 2, 100, (2, 7)),  # 6.5 -> 7: int(x + 0.5), not banker's rounding
        ((800, 800), 800, 1333, (800, 800)),
    ],
)
def test_resize_shortest_edge_shape(hw, short, max_size, expected):
    assert resize_shortest_edge_shape(*hw, short, max_size) == expected


@pytest.mark.usefixtures("d2_parity")
def test_resize_shape_matches_detectron2_fixture():
    proposals = json.loads((FIXTURE / "proposals.json").read_text())
    outputs = {o["file_name"]: o for o in json.loads((FIXTURE / "outputs.json").read_text())}
    for p in proposals:
        o = outputs[p["file_name"]]
        img = read_image(FIXTURE / "images" / p["file_name"])
        assert img.shape == (o["height"], o["width"], 3) and img.dtype == np.uint8
        assert list(resize_shortest_edge_shape(o["height"], o["width"], 288, 448)) == p["resized_hw"]


# ---- resize / flip ------------------------------------------------------------------------------


def test_resize_image_is_pil_bilinear_on_uint8():
    img = np.asarray(_asymmetric_rgb(37, 53))
    out = resize_image(img, 20, 30)
    expected = np.asarray(Image.fromarray(img).resize((30, 20), Image.BILINEAR))
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)
    gray = img[:, :, :1]
    out1 = resize_image(gray, 20, 30)
    assert out1.shape == (20, 30, 1)
    np.testing.assert_array_equal(
        out1[:, :, 0], np.asarray(Image.fromarray(gray[:, :, 0]).resize((30, 20), Image.BILINEAR))
    )
    with pytest.raises(ValueError, match="uint8"):
        resize_image(img.astype(np.float32), 20, 30)


def test_resize_transform_scales_boxes_and_polygons():
    t = ResizeTransform(h=100, w=200, new_h=50, new_w=300)
    with pytest.raises(ValueError, match="100x200"):
        t.apply_image(np.zeros((10, 10, 3), np.uint8))
    assert t.apply_image(np.zeros((100, 200, 3), np.uint8)).shape == (50, 300, 3)
    np.testing.assert_allclose(t.apply_boxes(np.array([[10, 20, 30, 40]])), [[15, 10, 45, 20]])
    (poly,) = t.apply_polygons([np.array([10.0, 20.0, 30.0, 20.0, 30.0, 40.0])])
    np.testing.assert_allclose(poly, [15, 10, 45, 10, 45, 20])
    mask = np.zeros((100, 200), bool)
    mask[:50, :100] = True
    m = t.apply_segmentation(mask)
    assert m.dtype == bool and m.shape == (50, 300) and m[:25, :150].all() and not m[25:].any()


def test_hflip_transform():
    t = HFlipTransform(width=10)
    img = np.arange(2 * 10 * 3, dtype=np.uint8).reshape(2, 10, 3)
    np.testing.assert_array_equal(t.apply_image(img), img[:, ::-1])
    np.testing.assert_allclose(t.apply_boxes(np.array([[1.0, 2.0, 4.0, 5.0]])), [[6, 2, 9, 5]])
    (poly,) = t.apply_polygons([np.array([1.0, 2.0, 4.0, 2.0, 4.0, 5.0])])
    np.testing.assert_allclose(poly, [9, 2, 6, 2, 6, 5])
    # Flipping twice is the identity.
    boxes = np.array([[0.5, 1.0, 3.25, 7.0]])
    np.testing.assert_allclose(t.apply_boxes(t.apply_boxes(boxes)), boxes)


# ---- read_image ---------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", [1, 2, 3, 4, 5, 6, 7, 8])
def test_read_image_applies_exif_orientation(orientation):
    base = _asymmetric_rgb()
    exif = Image.Exif()
    exif[274] = orientation
    data = _encode(base, "PNG", exif=exif)
    # PIL's own exif_transpose is an independent reference for the upright image.
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    got = read_image(data, format="RGB")
    np.testing.assert_array_equal(got, np.asarray(upright))
    if orientation >= 5:
        assert got.shape[:2] == (7, 5)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK", "1", "LA"])
def test_read_image_converts_any_mode_to_bgr(mode):
    src = (
        _asymmetric_rgb().convert(mode)
        if mode != "I;16"
        else Image.fromarray(np.arange(35, dtype=np.uint16).reshape(5, 7) * 7)
    )
    fmt = "JPEG" if mode == "CMYK" else "TIFF" if mode == "I;16" else "PNG"
    data = _encode(src, fmt)
    rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    bgr = read_image(data)
    assert bgr.shape == (5, 7, 3) and bgr.dtype == np.uint8 and bgr.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(bgr, rgb[:, :, ::-1])
    gray = read_image(data, format="L")
    assert gray.shape == (5, 7, 1)


def test_read_image_from_path_equals_bytes(tmp_path):
    data = _encode(_asymmetric_rgb(), "PNG")
    path = tmp_path / "a.png"
    path.write_bytes(data)
    np.testing.assert_array_equal(read_image(path), read_image(data))
    np.testing.assert_array_equal(read_image(str(path), format="RGB"), read_image(path)[:, :, ::-1])


def test_read_image_errors_name_the_source(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageReadError, match="broken.jpg"):
        read_image(bad)
    with pytest.raises(ImageReadError, match="<bytes>"):
        read_image(b"\x89PNG garbage")
    with pytest.raises(FileNotFoundError):
        read_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="format"):
        read_image(bad, format="YUV")
