"""The rows of the fidelity table: what each run quantizes, and how its model is built.

Every row starts from the same float ResNet-20 weights and is fine-tuned with the same data,
schedule and budget (``msq_fx.fidelity.run``); only the quantization differs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import MSQConfig, MSQController, prepare
from ..allocation import allocate_bits_once
from ..models import resnet20

__all__ = ["RowSpec", "ROWS", "Target", "TARGETS", "BEST_QUANTIZATION", "build_row", "BuiltRow",
           "result_stem", "row_config"]

#: The quantizer every msq_fx row uses: the nested grid (exact prunes); the scale mode is a
#: setting of the run (``Settings.scale``), the same for every row.
BEST_QUANTIZATION = {"grid": "nested"}

#: Algorithm 1 at fine-tuning pace: a prune every PRUNE_STEPS optimizer steps, with the BN
#: statistics re-estimated after each, and the LSB penalty in weight units (the code-unit
#: penalty stalls around 5 bits at a fine-tuning learning rate), so the target is reached
#: early in the budget and most of it is plain QAT; each pruned layer's scale re-fitted at its
#: new width (kept, an 8-bit clip is far too wide at 2-3 bits: 2.4 points lost on the proxy).
#: docs/fidelity.md, "Development runs".
PRUNE_STEPS = 25
MSQ_PRUNING = {"interval": PRUNE_STEPS, "interval_unit": "step", "bn_recalibration_batches": 4,
               "reg_strength": 1e-2, "penalty_units": "weight", "threshold": 0.3,
               "scale_after_prune": "refit"}
#: The Hessian of every prune: Hutchinson over 2 batches, the library's probe limits.
ROW_HESSIAN = {"batches": 2}
#: At least 16 probes: with the library's 4 to 32, stopping once the total trace settles, a
#: layer's own trace is often estimated below zero (at step 50 in four of the six 18x runs),
#: which makes it the cheapest layer to drop.
SIXTEEN_PROBES = {"min_samples": 16}
#: Each layer's trace read as its Hutchinson mean plus two standard errors, so noise alone
#: cannot make a layer the cheapest drop.
TRACE_MARGIN = {"trace_margin": 2.0}
#: The Fisher information's trace in place of the Hessian's (msq_fx.fisher): never negative, each
#: layer's estimate free of the other layers' noise.
FISHER = {"curvature": "fisher"}
#: Past 16x a mixed-precision result needs layers under 2 bits: binary (+-S) 1-bit layers, as
#: the symmetric literal grid gives.
BELOW_TWO_BITS = {"min_bits": 1, "grid": "literal"}
#: Binary layers passing the gradient to every latent, not only to those inside the clip.
BINARY_GRADIENT_EVERY_WEIGHT = {**BELOW_TWO_BITS, "binary_gradient": "every_weight"}
#: Binary layers' latents stepped three times as far (the rate that took uniform 2-bit QAT down
#: a point, docs/fidelity.md "A larger learning rate", given to the binary layers alone).
BINARY_GAIN_3 = {**BELOW_TWO_BITS, "binary_gradient_gain": 3.0}
#: And a third as far, the other side of 1.
BINARY_GAIN_THIRD = {**BELOW_TWO_BITS, "binary_gradient_gain": 1 / 3}
#: Variants measured against the rows above (docs/fidelity.md, "What the table shows").
FROM_4_BITS = {"init_bits": 4}
FROM_3_BITS = {"init_bits": 3}
FROM_2_BITS = {"init_bits": 2}
FROM_5_BITS = {"init_bits": 5}
OMEGA_ORDER = {"drop_order": "omega"}
CHEAPEST_FINISH = {"drop_order": "omega", "last_prune": "cheapest"}
#: The prune that reaches the target chosen by trying each drop (msq_fx.finish).
MEASURED_FINISH = {"drop_order": "omega", "last_prune": "measured"}
#: Omega with the average trace for every decision: p, the drop order and the last prune.
AVERAGE_TRACE = {"omega_scale": "per_weight", "drop_order": "omega", "last_prune": "cheapest"}
PER_WEIGHT_OMEGA = {"omega_scale": "per_weight"}
#: No LSB penalty: alpha 1, so a prune drops p LSBs from every layer, non-zero or not (the
#: penalty's pull on the weights is what the long road loses accuracy to at 10.67x).
NO_PENALTY = {"reg_strength": 0.0, "threshold": 1.0}
#: The penalty only on the groups the prune that reaches the target will take.
PLANNED_PENALTY = {**CHEAPEST_FINISH, "penalty_scope": "planned"}


@dataclass(frozen=True)
class RowSpec:
    """One run: ``method`` is "uniform", "msq", "oneshot" (one-shot Hessian allocation then
    QAT), "brevitas" (the peer's uniform weight-only QAT) or "float" (no quantization: what the
    fine-tuning budget alone does to the float start)."""

    name: str
    method: str
    description: str
    bits: int | None = None
    target: float | None = None
    quantization: dict[str, Any] = field(default_factory=dict)
    pruning: dict[str, Any] = field(default_factory=dict)
    hessian: dict[str, Any] = field(default_factory=dict)


def _uniform(bits: int, grid: str = "nested") -> RowSpec:
    suffix, what = ("", "") if grid == "nested" else (f"-{grid}", f", {grid} grid")
    return RowSpec(f"uniform-{bits}bit{suffix}", "uniform",
                   f"uniform {bits}-bit QAT (msq_fx, no pruning{what})", bits=bits,
                   target=32 / bits, quantization={} if grid == "nested" else {"grid": grid})


def _msq(name: str, target: float, description: str, **changes: dict) -> RowSpec:
    return RowSpec(name, "msq", description, target=target,
                   quantization=changes.get("quantization", {}),
                   pruning={**MSQ_PRUNING, **changes.get("pruning", {})},
                   hessian=changes.get("hessian", {}))


def _first_last_at(bits: int) -> dict[str, Any]:
    """The first conv and the fc layer (1,072 of ResNet-20's 268,336 weights) held at ``bits``,
    never pruned (measured: no row moved past seed noise; docs/fidelity.md)."""
    return {"first_last": "fixed", "first_last_bits": bits}


def _first_last_held(label: str, target: float, bits: int) -> RowSpec:
    """MSQ as ``MSQConfig.fine_tuning`` runs it past 16x, the first conv and fc held at ``bits``."""
    return _msq(f"msq-{label}-from-3bit-first-last-{bits}bit", target,
                f"MSQ, target {label}, from 3 bits, the first conv and fc held at {bits} bits, "
                f"the last prune by Omega growth closed by the cheapest drop (min_bits 1, "
                f"literal grid)",
                quantization={**BELOW_TWO_BITS, **FROM_3_BITS, **_first_last_at(bits)},
                pruning=CHEAPEST_FINISH)


ROWS: dict[str, RowSpec] = {row.name: row for row in [
    _uniform(4), _uniform(3), _uniform(2), _uniform(2, "literal"),
    RowSpec("uniform-2bit-first-last-8bit", "uniform", "uniform 2-bit QAT, the first conv and "
            "fc held at 8 bits (under 16x: a reference for the rows that hold them)", bits=2,
            target=16.0, quantization=_first_last_at(8)),
    _msq("msq-8x", 8.0, "MSQ, target 8x"),
    _msq("msq-8x-from-5bit-omega-order", 8.0, "MSQ, target 8x, from 5 bits, the last prune "
         "by Omega growth", quantization=FROM_5_BITS, pruning=OMEGA_ORDER),
    _msq("msq-8x-from-5bit-planned-penalty", 8.0, "MSQ, target 8x, from 5 bits, the last "
         "prune by Omega growth closed by the cheapest drop, the LSB penalty only on the groups "
         "it will take (MSQConfig.fine_tuning(8))", quantization=FROM_5_BITS,
         pruning=PLANNED_PENALTY),
    _msq("msq-8x-average-trace", 8.0, "MSQ, target 8x, Omega by the average trace for p, the "
         "drop order and the last prune (omega_scale per_weight, drop_order omega, last_prune "
         "cheapest)", pruning=AVERAGE_TRACE),
    _msq("msq-10.67x", 32 / 3, "MSQ, target 10.67x"),
    _msq("msq-10.67x-average-trace", 32 / 3, "MSQ, target 10.67x, Omega by the average trace "
         "for p, the drop order and the last prune", pruning=AVERAGE_TRACE),
    _msq("msq-10.67x-no-penalty", 32 / 3, "MSQ, target 10.67x, no LSB penalty (reg_strength "
         "0; alpha 1, so every prune drops p LSBs from every layer, non-zero or not)",
         pruning=NO_PENALTY),
    _msq("msq-10.67x-omega-order", 32 / 3, "MSQ, target 10.67x, the last prune's groups in "
         "ascending Omega growth per bit (drop_order omega)", pruning=OMEGA_ORDER),
    _msq("msq-10.67x-from-4bit", 32 / 3, "MSQ, target 10.67x, from 4 bits (init_bits 4)",
         quantization=FROM_4_BITS),
    _msq("msq-10.67x-from-4bit-omega-order", 32 / 3, "MSQ, target 10.67x, from 4 bits, the "
         "last prune by Omega growth", quantization=FROM_4_BITS,
         pruning=OMEGA_ORDER),
    _msq("msq-10.67x-from-4bit-cheapest-finish", 32 / 3, "MSQ, target 10.67x, from 4 bits, "
         "the last prune by Omega growth, closing the gap with the cheapest single drop",
         quantization=FROM_4_BITS, pruning=CHEAPEST_FINISH),
    _msq("msq-10.67x-from-4bit-no-penalty", 32 / 3, "MSQ, target 10.67x, from 4 bits, the "
         "last prune by Omega growth closed by the cheapest drop, no LSB penalty",
         quantization=FROM_4_BITS, pruning={**CHEAPEST_FINISH, **NO_PENALTY}),
    _msq("msq-10.67x-from-4bit-planned-penalty", 32 / 3, "MSQ, target 10.67x, from 4 bits, "
         "the last prune by Omega growth closed by the cheapest drop, the LSB penalty only on "
         "the groups it will take (penalty_scope planned)", quantization=FROM_4_BITS,
         pruning=PLANNED_PENALTY),
    _msq("msq-10.67x-per-weight", 32 / 3, "MSQ, target 10.67x, p chosen on Omega per weight "
         "(omega_scale per_weight)", pruning=PER_WEIGHT_OMEGA),
    _msq("msq-16x", 16.0, "MSQ, target 16x (min_bits 1, literal grid: binary 1-bit layers)",
         quantization=BELOW_TWO_BITS),
    _msq("msq-16x-per-weight", 16.0, "MSQ, target 16x, p chosen on Omega per weight (min_bits "
         "1, literal grid)", quantization=BELOW_TWO_BITS, pruning=PER_WEIGHT_OMEGA),
    _msq("msq-16x-omega-order", 16.0, "MSQ, target 16x, the last prune by Omega growth "
         "(min_bits 1, literal grid)", quantization=BELOW_TWO_BITS,
         pruning=OMEGA_ORDER),
    _msq("msq-16x-from-4bit-omega-order", 16.0, "MSQ, target 16x, from 4 bits, the last "
         "prune by Omega growth (min_bits 1, literal grid)",
         quantization={**BELOW_TWO_BITS, **FROM_4_BITS}, pruning=OMEGA_ORDER),
    _msq("msq-16x-from-3bit-omega-order", 16.0, "MSQ, target 16x, from 3 bits, the last "
         "prune by Omega growth (min_bits 1, literal grid)",
         quantization={**BELOW_TWO_BITS, **FROM_3_BITS}, pruning=OMEGA_ORDER),
    _msq("msq-16x-from-3bit-cheapest-finish", 16.0, "MSQ, target 16x, from 3 bits, the last "
         "prune by Omega growth, closing the gap with the cheapest single drop (last_prune "
         "cheapest; min_bits 1, literal grid)",
         quantization={**BELOW_TWO_BITS, **FROM_3_BITS}, pruning=CHEAPEST_FINISH),
    _msq("msq-18x-from-3bit-cheapest-finish", 18.0, "MSQ, target 18x, from 3 bits, the last "
         "prune by Omega growth, closing the gap with the cheapest single drop (min_bits 1, "
         "literal grid)", quantization={**BELOW_TWO_BITS, **FROM_3_BITS}, pruning=CHEAPEST_FINISH),
    _msq("msq-18x-from-3bit-sixteen-probes", 18.0, "MSQ, target 18x, from 3 bits, the last "
         "prune by Omega growth closed by the cheapest drop, each trace from at least 16 "
         "Hutchinson probes (min_bits 1, literal grid)",
         quantization={**BELOW_TWO_BITS, **FROM_3_BITS}, pruning=CHEAPEST_FINISH,
         hessian=SIXTEEN_PROBES),
    _msq("msq-16x-from-3bit-trace-margin", 16.0, "MSQ, target 16x, from 3 bits, the last "
         "prune by Omega growth closed by the cheapest drop, each trace read as its mean plus "
         "two standard errors (hessian.trace_margin 2; min_bits 1, literal grid)",
         quantization={**BELOW_TWO_BITS, **FROM_3_BITS}, pruning=CHEAPEST_FINISH,
         hessian=TRACE_MARGIN),
    _msq("msq-16x-from-3bit-fisher", 16.0, "MSQ, target 16x, from 3 bits, the last prune by "
         "Omega growth closed by the cheapest drop, Omega on the Fisher information's trace "
         "(hessian.curvature fisher; min_bits 1, literal grid)",
         quantization={**BELOW_TWO_BITS, **FROM_3_BITS}, pruning=CHEAPEST_FINISH, hessian=FISHER),
    _msq("msq-18x-from-3bit-fisher", 18.0, "MSQ, target 18x, from 3 bits, the last prune by "
         "Omega growth closed by the cheapest drop, Omega on the Fisher information's trace "
         "(hessian.curvature fisher; min_bits 1, literal grid)",
         quantization={**BELOW_TWO_BITS, **FROM_3_BITS}, pruning=CHEAPEST_FINISH, hessian=FISHER),
    _msq("msq-16x-from-3bit-measured-finish", 16.0, "MSQ, target 16x, from 3 bits, the prune "
         "that reaches the target by the measured loss of each drop, any layer (last_prune "
         "measured; min_bits 1, literal grid)",
         quantization={**BELOW_TWO_BITS, **FROM_3_BITS}, pruning=MEASURED_FINISH),
    _msq("msq-18x-from-3bit-measured-finish", 18.0, "MSQ, target 18x, from 3 bits, the prune "
         "that reaches the target by the measured loss of each drop, any layer (last_prune "
         "measured; min_bits 1, literal grid)",
         quantization={**BELOW_TWO_BITS, **FROM_3_BITS}, pruning=MEASURED_FINISH),
    _first_last_held("18x", 18.0, 8), _first_last_held("16x", 16.0, 4),
    _first_last_held("16x", 16.0, 8),
    _msq("msq-17x-from-3bit-no-penalty", 17.0, "MSQ, target 17x, from 3 bits, the last "
         "prune by Omega growth closed by the cheapest drop, no LSB penalty (min_bits 1, "
         "literal grid)", quantization={**BELOW_TWO_BITS, **FROM_3_BITS},
         pruning={**CHEAPEST_FINISH, **NO_PENALTY}),
    _msq("msq-16x-from-3bit-planned-penalty", 16.0, "MSQ, target 16x, from 3 bits, the last "
         "prune by Omega growth closed by the cheapest drop, the LSB penalty only on the groups "
         "it will take (min_bits 1, literal grid)",
         quantization={**BELOW_TWO_BITS, **FROM_3_BITS}, pruning=PLANNED_PENALTY),
    _msq("msq-16x-from-3bit-two-bit-floor", 16.0, "MSQ, target 16x, from 3 bits on the nested "
         "grid with a 2-bit floor (min_bits 2), the last prune by Omega growth closed by the "
         "cheapest drop", quantization=FROM_3_BITS, pruning=CHEAPEST_FINISH),
    _msq("msq-16x-from-3bit-two-bit-floor-no-penalty", 16.0, "MSQ, target 16x, from 3 bits on "
         "the nested grid with a 2-bit floor and no LSB penalty: the first prune drops every "
         "layer's third bit (uniform 2-bit widths, reached by MSQ's prune: scales re-fitted, BN "
         "re-estimated)", quantization=FROM_3_BITS, pruning={**CHEAPEST_FINISH, **NO_PENALTY}),
    _msq("msq-18x-from-3bit-binary-gradient", 18.0, "MSQ, target 18x, from 3 bits, the last "
         "prune by Omega growth closed by the cheapest drop; binary layers pass the gradient to "
         "every latent (min_bits 1, literal grid)",
         quantization={**BINARY_GRADIENT_EVERY_WEIGHT, **FROM_3_BITS},
         pruning=CHEAPEST_FINISH),
    _msq("msq-18x-from-3bit-binary-gain-3", 18.0, "MSQ, target 18x, from 3 bits, the last "
         "prune by Omega growth closed by the cheapest drop; binary layers' latent gradient "
         "times 3 (binary_gradient_gain 3; min_bits 1, literal grid)",
         quantization={**BINARY_GAIN_3, **FROM_3_BITS}, pruning=CHEAPEST_FINISH),
    _msq("msq-18x-from-3bit-binary-gain-third", 18.0, "MSQ, target 18x, from 3 bits, the "
         "last prune by Omega growth closed by the cheapest drop; binary layers' latent "
         "gradient times 1/3 (binary_gradient_gain 1/3; min_bits 1, literal grid)",
         quantization={**BINARY_GAIN_THIRD, **FROM_3_BITS}, pruning=CHEAPEST_FINISH),
    _msq("msq-16x-from-3bit-average-trace", 16.0, "MSQ, target 16x, from 3 bits, Omega by the "
         "average trace for p, the drop order and the last prune (min_bits 1, literal grid)",
         quantization={**BELOW_TWO_BITS, **FROM_3_BITS}, pruning=AVERAGE_TRACE),
    _msq("msq-18x-from-3bit-average-trace", 18.0, "MSQ, target 18x, from 3 bits, Omega by the "
         "average trace for p, the drop order and the last prune (min_bits 1, literal grid)",
         quantization={**BELOW_TWO_BITS, **FROM_3_BITS}, pruning=AVERAGE_TRACE),
    _msq("msq-18x-from-2bit", 18.0, "MSQ, target 18x, from 2 bits (uniform 2-bit widths until "
         "the first prune), the last prune by Omega growth closed by the cheapest drop (min_bits "
         "1, literal grid)", quantization={**BELOW_TWO_BITS, **FROM_2_BITS},
         pruning=CHEAPEST_FINISH),
    _msq("msq-18x-from-4bit-cheapest-finish", 18.0, "MSQ, target 18x, from 4 bits, the last "
         "prune by Omega growth closed by the cheapest drop (min_bits 1, literal grid)",
         quantization={**BELOW_TWO_BITS, **FROM_4_BITS}, pruning=CHEAPEST_FINISH),
    _msq("msq-16x-from-4bit-cheapest-finish", 16.0, "MSQ, target 16x, from 4 bits, the last "
         "prune by Omega growth closed by the cheapest drop (min_bits 1, literal grid)",
         quantization={**BELOW_TWO_BITS, **FROM_4_BITS}, pruning=CHEAPEST_FINISH),
    _msq("msq-16.5x-from-3bit-planned-penalty", 16.5, "MSQ, target 16.5x, from 3 bits, the "
         "last prune by Omega growth closed by the cheapest drop, the LSB penalty only on the "
         "groups it will take (min_bits 1, literal grid)",
         quantization={**BELOW_TWO_BITS, **FROM_3_BITS}, pruning=PLANNED_PENALTY),
    _msq("msq-18x-from-3bit-planned-penalty", 18.0, "MSQ, target 18x, from 3 bits, the last "
         "prune by Omega growth closed by the cheapest drop, the LSB penalty only on the groups "
         "it will take (min_bits 1, literal grid)", quantization={**BELOW_TWO_BITS, **FROM_3_BITS},
         pruning=PLANNED_PENALTY),
    _msq("msq-18x-from-3bit-omega-order", 18.0, "MSQ, target 18x, from 3 bits, the last "
         "prune by Omega growth (min_bits 1, literal grid)",
         quantization={**BELOW_TWO_BITS, **FROM_3_BITS}, pruning=OMEGA_ORDER),
    _msq("msq-18x-from-4bit-omega-order", 18.0, "MSQ, target 18x, from 4 bits, the last "
         "prune by Omega growth (min_bits 1, literal grid)",
         quantization={**BELOW_TWO_BITS, **FROM_4_BITS}, pruning=OMEGA_ORDER),
    _msq("msq-18x", 18.0, "MSQ, target 18x (min_bits 1, literal grid: binary 1-bit layers)",
         quantization=BELOW_TWO_BITS),
    _msq("msq-16x-fixed-p", 16.0, "MSQ, target 16x, p fixed at 1 (no Hessian; min_bits 1, "
         "literal grid)", quantization=BELOW_TWO_BITS, pruning={"step_policy": "fixed"}),
    RowSpec("oneshot-10.67x", "oneshot",
            "one-shot Hessian allocation to 10.67x, then uniform-schedule QAT", target=32 / 3),
    RowSpec("oneshot-8x-per-weight", "oneshot", "one-shot Hessian allocation to 8x by the "
            "average trace (omega_scale per_weight), then QAT", target=8.0,
            pruning=PER_WEIGHT_OMEGA),
    RowSpec("oneshot-10.67x-per-weight", "oneshot", "one-shot Hessian allocation to 10.67x by "
            "the average trace (omega_scale per_weight), then QAT", target=32 / 3,
            pruning=PER_WEIGHT_OMEGA),
    RowSpec("oneshot-16x-per-weight", "oneshot", "one-shot Hessian allocation to 16x by the "
            "average trace (omega_scale per_weight; min_bits 1, literal grid), then QAT",
            target=16.0, quantization=BELOW_TWO_BITS, pruning=PER_WEIGHT_OMEGA),
    RowSpec("float-fine-tuned", "float", "the float start fine-tuned with the same budget, "
            "unquantized (a control: what the budget alone does)"),
    RowSpec("brevitas-4bit", "brevitas", "Brevitas weight-only 4-bit QAT (per-channel float "
            "scale)", bits=4),
    RowSpec("brevitas-3bit", "brevitas", "Brevitas weight-only 3-bit QAT", bits=3),
    RowSpec("brevitas-2bit", "brevitas", "Brevitas weight-only 2-bit QAT", bits=2),
]}


@dataclass(frozen=True)
class Target:
    """One fidelity target: MSQ as ``MSQConfig.fine_tuning(compression)`` runs it (row
    ``msq_row``) against uniform QAT (row ``uniform_row``) at the same seeds.

    ``float_margin``: how far under the float start MSQ's mean may end; None for the point past
    16x, which must instead end above uniform QAT (``must_exceed``) rather than level with it.
    """

    label: str
    compression: float
    msq_row: str
    uniform_row: str
    float_margin: float | None
    must_exceed: bool = False


#: The targets the fidelity table is judged on, each row being the preset itself (a test checks
#: that each msq_row's config is MSQConfig.fine_tuning(compression)'s).
TARGETS = (
    Target("8x", 8.0, "msq-8x-from-5bit-planned-penalty", "uniform-4bit", 0.5),
    Target("10.67x", 32 / 3, "msq-10.67x-from-4bit-planned-penalty", "uniform-3bit", 1.0),
    Target("16x", 16.0, "msq-16x-from-3bit-cheapest-finish", "uniform-2bit", 2.0),
    Target("past 16x", 18.0, "msq-18x-from-3bit-cheapest-finish", "uniform-2bit", None,
           must_exceed=True),
)


#: The rows a float start's table is made of (run at seed 0 from a new start; docs/fidelity.md,
#: "A 200-epoch float start"): uniform QAT at 4 / 3 / 2 bits, the four targets' presets, the
#: Hessian's p (msq-16x) against p fixed at 1, the one-shot allocations, the peer at 4 / 3 / 2
#: bits, and the float control.
TABLE_ROWS = (
    "uniform-4bit", "uniform-3bit", "uniform-2bit",
    *(target.msq_row for target in TARGETS),
    "msq-16x", "msq-16x-fixed-p",
    "oneshot-10.67x", "oneshot-8x-per-weight", "oneshot-10.67x-per-weight",
    "oneshot-16x-per-weight",
    "brevitas-4bit", "brevitas-3bit", "brevitas-2bit",
    "float-fine-tuned",
)


def result_stem(name: str, seed: int = 0) -> str:
    """The file name (without suffix) of row ``name``'s checkpoint and result under ``seed``:
    seed 0 is the table's own run, other seeds repeat it to show how far a seed moves it."""
    return name if seed == 0 else f"{name}.seed{seed}"


@dataclass
class BuiltRow:
    model: nn.Module
    controller: MSQController | None
    compression: Callable[[], float]


def row_config(spec: RowSpec, seed: int = 0, scale: str = "channel") -> MSQConfig:
    """The MSQConfig an msq_fx row (uniform, msq or oneshot) quantizes and prunes under."""
    quantization = {**BEST_QUANTIZATION, "scale": scale, **spec.quantization}
    if spec.method == "uniform":
        quantization.update(init_bits=spec.bits, min_bits=spec.bits)
    return MSQConfig(target_compression=spec.target, quantization=quantization,
                     pruning=spec.pruning or {"interval": 10**9},
                     hessian={**ROW_HESSIAN, **spec.hessian}, seed=seed)


def build_row(spec: RowSpec, float_state: dict, example: torch.Tensor, calibration: list,
              seed: int = 0, scale: str = "channel") -> BuiltRow:
    """The row's model, loaded with ``float_state`` and quantized as ``spec`` says."""
    torch.manual_seed(seed)
    model = resnet20()
    model.load_state_dict(float_state)
    if spec.method == "float":
        return BuiltRow(model, None, lambda: 1.0)
    if spec.method == "brevitas":
        quantized = brevitas_resnet20(model, spec.bits)
        return BuiltRow(quantized, None, lambda: 32 / spec.bits)
    config = row_config(spec, seed, scale)
    qmodel = prepare(model, example, config)
    controller = MSQController(qmodel, config)
    if spec.method == "oneshot":
        allocate_bits_once(controller, calibration, F.cross_entropy)
    return BuiltRow(qmodel, controller, controller.compression)


def brevitas_resnet20(model: nn.Module, bits: int) -> nn.Module:
    """``model`` with every Conv2d and Linear replaced by Brevitas weight-only ``bits``-bit
    layers (per-output-channel float scale from the weights' statistics, straight-through)."""
    from brevitas.nn import QuantConv2d, QuantLinear
    from brevitas.quant import Int8WeightPerChannelFloat

    for name, child in list(model.named_children()):
        if isinstance(child, nn.Conv2d):
            layer = QuantConv2d(child.in_channels, child.out_channels, child.kernel_size,
                                stride=child.stride, padding=child.padding, groups=child.groups,
                                bias=child.bias is not None, weight_bit_width=bits,
                                weight_quant=Int8WeightPerChannelFloat)
        elif isinstance(child, nn.Linear):
            layer = QuantLinear(child.in_features, child.out_features, bias=child.bias is not None,
                                weight_bit_width=bits, weight_quant=Int8WeightPerChannelFloat)
        else:
            brevitas_resnet20(child, bits)
            continue
        with torch.no_grad():
            layer.weight.copy_(child.weight)
            if child.bias is not None:
                layer.bias.copy_(child.bias)
        setattr(model, name, layer)
    return model
