"""Save and load converted models with their weight codes bit-packed (n bits per weight on disk).

A file written by ``save`` is a torch.save archive of tensors and plain data only, so reading it
never runs code from the file. Its records:

- ``codes``: the packed codes of every ``LoweredWeight``, laid end to end in one uint8 tensor;
- ``tensors``: the bytes of every other state tensor (biases, norms, steps, weights left in
  float), laid end to end in another, each at the next multiple of its element size;
- ``header``: xz-compressed, one line of JSON (each tensor's state_dict key, dtype, shape and
  memory format in the order of the blobs, the quantized activations, the ``MSQConfig``) followed,
  unless ``save(..., structure=False)``, by the module structure: the model pickled with every
  tensor replaced by a reference into the blobs;
- ``report``: the per-layer report, as plain data.

So a file is about the size of its codes and float tensors: ResNet-20 at 2-3 bits takes 1.1x
them, where a record per tensor and the uncompressed pickled module used to take 2.5x.

``load(path, model=skeleton)`` fills a converted model of the same architecture
(``convert(prepare(arch, example_inputs, saved_config(path)))``) with the saved state and
unpickles nothing; ``load(path, trusted=True)`` rebuilds the module from the file's structure,
which runs the pickle in it: only for files you trust. ``saved_report``, ``saved_config`` and
``saved_sizes`` read the plain parts alone. Files are written to a temporary name first and
renamed, so an interrupted save never leaves a truncated file under ``path``.

Every file also holds a SHA-256 checksum of the rest (``"checksum"``: the tensors, the packed
codes, the header and the report), and every read verifies it, so a file damaged on disk or in a
copy is refused (:class:`MSQFileError`) instead of loading wrong codes; the header is then
checked to describe the blobs exactly. Files written before the checksum existed hold none and
are read without the verification. Before unpickling anything, a read checks that the file is a
whole torch.save archive whose data.pkl record matches its CRC-32, so a truncated, empty or
foreign file is refused with what is wrong with it.

Files of the two earlier formats are still read: ``msq_fx.packed/2`` (every state tensor a
record of its own, the structure as uncompressed torch.save bytes) like the current one, and
``msq_fx.packed/1`` (the whole pickled module) with ``trusted=True`` only.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import io
import json
import logging
import lzma
import os
import pickle
import secrets
import weakref
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import nn

from .config import MSQConfig
from .errors import MSQError
from .modules import LoweredActivation, LoweredWeight, WeightFakeQuant
from .packing import codes_outside_width, pack_codes, packed_size, unpack_codes
from .report import FloatRow, LayerRow, Report, report
from .state import prepared_state

__all__ = ["save", "load", "saved_report", "saved_config", "saved_sizes", "SavedSizes",
           "require_converted", "atomic_write", "MSQFileError", "FORMAT", "PER_TENSOR_FORMAT",
           "PICKLED_FORMAT"]

logger = logging.getLogger("msq_fx")

FORMAT = "msq_fx.packed/3"
#: Files of this format hold every state tensor as a record of its own, the structure as
#: uncompressed torch.save bytes and the config as plain data; read like the current format.
PER_TENSOR_FORMAT = "msq_fx.packed/2"
#: Files of this format hold the whole pickled module; they are read with ``trusted=True`` only.
PICKLED_FORMAT = "msq_fx.packed/1"
#: The formats this version reads.
_READ_FORMATS = (FORMAT, PER_TENSOR_FORMAT, PICKLED_FORMAT)

#: The payload keys each format's checksum covers (all but the format and the checksum itself).
_CHECKED_KEYS = {
    FORMAT: ("header", "tensors", "codes", "own", "report"),
    PER_TENSOR_FORMAT: ("state", "codes", "activations", "report", "config", "structure"),
}

#: How every file torch.save writes begins (a zip archive's first local header).
_ZIP_MAGIC = b"PK\x03\x04"

#: The most a read inflates a file's header to (or lets the decompressor use): a model with a
#: million tensors needs about 100 MiB, and a crafted file cannot make a read allocate without
#: bound.
_HEADER_LIMIT = 256 * 2**20

#: Memory formats a stored tensor is given back in (a tensor in neither comes back contiguous).
_MEMORY_FORMATS = {"channels_last": torch.channels_last,
                   "channels_last_3d": torch.channels_last_3d}
_MEMORY_FORMAT_DIMS = {"channels_last": 4, "channels_last_3d": 5}


class MSQFileError(MSQError, ValueError):
    """A file msq_fx cannot read as a saved model: damaged, not an msq_fx file, one that needs
    ``trusted=True``, or one that does not match the given model. The message names the file.

    A ValueError as well, which is what these errors were before.
    """


def save(int_model: nn.Module, path: str | os.PathLike, *, structure: bool = True) -> None:
    """Write a model returned by ``msq_fx.convert`` to ``path`` with bit-packed codes.

    The file holds tensors and plain data only (see the module docstring); it is written to a
    temporary name and renamed, so an interrupted save leaves no truncated file at ``path``.

    Args:
        int_model: a converted model.
        path: the file to write.
        structure: also store the module structure (pickled, compressed), which
            ``load(path, trusted=True)`` rebuilds the model from; about 3 KB for ResNet-20.
            Without it the file loads into a model built from the architecture
            (``load(path, model=...)``) only.

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
    blobs = _Blobs.of_state(int_model)
    pickled, absent = b"", "it was saved with structure=False"
    if structure:
        try:
            pickled = _pickled_structure(int_model, blobs)
        except (pickle.PicklingError, AttributeError, TypeError) as error:
            blobs = _Blobs.of_state(int_model)  # without any tensor the failed pickle added
            absent = (f"the model could not be pickled when it was saved: "
                      f"{type(error).__name__}: {error}")
            logger.warning("msq_fx.save: %s cannot be pickled (e.g. a class defined inside a "
                           "function), so %s holds its state alone; load it with "
                           "msq_fx.load(path, model=...)", type(int_model).__name__, path)
    prepared = prepared_state(int_model)
    header = {**blobs.manifest(),
              "activations": {name: {"bits": m.bits, "signed": m.signed}
                              for name, m in int_model.named_modules()
                              if isinstance(m, LoweredActivation)},
              "config": None if prepared is None else prepared.config,
              "structure": {"bytes": len(pickled)} if pickled else {"absent": absent}}
    model_report = report(int_model)
    payload = {
        "format": FORMAT,
        # One line of JSON, then the pickle: the config, which the structure holds too, and the
        # tensor names, which both mention, are compressed once.
        "header": _compressed(json.dumps(header, separators=(",", ":")).encode() + b"\n"
                              + pickled),
        "tensors": blobs.tensor_blob(), "codes": blobs.code_blob(), "own": blobs.own,
        "report": {**model_report.to_dict(), "other_float_params": model_report.other_float_params},
    }
    payload["checksum"] = _checksum(payload)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:  # a handle, so the records are named archive/...
            torch.save(payload, handle)

    atomic_write(Path(path), write)


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
            can run code: for files you trust only. Each tensor comes back in the memory format
            it was saved in (``torch.channels_last`` stays channels_last).
        map_location: as for ``torch.load``; without it the tensors of a file of the current
            format are read onto the CPU.

    Returns:
        The converted model, its outputs those of the model that was saved.

    Raises:
        MSQFileError: (an ``MSQError`` and a ``ValueError``) for a file that is truncated or
            corrupt, fails its checksum, is not an msq_fx file, needs ``trusted=True``, or holds
            no structure to rebuild the model from; ``model`` is then left unchanged.

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
    try:
        return _loaded(path, model, trusted, map_location)
    finally:
        # Reading a file unpacks every weight's codes through temporaries; glibc keeps most of
        # the memory they took (at 4 bits on vit_b_16, three times what the model holds).
        _return_free_heap()


