"""What a zoo sweep writes: its rows as CSV (atomically, so a killed sweep never leaves half a
file), and the Markdown page with the summary, the failures by cause, the weights left in float,
the full table and the settings paragraph."""
from __future__ import annotations

import argparse
import csv
import re
from collections import Counter
from pathlib import Path

from tabulate import tabulate

from ..io import atomic_write
from .runner import CHECK_STATUSES, COLUMNS, LEAN_WAY, LEAN_WAY_ALWAYS, SWEEP_STATUSES
from .selection import installed_version

__all__ = ["read_rows", "write_rows", "markdown_report", "settings_text", "lean_text",
           "retry_way", "LIMITS_SECTION", "CAP_MEANING", "DEFAULT_INPUT_SIZES"]


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def write_rows(path: Path, rows: list[dict]) -> None:
    """Write all rows (sorted by model) atomically: a killed sweep never leaves half a file."""
    def write(temporary: str) -> None:
        with open(temporary, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(sorted(rows, key=lambda r: r["model"]))

    atomic_write(path, write)


def markdown_report(rows: list[dict], title: str, settings: str,
                    selected: list[str] | None = None) -> str:
    """The Markdown page: summary, failures, float leftovers, then the full table. With
    ``selected`` (the specs the sweep was asked to check), a sweep that has not checked them all
    says how far it got."""
    rows = sorted(rows, key=lambda r: r["model"])
    parts = [f"# {title}", settings, "## Summary", _summary(rows)]
    checked = {r["model"] for r in rows}
    remaining = [spec for spec in selected or [] if spec not in checked]
    if remaining:
        parts.insert(2, f"**In progress: {len(selected) - len(remaining)} of the {len(selected)} "
                        f"selected models checked so far.** Re-running the same command resumes "
                        f"the sweep.")
    failures = [r for r in rows if r["status"] not in ("PASS", "SKIP")]
    if failures:
        parts += ["## Failures by cause", _failures_by_cause(failures),
                  "## Failures", _table(failures, ["model", "status", "stage", "reason"])]
    skipped = [r for r in rows if r["status"] == "SKIP"]
    if skipped:
        parts += ["## Skipped (the model itself does not build or run eagerly)",
                  _table(skipped, ["model", "stage", "reason"])]
    by_differences = [r for r in rows if r.get("hessian") == "finite_difference"]
    if by_differences:
        parts += ["## Hessian by finite differences (the double backward did not fit, had no "
                  "second derivative, or gave a trace that is not finite)",
                  _table(by_differences, ["model", "status", "peak_mib"])]
    noted = [r for r in rows if r.get("note")]
    if noted:
        parts += ["## Notes (e.g. checked at batch 1 because batch 2 ran out of memory)",
                  _table(noted, ["model", "status", "note"])]
    limits = Counter(r.get("limits") or "not recorded" for r in rows)
    if set(limits) != {"not recorded"}:
        parts += [f"## {LIMITS_SECTION} (a later run with other limits replaces only the rows "
                  f"it checks)",
                  tabulate(limits.most_common(), headers=["limits", "models"],
                           tablefmt="github")]
    exported = ["exports"] if any(r.get("exports") for r in rows) else []
    exported += ["compiled"] if any(r.get("compiled") for r in rows) else []
    parts += ["## Weights left in float", _float_leftovers(rows),
              "## All models", _table(rows, ["model", "status", "graph_nodes", "leaves",
                                             "quantized_weights", "float_leftovers",
                                             "max_abs_diff", *exported, "input_size",
                                             "seconds", "peak_mib", "stage"])]
    return "\n\n".join(parts) + "\n"


def _summary(rows: list[dict]) -> str:
    counts = Counter(r["status"] for r in rows)
    order = [s for s in CHECK_STATUSES + SWEEP_STATUSES if counts[s]] + sorted(
        set(counts) - set(CHECK_STATUSES + SWEEP_STATUSES))
    runnable = len(rows) - counts["SKIP"]
    completed = counts["PASS"] + counts["FAIL"]
    unfit = sum(_float_model_does_not_fit(r) for r in rows)
    lines = [f"- models: {len(rows)}"] + [f"- {s}: {counts[s]}" for s in order]
    lines.append(f"- pass rate over the models that run eagerly (all but SKIP): "
                 f"{_rate(counts['PASS'], runnable)}")
    if unfit:
        lines.append(f"- OOM while the float model was still being built or run eagerly (it does "
                     f"not fit this machine even in float): {unfit}; pass rate over the models "
                     f"that build and run eagerly here (all but SKIP and those): "
                     f"{_rate(counts['PASS'], runnable - unfit)}")
    lines.append(f"- pass rate over the checks that finished (PASS + FAIL): "
                 f"{_rate(counts['PASS'], completed)}")
    return "\n".join(lines)


def _float_model_does_not_fit(row: dict) -> bool:
    return row["status"] == "OOM" and row.get("stage") in ("build", "forward")


def _rate(part: int, whole: int) -> str:
    return f"{part}/{whole} = {100 * part / whole:.1f}%" if whole else "n/a"


def _failures_by_cause(failures: list[dict]) -> str:
    causes = Counter((r["status"], r["stage"], _cause(r["reason"])) for r in failures)
    rows = [(count, status, stage, cause) for (status, stage, cause), count in causes.most_common()]
    return tabulate(rows, headers=["models", "status", "stage", "cause"], tablefmt="github")


def _cause(reason: str) -> str:
    """The reason without the model-specific numbers, so equal causes group together."""
    return re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "N", reason)


