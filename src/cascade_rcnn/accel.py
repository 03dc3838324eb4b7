"""What differs between CPU, CUDA and Ascend NPU: device strings, collective backend, autocast dtype,
GradScaler, memory counters.

`torch_npu` is imported only when an NPU accelerator is asked for, so CPU and CUDA runs never load it.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import resource
import sys
from dataclasses import dataclass, field

import torch

from cascade_rcnn.errors import CascadeRCNNError

log = logging.getLogger(__name__)

# Collective backend per device type: gloo on CPU, NCCL on NVIDIA, HCCL on Ascend.
BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}
AMP_DTYPES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


class AcceleratorError(CascadeRCNNError, RuntimeError):
    """The requested device is unavailable or the AMP settings do not fit it."""


@dataclass(frozen=True)
class Accelerator:
    """One device type and how this process uses it.

    type: "cpu" | "cuda" | "npu"; index: the local device index (None on CPU).
    amp_dtype: the autocast dtype, or None when AMP is off.
    """

    type: str
    index: int | None = None
    amp_dtype: torch.dtype | None = None

    @property
    def device_str(self) -> str:
        return self.type if self.index is None else f"{self.type}:{self.index}"

    @property
    def device(self) -> torch.device:
        # torch only parses "npu" once torch_npu has registered it.
        if self.type == "npu":
            import_torch_npu()
        return torch.device(self.device_str)

    @property
    def backend(self) -> str:
        return BACKENDS[self.type]

    @property
    def amp_enabled(self) -> bool:
        return self.amp_dtype is not None

    def with_index(self, local_rank: int) -> Accelerator:
        """The same accelerator bound to device `local_rank` (CPU has no index)."""
        return self if self.type == "cpu" else Accelerator(self.type, local_rank, self.amp_dtype)

    def set_device(self) -> None:
        """Make this process's default device the one at `index` (no-op on CPU)."""
        if self.type == "cpu" or self.index is None:
            return
        _device_module(self.type).set_device(self.index)

    def autocast(self) -> torch.autocast:
        """A context that runs the forward in `amp_dtype` (disabled when AMP is off)."""
        dtype = self.amp_dtype or torch.float32
        return torch.autocast(device_type=self.type, dtype=dtype, enabled=self.amp_enabled)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling for fp16 on CUDA/NPU; a pass-through scaler otherwise (bf16 needs none)."""
        enabled = self.amp_dtype == torch.float16 and self.type in ("cuda", "npu")
        return torch.amp.GradScaler(self.type if self.type != "cpu" else "cpu", enabled=enabled)

    def synchronize(self) -> None:
        if self.type != "cpu":
            _device_module(self.type).synchronize()

    def max_memory_allocated_mb(self) -> float:
        """Peak device memory allocated by tensors, in MiB; on CPU, the process's peak resident size."""
        if self.type == "cpu":
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            # ru_maxrss is KiB on Linux, bytes on macOS.
            return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
        return _device_module(self.type).max_memory_allocated(self.device) / (1024 * 1024)

    def reset_peak_memory(self) -> None:
        if self.type != "cpu":
            _device_module(self.type).reset_peak_memory_stats(self.device)

    def rng_state(self) -> torch.Tensor | None:
        """The device generator's state (None on CPU, whose state is torch's global one)."""
        if self.type == "cpu":
            return None
        return _device_module(self.type).get_rng_state(self.device)

    def set_rng_state(self, state: torch.Tensor | None) -> None:
        if self.type != "cpu" and state is not None:
            _device_module(self.type).set_rng_state(state, self.device)


def _device_module(device_type: str):
    if device_type == "npu":
        import_torch_npu()
    return getattr(torch, device_type)


def import_torch_npu():
    """Import torch_npu (registers the `npu` device and `torch.npu`); a clear error when absent."""
    try:
        return importlib.import_module("torch_npu")
    except ImportError as e:
        raise AcceleratorError(
            "MODEL.DEVICE is npu but torch_npu cannot be imported "
            f"({e}); install the torch-npu build that matches torch {torch.__version__} and source CANN's set_env.sh"
        ) from None


