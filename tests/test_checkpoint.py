"""Checkpoint loading: restricted unpickling, detectron2/C2/torchvision formats, our format, reports."""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from cascade_rcnn.checkpoint import (
    CheckpointError,
    UnsafePickleError,
    WeightsFile,
    c2_name_to_d2,
    check_weights_config,
    drop_class_specific,
    group_keys,
    load_checkpoint,
    load_into_model,
    load_weights,
    restricted_unpickle,
    save_checkpoint,
)
from cascade_rcnn.config import get_cfg, load_config
from cascade_rcnn.modeling.backbone import ResNet

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "d2_parity"


class _Backbone(nn.Module):
    """Just enough structure to give a ResNet detectron2's `backbone.bottom_up.` names."""

    def __init__(self, **resnet_kwargs):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.bottom_up = ResNet(**resnet_kwargs)


SLIM = dict(stem_out_channels=16, res2_out_channels=64, width_per_group=16)


def _randomize(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Fill every state entry with distinct random values (variances positive) and return them."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in model.state_dict().items():
        r = torch.rand(v.shape, generator=g, dtype=torch.float32)
        state[k] = r + 0.5 if k.endswith("running_var") else r - 0.5
    model.load_state_dict(state)
    return state


# ---------------------------------------------------------------------------------------------
# Restricted unpickler
# ---------------------------------------------------------------------------------------------


class _Evil:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker: Path) -> dict[str, bytes]:
    cmd = f"touch {marker}"
    return {
        "os.system": pickle.dumps({"model": _Evil(os.system, (cmd,))}),
        "subprocess": pickle.dumps(_Evil(subprocess.call, (["touch", str(marker)],))),
        "eval": pickle.dumps(_Evil(eval, (f"open({str(marker)!r}, 'w')",)), protocol=2),
        "exec": pickle.dumps([np.zeros(2), _Evil(exec, (f"open({str(marker)!r}, 'w')",))]),
        # A refused global smuggled in as the array subtype of numpy's own (allowed) reconstruct call.
        "numpy-subtype": pickle.dumps(_Evil(np.ndarray.__reduce__(np.zeros(1))[0], (os.system, (0,), b"b"))),
    }


