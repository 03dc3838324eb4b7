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


# ---- a pod that requested accelerators and got none fails at once ----


@pytest.mark.parametrize("text", ["8", "1", "16", " 4 "])
def test_counts_are_digits(text):
    from cascade_rcnn.accel import parse_count

    assert parse_count("nproc_per_node", text) == int(text)


@pytest.mark.parametrize("text", ["8.0", "", "0", "-8", "eight", "8 x"])
def test_counts_that_are_not_digits_are_refused_by_name(text):
    from cascade_rcnn.accel import parse_count

    with pytest.raises(AcceleratorError, match=f"nproc_per_node={text!r}.*digits only"):
        parse_count("nproc_per_node", text)


def _probe(npu=0, cuda=0, torch_npu=False, **env):
    from cascade_rcnn.accel import DeviceProbe

    return DeviceProbe(torch_npu=torch_npu, npu_count=npu, cuda_count=cuda, env=env)


@pytest.mark.parametrize(
    "probe, words",
    [
        (_probe(), "finds 0 npu device(s) here (torch_npu not installed, 0 npu and 0 cuda device(s) visible; "
                   "ASCEND_VISIBLE_DEVICES unset, ASCEND_RT_VISIBLE_DEVICES unset, CUDA_VISIBLE_DEVICES unset)"),
        # torch_npu there, the device plugin mounted nothing: what a pod on an NPU node without its
        # devices sees.
        (_probe(torch_npu=True, ASCEND_VISIBLE_DEVICES=""), "torch_npu installed, 0 npu and 0 cuda"),
        (_probe(npu=4, torch_npu=True, ASCEND_VISIBLE_DEVICES="0,1,2,3"),
         "finds 4 npu device(s) here (torch_npu installed, 4 npu and 0 cuda device(s) visible; "
         "ASCEND_VISIBLE_DEVICES='0,1,2,3'"),
        (_probe(cuda=8), "finds 0 npu device(s)"),  # GPUs are not the NPUs the pod asked for
    ],
)  # fmt: skip
def test_requested_npus_that_are_not_all_there_fail_with_what_the_node_shows(probe, words):
    from cascade_rcnn.accel import require_requested

    with pytest.raises(AcceleratorError) as err:
        require_requested("huawei.com/Ascend910", 8, "auto", probe=probe)
    message = str(err.value)
    assert message.startswith("the step's pod requested 8 x huawei.com/Ascend910, but MODEL.DEVICE 'auto'")
    assert words in message
    assert "Set device=cpu to train on the CPU on purpose" in message


def test_requested_devices_that_are_there_pass():
    from cascade_rcnn.accel import require_requested

    require_requested("huawei.com/Ascend910", 8, "auto", probe=_probe(npu=8, torch_npu=True))
    require_requested("huawei.com/Ascend910", 8, "npu", probe=_probe(npu=16, torch_npu=True))
    require_requested("nvidia.com/gpu", 2, "auto", probe=_probe(cuda=2))
    with pytest.raises(AcceleratorError, match="finds 0 cuda device"):
        require_requested("nvidia.com/gpu", 2, "auto", probe=_probe(npu=8, torch_npu=True))


def test_nothing_requested_or_cpu_asked_for_checks_nothing(caplog):
    from cascade_rcnn.accel import require_requested

    require_requested("", 8, "auto", probe=_probe())  # the CLI and local runs
    with caplog.at_level("WARNING"):
        require_requested("huawei.com/Ascend910", 8, "cpu", probe=_probe())  # explicit
    assert "running on the CPU, as asked" in caplog.text


def _run_train_component(tmp_path: Path, device: str, env: dict) -> subprocess.CompletedProcess:
    """The train component's function, called as KFP's executor calls it, in a process of its own."""
    script = f"""
from kfp import dsl
from components.train import train
model = dsl.Model(uri="file://{tmp_path}/model")
model.path = "{tmp_path}/model.json"
curves = dsl.HTML(uri="file://{tmp_path}/curves")
curves.path = "{tmp_path}/curves.html"
train(
    dataset=dsl.Dataset(uri="s3://b/ds", metadata={{"manifest_uri": "{tmp_path}/no-data/manifest.json"}}),
    weights=dsl.Model(uri="s3://b/w", metadata={{"checkpoint_uri": "{tmp_path}/no-weights.pth"}}),
    config="configs/Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml", config_opts=[], static_canvas=[],
    device={device!r}, amp=True, root="{tmp_path}/root", run_id="", job_id="job-1",
    iterations=2, learning_rate=0.01, batch_per_device=1,
    nproc_per_node="8", accelerator="huawei.com/Ascend910", model=model, curves=curves,
)
"""
    repo = Path(__file__).resolve().parents[1]
    return subprocess.run(
        [sys.executable, "-c", script], cwd=repo, env=env, capture_output=True, text=True, timeout=600
    )


def test_a_cpu_only_pod_that_requested_8_npus_fails_before_any_worker_starts(tmp_path, monkeypatch):
    import os

    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("ASCEND_VISIBLE_DEVICES", "ASCEND_RT_VISIBLE_DEVICES")
    }
    env["CUDA_VISIBLE_DEVICES"] = ""  # what a pod without a GPU sees, on any machine running this
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    failed = _run_train_component(tmp_path, "auto", env)
    assert failed.returncode != 0
    last = failed.stderr.strip().splitlines()[-1]
    assert "AcceleratorError: the step's pod requested 8 x huawei.com/Ascend910" in last
    assert "ASCEND_VISIBLE_DEVICES unset" in last and "CUDA_VISIBLE_DEVICES=''" in last
    assert ("torch_npu not installed" in last) == (importlib.util.find_spec("torch_npu") is None)
    assert "starting 8 workers" not in failed.stderr  # no worker, no process group
    assert not (tmp_path / "root").exists()  # nothing written

    # device=cpu, the explicit way: past the check, to the missing data.
    explicit = _run_train_component(tmp_path, "cpu", env)
    assert explicit.returncode != 0
    output = explicit.stdout + explicit.stderr
    assert "running on the CPU, as asked" in output
    assert "AcceleratorError" not in output
    # The missing data is found next, by run_training, before any worker starts.
    assert "no-data/manifest.json" in explicit.stderr.strip().splitlines()[-1]
    assert "starting 8 workers" not in output