def _float_leftovers(rows: list[dict]) -> str:
    entries = [(r["model"], detail) for r in rows
               for detail in r.get("float_details", "").split("; ") if detail]
    if not entries:
        return "None: every conv / linear / attention weight of every checked model is quantized."
    return tabulate(entries, headers=["model", "weight [kind]: reason"], tablefmt="github")


def _table(rows: list[dict], columns: list[str]) -> str:
    return tabulate([[r.get(c, "") for c in columns] for r in rows], headers=columns,
                    tablefmt="github", disable_numparse=True)


#: The title of the page's section that counts the rows per limits, which the settings point at.
LIMITS_SECTION = "Limits the rows were checked under"
#: What an address-space cap means for a check.
CAP_MEANING = "virtual memory, about 3 GiB more than the resident memory a check can use"

#: Each source's default input sizes, as the check picks them (column input_size gives each row's).
DEFAULT_INPUT_SIZES = {
    "timm": "timm models their pretrained_cfg input_size",
    "torchvision": "torchvision classifiers 224, inception_v3 299, ViTs their image_size",
    "torchvision-tasks": "quantizable classifiers 224 (inception_v3 299), segmentation 520, "
                         "video 16 frames at the weights' crop, detection the transform's "
                         "min_size, RAFT two 128 x 128 frames",
}


def lean_text(args: argparse.Namespace) -> str:
    """The sentence of the settings that says which models went lean from the start."""
    which = []
    if args.lean_above is not None:
        which.append(f"of {args.lean_above:g} parameters or more")
    if args.lean_cost_above is not None:
        which.append(f"whose parameters x input pixels reach {args.lean_cost_above:g}")
    if not which:
        return ""
    return f"timm models {', or '.join(which)}: checked {LEAN_WAY} from the start (column note). "


def retry_way(args: argparse.Namespace) -> str:
    """How the settings name the lean retry. A run's own page names this version's LEAN_WAY; a
    ``--report-only`` page also holds rows from versions whose lean options differed (before
    the activations went to disk), so it names the options all had and defers to each note."""
    if not args.report_only:
        return LEAN_WAY
    return f"{LEAN_WAY_ALWAYS} and, in later runs, activations on disk (each row's note says which)"


def settings_text(args: argparse.Namespace) -> str:
    """The page's settings paragraph: what every check does, then the limits. A ``--report-only``
    page checked nothing itself, so it points at the limits each row records instead of giving
    the report command's own."""
    sources = ("torchvision", "timm") if args.source == "all" else (args.source,)
    size = args.input_size or ("each model's default (" + "; ".join(
        DEFAULT_INPUT_SIZES[source] for source in sources) + ")")
    if args.report_only:
        limits = (f"Limits: each row's own where it was recorded, counted in the section "
                  f"'{LIMITS_SECTION}' (address-space caps: {CAP_MEANING}); which rows ran at "
                  f"batch 1 from the start: column note. ")
    else:
        limits = (f"Limits of the run that last wrote this page: {args.timeout:g} s and "
                  f"{args.memory_gib:g} GiB address space ({CAP_MEANING}) per model, "
                  f"{args.threads} torch thread(s); rows from earlier runs keep theirs (section "
                  f"'{LIMITS_SECTION}'). "
                  + lean_text(args))
    return (f"`msq-fx check` per model: random batch of 2 (where that runs out of memory, once "
            f"more in a fresh process {retry_way(args)}: column note), 3 SGD steps (task loss, "
            f"then LSB regularization, each parameter stepped as "
            f"its gradient lands), one pruning step "
            f"with the Hessian (one probe, first sample; by double backward, or finite "
            f"differences where that runs out of memory, has no second derivative or is not "
            f"finite: column hessian), "
            f"convert, compare eval outputs (PASS: max |converted - fake-quant| <= 1e-5 max "
            f"|output|). Input size: {size}. "
            + limits
            + (f"Exports ({', '.join(args.export)}): the converted model exported and run, "
               f"column exports giving max |exported - converted| / max |converted| (a FAIL "
               f"above 1e-5 for torch.export, 1e-3 for ONNX Runtime). "
               if args.export else "")
            + ("Compiled: the prepared model at its mixed widths run through torch.compile "
               "(aot_eager backend), column compiled giving its graphs and its first graph "
               "break (a FAIL where its output leaves the eager one by more than 1e-5). "
               if args.compile else "")
            + ", ".join(f"{name} {installed_version(name)}"
                        for name in ("torch", "torchvision", "timm"))
            + ".")
