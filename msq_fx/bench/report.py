"""The report as a text table: median time and peak per contender with the ratios to float,
then the pruning-step costs (``--hessian``) and the eval forwards (``--eval``) when measured."""
from __future__ import annotations

from tabulate import tabulate

from .contenders import SAVED_COPIES
from .profiling import top_ops

__all__ = ["MIB", "format_table", "step_rows", "peer_rows", "header_line", "conditions_line",
           "profile_rows", "profile_headers", "STEP_HEADERS", "PEER_HEADERS"]

MIB = 2**20


STEP_HEADERS = ["", "median ms/step", "peak MiB", "time / FP32", "peak / FP32",
                "page faults/step"]
PEER_HEADERS = ["MSQ against", "step time / MSQ's", "MSQ peak / its peak",
                "ms over FP32: its / MSQ's"]


def step_rows(report: dict) -> list[list[str]]:
    """One row per contender: median time, peak, and both as ratios to FP32."""
    ratios = {"FP32": {"time": 1.0, "peak_memory": 1.0}, **report.get("ratios_over_fp", {})}
    rows = []
    for name, result in report["results"].items():
        ratio = ratios.get(name) or report.get(_LEGACY_RATIO_KEYS.get(name, ""), {})
        rows.append([name, f"{result['median_ms_per_step']:.1f}",
                     f"{result['peak_bytes'] / MIB:.1f}",
                     f"{ratio['time']:.2f}x" if ratio else "",
                     f"{ratio['peak_memory']:.2f}x" if ratio else "",
                     f"{result['minor_faults_per_step']:.0f}"
                     if "minor_faults_per_step" in result else ""])
    return rows


# Reports written before ratios_over_fp held every ratio.
_LEGACY_RATIO_KEYS = {"MSQ": "ratio_msq_over_fp", SAVED_COPIES: "ratio_msq_weights_saved_over_fp"}


def peer_rows(report: dict) -> list[list[str]]:
    """One row per peer: its step time as a multiple of MSQ's, MSQ's peak as a fraction of its
    peak, and the ratio of the time each adds to the float step."""
    rows = []
    for name, against in report.get("msq_against_peers", {}).items():
        extra = against["peer_extra_over_msq_extra"]
        rows.append([name, f"{against['peer_time_over_msq']:.2f}x",
                     f"{against['msq_peak_over_peer']:.2f}",
                     f"{against['peer_extra_ms']:.1f} / {against['msq_extra_ms']:.1f} ms"
                     + (f" = {extra:.1f}x" if extra is not None else "")])
    return rows


def header_line(report: dict) -> str:
    shape = "x".join(str(side) for side in report["input_shape"])
    return (f"{report['model']} ({shape}), batch {report['batch_size']}, "
            f"{report['repeats']} repeats x {report['steps']} steps after {report['warmup']} "
            f"warm-up, device {report['device']}, torch {report['torch']}, "
            f"{report['threads']} threads"
            + (f", {report['clock']} clock" if report.get("clock", "wall") != "wall" else "")
            + (", freed heap kept" if report.get("keep_freed_heap") else "")
            + (f", autocast {report['autocast']}" if report.get("autocast") else "")
            + (", activation checkpointing" if report.get("grad_checkpointing") else "")
            + (", torch.compile" if report.get("compile") else ""))


def conditions_line(report: dict) -> str:
    """The machine and how busy other processes kept it, in words."""
    conditions = report.get("conditions")
    if not conditions:
        return ""
    other = conditions["other_processes_cores"]
    load = conditions["load_average_start"], conditions["load_average_end"]
    return (f"{conditions['machine']}; "
            + (f"other processes kept {other:.2f} cores busy on average; " if other is not None
               else "")
            + (f"1-minute load average {load[0][0]} at the start, {load[1][0]} at the end; "
               if None not in load else "")
            + f"{conditions['wall_seconds']:.0f} s")


def format_table(report: dict) -> str:
    """The report (as :func:`msq_fx.bench.run.run_benchmark` returns it) as a header line and
    aligned tables."""
    table = tabulate(step_rows(report), headers=STEP_HEADERS, disable_numparse=True,
                     colalign=("left",) + ("right",) * (len(STEP_HEADERS) - 1))
    text = f"{header_line(report)}\n{table}"
    if report.get("msq_against_peers"):
        text += "\n\n" + tabulate(peer_rows(report), headers=PEER_HEADERS,
                                   disable_numparse=True,
                                   colalign=("left", "right", "right", "right"))
    for name, reason in report.get("skipped_peers", {}).items():
        text += f"\nnot run: {name}: {reason}"
    if "profile" in report:
        text += "\n\n" + tabulate(profile_rows(report), headers=profile_headers(report),
                                   disable_numparse=True)
    if "hessian" in report:
        text += "\n\n" + _hessian_table(report)
    if "eval" in report:
        text += "\n\n" + _eval_table(report)
    if report.get("conditions"):
        text += "\n\n" + conditions_line(report)
    return text


#: The contenders whose op times the profile table lists side by side.
PROFILED_COLUMNS = ("FP32", "MSQ", SAVED_COPIES)


def profile_headers(report: dict) -> list[str]:
    names = [name for name in PROFILED_COLUMNS if name in report["profile"]]
    return (["op (self time, lowest of the steps)"] + [f"{name} ms" for name in names]
            + ["MSQ calls"])


def profile_rows(report: dict) -> list[list[str]]:
    """The N ops with the most self time in the MSQ step (``--profile N``), then the N that the
    float step does not run, with each listed contender's self time per step and MSQ's calls
    per step, and the sums over all ops."""
    profile = report["profile"]
    names = [name for name in PROFILED_COLUMNS if name in profile]
    msq, count = profile["MSQ"], report["profile_top"]
    only_msq = {"MSQ": {op: t for op, t in msq.items() if op not in profile["FP32"]}}
    ops = top_ops(profile, "MSQ", count)
    ops += [op for op in top_ops(only_msq, "MSQ", count) if op not in ops]
    rows = [[op] + [f"{profile[name][op]['self_ms']:.2f}" if op in profile[name] else "-"
                    for name in names] + [f"{msq[op]['calls']:g}"] for op in ops]
    totals = [sum(op["self_ms"] for op in profile[name].values()) for name in names]
    return rows + [["all ops"] + [f"{total:.2f}" for total in totals] + [""]]


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
