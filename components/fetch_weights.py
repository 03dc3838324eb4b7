"""Component `fetch_weights`: pretrained weights, verified and stored as our checkpoint
(cascade_rcnn.weights) under `<root>/weights/`.

The Model artifact records the source, its sha256, its format and the checkpoint's URI; the step
returns that URI too, as train and finetune return theirs, for steps that take a checkpoint.
"""

from kfp import dsl
from kfp.dsl import Model, Output
from kfp.dsl.python_component import PythonComponent


def fetch_weights(source: str, sha256: str, root: str, model: Output[Model]) -> str:
    """Fetch `source` (detectron2://..., torchvision://..., https, s3:// or a file); `sha256` is
    checked when not empty. The checkpoint's name depends on the source only, so a rerun overwrites
    the same object rather than piling up copies."""
    import hashlib
    import json
    import posixpath
    import re

    from cascade_rcnn import storage
    from cascade_rcnn.logs import setup_logging
    from cascade_rcnn.weights import fetch_weights as run_fetch

    setup_logging()
    stem = posixpath.splitext(posixpath.basename(source.rstrip("/")))[0]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem) or "weights"
    key = hashlib.sha256(source.encode()).hexdigest()[:12]
    output = storage.join(root, "weights", f"{stem}-{key}.pth")
    result = run_fetch(source, output, sha256=sha256 or None)
    info = {
        "checkpoint_uri": result.uri,
        "source": result.source,
        "url": result.url,
        "sha256": result.sha256,
        "format": result.format,
        "num_tensors": result.num_tensors,
    }
    model.metadata.update(info)
    with open(model.path, "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps(info, indent=1))
    return result.uri


def build(base_image: str) -> PythonComponent:
    return dsl.component(fetch_weights, base_image=base_image, install_kfp_package=False)
