"""The command line of the benchmark (``tools/bench``): its options, and ``main`` printing the
report as a table or as JSON."""
from __future__ import annotations

import argparse
import json
from typing import Callable

from ..cli import parse_input_size
from .contenders import AUTOCAST_DTYPES
from .report import format_table
from .run import run_benchmark

__all__ = ["parse_args", "main"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Training-step time and peak memory: MSQ-prepared model vs float.")
    parser.add_argument("--model", default="resnet20",
                        help="resnet20 (CIFAR, 3x32x32), torchvision:NAME (3x224x224, 1000 "
                             "classes), timm:NAME or package.module:factory")
    parser.add_argument("--input-size", type=parse_input_size, default=None,
                        help="N, HxW or CxHxW for a timm or factory model (default: the size "
                             "the model declares)")
    parser.add_argument("--batch-size", type=_int_at_least(1), default=128)
    parser.add_argument("--repeats", type=_int_at_least(1), default=5, help="timed repeats per model")
    parser.add_argument("--steps", type=_int_at_least(1), default=10, help="training steps per repeat")
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
    parser.add_argument("--eval", action="store_true",
                        help="also time an eval-mode forward: float, fake-quant and converted, "
                             "the latter two also with cached weights")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    return parser.parse_args(argv)


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
    return 0
