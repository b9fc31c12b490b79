"""Two rows compared seed by seed (``tools/fidelity compare``): what each run ended with, and the
per-layer traces both took at the same prunes.

Two rows that differ only in how the curvature is estimated (``hessian.curvature``, or
``hessian.trace_margin``) train identically up to their first prune, when run in the same
environment, so at that prune both estimates are of the same weights: how often each comes out
below zero, and how alike the two rank the layers, says what the other decisions rest on; and
the difference of their accuracies is what those decisions alone made of it.
"""
from __future__ import annotations

from typing import Sequence

from tabulate import tabulate

from .table import mean_with_standard_error, row_position

__all__ = ["prune_traces", "rank_correlation", "trace_comparison", "trace_comparison_table",
           "outcome_table", "repeat_table"]


def prune_traces(result: dict) -> dict[int, dict[str, float]]:
    """A row result's recorded traces: prune step -> group -> trace (prunes without one left
    out)."""
    by_step: dict[int, dict[str, float]] = {}
    for record in result.get("history", []):
        if record.get("hessian_trace") is not None:
            by_step.setdefault(record["step"], {})[record["group"]] = record["hessian_trace"]
    return by_step


def rank_correlation(first: Sequence[float], second: Sequence[float]) -> float:
    """Spearman's rho of two equally long sequences (ties ranked in order of appearance; the
    traces compared are real-valued estimates, where ties do not occur)."""
    if len(first) != len(second) or len(first) < 2:
        raise ValueError(f"need two sequences of the same length >= 2, got {len(first)} and "
                         f"{len(second)}")
    ranks = [_ranks(first), _ranks(second)]
    count = len(first)
    squared = sum((a - b) ** 2 for a, b in zip(*ranks))
    return 1 - 6 * squared / (count * (count**2 - 1))


def _ranks(values: Sequence[float]) -> list[int]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0] * len(values)
    for rank, index in enumerate(order):
        ranks[index] = rank
    return ranks


def trace_comparison(first: dict[int, dict], second: dict[int, dict]) -> list[dict]:
    """One entry per seed both rows ran and prune step both recorded, over the groups both
    traced there: the seed, the step, the group count, each row's count of negative traces,
    and Spearman's rho between the two rows' traces."""
    rows = []
    for seed in sorted(set(first) & set(second)):
        steps_first, steps_second = prune_traces(first[seed]), prune_traces(second[seed])
        for step in sorted(set(steps_first) & set(steps_second)):
            groups = sorted(set(steps_first[step]) & set(steps_second[step]))
            if len(groups) < 2:
                continue
            a = [steps_first[step][g] for g in groups]
            b = [steps_second[step][g] for g in groups]
            rows.append({"seed": seed, "step": step, "groups": len(groups),
                         "negative_first": sum(t < 0 for t in a),
                         "negative_second": sum(t < 0 for t in b),
                         "rank_correlation": rank_correlation(a, b)})
    return rows


def trace_comparison_table(names: tuple[str, str], comparison: list[dict]) -> str:
    """:func:`trace_comparison` as a Markdown table headed by the two rows' names."""
    first, second = names
    return tabulate([[c["seed"], c["step"], c["groups"], c["negative_first"],
                      c["negative_second"], f"{c['rank_correlation']:.2f}"] for c in comparison],
                    headers=["seed", "prune step", "groups", f"negative: {first}",
                             f"negative: {second}", "Spearman rho"],
                    tablefmt="github", disable_numparse=True)


def outcome_table(names: tuple[str, str], first: dict[int, dict], second: dict[int, dict]) -> str:
    """Per seed both rows ran: each run's compression, accuracy on all 10k and its binary (1-bit)
    layers, and the second's accuracy minus the first's; then the mean difference (± its
    standard error from two seeds) as a last line."""
    seeds = sorted(set(first) & set(second))
    lines, differences = [], []
    for seed in seeds:
        a, b = first[seed], second[seed]
        differences.append(b["test_acc"] - a["test_acc"])
        lines.append([seed, *_outcome_cells(a), *_outcome_cells(b), f"{differences[-1]:+.2f}"])
    if differences:
        lines.append(["mean", "", "", "", "", "", "", mean_with_standard_error(differences)])
    first_name, second_name = names
    return tabulate(lines, headers=["seed", f"{first_name}: compression", "all 10k", "binary",
                                    f"{second_name}: compression", "all 10k", "binary",
                                    "second - first"],
                    tablefmt="github", disable_numparse=True)


def _outcome_cells(result: dict) -> list[str]:
    binary = sorted(name.removesuffix(".weight") for name, bits in result.get("bits", {}).items()
                    if bits == 1)
    return [f"{result['compression']:.2f}x", f"{result['test_acc']:.2f}", ", ".join(binary)]


def repeat_table(here: dict[str, dict[int, dict]], there: dict[str, dict[int, dict]]) -> str:
    """Every run (row and seed) written in both ``here`` and ``there``: its accuracy on all 10k
    in each, the difference, and whether the two are the same run: every epoch's training loss
    and accuracies equal (what one environment gives) or only the final widths. Runs of the same
    settings and seed part only where the environment below them differs."""
    lines = []
    for name in sorted(set(here) & set(there), key=row_position):
        for seed in sorted(set(here[name]) & set(there[name])):
            a, b = here[name][seed], there[name][seed]
            same = ("every epoch" if _trajectory(a) == _trajectory(b) else
                    "the widths only" if a.get("bits") == b.get("bits") else "no")
            lines.append([name, seed, f"{a['test_acc']:.2f}", f"{b['test_acc']:.2f}",
                          f"{a['test_acc'] - b['test_acc']:+.2f}", same])
    return tabulate(lines, headers=["row", "seed", "all 10k here", "all 10k there",
                                    "here - there", "the same run"],
                    tablefmt="github", disable_numparse=True)


def _trajectory(result: dict) -> list[tuple]:
    # Wall time differs between identical runs; what they computed does not.
    return [(epoch["loss"], epoch["test_acc"], epoch["exact_acc"], epoch["compression"])
            for epoch in result["epochs"]]
