"""Every torchvision model, not only the classifiers: build one by name with random weights, know
the input it is made for, and drive the ones whose forward is not ``model(batch) -> outputs``.

torchvision groups its models by task, one submodule each (``torchvision.models.list_models``
lists them per module). The check feeds every model one tensor batch and takes a loss from its
output, so two tasks get a thin adapter module:

* detection models take a list of images, and in train mode a list of targets, and return their
  own losses: :class:`DetectionTraining` splits the batch into images, supplies fixed synthetic
  targets (one box per image, with masks or keypoints when the model predicts them) and returns
  the loss dict;
* optical-flow models (RAFT) take two frames: :class:`FramePair` takes them stacked on the
  channel axis, a (B, 6, H, W) batch.

The adapters own the wrapped model as a submodule, so its weights keep their names under the
adapter's attribute (``detector.backbone...``, ``flow.feature_encoder...``).
"""
from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["TASK_MODULES", "CLASSIFICATION_SIZE", "CLASSIFICATION_SIZES", "VIDEO_FRAMES",
           "torchvision_tasks", "torchvision_task", "build_torchvision_model",
           "keep_every_detection", "torchvision_input_size", "DetectionTraining", "FramePair"]

#: torchvision's model submodules, by the task name msq_fx reports. "quantizable" holds the float
#: classifiers torchvision prepared for its own eager-mode quantization (QuantStub / DeQuantStub).
TASK_MODULES = {
    "classification": "torchvision.models",
    "quantizable": "torchvision.models.quantization",
    "segmentation": "torchvision.models.segmentation",
    "detection": "torchvision.models.detection",
    "video": "torchvision.models.video",
    "optical_flow": "torchvision.models.optical_flow",
}

#: ImageNet training resolution of the classifiers: 224 for all but Inception v3. Models that pin
#: their resolution (VisionTransformer's ``image_size``) report it themselves.
CLASSIFICATION_SIZE = 224
CLASSIFICATION_SIZES = {"inception_v3": 299, "quantized_inception_v3": 299}

#: Frames per clip of the video models: torchvision's Kinetics-400 recipe trains on 16-frame
#: clips; a model whose weights ask for more (``min_temporal_size``) gets that.
VIDEO_FRAMES = 16


@functools.cache
def torchvision_tasks() -> dict[str, str]:
    """Every torchvision model name -> its task (a key of TASK_MODULES)."""
    import importlib

    import torchvision  # noqa: F401  (registers every submodule's builders)

    tasks: dict[str, str] = {}
    for task, module_name in TASK_MODULES.items():
        module = importlib.import_module(module_name)
        for name in torchvision.models.list_models(module=module):
            tasks.setdefault(name, task)
    return tasks


def torchvision_task(name: str) -> str:
    """The task of torchvision model ``name``; KeyError if torchvision has no such model."""
    return torchvision_tasks()[name]


def build_torchvision_model(name: str, **kwargs: Any) -> nn.Module:
    """torchvision model ``name`` with random weights, never downloading: ``weights=None``, and
    ``weights_backbone=None`` for the builders that would otherwise fetch an ImageNet backbone.
    Detection and optical-flow models come wrapped in their adapter. ``kwargs`` go to the
    builder (TypeError when it does not take one)."""
    import torchvision

    builder = torchvision.models.get_model_builder(name)
    if "weights_backbone" in inspect.signature(builder).parameters:
        kwargs.setdefault("weights_backbone", None)
    model = builder(weights=None, **kwargs)
    task = torchvision_task(name)
    if task == "detection":
        keep_every_detection(model)
        return DetectionTraining(model)
    if task == "optical_flow":
        return FramePair(model)
    return model


def keep_every_detection(detector: nn.Module) -> None:
    """Set the detector's score threshold to 0. Random weights score below the usual 0.05
    (RetinaNet starts near its 0.01 prior), and a detector that returns no box would leave the
    check's loss and comparison nothing to look at; NMS and the per-image cap still apply."""
    heads = getattr(detector, "roi_heads", None)
    for owner in (heads, detector):  # R-CNNs keep it on roi_heads; RetinaNet, FCOS, SSD on self
        if owner is not None and hasattr(owner, "score_thresh"):
            owner.score_thresh = 0.0
            return
    raise ValueError(f"{type(detector).__name__} has no score_thresh on itself or its roi_heads; "
                     f"torchvision's detection API changed")


