"""Converted-model inference against float: time per forward, resident memory, file size.

The code behind ``tools/bench_inference``. For each model (any ``msq-fx check`` SPEC, random
weights) and each width, the parent process builds the float model, prepares it with every
quantized weight at that width (``init_bits = min_bits = bits``, ``target_compression =
32 / bits``: nothing to prune), converts it and writes the files: the float model
(``torch.save`` of the module) and the converted one once per contender's kernels
(``msq_fx.save``; the same codes and tensors, the structure naming the modules that hold them,
so that loading builds them directly). Each contender's memory is measured in a fresh child
process (``python -m msq_fx.inference_bench child ...``) that imports what it needs, loads and
runs a small CNN saved the same way (so that what the first use of a code path costs, whatever
the model, is not counted), reads its resident memory (the baseline), loads its file
(``torch.load``, or ``msq_fx.load(path, trusted=True)``), runs a few forwards and reports:

- the process's RSS after loading and after the forwards, minus the baseline: what loading
  the model and running it added, without the float model the parent built (the kernel's
  peak, VmHWM, is in the JSON, but glibc giving memory back with madvise can hide a peak from
  it);
- the bytes of the tensors the loaded model holds (parameters, buffers, kept float weights);
- the largest difference of its output from the output the parent's model gave (the float
  model for float, the converted model for the others).

Time is measured in one more child that loads every contender's file and runs them in turn:
``rounds`` rounds, in each every contender ``forwards`` times (after ``warmup`` forwards each at
the start), the order rotating from round to round, so that the machine's drifts and other
processes hit all alike. A contender's time is the median over the rounds of its fastest
forward in the round, in CPU time (``time.process_time``: with one thread the forward's own
work, which on a shared machine varies less than wall time, also reported).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["CONTENDERS", "ChildResult", "run_child", "run_benchmark", "markdown_table",
           "text_table", "aten_kernel_rows", "main"]

#: The contenders: name -> (kernels, keep_float) of the converted model; None: the float model.
CONTENDERS: dict[str, tuple[str, tuple[str, ...]] | None] = {
    "float": None,
    "dequantize": ("dequantize", ()),
    "packed": ("packed", ()),
    "packed, conv kept": ("packed", ("conv", "depthwise")),
}
#: The small model each child loads and runs first (the suffix is the contender's) and its input.
PRIMER = Path("primer")
PRIMER_INPUT = (3, 16, 16)
DEFAULT_MODELS = ("torchvision:resnet18", "torchvision:vit_b_16", "torchvision:convnext_tiny")
SEED = 0


@dataclass
class ChildResult:
    """What one child process measured (times in ms, memory in bytes)."""

    cpu_ms: list[float]
    wall_ms: list[float]
    baseline_rss: int
    rss_after_load: int
    rss_after: int
    peak_rss: int
    tensor_bytes: int
    max_abs_diff: float

    @property
    def rss_added(self) -> int:
        return self.rss_after - self.baseline_rss

    @property
    def load_added(self) -> int:
        return self.rss_after_load - self.baseline_rss


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    # VmHWM: the peak of this process image (ru_maxrss would also count the parent's before
    # the exec).
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def held_tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind the model's parameters and buffers, and of the
    float weights its quantized weights keep (``keep_float``)."""
    from msq_fx.weight_cache import CachesItsWeight

    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [m.cache.value for m in model.modules()
                if isinstance(m, CachesItsWeight) and getattr(m, "cache", None) is not None
                and m.cache.value is not None]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def run_child(path: str, contender: str, inputs_path: str, expected_path: str, forwards: int,
              warmup: int, threads: int) -> ChildResult:
    """Load one model and run it (the memory child's work; see the module docstring)."""
    import msq_fx
    import msq_fx.packed_weights  # noqa: F401  (imported before the baseline)
    import torchvision  # noqa: F401  (the pickled modules' classes)

    torch.set_num_threads(threads)
    inputs = torch.load(inputs_path)
    expected = torch.load(expected_path)
    primer = Path(inputs_path).parent / PRIMER.with_suffix(
        ".pt" if CONTENDERS[contender] is None else ".msq")
    # What the first use of a code path costs whatever the model (modules imported on demand,
    # the kernels' code and workspaces) is paid before the baseline, on a small model.
    with torch.inference_mode():
        _loaded(primer, contender)(torch.randn(1, *PRIMER_INPUT))
    baseline = _rss()
    model = _loaded(Path(path), contender)
    after_load = _rss()
    cpu, wall = [], []
    with torch.inference_mode():
        for index in range(warmup + forwards):
            start_cpu, start_wall = time.process_time(), time.perf_counter()
            output = model(inputs)
            if index >= warmup:
                cpu.append(1e3 * (time.process_time() - start_cpu))
                wall.append(1e3 * (time.perf_counter() - start_wall))
        difference = float((output - expected).abs().max())
    return ChildResult(cpu, wall, baseline, after_load, _rss(), _peak_rss(),
                       held_tensor_bytes(model), difference)


