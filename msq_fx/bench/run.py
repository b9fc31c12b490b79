"""One benchmark run: build the workload and contenders, warm up, time and measure them, and
gather everything into the report (a JSON-ready dict)."""
from __future__ import annotations

import argparse
import platform
import statistics

import torch

from .contenders import (AUTOCAST_DTYPES, SAVED_COPIES, build_contenders,
                         enable_grad_checkpointing, train_step)
from .hessian import hessian_costs
from .memory import step_peak_bytes
from .timing import eval_forward_times, interleaved_step_times
from .workloads import SEED, build_workload, random_batch

__all__ = ["run_benchmark"]


def run_benchmark(args: argparse.Namespace) -> dict:
    """The report of the run ``args`` (from :func:`msq_fx.bench.cli.parse_args`) describes."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(SEED)
    workload = build_workload(args.model, args.input_size)
    batch = random_batch(args.batch_size, workload, device)
    contenders = build_contenders(workload, batch[0], device, args.compare_recompute,
                                  AUTOCAST_DTYPES.get(args.autocast))
    if args.grad_checkpointing:
        enable_grad_checkpointing(contenders, args.model)
    for contender in contenders:
        for _ in range(args.warmup):
            train_step(contender, *batch)
    times = interleaved_step_times(contenders, batch, args.repeats, args.steps, device)
    results = {c.name: {"median_ms_per_step": 1e3 * statistics.median(times[c.name]),
                        "repeat_ms_per_step": [1e3 * t for t in times[c.name]],
                        "peak_bytes": step_peak_bytes(c, batch, device)}
               for c in contenders}
    fp, msq = results["FP32"], results["MSQ"]
    ratios = {name: {"time": r["median_ms_per_step"] / fp["median_ms_per_step"],
                     "peak_memory": r["peak_bytes"] / fp["peak_bytes"]}
              for name, r in results.items() if name != "FP32"}
    report = {
        "model": args.model,
        "input_shape": list(workload.input_shape),
        "batch_size": args.batch_size,
        "autocast": args.autocast,
        "grad_checkpointing": args.grad_checkpointing,
        "repeats": args.repeats,
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "memory_measure": ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
                           "resident state + profiler allocation running-sum peak"),
        "results": results,
        "ratio_msq_over_fp": ratios["MSQ"],
    }
    if SAVED_COPIES in ratios:
        report["ratio_msq_weights_saved_over_fp"] = ratios[SAVED_COPIES]
    if args.hessian:
        qmodel = contenders[1]
        costs = hessian_costs(qmodel.model, qmodel.optimizer, batch, args, device)
        report["probes"] = args.probes
        report["hessian"] = costs
        report["ratio_hessian_over_msq_step"] = {
            method: {"time": cost["median_ms"] / msq["median_ms_per_step"],
                     "peak_memory": cost["peak_bytes"] / msq["peak_bytes"]}
            for method, cost in costs.items()}
    if args.eval:
        times = eval_forward_times(contenders[0].model, contenders[1].model, batch[0], args,
                                   device)
        medians = {name: 1e3 * statistics.median(runs) for name, runs in times.items()}
        report["eval"] = {name: {"median_ms_per_forward": medians[name],
                                 "repeat_ms_per_forward": [1e3 * t for t in runs],
                                 "time_over_fp": medians[name] / medians["FP32"]}
                          for name, runs in times.items()}
    return report
