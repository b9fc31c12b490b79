"""The fidelity table: every row's result side by side, as Markdown."""
from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

from tabulate import tabulate

from .rows import ROWS, result_stem

__all__ = ["load_results", "load_seeds", "markdown_table", "seeds_table"]


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
        target_step = result["target_step"]
        lines.append([name, spec.description, result.get("scale") or "",
                      f"{result['compression']:.2f}x",
                      _pct(result["test_acc"]), _pct(result["exact_acc"]),
                      "not reached" if target_step is None else str(target_step),
                      f"{result['seconds'] / 60:.0f} min", f"`{result['command']}`"])
    return tabulate(lines, headers=["row", "what", "scale", "compression", "all 10k", "exact 1k",
                                    "steps to target", "wall time", "command"],
                    tablefmt="github")


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
                      f"{min(compression):.2f}-{max(compression):.2f}x"
                      if max(compression) - min(compression) > 0.005 else f"{compression[0]:.2f}x"])
    if not lines:
        return ""
    return tabulate(lines, headers=["row", "seeds", "all 10k by seed", "all 10k mean ± sd",
                                    "exact 1k mean", "compression"], tablefmt="github")


def _pct(value) -> str:
    return "" if value is None else f"{value:.2f}"