def run_timing(directory: str, runs: list[tuple[str, int | None]], rounds: int, forwards: int,
               warmup: int, threads: int) -> dict[str, dict[str, list[float]]]:
    """Every run's model loaded in this process and timed in turn (see the module docstring):
    per run (``"contender|bits"``), its fastest CPU and wall time in each round, in ms."""
    import msq_fx  # noqa: F401
    import torchvision  # noqa: F401  (the pickled modules' classes)

    torch.set_num_threads(threads)
    folder = Path(directory)
    inputs = torch.load(folder / "inputs.pt")
    models = {run: _loaded(contender_file(folder, *run), run[0]) for run in runs}
    times = {run: {"cpu_ms": [], "wall_ms": []} for run in runs}
    with torch.inference_mode():
        for model in models.values():
            for _ in range(warmup):
                model(inputs)
        for index in range(rounds):
            for run in runs[index % len(runs):] + runs[:index % len(runs)]:
                cpu, wall = [], []
                for _ in range(forwards):
                    start_cpu, start_wall = time.process_time(), time.perf_counter()
                    models[run](inputs)
                    cpu.append(1e3 * (time.process_time() - start_cpu))
                    wall.append(1e3 * (time.perf_counter() - start_wall))
                times[run]["cpu_ms"].append(min(cpu))
                times[run]["wall_ms"].append(min(wall))
    return {_run_name(run): found for run, found in times.items()}


def _run_name(run: tuple[str, int | None]) -> str:
    return f"{run[0]}|{run[1] or ''}"


def _run_of(name: str) -> tuple[str, int | None]:
    contender, bits = name.split("|")
    return contender, int(bits) if bits else None


def _loaded(path: Path, contender: str) -> torch.nn.Module:
    """The model of the file ``path`` (a pickled float module, or a converted one saved with
    ``contender``'s kernels, which ``use_kernels`` then leaves as they are) in eval mode."""
    import msq_fx
    import msq_fx.packed_weights

    if CONTENDERS[contender] is None:
        return torch.load(path, weights_only=False).eval()
    kernels, keep_float = CONTENDERS[contender]
    model = msq_fx.load(path, trusted=True)
    return msq_fx.packed_weights.use_kernels(model, kernels, keep_float).eval()


def contender_file(directory: Path, contender: str, bits: int | None) -> Path:
    """The file a contender loads: the float module, or the converted model saved with the
    contender's kernels (the codes and tensors are the same in each; the structure names the
    modules that hold them)."""
    if bits is None:
        return directory / "float.pt"
    return directory / f"msq{bits}.{contender.replace(',', '').replace(' ', '-')}.msq"


def _write_primer(directory: Path) -> None:
    """A small CNN, in float and converted, that each child loads and runs before measuring."""
    import msq_fx

    torch.manual_seed(SEED)
    model = msq_fx.SmallCNN(in_channels=PRIMER_INPUT[0]).eval()
    torch.save(model, directory / PRIMER.with_suffix(".pt"))
    example = torch.randn(1, *PRIMER_INPUT)
    msq_fx.save(msq_fx.convert(msq_fx.prepare(model, example)).eval(),
                directory / PRIMER.with_suffix(".msq"))


