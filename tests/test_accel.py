"""cascade_rcnn.accel: device types, backends, AMP dtypes, scaler, and torch_npu isolation."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cascade_rcnn.accel import (
    Accelerator,
    AcceleratorError,
    accelerator_from_cfg,
    amp_dtype_from,
    resolve_accelerator,
    resolve_device,
    resolve_device_type,
)
from cascade_rcnn.config import get_cfg


def test_backend_per_device_type():
    assert Accelerator("cpu").backend == "gloo"
    assert Accelerator("cuda", 0).backend == "nccl"
    assert Accelerator("npu", 3).backend == "hccl"
    assert Accelerator("npu", 3).device_str == "npu:3"
    assert Accelerator("cpu").with_index(5).device == torch.device("cpu")
    assert Accelerator("cuda").with_index(2).device == torch.device("cuda:2")


def test_amp_dtype_from_config_keys():
    assert amp_dtype_from(False, "float16") is None
    assert amp_dtype_from(True, "float16") is torch.float16
    assert amp_dtype_from(True, "bfloat16") is torch.bfloat16
    with pytest.raises(AcceleratorError, match="SOLVER.AMP.DTYPE"):
        amp_dtype_from(True, "float8")


HAS_NPU = importlib.util.find_spec("torch_npu") is not None
FIXTURE_CONFIG = (
    Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "d2_parity" / "config.yaml"
)


def test_device_errors_name_the_key():
    with pytest.raises(AcceleratorError, match="MODEL.DEVICE"):
        resolve_device_type("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(AcceleratorError, match="MODEL.DEVICE is 'cuda'"):
            resolve_device_type("cuda")


@pytest.mark.skipif(HAS_NPU, reason="auto picks the NPU where torch_npu is installed")
def test_auto_resolves_to_what_this_machine_has():
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device("auto") == expected
    assert resolve_device(" AUTO ") == expected
    if expected.type == "cpu":
        # Every worker of a CPU run shares the one CPU device.
        assert resolve_accelerator("auto", local_rank=3) == Accelerator("cpu")


def test_cpu_spellings():
    for name in ("cpu", "CPU", " cpu:0 "):
        assert resolve_device(name) == torch.device("cpu")
    assert resolve_accelerator("cpu:0", local_rank=2, amp_dtype=torch.bfloat16) == Accelerator(
        "cpu", None, torch.bfloat16
    )


@pytest.mark.parametrize(
    "name, message",
    [
        ("tpu", "must be auto, cpu, cuda\\[:N\\] or npu\\[:N\\]; got 'tpu'"),
        ("", "got ''"),
        ("cuda:x", "'cuda:x': the device index must be a number"),
        ("cuda:-1", "'cuda:-1': the device index must be a number"),
        ("auto:1", "'auto:1': auto takes no index"),
        ("cpu:1", "'cpu:1': there is one CPU device"),
    ],
)
def test_bad_device_values_name_the_key_and_value(name, message):
    with pytest.raises(AcceleratorError, match="MODEL.DEVICE") as err:
        resolve_device(name)
    assert re.search(message, str(err.value)), str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_without_cuda_is_a_clear_error(name):
    with pytest.raises(AcceleratorError, match=f"MODEL.DEVICE is '{name}' but torch.cuda.is_available"):
        resolve_device(name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_indices_per_local_rank():
    count = torch.cuda.device_count()
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device(f"cuda:{count - 1}") == torch.device("cuda", count - 1)
    assert resolve_device("cuda", local_rank=count - 1) == torch.device("cuda", count - 1)
    with pytest.raises(AcceleratorError, match=f"only {count} cuda device"):
        resolve_device(f"cuda:{count}")
    with pytest.raises(AcceleratorError, match=f"local rank {count}"):
        resolve_device("auto", local_rank=count)
    with pytest.raises(AcceleratorError, match="names one device"):
        resolve_device("cuda:0", local_rank=1)


def test_build_model_resolves_model_device():
    from cascade_rcnn.config import load_config
    from cascade_rcnn.modeling import build_model

    cfg = load_config(FIXTURE_CONFIG, ["MODEL.DEVICE", "auto"])
    assert build_model(cfg).device == resolve_device("auto")
    assert build_model(cfg, "cpu:0").device == torch.device("cpu")
    cfg.MODEL.DEVICE = "gpu"
    with pytest.raises(AcceleratorError, match="MODEL.DEVICE must be .*'gpu'"):
        build_model(cfg)


def test_scaler_only_for_fp16_on_accelerators():
    assert not Accelerator("cpu", amp_dtype=torch.float16).grad_scaler().is_enabled()
    assert not Accelerator("cpu", amp_dtype=torch.bfloat16).grad_scaler().is_enabled()
    assert not Accelerator("cpu").grad_scaler().is_enabled()


def test_cpu_bf16_autocast_runs_matmul_in_bf16():
    cfg = get_cfg()
    cfg.SOLVER.AMP.ENABLED = True
    cfg.SOLVER.AMP.DTYPE = "bfloat16"
    acc = accelerator_from_cfg(cfg)
    assert acc.type == "cpu" and acc.amp_dtype is torch.bfloat16
    a = torch.randn(4, 4)
    with acc.autocast():
        out = a @ a
    assert out.dtype == torch.bfloat16
    with Accelerator("cpu").autocast():
        assert (a @ a).dtype == torch.float32


def test_cpu_memory_counter_is_positive():
    assert Accelerator("cpu").max_memory_allocated_mb() > 1.0


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("auto", marks=pytest.mark.skipif(HAS_NPU, reason="auto picks the NPU"))]
)
def test_cpu_use_never_imports_torch_npu(device):
    code = (
        "import sys\n"
        "from cascade_rcnn.accel import accelerator_from_cfg\n"
        "from cascade_rcnn.config import get_cfg\n"
        "import torch\n"
        f"cfg = get_cfg(); cfg.MODEL.DEVICE = {device!r}\n"
        "acc = accelerator_from_cfg(cfg)\n"
        "acc.set_device(); acc.synchronize(); acc.max_memory_allocated_mb(); acc.rng_state()\n"
        "with acc.autocast():\n"
        "    torch.ones(2) @ torch.ones(2)\n"
        "assert 'torch_npu' not in sys.modules, 'torch_npu was imported'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_npu_without_torch_npu_is_a_clear_error():
    import importlib.util

    if importlib.util.find_spec("torch_npu") is not None:
        pytest.skip("torch_npu is installed here")
    with pytest.raises(AcceleratorError, match="torch_npu"):
        resolve_device_type("npu")


def test_fp16_amp_on_cpu_runs_float32(caplog):
    cfg = get_cfg()
    cfg.MODEL.DEVICE = "auto"  # the pipeline's defaults: device auto, amp true (float16)
    cfg.SOLVER.AMP.ENABLED = True
    assert cfg.SOLVER.AMP.DTYPE == "float16"
    with caplog.at_level("WARNING", logger="cascade_rcnn.accel"):
        acc = accelerator_from_cfg(cfg)
    if acc.type != "cpu":
        pytest.skip(f"auto resolved to {acc.type}")
    assert acc.amp_dtype is None and not acc.amp_enabled
    assert "SOLVER.AMP.DTYPE=float16 on CPU" in caplog.text