def _return_free_heap() -> None:
    """Give the free memory of glibc's heaps back to the system (nothing where malloc is not
    glibc's)."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def _loaded(path: str | os.PathLike, model: nn.Module | None, trusted: bool,
            map_location) -> nn.Module:
    """``load``'s work."""
    payload = _read(path, trusted, map_location)
    if payload["format"] == PICKLED_FORMAT:
        rebuilt = _fill_codes(payload["model"], payload["codes"], path)
        if model is None:
            return rebuilt
        activations = {name: {"bits": m.bits, "signed": m.signed}
                       for name, m in rebuilt.named_modules() if isinstance(m, LoweredActivation)}
        return _load_into(model, rebuilt.state_dict(), activations, path)
    contents = _contents(payload, path)
    if model is not None:
        return _load_into(model, contents.state(), contents.activations, path)
    if not trusted:
        raise MSQFileError(f"{path}: loading without a model rebuilds the module from the "
                           f"pickled structure in the file, which can run code. Pass model=<a "
                           f"converted model of the same architecture> (convert(prepare(arch, "
                           f"example_inputs, msq_fx.saved_config(path)))) to read tensors only, "
                           f"or trusted=True for a file you trust.")
    if contents.structure_absent is not None:
        raise MSQFileError(f"{path}: holds no module structure ({contents.structure_absent}); "
                           f"pass model=<a converted model of the same architecture>")
    rebuilt = contents.rebuilt(map_location)
    if not isinstance(rebuilt, nn.Module):
        raise MSQFileError(f"{path}: its structure unpickles to a {type(rebuilt).__name__}, not "
                           f"a module: not a file msq_fx.save wrote")
    return rebuilt


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
    data = _contents(_read(path, trusted=False, map_location="cpu"), path).config
    return None if data is None else MSQConfig.from_dict(data)


