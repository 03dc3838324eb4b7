"""Scheduled retraining: train only when the data changed, promote only a better model.

Two pipeline steps call into this module, both on the CPU image:
- `check_for_new_data`, right after ingest and before any accelerator is requested: compares the
  training split's data version with the champion's and records "skipped: data unchanged" when
  nothing changed (unless forced);
- `decide_promotion`, after the challenger's evaluation: re-evaluates the champion when the
  evaluation data changed since its record, promotes or rejects through the registry, and writes the
  Markdown / HTML comparison.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cascade_rcnn import registry, storage
from cascade_rcnn.ingest.manifest import data_version, read_manifest
from cascade_rcnn.registry import ChampionRecord, Decision
from cascade_rcnn.step_options import StepOptions

logger = logging.getLogger(__name__)

COMPARISON_MD = "comparison.md"
COMPARISON_HTML = "comparison.html"
SKIPPED_UNCHANGED = "skipped: data unchanged"


def _manifest(uri: str) -> dict:
    manifest = read_manifest(uri)
    if manifest is None:
        raise FileNotFoundError(f"{uri}: no ingest manifest there (run the ingest step first)")
    return manifest


def eval_data_version(
    manifest: Mapping, split: str, max_images: int | None, static_canvas: Sequence = ()
) -> str:
    """What an evaluation's AP was measured on: the split's version, narrowed to its first
    `max_images` images when set, and the static-shape canvases when the models ran in that mode
    (its padding differs from dynamic mode's, so AP from the two is not compared as one)."""
    version = data_version(manifest, split)
    if max_images:
        version += "-first" + hashlib.sha256(f"{version}:{max_images}".encode()).hexdigest()[:8]
    if static_canvas:
        version += "-static-" + "-".join(f"{int(h)}x{int(w)}" for h, w in static_canvas)
    return version


@dataclass(frozen=True)
class NewDataCheck:
    train: bool
    warm_start: bool  # train from the champion's checkpoint
    reason: str
    data_version: str
    champion: ChampionRecord | None
    history_uri: str = ""  # the skip record, when skipped


def check_for_new_data(
    manifest_uri: str,
    root: str,
    model_name: str,
    *,
    train_split: str,
    run_id: str,
    force: bool = False,
    warm_start: bool = True,
) -> NewDataCheck:
    """Whether to train: yes when there is no champion, when the training split's data version differs
    from the champion's, or when forced; otherwise a 'skipped' record goes to the history."""
    version = data_version(_manifest(manifest_uri), train_split)
    champion, _ = registry.read_champion(root, model_name)
    warm = warm_start and champion is not None
    if champion is None:
        reason = f"no champion of {model_name!r} yet"
    elif champion.data_version != version:
        reason = f"{train_split} changed: {champion.data_version} -> {version}"
    elif force:
        reason = f"{train_split} unchanged ({version}), but force=true"
    else:
        uri = registry.record_skip(
            root,
            model_name,
            run_id,
            SKIPPED_UNCHANGED,
            data_version=version,
            dataset=manifest_uri,
            champion=champion.to_json(),
        )
        logger.info("%s (%s is still %s); recorded in %s", SKIPPED_UNCHANGED, train_split, version, uri)
        return NewDataCheck(
            False, False, f"{SKIPPED_UNCHANGED} ({train_split} {version})", version, champion, uri
        )
    logger.info("training a challenger: %s%s", reason, " (warm start from the champion)" if warm else "")
    return NewDataCheck(True, warm, reason, version, champion)


def _jsonable(metrics: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float | None]]:
    return {
        task: {k: None if v is None or math.isnan(v) else float(v) for k, v in values.items()}
        for task, values in metrics.items()
    }


def _examples(cfg_path: str, opts: Sequence[str], weights: str, split: Any) -> dict[Any, tuple]:
    """{image_id: (RGB image, Detections)} of `weights` on the records of `split`."""
    from cascade_rcnn.accel import accelerator_from_cfg
    from cascade_rcnn.config import load_config
    from cascade_rcnn.evaluation.evaluate import (
        _read_image_rgb,
        evaluate_model,
        load_model,
        results_to_detections,
    )

    cfg = load_config(cfg_path, list(opts))
    dev = accelerator_from_cfg(cfg, 0).device
    model = load_model(cfg, weights, dev, thing_classes=split.meta.thing_classes)
    found = evaluate_model(model, cfg, split, device=dev, progress=False, keep_images=len(split.records))
    out = {}
    for pred in found.predictions:
        image = pred.get("image")
        image = _read_image_rgb(pred["file_name"]) if image is None else image
        det = results_to_detections(
            pred["instances"], split.meta.thing_dataset_id_to_contiguous_id, (pred["height"], pred["width"])
        )
        out[pred["image_id"]] = (image, det)
    return out


def _ap_history(checkpoint_uri: str):
    """The AP during the training run that left `checkpoint_uri` (its folder's metrics.jsonl), or
    None when that is gone."""
    from cascade_rcnn.engine.curves import eval_series
    from cascade_rcnn.engine.metrics import read_rows
    from cascade_rcnn.evaluation.compare import APHistory

    try:
        rows = read_rows(checkpoint_uri.rsplit("/", 1)[0])
    except storage.StorageError as e:
        logger.warning("no AP history for %s: %s", checkpoint_uri, e)
        return None
    if not rows:
        return None
    return APHistory(eval_series(rows), max(int(r["iteration"]) for r in rows))


