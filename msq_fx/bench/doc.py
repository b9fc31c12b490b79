"""``--write-doc PATH``: the run as Markdown (the command, the tables, the machine and its load)
written into a document, replacing the block an earlier run of the same workload wrote.

A block sits between two HTML comments that name the workload and the options that change what
is measured (model, input shape, batch, ``--peers``, ...), so one document can hold a block per
workload and a re-run replaces its own block only. A document without the block gets it
appended.
"""
from __future__ import annotations

import datetime
import shlex
import subprocess
from pathlib import Path

from ..utils import replace_marked_block
from .report import PEER_HEADERS, STEP_HEADERS, conditions_line, peer_rows, step_rows

__all__ = ["block_key", "markdown_block", "write_doc"]


def block_key(report: dict) -> str:
    """What identifies a block: the workload and the options that change what is measured."""
    shape = "x".join(str(side) for side in report["input_shape"])
    options = [flag for flag, on in (("peers", "peers" in report),
                                     ("recompute compared", "ratio_msq_weights_saved_over_fp"
                                      in report),
                                     (f"autocast {report.get('autocast')}",
                                      report.get("autocast")),
                                     ("activation checkpointing",
                                      report.get("grad_checkpointing")),
                                     ("compiled", report.get("compile")),
                                     (f"{report.get('clock')} clock",
                                      report.get("clock", "wall") != "wall"),
                                     ("freed heap kept", report.get("keep_freed_heap"))) if on]
    return " ".join([report["model"], shape, f"batch {report['batch_size']}", *options])


def _markdown_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.strip() or None


def markdown_block(report: dict, argv: list[str]) -> str:
    """The block for ``report`` (without its markers); ``argv``: the command's arguments."""
    command = shlex.join(["tools/bench", *argv])
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    commit = _commit()
    lines = [f"`{command}`, {when}" + (f", commit {commit}" if commit else "") + ":", ""]
    lines += _markdown_table(["contender", *STEP_HEADERS[1:]], step_rows(report))
    if report.get("msq_against_peers"):
        lines += [""] + _markdown_table(PEER_HEADERS, peer_rows(report))
    for name, reason in report.get("skipped_peers", {}).items():
        lines += ["", f"Not run: {name}: {reason}"]
    lines += ["", f"{report['repeats']} repeats x {report['steps']} steps per contender after "
                  f"{report['warmup']} warm-up, interleaved; medians over repeats, "
                  f"{report.get('clock', 'wall')} clock"
                  + (", glibc keeping freed heap memory (`--keep-freed-heap`)"
                     if report.get("keep_freed_heap") else "")
                  + f"; torch {report['torch']}, "
                  f"{report['threads']} thread(s), device {report['device']}. "
                  f"{conditions_line(report)}."]
    return "\n".join(lines)


def write_doc(path: str | Path, report: dict, argv: list[str]) -> None:
    """Write the block of ``report`` into ``path`` (see the module docstring)."""
    path = Path(path)
    key = block_key(report)
    start, end = f"<!-- tools/bench: {key} -->", f"<!-- /tools/bench: {key} -->"
    body = markdown_block(report, argv)
    text = path.read_text() if path.exists() else ""
    replaced = replace_marked_block(text, start, end, body)
    if replaced is None:
        replaced = (text + ("\n" if text and not text.endswith("\n") else "")
                    + f"{start}\n{body}\n{end}\n")
    path.write_text(replaced)
