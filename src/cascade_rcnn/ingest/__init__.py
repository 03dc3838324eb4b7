"""COCO ingest: download (resumable), safe extraction, validation, upload with a manifest.

Entry points: `ingest_coco(source, root, ...) -> IngestResult`, `validate_annotations(json, image_dir)`,
`repair_annotations(data)` and `main(argv)` for `cascade-rcnn ingest`.
"""

from cascade_rcnn.ingest.archive import extract_zip
from cascade_rcnn.ingest.coco import IngestResult, ingest_coco, main, subset_annotations
from cascade_rcnn.ingest.download import DownloadError, DownloadResult, download_file
from cascade_rcnn.ingest.errors import IngestError
from cascade_rcnn.ingest.repair import RepairResult, repair_annotations
from cascade_rcnn.ingest.validate import InvalidAnnotations, ValidationReport, validate_annotations

__all__ = [
    "DownloadError",
    "DownloadResult",
    "IngestError",
    "IngestResult",
    "InvalidAnnotations",
    "RepairResult",
    "ValidationReport",
    "download_file",
    "extract_zip",
    "ingest_coco",
    "main",
    "repair_annotations",
    "subset_annotations",
    "validate_annotations",
]
