"""What every pipeline step that runs the model receives alike, and what it makes of it.

pipelines/tasks.py (`ModelRun`) hands the same values to train, finetune, evaluate, promote and the
TrainJob launchers: the config file and its overrides, the static canvases, the device, AMP, and the
run's output prefix. `StepOptions` turns them into config overrides and URIs in one place, so two
steps cannot run one model in two ways (a static-mode challenger against a champion re-evaluated
in dynamic mode, say).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from . import storage
from .config import static_opts


@dataclass(frozen=True)
class StepOptions:
    """config: the YAML file (in the image). config_opts: KEY VALUE overrides that define the model.
    static_canvas: [[height, width], ...] for static-shape mode; empty: dynamic shapes.
    device, amp: MODEL.DEVICE and SOLVER.AMP.ENABLED.
    root, run_id, job_id: the run's outputs live under `<root>/runs/<run_id or job_id>/<step>/`."""

    config: str
    config_opts: Sequence[Any] = ()
    static_canvas: Sequence[Any] = field(default_factory=list)
    device: str = "auto"
    amp: bool = True
    root: str = ""
    run_id: str = ""
    job_id: str = ""

    @property
    def run(self) -> str:
        """The run's name under `<root>/runs/`: run_id, else the KFP job's id (stable across retries)."""
        return self.run_id or self.job_id

    def output(self, step: str) -> str:
        if not self.root or not self.run:
            raise ValueError(f"step {step!r}: root and run_id or job_id are needed for the output prefix")
        return storage.join(self.root, "runs", self.run, step)

    def overrides(self, config_opts: Optional[Sequence[Any]] = None) -> list[str]:
        """Config overrides of a model run: device and AMP, the model's overrides (these options' own,
        or another model's, e.g. the champion's recorded ones), then the static canvases, so every
        model a run evaluates runs in the same mode."""
        opts = self.config_opts if config_opts is None else config_opts
        return [
            "MODEL.DEVICE",
            str(self.device),
            "SOLVER.AMP.ENABLED",
            str(bool(self.amp)),
            *[str(x) for x in opts],
            *static_opts(self.static_canvas),
        ]

    def model_opts(self) -> list[str]:
        """The overrides without device and AMP (what a TrainJob's `opts` carries; its device and amp
        fields set those)."""
        return [*[str(x) for x in self.config_opts], *static_opts(self.static_canvas)]
