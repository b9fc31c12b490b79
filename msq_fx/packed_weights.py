"""Converted weights held bit-packed in memory, dequantized where they are used.

A ``LoweredWeight`` keeps its codes in an int8 container whatever their width, so a converted
model at 4 bits holds a quarter of its float weights' bytes, not an eighth. A
:class:`PackedWeight` keeps the same codes in the smallest container of 1, 2, 4 or 8 bits that
holds them (3 bits in 4, 5 to 7 in 8): 8 / container codes per byte. Its ``forward`` unpacks them
and rebuilds the float weight with the operations ``LoweredWeight`` uses, so every weight, and
every output of the model, is the same bits as the ``LoweredWeight`` model's (and so as the
fake-quant model's). ``convert(qmodel, kernels="packed")`` builds them; :func:`use_kernels`
switches a converted model either way in place.

Why not PyTorch's packed weight-only kernels: with float32 activations
``torch.ops.aten._weight_int8pack_mm`` and ``_weight_int4pack_mm_for_cpu`` (torch 2.14) take
10.7-72.5x the time of ``F.linear`` on a float weight, and 1.8-65x that of dequantizing the codes
and calling ``F.linear`` (vit_b_16's MLP, 1 or 197 tokens, on the CPU measured:
docs/benchmarks.md, "Converted-model inference"); they are faster only with bfloat16 activations
and one token, where the outputs move by about 2e-2; and they round differently from a float
matmul, so the outputs would no longer equal the fake-quant model's.

Layout: the codes are taken in the order of their storage (so a channels_last conv weight
comes back channels_last), as two's-complement values of the container width, and cut into
``8 / width`` equal slices; byte j holds element j of every slice, slice i in bits
``[i * width, (i + 1) * width)``. Unpacking a slice is one shift left and one arithmetic shift
right of the whole byte tensor, written straight into its part of the result.

``state_dict`` keeps the ``LoweredWeight`` keys (``codes`` as int8, ``step``, ``offset``,
``bits``), so a file written by ``msq_fx.save`` does not depend on the kernels, and loads into a
model converted either way. A module can also keep its float weight once computed
(``keep_float``): the speed of a float layer, at the memory of one.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Iterable, Iterator

import torch
from torch import Tensor, nn

from .modules import KINDS, LoweredWeight
from .packing import codes_outside_width
from .weight_cache import CachesItsWeight, WeightCache, from_cache, serves_from_cache

__all__ = ["PackedWeight", "KERNELS", "CONTAINERS", "container_bits", "use_kernels",
           "dequantizing_kernels", "check_kernels", "pack_codes_in_memory",
           "unpack_codes_in_memory"]

#: The ``kernels`` a converted model can run with: ``"dequantize"`` (``LoweredWeight``, int8
#: containers) or ``"packed"`` (``PackedWeight``).
KERNELS = ("dequantize", "packed")
#: The container widths a PackedWeight holds its codes in.
CONTAINERS = (1, 2, 4, 8)


def container_bits(bits: int) -> int:
    """The smallest container width that holds ``bits``-bit codes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    return next(width for width in CONTAINERS if width >= bits)