def torchvision_input_size(name: str, model: nn.Module) -> tuple[int, ...]:
    """The per-sample input shape ``model`` (built by :func:`build_torchvision_model`) is made for.

    classification: (3, S, S) with S its ImageNet resolution; segmentation: (3, 520, 520), the
    resize of torchvision's segmentation recipe; video: (3, T, H, W) with the crop of the
    weights' transforms and T from VIDEO_FRAMES; detection: (3, S, S) with S the shorter side
    the model's own transform resizes to; optical flow: (6, H, W), two frames at the weights'
    minimum size.
    """
    task = torchvision_task(name)
    if task in ("classification", "quantizable"):
        side = getattr(model, "image_size", None) or CLASSIFICATION_SIZES.get(
            name, CLASSIFICATION_SIZE)
        return (3, side, side)
    if task == "detection":
        side = int(model.detector.transform.min_size[0])
        return (3, side, side)
    weights = _default_weights(name)
    if task == "segmentation":
        side = int(weights.transforms().resize_size[0])
        return (3, side, side)
    if task == "video":
        height, width = weights.transforms().crop_size
        frames = max(VIDEO_FRAMES, int(weights.meta.get("min_temporal_size", 0)))
        return (3, frames, height, width)
    height, width = weights.meta["min_size"]
    return (6, height, width)


def _default_weights(name: str) -> Any:
    """The first weights enum entry of ``name``: read for its metadata only, never loaded."""
    import torchvision

    return next(iter(torchvision.models.get_model_weights(name)))


class DetectionTraining(nn.Module):
    """A torchvision detection model driven with one (B, 3, H, W) batch.

    Eval mode returns the detector's detections (a list of dicts per image). Train mode passes
    synthetic targets and returns the detector's loss dict: per image one box over the middle
    half of the image, of class 1, with a mask filling the box for Mask R-CNN and keypoints
    inside it for Keypoint R-CNN. The proposal samplers draw from a fixed seed on every call, so
    the training loss is a function of the weights alone, as a finite-difference Hessian needs.
    """

    #: The seed the detector's samplers draw from in train mode.
    SAMPLER_SEED = 0

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: Tensor) -> Any:
        batch = list(images.unbind(0))
        if not self.training:
            return self.detector(batch)
        targets = [self.synthetic_target(image) for image in batch]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.SAMPLER_SEED)
            return self.detector(batch, targets)

    def synthetic_target(self, image: Tensor) -> dict[str, Tensor]:
        """One box over the middle half of ``image``, plus the mask / keypoints the detector
        predicts."""
        height, width = image.shape[-2:]
        box = torch.tensor([[width / 4, height / 4, 3 * width / 4, 3 * height / 4]],
                           device=image.device)
        target = {"boxes": box, "labels": torch.ones(1, dtype=torch.int64, device=image.device)}
        roi_heads = getattr(self.detector, "roi_heads", None)
        if getattr(roi_heads, "mask_predictor", None) is not None:
            mask = torch.zeros(1, height, width, dtype=torch.uint8, device=image.device)
            mask[:, height // 4: 3 * height // 4, width // 4: 3 * width // 4] = 1
            target["masks"] = mask
        keypoint_predictor = getattr(roi_heads, "keypoint_predictor", None)
        if keypoint_predictor is not None:
            count = keypoint_predictor.kps_score_lowres.out_channels
            along = torch.linspace(0.3, 0.7, count, device=image.device)
            target["keypoints"] = torch.stack(
                [along * width, along * height, torch.ones_like(along)], dim=-1)[None]
        return target


class FramePair(nn.Module):
    """A torchvision optical-flow model (RAFT) driven with one (B, 6, H, W) batch: the two frames
    stacked on the channel axis. Returns the model's flow predictions, coarse to refined."""

    def __init__(self, flow: nn.Module) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, frames: Tensor) -> Any:
        if frames.dim() != 4 or frames.shape[1] != 6:
            raise ValueError(f"FramePair({type(self.flow).__name__}) takes two RGB frames stacked "
                             f"on the channel axis, (B, 6, H, W); got {tuple(frames.shape)}")
        first, second = frames.split(3, dim=1)
        return self.flow(first, second)
