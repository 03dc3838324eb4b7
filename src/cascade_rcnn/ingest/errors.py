"""The error type every ingest step raises, so callers catch one class."""

from __future__ import annotations

from cascade_rcnn.errors import CascadeRCNNError


class IngestError(CascadeRCNNError, RuntimeError):
    """A data set could not be fetched, unpacked, validated or stored; the message names the file."""
