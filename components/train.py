"""Component `train`: Cascade Mask R-CNN training, one process per accelerator
(cascade_rcnn.engine.launch.run_training, as `cascade-rcnn train --nproc-per-node N`). With
nodes > 1 the step is a launcher instead: it runs the same training as a Kubeflow Trainer TrainJob of
`nodes` nodes (cascade_rcnn.engine.trainjob.run_trainjob) and waits for it.

Checkpoints go to `<root>/runs/<run id>/train/`, the same prefix on every retry of the step, so a
retried pod resumes from the prefix's `last_checkpoint` instead of starting over. Returns the final
checkpoint's URI, which evaluate and finetune take (a string, so that the in-pod and TrainJob
branches merge as a dsl.OneOf of parameters; see pipelines/tasks.py).
`curves` shows the run's training curves in the KFP UI (losses, learning rate, img/s, AP at each
evaluation).
"""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Model, Output
from kfp.dsl.python_component import PythonComponent


def train(
    dataset: Input[Dataset],
    weights: Input[Model],
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
    model: Output[Model],
    curves: Output[HTML],
    nodes: int = 1,
    trainjob: str = "",
    s3_secret: str = "",
) -> str:
    """Train `config` on the dataset's manifest from `weights`' checkpoint.

    config, config_opts, static_canvas, device, amp, root, run_id, job_id: what every model step
    shares (cascade_rcnn.step_options.StepOptions); the output prefix is `<root>/runs/<run_id or
    job_id>/train/`. The LR steps sit at 2/3 and 8/9 of `iterations`, where detectron2's 1x and the
    8-NPU reference recipe put them; `config_opts` ("KEY", "VALUE", ... pairs) override anything.
    nproc_per_node: worker processes, one per accelerator (digits, as the accelerator count).
    accelerator: the resource the pod requested nproc_per_node of; the step fails at once when it
    finds fewer devices. "": nothing requested (CPU).
    nodes: 1 trains in this pod; more creates a TrainJob of that many nodes with nproc_per_node
    workers and `accelerator` devices each, from `trainjob` (the compiled Cluster settings: image,
    runtime, resources, placement) and the Secret `s3_secret`; a retry deletes a TrainJob left over
    by the previous attempt and resumes from the output's last checkpoint.
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
        data=dataset.metadata["manifest_uri"],
        output=options.output("train"),
        init_weights=weights.metadata["checkpoint_uri"],
        iterations=iterations,
        learning_rate=learning_rate,
        batch_per_device=batch_per_device,
        nproc_per_node=parse_count("nproc_per_node", nproc_per_node),
        accelerator=accelerator,
        device=device,
        amp=amp,
        opts=options.model_opts(),
    )
    info = run_step(job, step="train", nodes=nodes, trainjob=trainjob, s3_secret=s3_secret)
    model.metadata.update(info)
    save_curves_page(info, curves.path)
    with open(model.path, "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps(info, indent=1))
    return info["checkpoint_uri"]


def build(base_image: str) -> PythonComponent:
    return dsl.component(train, base_image=base_image, install_kfp_package=False)
