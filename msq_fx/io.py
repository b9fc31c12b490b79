"""Save and load converted models with their weight codes bit-packed (n bits per weight on disk).

A file written by ``save`` holds only tensors and plain data, so reading it never runs code
from the file: the converted model's state (every ``LoweredWeight``'s codes as a packed bit
stream, the rest as tensors), its per-layer report, its ``MSQConfig``, and its module structure
as an opaque byte string. ``load(path, model=skeleton)`` fills a converted model of the same
architecture (``convert(prepare(arch, example_inputs, saved_config(path)))``) with the saved
state and unpickles nothing; ``load(path, trusted=True)`` rebuilds the module from the file's
structure, which runs the pickle in it: only for files you trust. ``saved_report`` and
``saved_config`` read the plain parts alone. Files are written to a temporary name first and
renamed, so an interrupted save never leaves a truncated file under ``path``.
"""
from __future__ import annotations

import io
import logging
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .config import MSQConfig
from .modules import LoweredActivation, LoweredWeight, WeightFakeQuant
from .packing import pack_codes, unpack_codes
from .report import FloatRow, LayerRow, Report, report
from .state import prepared_state
from .utils import copy_module

__all__ = ["save", "load", "saved_report", "saved_config", "require_converted", "atomic_write",
           "FORMAT", "PICKLED_FORMAT"]

logger = logging.getLogger("msq_fx")

FORMAT = "msq_fx.packed/2"
#: Files of this format hold the whole pickled module; they are read with ``trusted=True`` only.
PICKLED_FORMAT = "msq_fx.packed/1"


def save(int_model: nn.Module, path: str | os.PathLike) -> None:
    """Write a model returned by ``msq_fx.convert`` to ``path`` with bit-packed codes.

    The file holds tensors and plain data only (see the module docstring); it is written to a
    temporary name and renamed, so an interrupted save leaves no truncated file at ``path``.

    Args:
        int_model: a converted model.
        path: the file to write.

    Returns:
        None.

    Example:
        >>> import os, tempfile, msq_fx
        >>> from torch import nn
        >>> int_model = msq_fx.convert(msq_fx.prepare(nn.Linear(16, 4)))
        >>> with tempfile.TemporaryDirectory() as directory:
        ...     msq_fx.save(int_model, os.path.join(directory, "linear.msq"))
        ...     print(os.listdir(directory))
        ['linear.msq']
    """
    require_converted(int_model, "msq_fx.save")
    state = int_model.state_dict()
    codes = {}
    for name, lowered in _lowered_modules(int_model):
        del state[f"{name}.codes"]
        codes[name] = {"shape": tuple(lowered.codes.shape), "bits": lowered.num_bits,
                       "packed": pack_codes(lowered.codes, lowered.num_bits)}
    model_report = report(int_model)
    prepared = prepared_state(int_model)
    payload = {
        "format": FORMAT, "state": state, "codes": codes,
        "activations": {name: {"bits": m.bits, "signed": m.signed}
                        for name, m in int_model.named_modules()
                        if isinstance(m, LoweredActivation)},
        "report": {**model_report.to_dict(), "other_float_params": model_report.other_float_params},
        "config": None if prepared is None else prepared.config,
        "structure": _structure_bytes(int_model),
    }
    if payload["structure"] is None:
        logger.warning("msq_fx.save: %s cannot be pickled (e.g. a class defined inside a "
                       "function), so %s holds its state alone; load it with "
                       "msq_fx.load(path, model=...)", type(int_model).__name__, path)
    atomic_write(Path(path), lambda tmp: torch.save(payload, tmp))


def load(path: str | os.PathLike, model: nn.Module | None = None, *, trusted: bool = False,
         map_location: str | torch.device | None = None) -> nn.Module:
    """Read a model written by ``save``.

    Args:
        path: a file written by :func:`save`.
        model: a converted model of the saved architecture, e.g.
            ``convert(prepare(arch, example_inputs, saved_config(path)))``: it is filled with
            the saved state and nothing in the file is unpickled; a model that does not match
            is left unchanged (ValueError).
        trusted: without ``model``, rebuild the module from the file's pickled structure, which
            can run code: for files you trust only.
        map_location: as for ``torch.load``.

    Returns:
        The converted model, its outputs those of the model that was saved.

    Example:
        >>> import os, tempfile, torch, msq_fx
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> int_model = msq_fx.convert(msq_fx.prepare(model))
        >>> with tempfile.TemporaryDirectory() as directory:
        ...     path = os.path.join(directory, "model.msq")
        ...     msq_fx.save(int_model, path)
        ...     skeleton = msq_fx.convert(msq_fx.prepare(model, config=msq_fx.saved_config(path)))
        ...     loaded = msq_fx.load(path, model=skeleton)
        >>> x = torch.randn(3, 4)
        >>> torch.equal(loaded(x), int_model(x))
        True
    """
    payload = _read(path, trusted, map_location)
    if payload["format"] == PICKLED_FORMAT:
        return _fill_codes(payload["model"], payload["codes"], path)
    if model is not None:
        return _load_into(model, payload, path)
    if not trusted:
        raise ValueError(f"{path}: loading without a model rebuilds the module from the pickled "
                         f"structure in the file, which can run code. Pass model=<a converted "
                         f"model of the same architecture> (convert(prepare(arch, example_inputs, "
                         f"msq_fx.saved_config(path)))) to read tensors only, or trusted=True "
                         f"for a file you trust.")
    if payload["structure"] is None:
        raise ValueError(f"{path}: holds no module structure (the model could not be pickled "
                         f"when it was saved); pass model=<a converted model of the same "
                         f"architecture>")
    skeleton = torch.load(io.BytesIO(payload["structure"].numpy().tobytes()),
                          map_location=map_location, weights_only=False)
    state = _full_state(payload)
    with torch.no_grad():
        # The structure's empty placeholders take the saved tensors in place, so a tensor that
        # several modules share stays one object.
        for key, placeholder in skeleton.state_dict(keep_vars=True).items():
            placeholder.set_(state[key])
    return skeleton