@pytest.mark.parametrize("name", ["os.system", "subprocess", "eval", "exec", "numpy-subtype"])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, name):
    marker = tmp_path / "pwned"
    path = tmp_path / "model_final.pkl"
    path.write_bytes(_payloads(marker)[name])
    with pytest.raises(UnsafePickleError) as err:
        load_weights(path)
    msg = str(err.value)
    assert str(path) in msg and "refused" in msg
    refused = {
        "os.system": "posix.system",
        "subprocess": "subprocess.call",
        "eval": "__builtin__.eval",  # protocol 2 names the Python 2 module
        "exec": "builtins.exec",
        "numpy-subtype": "posix.system",
    }[name]
    assert f"'{refused}'" in msg
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_named_pth_goes_through_weights_only(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pth"
    path.write_bytes(_payloads(marker)["os.system"])
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_weights(path)
    assert not marker.exists()


def test_codecs_encode_only_latin1():
    # A protocol-2 pickle calling _codecs.encode with any codec other than latin1 is refused.
    data = b"\x80\x02c_codecs\nencode\nq\x00X\x03\x00\x00\x00abcq\x01X\x06\x00\x00\x00rot_13q\x02\x86q\x03Rq\x04."
    with pytest.raises(UnsafePickleError, match="rot_13"):
        restricted_unpickle(data, source="x.pkl")


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_restricted_unpickle_reads_numpy_containers(protocol):
    from collections import OrderedDict

    obj = OrderedDict(
        a=np.arange(6, dtype=np.float32).reshape(2, 3),
        b=np.array([1, 2], dtype=">i8"),
        c=np.float64(2.5),
        d={"nested": [np.zeros((0,), np.uint8), (1, "x")]},
    )
    out = restricted_unpickle(pickle.dumps(obj, protocol=protocol), source="t.pkl")
    assert list(out) == ["a", "b", "c", "d"]
    np.testing.assert_array_equal(out["a"], obj["a"])
    np.testing.assert_array_equal(out["b"], obj["b"])
    assert out["c"] == 2.5 and out["d"]["nested"][1] == (1, "x")


def test_garbage_pkl_gives_clear_error(tmp_path):
    path = tmp_path / "broken.pkl"
    path.write_bytes(b"not a pickle at all")
    with pytest.raises(CheckpointError, match="broken.pkl"):
        load_weights(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_weights(tmp_path / "absent.pkl")


# ---------------------------------------------------------------------------------------------
# detectron2 files
# ---------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("d2_parity")
def test_d2_model_zoo_pickle_names_and_values():
    weights = load_weights(FIXTURE / "model_final.pkl")
    assert weights.format == "d2"
    assert weights.meta["__author__"] == "Detectron2 Model Zoo"
    assert len(weights) == 323
    raw = restricted_unpickle((FIXTURE / "model_final.pkl").read_bytes(), source="fixture")["model"]
    key = "roi_heads.box_predictor.2.cls_score.weight"
    assert tuple(weights[key].shape) == (4, 256)
    np.testing.assert_array_equal(weights[key].numpy(), raw[key])


@pytest.mark.usefixtures("d2_parity")
def test_d2_pickle_loads_into_slim_model_with_nothing_missing():
    from cascade_rcnn.modeling import build_model

    cfg = load_config(FIXTURE / "config.yaml")
    model = build_model(cfg)
    weights = load_weights(FIXTURE / "model_final.pkl")
    report = load_into_model(model, weights)
    assert report.missing == [] and report.unexpected == [] and report.shape_mismatch == []
    state = model.state_dict()
    for k, v in weights.items():
        torch.testing.assert_close(state[k], v.to(state[k].dtype), rtol=0, atol=0)


def test_d2_training_pth_with_model_dict(tmp_path):
    model = _Backbone(**SLIM)
    values = _randomize(model)
    # detectron2's training checkpoint layout, DDP-prefixed names included.
    ckpt = {
        "model": {"module." + k: v for k, v in values.items()},
        "iteration": 99,
        "trainer": {"iteration": 99, "hooks": {"LRScheduler": {"base_lrs": [0.02], "last_epoch": 100}}},
    }
    torch.save(ckpt, tmp_path / "model_0000099.pth")
    fresh = _Backbone(**SLIM)
    weights = load_weights(tmp_path / "model_0000099.pth")
    assert weights.format == "d2" and weights.meta["iteration"] == 99
    report = load_into_model(fresh, weights)
    assert report.missing == [] and report.unexpected == []
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, values[k]), k


# ---------------------------------------------------------------------------------------------
# Caffe2 / MSRA R-50.pkl
# ---------------------------------------------------------------------------------------------


def _d2_to_c2(name: str, fused: bool) -> str | None:
    """Inverse of the C2 renaming for backbone names (written independently of the loader)."""
    name = name[len("backbone.bottom_up.") :]
    bn_suffix = (
        {"weight": "s", "bias": "b"}
        if fused
        else {"weight": "gamma", "bias": "beta", "running_mean": "running_mean", "running_var": "running_var"}
    )
    parts = name.split(".")
    if parts[0] == "stem":
        if parts[-1] == "weight" and len(parts) == 3:
            return "conv1_w"
        leaf = bn_suffix.get(parts[-1])
        return None if leaf is None else f"res_conv1_bn_{leaf}"
    stage, block, conv = parts[:3]
    branch = {"conv1": "branch2a", "conv2": "branch2b", "conv3": "branch2c", "shortcut": "branch1"}[conv]
    if len(parts) == 4:
        return f"{stage}_{block}_{branch}_w"
    leaf = bn_suffix.get(parts[-1])
    return None if leaf is None else f"{stage}_{block}_{branch}_bn_{leaf}"


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_c2_msra_pickle_loads_by_suffix(tmp_path, fused):
    source = _Backbone(**SLIM)
    values = _randomize(source, seed=1)
    blobs = {}
    for k, v in values.items():
        c2 = _d2_to_c2(k, fused)
        if c2 is not None:
            blobs[c2] = v.numpy()
            if c2.endswith("_w"):
                blobs[c2[:-2] + "_w_momentum"] = np.zeros_like(v.numpy())
    # The classifier and a stem bias the model does not have: ignored, reported unexpected.
    blobs["fc1000_w"] = np.ones((1000, 8), np.float32)
    blobs["fc1000_b"] = np.ones((1000,), np.float32)
    blobs["conv1_b"] = np.zeros((16,), np.float32)
    path = tmp_path / "R-50.pkl"
    # Python-2 era pickles: protocol 2, wrapped in "blobs" for the fused Detectron1 copies.
    with open(path, "wb") as f:
        pickle.dump({"blobs": blobs} if fused else blobs, f, protocol=2)

    weights = load_weights(path)
    assert weights.format == "c2"
    assert not any("momentum" in k for k in weights)
    assert "res2.0.conv1.weight" in weights and "stem.conv1.norm.weight" in weights

    model = _Backbone(**SLIM)
    report = load_into_model(model, weights)
    assert report.missing == []
    assert report.unexpected == ["fc1000.bias", "fc1000.weight", "stem.conv1.bias"]
    state = model.state_dict()
    for k, v in values.items():
        if fused and k.endswith("running_mean"):
            expected = torch.zeros_like(v)
        elif fused and k.endswith("running_var"):
            expected = torch.ones_like(v)
        else:
            expected = v
        assert torch.equal(state[k], expected), k
    assert bool(report.filled_bn_stats) == fused


def test_c2_renaming_examples():
    assert c2_name_to_d2("res2_0_branch2a_w") == "res2.0.conv1.weight"
    assert c2_name_to_d2("res_conv1_bn_s") == "stem.conv1.norm.weight"
    assert c2_name_to_d2("res3_0_branch1_bn_running_var") == "res3.0.shortcut.norm.running_var"
    assert c2_name_to_d2("res4_5_branch2c_bn_b") == "res4.5.conv3.norm.bias"
    assert c2_name_to_d2("fpn_inner_res4_5_sum_lateral_w") == "fpn_lateral4.weight"
    assert c2_name_to_d2("fpn_res3_3_sum_b") == "fpn_output3.bias"
    assert c2_name_to_d2("conv_rpn_fpn2_w") == "proposal_generator.rpn_head.conv.weight"
    assert c2_name_to_d2("fc6_w") == "box_head.fc1.weight"


def test_suffix_matching_refuses_ambiguity():
    model = nn.Module()
    model.a = nn.Module()
    model.a.conv = nn.Conv2d(1, 1, 1)
    model.b = nn.Module()
    model.b.conv = nn.Conv2d(1, 1, 1)
    state = WeightsFile(state={"conv.weight": torch.ones(1, 1, 1, 1)}, format="c2")
    with pytest.raises(CheckpointError, match="ambiguous"):
        load_into_model(model, state)


# ---------------------------------------------------------------------------------------------
# torchvision ResNet-50
# ---------------------------------------------------------------------------------------------


def test_torchvision_resnet50_loads_and_matches_features(tmp_path):
    tv = torchvision.models.resnet50(weights=None)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    tv.eval()
    torch.save(tv.state_dict(), tmp_path / "resnet50.pth")

    weights = load_weights(tmp_path / "resnet50.pth")
    assert weights.format == "torchvision"
    assert not any(k.endswith("num_batches_tracked") for k in weights)
    model = _Backbone(stride_in_1x1=False)
    report = load_into_model(model, weights)
    assert report.missing == [] and report.shape_mismatch == []
    assert report.unexpected == ["fc.bias", "fc.weight"]
    tv_state = tv.state_dict()
    state = model.state_dict()
    assert torch.equal(state["backbone.bottom_up.res4.5.conv2.weight"], tv_state["layer3.5.conv2.weight"])
    assert torch.equal(
        state["backbone.bottom_up.res3.0.shortcut.norm.running_var"],
        tv_state["layer2.0.downsample.1.running_var"],
    )
    assert torch.equal(state["backbone.bottom_up.stem.conv1.norm.bias"], tv_state["bn1.bias"])

    # Same weights, same features: the mapping and the stride placement both hold.
    x = torch.randn(1, 3, 64, 96, generator=g)
    with torch.no_grad():
        ours = model.backbone.bottom_up(x)["res5"]
        ref = tv.layer4(tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))))))
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_torchvision_weights_warn_about_config():
    weights = WeightsFile(state={}, format="torchvision", source="resnet50.pth")
    cfg = get_cfg()
    warnings = check_weights_config(weights, cfg)
    assert any("MODEL.RESNETS.STRIDE_IN_1X1" in w for w in warnings)
    assert any("INPUT.FORMAT" in w for w in warnings)
    assert any("MODEL.PIXEL_MEAN" in w for w in warnings)
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.INPUT.FORMAT = "RGB"
    cfg.MODEL.PIXEL_MEAN = [123.675, 116.28, 103.53]
    cfg.MODEL.PIXEL_STD = [58.395, 57.12, 57.375]
    assert check_weights_config(weights, cfg) == []
    assert check_weights_config(WeightsFile(state={}, format="c2"), get_cfg()) == []
    assert len(check_weights_config(WeightsFile(state={}, format="c2"), cfg)) == 1
    # Converted by fetch-weights into our format: the origin is in the meta.
    converted = WeightsFile(state={}, format="ours", meta={"source_format": "torchvision"})
    assert any("STRIDE_IN_1X1" in w for w in check_weights_config(converted, get_cfg()))


