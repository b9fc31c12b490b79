"""The report as a text table: median time and peak per contender with the ratios to float,
then the pruning-step costs (``--hessian``) and the eval forwards (``--eval``) when measured."""
from __future__ import annotations

from tabulate import tabulate

from .contenders import SAVED_COPIES

__all__ = ["MIB", "format_table"]

MIB = 2**20


def format_table(report: dict) -> str:
    """The report (as :func:`msq_fx.bench.run.run_benchmark` returns it) as a header line and
    aligned tables."""
    rows = [[name, f"{r['median_ms_per_step']:.1f}", f"{r['peak_bytes'] / MIB:.1f}"]
            for name, r in report["results"].items()]
    for label, key in (("MSQ / FP32", "ratio_msq_over_fp"),
                       (f"{SAVED_COPIES} / FP32", "ratio_msq_weights_saved_over_fp")):
        if key in report:
            ratio = report[key]
            rows.append([label, f"{ratio['time']:.2f}x", f"{ratio['peak_memory']:.2f}x"])
    table = tabulate(rows, headers=["", "median ms/step", "peak MiB"], disable_numparse=True,
                     colalign=("left", "right", "right"))
    shape = "x".join(str(side) for side in report["input_shape"])
    header = (f"{report['model']} ({shape}), batch {report['batch_size']}, "
              f"{report['repeats']} repeats x {report['steps']} steps after {report['warmup']} "
              f"warm-up, device {report['device']}, torch {report['torch']}, "
              f"{report['threads']} threads"
              + (f", autocast {report['autocast']}" if report.get("autocast") else "")
              + (", activation checkpointing" if report.get("grad_checkpointing") else ""))
    text = f"{header}\n{table}"
    if "hessian" in report:
        text += "\n\n" + _hessian_table(report)
    if "eval" in report:
        text += "\n\n" + _eval_table(report)
    return text


def _eval_table(report: dict) -> str:
    rows = [[name, f"{run['median_ms_per_forward']:.1f}", f"{run['time_over_fp']:.2f}x"]
            for name, run in report["eval"].items()]
    return tabulate(rows, headers=["eval forward, no_grad", "median ms", "time / FP32"],
                    disable_numparse=True, colalign=("left", "right", "right"))


def _hessian_table(report: dict) -> str:
    rows = []
    for method, cost in report["hessian"].items():
        ratio = report["ratio_hessian_over_msq_step"][method]
        rows.append([f"pruning step, H v by {method}", f"{cost['median_ms']:.1f}",
                     f"{cost['peak_bytes'] / MIB:.1f}", f"{ratio['time']:.2f}x",
                     f"{ratio['peak_memory']:.2f}x"])
    return tabulate(rows, headers=[f"{report['probes']} probe(s), same batch", "median ms",
                                   "peak MiB", "time / MSQ step", "peak / MSQ step"],
                    disable_numparse=True, colalign=("left", "right", "right", "right", "right"))
