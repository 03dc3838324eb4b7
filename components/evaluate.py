"""Component `evaluate`: COCO box and mask AP of a Model on a split (cascade_rcnn.evaluation).

Writes the results, metrics.json and the reports under `<root>/runs/<run id>/eval/`, and gives KFP a
Metrics artifact (the AP families, as `bbox/AP`, `segm/AP50`, ...), the Markdown table and the HTML
report with example images and their predicted masks.
"""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output
from kfp.dsl.python_component import PythonComponent


def evaluate(
    dataset: Input[Dataset],
    model: Input[Model],
    config: str,
    root: str,
    run_id: str,
    job_id: str,
    split: str,
    max_images: int,
    device: str,
    config_opts: list,
    metrics: Output[Metrics],
    table: Output[Markdown],
    report: Output[HTML],
    static_canvas: list = [],  # noqa: B006 (kfp reads the default from here)
):
    """Evaluate `model`'s checkpoint on `split` of the dataset (max_images: the first N, 0: all)."""
    from cascade_rcnn import storage
    from cascade_rcnn.config import load_config, static_opts
    from cascade_rcnn.evaluation import evaluate_checkpoint, kfp_metrics
    from cascade_rcnn.logs import setup_logging

    setup_logging()
    output = storage.join(root, "runs", run_id or job_id, "eval")
    opts = [*[str(x) for x in config_opts], *static_opts(static_canvas)]
    cfg = load_config(config, ["MODEL.DEVICE", device, *opts])
    weights = model.metadata["checkpoint_uri"]
    results = evaluate_checkpoint(
        cfg,
        weights,
        dataset.metadata["manifest_uri"],
        split,
        output,
        max_images=max_images if max_images > 0 else None,
        report_md_to=table.path,
        report_html_to=report.path,
    )
    for name, value in kfp_metrics(results).items():
        metrics.log_metric(name, value)
    metrics.metadata["output_uri"] = output


def build(base_image: str) -> PythonComponent:
    return dsl.component(evaluate, base_image=base_image, install_kfp_package=False)
