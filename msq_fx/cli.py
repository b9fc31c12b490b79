"""The ``msq-fx`` command line: ``demo`` (end-to-end run on generated data), ``check``,
``export-onnx`` and ``report``."""
from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import MSQConfig, MSQController, SmallCNN, convert, prepare, report, save
from .check.exports import add_export_option
from .config import HESSIAN_CURVATURES, HESSIAN_METHODS
from .data import synthetic_patterns
from .offload import release_freed_memory
from .packing import packed_size
from .report import LayerRow
from .training import accuracy, cosine_schedule, train_epoch

__all__ = ["main", "build_parser", "parse_shape", "parse_input_size"]


def demo(args: argparse.Namespace) -> int:
    """Quantize a small CNN end to end on a generated task; print the bit table and compression."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = synthetic_patterns(args.train_size + 1000, seed=args.seed)
    train_set, test_set = data.split(args.train_size)
    config = MSQConfig(target_compression=args.target_compression, seed=args.seed,
                       pruning=dict(interval=1, reg_strength=args.reg_strength))
    qmodel = prepare(SmallCNN(in_channels=1, width=16), train_set.images[:2], config)
    controller = MSQController(qmodel, config)
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    steps = -(-len(train_set) // 128)
    scheduler = cosine_schedule(optimizer, args.epochs * steps, warmup_steps=steps // 4)
    order = torch.Generator().manual_seed(args.seed)
    print(f"MSQ demo: SmallCNN on {len(train_set)} generated 16x16 images, 8 bits -> target "
          f"{args.target_compression}x")
    for epoch in range(1, args.epochs + 1):
        loss = train_epoch(qmodel, train_set.batches(128, True, order), optimizer, controller,
                           scheduler=scheduler)
        controller.epoch_end(epoch, train_set.batches(128, True, order), F.cross_entropy)
        bits = " ".join(str(b) for b in controller.bit_widths().values())
        reached = ("  (target reached: plain QAT from here)"
                   if controller.compression() >= args.target_compression else "")
        print(f"epoch {epoch}: loss {loss:.3f}, "
              f"test acc {accuracy(qmodel, test_set.batches(500)):.1f}%"
              f", compression {controller.compression():.2f}x, bits [{bits}]{reached}", flush=True)
    int_model = convert(qmodel)
    qmodel.eval(), int_model.eval()
    with torch.no_grad():
        diff = float((qmodel(test_set.images) - int_model(test_set.images)).abs().max())
    print("\n" + report(int_model).table())
    print(f"\nconverted model: test acc {accuracy(int_model, test_set.batches(500)):.1f}%, "
          f"max |converted - fake-quant| = {diff:.3g}")
    print(_saved_sizes(int_model, SmallCNN(in_channels=1, width=16)))
    print(_onnx_summary(int_model, test_set.images[:8]))
    return 0


def _onnx_summary(int_model: torch.nn.Module, inputs: torch.Tensor) -> str:
    """One line on the ONNX export of the converted model, or how to get it."""
    from .onnx_export import INSTALL_HINT, export_onnx as export

    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return f"ONNX export: {INSTALL_HINT} to write the model with integer weights"
    with tempfile.TemporaryDirectory() as tmp:
        written = export(int_model, inputs, Path(tmp) / "model.onnx")
        difference = _onnx_max_abs_diff(int_model, inputs, written.path, "1")
    return (f"msq_fx.export_onnx: {written.file_bytes:,} bytes, {len(written.int4_weights)} "
            f"weights as INT4 and {len(written.int8_weights)} as INT8 through DequantizeLinear; "
            f"ONNX Runtime vs the converted model: max |diff| {difference:.3g}")


def _saved_sizes(int_model: torch.nn.Module, float_model: torch.nn.Module) -> str:
    """Bytes on disk: the packed converted model against the float model's state_dict."""
    with tempfile.TemporaryDirectory() as tmp:
        packed_path, float_path = Path(tmp) / "model.msq", Path(tmp) / "float.pt"
        save(int_model, packed_path)
        torch.save(float_model.state_dict(), float_path)
        packed, full = packed_path.stat().st_size, float_path.stat().st_size
    code_bytes, float_bytes = _weight_bytes(report(int_model).layers)
    return (f"msq_fx.save: quantized weights take {code_bytes:,} bytes packed vs {float_bytes:,} "
            f"in float32; whole file {packed:,} bytes (float32 state_dict file {full:,} bytes; "
            f"the file also holds the pickled module structure)")


