"""The fidelity table: every row's result side by side, as Markdown."""
from __future__ import annotations

import json
import re
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import NamedTuple

from tabulate import tabulate

from .rows import ROWS, TARGETS, Target, result_stem

__all__ = ["load_results", "load_seeds", "markdown_table", "runs_table", "seeds_table",
           "targets_table", "targets_summary", "paired_runs", "PairedRuns", "target_shortfall",
           "target_verdict", "mean_with_standard_error", "environments_text",
           "runs_from_other_starts"]


def load_results(out: Path, seed: int = 0) -> dict[str, dict]:
    """The results written so far under ``seed``, by row name."""
    results = {}
    for name in ROWS:
        path = out / "rows" / f"{result_stem(name, seed)}.json"
        if path.exists():
            results[name] = json.loads(path.read_text())
    return results


def load_seeds(out: Path) -> dict[str, dict[int, dict]]:
    """Every result written so far, by row name and then seed."""
    seeds = sorted({0} | {int(match.group(1)) for path in (out / "rows").glob("*.seed*.json")
                          if (match := re.search(r"\.seed(\d+)\.json$", path.name))})
    by_row: dict[str, dict[int, dict]] = {}
    for seed in seeds:
        for name, result in load_results(out, seed).items():
            by_row.setdefault(name, {})[seed] = result
    return by_row


def runs_from_other_starts(by_row: dict[str, dict[int, dict]], digest: str) -> list[str]:
    """The runs in ``by_row`` that record a float start other than ``digest``, as "row seed N
    (start D)". A result written before runs recorded their start (no ``float_start``) is not
    among them: there is nothing to compare."""
    return [f"{name} seed {seed} (start {result['float_start']})"
            for name, runs in by_row.items() for seed, result in sorted(runs.items())
            if result.get("float_start", digest) != digest]


def markdown_table(results: dict[str, dict], float_row: dict | None) -> str:
    """One line per row in ROWS' order; rows not yet run say so."""
    lines = []
    if float_row is not None:
        lines.append(["float start", float_row.get("what", ""), "", "1x",
                      _pct(float_row.get("test_acc")),
                      _pct(float_row.get("exact_acc")), "", "", float_row.get("command", "")])
    for name, spec in ROWS.items():
        result = results.get(name)
        if result is None:
            lines.append([name, spec.description, "", "not run", "", "", "", "",
                          f"`tools/fidelity row {name}`"])
            continue
        lines.append([name, spec.description, result.get("scale") or "",
                      *_result_cells(result)])
    return tabulate(lines, headers=["row", "what", "scale", *RESULT_HEADERS], tablefmt="github")


def runs_table(by_row: dict[str, dict[int, dict]]) -> str:
    """Every run, one line each, in ROWS' order and then by seed: the rows of a budget other
    than the table's own, where only some rows ran."""
    lines = [[name, seed, *_result_cells(runs[seed])]
             for name, runs in sorted(by_row.items(), key=lambda item: row_position(item[0]))
             for seed in sorted(runs)]
    return tabulate(lines, headers=["row", "seed", *RESULT_HEADERS], tablefmt="github")


RESULT_HEADERS = ["compression", "all 10k", "exact 1k", "steps to target", "wall time",
                  "command"]


def _result_cells(result: dict) -> list[str]:
    """A run's cells under RESULT_HEADERS."""
    target_step = result["target_step"]
    return [f"{result['compression']:.2f}x", _pct(result["test_acc"]), _pct(result["exact_acc"]),
            "not reached" if target_step is None else str(target_step),
            f"{result['seconds'] / 60:.0f} min", f"`{result['command']}`"]


def row_position(name: str) -> int:
    """Where ``name`` stands in ROWS' order (rows no longer defined last)."""
    return list(ROWS).index(name) if name in ROWS else len(ROWS)


def seeds_table(by_row: dict[str, dict[int, dict]]) -> str:
    """The rows run under more than one seed: each seed's accuracy on all 10k, their mean and
    sample standard deviation, and the mean on the exact 1k; empty when no row has two."""
    lines = []
    for name in ROWS:
        runs = by_row.get(name, {})
        if len(runs) < 2:
            continue
        test = [runs[seed]["test_acc"] for seed in sorted(runs)]
        exact = [runs[seed]["exact_acc"] for seed in sorted(runs)
                 if runs[seed]["exact_acc"] is not None]
        compression = [runs[seed]["compression"] for seed in sorted(runs)]
        lines.append([name, ", ".join(map(str, sorted(runs))),
                      " / ".join(f"{value:.2f}" for value in test),
                      f"{statistics.mean(test):.2f} ± {statistics.stdev(test):.2f}",
                      _pct(statistics.mean(exact)) if exact else "",
                      _compression_range(compression)])
    if not lines:
        return ""
    return tabulate(lines, headers=["row", "seeds", "all 10k by seed", "all 10k mean ± sd",
                                    "exact 1k mean", "compression"], tablefmt="github")


