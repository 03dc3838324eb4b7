"""KFP lightweight components of the training and retraining pipelines, one per file.

Each file holds the step's function (typed KFP inputs and outputs, imports inside, a thin call into
`cascade_rcnn`) and `build(base_image)`, which makes the component for an image. The function's
source is embedded in the compiled pipeline and runs in that image, which carries kfp and the
package: nothing is pip-installed at run time (air-gapped clusters).

Artifacts stay small: a Dataset holds the ingest manifest URI and a Model the checkpoint URI; the
data and checkpoints themselves live under the object-store root.
"""

from components import check_new_data, evaluate, fetch_weights, finetune, ingest_coco, promote, train

__all__ = ["check_new_data", "evaluate", "fetch_weights", "finetune", "ingest_coco", "promote", "train"]
