"""Training-step time and peak memory of an MSQ-prepared model against the same model in float
(``tools/bench``).

    tools/bench                       # ResNet-20, CIFAR shapes, batch 128
    tools/bench --json --threads 1
    tools/bench --model torchvision:resnet18 --batch-size 16
    tools/bench --model timm:convnext_tiny --batch-size 8   # any msq-fx check SPEC
    tools/bench --hessian --model torchvision:vit_b_16 --batch-size 1   # the pruning step too
    tools/bench --peers --threads 1 --write-doc docs/benchmarks.md       # against other QAT
    tools/bench --profile 15 --threads 1                                 # where the step goes

Both contenders start from the same weights and train on the same random batch (fixed seed, so
no dataset is needed) with SGD + momentum. A timm or ``package.module:factory`` model is built as
``msq-fx check`` builds it (random weights, a 10-class head where the factory takes one) at the
input size it declares or ``--input-size``. One training step is: zero_grad, forward,
cross-entropy (the mean square of the output for a model whose output is not (batch, classes);
plus, for MSQ, the LSB penalty ``MSQController.regularization()`` of a controller built on the
prepared model with its config: lambda (5e-5 by default) times the L1 of the LSBs the next prune
would drop, over the groups still pruning), backward, optimizer step.

Time (:mod:`.timing`)
    After the warm-up steps, ``--repeats`` repeats of ``--steps`` steps each, alternating FP and
    MSQ repeats so that slow drifts of the machine (frequency scaling, other load) hit both alike.
    Each repeat gives a mean time per step; the report is the median over repeats, and the ratio
    is MSQ median / FP median of the same run.

Hessian (``--hessian``, :mod:`.hessian`)
    Also the pruning step (``MSQController.epoch_end``: Hutchinson traces with ``--probes``
    probes on the batch, in eval mode) once per H v method, the double backward ("autograd") and
    the central difference of gradients ("finite_difference"), and once with the Fisher's trace
    in place of the Hessian's ("fisher", ``--probes`` label draws), each as a ratio to the MSQ
    training step of the same run. The controller's LSB threshold is set so that no group is
    pruned, so every repeat computes the Hessian at the same widths.

Recompute (``--compare-recompute``)
    Adds a third contender, MSQ with ``recompute_quantized_weights=False``: every conv / linear
    saves its quantized weight for the backward pass instead of recomputing it, as MSQ training
    did before that option existed. Its ratios to FP32 show what the recompute saves and costs.

Peers (``--peers``, :mod:`.peers`, :mod:`.bit_split`)
    Adds other ways to train the same model with quantized weights, built from the same float
    weights and measured in the same run: torch.ao QAT (``prepare_qat_fx`` with the default x86
    QAT qconfig mapping), torch.ao with a weight-only 4-bit qconfig, Brevitas with 4-bit
    ``QuantConv2d`` / ``QuantLinear`` weights, and a bit-split baseline (8 trainable bit planes
    and a scale per weight, BSQ / CSQ). Each gets its ratios to float, and MSQ is compared with
    each: the peer's step time over MSQ's, MSQ's peak over the peer's, and the time each adds to
    the float step.

Clock (``--clock``)
    ``wall`` (default) or ``cpu``: this process's CPU time, user and system, which leaves out
    the time other processes held the CPU the step waited for (with ``--threads 1`` on a shared
    machine, the steadier of the two; it still counts what sharing caches and memory costs).

Profile (``--profile N``, :mod:`.profiling`)
    Also ``--profile-steps`` steps of every contender under ``torch.profiler``, each profiled
    on its own; the table lists the N ops with the most self time in the MSQ step beside the
    float step's, each scaled by its step's CPU time over its wall time and at its lowest over
    those steps.

Page faults (:mod:`.allocator`, ``--keep-freed-heap``)
    Each contender's minor page faults per timed step: glibc returns freed memory to the system
    and a later step faults it in again, more or less depending on where earlier steps of any
    contender left the heap. ``--keep-freed-heap`` makes malloc keep it, for every contender.

Conditions (:mod:`.conditions`) and ``--write-doc PATH`` (:mod:`.doc`)
    Every report records the machine, the load average and how many cores other processes kept
    busy during the run. ``--write-doc`` writes the tables, the command and those conditions
    into a Markdown file, replacing the block an earlier run of the same workload wrote.

Evaluation (``--eval``)
    Also the time of one forward in eval mode under ``torch.no_grad()`` (a validation loop), for
    the float model, the fake-quant model and the converted model, the latter two also inside
    ``msq_fx.weight_cache.cached_quantized_weights`` (entered once around all repeats, as
    around a validation loop), each as a ratio to the float forward of the same run, interleaved
    like the training steps.

Peak memory (:mod:`.memory`, which describes the CPU measure in full)
    The peak of bytes held by live tensors during one step: ``torch.cuda.max_memory_allocated``
    on a GPU; on CPU the bytes live when the step starts plus the peak of the running sum of the
    allocator's records that ``torch.profiler`` keeps with ``profile_memory=True``.

The package, one concern per module: :mod:`.workloads` (the model and the batch),
:mod:`.contenders` (float and MSQ, the training step), :mod:`.peers` and :mod:`.bit_split` (the
other contenders), :mod:`.timing`, :mod:`.memory`, :mod:`.profiling`, :mod:`.conditions`,
:mod:`.allocator`, :mod:`.hessian` (the pruning step), :mod:`.run` (one run to a report),
:mod:`.report` (the tables), :mod:`.doc` (the Markdown block) and :mod:`.cli` (the options and
``main``). It is imported on its own, not with msq_fx.
"""
from __future__ import annotations

from .bit_split import PLANES, bit_split, bit_split_layers, group_lasso
from .cli import main, parse_args
from .contenders import (AUTOCAST_DTYPES, SAVED_COPIES, Contender, build_contenders,
                         enable_grad_checkpointing, sgd, train_step)
from .doc import write_doc
from .hessian import hessian_costs, pruning_step
from .memory import peak_bytes, resident_state_bytes, step_peak_bytes
from .peers import (BIT_SPLIT, BREVITAS_W4, PEERS, TORCH_AO_QAT, TORCH_AO_W4,
                    brevitas_weight_only, build_peers, torch_ao_qat, weight_only_qconfig_mapping)
from .profiling import op_times
from .report import format_table, profile_rows
from .run import msq_against, run_benchmark
from .timing import CACHED, CLOCKS, eval_forward_times, interleaved_step_times
from .workloads import Workload, build_workload, random_batch

__all__ = [
    "main", "parse_args", "run_benchmark", "format_table", "profile_rows", "write_doc",
    "Workload", "build_workload", "random_batch",
    "Contender", "build_contenders", "enable_grad_checkpointing", "sgd", "train_step",
    "AUTOCAST_DTYPES", "SAVED_COPIES", "CACHED", "CLOCKS",
    "interleaved_step_times", "eval_forward_times",
    "peak_bytes", "resident_state_bytes", "step_peak_bytes",
    "pruning_step", "hessian_costs",
    "PEERS", "TORCH_AO_QAT", "TORCH_AO_W4", "BREVITAS_W4", "BIT_SPLIT", "build_peers",
    "torch_ao_qat", "weight_only_qconfig_mapping", "brevitas_weight_only", "msq_against",
    "PLANES", "bit_split", "bit_split_layers", "group_lasso", "op_times",
]
