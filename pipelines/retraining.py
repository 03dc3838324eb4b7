"""The pipeline `cascade-mask-rcnn-retraining`, for schedules: ingest -> check_new_data ->
(only when the data changed, or with force) train a challenger -> evaluate -> promote.

A pipeline of its own rather than a `mode` of the training pipeline: its graph and parameters differ
(a model name, the promotion rule, warm start), and a schedule's UI then shows only what it runs.

- check_new_data runs on the CPU image right after ingest: with the training split's data version
  equal to the champion's (and force false) the run ends there, with a "skipped: data unchanged"
  record and no accelerator pod requested.
- The challenger is fine-tuned from the champion's checkpoint (warm_start, the default, when there
  is a champion: warm_start_iterations at warm_start_learning_rate), else trained from the
  pretrained `weights` with the full schedule.
- promote re-evaluates the champion when the evaluation split changed since its record, then
  promotes the challenger only if it beats the champion's `metric` by at least `min_improvement`;
  every decision goes to `<root>/models/<model_name>/history/`.

Images, placement, retries and the S3 Secret are the training pipeline's CompileOptions; the model
steps (train or finetune, evaluate, promote) get the same ModelRun options (pipelines/tasks.py).
"""

from pathlib import Path
from typing import Optional, Union

from kfp import compiler, dsl

from components import check_new_data, evaluate, fetch_weights, ingest_coco, promote
from pipelines.tasks import CompileOptions, ModelRun, configure, training_ops
from pipelines.training import DEFAULT_CONFIG, DEFAULT_WEIGHTS

PIPELINE_NAME = "cascade-mask-rcnn-retraining"
COMPILED = Path(__file__).resolve().parent / "compiled" / "cascade_mask_rcnn_retraining.yaml"
DEFAULT_MODEL_NAME = "cascade-mask-rcnn"


def build_pipeline(opts: Optional[CompileOptions] = None):
    """The retraining pipeline function (a kfp GraphComponent) for these compile options."""
    opts = opts or CompileOptions()
    ingest_op = ingest_coco.build(opts.cpu_image)
    check_op = check_new_data.build(opts.cpu_image)
    weights_op = fetch_weights.build(opts.cpu_image)
    train_op, train_launcher_op, finetune_op, finetune_launcher_op = training_ops(opts)
    trainjob = opts.trainjob_settings()
    evaluate_op = evaluate.build(opts.cpu_image)
    promote_op = promote.build(opts.cpu_image)

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="Scheduled retraining: ingest, train a challenger only when the data changed, "
        "evaluate it, and promote it only if it beats the champion. The registry lives under "
        "`<root>/models/<model_name>/`.",
    )
    def cascade_mask_rcnn_retraining(
        root: str,
        model_name: str = DEFAULT_MODEL_NAME,
        force: bool = False,
        warm_start: bool = True,
        metric: str = "segm/AP",
        min_improvement: float = 0.0,
        data_source: str = "coco-official",
        dataset_name: str = "coco2017",
        train_split: str = "train2017",
        eval_split: str = "val2017",
        max_images: int = 0,
        ingest_strict: bool = False,
        weights: str = DEFAULT_WEIGHTS,
        weights_sha256: str = "",
        config: str = DEFAULT_CONFIG,
        config_opts: list = [],  # noqa: B006
        static_canvas: list = [],  # noqa: B006
        iterations: int = 22500,
        learning_rate: float = 0.2,
        warm_start_iterations: int = 2000,
        warm_start_learning_rate: float = 0.02,
        batch_per_device: int = 16,
        accelerator_type: str = "huawei.com/Ascend910",
        accelerator_count: str = "8",
        nodes: int = 1,
        device: str = opts.default_device,
        amp: bool = True,
        eval_max_images: int = 0,
        run_id: str = "",
        s3_secret: str = "cascade-rcnn-s3",
    ):
        """root: s3://bucket/prefix of data sets, weights, runs and the model registry.
        force: train even when the data did not change. metric: TASK/NAME of the promotion rule
        (segm/AP, bbox/AP, bbox/AP50, ...); min_improvement in AP points. nodes: training nodes of
        accelerator_count (digits) accelerators each; more than 1 trains as a Kubeflow Trainer
        TrainJob. static_canvas: [[height, width], ...] for static-shape mode (MODEL.STATIC); empty:
        dynamic."""
        ingest_task = ingest_op(
            source=data_source,
            root=root,
            name=dataset_name,
            splits=[train_split, eval_split],
            max_images=max_images,
            strict=ingest_strict,
        )
        configure(ingest_task, s3_secret, opts, "ingest COCO")
        dataset = ingest_task.outputs["dataset"]

        run = ModelRun(
            dataset=dataset,
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
        check_task = check_op(
            dataset=dataset,
            root=root,
            model_name=model_name,
            train_split=train_split,
            force=force,
            warm_start=warm_start,
            run_id=run_id,
            job_id=run.job_id,
        )
        configure(check_task, s3_secret, opts, "check for new data")

        placement = dict(
            nodes=nodes,
            trainjob=trainjob,
            accelerator_type=accelerator_type,
            accelerator_count=accelerator_count,
        )

        def evaluate_and_promote(checkpoint):
            eval_task = run.task(
                evaluate_op, "evaluate challenger", checkpoint=checkpoint, split=eval_split,
                max_images=eval_max_images,
            )  # fmt: skip
            run.task(
                promote_op, "promote if better", challenger=checkpoint,
                challenger_eval=eval_task.outputs["metrics"], model_name=model_name,
                train_split=train_split, eval_split=eval_split, eval_max_images=eval_max_images,
                metric=metric, min_improvement=min_improvement,
            )  # fmt: skip

        plan = check_task.outputs["Output"]
        with dsl.If(plan == "warm-start", name="warm-start"):
            warm = run.training_step(
                finetune_op, finetune_launcher_op, "warm-start-finetune", "train challenger (warm start)",
                **placement, base_model=check_task.outputs["champion_uri"], data="",
                iterations=warm_start_iterations, learning_rate=warm_start_learning_rate,
                batch_per_device=batch_per_device, finetune_opts=[],
            )  # fmt: skip
            evaluate_and_promote(warm)
        with dsl.Elif(plan == "from-pretrained", name="from-pretrained"):
            weights_task = weights_op(source=weights, sha256=weights_sha256, root=root)
            configure(weights_task, s3_secret, opts, "fetch weights")
            cold = run.training_step(
                train_op, train_launcher_op, "pretrained-train", "train challenger", **placement,
                weights=weights_task.outputs["model"], iterations=iterations, learning_rate=learning_rate,
                batch_per_device=batch_per_device,
            )  # fmt: skip
            evaluate_and_promote(cold)

    return cascade_mask_rcnn_retraining


def compile_pipeline(output: Union[str, Path] = COMPILED, opts: Optional[CompileOptions] = None) -> Path:
    """Compile to `output` (YAML); returns its path."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline_func=build_pipeline(opts), package_path=str(output))
    return output