def decide_promotion(
    options: StepOptions,
    *,
    model_name: str,
    manifest_uri: str,
    train_split: str,
    eval_split: str,
    eval_max_images: int | None,
    checkpoint_uri: str,
    challenger_eval: str,
    metric: str = registry.DEFAULT_METRIC,
    min_improvement: float = 0.0,
    num_examples: int = 3,
    report_md_to: str | None = None,
    report_html_to: str | None = None,
) -> Decision:
    """Promote the challenger (its checkpoint, evaluated into `challenger_eval`/metrics.json) or keep
    the champion, record the decision, and write comparison.md / comparison.html under the run's
    `promote` prefix (and to the local files report_md_to / report_html_to when given).

    options: the run's model options (the challenger's config and overrides, device, AMP, static
    canvases, root and run). The champion, when it must be evaluated again, runs with its own config
    and overrides in the same mode (device, AMP, static canvases) as the challenger was.
    """
    from cascade_rcnn.evaluation.coco_eval import load_metrics_json
    from cascade_rcnn.evaluation.compare import ComparisonExample, comparison_html, comparison_markdown
    from cascade_rcnn.evaluation.evaluate import evaluate_checkpoint, prepare_split

    root, run_id, output = options.root, options.run, options.output("promote")
    config, config_opts = options.config, [str(x) for x in options.config_opts]
    manifest = _manifest(manifest_uri)
    eval_version = eval_data_version(manifest, eval_split, eval_max_images, options.static_canvas)
    metrics = load_metrics_json(storage.get_bytes(storage.join(challenger_eval, "metrics.json")))
    challenger = ChampionRecord(
        model_name=model_name,
        checkpoint_uri=checkpoint_uri,
        config=config,
        config_opts=[str(x) for x in config_opts],
        dataset=manifest_uri,
        train_split=train_split,
        data_version=data_version(manifest, train_split),
        eval_split=eval_split,
        eval_data_version=eval_version,
        metrics=_jsonable(metrics),
        run_id=run_id,
    )

    def champion_on_our_data(champion: ChampionRecord) -> dict:
        logger.info(
            "champion %s was evaluated on %s, not %s: evaluating it again",
            champion.checkpoint_uri,
            champion.eval_data_version,
            eval_version,
        )
        again = evaluate_checkpoint(
            champion.config,
            champion.checkpoint_uri,
            manifest_uri,
            eval_split,
            storage.join(output, "champion_eval"),
            max_images=eval_max_images,
            opts=options.overrides(champion.config_opts),
        )
        return _jsonable(again)

    decision = registry.promote_if_better(
        root,
        challenger,
        metric=metric,
        min_improvement=min_improvement,
        champion_metrics=champion_on_our_data,
    )

    examples: list[ComparisonExample] = []
    if num_examples > 0:
        split = prepare_split(manifest_uri, eval_split, eval_max_images)
        split = dataclasses.replace(split, records=split.records[:num_examples])
        ours = _examples(config, options.overrides(), checkpoint_uri, split)
        before = decision.champion_before
        theirs = (
            _examples(before.config, options.overrides(before.config_opts), before.checkpoint_uri, split)
            if before
            else {}
        )
        for record in split.records:
            image, det = ours[record["image_id"]]
            caption = os.path.basename(record["file_name"])
            champion_det = theirs[record["image_id"]][1] if before else None
            examples.append(
                ComparisonExample(image, det, champion_det, list(split.meta.thing_classes), caption)
            )

    details = {
        "model": model_name,
        "metric": f"{metric} (min improvement {min_improvement:g})",
        "challenger": f"{checkpoint_uri} (run {run_id}, data {challenger.data_version})",
        "champion before": (
            f"{decision.champion_before.checkpoint_uri} (run {decision.champion_before.run_id}, "
            f"data {decision.champion_before.data_version})"
            if decision.champion_before
            else "none"
        ),
        "evaluated on": f"{eval_split} ({eval_version})",
        "history record": decision.history_uri,
    }
    champion_metrics = decision.champion_metrics
    history = {"challenger": _ap_history(checkpoint_uri)}
    if decision.champion_before:
        history["champion"] = _ap_history(decision.champion_before.checkpoint_uri)
    history = {who: h for who, h in history.items() if h is not None}
    texts = (
        (
            comparison_markdown(
                challenger.metrics,
                champion_metrics,
                decision=decision.decision,
                reason=decision.reason,
                details=details,
            ),
            COMPARISON_MD,
            report_md_to,
        ),
        (
            comparison_html(
                challenger.metrics,
                champion_metrics,
                examples,
                decision=decision.decision,
                reason=decision.reason,
                details=details,
                history=history,
            ),
            COMPARISON_HTML,
            report_html_to,
        ),
    )
    for text, name, local in texts:
        storage.put_bytes(text.encode(), storage.join(output, name))
        if local:
            with open(local, "w", encoding="utf-8") as f:
                f.write(text)
    return decision
