"""The command line of the benchmark (``tools/bench``): its options, and ``main`` printing the
report as a table or as JSON."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from ..cli import parse_input_size
from .contenders import AUTOCAST_DTYPES
from .doc import write_doc
from .report import format_table
from .run import run_benchmark
from .timing import CLOCKS

__all__ = ["parse_args", "main"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Training-step time and peak memory: MSQ-prepared model vs float.")
    parser.add_argument("--model", default="resnet20",
                        help="resnet20 (CIFAR, 3x32x32), torchvision:NAME (3x224x224, 1000 "
                             "classes), timm:NAME or package.module:factory")
    parser.add_argument("--input-size", type=parse_input_size, default=None,
                        help="N, HxW or CxHxW (default: 32 for resnet20, 224 for torchvision, "
                             "else the size the model declares)")
    parser.add_argument("--batch-size", type=_int_at_least(1), default=128)
    parser.add_argument("--repeats", type=_int_at_least(1), default=5,
                        help="timed repeats per model")
    parser.add_argument("--steps", type=_int_at_least(1), default=10,
                        help="training steps per repeat")
    parser.add_argument("--warmup", type=_int_at_least(0), default=3,
                        help="untimed steps per model before timing")
    parser.add_argument("--threads", type=_int_at_least(1), default=None,
                        help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--hessian", action="store_true",
                        help="also measure the pruning step's Hessian, by each H v method")
    parser.add_argument("--probes", type=_int_at_least(1), default=1,
                        help="Hutchinson probes per pruning step (with --hessian)")
    parser.add_argument("--hessian-chunk-size", type=_int_at_least(1), default=None,
                        help="with --hessian, also the double backward on chunks of this many "
                             "samples (MSQConfig.hessian_chunk_size)")
    parser.add_argument("--compare-recompute", action="store_true",
                        help="also time MSQ with quantization.recompute_quantized_weights=False")
    parser.add_argument("--autocast", choices=sorted(AUTOCAST_DTYPES), default=None,
                        help="run every contender's forward under torch.autocast to this dtype "
                             "(mixed-precision training)")
    parser.add_argument("--grad-checkpointing", action="store_true",
                        help="activation checkpointing in every contender (a timm model's "
                             "set_grad_checkpointing)")
    parser.add_argument("--compile", action="store_true",
                        help="run every contender's model under torch.compile (the warm-up steps "
                             "compile it; not with --peers, --eval or --hessian)")
    parser.add_argument("--eval", action="store_true",
                        help="also time an eval-mode forward: float, fake-quant and converted, "
                             "the latter two also with cached weights")
    parser.add_argument("--peers", action="store_true",
                        help="also train the same model with torch.ao QAT (x86), torch.ao 4-bit "
                             "weight-only QAT, Brevitas 4-bit weights and 8 bit planes per "
                             "weight (bit-split), as ratios to float of the same run")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="time by the wall clock (default) or by this process's CPU time, "
                             "which leaves out time other processes held its CPU")
    parser.add_argument("--keep-freed-heap", action="store_true",
                        help="set glibc's malloc to keep freed memory (and serve blocks up to "
                             "32 MiB from its heap), so no contender's steps pay page faults "
                             "for memory an earlier step returned to the system")
    parser.add_argument("--profile", type=_int_at_least(0), default=0, metavar="N",
                        help="also profile every contender's step (torch.profiler) and list the "
                             "N ops with the most self CPU time in the MSQ step")
    parser.add_argument("--profile-steps", type=_int_at_least(1), default=5,
                        help="steps profiled per contender with --profile (each op's lowest "
                             "time over them is reported)")
    parser.add_argument("--write-doc", metavar="PATH", default=None,
                        help="also write the result as Markdown (table, command, machine and "
                             "load) into PATH, replacing the block of the same model, input, "
                             "batch and options or adding one at the end")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if args.compile and (args.peers or args.eval or args.hessian):
        parser.error("--compile times the training steps of float and MSQ only; run --peers, "
                     "--eval and --hessian without it")
    if args.compile and args.warmup < 1:
        parser.error("--compile needs --warmup of at least 1: the first step compiles")
    return args


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text}")
        return value

    parse.__name__ = f"integer >= {minimum}"  # argparse names the expected type with it
    return parse


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run_benchmark(args)
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    if args.write_doc:
        write_doc(args.write_doc, report, sys.argv[1:] if argv is None else argv)
    return 0
