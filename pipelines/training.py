"""The pipeline `cascade-mask-rcnn-training`: ingest_coco -> fetch_weights -> train -> evaluate ->
finetune (behind the `finetune` switch).

Two kinds of settings:
- pipeline parameters (chosen per run, listed in `build_pipeline`): data, root, config, schedule,
  accelerator type and count, ...; their defaults reproduce the 8-NPU reference recipe
  (16 images per NPU = 128 per step, base LR 0.2, 22500 iterations, LR steps at 15000 and 20000,
  AMP);
- compile options (`CompileOptions`, pipelines/tasks.py: fixed in the compiled YAML): images, node
  selector, toleration, /dev/shm size, timeout, retries, termination grace period, CPU/memory, the S3
  Secret's key names.

`accelerator_type` and `accelerator_count` are STRING run parameters: the KFP backend fills a pod's
resources only from those (pipelines/tasks.py has the backend rules the package follows).

`nodes` (run parameter, default 1) picks one of two tasks per training step: nodes == 1 trains in
the step's pod on the accelerator image; nodes > 1 runs the same component on the CPU image as a
launcher of a Kubeflow Trainer TrainJob (cascade_rcnn.engine.trainjob) of `nodes` nodes. Evaluate
and finetune take the checkpoint of whichever ran.
"""

from pathlib import Path
from typing import Optional, Union

from kfp import compiler, dsl

from components import evaluate, fetch_weights, ingest_coco
from pipelines.tasks import LAUNCHER_STEPS, CompileOptions, ModelRun, configure, training_ops

__all__ = ["CompileOptions", "LAUNCHER_STEPS", "build_pipeline", "compile_pipeline"]

PIPELINE_NAME = "cascade-mask-rcnn-training"
COMPILED = Path(__file__).resolve().parent / "compiled" / "cascade_mask_rcnn_training.yaml"
DEFAULT_CONFIG = "configs/Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml"
DEFAULT_WEIGHTS = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
STEP_NAMES = ("ingest-coco", "fetch-weights", "train", "evaluate", "finetune")


def build_pipeline(opts: Optional[CompileOptions] = None):
    """The pipeline function (a kfp GraphComponent) for these compile options."""
    opts = opts or CompileOptions()
    ingest_op = ingest_coco.build(opts.cpu_image)
    weights_op = fetch_weights.build(opts.cpu_image)
    evaluate_op = evaluate.build(opts.cpu_image)
    train_op, train_launcher_op, finetune_op, finetune_launcher_op = training_ops(opts)
    trainjob = opts.trainjob_settings()

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="COCO ingest, pretrained weights, Cascade Mask R-CNN training on accelerators, "
        "COCO evaluation with reports, optional fine-tuning. Artifacts live under `root`.",
    )
    def cascade_mask_rcnn_training(
        root: str,
        data_source: str = "coco-official",
        dataset_name: str = "coco2017",
        splits: list = ["train2017", "val2017"],  # noqa: B006 (kfp reads the default from here)
        max_images: int = 0,
        ingest_strict: bool = False,
        weights: str = DEFAULT_WEIGHTS,
        weights_sha256: str = "",
        config: str = DEFAULT_CONFIG,
        config_opts: list = [],  # noqa: B006
        static_canvas: list = [],  # noqa: B006
        iterations: int = 22500,
        learning_rate: float = 0.2,
        batch_per_device: int = 16,
        accelerator_type: str = "huawei.com/Ascend910",
        accelerator_count: str = "8",
        nodes: int = 1,
        device: str = opts.default_device,
        amp: bool = True,
        eval_split: str = "val2017",
        eval_max_images: int = 0,
        finetune: bool = False,
        finetune_data: str = "",
        finetune_iterations: int = 2000,
        finetune_learning_rate: float = 0.02,
        finetune_opts: list = [],  # noqa: B006
        run_id: str = "",
        s3_secret: str = "cascade-rcnn-s3",
    ):
        """root: s3://bucket/prefix for data sets, weights and runs (`<root>/runs/<run id>/`).
        accelerator_count: devices per training pod (digits: the backend fills pod resources only
        from string parameters), one trainer process each.
        run_id: empty uses the KFP run's id; reuse an id to resume a run's training in a new run.
        nodes: training nodes of accelerator_count accelerators each; more than 1 runs train and
        finetune as Kubeflow Trainer TrainJobs (docs/cluster.md).
        static_canvas: [[height, width], ...] trains and evaluates in static-shape mode on those
        canvases (MODEL.STATIC, e.g. [[800, 1344], [1344, 800]]); empty: dynamic shapes."""
        ingest_task = ingest_op(
            source=data_source,
            root=root,
            name=dataset_name,
            splits=splits,
            max_images=max_images,
            strict=ingest_strict,
        )
        configure(ingest_task, s3_secret, opts, "ingest COCO")

        weights_task = weights_op(source=weights, sha256=weights_sha256, root=root).after(ingest_task)
        configure(weights_task, s3_secret, opts, "fetch weights")

        run = ModelRun(
            dataset=ingest_task.outputs["dataset"],
            config=config,
            config_opts=config_opts,
            static_canvas=static_canvas,
            device=device,
            amp=amp,
            root=root,
            run_id=run_id,
            s3_secret=s3_secret,
            opts=opts,
        )
        placement = dict(
            nodes=nodes,
            trainjob=trainjob,
            accelerator_type=accelerator_type,
            accelerator_count=accelerator_count,
        )
        trained = run.training_step(
            train_op, train_launcher_op, "train", "train", **placement,
            weights=weights_task.outputs["model"], iterations=iterations, learning_rate=learning_rate,
            batch_per_device=batch_per_device,
        )  # fmt: skip

        eval_task = run.task(
            evaluate_op, "evaluate", checkpoint=trained, split=eval_split, max_images=eval_max_images
        )

        with dsl.If(finetune == True, name="finetune-enabled"):  # noqa: E712 (builds a kfp condition)
            # Fine-tune once the trained model has been evaluated, so the steps read in order.
            run.training_step(
                finetune_op, finetune_launcher_op, "finetune", "finetune", **placement,
                base_model=trained, data=finetune_data, iterations=finetune_iterations,
                learning_rate=finetune_learning_rate, batch_per_device=batch_per_device,
                finetune_opts=finetune_opts, after=eval_task,
            )  # fmt: skip

    return cascade_mask_rcnn_training


def compile_pipeline(output: Union[str, Path] = COMPILED, opts: Optional[CompileOptions] = None) -> Path:
    """Compile to `output` (YAML); returns its path."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline_func=build_pipeline(opts), package_path=str(output))
    return output
