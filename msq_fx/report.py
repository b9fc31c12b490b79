"""Per-layer report of a prepared or converted model: kinds, bit widths, compression."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from tabulate import tabulate
from torch import nn

from .modules import ActivationFakeQuant, LoweredActivation, LoweredWeight, WeightFakeQuant
from .owners import iter_quantized_weights
from .state import PreparedState, prepared_state

__all__ = ["report", "Report", "LayerRow", "FloatRow"]


@dataclass(frozen=True)
class LayerRow:
    """One quantized tensor. ``name`` is its first FQN; ``shared_with`` lists its
    other (tied) FQNs."""

    name: str
    kind: str
    shape: tuple[int, ...]
    params: int
    bits: int
    prune_step: int | None
    group: str
    prunable: bool
    shared_with: tuple[str, ...] = ()


@dataclass(frozen=True)
class FloatRow:
    """A conv / linear / attention weight left in float, with the reason."""

    name: str
    kind: str
    reason: str


@dataclass
class Report:
    """``layers``: the quantized tensors; ``float_weights``: conv/linear/attention weights left in
    float, with the reason; ``notes``: what prepare() could not check (each note says what may
    have been missed and how to check it)."""

    layers: list[LayerRow]
    float_weights: list[FloatRow] = field(default_factory=list)
    other_float_params: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def quantized_params(self) -> int:
        return sum(row.params for row in self.layers)

    @property
    def quantized_bits(self) -> int:
        return sum(row.bits * row.params for row in self.layers)

    @property
    def average_bits(self) -> float:
        return self.quantized_bits / self.quantized_params if self.layers else 32.0

    @property
    def compression(self) -> float:
        """The paper's convention: 32 * sum(params) / sum(bits * params) over quantized weights."""
        return 32.0 * self.quantized_params / self.quantized_bits if self.layers else 1.0

    @property
    def model_compression(self) -> float:
        """Whole model: every other float tensor (biases, norms, excluded layers) at 32 bits."""
        total = self.quantized_params + self.other_float_params
        stored = self.quantized_bits + 32 * self.other_float_params
        return 32.0 * total / stored if stored else 1.0

    def table(self, tablefmt: str = "simple") -> str:
        rows = [(r.name, r.kind, "x".join(map(str, r.shape)), r.params, r.bits,
                 "-" if r.prune_step is None else r.prune_step,
                 r.group if r.group != r.name else "", ", ".join(r.shared_with))
                for r in self.layers]
        text = tabulate(rows, headers=["name", "kind", "shape", "params", "bits", "p", "group",
                                       "tied"], tablefmt=tablefmt)
        summary = (f"quantized weights: {len(self.layers)} ({self.quantized_params:,} params), "
                   f"average {self.average_bits:.2f} bits, compression {self.compression:.2f}x "
                   f"(whole model {self.model_compression:.2f}x)")
        parts = [text, summary]
        if self.float_weights:
            parts.append("left in float:\n" + tabulate(
                [(f.name, f.kind, f.reason) for f in self.float_weights],
                headers=["name", "kind", "reason"], tablefmt=tablefmt))
        parts.extend(f"note: {note}" for note in self.notes)
        return "\n".join(parts)

    def to_dict(self) -> dict:
        return {"layers": [asdict(r) for r in self.layers],
                "float_weights": [asdict(f) for f in self.float_weights],
                "notes": list(self.notes),
                "compression": self.compression, "model_compression": self.model_compression,
                "average_bits": self.average_bits}

    def __str__(self) -> str:
        return self.table()


def report(model: nn.Module) -> Report:
    """Report every quantized weight of a prepared or converted model, and the float leftovers.

    Args:
        model: a model returned by ``msq_fx.prepare`` or ``msq_fx.convert``.

    Returns:
        A :class:`Report`: one ``LayerRow`` per quantized tensor (tied uses once), the weights
        left in float with the reason, what prepare could not check, and the compression.
        ``str()`` of it is the table.

    Example:
        >>> import torch, msq_fx
        >>> from torch import nn
        >>> qmodel = msq_fx.prepare(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
        >>> print(msq_fx.report(qmodel))
        name      kind    shape      params    bits    p  group    tied
        --------  ------  -------  --------  ------  ---  -------  ------
        0.weight  linear  8x4            32       8    1
        2.weight  linear  2x8            16       8    1
        quantized weights: 2 (48 params), average 8.00 bits, compression 4.00x (whole model 2.64x)
    """
    layers, quantized_tensors = [], set()
    for qw in iter_quantized_weights(model):
        quantizer = qw.quantizer
        if qw.latent is not None:
            quantized_tensors.add(id(qw.latent))
        shape = tuple((qw.latent if qw.latent is not None else quantizer.codes).shape)
        is_training = isinstance(quantizer, WeightFakeQuant)
        layers.append(LayerRow(
            name=quantizer.names[0], kind=quantizer.kind, shape=shape,
            params=_numel(shape), bits=quantizer.num_bits,
            prune_step=int(quantizer.prune_step) if is_training else None,
            group=quantizer.group, prunable=getattr(quantizer, "prunable", False),
            shared_with=quantizer.names[1:]))
    state = prepared_state(model) or PreparedState()
    floats = [FloatRow(f.name, f.kind, f.reason) for f in state.float_weights]
    return Report(layers, floats, _other_float_params(model, quantized_tensors), list(state.notes))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _other_float_params(model: nn.Module, quantized_tensors: set[int]) -> int:
    internal = (WeightFakeQuant, LoweredWeight, ActivationFakeQuant, LoweredActivation)
    skip = {id(t) for m in model.modules() if isinstance(m, internal)
            for t in list(m.parameters()) + list(m.buffers())}
    skip |= quantized_tensors
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())
               if t.is_floating_point() and id(t) not in skip}
    return sum(t.numel() for t in tensors.values())
