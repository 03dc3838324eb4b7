"""Component `train`: Cascade Mask R-CNN training, one process per accelerator
(cascade_rcnn.engine.launch.run_training, as `cascade-rcnn train --nproc-per-node N`). With
nodes > 1 the step is a launcher instead: it runs the same training as a Kubeflow Trainer TrainJob of
`nodes` nodes (cascade_rcnn.engine.trainjob.run_trainjob) and waits for it.

Checkpoints go to `<root>/runs/<run id>/train/`, the same prefix on every retry of the step, so a
retried pod resumes from the prefix's `last_checkpoint` instead of starting over. `curves` shows the
run's training curves in the KFP UI (losses, learning rate, img/s, AP at each evaluation).
"""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Model, Output
from kfp.dsl.python_component import PythonComponent


def train(
    dataset: Input[Dataset],
    weights: Input[Model],
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
    model: Output[Model],
    curves: Output[HTML],
    nodes: int = 1,
    trainjob: str = "",
    s3_secret: str = "",
    static_canvas: list = [],  # noqa: B006 (kfp reads the default from here)
):
    """Train `config` on the dataset's manifest from `weights`' checkpoint.

    nproc_per_node: worker processes, one per accelerator; `accelerator` (its resource name) is
    recorded in the Model.
    run_id: names the output prefix; empty uses job_id (the KFP run's id, stable across retries).
    The LR steps sit at 2/3 and 8/9 of `iterations`, where detectron2's 1x and the 8-NPU reference
    recipe put them; `config_opts` ("KEY", "VALUE", ... pairs) come last and override anything.
    nodes: 1 trains in this pod; more creates a TrainJob of that many nodes with nproc_per_node
    workers and `accelerator` devices each, from `trainjob` (the compiled Cluster settings: image,
    runtime, resources, placement) and the Secret `s3_secret`; a retry deletes a TrainJob left over
    by the previous attempt and resumes from the output's last checkpoint.
    static_canvas: [[height, width], ...] trains in static-shape mode (MODEL.STATIC) on those
    canvases; empty: dynamic shapes, detectron2's own padding.
    """
    import json

    from cascade_rcnn import storage
    from cascade_rcnn.config import static_opts
    from cascade_rcnn.engine.curves import save_curves_page
    from cascade_rcnn.engine.launch import TrainJob
    from cascade_rcnn.engine.trainjob import run_step

    job = TrainJob(
        config=config,
        data=dataset.metadata["manifest_uri"],
        output=storage.join(root, "runs", run_id or job_id, "train"),
        init_weights=weights.metadata["checkpoint_uri"],
        iterations=iterations,
        learning_rate=learning_rate,
        batch_per_device=batch_per_device,
        nproc_per_node=nproc_per_node,
        accelerator=accelerator,
        device=device,
        amp=amp,
        opts=[*config_opts, *static_opts(static_canvas)],
    )
    info = run_step(job, step="train", nodes=nodes, trainjob=trainjob, s3_secret=s3_secret)
    model.metadata.update(info)
    save_curves_page(info, curves.path)
    with open(model.path, "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps(info, indent=1))


def build(base_image: str) -> PythonComponent:
    return dsl.component(train, base_image=base_image, install_kfp_package=False)