# ---------------------------------------------------------------------------------------------
# Our format
# ---------------------------------------------------------------------------------------------


def test_our_format_round_trip_weights_only(tmp_path):
    model = _Backbone(**SLIM)
    values = _randomize(model, seed=3)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    sum(p.sum() for p in params).backward()
    opt.step()
    uri = str(tmp_path / "sub" / "model_0000010.pth")
    save_checkpoint(
        uri,
        model.state_dict(),
        meta={"iteration": 10, "class_names": ["a", "b"]},
        extra={"optimizer": opt.state_dict(), "iteration": 10},
    )
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["model_0000010.pth"]  # no temp left
    raw = torch.load(uri, weights_only=True)
    assert raw["meta"]["class_names"] == ["a", "b"] and raw["iteration"] == 10
    assert load_checkpoint(uri)["optimizer"]["param_groups"][0]["lr"] == 0.1

    weights = load_weights(uri)
    assert weights.format == "ours" and weights.meta["iteration"] == 10
    fresh = _Backbone(**SLIM)
    report = load_into_model(fresh, weights)
    assert report.missing == [] and report.unexpected == []
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    assert not all(torch.equal(model.state_dict()[k], values[k]) for k in values)  # the SGD step changed it


def test_save_refuses_non_plain_values(tmp_path):
    state = {"w": torch.zeros(2)}
    with pytest.raises(CheckpointError, match=r"extra\.sched\.fn has type function"):
        save_checkpoint(tmp_path / "c.pth", state, extra={"sched": {"fn": lambda: 0}})
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(tmp_path / "c.pth", state, meta={"t": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="reserved"):
        save_checkpoint(tmp_path / "c.pth", state, extra={"model": {}})
    assert not (tmp_path / "c.pth").exists()


def test_save_does_not_store_whole_storage_of_views(tmp_path):
    big = torch.zeros(1000, 1000)
    save_checkpoint(tmp_path / "v.pth", {"row": big[0]})
    assert (tmp_path / "v.pth").stat().st_size < 100_000
    assert load_checkpoint(tmp_path / "v.pth")["model"]["row"].shape == (1000,)


# ---------------------------------------------------------------------------------------------
# Reports and fine-tuning
# ---------------------------------------------------------------------------------------------


def _toy_heads(num_classes: int) -> nn.Module:
    model = nn.Module()
    model.roi_heads = nn.Module()
    model.roi_heads.box_predictor = nn.ModuleList()
    for _ in range(3):
        p = nn.Module()
        p.cls_score = nn.Linear(8, num_classes + 1)
        p.bbox_pred = nn.Linear(8, 4)
        model.roi_heads.box_predictor.append(p)
    model.roi_heads.mask_head = nn.Module()
    model.roi_heads.mask_head.predictor = nn.Conv2d(4, num_classes, 1)
    return model


def test_grouped_missing_and_unexpected_report(caplog):
    model = _toy_heads(3)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("roi_heads.box_predictor.0.")}
    state["fc1000.weight"] = torch.zeros(2)
    state["fc1000.bias"] = torch.zeros(2)
    with caplog.at_level(logging.WARNING, logger="cascade_rcnn.checkpoint"):
        report = load_into_model(model, state, source="ckpt.pth")
    assert report.missing == [
        "roi_heads.box_predictor.0.bbox_pred.bias",
        "roi_heads.box_predictor.0.bbox_pred.weight",
        "roi_heads.box_predictor.0.cls_score.bias",
        "roi_heads.box_predictor.0.cls_score.weight",
    ]
    text = caplog.text
    assert "roi_heads.box_predictor.0.{bbox_pred, cls_score}.{bias, weight}" in text
    assert "fc1000.{bias, weight}" in text
    assert "roi_heads.box_predictor.0.{bbox_pred, cls_score}.{bias, weight}" in report.format()