def pack_codes_in_memory(codes: Tensor, width: int) -> Tensor:
    """Signed codes (any shape, int8, each within ``width`` bits) as flat int8 bytes of
    ``width``-bit fields: ``8 / width`` equal slices of the codes, slice i in bits
    ``[i * width, (i + 1) * width)`` of every byte (the last slice padded with zeros)."""
    flat = codes.detach().reshape(-1).to(torch.int8)
    if width == 8:
        return flat.clone()
    per_byte = 8 // width
    length = -(-flat.numel() // per_byte)
    fields = torch.zeros(per_byte * length, dtype=torch.uint8, device=flat.device)
    fields[:flat.numel()] = flat.view(torch.uint8)
    fields = fields.reshape(per_byte, length).bitwise_and_(2**width - 1)
    packed = fields[0].clone()
    for index in range(1, per_byte):
        packed.bitwise_or_(fields[index].bitwise_left_shift(width * index))
    return packed.view(torch.int8)


def unpack_codes_in_memory(packed: Tensor, width: int, numel: int) -> Tensor:
    """Inverse of :func:`pack_codes_in_memory`: the first ``numel`` codes, flat int8."""
    if width == 8:
        return packed[:numel]
    per_byte, length = 8 // width, packed.numel()
    if torch.compiler.is_compiling():
        # The same values, without out= (torch.export and torch.compile trace this).
        slices = [(packed << (8 - width * (index + 1))) >> (8 - width)
                  for index in range(per_byte)]
        return torch.cat(slices)[:numel]
    codes = torch.empty(per_byte * length, dtype=torch.int8, device=packed.device)
    for index in range(per_byte):
        part = codes[index * length:(index + 1) * length]
        left = 8 - width * (index + 1)
        if left:
            torch.bitwise_left_shift(packed, left, out=part)
            part.bitwise_right_shift_(8 - width)
        else:
            torch.bitwise_right_shift(packed, 8 - width, out=part)
    return codes[:numel]


def _storage_order(tensor: Tensor) -> tuple[int, ...] | None:
    """The permutation of ``tensor``'s dimensions that lists them outermost first in memory
    (a channels_last conv weight: 0, 2, 3, 1), or None when its elements do not fill their
    storage densely. Dimensions of size 1, whose strides say nothing, keep their places."""
    sized = sorted((d for d in range(tensor.dim()) if tensor.shape[d] > 1),
                   key=lambda d: -tensor.stride(d))
    expected = 1
    for d in reversed(sized):
        if tensor.stride(d) != expected:
            return None
        expected *= tensor.shape[d]
    outer_first = iter(sized)
    return tuple(d if tensor.shape[d] == 1 else next(outer_first) for d in range(tensor.dim()))


def _inverse(order: tuple[int, ...]) -> tuple[int, ...]:
    inverse = [0] * len(order)
    for position, dim in enumerate(order):
        inverse[dim] = position
    return tuple(inverse)


def _check_codes(codes: Tensor, bits: int, where: str) -> None:
    if codes.dtype != torch.int8:
        raise ValueError(f"{where}: codes must be int8, got {codes.dtype}")
    if codes.numel():
        low, high = (int(v) for v in torch.aminmax(codes))
        if low < -(2 ** (bits - 1)) or high >= 2 ** (bits - 1):
            raise ValueError(f"{where}: codes in [{low}, {high}] do not fit {bits}-bit two's "
                             f"complement [{-(2 ** (bits - 1))}, {2 ** (bits - 1) - 1}]")


class PackedWeight(LoweredWeight):
    """A converted weight whose codes are held bit-packed (see the module docstring).

    Buffers: ``packed`` (int8 bytes of ``container``-bit fields, not in the ``state_dict``),
    ``step``, ``offset``, ``bits`` (as ``LoweredWeight``'s). ``codes`` gives the int8 codes
    (unpacked on demand, a copy: changing it changes nothing; assigning it repacks).
    ``keep_float``: the float weight is computed at the first forward and kept (outside
    autograd, ``torch.compile`` and ``torch.export``, which compute it from the codes).
    """

    def __init__(self, codes: Tensor, step: Tensor, offset: float | Tensor, bits: int, kind: str,
                 names: tuple[str, ...], keep_float: bool = False) -> None:
        CachesItsWeight.__init__(self)
        self.register_buffer("step", step.detach().clone())
        self.register_buffer("offset", torch.as_tensor(offset, dtype=step.dtype).detach().clone())
        self.register_buffer("bits", torch.tensor(int(bits), dtype=torch.int64))
        self.kind = kind
        self.names = tuple(names)
        self.group = self.names[0]
        self.keep_float = bool(keep_float)
        self.cache: WeightCache | None = WeightCache(None, None) if keep_float else None
        self._store(codes.detach(), int(bits), float(self.offset) != 0.0)

    @classmethod
    def from_lowered(cls, lowered: LoweredWeight, keep_float: bool = False) -> "PackedWeight":
        packed = cls(lowered.codes, lowered.step, lowered.offset, lowered.num_bits,
                     lowered.kind, lowered.names, keep_float)
        packed.group = lowered.group
        return packed

    def to_lowered(self) -> LoweredWeight:
        """The same weight as a ``LoweredWeight`` (int8 codes)."""
        lowered = LoweredWeight(self._unpacked_codes(), self.step, float(self.offset),
                                self.num_bits, self.kind, self.names)
        lowered.group = self.group
        return lowered

    def _store(self, codes: Tensor, bits: int, offset_added: bool) -> None:
        """Pack ``codes`` (int8, the weight's shape and strides) into the ``packed`` buffer."""
        _check_codes(codes, bits, self.names[0])
        order = _storage_order(codes)
        if order is None:
            codes, order = codes.contiguous(), tuple(range(codes.dim()))
        self.shape, self.order = tuple(codes.shape), order
        # The int8 model's weight has these strides (a view in storage order may differ from
        # them in dimensions of size 1, whose strides some kernels still read).
        self.strides = tuple(codes.stride())
        self.container = container_bits(bits)
        # The nested grid's offset is 0.0, and codes + 0.0 are the codes: that pass is skipped.
        self.offset_added = offset_added
        in_storage_order = codes.permute(self.order)
        self.register_buffer("packed", pack_codes_in_memory(in_storage_order, self.container),
                             persistent=False)
        self._codes_view, self._codes_key = None, None
        if self.cache is not None:
            self.cache = WeightCache(None, None)

    @property
    def codes(self) -> Tensor:
        # One tensor while any reference to it lives, so a save that holds it (and finds the
        # tensors it writes by identity) sees one object, not one per read.
        key = (self.packed.data_ptr(), self.packed._version, self.container)
        codes = self._codes_view() if self._codes_view is not None else None
        if codes is None or self._codes_key != key:
            codes = self._unpacked_codes()
            self._codes_view, self._codes_key = weakref.ref(codes), key
        return codes

    @codes.setter
    def codes(self, codes: Tensor) -> None:
        self._store(codes.to(torch.int8), self.num_bits, self.offset_added)

    def _unpacked_codes(self) -> Tensor:
        flat = unpack_codes_in_memory(self.packed, self.container, _numel(self.shape)).clone()
        return self._shaped(flat)

    def _shaped(self, flat: Tensor) -> Tensor:
        """The weight's shape and strides on ``flat``, its elements in storage order."""
        shaped = flat.view([self.shape[d] for d in self.order]).permute(_inverse(self.order))
        if shaped.stride() != self.strides:
            shaped = shaped.as_strided(self.shape, self.strides)
        return shaped

    def forward(self, _latent: Tensor | None = None) -> Tensor:
        if serves_from_cache(self):
            return from_cache(self, (self.packed, self.step, self.offset), (), self._dequantized)
        return self._dequantized()

    def _dequantized(self) -> Tensor:
        codes = unpack_codes_in_memory(self.packed, self.container, _numel(self.shape))
        weight = codes.to(self.step.dtype)
        if self.offset_added:
            weight.add_(self.offset)
        return self._shaped(weight).mul_(self.step)

    # ------------------------------------------------------------------ state_dict and pickle

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        codes = self.codes
        destination[prefix + "codes"] = codes if keep_vars else codes.detach()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        key = prefix + "codes"
        codes = state_dict.get(key)
        bits = state_dict.get(prefix + "bits")
        problem = None if codes is None or bits is None else codes_outside_width(codes, int(bits))
        if problem is not None:
            # Refused before anything is copied: the module keeps its width, step and codes.
            error_msgs.append(f"{key}: {problem}, the width loaded with them")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if key in unexpected_keys:
            unexpected_keys.remove(key)
        if codes is None:
            missing_keys.append(key)
            return
        if tuple(codes.shape) != self.shape or codes.dtype != torch.int8:
            error_msgs.append(f"size mismatch for {key}: copying codes of shape "
                              f"{tuple(codes.shape)} {codes.dtype}, the model has {self.shape} "
                              f"torch.int8.")
            return
        # The width loaded with them decides the container (a skeleton starts at init_bits).
        try:
            with torch.no_grad():
                self._store(codes.detach().to(self.step.device), self.num_bits,
                            float(self.offset) != 0.0)
        except ValueError as error:
            error_msgs.append(f"{key}: {error}")

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_buffers"] = {name: value for name, value in state["_buffers"].items()
                             if name != "packed"}
        state["_codes_view"] = None
        state["_msq_codes"] = self.codes
        return state

    def __setstate__(self, state: dict) -> None:
        codes = state.pop("_msq_codes")
        super().__setstate__(state)
        self.cache = WeightCache(None, None) if self.keep_float else None
        self._store(codes, int(self.bits), self.offset_added)

    def extra_repr(self) -> str:
        kept = ", float kept" if self.keep_float else ""
        return (f"bits={self.num_bits}, shape={self.shape}, kind={self.kind}, "
                f"container={self.container}{kept}")


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def check_kernels(kernels: str, keep_float: bool | Iterable[str]) -> frozenset[str]:
    """The kinds whose float weight is kept, after checking the arguments."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    kinds = frozenset(KINDS if keep_float is True else () if keep_float is False
                      else keep_float)
    unknown = sorted(kinds - set(KINDS))
    if unknown:
        raise ValueError(f"keep_float names unknown kinds {unknown}; the kinds are {KINDS} "
                         f"(or True for all, False for none)")
    if kinds and kernels != "packed":
        raise ValueError("keep_float applies to kernels='packed' (a LoweredWeight keeps its "
                         "float weight inside msq_fx.weight_cache.cached_quantized_weights)")
    return kinds


def use_kernels(int_model: nn.Module, kernels: str = "packed",
                keep_float: bool | Iterable[str] = False) -> nn.Module:
    """Switch every quantized weight of a converted model to ``kernels``, in place.

    Args:
        int_model: a model returned by ``msq_fx.convert`` (or loaded by ``msq_fx.load``).
        kernels: ``"packed"`` (each weight a :class:`PackedWeight`) or ``"dequantize"`` (each
            a ``LoweredWeight``). The outputs are the same bits either way.
        keep_float: with ``"packed"``, the kinds of weight (``"conv"``, ``"depthwise"``,
            ``"linear"``, ``"attention"``; True for all) whose float weight is kept once
            computed: faster, for a float copy of those weights.

    Returns:
        ``int_model``. Tied weights stay one module.
    """
    kinds = check_kernels(kernels, keep_float)
    replaced: dict[int, LoweredWeight] = {}

    def switched(module: LoweredWeight) -> LoweredWeight:
        if kernels == "dequantize":
            return module.to_lowered() if isinstance(module, PackedWeight) else module
        keep = module.kind in kinds
        if isinstance(module, PackedWeight) and module.keep_float == keep:
            return module
        source = module.to_lowered() if isinstance(module, PackedWeight) else module
        return PackedWeight.from_lowered(source, keep_float=keep)

    for parent in int_model.modules():
        for name, child in parent._modules.items():
            if isinstance(child, LoweredWeight):
                if id(child) not in replaced:
                    replaced[id(child)] = switched(child)
                parent._modules[name] = replaced[id(child)]
    return int_model


@contextlib.contextmanager
def dequantizing_kernels(int_model: nn.Module) -> Iterator[nn.Module]:
    """Inside, every PackedWeight of ``int_model`` is replaced by its ``LoweredWeight`` (for
    exporters that read the int8 ``codes`` buffer); the same modules are put back after."""
    swapped: list[tuple[nn.Module, str, PackedWeight]] = []
    lowered: dict[int, LoweredWeight] = {}
    try:
        for parent in int_model.modules():
            for name, child in list(parent._modules.items()):
                if isinstance(child, PackedWeight):
                    if id(child) not in lowered:
                        lowered[id(child)] = child.to_lowered()
                    parent._modules[name] = lowered[id(child)]
                    swapped.append((parent, name, child))
        yield int_model
    finally:
        for parent, name, child in swapped:
            parent._modules[name] = child
