"""Which models a zoo sweep checks: every spec of a source, filtered, sampled and sharded, in
name order or cheapest first (parameters x input pixels, with timm's counts cached), and the timm
models large enough to check lean from the start."""
from __future__ import annotations

import importlib.metadata
import json
import random
import re
import sys
from pathlib import Path

from tqdm import tqdm

from .specs import NUM_CLASSES, input_size_of_module, torchvision_classification_models
from .torchvision_tasks import CLASSIFICATION_SIZE, CLASSIFICATION_SIZES, torchvision_tasks

__all__ = ["SOURCES", "zoo_specs", "select", "smallest_first", "lean_specs", "timm_sizes",
           "installed_version"]

SOURCES = ("torchvision", "torchvision-tasks", "timm", "all")


def zoo_specs(source: str) -> list[str]:
    """Every model spec of the source(s), sorted. torchvision: its 80 classifiers;
    torchvision-tasks: its other models (quantizable classifiers, segmentation, detection, video,
    optical flow); all: torchvision and timm."""
    specs = []
    if source in ("torchvision", "all"):
        specs += [f"torchvision:{name}" for name in torchvision_classification_models()]
    if source == "torchvision-tasks":
        specs += [f"torchvision:{name}" for name, task in torchvision_tasks().items()
                  if task != "classification"]
    if source in ("timm", "all"):
        import timm
        specs += [f"timm:{name}" for name in timm.list_models()]
    return sorted(specs)


def smallest_first(specs: list[str], cache: Path) -> list[str]:
    """The specs by estimated cost, cheapest first: parameter count x input pixels, a proxy for
    the FLOPs of the check's forward and backward passes.

    torchvision models' counts come from their weights' metadata (no download) and their input is
    224 x 224 (299 for Inception v3; ViTs theirs). timm models are built on the meta device (no
    memory, no download), which takes minutes for the whole zoo, so their counts and input sizes
    are kept in ``cache`` (JSON, per timm version) and only missing models are built.
    """
    costs = {spec: _torchvision_cost(spec.partition(":")[2])
             for spec in specs if spec.startswith("torchvision:")}
    timm_names = [spec.partition(":")[2] for spec in specs if spec.startswith("timm:")]
    if timm_names:
        sizes = timm_sizes(timm_names, cache)
        costs.update({f"timm:{name}": _timm_cost(params, size)
                      for name, (params, size) in sizes.items()})
    return sorted(costs, key=lambda spec: (costs[spec], spec)) + [s for s in specs
                                                                  if s not in costs]


def _torchvision_cost(name: str) -> float:
    from torchvision.models import get_model_weights

    meta = next(iter(get_model_weights(name))).meta
    side = CLASSIFICATION_SIZES.get(name, CLASSIFICATION_SIZE)  # a proxy for the other tasks
    return meta["num_params"] * side * side


def _timm_cost(params: int, input_size: list[int] | None) -> float:
    """Parameters x input pixels: what --order size sorts by and --lean-cost-above compares."""
    return params * (input_size[-1] * input_size[-2] if input_size else 224 * 224)


def lean_specs(specs: list[str], threshold: float | None, cache: Path,
               cost_threshold: float | None = None) -> dict[str, str]:
    """The timm specs to check lean from the start, each with the option that sends it there:
    ``--lean-above`` for at least ``threshold`` parameters, else ``--lean-cost-above`` for a
    cost (parameters x input pixels) of at least ``cost_threshold``. Empty without thresholds."""
    if threshold is None and cost_threshold is None:
        return {}
    names = [spec.partition(":")[2] for spec in specs if spec.startswith("timm:")]
    lean = {}
    for name, (params, size) in timm_sizes(names, cache).items():
        if threshold is not None and params >= threshold:
            lean[f"timm:{name}"] = "--lean-above"
        elif cost_threshold is not None and _timm_cost(params, size) >= cost_threshold:
            lean[f"timm:{name}"] = "--lean-cost-above"
    return lean


def timm_sizes(names: list[str], cache: Path) -> dict[str, tuple[int, list[int] | None]]:
    """(parameter count, pretrained_cfg input size) of each timm model, built on the meta device
    as the check builds it (small head); read from and added to ``cache``."""
    import timm
    import torch

    version = installed_version("timm")
    stored = json.loads(cache.read_text()) if cache.exists() else {}
    known = stored.get("models", {}) if stored.get("timm") == version else {}
    missing = [name for name in names if name not in known]
    for name in tqdm(missing, desc="model sizes (meta device)", unit="model", file=sys.stderr,
                     disable=not missing):
        try:
            with torch.device("meta"):
                model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES)
        except Exception:  # the check will report it; order it by name among the unknowns
            continue
        size = input_size_of_module(model)
        known[name] = [sum(p.numel() for p in model.parameters()), list(size) if size else None]
    if missing:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"timm": version, "models": known}, indent=0,
                                    sort_keys=True) + "\n")
    return {name: tuple(known[name]) for name in names if name in known}


def select(specs: list[str], pattern: str | None, sample: int | None, seed: int,
           shard: tuple[int, int]) -> list[str]:
    """Filter, then sample (deterministically), then take this shard; order is kept."""
    if pattern:
        regex = re.compile(pattern)
        specs = [s for s in specs if regex.search(s)]
    if sample is not None and sample < len(specs):
        chosen = set(random.Random(seed).sample(specs, sample))
        specs = [s for s in specs if s in chosen]
    index, count = shard
    return specs[index::count]


def installed_version(package: str) -> str:
    """The installed version, read without importing the package (timm takes seconds)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
