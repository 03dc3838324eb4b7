"""Component `finetune`: fine-tune train's Model on new data with a fresh schedule
(cascade_rcnn.engine.launch.run_training, as `cascade-rcnn finetune --weights ...`).

Checkpoints go to `<root>/runs/<run id>/finetune/`; like train, a retry resumes from there, and
with nodes > 1 the step is a launcher of a TrainJob (see components/train.py). `curves` shows the
run's training curves in the KFP UI.
"""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Model, Output
from kfp.dsl.python_component import PythonComponent


def finetune(
    dataset: Input[Dataset],
    base_model: Input[Model],
    data: str,
    config: str,
    root: str,
    run_id: str,
    job_id: str,
    iterations: int,
    learning_rate: float,
    batch_per_device: int,
    nproc_per_node: int,
    accelerator: str,
    device: str,
    amp: bool,
    config_opts: list,
    finetune_opts: list,
    model: Output[Model],
    curves: Output[HTML],
    nodes: int = 1,
    trainjob: str = "",
    s3_secret: str = "",
    static_canvas: list = [],  # noqa: B006 (kfp reads the default from here)
):
    """Fine-tune `base_model`'s checkpoint on `data` (a COCO-layout root or a manifest URI; empty:
    the ingested dataset). When the new data has another number of classes, set
    MODEL.ROI_HEADS.NUM_CLASSES in `finetune_opts`: the class-specific layers are then re-initialised.
    nodes, trainjob, s3_secret: as train's (nodes > 1: a TrainJob of that many nodes).
    """
    import json

    from cascade_rcnn import storage
    from cascade_rcnn.config import static_opts
    from cascade_rcnn.engine.curves import save_curves_page
    from cascade_rcnn.engine.launch import TrainJob
    from cascade_rcnn.engine.trainjob import run_step

    job = TrainJob(
        config=config,
        data=data or dataset.metadata["manifest_uri"],
        output=storage.join(root, "runs", run_id or job_id, "finetune"),
        init_weights=base_model.metadata["checkpoint_uri"],
        finetune=True,
        iterations=iterations,
        learning_rate=learning_rate,
        batch_per_device=batch_per_device,
        nproc_per_node=nproc_per_node,
        accelerator=accelerator,
        device=device,
        amp=amp,
        opts=[*config_opts, *static_opts(static_canvas), *finetune_opts],
    )
    info = run_step(job, step="finetune", nodes=nodes, trainjob=trainjob, s3_secret=s3_secret)
    model.metadata.update(info)
    save_curves_page(info, curves.path)
    with open(model.path, "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps(info, indent=1))


def build(base_image: str) -> PythonComponent:
    return dsl.component(finetune, base_image=base_image, install_kfp_package=False)