def _spawn(arguments: list[str], threads: int, what: str) -> Any:
    """Run ``python -m msq_fx.inference_bench ARGUMENTS`` and read the JSON it prints last."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    command = [sys.executable, "-m", "msq_fx.inference_bench", *arguments]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{what}: the child process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _prepare_files(spec: str, bits_list: list[int], directory: Path, input_size) -> dict:
    """Write the float module, the input, and per width a .msq file per converted contender
    and the outputs each contender should reproduce; the float weights' bytes."""
    import msq_fx
    import msq_fx.packed_weights
    from msq_fx.zoo import built_from_spec

    torch.manual_seed(SEED)
    model, shape = built_from_spec(spec, input_size)
    model.eval()
    inputs = torch.randn(1, *shape, generator=torch.Generator().manual_seed(SEED))
    torch.save(inputs, directory / "inputs.pt")
    torch.save(model, contender_file(directory, "float", None))
    with torch.no_grad():
        torch.save(model(inputs), directory / "float.expected.pt")
    files = {"directory": directory, "shape": list(inputs.shape),
             "float_weight_bytes": sum(t.numel() * t.element_size()
                                       for t in model.parameters())}
    for bits in bits_list:
        config = msq_fx.MSQConfig(target_compression=32 / bits,
                                  quantization=dict(init_bits=bits, min_bits=bits))
        int_model = msq_fx.convert(msq_fx.prepare(model, inputs, config), inplace=True).eval()
        with torch.no_grad():
            torch.save(int_model(inputs), directory / f"msq{bits}.expected.pt")
        for contender, kernels in CONTENDERS.items():
            if kernels is not None:
                msq_fx.packed_weights.use_kernels(int_model, *kernels)
                msq_fx.save(int_model, contender_file(directory, contender, bits))
        del int_model
    return files


def run_benchmark(args: argparse.Namespace) -> dict:
    """Every (model, width, contender) measured; see the module docstring."""
    report: dict[str, Any] = {"settings": {k: v for k, v in vars(args).items()
                                           if k not in ("json", "markdown", "func")},
                              "torch": torch.__version__, "models": [],
                              # How busy the machine was (1-minute load average).
                              "load_average": {"start": os.getloadavg()[0]}}
    for spec in args.model:
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp)
            files = _prepare_files(spec, args.bits, directory, args.input_size)
            _write_primer(directory)
            runs = [("float", None)] + [(c, b) for b in args.bits for c in args.contenders
                                        if c != "float"]
            measured: dict[tuple, list[ChildResult]] = {run: [] for run in runs}
            for _ in range(args.memory_rounds):
                for contender, bits in runs:
                    expected = directory / ("float.expected.pt" if bits is None
                                            else f"msq{bits}.expected.pt")
                    result = ChildResult(**_spawn(
                        ["child", str(contender_file(directory, contender, bits)), contender,
                         str(directory / "inputs.pt"), str(expected), "2", "1",
                         str(args.threads)], args.threads, f"{spec} {contender} {bits}"))
                    measured[(contender, bits)].append(result)
                    print(f"{spec} {bits or 'float'} {contender}: RSS "
                          f"+{_mib(result.load_added)} MiB loaded, +{_mib(result.rss_added)} "
                          f"MiB after the forwards", file=sys.stderr, flush=True)
            timed = _spawn(["time", str(directory), str(args.rounds), str(args.forwards),
                            str(args.warmup), str(args.threads)]
                           + [_run_name(run) for run in runs], args.threads, f"{spec} timing")
            report["models"].append(_summary(spec, files, measured,
                                             {_run_of(n): t for n, t in timed.items()}))
    report["load_average"]["end"] = os.getloadavg()[0]
    return report


