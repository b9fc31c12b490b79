"""One benchmark run: build the workload and contenders, warm up, time and measure them, and
gather everything into the report (a JSON-ready dict)."""
from __future__ import annotations

import argparse
import platform
import statistics

import torch

from .allocator import keep_freed_heap
from .conditions import Conditions
from .contenders import (AUTOCAST_DTYPES, SAVED_COPIES, build_contenders,
                         enable_grad_checkpointing, train_step)
from .hessian import hessian_costs
from .memory import step_peak_bytes
from .peers import build_peers
from .profiling import op_times
from .timing import CLOCKS, eval_forward_times, interleaved_step_times
from .workloads import SEED, build_workload, random_batch

__all__ = ["run_benchmark", "msq_against"]


def run_benchmark(args: argparse.Namespace) -> dict:
    """The report of the run ``args`` (from :func:`msq_fx.bench.cli.parse_args`) describes."""
    conditions = Conditions.start()
    if args.keep_freed_heap and not keep_freed_heap():
        raise SystemExit("--keep-freed-heap: this malloc is not glibc's")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(SEED)
    workload = build_workload(args.model, args.input_size)
    batch = random_batch(args.batch_size, workload, device)
    autocast = AUTOCAST_DTYPES.get(args.autocast)
    contenders = build_contenders(workload, batch[0], device, args.compare_recompute, autocast)
    skipped_peers: dict[str, str] = {}
    if args.peers:  # from the float model before any step, like the MSQ contenders
        peers, skipped_peers = build_peers(contenders[0].model, batch[0], autocast)
        contenders += peers
    if args.grad_checkpointing:
        enable_grad_checkpointing(contenders, args.model)
    if args.compile:
        for contender in contenders:
            contender.model = torch.compile(contender.model)
    for contender in contenders:
        for _ in range(args.warmup):
            train_step(contender, *batch)
    faults: dict[str, int] = {}
    times = interleaved_step_times(contenders, batch, args.repeats, args.steps, device,
                                   CLOCKS[args.clock], faults)
    results = {c.name: {"median_ms_per_step": 1e3 * statistics.median(times[c.name]),
                        "repeat_ms_per_step": [1e3 * t for t in times[c.name]],
                        "minor_faults_per_step": faults[c.name] / (args.repeats * args.steps),
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
        "compile": args.compile,
        "repeats": args.repeats,
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": torch.get_num_threads(),
        "clock": args.clock,
        "keep_freed_heap": args.keep_freed_heap,
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "memory_measure": ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
                           "resident state + profiler allocation running-sum peak"),
        "results": results,
        "ratios_over_fp": ratios,
        "ratio_msq_over_fp": ratios["MSQ"],
    }
    if SAVED_COPIES in ratios:
        report["ratio_msq_weights_saved_over_fp"] = ratios[SAVED_COPIES]
    if args.peers:
        report["peers"] = [c.name for c in contenders[len(contenders) - len(peers):]]
        report["skipped_peers"] = skipped_peers
        report["msq_against_peers"] = {name: msq_against(results, name)
                                       for name in report["peers"]}
    if args.profile:
        report["profile_steps"], report["profile_top"] = args.profile_steps, args.profile
        report["profile"] = {c.name: op_times(c, batch, args.profile_steps) for c in contenders}
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
    report["conditions"] = conditions.as_dict()
    return report


def msq_against(results: dict, peer: str) -> dict:
    """How MSQ compares with ``peer``: its step time as a multiple of MSQ's, MSQ's peak as a
    fraction of its peak, and the time each adds to the float step (ms), with their ratio
    (None when MSQ adds nothing measurable)."""
    fp, msq, other = results["FP32"], results["MSQ"], results[peer]
    msq_extra = msq["median_ms_per_step"] - fp["median_ms_per_step"]
    peer_extra = other["median_ms_per_step"] - fp["median_ms_per_step"]
    return {"peer_time_over_msq": other["median_ms_per_step"] / msq["median_ms_per_step"],
            "msq_peak_over_peer": msq["peak_bytes"] / other["peak_bytes"],
            "msq_extra_ms": msq_extra, "peer_extra_ms": peer_extra,
            "peer_extra_over_msq_extra": peer_extra / msq_extra if msq_extra > 0 else None}
