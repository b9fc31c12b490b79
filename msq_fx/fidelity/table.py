"""The fidelity table: every row's result side by side, as Markdown."""
from __future__ import annotations

import json
from pathlib import Path

from tabulate import tabulate

from .rows import ROWS

__all__ = ["load_results", "markdown_table"]


def load_results(out: Path) -> dict[str, dict]:
    """The results written so far, by row name."""
    results = {}
    for name in ROWS:
        path = out / "rows" / f"{name}.json"
        if path.exists():
            results[name] = json.loads(path.read_text())
    return results


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


def _pct(value) -> str:
    return "" if value is None else f"{value:.2f}"