def _summary(spec: str, files: dict, measured: dict[tuple, list[ChildResult]],
             timed: dict[tuple, dict[str, list[float]]]) -> dict:
    rows = []
    for (contender, bits), results in measured.items():
        first = results[0]
        path = contender_file(files["directory"], contender, bits)
        rows.append({
            "contender": contender, "bits": bits,
            "cpu_ms": statistics.median(timed[(contender, bits)]["cpu_ms"]),
            "wall_ms": statistics.median(timed[(contender, bits)]["wall_ms"]),
            "round_cpu_ms": timed[(contender, bits)]["cpu_ms"],
            "rss_added": statistics.median(r.rss_added for r in results),
            "load_added": statistics.median(r.load_added for r in results),
            "tensor_bytes": first.tensor_bytes,
            "file_bytes": path.stat().st_size,
            "max_abs_diff": max(r.max_abs_diff for r in results),
            "children": [asdict(r) for r in results],
        })
    base = rows[0]
    for row in rows:
        for ratio, of in (("time_ratio", "cpu_ms"), ("rss_ratio", "rss_added"),
                          ("tensor_ratio", "tensor_bytes"), ("file_ratio", "file_bytes")):
            # RSS can grow by nothing (a small model in a process that had memory to spare).
            row[ratio] = row[of] / base[of] if base[of] > 0 else float("nan")
    return {"model": spec, "input_shape": files["shape"],
            "float_weight_bytes": files["float_weight_bytes"], "rows": rows}


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f}"


def _table_rows(report: dict) -> list[list[str]]:
    rows = []
    for model in report["models"]:
        for row in model["rows"]:
            rows.append([model["model"].split(":")[-1],
                         "float" if row["bits"] is None else str(row["bits"]),
                         row["contender"],
                         f"{row['cpu_ms']:.1f} ({row['time_ratio']:.2f}x)",
                         f"{_mib(row['rss_added'])} ({row['rss_ratio']:.2f}x)",
                         f"{_mib(row['load_added'])}",
                         f"{_mib(row['tensor_bytes'])} ({row['tensor_ratio']:.3f}x)",
                         f"{row['file_bytes']:,} ({row['file_ratio']:.3f}x)",
                         f"{row['max_abs_diff']:.2g}"])
    return rows


HEADERS = ["model", "bits", "kernels", "ms / forward (vs float)",
           "RSS added, MiB (vs float)", "RSS added by loading alone, MiB",
           "tensors held, MiB (vs float)", "file bytes (vs float)", "max |diff|"]


def markdown_table(report: dict) -> str:
    headers = [header.replace("|", "\\|") for header in HEADERS]  # "max |diff|"
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in _table_rows(report)]
    return "\n".join(lines)


def text_table(report: dict) -> str:
    from tabulate import tabulate

    settings = report["settings"]
    header = (f"batch 1, {settings['threads']} thread(s), torch {report['torch']}; CPU time: "
              f"median over {settings['rounds']} rounds of the fastest of "
              f"{settings['forwards']} forwards, after {settings['warmup']} warm-up")
    load = report.get("load_average")
    if load:
        header += f"; load average {load['start']:.2f} at the start, {load['end']:.2f} at the end"
    return header + "\n" + tabulate(_table_rows(report), headers=HEADERS,
                                    disable_numparse=True)


#: (M, K, N) of the matmuls :func:`aten_kernel_rows` times: vit_b_16's MLP at batch 1 (197
#: tokens) and one token.
KERNEL_SHAPES = ((197, 768, 3072), (1, 768, 3072))


def _cpu_ms(run, seconds: float = 0.5) -> float:
    """The fastest CPU time of ``run()`` over about ``seconds`` of calls, in ms."""
    run()
    best, spent = float("inf"), 0.0
    while spent < seconds:
        start = time.process_time()
        run()
        took = time.process_time() - start
        best, spent = min(best, took), spent + took
    return 1e3 * best