def _parse(name: str) -> tuple[str, int | None]:
    """MODEL.DEVICE as (base, explicit index or None); only syntax, no availability checks."""
    text = str(name).strip().lower()
    base, sep, index_text = text.partition(":")
    if base not in ("auto", *BACKENDS):
        raise AcceleratorError(f"MODEL.DEVICE must be auto, cpu, cuda[:N] or npu[:N]; got {name!r}")
    if not sep:
        return base, None
    if not index_text.isdigit():
        raise AcceleratorError(f"MODEL.DEVICE {name!r}: the device index must be a number (cuda:0, npu:3)")
    if base == "auto":
        raise AcceleratorError(f"MODEL.DEVICE {name!r}: auto takes no index; use cuda:N or npu:N")
    index = int(index_text)
    if base == "cpu" and index != 0:
        raise AcceleratorError(f"MODEL.DEVICE {name!r}: there is one CPU device, cpu (or cpu:0)")
    return base, index


def resolve_device_type(name: str) -> str:
    """ "cpu" | "cuda" | "npu" from MODEL.DEVICE; "auto" picks npu, then cuda, then cpu.

    "auto" checks for torch_npu with find_spec, which does not import it.
    """
    base, _ = _parse(name)
    if base == "auto":
        if importlib.util.find_spec("torch_npu") is not None:
            import_torch_npu()
            if torch.npu.is_available():
                return "npu"
        return "cuda" if torch.cuda.is_available() else "cpu"
    if base == "cuda" and not torch.cuda.is_available():
        raise AcceleratorError(f"MODEL.DEVICE is {name!r} but torch.cuda.is_available() is False")
    if base == "npu":
        import_torch_npu()
        if not torch.npu.is_available():
            raise AcceleratorError(f"MODEL.DEVICE is {name!r} but torch.npu.is_available() is False")
    return base


# Device plugins' resource names and the torch device type their devices show up as.
RESOURCE_DEVICE_TYPES = {"huawei.com/": "npu", "nvidia.com/gpu": "cuda"}
VISIBILITY_ENV = ("ASCEND_VISIBLE_DEVICES", "ASCEND_RT_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES")


def parse_count(name: str, value) -> int:
    """A device or process count given as text: digits only, at least 1. Counts travel as text because
    the KFP backend fills a pod's accelerator limit only from a STRING run parameter (see
    pipelines/tasks.py)."""
    text = str(value).strip()
    if not text.isdigit() or int(text) < 1:
        raise AcceleratorError(
            f"{name}={value!r} must be a whole number of at least 1, in digits only (e.g. 8)"
        )
    return int(text)


@dataclass(frozen=True)
class DeviceProbe:
    """What this process can see of accelerators: whether torch_npu is installed, the device counts,
    and the visibility variables the device plugins and runtimes set."""

    torch_npu: bool
    npu_count: int
    cuda_count: int
    env: dict = field(default_factory=dict)

    def describe(self) -> str:
        env = ", ".join(f"{k}={self.env[k]!r}" if k in self.env else f"{k} unset" for k in VISIBILITY_ENV)
        return (
            f"torch_npu {'installed' if self.torch_npu else 'not installed'}, "
            f"{self.npu_count} npu and {self.cuda_count} cuda device(s) visible; {env}"
        )


def probe_devices() -> DeviceProbe:
    has_npu = importlib.util.find_spec("torch_npu") is not None
    npu_count = 0
    if has_npu:
        try:
            import_torch_npu()
            npu_count = torch.npu.device_count() if torch.npu.is_available() else 0
        except Exception as e:  # a broken CANN install: report it as no device
            log.warning("torch_npu is installed but cannot count devices: %s", e)
    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    env = {k: os.environ[k] for k in VISIBILITY_ENV if k in os.environ}
    return DeviceProbe(has_npu, npu_count, cuda_count, env)


