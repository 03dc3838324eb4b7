"""What differs between CPU, CUDA and Ascend NPU: device strings, collective backend, autocast dtype,
GradScaler, memory counters.

`torch_npu` is imported only when an NPU accelerator is asked for, so CPU and CUDA runs never load it.
"""

from __future__ import annotations

import importlib
import importlib.util
import resource
import sys
from dataclasses import dataclass

import torch

# Collective backend per device type: gloo on CPU, NCCL on NVIDIA, HCCL on Ascend.
BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}
AMP_DTYPES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


class AcceleratorError(RuntimeError):
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


def resolve_device_type(name: str) -> str:
    """ "cpu" | "cuda" | "npu" from MODEL.DEVICE; "auto" picks npu, then cuda, then cpu.

    "auto" checks for torch_npu with find_spec, which does not import it.
    """
    name = name.strip().lower()
    base = name.split(":")[0]
    if base == "auto":
        if importlib.util.find_spec("torch_npu") is not None:
            import_torch_npu()
            if torch.npu.is_available():
                return "npu"
        return "cuda" if torch.cuda.is_available() else "cpu"
    if base not in BACKENDS:
        raise AcceleratorError(f"MODEL.DEVICE must be one of cpu, cuda, npu, auto; got {name!r}")
    if base == "cuda" and not torch.cuda.is_available():
        raise AcceleratorError("MODEL.DEVICE is cuda but torch.cuda.is_available() is False")
    if base == "npu":
        import_torch_npu()
        if not torch.npu.is_available():
            raise AcceleratorError("MODEL.DEVICE is npu but torch.npu.is_available() is False")
    return base


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
    device_type = resolve_device_type(str(cfg.MODEL.DEVICE))
    amp = amp_dtype_from(bool(cfg.SOLVER.AMP.ENABLED), cfg.SOLVER.AMP.DTYPE)
    return Accelerator(device_type, amp_dtype=amp).with_index(local_rank)
