"""Component `finetune`: fine-tune a trained model on new data with a fresh schedule
(cascade_rcnn.engine.launch.run_training, as `cascade-rcnn finetune --weights ...`).

Checkpoints go to `<root>/runs/<run id>/finetune/`; like train, a retry resumes from there, with
nodes > 1 the step is a launcher of a TrainJob (see components/train.py), and it returns the final
checkpoint's URI.
`curves` shows the run's training curves in the KFP UI (losses, learning rate, img/s, AP at each
evaluation).
"""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Model, Output
from kfp.dsl.python_component import PythonComponent


def finetune(
    dataset: Input[Dataset],
    base_model: str,
    data: str,
    config: str,
    config_opts: list,
    static_canvas: list,
    device: str,
    amp: bool,
    root: str,
    run_id: str,
    job_id: str,
    iterations: int,
    learning_rate: float,
    batch_per_device: int,
    nproc_per_node: str,
    accelerator: str,
    finetune_opts: list,
    model: Output[Model],
    curves: Output[HTML],
    nodes: int = 1,
    trainjob: str = "",
    s3_secret: str = "",
) -> str:
    """Fine-tune the checkpoint `base_model` (a URI) on `data` (a COCO-layout root or a manifest URI;
    empty: the ingested dataset). When the new data has another number of classes, set
    MODEL.ROI_HEADS.NUM_CLASSES in `finetune_opts`: the class-specific layers are then re-initialised.
    The other parameters are train's.
    """
    import json

    from cascade_rcnn.accel import parse_count
    from cascade_rcnn.engine.curves import save_curves_page
    from cascade_rcnn.engine.launch import TrainJob
    from cascade_rcnn.engine.trainjob import run_step
    from cascade_rcnn.step_options import StepOptions

    options = StepOptions(config, config_opts, static_canvas, device, amp, root, run_id, job_id)
    job = TrainJob(
        config=config,
        data=data or dataset.metadata["manifest_uri"],
        output=options.output("finetune"),
        init_weights=base_model,
        finetune=True,
        iterations=iterations,
        learning_rate=learning_rate,
        batch_per_device=batch_per_device,
        nproc_per_node=parse_count("nproc_per_node", nproc_per_node),
        accelerator=accelerator,
        device=device,
        amp=amp,
        opts=[*options.model_opts(), *[str(x) for x in finetune_opts]],
    )
    info = run_step(job, step="finetune", nodes=nodes, trainjob=trainjob, s3_secret=s3_secret)
    model.metadata.update(info)
    save_curves_page(info, curves.path)
    with open(model.path, "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps(info, indent=1))
    return info["checkpoint_uri"]


def build(base_image: str) -> PythonComponent:
    return dsl.component(finetune, base_image=base_image, install_kfp_package=False)
