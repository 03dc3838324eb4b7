"""Component `evaluate`: COCO box and mask AP of a checkpoint on a split (cascade_rcnn.evaluation).

Writes the results, metrics.json and the reports under `<root>/runs/<run id>/eval/`, and gives KFP a
Metrics artifact (the AP families, as `bbox/AP`, `segm/AP50`, ...), the Markdown table and the HTML
report with example images and their predicted masks.
"""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Output
from kfp.dsl.python_component import PythonComponent


def evaluate(
    dataset: Input[Dataset],
    checkpoint: str,
    config: str,
    config_opts: list,
    static_canvas: list,
    device: str,
    amp: bool,
    root: str,
    run_id: str,
    job_id: str,
    split: str,
    max_images: int,
    metrics: Output[Metrics],
    table: Output[Markdown],
    report: Output[HTML],
):
    """Evaluate the checkpoint (a URI, as train and finetune return it) on `split` of the dataset
    (max_images: the first N, 0: all), with the options every model step shares."""
    from cascade_rcnn.evaluation import evaluate_checkpoint, kfp_metrics
    from cascade_rcnn.logs import setup_logging
    from cascade_rcnn.step_options import StepOptions

    setup_logging()
    options = StepOptions(config, config_opts, static_canvas, device, amp, root, run_id, job_id)
    output = options.output("eval")
    results = evaluate_checkpoint(
        config,
        checkpoint,
        dataset.metadata["manifest_uri"],
        split,
        output,
        max_images=max_images if max_images > 0 else None,
        opts=options.overrides(),
        report_md_to=table.path,
        report_html_to=report.path,
    )
    for name, value in kfp_metrics(results).items():
        metrics.log_metric(name, value)
    metrics.metadata["output_uri"] = output


def build(base_image: str) -> PythonComponent:
    return dsl.component(evaluate, base_image=base_image, install_kfp_package=False)