@dataclass(frozen=True)
class SavedSizes:
    """Where the bytes of a saved file go (:func:`saved_sizes`).

    Attributes:
        file_bytes: the size of the file.
        code_bytes: the bit-packed codes of the quantized weights.
        tensor_bytes: every other tensor (biases, norms, steps and scales, weights left in
            float) at its own size.
        structure: whether the file holds the module structure ``load(path, trusted=True)``
            rebuilds the model from.
    """

    file_bytes: int
    code_bytes: int
    tensor_bytes: int
    structure: bool

    @property
    def other_bytes(self) -> int:
        """The rest: the compressed header (tensor names and shapes, config, structure), the
        report, alignment and the archive's own records."""
        return self.file_bytes - self.code_bytes - self.tensor_bytes

    @property
    def ratio(self) -> float:
        """The file's size over what its tensors need (packed codes + other tensors)."""
        return self.file_bytes / max(self.code_bytes + self.tensor_bytes, 1)

    def __str__(self) -> str:
        return (f"{self.file_bytes:,} bytes: {self.code_bytes:,} packed codes + "
                f"{self.tensor_bytes:,} other tensors + {self.other_bytes:,} other (header "
                f"{'with' if self.structure else 'without'} the structure, report, records) = "
                f"{self.ratio:.3f}x the tensors")


def saved_sizes(path: str | os.PathLike) -> SavedSizes:
    """How the bytes of a file written by :func:`save` divide between the packed codes, the other
    tensors and the rest; read without unpickling anything.

    Example:
        >>> import os, tempfile, msq_fx
        >>> from torch import nn
        >>> int_model = msq_fx.convert(msq_fx.prepare(nn.Linear(64, 16)))
        >>> with tempfile.TemporaryDirectory() as directory:
        ...     msq_fx.save(int_model, os.path.join(directory, "linear.msq"))
        ...     sizes = msq_fx.io.saved_sizes(os.path.join(directory, "linear.msq"))
        >>> sizes.code_bytes, sizes.tensor_bytes  # 64 x 16 8-bit codes; bias, step, offset, bits
        (1024, 80)
    """
    contents = _contents(_read(path, trusted=False, map_location="cpu"), path)
    return SavedSizes(os.path.getsize(path), contents.code_bytes(), contents.tensor_bytes(),
                      contents.structure_absent is None)


# ------------------------------------------------------------------------------------ writing

