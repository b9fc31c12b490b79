"""Model specs: a model named by a string, resolved, built with random weights, and the input
size it is made for.

    timm:resnet18                   timm.create_model(name, pretrained=False)
    torchvision:vit_b_16            torchvision.models.get_model(name, weights=None); any task:
                                    segmentation, detection, video and optical flow too (see
                                    msq_fx.zoo.torchvision_tasks for the adapters of the last two)
    package.module:factory          importlib.import_module(package.module).factory()

A factory may return ``(model, example_inputs)`` instead of a model, for models whose input is not
one float batch of the declared size: token ids, several inputs (see
``msq_fx.check.inputs.model_and_inputs``).
"""
from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from torch import nn

from .errors import describe_error
from .torchvision_tasks import build_torchvision_model, torchvision_input_size, torchvision_tasks

__all__ = ["NUM_CLASSES", "SpecError", "ModelSpec", "parse_spec", "built_from_spec",
           "input_size_of_module", "normalize_input_size", "torchvision_classification_models"]

#: Classes for the classifier head where the factory lets us choose: small heads save memory and
#: time on 1000-class models, and the check does not depend on the number of classes.
NUM_CLASSES = 10


class SpecError(ValueError):
    """A model spec that names no model; the message says which forms are accepted."""


@dataclass(frozen=True)
class ModelSpec:
    """A resolved spec: where the model comes from and how to build it.

    ``source`` is "timm", "torchvision" or "factory"; ``name`` the model name (or the factory's
    ``module:attribute`` path); ``factory`` the callable for the "factory" source.
    """

    text: str
    source: str
    name: str
    factory: Callable[[], nn.Module] | None = None

    def build(self, size_override: tuple[int, ...] | None = None) -> nn.Module:
        """Build the model with random weights (never downloads).

        With ``size_override``, models that pin their resolution are built for it when their
        factory takes the size (timm ``img_size``, torchvision ViT ``image_size``).
        """
        if self.source == "factory":
            return self.factory()
        attempts = _build_kwargs(self.source, size_override)
        for kwargs in attempts[:-1]:
            try:
                return self._build(**kwargs)
            except TypeError:  # the factory does not take this option; try with fewer
                continue
        return self._build(**attempts[-1])

    def _build(self, **kwargs: Any) -> nn.Module:
        if self.source == "timm":
            import timm
            return timm.create_model(self.name, pretrained=False, **kwargs)
        return build_torchvision_model(self.name, **kwargs)

    def default_input_size(self, model: nn.Module) -> tuple[int, ...] | None:
        """The per-sample input shape the model is made for ((C, H, W), (C, T, H, W) for video), or
        None if unknown."""
        if self.source == "torchvision":
            return torchvision_input_size(self.name, model)
        return input_size_of_module(model)


def _build_kwargs(source: str, size_override: tuple[int, ...] | None) -> list[dict[str, Any]]:
    """Keyword sets to try, richest first: a small head, and the requested resolution."""
    size_key = {"timm": "img_size", "torchvision": "image_size"}[source]
    head = {"num_classes": NUM_CLASSES}
    attempts = [head, {}]
    if size_override is not None:
        sized = {size_key: size_override[-1]} if size_override[-1] == size_override[-2] else {
            size_key: tuple(size_override[-2:])}
        attempts = [{**head, **sized}, sized] + attempts
    return attempts


def input_size_of_module(model: nn.Module) -> tuple[int, ...] | None:
    """The input shape a module declares: timm's pretrained_cfg/default_cfg ``input_size``, or a
    torchvision ViT's ``image_size``; None when it declares none."""
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, dict) and cfg.get("input_size"):
            return tuple(int(s) for s in cfg["input_size"])
    size = getattr(model, "image_size", None)
    if isinstance(size, int):
        return (3, size, size)
    return None


def parse_spec(text: str) -> ModelSpec:
    """Resolve ``timm:NAME``, ``torchvision:NAME`` or ``package.module:factory``; SpecError if it
    names nothing (the model is not built yet)."""
    source, sep, name = text.partition(":")
    if not sep or not source or not name:
        raise SpecError(f"bad model spec {text!r}: expected timm:NAME, torchvision:NAME or "
                        f"package.module:factory")
    if source == "timm":
        return ModelSpec(text, "timm", _known_timm_model(name))
    if source == "torchvision":
        return ModelSpec(text, "torchvision", _known_torchvision_model(name))
    return ModelSpec(text, "factory", text, _factory(source, name, text))


def built_from_spec(text: str, input_size: int | Sequence[int] | None = None,
                    fallback: tuple[int, ...] | None = None) -> tuple[nn.Module, tuple[int, ...]]:
    """The model a SPEC names, built with random weights, and the per-sample input shape to feed
    it: ``input_size`` (see :func:`normalize_input_size`), else the size the model declares,
    else ``fallback``. SpecError for a SPEC that names nothing, ValueError when no shape is
    known."""
    spec = parse_spec(text)
    model = spec.build()
    shape = normalize_input_size(input_size, spec.default_input_size(model)) or fallback
    if shape is None:
        raise ValueError(f"{text}: the model declares no input size; give one (--input-size "
                         f"CxHxW)")
    return model, shape


def _known_timm_model(name: str) -> str:
    import timm
    if not timm.is_model(name):
        raise SpecError(f"unknown timm model {name!r}{_suggest(name, timm.list_models())}; "
                        f"see timm.list_models()")
    return name


def torchvision_classification_models() -> list[str]:
    """Every torchvision classification model name (torchvision.models, not its submodules)."""
    return [name for name, task in torchvision_tasks().items() if task == "classification"]


def _known_torchvision_model(name: str) -> str:
    known = torchvision_tasks()
    if name not in known:
        raise SpecError(f"unknown torchvision model {name!r}{_suggest(name, list(known))}; see "
                        f"torchvision.models.list_models()")
    return name


def _factory(module_name: str, attribute: str, text: str) -> Callable[[], nn.Module]:
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise SpecError(f"model spec {text!r}: cannot import module {module_name!r} "
                        f"({describe_error(error)}); expected timm:NAME, torchvision:NAME or "
                        f"package.module:factory") from error
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise SpecError(f"model spec {text!r}: module {module_name!r} has no callable "
                        f"{attribute!r}{_suggest(attribute, dir(module))}")
    return factory


def _suggest(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def normalize_input_size(size: int | Sequence[int] | None,
                         default: tuple[int, ...] | None) -> tuple[int, ...] | None:
    """A per-sample shape from ``size``: an int (or 1-tuple) is a square side and (H, W) a
    spatial size, both replacing the default's last two dimensions (channels 3 when there is no
    default); three or more numbers, (C, H, W) or a video's (C, T, H, W), are taken as is. None
    keeps ``default``."""
    if size is None:
        return default
    size = (size,) if isinstance(size, int) else tuple(int(s) for s in size)
    if not size or min(size) < 1:
        raise ValueError(f"input_size must be positive: an int, (H, W), (C, H, W) or "
                         f"(C, T, H, W), got {size}")
    if len(size) >= 3:
        return size
    leading = default[:-2] if default and len(default) >= 3 else (3,)
    return (*leading, *(size * 2 if len(size) == 1 else size))
