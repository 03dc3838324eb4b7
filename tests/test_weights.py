"""cascade_rcnn.weights over real HTTP on 127.0.0.1 and a real S3 server, with synthetic weight files."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from http_server import RangeServer

from cascade_rcnn import storage
from cascade_rcnn.weights import WeightsError, fetch_weights, main, resolve_source

D2_ZOO = "Misc/cascade_mask_rcnn_R_50_FPN_1x/138602847/model_final_e9d89b.pkl"
MSRA = "ImageNetPretrained/MSRA/R-50.pkl"


def _arr(*shape: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def d2_pickle() -> tuple[bytes, dict[str, np.ndarray]]:
    model = {
        "backbone.bottom_up.stem.conv1.weight": _arr(4, 3, 7, 7, seed=1),
        "backbone.bottom_up.stem.conv1.norm.running_var": _arr(4, seed=2),
        "backbone.fpn_lateral2.weight": _arr(8, 4, 1, 1, seed=3),
        "roi_heads.box_predictor.2.cls_score.weight": _arr(81, 16, seed=4),
        "roi_heads.mask_head.predictor.bias": _arr(80, seed=5),
    }
    return pickle.dumps({"model": model, "__author__": "Detectron2 Model Zoo"}, protocol=2), model


def c2_pickle() -> tuple[bytes, dict[str, np.ndarray]]:
    blobs = {
        "conv1_w": _arr(4, 3, 7, 7, seed=10),
        "res_conv1_bn_gamma": _arr(4, seed=11),
        "res_conv1_bn_beta": _arr(4, seed=12),
        "res_conv1_bn_running_mean": _arr(4, seed=13),
        "res_conv1_bn_running_var": _arr(4, seed=14),
        "res2_0_branch2a_w": _arr(2, 4, 1, 1, seed=15),
        "res2_0_branch2a_bn_gamma": _arr(2, seed=16),
        "res2_0_branch1_w": _arr(8, 4, 1, 1, seed=17),
        "res5_2_branch2c_bn_running_var": _arr(8, seed=18),
        "res2_0_branch2a_w_momentum": _arr(2, 4, 1, 1, seed=19),
        "fc1000_w": _arr(10, 8, seed=20),
    }
    return pickle.dumps({"blobs": blobs}, protocol=2), blobs


def torchvision_pth() -> tuple[bytes, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    state = {
        "conv1.weight": torch.randn(4, 3, 7, 7, generator=g),
        "bn1.running_mean": torch.randn(4, generator=g),
        "layer1.0.conv1.weight": torch.randn(2, 4, 1, 1, generator=g),
        "layer1.0.bn2.weight": torch.randn(2, generator=g),
        "layer1.0.downsample.0.weight": torch.randn(8, 4, 1, 1, generator=g),
        "layer4.2.bn3.num_batches_tracked": torch.tensor(5),
        "fc.bias": torch.randn(10, generator=g),
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue(), state


@pytest.fixture
def weights_server(monkeypatch):
    d2, _ = d2_pickle()
    c2, _ = c2_pickle()
    tv, _ = torchvision_pth()
    prefix = hashlib.sha256(tv).hexdigest()[:8]
    files = {
        f"/detectron2/{D2_ZOO}": d2,
        f"/detectron2/{MSRA}": c2,
        "/models/resnet50-0676ba61.pth": tv,  # right name, but not the real bytes
        f"/mirror/resnet50-{prefix}.pth": tv,
    }
    with RangeServer(files) as server:
        monkeypatch.setenv("CASCADE_RCNN_D2_BASE_URL", server.url + "/detectron2")
        monkeypatch.setenv("CASCADE_RCNN_TORCHVISION_BASE_URL", server.url + "/models")
        server.tv_mirror = f"/mirror/resnet50-{prefix}.pth"
        yield server


def _load(path: str | Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_resolve_default_locations(monkeypatch):
    monkeypatch.delenv("CASCADE_RCNN_D2_BASE_URL", raising=False)
    monkeypatch.delenv("CASCADE_RCNN_TORCHVISION_BASE_URL", raising=False)
    assert (
        resolve_source(f"detectron2://{MSRA}").location
        == "https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/MSRA/R-50.pkl"
    )
    tv = resolve_source("torchvision://resnet50")
    assert tv.location == "https://download.pytorch.org/models/resnet50-0676ba61.pth"
    assert tv.hash_prefix == "0676ba61"
    assert resolve_source("torchvision://resnet50/IMAGENET1K_V2").location.endswith("resnet50-11ad3fa6.pth")
    assert resolve_source("https://example.org/x/model-20240101.pth").hash_prefix is None
    with pytest.raises(WeightsError, match="torchvision has no weights for model 'resnet77'"):
        resolve_source("torchvision://resnet77")
    with pytest.raises(WeightsError, match="has no weights 'IMAGENET9K'"):
        resolve_source("torchvision://resnet50/IMAGENET9K")
    with pytest.raises(WeightsError, match="unsupported weights source 'gs://b/w.pkl'"):
        resolve_source("gs://b/w.pkl")
    with pytest.raises(WeightsError, match="weights file /no/such.pkl does not exist"):
        resolve_source("/no/such.pkl")


def test_detectron2_model_zoo_pkl_to_local(weights_server, tmp_path):
    blob, model = d2_pickle()
    digest = hashlib.sha256(blob).hexdigest()
    out = tmp_path / "out" / "model.pth"
    result = fetch_weights(f"detectron2://{D2_ZOO}", str(out), sha256=digest.upper())
    assert (result.format, result.num_tensors, result.sha256) == ("d2", len(model), digest)
    assert result.url == f"{weights_server.url}/detectron2/{D2_ZOO}"
    ckpt = _load(out)
    assert sorted(ckpt["model"]) == sorted(model)
    for name, arr in model.items():
        assert torch.equal(ckpt["model"][name], torch.from_numpy(arr))
    assert ckpt["meta"]["source"] == f"detectron2://{D2_ZOO}"
    assert ckpt["meta"]["sha256"] == digest and ckpt["meta"]["source_format"] == "d2"
    assert ckpt["meta"]["source_meta"] == {"__author__": "Detectron2 Model Zoo"}


def test_msra_c2_pkl_gets_full_detectron2_names(weights_server, tmp_path):
    _, blobs = c2_pickle()
    out = tmp_path / "r50.pth"
    result = fetch_weights(f"detectron2://{MSRA}", str(out))
    assert result.format == "c2"
    state = _load(out)["model"]
    expect = {
        "backbone.bottom_up.stem.conv1.weight": "conv1_w",
        "backbone.bottom_up.stem.conv1.norm.weight": "res_conv1_bn_gamma",
        "backbone.bottom_up.stem.conv1.norm.bias": "res_conv1_bn_beta",
        "backbone.bottom_up.stem.conv1.norm.running_mean": "res_conv1_bn_running_mean",
        "backbone.bottom_up.stem.conv1.norm.running_var": "res_conv1_bn_running_var",
        "backbone.bottom_up.res2.0.conv1.weight": "res2_0_branch2a_w",
        "backbone.bottom_up.res2.0.conv1.norm.weight": "res2_0_branch2a_bn_gamma",
        "backbone.bottom_up.res2.0.shortcut.weight": "res2_0_branch1_w",
        "backbone.bottom_up.res5.2.conv3.norm.running_var": "res5_2_branch2c_bn_running_var",
        "fc1000.weight": "fc1000_w",
    }
    assert sorted(state) == sorted(expect)  # the _momentum blob is gone
    for d2_name, c2_name in expect.items():
        assert torch.equal(state[d2_name], torch.from_numpy(blobs[c2_name]))


def test_torchvision_state_dict_is_converted(weights_server, tmp_path):
    _, tv_state = torchvision_pth()
    out = tmp_path / "tv.pth"
    result = fetch_weights(weights_server.url + weights_server.tv_mirror, str(out))
    assert result.format == "torchvision"
    state = _load(out)["model"]
    assert sorted(state) == sorted(
        [
            "backbone.bottom_up.stem.conv1.weight",
            "backbone.bottom_up.stem.conv1.norm.running_mean",
            "backbone.bottom_up.res2.0.conv1.weight",
            "backbone.bottom_up.res2.0.conv2.norm.weight",
            "backbone.bottom_up.res2.0.shortcut.weight",
            "fc.bias",
        ]
    )
    assert torch.equal(
        state["backbone.bottom_up.res2.0.shortcut.weight"], tv_state["layer1.0.downsample.0.weight"]
    )


def test_torchvision_scheme_checks_hash_in_file_name(weights_server, tmp_path):
    out = tmp_path / "tv.pth"
    with pytest.raises(
        WeightsError, match=r"resnet50-0676ba61\.pth: sha256 is [0-9a-f]{64}, but the file name"
    ):
        fetch_weights("torchvision://resnet50", str(out), cache_dir=tmp_path / "cache")
    assert [r.path for r in weights_server.requests] == ["/models/resnet50-0676ba61.pth"]
    assert not out.exists() and not list((tmp_path / "cache").iterdir())


def test_sha256_mismatch_is_refused_and_nothing_is_stored(weights_server, tmp_path):
    blob, _ = c2_pickle()
    actual = hashlib.sha256(blob).hexdigest()
    out = tmp_path / "r50.pth"
    with pytest.raises(WeightsError, match=rf"sha256 of .* is {actual}, expected {'a' * 64}"):
        fetch_weights(f"detectron2://{MSRA}", str(out), sha256="a" * 64)
    assert not out.exists()
    local = tmp_path / "R-50.pkl"
    local.write_bytes(blob)
    with pytest.raises(WeightsError, match=rf"sha256 is {actual}, expected {'b' * 64}"):
        fetch_weights(str(local), str(out), sha256="b" * 64)
    assert not out.exists()
    with pytest.raises(WeightsError, match="not a 64-digit hex sha256"):
        fetch_weights(str(local), str(out), sha256="abc")


def test_unsafe_pickle_is_never_executed(weights_server, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    weights_server.files["/detectron2/evil.pkl"] = pickle.dumps({"model": {"x": Evil()}})
    with pytest.raises(WeightsError, match="evil.pkl"):
        fetch_weights("detectron2://evil.pkl", str(tmp_path / "o.pth"))
    assert not marker.exists()


def test_s3_source_and_s3_output(weights_server, s3_env, tmp_path):
    blob, model = d2_pickle()
    src = f"s3://{s3_env}/incoming/model_final.pkl"
    storage.put_bytes(blob, src)
    dst = f"s3://{s3_env}/weights/model.pth"
    result = fetch_weights(src, dst, sha256=hashlib.sha256(blob).hexdigest())
    assert result.uri == dst and result.format == "d2"
    storage.get_file(dst, tmp_path / "model.pth")
    ckpt = _load(tmp_path / "model.pth")
    assert sorted(ckpt["model"]) == sorted(model) and ckpt["meta"]["source"] == src
    # An http source straight to S3.
    r50 = fetch_weights(f"detectron2://{MSRA}", f"s3://{s3_env}/weights/r50.pth")
    assert storage.exists(r50.uri) and r50.num_tensors == 10


def test_cli(weights_server, tmp_path, capsys):
    out = tmp_path / "cli.pth"
    assert main([f"detectron2://{D2_ZOO}", "--output", str(out), "--cache-dir", str(tmp_path / "c")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["uri"] == str(out) and printed["format"] == "d2" and out.exists()
    assert main([f"detectron2://{D2_ZOO}", "--output", str(out), "--sha256", "0" * 64]) == 2
    assert "expected " + "0" * 64 in capsys.readouterr().err


def test_model_weights_url_is_downloaded_once_into_the_cache(weights_server, tmp_path, monkeypatch):
    # MODEL.WEIGHTS detectron2://... works as in detectron2: fetched once, then read from the cache.
    from cascade_rcnn.checkpoint import load_weights

    monkeypatch.setenv("CASCADE_RCNN_CACHE", str(tmp_path / "cache"))
    _, model = d2_pickle()
    for _ in range(2):
        weights = load_weights(f"detectron2://{D2_ZOO}")
        assert weights.format == "d2" and sorted(weights.state) == sorted(model)
    assert len(weights_server.requests_for(f"/detectron2/{D2_ZOO}")) == 1
    assert list((tmp_path / "cache" / "weights").iterdir())