def _plain_bytes(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` has plain bytes to lay into the blob (is neither sparse nor quantized)."""
    return tensor.layout == torch.strided and not tensor.is_quantized


def _tensor_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The values of ``tensor`` in logical (row-major) order as flat uint8."""
    flat = tensor.detach().cpu().resolve_conj().resolve_neg().contiguous().reshape(-1)
    return flat.view(torch.uint8)


def _memory_format(tensor: torch.Tensor) -> str | None:
    """The name of the memory format whose strides ``tensor`` has, when they are not the plain
    contiguous ones (a 1x1 kernel's channels_last strides differ from them, though both are
    dense)."""
    if tensor.layout != torch.strided:
        return None
    like = functools.partial(torch.empty, tensor.shape, device="meta")
    if tensor.stride() == like().stride():
        return None
    return next((name for name, fmt in _MEMORY_FORMATS.items()
                 if tensor.dim() == _MEMORY_FORMAT_DIMS[name]
                 and tensor.stride() == like(memory_format=fmt).stride()), None)


#: A tensor of at least this many bytes is stored as a record of its own: it is not copied at
#: save, and the record's headers (about 200 bytes) are under 0.02 % of it.
_OWN_RECORD_BYTES = 2**20


class _Blobs:
    """The tensors of a model being saved, each once: the packed codes of every LoweredWeight laid
    end to end in one blob, every other tensor's bytes laid end to end in another (each at the
    next multiple of its element size, so it is read back as a view), and the tensors of 1 MiB or
    more, or without plain bytes, as records of their own ("own"). ``refs`` maps ``id(tensor)``
    to where it is. The blobs are filled when asked for, one tensor at a time.

    The header lists the codes as ``[module, shape, bits, memory format]`` and the blob's other
    tensors as ``[dtype, shape, memory format]``, in the order they are laid out (their offsets
    follow from that), and the state as ``[key, section, index]``.
    """

    def __init__(self) -> None:
        self.tensors: list[list] = []
        self.codes: list[list] = []
        self.own: dict[str, torch.Tensor] = {}
        self.state: list[list] = []
        self.refs: dict[int, tuple[str, int]] = {}
        self._tensor_sources: list[tuple[int, torch.Tensor]] = []  # (offset, tensor)
        self._lowered: list[tuple[LoweredWeight, torch.Tensor]] = []  # (module, its codes)
        self._tensor_end = 0

    @classmethod
    def of_state(cls, int_model: nn.Module) -> "_Blobs":
        """Every state tensor of ``int_model``, with its state_dict key."""
        blobs = cls()
        for name, lowered in _lowered_modules(int_model):
            # Held for the whole save: a PackedWeight unpacks its codes on demand and gives this
            # same tensor (to state_dict and to the structure's pickle) while it lives.
            codes = lowered.codes
            problem = codes_outside_width(codes, lowered.num_bits)
            if problem is not None:
                raise ValueError(f"msq_fx.save: {name or 'the model'}: {problem}, its width; the "
                                 f"width was changed after convert. Convert again from the "
                                 f"prepared model (set widths there, through its controller)")
            blobs.refs[id(codes)] = ("codes", len(blobs.codes))
            blobs.codes.append([name, list(codes.shape), lowered.num_bits,
                                _memory_format(codes)])
            blobs._lowered.append((lowered, codes))
        for key, tensor in int_model.state_dict(keep_vars=True).items():
            blobs.state.append([key, *blobs.add(tensor)])
        return blobs

    def add(self, tensor: torch.Tensor) -> tuple[str, int]:
        """Where ``tensor`` is stored, adding it the first time."""
        found = self.refs.get(id(tensor))
        if found is not None:
            return found
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes >= _OWN_RECORD_BYTES or not _plain_bytes(tensor):
            found = ("own", len(self.own))
            # From the CPU, as every other tensor: a load without map_location reads it there.
            self.own[str(found[1])] = tensor.detach().cpu()
        else:
            found = ("tensors", len(self.tensors))
            start = _aligned(self._tensor_end, tensor.element_size())
            self.tensors.append([str(tensor.dtype).removeprefix("torch."), list(tensor.shape),
                                 _memory_format(tensor)])
            self._tensor_sources.append((start, tensor))
            self._tensor_end = start + nbytes
        self.refs[id(tensor)] = found
        return found

    def tensor_blob(self) -> torch.Tensor:
        blob = torch.zeros(self._tensor_end, dtype=torch.uint8)  # zeros: the alignment gaps
        for start, tensor in self._tensor_sources:
            data = _tensor_bytes(tensor)
            blob[start:start + data.numel()] = data
        return blob

    def code_blob(self) -> torch.Tensor:
        sizes = [packed_size(codes.numel(), m.num_bits) for m, codes in self._lowered]
        blob, start = torch.empty(sum(sizes), dtype=torch.uint8), 0
        for (lowered, codes), size in zip(self._lowered, sizes):
            blob[start:start + size] = pack_codes(codes, lowered.num_bits)
            start += size
        return blob

    def manifest(self) -> dict[str, Any]:
        return {"tensors": self.tensors, "codes": self.codes, "state": self.state}


def _aligned(offset: int, size: int) -> int:
    """The first multiple of ``size`` at or after ``offset``."""
    return -(-offset // size) * size


class _StructurePickler(pickle.Pickler):
    """Pickles a module with each tensor (Parameter, buffer or plain attribute) replaced by a
    persistent reference ``(section, index, is_parameter, requires_grad)`` to where ``blobs``
    stores it, so the pickle holds no tensor data."""

    def __init__(self, file, blobs: _Blobs) -> None:
        super().__init__(file, protocol=4)
        self.blobs = blobs

    def persistent_id(self, obj: Any) -> tuple | None:
        if type(obj) not in (torch.Tensor, nn.Parameter):
            return None  # a tensor subclass pickles as itself
        section, index = self.blobs.add(obj)
        # A tensor computed with gradients (a cache in a plain attribute) comes back detached.
        return section, index, isinstance(obj, nn.Parameter), obj.requires_grad and obj.is_leaf


def _pickled_structure(int_model: nn.Module, blobs: _Blobs) -> bytes:
    buffer = io.BytesIO()
    _StructurePickler(buffer, blobs).dump(int_model)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------ reading

class _Corrupt(Exception):
    """What is wrong with a file's records (raised as MSQFileError with the file's name)."""


def _contents(payload: dict[str, Any], path) -> "_Stored | _PerTensorStored":
    """The tensors, activations, config and structure of a file of FORMAT or PER_TENSOR_FORMAT."""
    return _Stored(payload, path) if payload["format"] == FORMAT else _PerTensorStored(payload)


class _Span(NamedTuple):
    """Where one stored tensor is: bytes [start, start + nbytes) of its blob; ``bits`` for packed
    codes (int8 once unpacked)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    memory_format: torch.memory_format | None
    start: int
    nbytes: int
    bits: int | None = None


class _Stored:
    """A file of the current format, read through its header (which is checked to describe the
    file's blobs exactly before any tensor is read)."""

    def __init__(self, payload: dict[str, Any], path) -> None:
        self.payload = payload
        try:
            for key in ("header", "tensors", "codes"):
                blob = payload[key]
                if not (isinstance(blob, torch.Tensor) and blob.dtype == torch.uint8
                        and blob.dim() == 1):
                    raise _Corrupt(f"its {key!r} record is not a row of bytes")
            if sorted(payload["own"]) != sorted(map(str, range(len(payload["own"])))):
                raise _Corrupt(f"its 'own' records are named {sorted(payload['own'])[:5]}")
            text, _, self.structure = _inflated(payload["header"]).partition(b"\n")
            header = json.loads(text)
            self.tensors = _tensor_spans(header["tensors"], payload["tensors"].numel())
            self.codes = _code_spans(header["codes"], payload["codes"].numel())
            sizes = {"tensors": len(self.tensors), "codes": len(self.codes),
                     "own": len(payload["own"])}
            self.refs = [(key, section, index) for key, section, index in header["state"]]
            for key, section, index in self.refs:
                if not (isinstance(key, str) and type(index) is int
                        and 0 <= index < sizes.get(section, 0)):
                    raise _Corrupt(f"its header refers {key!r} to {section!r} {index!r}")
            self.activations, self.config = header["activations"], header["config"]
            self.structure_absent = header["structure"].get("absent")
            if len(self.structure) != header["structure"].get("bytes", 0):
                raise _Corrupt(f"its header is followed by {len(self.structure):,} bytes of "
                               f"structure, not the {header['structure'].get('bytes', 0):,} it "
                               f"gives")
        except (_Corrupt, KeyError, TypeError, ValueError, AttributeError) as error:
            detail = str(error) if isinstance(error, _Corrupt) else \
                f"its header is not what msq_fx.save writes ({type(error).__name__}: {error})"
            raise MSQFileError(f"{path}: truncated or corrupt: {detail}. Save the model again, or "
                               f"copy the file again from where it was saved.") from None

    def tensor(self, section: str, index: int, own: bool = False) -> torch.Tensor:
        """The stored tensor: a view of the file's bytes, or with ``own`` a tensor of its own
        storage in the memory format it was saved in."""
        if section == "own":
            return self.payload["own"][str(index)]  # read by torch.load: its own storage
        span = (self.codes if section == "codes" else self.tensors)[index]
        blob = self.payload[section][span.start:span.start + span.nbytes]
        if span.bits is not None:
            value = unpack_codes(blob, span.bits, span.shape).to(blob.device)
            own = own and span.memory_format is not None  # unpacked codes own their storage
        else:
            value = blob.view(span.dtype).reshape(span.shape)
        return value.clone(memory_format=span.memory_format or torch.contiguous_format) \
            if own else value

    def state(self) -> dict[str, torch.Tensor]:
        """The saved state_dict (views of the file's bytes; a load copies them)."""
        return {key: self.tensor(section, index) for key, section, index in self.refs}

    def code_bytes(self) -> int:
        return self.payload["codes"].numel()

    def tensor_bytes(self) -> int:
        """The bytes of the stored tensors other than the codes (alignment not counted)."""
        return (sum(span.nbytes for span in self.tensors)
                + sum(t.numel() * t.element_size() for t in self.payload["own"].values()))

    def rebuilt(self, map_location) -> nn.Module:
        """The module unpickled from the structure, each tensor its own copy of the stored one
        (on the device torch.load put the blobs on: ``map_location`` is applied already); a
        tensor referenced from several places stays one object."""
        made: dict[tuple, torch.Tensor] = {}
        # Unpacked codes are held only while something refers to them: a PackedWeight repacks
        # its codes as it is unpickled, and each int8 copy can go before the next is made.
        made_codes: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

        def resolve(ref: tuple) -> torch.Tensor:
            section, index, is_parameter, requires_grad = ref
            found = made_codes if section == "codes" else made
            tensor = found.get(ref)
            if tensor is None:
                base = found.get((section, index))
                if base is None:
                    base = self.tensor(section, index, own=True)
                    found[(section, index)] = base
                tensor = nn.Parameter(base, requires_grad) if is_parameter \
                    else base.requires_grad_(requires_grad)
                found[ref] = tensor
            return tensor

        return _StructureUnpickler(io.BytesIO(self.structure), resolve).load()


class _StructureUnpickler(pickle.Unpickler):
    def __init__(self, file, resolve: Callable[[tuple], torch.Tensor]) -> None:
        super().__init__(file)
        self.resolve = resolve

    def persistent_load(self, pid: Any) -> torch.Tensor:
        return self.resolve(tuple(pid))


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _compressed(data: bytes) -> torch.Tensor:
    """``data`` xz-compressed, without the container's own check (the file's SHA-256 covers it)."""
    return torch.frombuffer(bytearray(lzma.compress(data, check=lzma.CHECK_NONE)),
                            dtype=torch.uint8)


def _inflated(data: torch.Tensor) -> bytes:
    """What ``_compressed`` packed into ``data``, inflating at most _HEADER_LIMIT bytes."""
    decompressor = lzma.LZMADecompressor(memlimit=_HEADER_LIMIT)
    try:
        inflated = decompressor.decompress(data.numpy().tobytes(), _HEADER_LIMIT)
    except lzma.LZMAError as error:
        raise _Corrupt(f"its header does not decompress ({error})") from None
    if not decompressor.eof:
        raise _Corrupt(f"its header is cut short or larger than {_HEADER_LIMIT:,} bytes")
    return inflated


@functools.lru_cache(maxsize=1)
def _dtypes() -> dict[str, torch.dtype]:
    return {str(dtype).removeprefix("torch."): dtype for dtype in vars(torch).values()
            if isinstance(dtype, torch.dtype)}


def _tensor_spans(entries: list, blob_bytes: int) -> list[_Span]:
    """Each ``[dtype, shape, memory format]`` entry's span, at the next multiple of its element
    size after the previous one; the last must end where the blob does."""
    spans, end = [], 0
    for name, shape, fmt in entries:
        dtype = _dtypes().get(name) if isinstance(name, str) else None
        if dtype is None:
            raise _Corrupt(f"its header gives a dtype {name!r}")
        start = _aligned(end, dtype.itemsize)
        end = start + _numel(_checked_shape(shape)) * dtype.itemsize
        spans.append(_Span(dtype, tuple(shape), _checked_format(fmt), start, end - start))
    return _ending_at(spans, end, blob_bytes, "tensors")


def _code_spans(entries: list, blob_bytes: int) -> list[_Span]:
    """Each ``[module, shape, bits, memory format]`` entry's span, right after the previous one;
    the last must end where the blob does."""
    spans, end = [], 0
    for module, shape, bits, fmt in entries:
        if not isinstance(bits, int) or not 1 <= bits <= 8:
            raise _Corrupt(f"its header gives the codes of {module!r} {bits!r} bits")
        nbytes = packed_size(_numel(_checked_shape(shape)), bits)
        spans.append(_Span(torch.int8, tuple(shape), _checked_format(fmt), end, nbytes, bits))
        end += nbytes
    return _ending_at(spans, end, blob_bytes, "packed codes")


def _ending_at(spans: list[_Span], end: int, blob_bytes: int, what: str) -> list[_Span]:
    if end != blob_bytes:
        raise _Corrupt(f"its header lays out {end:,} bytes of {what}, and the file holds "
                       f"{blob_bytes:,}")
    return spans


def _checked_shape(shape: Any) -> list[int]:
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise _Corrupt(f"its header gives a shape {shape!r}")
    return shape


def _checked_format(name: Any) -> torch.memory_format | None:
    if name is not None and name not in _MEMORY_FORMATS:
        raise _Corrupt(f"its header gives a memory format {name!r}")
    return None if name is None else _MEMORY_FORMATS[name]


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], activations: dict[str, Any],
               path) -> nn.Module:
    """Copy the saved state into ``model`` after checking every key and shape matches."""
    require_converted(model, "msq_fx.load(model=...)")
    own = model.state_dict()
    problems = [f"{key}: the file has {tuple(state[key].shape)} {state[key].dtype}, the model "
                f"{tuple(own[key].shape)} {own[key].dtype}"
                for key in own if key in state
                and (state[key].shape != own[key].shape or state[key].dtype != own[key].dtype)]
    problems += [f"missing in the file: {key}" for key in own if key not in state]
    problems += [f"not in the model: {key}" for key in state if key not in own]
    modules = dict(model.named_modules())
    problems += [f"{name}: the file has a quantized activation here, the model does not"
                 for name in activations if not isinstance(modules.get(name), LoweredActivation)]
    problems += _codes_outside_their_width(model, state) if not problems else []
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


def _codes_outside_their_width(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Each quantized weight whose codes in ``state`` do not fit the width ``state`` gives it
    (checked before anything is copied, so a refused load leaves the model as it was)."""
    problems = []
    for name, _ in _lowered_modules(model):
        prefix = f"{name}." if name else ""
        codes, bits = state.get(prefix + "codes"), state.get(prefix + "bits")
        if codes is not None and bits is not None:
            problem = codes_outside_width(codes, int(bits))
            if problem is not None:
                problems.append(f"{prefix}codes: {problem}, the width the file gives them")
    return problems


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
    if fmt not in _READ_FORMATS:
        if isinstance(fmt, str) and fmt.startswith("msq_fx."):
            raise MSQFileError(f"{path}: its format {fmt!r} is none this version of msq_fx reads "
                               f"({', '.join(map(repr, _READ_FORMATS))}): a file of a newer "
                               f"msq_fx (upgrade msq_fx), or a corrupt one (save the model again)")
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
    """SHA-256 of the payload's contents (the keys ``_CHECKED_KEYS`` names for its format), as
    "sha256:<hex>"."""
    digest = hashlib.sha256()
    for key in _CHECKED_KEYS[payload["format"]]:
        _feed(digest, key)
        _feed(digest, payload.get(key))
    return "sha256:" + digest.hexdigest()


def _feed(digest, value: Any, enclosing: frozenset[int] = frozenset()) -> None:
    """Add ``value`` (tensors, dicts, lists, tuples and scalars, nested) to ``digest``; each part
    is preceded by its type and size, so different values never feed the same bytes. A container
    inside itself (which only damage can make) feeds a marker instead of recursing forever."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        if tensor.is_quantized or tensor.layout != torch.strided:  # what it holds, as values
            tensor = tensor.dequantize() if tensor.is_quantized else tensor.to_dense()
        tensor = tensor.resolve_conj().resolve_neg().contiguous()
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
    if stored is not None and (payload["format"] not in _CHECKED_KEYS
                               or stored != _checksum(payload)):
        raise MSQFileError(f"{path}: checksum mismatch: what the file holds is not what "
                           f"msq_fx.save wrote (the SHA-256 of its tensors, codes and plain data "
                           f"differs from the one stored with them): it was damaged on disk or "
                           f"in a copy. Copy it again from where it was saved, or save the model "
                           f"again.")


# ----------------------------------------------------------------------- the earlier formats

class _PerTensorStored:
    """A file of PER_TENSOR_FORMAT: every state tensor a tensor of the payload, each module's
    codes packed on their own, the structure as torch.save bytes of the module with empty
    tensors."""

    def __init__(self, payload: dict[str, Any]) -> None:
        self.payload = payload
        self.activations, self.config = payload["activations"], payload["config"]
        self.structure_absent = (None if payload["structure"] is not None else
                                 "the model could not be pickled when it was saved")

    def state(self) -> dict[str, torch.Tensor]:
        """The state, each module's codes unpacked under ``<module>.codes``."""
        state = dict(self.payload["state"])
        for name, entry in self.payload["codes"].items():
            state[f"{name}.codes"] = unpack_codes(entry["packed"], entry["bits"],
                                                  tuple(entry["shape"]))
        return state

    def code_bytes(self) -> int:
        return sum(entry["packed"].numel() for entry in self.payload["codes"].values())

    def tensor_bytes(self) -> int:
        storages = {(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
                    for t in self.payload["state"].values()}
        return sum(nbytes for _, nbytes in storages)

    def rebuilt(self, map_location) -> nn.Module:
        """The structure filled with the saved state."""
        skeleton = torch.load(io.BytesIO(self.payload["structure"].numpy().tobytes()),
                              map_location=map_location, weights_only=False)
        state = self.state()
        with torch.no_grad():
            # The structure's empty placeholders take the saved tensors in place, so a tensor
            # that several modules share stays one object.
            for key, placeholder in skeleton.state_dict(keep_vars=True).items():
                placeholder.set_(state[key])
        return skeleton


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
    """Raise unless ``model`` is a model returned by ``msq_fx.convert``
    (``caller`` names who asks)."""
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
    interrupted write never leaves a truncated file under ``path``. The file gets the
    permissions of any file the process creates (the umask applies, as for ``open``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
