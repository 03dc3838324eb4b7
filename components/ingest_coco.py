"""Component `ingest_coco`: COCO from a source into `<root>/datasets/<name>/` (cascade_rcnn.ingest).

The Dataset artifact is a small JSON pointer to the ingest manifest; the images never pass through
KFP's artifact store (the launcher would copy every input artifact into each consumer's pod).
"""

from kfp import dsl
from kfp.dsl import Dataset, Output
from kfp.dsl.python_component import PythonComponent


def ingest_coco(
    source: str,
    root: str,
    name: str,
    splits: list,
    max_images: int,
    dataset: Output[Dataset],
    strict: bool = False,
):
    """Ingest `source` (coco-official, an http(s) base URL, an s3:// prefix or a directory).

    max_images: keep the first N images of each split (0: all). A second run with the same source
    finds the manifest and transfers nothing. Annotations that cannot be trained on are repaired
    (boxes clipped, unusable polygons dropped), each change listed in the report next to the manifest;
    strict: fail on them instead (a box overhanging by at most 1 px is still clipped).
    """
    import json

    from cascade_rcnn.ingest import ingest_coco as run_ingest
    from cascade_rcnn.logs import setup_logging

    setup_logging()
    result = run_ingest(
        source,
        root,
        name=name,
        splits=tuple(splits),
        max_images=max_images if max_images > 0 else None,
        strict=strict,
    )
    info = {
        "manifest_uri": result.manifest_uri,
        "reused": result.reused,
        "transferred_files": result.transferred_files,
        "counts": result.counts,
        "repairs": result.repairs,  # split -> {clip_bbox, drop_polygon, drop_annotation, strict_errors}
        "report_uri": result.report_uri,
        # split -> content id (sha256 over its annotation and image digests): what retraining compares.
        "data_versions": result.data_versions,
    }
    for split, counts in result.repairs.items():
        done = ", ".join(f"{n} {action}" for action, n in counts.items() if action != "strict_errors")
        print(f"{split}: repairs: {done or 'none recorded'} (report: {result.report_uri})")
    dataset.metadata.update(info)
    with open(dataset.path, "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps(info, indent=1))


def build(base_image: str) -> PythonComponent:
    return dsl.component(ingest_coco, base_image=base_image, install_kfp_package=False)