def aten_kernel_rows(shapes=KERNEL_SHAPES, seed: int = SEED) -> list[list[str]]:
    """PyTorch's weight-only packed CPU kernels against a float ``F.linear``, on 4-bit codes with
    one step per output channel (which both kernels represent exactly): per shape and
    activation dtype, each kernel's fastest CPU time, its ratio to ``F.linear`` of the
    dequantized weight in that dtype, and its largest difference from the float32 result."""
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(seed)
    rows = []
    for m, k, n in shapes:
        codes = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=generator)
        step = torch.rand(n, generator=generator) / 64
        x = torch.randn(m, k, generator=generator)
        reference = F.linear(x, codes.float() * step[:, None])
        int4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int() + 8, 1)
        group = min(k, 128)
        for dtype in (torch.float32, torch.bfloat16):
            xd, stepd = x.to(dtype), step.to(dtype)
            weight = (codes.float() * step[:, None]).to(dtype)
            scales_and_zeros = torch.zeros(k // group, n, 2, dtype=dtype)
            scales_and_zeros[..., 0] = stepd
            kernels = {
                "F.linear, float weight": lambda: F.linear(xd, weight),
                "dequantize + F.linear": lambda: F.linear(xd, codes.to(dtype) * stepd[:, None]),
                "_weight_int8pack_mm": lambda: torch.ops.aten._weight_int8pack_mm(xd, codes,
                                                                                  stepd),
                "_weight_int4pack_mm_for_cpu": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
                    xd, int4, group, scales_and_zeros),
            }
            base = None
            for name, run in kernels.items():
                took = _cpu_ms(run)
                base = took if base is None else base
                difference = float((run().float() - reference).abs().max())
                rows.append([f"{m}x{k}x{n}", str(dtype).removeprefix("torch."), name,
                             f"{took:.3f}", f"{took / base:.2f}x", f"{difference:.2g}"])
    return rows


KERNEL_HEADERS = ["M x K x N", "activations", "kernel", "ms (CPU)", "vs F.linear",
                  "max |diff| from float32"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from msq_fx.cli import parse_input_size

    parser = argparse.ArgumentParser(prog="bench_inference",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", default=None,
                        help=f"any msq-fx check SPEC; repeat for several (default "
                             f"{', '.join(DEFAULT_MODELS)})")
    parser.add_argument("--input-size", type=parse_input_size, default=None,
                        help="CxHxW (default: the size the model declares)")
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4],
                        help="widths, every quantized weight at one (default 8 4)")
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS),
                        choices=list(CONTENDERS), help="(float is always run)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="timing rounds, each running every contender in turn")
    parser.add_argument("--forwards", type=int, default=2,
                        help="timed forwards per contender and round")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed forwards per contender before the first round")
    parser.add_argument("--memory-rounds", type=int, default=1,
                        help="memory children per contender")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--aten-kernels", action="store_true",
                        help="instead: time PyTorch's packed weight-only CPU kernels against "
                             "F.linear on single matmuls (in this process)")
    args = parser.parse_args(argv)
    args.model = args.model or list(DEFAULT_MODELS)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["child"]:
        path, contender, inputs, expected, forwards, warmup, threads = argv[1:8]
        result = run_child(path, contender, inputs, expected, int(forwards), int(warmup),
                           int(threads))
        print(json.dumps(asdict(result)))
        return 0
    if argv[:1] == ["time"]:
        directory, rounds, forwards, warmup, threads = argv[1:6]
        print(json.dumps(run_timing(directory, [_run_of(name) for name in argv[6:]], int(rounds),
                                    int(forwards), int(warmup), int(threads))))
        return 0
    args = parse_args(argv)
    if args.aten_kernels:
        from tabulate import tabulate

        torch.set_num_threads(args.threads)
        rows = aten_kernel_rows()
        print(tabulate(rows, headers=KERNEL_HEADERS, disable_numparse=True,
                       tablefmt="github" if args.markdown else "simple"))
        return 0
    report = run_benchmark(args)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(markdown_table(report) if args.markdown else text_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
