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

Every file also holds a SHA-256 checksum of the rest (``"checksum"``: the state tensors, the
packed codes, the structure bytes and the plain data), and every read verifies it, so a file
damaged on disk or in a copy is refused (:class:`MSQFileError`) instead of loading wrong codes.
Files written before the checksum existed hold none and are read without the verification.
Before unpickling anything, a read checks that the file is a whole torch.save archive whose
data.pkl record matches its CRC-32, so a truncated, empty or foreign file is refused with what
is wrong with it.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .config import MSQConfig
from .errors import MSQError
from .modules import LoweredActivation, LoweredWeight, WeightFakeQuant
from .packing import pack_codes, unpack_codes
from .report import FloatRow, LayerRow, Report, report
from .state import prepared_state
from .utils import copy_module

__all__ = ["save", "load", "saved_report", "saved_config", "require_converted", "atomic_write",
           "MSQFileError", "FORMAT", "PICKLED_FORMAT"]

logger = logging.getLogger("msq_fx")

FORMAT = "msq_fx.packed/2"
#: Files of this format hold the whole pickled module; they are read with ``trusted=True`` only.
PICKLED_FORMAT = "msq_fx.packed/1"

#: The payload keys the checksum covers (all but the format and the checksum itself).
_CHECKED_KEYS = ("state", "codes", "activations", "report", "config", "structure")

#: How every file torch.save writes begins (a zip archive's first local header).
_ZIP_MAGIC = b"PK\x03\x04"