class PairedRuns(NamedTuple):
    """A target's MSQ and uniform rows at the seeds both ran (a seed is a data order, so the
    rows are compared in pairs)."""

    seeds: list[int]
    msq_acc: list[float]
    uniform_acc: list[float]
    compression: list[float]
    mixed: list[bool | None]  # None: a run that recorded no widths

    @property
    def differences(self) -> list[float]:
        return [msq - uniform for msq, uniform in zip(self.msq_acc, self.uniform_acc)]

    def mean_difference(self) -> str:
        """``"+0.11 ± 0.21"``: the mean paired difference and, from two seeds, its standard
        error."""
        return mean_with_standard_error(self.differences)


def mean_with_standard_error(differences: list[float]) -> str:
    """``"+0.11 ± 0.21"``: the mean of ``differences`` (at least one) and, from two, the
    standard error of that mean."""
    spread = f" ± {_standard_error(differences):.2f}" if len(differences) > 1 else ""
    return f"{statistics.mean(differences):+.2f}{spread}"


def paired_runs(target: Target, by_row: dict[str, dict[int, dict]]) -> PairedRuns | None:
    """``target``'s rows at the seeds both ran, or None while they share no seed."""
    msq, uniform = by_row.get(target.msq_row, {}), by_row.get(target.uniform_row, {})
    seeds = sorted(set(msq) & set(uniform))
    if not seeds:
        return None
    return PairedRuns(seeds, [msq[seed]["test_acc"] for seed in seeds],
                      [uniform[seed]["test_acc"] for seed in seeds],
                      [msq[seed]["compression"] for seed in seeds],
                      [_is_mixed(msq[seed].get("bits")) for seed in seeds])


def targets_table(by_row: dict[str, dict[int, dict]], float_acc: float | None) -> str:
    """Each target's MSQ row against its uniform row, seed by seed over the seeds both ran,
    with the verdict of :func:`target_verdict`; targets whose rows share no seed yet say so."""
    lines = []
    for target in TARGETS:
        runs = paired_runs(target, by_row)
        if runs is None:
            lines.append([target.label, f"`{target.msq_row}`", f"`{target.uniform_row}`",
                          "", "", "", "", "", "", "", "not run"])
            continue
        lines.append([
            target.label, f"`{target.msq_row}`", f"`{target.uniform_row}`",
            ", ".join(map(str, runs.seeds)),
            f"{statistics.mean(runs.msq_acc):.2f} at {_compression_range(runs.compression)}",
            _mixed_widths(runs),
            f"{statistics.mean(runs.uniform_acc):.2f}",
            ", ".join(f"{value:+.2f}" for value in runs.differences),
            runs.mean_difference(), _msq_minus_float(runs, float_acc),
            target_verdict(target, runs.differences, runs.msq_acc, float_acc)])
    return tabulate(lines, headers=["target", "MSQ (the fine_tuning preset)", "uniform QAT",
                                    "seeds", "MSQ mean", "MSQ widths", "uniform mean",
                                    "MSQ - uniform by seed", "mean ± se", "MSQ - float",
                                    "met"], tablefmt="github", disable_numparse=True)


def targets_summary(budgets: dict[str, dict[str, dict[int, dict]]],
                    float_acc: float | None,
                    float_by_budget: dict[str, float | None] | None = None) -> str:
    """The targets in brief, one line per target and budget (``budgets`` maps a budget's name
    to its rows by seed): the README's view of the targets tables. Each budget is judged
    against ``float_acc``, or against its own float start's accuracy where
    ``float_by_budget`` names one."""
    float_by_budget = float_by_budget or {}
    lines = []
    for target in TARGETS:
        for budget, by_row in budgets.items():
            runs = paired_runs(target, by_row)
            if runs is None:
                lines.append([target.label, budget, "", "", "", "", "", "not run"])
                continue
            start_acc = float_by_budget.get(budget, float_acc)
            met = target_shortfall(target, runs.differences, runs.msq_acc, start_acc) is None
            lines.append([target.label, budget, len(runs.seeds),
                          _compression_range(runs.compression), _mixed_widths(runs),
                          runs.mean_difference(),
                          _msq_minus_float(runs, start_acc), "yes" if met else "no"])
    return tabulate(lines, headers=["target", "budget", "seeds", "MSQ compression", "MSQ widths",
                                    "MSQ - uniform QAT (mean ± se)", "MSQ - float", "met"],
                    tablefmt="github", disable_numparse=True)


def target_shortfall(target: Target, differences: list[float], msq_acc: list[float],
                     float_acc: float | None) -> str | None:
    """Why MSQ missed ``target`` on the mean of its paired seeds (not at least level with
    uniform QAT, not above it past 16x, or further under the float start than the target's
    margin), or None when it met it."""
    mean = statistics.mean(differences)
    if (mean <= 0) if target.must_exceed else (mean < 0):
        needed = "above" if target.must_exceed else "at least level with"
        return f"{mean:+.2f} on the mean, not {needed} uniform"
    if target.float_margin is not None and float_acc is not None:
        gap = float_acc - statistics.mean(msq_acc)
        if gap > target.float_margin:
            return f"{gap:.2f} under float (margin {target.float_margin})"
    return None