def saved_report(path: str | os.PathLike) -> Report:
    """The per-layer report of a saved model, read without unpickling anything."""
    data = _read(path, trusted=False, map_location="cpu")["report"]
    return Report(layers=[LayerRow(**{**row, "shape": tuple(row["shape"]),
                                      "shared_with": tuple(row["shared_with"])})
                          for row in data["layers"]],
                  float_weights=[FloatRow(**row) for row in data["float_weights"]],
                  other_float_params=data["other_float_params"], notes=list(data["notes"]))


def saved_config(path: str | os.PathLike) -> MSQConfig | None:
    """The ``MSQConfig`` the saved model was prepared with (None if it did not record one).

    A file holds plain data only, so ``filter_fn``, ``leaf_modules`` and ``concrete_args`` come
    back at their defaults: pass them again with ``config.replace(...)`` if the model used them.
    """
    data = _read(path, trusted=False, map_location="cpu")["config"]
    return None if data is None else MSQConfig.from_dict(data)


def _read(path: str | os.PathLike, trusted: bool, map_location) -> dict[str, Any]:
    """The file's payload, read with torch's tensors-only unpickler unless ``trusted``."""
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if not trusted:
            raise ValueError(
                f"{path}: holds objects other than tensors and plain data (an msq_fx file "
                f"of the older format {PICKLED_FORMAT!r}, or not an msq_fx file), and reading "
                f"them can run code; for a file you trust, msq_fx.load(path, trusted=True) reads "
                f"it (msq_fx.save writes it again in the current format)") from error
        payload = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") not in (FORMAT, PICKLED_FORMAT):
        raise ValueError(f"{path}: not an msq_fx packed model (expected format {FORMAT!r}); it "
                         f"was not written by msq_fx.save()")
    return payload


def _structure_bytes(int_model: nn.Module) -> torch.Tensor | None:
    """The module pickled with every state tensor replaced by an empty one, as uint8 bytes;
    None for a module that cannot be pickled."""
    empty = {id(tensor): (nn.Parameter(torch.empty(0, dtype=tensor.dtype),
                                       requires_grad=tensor.requires_grad)
                          if isinstance(tensor, nn.Parameter)
                          else torch.empty(0, dtype=tensor.dtype))
             for tensor in int_model.state_dict(keep_vars=True).values()}
    buffer = io.BytesIO()
    try:
        torch.save(copy_module(int_model, replacements=empty), buffer)
    except (pickle.PicklingError, AttributeError, TypeError):
        return None
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def _full_state(payload: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The saved state with each module's codes unpacked under ``<module>.codes``."""
    state = dict(payload["state"])
    for name, entry in payload["codes"].items():
        state[f"{name}.codes"] = unpack_codes(entry["packed"], entry["bits"],
                                              tuple(entry["shape"]))
    return state


def _load_into(model: nn.Module, payload: dict[str, Any], path) -> nn.Module:
    """Copy the saved state into ``model`` after checking every key and shape matches."""
    require_converted(model, "msq_fx.load(model=...)")
    state = _full_state(payload)
    own = model.state_dict()
    problems = [f"{key}: the file has {tuple(state[key].shape)} {state[key].dtype}, the model "
                f"{tuple(own[key].shape)} {own[key].dtype}"
                for key in own if key in state
                and (state[key].shape != own[key].shape or state[key].dtype != own[key].dtype)]
    problems += [f"missing in the file: {key}" for key in own if key not in state]
    problems += [f"not in the model: {key}" for key in state if key not in own]
    activations = payload["activations"]
    modules = dict(model.named_modules())
    problems += [f"{name}: the file has a quantized activation here, the model does not"
                 for name in activations if not isinstance(modules.get(name), LoweredActivation)]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more"
                                            if len(problems) > 5 else "")
        raise ValueError(f"msq_fx.load: {path} does not match the given model ({shown}); build "
                         f"it as convert(prepare(arch, example_inputs, saved_config(path))) from "
                         f"the architecture that was saved (with the filter_fn, leaf_modules and "
                         f"concrete_args it was prepared with: the file cannot hold them)")
    model.load_state_dict(state, strict=True)
    for name, settings in activations.items():
        modules[name].bits, modules[name].signed = settings["bits"], settings["signed"]
    return model


def _fill_codes(model: nn.Module, codes: dict[str, Any], path) -> nn.Module:
    """A module of the older format: put each module's unpacked codes back in place."""
    for name, lowered in _lowered_modules(model):
        entry = codes.get(name)
        if entry is None:
            raise ValueError(f"{path}: no packed codes for quantized weight module {name!r}")
        codes_tensor = unpack_codes(entry["packed"], entry["bits"], tuple(entry["shape"]))
        lowered.codes = codes_tensor.to(lowered.step.device)
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