def require_requested(resource_name: str, count: int, device: str, probe: DeviceProbe | None = None) -> None:
    """Fail at once when this pod requested `count` devices of `resource_name` (a device plugin's
    resource, e.g. huawei.com/Ascend910) and MODEL.DEVICE `device` does not find that many: a
    missing device must not become a CPU run that never ends. device "cpu" is the explicit way to
    run on the CPU anyway; an empty resource_name (nothing requested) checks nothing."""
    if not resource_name:
        return
    base, _ = _parse(device)
    if base == "cpu":
        log.warning(
            "the pod requested %d x %s but MODEL.DEVICE is cpu: running on the CPU, as asked",
            count,
            resource_name,
        )
        return
    want = next((t for prefix, t in RESOURCE_DEVICE_TYPES.items() if resource_name.startswith(prefix)), None)
    probe = probe or probe_devices()
    seen = {"npu": probe.npu_count, "cuda": probe.cuda_count}
    if base == "auto":
        # auto's order (npu, then cuda), unless the resource says which kind the plugin mounts.
        found = want or ("npu" if probe.npu_count else "cuda" if probe.cuda_count else None)
    else:
        found = base
    visible = seen.get(found, 0)
    if found is None or visible < count or (want is not None and found != want):
        kind = want or found or "accelerator"
        raise AcceleratorError(
            f"the step's pod requested {count} x {resource_name}, but MODEL.DEVICE {device!r} finds "
            f"{visible} {kind} device(s) here ({probe.describe()}). The node's device plugin mounted "
            "fewer devices than requested, or the image lacks their runtime (torch_npu, CANN's "
            "set_env.sh); see docs/cluster.md, Troubleshooting. Set device=cpu to train on the CPU on purpose."
        )


def resolve_accelerator(name: str, local_rank: int = 0, amp_dtype: torch.dtype | None = None) -> Accelerator:
    """The one place that turns MODEL.DEVICE (auto, cpu, cuda[:N], npu[:N]) into this process's device.

    Without an index, process `local_rank` gets device `local_rank` of the resolved type. An explicit
    index names one device, so it is for a single process per node: with local_rank > 0 it is an error
    (every worker on that device would be a silent slowdown, or an NCCL/HCCL hang).
    """
    base, index = _parse(name)
    device_type = resolve_device_type(name)
    if device_type == "cpu":
        return Accelerator("cpu", None, amp_dtype)
    if index is not None and local_rank > 0:
        raise AcceleratorError(
            f"MODEL.DEVICE {name!r} names one device but this is local rank {local_rank} of several "
            f"processes; use {device_type} or auto to give each process its own device"
        )
    index = local_rank if index is None else index
    count = _device_module(device_type).device_count()
    if index >= count:
        what = (
            f"MODEL.DEVICE {name!r}"
            if base != "auto"
            else f"MODEL.DEVICE {name!r} (resolved to {device_type})"
        )
        raise AcceleratorError(
            f"{what} needs {device_type}:{index} (local rank {local_rank}) but only {count} "
            f"{device_type} device(s) are visible; fewer processes per node, or another index"
        )
    return Accelerator(device_type, index, amp_dtype)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The torch.device for MODEL.DEVICE in process `local_rank` (see resolve_accelerator)."""
    return resolve_accelerator(name, local_rank).device


def amp_dtype_from(enabled: bool, dtype_name: str) -> torch.dtype | None:
    """SOLVER.AMP.ENABLED / SOLVER.AMP.DTYPE as a torch dtype (None when AMP is off)."""
    if not enabled:
        return None
    key = str(dtype_name).strip().lower()
    if key not in AMP_DTYPES:
        raise AcceleratorError(f"SOLVER.AMP.DTYPE must be float16 or bfloat16, got {dtype_name!r}")
    return AMP_DTYPES[key]


def accelerator_from_cfg(cfg, local_rank: int = 0) -> Accelerator:
    """The accelerator for MODEL.DEVICE and SOLVER.AMP, bound to device `local_rank`."""
    amp = amp_dtype_from(bool(cfg.SOLVER.AMP.ENABLED), cfg.SOLVER.AMP.DTYPE)
    accel = resolve_accelerator(str(cfg.MODEL.DEVICE), local_rank, amp)
    if accel.type == "cpu" and accel.amp_dtype == torch.float16:
        # The pipeline's amp=True default is for NPU/GPU. CPUs have no fast fp16 kernels (autocast is
        # slower than float32) and GradScaler is CUDA/NPU-only, so fp16 gradients would go unscaled.
        log.warning(
            "SOLVER.AMP.DTYPE=float16 on CPU: running float32 instead (set SOLVER.AMP.DTYPE bfloat16 "
            "for CPU autocast)"
        )
        accel = Accelerator("cpu", amp_dtype=None)
    return accel