class MSQFileError(MSQError, ValueError):
    """A file msq_fx cannot read as a saved model: damaged, not an msq_fx file, one that needs
    ``trusted=True``, or one that does not match the given model. The message names the file.

    A ValueError as well, which is what these errors were before.
    """


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
    _require_materialized(int_model, "msq_fx.save", "a model on the meta device has no values "
                          "to save: build it on a real device (or model.to_empty(device='cpu') "
                          "and load its weights) before converting and saving")
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
    payload["checksum"] = _checksum(payload)
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
            is left unchanged (MSQFileError).
        trusted: without ``model``, rebuild the module from the file's pickled structure, which
            can run code: for files you trust only.
        map_location: as for ``torch.load``.

    Returns:
        The converted model, its outputs those of the model that was saved.

    Raises:
        MSQFileError: (an ``MSQError`` and a ``ValueError``) for a file that is truncated or
            corrupt, fails its checksum, is not an msq_fx file, or needs ``trusted=True``;
            ``model`` is then left unchanged.

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
    if model is not None:
        _require_materialized(model, f"msq_fx.load({str(path)!r})", "the skeleton is on the "
                              "meta device, where a copy of the saved values does nothing: "
                              "build the skeleton on the CPU (or the device the model is to run "
                              "on) and pass that")
    payload = _read(path, trusted, map_location)
    if payload["format"] == PICKLED_FORMAT:
        return _fill_codes(payload["model"], payload["codes"], path)
    if model is not None:
        return _load_into(model, payload, path)
    if not trusted:
        raise MSQFileError(f"{path}: loading without a model rebuilds the module from the "
                           f"pickled structure in the file, which can run code. Pass model=<a "
                           f"converted model of the same architecture> (convert(prepare(arch, "
                           f"example_inputs, msq_fx.saved_config(path)))) to read tensors only, "
                           f"or trusted=True for a file you trust.")
    if payload["structure"] is None:
        raise MSQFileError(f"{path}: holds no module structure (the model could not be pickled "
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


def _require_materialized(model: nn.Module, where: str, fix: str) -> None:
    """MSQError naming the tensors of ``model`` on the meta device, with ``fix``."""
    on_meta = [name for name, tensor in model.state_dict().items() if tensor.is_meta]
    if on_meta:
        shown = ", ".join(on_meta[:3]) + (f" and {len(on_meta) - 3} more" if len(on_meta) > 3
                                          else "")
        raise MSQError(f"{where}: {type(model).__name__} holds tensors on the meta device "
                       f"({shown}); {fix}.")


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
    """The file's payload, read with torch's tensors-only unpickler unless ``trusted``.

    MSQFileError for a file that is truncated or corrupt, not an msq_fx file, fails its checksum,
    or needs ``trusted=True``.
    """
    if isinstance(path, (str, os.PathLike)):
        _check_archive(path)
    try:
        payload = _torch_load(path, map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if not trusted:
            raise MSQFileError(
                f"{path}: holds objects other than tensors and plain data (an msq_fx file of the "
                f"older format {PICKLED_FORMAT!r}, a file that is not an msq_fx file, or a "
                f"damaged one), and reading them can run code; for a file you trust, "
                f"msq_fx.load(path, trusted=True) reads it (msq_fx.save writes it again in the "
                f"current format)") from error
        payload = _torch_load(path, map_location, weights_only=False)
    fmt = payload.get("format") if isinstance(payload, dict) else None
    if fmt not in (FORMAT, PICKLED_FORMAT):
        if isinstance(fmt, str) and fmt.startswith("msq_fx."):
            raise MSQFileError(f"{path}: its format {fmt!r} is none this version of msq_fx reads "
                               f"({FORMAT!r}, {PICKLED_FORMAT!r}): a file of a newer msq_fx "
                               f"(upgrade msq_fx), or a corrupt one (save the model again)")
        held = (f"a dict with keys {sorted(map(str, payload))[:6]}" if isinstance(payload, dict)
                else f"a {type(payload).__name__}")
        raise MSQFileError(f"{path}: not an msq_fx file: torch.load reads {held}, not an "
                           f"msq_fx packed model (format {FORMAT!r}); pass a file msq_fx.save() "
                           f"wrote")
    _verify_checksum(payload, path)
    return payload


def _check_archive(path: str | os.PathLike) -> None:
    """MSQFileError unless ``path`` is a whole zip archive of the kind torch.save writes."""
    size = os.path.getsize(path)
    if size == 0:
        raise MSQFileError(f"{path}: truncated or corrupt: the file is empty (0 bytes), as a "
                           f"save, copy or download that did not finish (or a full disk) leaves "
                           f"it. Save the model again, or copy the file again.")
    with open(path, "rb") as handle:
        head = handle.read(len(_ZIP_MAGIC))
    if head != _ZIP_MAGIC[:len(head)]:
        raise MSQFileError(f"{path}: not an msq_fx file: it does not begin as every file "
                           f"torch.save (and so msq_fx.save) writes does, with {_ZIP_MAGIC!r}, "
                           f"but with {head!r}; pass a file msq_fx.save() wrote")
    try:
        with zipfile.ZipFile(path) as archive:
            records = [info for info in archive.infolist()
                       if info.filename == "data.pkl" or info.filename.endswith("/data.pkl")]
            if records and records[0].CRC:  # 0: written without CRCs, nothing to compare
                archive.read(records[0])  # compares the record with its CRC-32
    except Exception as error:  # zipfile's many ways to refuse a damaged archive
        raise MSQFileError(f"{path}: truncated or corrupt: its {size:,} bytes begin as a "
                           f"torch.save archive, but its directory, which closes the file, or "
                           f"its data.pkl record is missing or damaged ({error}): the file was "
                           f"cut short (a save, copy or download that did not finish) or damaged "
                           f"on disk. Save the model again, or copy the file again.") from error
    if not records:
        raise MSQFileError(f"{path}: not an msq_fx file: a zip archive that torch.save did not "
                           f"write (it holds no data.pkl); pass a file msq_fx.save() wrote")


def _torch_load(path, map_location, weights_only: bool) -> Any:
    """``torch.load``, with any failure to read the file (other than the tensors-only
    unpickler's refusal, left to the caller) raised as MSQFileError."""
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError:
        if weights_only:
            raise
        cause = None
    except Exception as error:  # every way a damaged file fails inside torch.load
        if "map_location" in str(error):  # torch's device errors: the file is fine
            raise
        cause = error
    detail = "" if cause is None else f" ({type(cause).__name__}: {cause})"
    raise MSQFileError(f"{path}: truncated or corrupt: torch.load cannot read what it holds"
                       f"{detail}. Save the model again, or copy the file again from where it "
                       f"was saved.") from cause


def _checksum(payload: dict[str, Any]) -> str:
    """SHA-256 of the payload's contents (every key of ``_CHECKED_KEYS``), as "sha256:<hex>"."""
    digest = hashlib.sha256()
    for key in _CHECKED_KEYS:
        _feed(digest, key)
        _feed(digest, payload.get(key))
    return "sha256:" + digest.hexdigest()


def _feed(digest, value: Any, enclosing: frozenset[int] = frozenset()) -> None:
    """Add ``value`` (tensors, dicts, lists, tuples and scalars, nested) to ``digest``; each part
    is preceded by its type and size, so different values never feed the same bytes. A container
    inside itself (which only damage can make) feeds a marker instead of recursing forever."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().resolve_conj().resolve_neg().contiguous()
        digest.update(f"tensor {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, (dict, list, tuple)):
        if id(value) in enclosing:
            digest.update(b"cycle\n")
            return
        enclosing = enclosing | {id(value)}
        if isinstance(value, dict):
            digest.update(f"dict {len(value)}\n".encode())
            for key in sorted(value, key=str):
                _feed(digest, key, enclosing)
                _feed(digest, value[key], enclosing)
        else:
            digest.update(f"sequence {len(value)}\n".encode())
            for item in value:
                _feed(digest, item, enclosing)
    else:
        text = repr(value)
        digest.update(f"{type(value).__name__} {len(text)}\n{text}".encode())


def _verify_checksum(payload: dict[str, Any], path) -> None:
    """MSQFileError when the payload's checksum is not the stored one (files written before
    checksums existed store none and pass)."""
    stored = payload.get("checksum")
    if stored is not None and stored != _checksum(payload):
        raise MSQFileError(f"{path}: checksum mismatch: what the file holds is not what "
                           f"msq_fx.save wrote (the SHA-256 of its tensors, codes and plain data "
                           f"differs from the one stored with them): it was damaged on disk or "
                           f"in a copy. Copy it again from where it was saved, or save the model "
                           f"again.")


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
        raise MSQFileError(f"msq_fx.load: {path} does not match the given model ({shown}); build "
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
            raise MSQFileError(f"{path}: no packed codes for quantized weight module {name!r}")
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
