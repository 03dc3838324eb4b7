"""COCO evaluation: distributed inference over a split, box/mask AP (faster-coco-eval or pycocotools),
the COCO results JSON, and the reports (text, Markdown, HTML, KFP metrics).

- inference.py: inference_on_dataset, gather_predictions
- coco_eval.py: detections_to_coco_results, evaluate_coco, coco_evaluation (metrics and PR curves)
- report.py: format_table, markdown_report, html_report (with PR curves), kfp_metrics
- evaluate.py: evaluate_checkpoint (config + weights + data -> metrics and files under an output URI);
  prepare_split + evaluate_model for a model in memory (periodic evaluation during training)
- cli.py: `cascade-rcnn evaluate`
"""

from cascade_rcnn.evaluation.coco_eval import (
    CocoEvaluation,
    coco_evaluation,
    detections_to_coco_json,
    detections_to_coco_results,
    evaluate_coco,
)
from cascade_rcnn.evaluation.evaluate import (
    EvalSplit,
    ModelEvaluation,
    evaluate_checkpoint,
    evaluate_model,
    prepare_split,
)
from cascade_rcnn.evaluation.inference import gather_predictions, inference_on_dataset
from cascade_rcnn.evaluation.report import format_table, html_report, kfp_metrics, markdown_report

__all__ = [
    "CocoEvaluation",
    "EvalSplit",
    "ModelEvaluation",
    "coco_evaluation",
    "detections_to_coco_json",
    "detections_to_coco_results",
    "evaluate_checkpoint",
    "evaluate_coco",
    "evaluate_model",
    "format_table",
    "gather_predictions",
    "html_report",
    "inference_on_dataset",
    "kfp_metrics",
    "markdown_report",
    "prepare_split",
]
