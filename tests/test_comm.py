"""comm's process-group setup on the supported torch range: several gloo (CPU) processes are
refused, before any rendezvous, on a torch whose gloo teardown can hang (older than 2.8)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from cascade_rcnn.accel import Accelerator
from cascade_rcnn.comm import GLOO_SAFE_TEARDOWN, DistInfo, init_process_group, unsafe_gloo_teardown


@pytest.mark.parametrize("version", ["2.5.1", "2.5.1+cpu", "2.7.1", "2.6.0a0+git1234"])
def test_gloo_with_several_processes_is_refused_before_2_8(version):
    problem = unsafe_gloo_teardown("gloo", 2, version)
    assert problem and f"torch {version}" in problem and "--nproc-per-node 1" in problem
    assert "pytorch PR 154976" in problem


@pytest.mark.parametrize(
    "backend,world_size,version",
    [("gloo", 2, "2.8.0"), ("gloo", 4, "2.14.1+cpu"), ("gloo", 1, "2.5.1"), ("hccl", 8, "2.5.1"),
     ("nccl", 8, "2.5.1+cu124")],
)  # fmt: skip
def test_other_backends_single_processes_and_newer_torch_may_start(backend, world_size, version):
    assert unsafe_gloo_teardown(backend, world_size, version) is None


def test_init_process_group_refuses_on_this_torch_exactly_when_teardown_is_unsafe(monkeypatch):
    """On the running torch: below 2.8 (make test-compat) the refusal comes before any rendezvous
    (no MASTER_ADDR is set, so reaching it would fail differently); from 2.8 on (make test) the call
    gets as far as the missing rendezvous address."""
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    release = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    expected = "can hang at exit" if release < GLOO_SAFE_TEARDOWN else "MASTER_ADDR is not set"
    with pytest.raises((RuntimeError, ValueError), match=expected):
        init_process_group(DistInfo(rank=0, world_size=2), Accelerator("cpu"))
    assert not dist.is_initialized()
