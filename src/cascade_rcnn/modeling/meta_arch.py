"""Cascade Mask R-CNN: normalize and pad the images, FPN backbone, RPN, cascade ROI heads, postprocess."""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..accel import resolve_device
from ..data.static_batch import StaticShapes, build_static_batch
from ..structures import Detections
from .cascade_heads import CascadeROIHeads
from .fpn import FPN
from .postprocess import detector_postprocess
from .rpn import RPN
from .static_rcnn import (
    compile_inference,
    compile_train_losses,
    inference_padded,
    train_losses,
    unpad_detections,
)

logger = logging.getLogger(__name__)


def pad_and_batch(images: list[Tensor], size_divisibility: int, pad_value: float = 0.0) -> Tensor:
    """(C, H_i, W_i) images -> (N, C, H, W), padded bottom/right to the largest size rounded up."""
    max_h = max(im.shape[-2] for im in images)
    max_w = max(im.shape[-1] for im in images)
    if size_divisibility > 1:
        max_h = (max_h + size_divisibility - 1) // size_divisibility * size_divisibility
        max_w = (max_w + size_divisibility - 1) // size_divisibility * size_divisibility
    if len(images) == 1:
        im = images[0]
        return F.pad(im, [0, max_w - im.shape[-1], 0, max_h - im.shape[-2]], value=pad_value).unsqueeze_(0)
    batch = images[0].new_full((len(images), images[0].shape[0], max_h, max_w), pad_value)
    for im, dst in zip(images, batch):
        dst[:, : im.shape[-2], : im.shape[-1]].copy_(im)
    return batch


class CascadeMaskRCNN(nn.Module):
    """detectron2's GeneralizedRCNN with CascadeROIHeads.

    Input: list of {"image": (C, H, W) uint8/float in cfg.INPUT.FORMAT, resized; "height", "width":
    original size; "targets": Targets (training)}. Train mode returns a dict of losses; eval mode
    returns list[Detections] at the original resolution.
    """

    def __init__(
        self,
        backbone: FPN,
        proposal_generator: RPN,
        roi_heads: CascadeROIHeads,
        pixel_mean: tuple[float, ...],
        pixel_std: tuple[float, ...],
        input_format: str = "BGR",
        static: Optional[StaticShapes] = None,
        static_compile: str = "",
    ):
        super().__init__()
        self.backbone = backbone
        self.proposal_generator = proposal_generator
        self.roi_heads = roi_heads
        if len(pixel_mean) != len(pixel_std):
            raise ValueError(
                f"MODEL.PIXEL_MEAN {pixel_mean} and MODEL.PIXEL_STD {pixel_std} differ in length"
            )
        self.register_buffer(
            "pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False
        )
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False)
        self.input_format = input_format
        self.static = static  # MODEL.STATIC: fixed canvases and padded rows (static_rcnn.py)
        self.static_compile = static_compile  # MODEL.STATIC.COMPILE: a torch.compile backend or ""
        self._compiled: dict[str, Any] = {}

    @classmethod
    def from_config(cls, cfg) -> CascadeMaskRCNN:
        from ..config import check_supported

        check_supported(cfg)  # load_config checks too; this covers configs built in code
        if cfg.MODEL.META_ARCHITECTURE != "GeneralizedRCNN":
            raise ValueError(
                f"MODEL.META_ARCHITECTURE {cfg.MODEL.META_ARCHITECTURE!r} is not supported; only 'GeneralizedRCNN' is"
            )
        if cfg.MODEL.KEYPOINT_ON:
            raise ValueError("MODEL.KEYPOINT_ON is not supported")
        if cfg.MODEL.LOAD_PROPOSALS:
            raise ValueError("MODEL.LOAD_PROPOSALS is not supported")
        backbone = FPN.from_config(cfg)
        strides = {f: backbone.output_stride(f) for f in backbone.out_features}
        return cls(
            backbone=backbone,
            proposal_generator=RPN.from_config(cfg, strides, backbone.out_channels),
            roi_heads=CascadeROIHeads.from_config(cfg, strides, backbone.out_channels),
            pixel_mean=tuple(cfg.MODEL.PIXEL_MEAN),
            pixel_std=tuple(cfg.MODEL.PIXEL_STD),
            input_format=cfg.INPUT.FORMAT,
            static=StaticShapes.from_config(cfg, backbone.size_divisibility)
            if cfg.MODEL.STATIC.ENABLED
            else None,
            static_compile=_static_compile_backend(cfg),
        )

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess(self, batched_inputs: list[dict[str, Any]]) -> tuple[Tensor, list[tuple[int, int]]]:
        """Normalize each image, then pad into one batch; returns it and the unpadded (h, w) sizes."""
        images = []
        for i, x in enumerate(batched_inputs):
            im = x["image"]
            if not isinstance(im, Tensor) or im.dim() != 3 or im.shape[0] != self.pixel_mean.shape[0]:
                raise ValueError(
                    f"input {i} ({x.get('file_name', 'no file_name')}): 'image' must be a "
                    f"({self.pixel_mean.shape[0]}, H, W) tensor, got "
                    f"{tuple(im.shape) if isinstance(im, Tensor) else type(im).__name__}"
                )
            images.append((im.to(self.device, non_blocking=True) - self.pixel_mean) / self.pixel_std)
        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        batch = pad_and_batch(images, self.backbone.size_divisibility)
        if batch.device.type == "cpu":
            # oneDNN's CPU convolutions are faster on NHWC activations (BENCHMARKS.md); every layer
            # after the first follows its input's format.
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch, sizes

    def forward(self, batched_inputs: list[dict[str, Any]]) -> dict[str, Tensor] | list[Detections]:
        if not self.training:
            return self.inference(batched_inputs)
        if self.static is not None:
            batch = self.static_batch(batched_inputs)
            if self.static_compile:
                return self._compiled_fn("train")(batch)
            return train_losses(self, batch)
        targets = []
        for i, x in enumerate(batched_inputs):
            if "targets" not in x:
                raise ValueError(
                    f"training input {i} ({x.get('file_name', 'no file_name')}) has no 'targets'"
                )
            targets.append(x["targets"].to(self.device))
        images, sizes = self.preprocess(batched_inputs)
        features = self.backbone(images)
        proposals, losses = self.proposal_generator(features, sizes, targets)
        detector_losses = self.roi_heads.losses(features, proposals, sizes, targets)
        return {**detector_losses, **losses}

    def _compiled_fn(self, kind: str):
        """The compiled static step ("train") or inference, built once; each (canvas, gt bucket)
        compiles on first use and is reused after."""
        if kind not in self._compiled:
            logger.info(
                "MODEL.STATIC.COMPILE %r: the static %s runs as a compiled graph; each canvas and gt bucket "
                "compiles on its first batch (minutes on CPU)",
                self.static_compile,
                "train step" if kind == "train" else "inference",
            )
            make = compile_train_losses if kind == "train" else compile_inference
            self._compiled[kind] = make(self, backend=self.static_compile)
        return self._compiled[kind]

    def static_batch(self, batched_inputs: list[dict[str, Any]]):
        """The batch on its MODEL.STATIC canvas, ground truth padded (training mode)."""
        return build_static_batch(batched_inputs, self.static, self.pixel_mean, self.pixel_std, self.training)

    @torch.no_grad()
    def inference(self, batched_inputs: list[dict[str, Any]]) -> list[Detections]:
        """Detections per image at its original ("height", "width") size (default: the input size)."""
        if self.static is not None:
            return self._static_inference(batched_inputs)
        images, sizes = self.preprocess(batched_inputs)
        return self.detect(images, sizes, batched_inputs)

    @torch.no_grad()
    def detect(
        self, images: Tensor, sizes: list[tuple[int, int]], batched_inputs: list[dict[str, Any]]
    ) -> list[Detections]:
        """Dynamic-mode inference on an already padded batch (static mode's tests feed its canvas)."""
        features = self.backbone(images)
        proposals, _ = self.proposal_generator(features, sizes, None)
        results = self.roi_heads.inference(features, proposals, sizes)
        out = []
        for r, x, size in zip(results, batched_inputs, sizes):
            out_size = (int(x.get("height", size[0])), int(x.get("width", size[1])))
            out.append(detector_postprocess(r.boxes, r.scores, r.classes, r.mask_probs, size, out_size))
        return out

    def _static_inference(self, batched_inputs: list[dict[str, Any]]) -> list[Detections]:
        batch = self.static_batch(batched_inputs)
        if self.static_compile:
            padded = self._compiled_fn("inference")(batch.images, batch.image_sizes)
        else:
            padded = inference_padded(self, batch.images, batch.image_sizes)
        out = []
        for i, x in enumerate(batched_inputs):
            size = tuple(int(v) for v in x["image"].shape[-2:])
            out_size = (int(x.get("height", size[0])), int(x.get("width", size[1])))
            boxes, scores, classes, masks = unpad_detections(padded, i)
            out.append(detector_postprocess(boxes, scores, classes, masks, size, out_size))
        return out


