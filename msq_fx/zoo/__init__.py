"""The model zoo: timm, torchvision and factory models named by a spec, built offline with random
weights at the input they are made for, and the conventions for reading their outputs.

* :mod:`.specs`: ``parse_spec`` / ``built_from_spec`` and the name lookups of each source;
* :mod:`.outputs`: the main prediction, every output tensor, the task loss, the class count;
* :mod:`.torchvision_tasks`: every torchvision task, with the adapters of detection and optical
  flow;
* :mod:`.errors`: one-line descriptions of exceptions.

``msq_fx.check`` runs the MSQ pipeline on one such model; the sweep over a whole zoo
(``tools/zoo_sweep``) lives in :mod:`.sweep` with its helpers :mod:`.selection` (which models),
:mod:`.runner` (one check subprocess each) and :mod:`.sweep_report` (the CSV and Markdown);
those are imported on their own, not with this package.
"""
from __future__ import annotations

from .errors import describe_error
from .outputs import output_classes, output_tensors, primary_output, task_loss
from .specs import (NUM_CLASSES, ModelSpec, SpecError, built_from_spec, input_size_of_module,
                    normalize_input_size, parse_spec, torchvision_classification_models)
from .torchvision_tasks import (DetectionTraining, FramePair, build_torchvision_model,
                                torchvision_input_size, torchvision_task, torchvision_tasks)

__all__ = [
    "NUM_CLASSES", "ModelSpec", "SpecError", "parse_spec", "built_from_spec",
    "input_size_of_module", "normalize_input_size", "torchvision_classification_models",
    "primary_output", "output_tensors", "task_loss", "output_classes", "describe_error",
    "build_torchvision_model", "torchvision_input_size", "torchvision_task", "torchvision_tasks",
    "DetectionTraining", "FramePair",
]
