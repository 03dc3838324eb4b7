"""The error every part of the checkpoint package raises for a weights file it cannot use."""

from __future__ import annotations

from cascade_rcnn.errors import CascadeRCNNError


class CheckpointError(CascadeRCNNError):
    """A weights file that cannot be read or used; the message names the file."""