def build_model(cfg, device: Optional[str | torch.device] = None) -> CascadeMaskRCNN:
    """The model for `cfg`, randomly initialized, on `device`.

    device: a torch.device is used as is; a string, or None for cfg.MODEL.DEVICE, goes through
    cascade_rcnn.accel.resolve_device (auto, cpu, cuda[:N], npu[:N]) as local rank 0. A process of a
    multi-process run passes its own device (Accelerator.device) instead.
    """
    if not isinstance(device, torch.device):
        device = resolve_device(str(cfg.MODEL.DEVICE if device is None else device))
    return CascadeMaskRCNN.from_config(cfg).to(device)


def _static_compile_backend(cfg) -> str:
    """MODEL.STATIC.COMPILE, checked: a registered torch.compile backend, with static mode on and,
    with masks, loader-rasterized bitmask targets (polygons are rasterized on the host)."""
    backend = str(cfg.MODEL.STATIC.COMPILE or "")
    if not backend:
        return ""
    if not cfg.MODEL.STATIC.ENABLED:
        raise ValueError(f"MODEL.STATIC.COMPILE {backend!r} needs MODEL.STATIC.ENABLED True")
    if cfg.MODEL.MASK_ON and cfg.INPUT.MASK_FORMAT != "bitmask":
        raise ValueError(
            f"MODEL.STATIC.COMPILE {backend!r} needs INPUT.MASK_FORMAT bitmask (got "
            f"{cfg.INPUT.MASK_FORMAT!r}): polygon mask targets are rasterized on the host, outside a graph"
        )
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise ValueError(f"MODEL.STATIC.COMPILE {backend!r} is not a torch.compile backend; known: {known}")
    return backend
