"""Save and load converted models with their weight codes bit-packed (n bits per weight on disk).

``save(int_model, path)`` writes the whole module (as ``torch.save`` does) with every
``LoweredWeight``'s int8 codes replaced by a packed bit stream; ``load(path)`` restores a model
whose outputs equal the saved one's exactly. The file is written to a temporary name first and
renamed, so an interrupted save never leaves a truncated file under ``path``.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .modules import LoweredWeight, WeightFakeQuant
from .packing import pack_codes, unpack_codes
from .utils import copy_module

FORMAT = "msq_fx.packed/1"


def save(int_model: nn.Module, path: str | os.PathLike) -> None:
    """Write a model returned by ``msq_fx.convert`` to ``path`` with bit-packed codes."""
    require_converted(int_model, "msq_fx.save")
    skeleton = copy_module(int_model)
    packed = {}
    for name, lowered in _lowered_modules(skeleton):
        packed[name] = {"shape": tuple(lowered.codes.shape), "bits": lowered.num_bits,
                        "packed": pack_codes(lowered.codes, lowered.num_bits)}
        lowered.codes = torch.empty(0, dtype=torch.int8, device=lowered.codes.device)
    payload = {"format": FORMAT, "model": skeleton, "codes": packed}
    atomic_write(Path(path), lambda tmp: torch.save(payload, tmp))


def load(path: str | os.PathLike, map_location: str | torch.device | None = None) -> nn.Module:
    """Read a model written by ``save``. The file holds a pickled module: load trusted files only."""
    payload = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not an msq_fx packed model (expected format {FORMAT!r}); it "
                         f"was not written by msq_fx.save()")
    model = payload["model"]
    for name, lowered in _lowered_modules(model):
        entry = payload["codes"].get(name)
        if entry is None:
            raise ValueError(f"{path}: no packed codes for quantized weight module {name!r}")
        codes = unpack_codes(entry["packed"], entry["bits"], tuple(entry["shape"]))
        lowered.codes = codes.to(lowered.step.device)
    return model


def _lowered_modules(model: nn.Module) -> list[tuple[str, LoweredWeight]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoweredWeight)]


def require_converted(model: nn.Module, caller: str) -> None:
    """Raise unless ``model`` is a model returned by ``msq_fx.convert`` (``caller`` names who asks)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller} expects an nn.Module, got {type(model).__name__}")
    fake = [name for name, m in model.named_modules() if isinstance(m, WeightFakeQuant)]
    if fake:
        raise ValueError(f"{caller}: {fake[0]} is still a fake quantizer; call "
                         f"msq_fx.convert(model) first (save the prepared model for training "
                         f"with torch.save(model.state_dict(), ...)).")
    if not _lowered_modules(model):
        raise ValueError(f"{caller}: the model holds no quantized weight; pass the model "
                         f"returned by msq_fx.convert().")


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it to ``path``: an
    interrupted write never leaves a truncated file under ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
