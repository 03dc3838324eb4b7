"""Component `check_new_data`: does the ingested data call for a new model? (cascade_rcnn.retrain)

Runs on the CPU image between ingest and training, so an unchanged data set costs no accelerator
pod. The `champion_uri` output is the current champion's checkpoint, for a warm start.
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Output, OutputPath
from kfp.dsl.python_component import PythonComponent


def check_new_data(
    dataset: Input[Dataset],
    root: str,
    model_name: str,
    train_split: str,
    force: bool,
    warm_start: bool,
    run_id: str,
    job_id: str,
    champion_uri: OutputPath(str),
    decision: Output[Markdown],
) -> str:
    """Returns what to do: "warm-start" (train from the champion), "from-pretrained" or "skip".
    Training is due when there is no champion yet, the training split's data version changed, or
    with force; otherwise a "skipped: data unchanged" record goes to
    `<root>/models/<model_name>/history/`. (One string rather than named outputs: kfp.local cannot
    resolve a named output parameter in a condition; champion_uri is only passed on.)"""
    from cascade_rcnn.logs import setup_logging
    from cascade_rcnn.retrain import check_for_new_data

    setup_logging()
    check = check_for_new_data(
        dataset.metadata["manifest_uri"],
        root,
        model_name,
        train_split=train_split,
        run_id=run_id or job_id,
        force=force,
        warm_start=warm_start,
    )
    with open(champion_uri, "w") as f:
        f.write(check.champion.checkpoint_uri if check.champion else "")
    verdict = "train a challenger" if check.train else "skip training"
    lines = [f"# Retraining check: {verdict}", "", f"- **reason**: {check.reason}",
             f"- **{train_split} data version**: {check.data_version}"]  # fmt: skip
    if check.champion is not None:
        lines.append(f"- **champion**: {check.champion.checkpoint_uri} (run {check.champion.run_id})")
    if check.history_uri:
        lines.append(f"- **history record**: {check.history_uri}")
    with open(decision.path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"{verdict}: {check.reason}")
    if not check.train:
        return "skip"
    return "warm-start" if check.warm_start else "from-pretrained"


def build(base_image: str) -> PythonComponent:
    return dsl.component(check_new_data, base_image=base_image, install_kfp_package=False)
