"""Component `promote`: promote the challenger only if it beats the champion (cascade_rcnn.retrain).

Re-evaluates the champion when the evaluation data changed since its record, in the same mode the
challenger was evaluated in (device, AMP, static canvases), writes the decision to
`<root>/models/<model_name>/` (champion.json, history/), and shows it in the KFP UI: the comparison
as Markdown and HTML (AP table, per-class deltas, example images of both) and the Metrics of both
models.
"""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Output
from kfp.dsl.python_component import PythonComponent


def promote(
    dataset: Input[Dataset],
    challenger: str,
    challenger_eval: Input[Metrics],
    config: str,
    config_opts: list,
    static_canvas: list,
    device: str,
    amp: bool,
    root: str,
    run_id: str,
    job_id: str,
    model_name: str,
    train_split: str,
    eval_split: str,
    eval_max_images: int,
    metric: str,
    min_improvement: float,
    comparison: Output[Markdown],
    report: Output[HTML],
    champion_metrics: Output[Metrics],
    challenger_metrics: Output[Metrics],
) -> str:
    """challenger: the challenger's checkpoint URI. Returns the decision: promoted or rejected."""
    from cascade_rcnn.evaluation import kfp_metrics
    from cascade_rcnn.logs import setup_logging
    from cascade_rcnn.retrain import decide_promotion
    from cascade_rcnn.step_options import StepOptions

    setup_logging()
    options = StepOptions(config, config_opts, static_canvas, device, amp, root, run_id, job_id)
    decision = decide_promotion(
        options,
        model_name=model_name,
        manifest_uri=dataset.metadata["manifest_uri"],
        train_split=train_split,
        eval_split=eval_split,
        eval_max_images=eval_max_images if eval_max_images > 0 else None,
        checkpoint_uri=challenger,
        challenger_eval=challenger_eval.metadata["output_uri"],
        metric=metric,
        min_improvement=min_improvement,
        report_md_to=comparison.path,
        report_html_to=report.path,
    )
    for name, value in kfp_metrics(decision.challenger.metrics).items():
        challenger_metrics.log_metric(name, value)
    for name, value in kfp_metrics(decision.champion_metrics or {}).items():
        champion_metrics.log_metric(name, value)
    print(f"{decision.decision}: {decision.reason} (history: {decision.history_uri})")
    return decision.decision


def build(base_image: str) -> PythonComponent:
    return dsl.component(promote, base_image=base_image, install_kfp_package=False)
