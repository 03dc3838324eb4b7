"""cascade_rcnn.accel: device types, backends, AMP dtypes, scaler, and torch_npu isolation."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from cascade_rcnn.accel import (
    Accelerator,
    AcceleratorError,
    accelerator_from_cfg,
    amp_dtype_from,
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


def test_device_errors_name_the_key():
    with pytest.raises(AcceleratorError, match="MODEL.DEVICE"):
        resolve_device_type("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(AcceleratorError, match="MODEL.DEVICE is cuda"):
            resolve_device_type("cuda")


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


def test_cpu_use_never_imports_torch_npu():
    code = (
        "import sys\n"
        "from cascade_rcnn.accel import accelerator_from_cfg\n"
        "from cascade_rcnn.config import get_cfg\n"
        "import torch\n"
        "cfg = get_cfg(); cfg.MODEL.DEVICE = 'cpu'\n"
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