def test_group_keys_is_exact_product():
    keys = ["a.x.w", "a.x.b", "a.y.w", "c", "a.0.x.w"]
    assert group_keys(keys) == ["a.0.x.w", "a.x.{b, w}", "a.y.w", "c"]
    full = [f"h.{i}.{n}.{p}" for i in range(3) for n in ("cls", "box") for p in ("w", "b")]
    assert group_keys(full) == ["h.{0, 1, 2}.{box, cls}.{b, w}"]


def test_other_num_classes_skips_class_specific_layers(caplog):
    source = _toy_heads(80)
    target = _toy_heads(3)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="cascade_rcnn.checkpoint"):
        report = load_into_model(target, source.state_dict())
    mismatched = sorted(k for k, _, _ in report.shape_mismatch)
    assert mismatched == sorted(
        [f"roi_heads.box_predictor.{i}.cls_score.{p}" for i in range(3) for p in ("weight", "bias")]
        + ["roi_heads.mask_head.predictor.weight", "roi_heads.mask_head.predictor.bias"]
    )
    assert "roi_heads.box_predictor.0.cls_score.weight" in caplog.text and "(81, 8)" in caplog.text
    after = target.state_dict()
    assert torch.equal(
        after["roi_heads.box_predictor.1.bbox_pred.weight"],
        source.state_dict()["roi_heads.box_predictor.1.bbox_pred.weight"],
    )
    assert torch.equal(
        after["roi_heads.box_predictor.1.cls_score.weight"],
        before["roi_heads.box_predictor.1.cls_score.weight"],
    )

    # Same class count, new label set: drop the class-specific layers explicitly.
    same = _toy_heads(3)
    kept = drop_class_specific(_toy_heads(3).state_dict())
    assert not any("cls_score" in k or "mask_head.predictor" in k for k in kept)
    report = load_into_model(same, kept)
    assert group_keys(report.missing) == [
        "roi_heads.box_predictor.{0, 1, 2}.cls_score.{bias, weight}",
        "roi_heads.mask_head.predictor.{bias, weight}",
    ]


# ---------------------------------------------------------------------------------------------
# Object storage
# ---------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("d2_parity")
def test_s3_save_and_load(s3_env):
    from cascade_rcnn import storage

    bucket = s3_env
    uri = f"s3://{bucket}/run/model_final.pth"
    save_checkpoint(uri, {"w": torch.arange(4.0)}, meta={"iteration": 7})
    weights = load_weights(uri)
    assert weights.format == "ours" and weights.meta["iteration"] == 7
    assert torch.equal(weights["w"], torch.arange(4.0))
    assert load_checkpoint(uri)["meta"]["iteration"] == 7

    storage.put_file(str(FIXTURE / "model_final.pkl"), f"s3://{bucket}/zoo/model_final.pkl")
    zoo = load_weights(f"s3://{bucket}/zoo/model_final.pkl")
    assert zoo.format == "d2" and len(zoo) == 323
    with pytest.raises(CheckpointError, match="absent.pkl"):
        load_weights(f"s3://{bucket}/zoo/absent.pkl")