def _weight_bytes(layers: list[LayerRow]) -> tuple[int, int]:
    """Bytes of a report's quantized weights: bit-packed as ``msq_fx.save`` writes them, and in
    float32."""
    return (sum(packed_size(row.params, row.bits) for row in layers),
            sum(4 * row.params for row in layers))


def check(args: argparse.Namespace) -> int:
    """Run msq_fx.check.check_model on each spec; 1 if any FAILs, 2 if a spec names no model."""
    from .check import check_config, check_model, junit_xml
    from .zoo import SpecError, parse_spec
    from .io import atomic_write

    try:
        for spec in args.specs:  # resolve every spec first: a typo should not wait for a long run
            parse_spec(spec)
    except SpecError as error:
        print(f"msq-fx check: error: {error}", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.offload_activations or args.lean_retry:
        release_freed_memory()  # else the activations read back from disk stay with the process
    failed, results = False, []
    for spec in args.specs:
        try:
            config = check_config(args.seed).replace(
                hessian=dict(method=args.hessian_method, curvature=args.curvature),
                quantization=dict(act_bits=args.act_bits))
            result = check_model(spec, input_size=args.input_size, batch_size=args.batch_size,
                                 steps=args.steps, seed=args.seed, config=config,
                                 exports=args.export,
                                 offload_activations=args.offload_activations,
                                 lean_retry=args.lean_retry, torch_compile=args.compile)
        except ValueError as error:  # the model declares no input size and none was given
            print(f"msq-fx check: error: {error}", file=sys.stderr)
            return 2
        failed |= result.status == "FAIL"
        results.append(result)
        if args.junit_xml is not None:  # rewritten after each model: a killed run keeps them
            report_xml = junit_xml(results)
            atomic_write(args.junit_xml, lambda tmp: Path(tmp).write_text(report_xml))
        if args.json:
            print(json.dumps(result.to_dict(include_table=False)), flush=True)
        else:
            print(("\n" + result.table + "\n" if result.table else "") + result.summary_line(),
                  flush=True)
    return 1 if failed else 0


def export_onnx(args: argparse.Namespace) -> int:
    """Write a model saved by ``msq_fx.save`` as ONNX with integer weights; 2 on bad input."""
    from .io import load
    from .onnx_export import export_onnx as export

    int_model = _read_saved(functools.partial(load, trusted=args.trusted), args.model,
                            "export-onnx", "" if args.trusted else
                            "\nmsq-fx export-onnx: add --trusted for a file you trust")
    if int_model is None:
        return 2
    inputs = torch.randn(args.input_shape, generator=torch.Generator().manual_seed(0))
    dynamic = ({0: torch.export.Dim("batch")},) if args.dynamic_batch else None
    result = export(int_model, inputs, args.output, int4=not args.int8, int2=args.int2,
                    dynamic_shapes=dynamic)
    int2 = f"{len(result.int2_weights)} as INT2, " if args.int2 else ""
    print(f"{result.path}: {result.file_bytes:,} bytes; {len(result.int4_weights)} weights as "
          f"INT4, {int2}{len(result.int8_weights)} as INT8, {len(result.float_weights)} in float")
    for name, reason in result.float_weights:
        print(f"  float: {name} ({reason})")
    if args.verify:
        for label, accuracy_level in (("float32 compute", "1"), ("ONNX Runtime defaults", None)):
            difference = _onnx_max_abs_diff(int_model, inputs, result.path, accuracy_level)
            print(f"ONNX Runtime ({label}) vs the converted model on a random input: "
                  f"max |diff| {difference:.3g}")
    return 0


def _read_saved(read: Callable[[Path], Any], path: Path, command: str, hint: str = "") -> Any:
    """``read(path)`` for a file ``msq_fx.save`` wrote, or None after saying why it failed
    (and ``hint``, what the command's user can do about it)."""
    try:
        return read(path)
    except Exception as error:  # missing, unreadable or not written by msq_fx.save
        print(f"msq-fx {command}: error: cannot load {path} "
              f"({type(error).__name__}: {error}){hint}", file=sys.stderr)
        return None


def show_report(args: argparse.Namespace) -> int:
    """Print the per-layer bit table of a model saved by ``msq_fx.save`` (read without
    unpickling anything); 2 on bad input."""
    from .io import saved_report

    result = _read_saved(saved_report, args.model, "report")
    if result is None:
        return 2
    packed, float32 = _weight_bytes(result.layers)
    sizes = {"file_bytes": args.model.stat().st_size, "packed_weight_bytes": packed,
             "float32_weight_bytes": float32}
    if args.json:
        print(json.dumps({"model": str(args.model), **result.to_dict(), **sizes}))
    else:
        print(result.table())
        print(f"{args.model}: {sizes['file_bytes']:,} bytes; the quantized weights take "
              f"{sizes['packed_weight_bytes']:,} bytes packed ({sizes['float32_weight_bytes']:,} "
              f"in float32)")
    return 0


def _onnx_max_abs_diff(int_model: torch.nn.Module, inputs: torch.Tensor, path: Path,
                       accuracy_level: str | None) -> float:
    """Largest difference between ONNX Runtime's first output and the converted model's."""
    from .onnx_export import onnx_runtime_outputs

    onnx_output = onnx_runtime_outputs(path, inputs, accuracy_level)[0]
    with torch.no_grad():
        output = int_model.eval()(inputs)
    return float((onnx_output - output).abs().max())


def parse_shape(text: str) -> tuple[int, ...]:
    """``1x3x224x224``: the full input shape, batch first."""
    try:
        sizes = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected a shape like 1x3x224x224, got {text!r}")
    return sizes


def parse_input_size(text: str) -> tuple[int, ...]:
    """``224``, ``160x128`` (H x W), ``3x224x224`` (C x H x W) or ``3x16x112x112`` (a video's
    C x T x H x W)."""
    try:
        sizes = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        sizes = ()
    if len(sizes) not in (1, 2, 3, 4) or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected N, HxW, CxHxW or CxTxHxW, got {text!r}")
    return sizes


def _add_check_parser(commands) -> None:
    parser = commands.add_parser(
        "check", help="prepare, train a few steps, prune once and convert each model; compare "
                      "the converted output with the fake-quant one",
        description="SPEC: timm:NAME, torchvision:NAME or package.module:factory. Prints each "
                    "model's per-layer table and a PASS / FAIL / SKIP line (SKIP: the model does "
                    "not build or run eagerly). Exit status 1 if any model FAILs, "
                    "2 for a bad SPEC.")
    parser.add_argument("specs", nargs="+", metavar="SPEC")
    parser.add_argument("--input-size", type=parse_input_size, default=None,
                        help="N, HxW, CxHxW or CxTxHxW (default: the size the model is made for)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="SGD steps before the prune")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--hessian-method", choices=HESSIAN_METHODS, default="auto",
                        help="how the pruning step computes H v (MSQConfig.hessian.method; "
                             "default auto: double backward, finite differences if it runs out "
                             "of memory)")
    parser.add_argument("--curvature", choices=HESSIAN_CURVATURES, default="hessian",
                        help="what the prune ranks layers by (MSQConfig.hessian.curvature; "
                             "fisher: the Fisher information's trace, for models that output "
                             "class scores)")
    parser.add_argument("--offload-activations", action="store_true",
                        help="keep the activations the training steps and the prune save for "
                             "their backward in temporary files, not in memory: for models whose "
                             "activations, not weights, exceed the memory (slower; on glibc also "
                             "returns freed blocks of 1 MiB or more to the system)")
    parser.add_argument("--lean-retry", action="store_true",
                        help="when even a batch of 1 runs out of memory in training or the "
                             "prune, check once more with the options that need less there and "
                             "were not given (--hessian-method finite_difference, "
                             "--offload-activations); else the FAIL's note only names them")
    parser.add_argument("--act-bits", type=int, default=None,
                        help="also quantize each quantized layer's input to this many bits "
                             "(MSQConfig.quantization.act_bits)")
    add_export_option(parser, help="also export the converted model (torch: torch.export; onnx: "
                                   "msq_fx.export_onnx run by ONNX Runtime) and compare its "
                                   "outputs; repeatable")
    parser.add_argument("--compile", action="store_true",
                        help="also run the prepared model at its mixed widths through "
                             "torch.compile (aot_eager backend): it must give the eager "
                             "outputs; its graphs and graph breaks are reported")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per model and line, no tables")
    parser.add_argument("--junit-xml", type=Path, default=None, metavar="PATH",
                        help="also write the results as a JUnit XML report (one test case per "
                             "model) for CI systems")
    parser.set_defaults(handler=check)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msq-fx", description="MSQ mixed-precision quantization")
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo",
                                      help="quantize a small CNN end to end on generated data")
    demo_parser.add_argument("--epochs", type=int, default=10)
    demo_parser.add_argument("--train-size", type=int, default=6000)
    demo_parser.add_argument("--target-compression", type=float, default=8.0)
    # A tiny network on a short schedule: a stronger L1 pull than the paper's ImageNet/CIFAR
    # lambda reaches the target within the demo's 10 epochs.
    demo_parser.add_argument("--reg-strength", type=float, default=2e-4)
    demo_parser.add_argument("--seed", type=int, default=0)
    demo_parser.add_argument("--threads", type=int, default=None,
                             help="torch CPU threads (default: torch's choice; 1 is faster when "
                                  "other jobs share the CPU)")
    demo_parser.set_defaults(handler=demo)
    _add_check_parser(commands)
    export_parser = commands.add_parser(
        "export-onnx", help="write a model saved by msq_fx.save as ONNX with INT4 / INT8 weights",
        description="Quantized weights become integer initializers read through "
                    "DequantizeLinear (INT4 for layers of at most 4 bits, else INT8).")
    export_parser.add_argument("model", type=Path, help="a file written by msq_fx.save")
    export_parser.add_argument("output", type=Path, help="the .onnx file to write")
    export_parser.add_argument("--input-shape", type=parse_shape, required=True,
                               help="the example input's shape, batch first, e.g. 1x3x224x224")
    export_parser.add_argument("--int8", action="store_true",
                               help="INT8 for every quantized weight (no INT4)")
    export_parser.add_argument("--int2", action="store_true",
                               help="INT2 for layers of at most 2 bits (a file of opset 25)")
    export_parser.add_argument("--dynamic-batch", action="store_true",
                               help="the file takes any batch size (the first input dimension)")
    export_parser.add_argument("--verify", action="store_true",
                               help="run the file with ONNX Runtime and print the largest "
                                    "difference from the converted model")
    export_parser.add_argument("--trusted", action="store_true",
                               help="rebuild the model from the module structure pickled in the "
                                    "file (reading it can run code: only for files you trust)")
    export_parser.set_defaults(handler=export_onnx)
    report_parser = commands.add_parser(
        "report", help="print the per-layer bit table of a model saved by msq_fx.save")
    report_parser.add_argument("model", type=Path, help="a file written by msq_fx.save")
    report_parser.add_argument("--json", action="store_true",
                               help="one JSON object: layers, float weights, notes, compression, "
                                    "byte counts")
    report_parser.set_defaults(handler=show_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