def target_verdict(target: Target, differences: list[float], msq_acc: list[float],
                   float_acc: float | None) -> str:
    """:func:`target_shortfall` as the targets table says it, with how many seeds MSQ was above
    uniform QAT at and whether the mean is within one standard error of level."""
    above = sum(value > 0 for value in differences)
    against_uniform = f"above uniform at {above} of {len(differences)} seeds"
    if len(differences) > 1 and abs(statistics.mean(differences)) < _standard_error(differences):
        against_uniform += "; the mean within one standard error of level"
    shortfall = target_shortfall(target, differences, msq_acc, float_acc)
    return f"no: {shortfall}; {against_uniform}" if shortfall else f"yes; {against_uniform}"


def _mixed_widths(runs: PairedRuns) -> str:
    """Whether MSQ's widths ended mixed or every layer at one width (then MSQ's gain or loss is
    its road to uniform widths, not its allocation)."""
    if None in runs.mixed:
        return ""
    mixed = sum(runs.mixed)
    if mixed == len(runs.mixed):
        return "mixed"
    return "uniform" if not mixed else f"mixed at {mixed} of {len(runs.mixed)} seeds"


def _is_mixed(bits: dict[str, int] | None) -> bool | None:
    return None if not bits else len(set(bits.values())) > 1


def _msq_minus_float(runs: PairedRuns, float_acc: float | None) -> str:
    return "" if float_acc is None else f"{statistics.mean(runs.msq_acc) - float_acc:+.2f}"


def environments_text(by_row: dict[str, dict[int, dict]]) -> str:
    """What the runs in ``by_row`` ran on, one environment per line with how many runs, the
    most first: the torch build, the CPU kernels it dispatched to and the CPU's name, family /
    model / stepping and vector flags (runs recorded before the CPU was, say so). Same-seed
    runs with the same decisions came out 0.5-0.9 points apart across environments, so a
    comparison is only as clean as this list is short.

    A run recorded before the CPU's name was counts with the one named environment that agrees
    with it on everything else, and its line says how many such runs it holds; where several
    named environments agree with it, it keeps its own line."""
    environments = [result.get("environment") or {}
                    for runs in by_row.values() for result in runs.values()]
    named_lines: dict[str, set[str]] = defaultdict(set)
    for environment in environments:
        if _cpu_name(environment):
            named_lines[_environment_line(environment, with_name=False)].add(
                _environment_line(environment))
    counts: Counter = Counter()
    unnamed: Counter = Counter()
    for environment in environments:
        line = _environment_line(environment)
        candidates = named_lines.get(line, set()) if not _cpu_name(environment) else set()
        if len(candidates) == 1:
            line = next(iter(candidates))
            unnamed[line] += 1
        counts[line] += 1
    return "\n".join(
        f"- {count} run{'s' if count > 1 else ''}: {line}"
        + (f" ({unnamed[line]} of them recorded before the CPU's name was)" if unnamed[line]
           else "")
        for line, count in counts.most_common())


def _cpu_name(environment: dict) -> str | None:
    return (environment.get("cpu") or {}).get("name")


def _environment_line(environment: dict, with_name: bool = True) -> str:
    """One environment record as text (without the CPU's name unless ``with_name``)."""
    if not environment:
        return "environment not recorded"
    cpu = environment.get("cpu")
    if not cpu:
        where = "CPU not recorded"
    else:  # runs recorded before the name was have the family and model only
        name = f"{cpu['name']}, " if cpu.get("name") and with_name else ""
        where = (f"{name}CPU family {cpu.get('family')} model {cpu.get('model')} stepping "
                 f"{cpu.get('stepping')} ({' '.join(cpu.get('flags', [])) or 'no vector flags'})")
    return (f"torch {environment.get('torch', 'not recorded')}, "
            f"{environment.get('cpu_capability', 'kernels not recorded')} kernels, "
            f"{environment.get('threads', '?')} thread(s), {where}"
            + (", compiled" if environment.get("compiled") else ""))


def _standard_error(values: list[float]) -> float:
    """The standard error of the mean of ``values`` (at least two)."""
    return statistics.stdev(values) / len(values) ** 0.5


def _compression_range(values: list[float]) -> str:
    """``"16.04x"``, or ``"16.04-17.14x"`` when the runs ended at different compressions."""
    low, high = min(values), max(values)
    return f"{low:.2f}-{high:.2f}x" if high - low > 0.005 else f"{low:.2f}x"


def _pct(value) -> str:
    return "" if value is None else f"{value:.2f}"
