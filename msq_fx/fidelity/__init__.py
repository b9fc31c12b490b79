"""Side-by-side fidelity of MSQ, uniform QAT, a one-shot Hessian allocation and Brevitas on
CIFAR-10 ResNet-20, from one float start with one fine-tuning budget (``tools/fidelity``).

    tools/fidelity row msq-10.67x        # one row: fine-tune, checkpoint every epoch, resume
    tools/fidelity all                   # every row not yet run, then the table
    tools/fidelity all --jobs 2          # the same, two rows at a time (one thread each)
    tools/fidelity table                 # docs/fidelity.md from the rows written so far
    tools/fidelity no-training           # the float start quantized without training
    tools/fidelity row msq-8x --seed 1   # the same row under another seed (data order, init)
    tools/fidelity all ROW... --seeds 0-7 --jobs 2   # those rows at eight seeds, seed by seed
    tools/fidelity all --table-rows      # the rows a float start's table is made of
    tools/fidelity compare ROW_A ROW_B   # seed by seed: what each ended with, the traces taken
    tools/fidelity repeats --out A --against B   # the runs both hold: the same run or not
    tools/fidelity choose-start RUN_DIR... --into DIR   # the float start, by the fixed rule
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..config import PruningConfig
from ..utils import replace_marked_block
from .rows import ROWS, TABLE_ROWS, RowSpec, build_row
from .run import FLOAT_CHECKPOINT, FLOAT_WEIGHTS, Settings, float_weights, run_row, start_digest
from .table import (environments_text, load_results, load_seeds, markdown_table,
                    runs_from_other_starts, runs_table, seeds_table, targets_summary,
                    targets_table)

__all__ = ["ROWS", "RowSpec", "build_row", "Settings", "run_row", "load_results", "load_seeds",
           "markdown_table", "runs_table", "seeds_table", "targets_table", "main", "run_rows",
           "table_path", "targets_summary", "write_table", "write_summary", "DEFAULT_OUT",
           "DEFAULT_DOC", "DEFAULT_README", "ONE_ENVIRONMENT", "DISTILLED", "LARGER_RATE",
           "START_200", "environments_text", "runs_of_one_start", "float_start_row"]

DEFAULT_OUT = Path("results/fidelity")
DEFAULT_DOC = Path("docs/fidelity.md")
DEFAULT_README = Path("README.md")
DEFAULT_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cifar10.npz"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/fidelity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action",
                        choices=("row", "all", "table", "no-training", "compare", "repeats",
                                 "choose-start"))
    parser.add_argument("rows", nargs="*",
                        help=f"rows to run (with compare: the two to compare; with "
                             f"choose-start: the float runs' directories): {', '.join(ROWS)}")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--doc", type=Path, default=None,
                        help=f"the table's Markdown file (default: {DEFAULT_DOC} for the "
                             f"default --out, else OUT/fidelity.md, so trial runs elsewhere "
                             f"leave the committed table alone)")
    parser.add_argument("--epochs", type=int, default=Settings.epochs)
    parser.add_argument("--train-size", type=int, default=Settings.train_size)
    parser.add_argument("--scale", choices=("max", "tensor", "channel"), default=Settings.scale,
                        help="quantization.scale of every msq_fx row")
    parser.add_argument("--pruning", type=_pruning_field, action="append", default=[],
                        metavar="FIELD=VALUE",
                        help="replace a PruningConfig field of the MSQ rows, e.g. "
                             "--pruning interval=50 --pruning penalty_units=weight (repeatable)")
    parser.add_argument("--seed", type=int, default=Settings.seed,
                        help="seed of the data order and of everything random in a row; rows "
                             "under a seed other than 0 are written beside the table's own "
                             "(<row>.seed<N>.json) and summarised in its seeds table")
    parser.add_argument("--seeds", type=_seed_list, default=None, metavar="LIST",
                        help="with `all`: every seed in LIST (e.g. 0-7 or 0,2,5), seed after "
                             "seed, each row that seed lacks; in place of --seed")
    parser.add_argument("--table-rows", action="store_true",
                        help=f"with `all`, in place of naming rows: the rows a float start's "
                             f"table is made of ({', '.join(TABLE_ROWS)})")
    parser.add_argument("--lr", type=float, default=Settings.lr,
                        help=f"every row's peak learning rate (SGD, momentum 0.9, cosine to zero; "
                             f"default {Settings.lr})")
    parser.add_argument("--distill", type=float, default=Settings.distill, metavar="WEIGHT",
                        help="distil from the float start: every row's loss is (1 - WEIGHT) * "
                             "cross-entropy + WEIGHT * KL(float start || model); 0 (default): "
                             "cross-entropy alone")
    parser.add_argument("--distill-temperature", type=float,
                        default=Settings.distill_temperature, metavar="T",
                        help="temperature of the distillation term (default 1)")
    parser.add_argument("--against", type=Path, default=None,
                        help="with `repeats`: the other results directory, whose runs of the "
                             "same row and seed are set beside those under --out")
    parser.add_argument("--into", type=Path, default=None,
                        help="with `choose-start`: where the kept run's weights and record go "
                             "when it reaches the bar (the --out of the rows run from it)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per row")
    parser.add_argument("--compile", action="store_true",
                        help="train and score each row through torch.compile (0.76x the eager "
                             "time of an epoch without prunes, after about a minute of compiling "
                             "in the first; results record it in their environment)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="with `all`: rows run at once, each in its own process")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.threads < 1 or args.seed < 0:
        parser.error("--jobs and --threads take an integer >= 1, --seed one >= 0")
    if args.seeds is not None and (args.action != "all" or args.seed != Settings.seed):
        parser.error("--seeds is for `all`, in place of --seed: give one or the other")
    if args.action == "choose-start":
        return _choose_start([Path(run) for run in args.rows], args.into, parser)
    if args.table_rows:
        if args.action != "all" or args.rows:
            parser.error("--table-rows is for `all`, in place of naming rows")
        args.rows = list(TABLE_ROWS)
    unknown = [row for row in args.rows if row not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    torch.set_num_threads(args.threads)
    try:
        settings = Settings(data=args.data, out=args.out, epochs=args.epochs,
                            train_size=args.train_size, scale=args.scale,
                            pruning=tuple(args.pruning), seed=args.seed, lr=args.lr,
                            distill=args.distill,
                            distill_temperature=args.distill_temperature, compile=args.compile)
    except ValueError as error:
        parser.error(str(error))
    if args.action == "compare":
        if len(args.rows) != 2:
            parser.error("compare takes two rows: name exactly two")
        from .compare import outcome_table, trace_comparison, trace_comparison_table
        by_row = load_seeds(args.out)
        first, second = (by_row.get(name, {}) for name in args.rows)
        print(outcome_table(tuple(args.rows), first, second), end="\n\n")
        print(trace_comparison_table(tuple(args.rows), trace_comparison(first, second)))
        # Runs from two environments differ by more than many settings do: say which these were.
        seeds = set(first) & set(second)
        compared = {name: {seed: runs[seed] for seed in seeds}
                    for name, runs in zip(args.rows, (first, second))}
        print(f"\nWhat these runs ran on:\n{environments_text(compared)}")
        return 0
    if args.action == "repeats":
        if args.against is None:
            parser.error("repeats needs --against DIR: the results to set beside --out's")
        from .compare import repeat_table
        print(repeat_table(load_seeds(args.out), load_seeds(args.against)))
        return 0
    if args.action == "no-training":
        from .no_training import no_training_accuracies, no_training_table, write_no_training
        from .run import float_weights
        result = no_training_accuracies(float_weights(args.out), args.data)
        write_no_training(result, args.out / "no_training.json")
        print(no_training_table(result))
        return 0
    if args.action == "row":
        for name in args.rows or parser.error("name the rows to run"):
            run_row(name, settings)
    elif args.action == "all":
        overrides = "".join(f" --pruning {field}={json.dumps(value)}"
                            for field, value in args.pruning)
        overrides += f" --lr {args.lr}" if args.lr != Settings.lr else ""
        overrides += (f" --distill {args.distill} --distill-temperature "
                      f"{args.distill_temperature}" if args.distill else "")
        overrides += " --compile" if args.compile else ""
        # Seed after seed, so a stopped sweep leaves whole seeds, which the targets pair.
        runs = []
        for seed in args.seeds or (args.seed,):
            done = load_results(args.out, seed)
            seed_option = f" --seed {seed}" if seed else ""
            runs += [(name, replace(settings, seed=seed),
                      f"tools/fidelity row {name} --epochs {args.epochs} --scale {args.scale}"
                      f"{overrides}{seed_option}")
                     for name in args.rows or list(ROWS) if name not in done]
        run_rows(runs, args.jobs, args.threads)
    doc = args.doc or table_path(args.out)
    # The README's summary follows the committed table only, not trial runs elsewhere.
    write_table(args.out, doc, readme=DEFAULT_README if doc == DEFAULT_DOC else None)
    return 0


def _choose_start(directories: list[Path], into: Path | None,
                  parser: argparse.ArgumentParser) -> int:
    """``choose-start``: the float runs side by side, the one the rule keeps, and, when it
    reaches the bar and ``into`` is given, its weights copied there. Exit status 0 when a start
    qualifies, 1 when none does yet or the kept run falls short of the bar."""
    from .start import (FLOAT_START_BAR, choose_float_start, float_runs_table,
                        install_float_start, read_float_run)
    if not directories:
        parser.error("choose-start takes the directories of the float runs to choose from")
    try:
        runs = [read_float_run(directory) for directory in directories]
    except ValueError as error:
        parser.error(str(error))
    try:
        kept = choose_float_start(runs)
    except ValueError as error:
        print(float_runs_table(runs, None), end="\n\n")
        print(f"not decided: {error}")
        return 1
    print(float_runs_table(runs, kept), end="\n\n")
    if kept.exact_1k < FLOAT_START_BAR:
        print(f"{kept.directory} is kept and scores {kept.exact_1k:.1f} on the exact 1k, under "
              f"{FLOAT_START_BAR}: the rows keep their present start")
        return 1
    if into is None:
        print(f"{kept.directory} qualifies; give --into DIR to copy it where its rows will run")
        return 0
    try:
        target = install_float_start(kept, into)
    except ValueError as error:
        parser.error(str(error))
    print(f"{kept.directory} qualifies; its weights are now {target}")
    return 0


def table_path(out: Path) -> Path:
    """Where the table of the rows under ``out`` goes when ``--doc`` is not given."""
    return DEFAULT_DOC if out == DEFAULT_OUT else out / "fidelity.md"


def _pruning_field(text: str) -> tuple[str, Any]:
    """``FIELD=VALUE`` of ``--pruning``: a PruningConfig field and its value (JSON, else text),
    checked by building the section with it."""
    field, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {text!r}")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    try:
        PruningConfig(**{field: parsed})
    except (TypeError, ValueError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return field, parsed


def run_rows(runs: list[tuple[str, Settings, str]], jobs: int, threads: int) -> None:
    """Run each (row, settings, command) of ``runs``, one after another, or ``jobs`` at a time
    in processes of ``threads`` torch threads each (one per core is the fastest on a small
    CPU: a row barely uses a second thread)."""
    if jobs == 1:
        for name, settings, command in runs:
            run_row(name, settings, command=command)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=torch.set_num_threads,
                             initargs=(threads,)) as pool:
        for _ in pool.map(run_row, *zip(*runs)) if runs else ():
            pass


def _seed_list(text: str) -> tuple[int, ...]:
    """``--seeds``: "0-7" (a range, both ends in) or "0,2,5", each seed >= 0, none twice."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            low, dash, high = part.strip().partition("-")
            if dash and int(high) < int(low):
                raise ValueError
            seeds += range(int(low), int(high) + 1) if dash else [int(low)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give seeds as 0-7 (low to high) or "
                                         f"0,2,5") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: give each seed once")
    return tuple(seeds)


def write_table(out: Path, doc: Path, readme: Path | None = None) -> None:
    """Write the table of every row run so far to ``doc`` (Markdown) and, given ``readme``,
    the targets in brief into its summary block (:func:`write_summary`)."""
    float_row = float_start_row(out)
    doc.parent.mkdir(parents=True, exist_ok=True)
    # What follows the table (measurements, notes) is kept as written.
    rest = doc.read_text().partition(TABLE_END)[2] if doc.exists() else "\n"
    by_row = runs_of_one_start(out)
    table_runs = {name: runs[0] for name, runs in by_row.items() if 0 in runs}
    seeds = seeds_table(by_row)
    seeds = f"\n\n{SEEDS_HEADER}{seeds}" if seeds else ""
    float_acc = None if float_row is None else float_row["test_acc"]
    targets = f"\n\n{TARGETS_HEADER}{targets_table(by_row, float_acc)}"
    budgets = {_epochs_text(_epochs_run(by_row)): by_row}
    float_by_budget: dict[str, float | None] = {}
    for budget in sorted(out.glob("budget*/rows")):
        longer = runs_of_one_start(budget.parent)
        name = _epochs_text(_epochs_run(longer))
        budgets[name] = longer
        targets += _set_section(
            f"Fine-tuned for {name} (rows under `{budget.parent}`, which holds a copy of the "
            f"float start;\nthe same settings, the cosine schedule stretched to the longer run):",
            longer, "The same targets over that budget", float_acc)
    for subdirectory, label, intro, targets_intro in SETS_BESIDE:
        directory = out / subdirectory
        if not (directory / "rows").is_dir():
            continue
        runs = runs_of_one_start(directory)
        name = f"{_epochs_text(_epochs_run(runs))}, {label}"
        budgets[name] = runs
        # A set trained from a start of its own is judged against that start.
        own_start = float_start_row(directory)
        float_by_budget[name] = float_acc if own_start is None else own_start["test_acc"]
        start_text = "" if own_start is None else f" {_start_text(own_start)}"
        targets += _set_section(f"{intro.format(directory=directory)}{start_text} What they "
                                f"ran on:\n\n{environments_text(runs)}", runs, targets_intro,
                                float_by_budget[name])
    doc.write_text(HEADER + markdown_table(table_runs, float_row) + seeds + targets + "\n\n"
                   + TABLE_END + rest)
    if readme is not None:
        write_summary(readme, targets_summary(budgets, float_acc, float_by_budget))


def float_start_row(out: Path) -> dict | None:
    """The float start ``out`` holds, as the table's first row, from its ``float.json``
    (None where there is none): its accuracies after the last epoch, what it is, and the
    command that trained it (in the directory it was trained in, which ``choose-start``
    records when it copies a start elsewhere)."""
    float_json = out / "float.json"
    if not float_json.exists():
        return None
    record = json.loads(float_json.read_text())
    args, epochs = record["args"], record["epochs"]
    planned = int(args["epochs"])
    # The tool records its arguments as text; runs from before --erase / --compile have none.
    options = "" if args.get("erase", "None") == "None" else f" --erase {args['erase']}"
    options += " --compile" if args.get("compile") == "True" else ""
    return {"test_acc": epochs[-1]["test_acc"], "exact_acc": epochs[-1].get("test_exact_acc"),
            "what": f"float ResNet-20 after epoch {len(epochs)} of {planned}"
                    + ("" if len(epochs) == planned else
                       " (training; resumes with the same command)"),
            "command": f"`tools/cifar10_resnet20 --run float --epochs {planned}{options} "
                       f"--threads 1 --out {_trained_in(args, out)}`"}


def _trained_in(args: dict, out: Path) -> str:
    """The directory a float start was trained in, relative to the working directory where
    it lies under it (records hold the path as given, which may be absolute)."""
    trained = Path(args.get("out", out))
    try:
        return str(trained.relative_to(Path.cwd())) if trained.is_absolute() else str(trained)
    except ValueError:
        return str(trained)


def _start_text(start: dict) -> str:
    """A set's own float start in a sentence (its accuracies and the command that trained
    it), for the set's introduction."""
    exact = "" if start["exact_acc"] is None else f", {start['exact_acc']:.1f}% on the exact 1k"
    return (f"Its float start ({start['what']}): {start['test_acc']:.2f}% on all 10k{exact}, "
            f"trained by {start['command']}; each target's margin is taken from it.")


def runs_of_one_start(directory: Path) -> dict[str, dict[int, dict]]:
    """Every run under ``directory`` (:func:`load_seeds`), refused with the runs named if any
    of them records another float start than the one ``directory`` holds: a table that
    mixed two starts would compare runs that did not start alike."""
    by_row = load_seeds(directory)
    if not ((directory / FLOAT_WEIGHTS).exists() or (directory / FLOAT_CHECKPOINT).exists()):
        return by_row
    digest = start_digest(float_weights(directory))
    others = runs_from_other_starts(by_row, digest)
    if others:
        raise SystemExit(f"{directory}: runs from another float start than the one it holds "
                         f"({digest}): {', '.join(others)}. Run them again from this start, or "
                         f"move them under a directory holding theirs")
    return by_row


def _set_section(intro: str, by_row: dict[str, dict[int, dict]], targets_intro: str,
                 float_acc: float | None) -> str:
    """A set of runs beside the table's own (another budget, or one environment): ``intro``,
    every run, then ``targets_intro`` and the targets over those runs."""
    return (f"\n\n{intro}\n\n{runs_table(by_row)}\n\n{targets_intro}:\n\n"
            f"{targets_table(by_row, float_acc)}")


def write_summary(readme: Path, summary: str) -> None:
    """Replace what stands between ``readme``'s SUMMARY_BEGIN and SUMMARY_END markers with
    ``summary``; everything else in the file is kept."""
    text = replace_marked_block(readme.read_text(), SUMMARY_BEGIN, SUMMARY_END, summary)
    if text is None:
        raise ValueError(f"{readme} lacks the lines {SUMMARY_BEGIN!r} and {SUMMARY_END!r} "
                         f"(in that order) that mark where the fidelity targets go: add them, "
                         f"or give --doc to write the table alone")
    readme.write_text(text)


def _epochs_run(by_row: dict[str, dict[int, dict]]) -> set[int]:
    return {len(result["epochs"]) for runs in by_row.values() for result in runs.values()}


def _epochs_text(epochs: set[int]) -> str:
    return " or ".join(map(str, sorted(epochs))) + " epochs" if epochs else "another budget"


TABLE_END = "<!-- end of the generated table -->"
# The targets' rows re-run together under ``out``: runs from one environment, since the same
# seed and decisions gave runs 0.5-0.9 points apart across environments.
ONE_ENVIRONMENT = "one-environment"
# The targets' rows with every row distilled from the float start (``--distill``).
DISTILLED = "distill"
# The targets' rows with a larger peak learning rate (``--lr 0.03``): binary layers train more
# slowly than 2-bit ones at the table's rate.
LARGER_RATE = "lr-0.03"
# The rows run again from the 200-epoch float start, which ``choose-start`` copies there when
# it qualifies (docs/fidelity.md, "A 200-epoch float start"); judged against that start.
START_200 = "start-200"
#: Sets of runs of the table's rows set beside it, each with its own targets and README line:
#: (subdirectory of the results, budget label, the set's introduction, its targets' heading).
SETS_BESIDE = (
    (ONE_ENVIRONMENT, "one environment",
     "The targets' rows re-run back to back in one environment (rows under\n`{directory}`, "
     "which holds a copy of the float start; the same settings and\nbudget as the table's "
     "rows).", "The targets over these runs"),
    (DISTILLED, "distilled",
     "The targets' rows distilled from the float start (rows under `{directory}`, which holds "
     "a copy of\nthe float start): the same settings and budget, every row's loss taking the "
     "float start's\nclass probabilities as its target (`--distill WEIGHT`, in each command).",
     "The targets over the distilled runs"),
    (LARGER_RATE, "lr 0.03",
     "The targets' rows at a peak learning rate of 0.03 (rows under `{directory}`, which holds "
     "a copy of\nthe float start): the same settings and budget otherwise (`--lr 0.03`, in each "
     "command).", "The targets over the runs at lr 0.03"),
    (START_200, "200-epoch start",
     "The table's rows run again from the 200-epoch float start (rows under `{directory}`, "
     "which\nholds that start, copied there by `tools/fidelity choose-start` under the rule "
     "fixed before\nit finished): the same settings and budget, every run compiled.",
     "The targets over the runs from the 200-epoch start"),
)
SUMMARY_BEGIN = "<!-- the fidelity targets, written by tools/fidelity table -->"
SUMMARY_END = "<!-- end of the fidelity targets -->"

TARGETS_HEADER = """\
Against the targets: MSQ as `MSQConfig.fine_tuning(target)` runs it, against uniform QAT
at the same seeds, on all 10k ("MSQ widths": whether MSQ's runs ended with mixed widths or with
every layer at one width; "mean ± se": the mean of the paired differences and its standard
error; "met": at least level with uniform QAT on the mean, above it past 16x, and within the
target's margin of the float start: 0.5 / 1.0 / 2.0 points at 8x / 10.67x / 16x):

"""

SEEDS_HEADER = """\
Rows run under more than one seed (`--seed N`: another data order and augmentation, the
same float start and budget), to show how far a seed moves a row:

"""


HEADER = """# Fidelity: MSQ against uniform QAT, a one-shot allocation and Brevitas

Every row starts from the same float ResNet-20 (`results/fidelity/resnet20_float.pt`, trained by
`tools/cifar10_resnet20 --run float --epochs 100`) and is fine-tuned on CIFAR-10 with one budget:
the same 3 epochs of augmented data in the same order, SGD lr 0.01 (momentum 0.9, cosine to zero),
weight decay 1e-4, batch 128, one torch thread, channels_last. msq_fx rows use the nested grid
and the scale mode of the "scale" column (`--scale`); MSQ prunes every 25 steps with BN
statistics re-estimated on 4 batches after each prune and each pruned layer's scale re-fitted
at its new width, its LSB penalty in weight units (lambda 1e-2); MSQ at 16x and past it may
use binary 1-bit layers (literal grid). "all 10k" is the whole test set, "exact 1k" its
bit-exact images; "steps to target" counts optimizer steps until the target compression was
reached; "wall time" is as measured with two or three rows sharing the machine's two cores.
Written by `tools/fidelity table` from `results/fidelity/rows/*.json`. A run records a digest
of the float start it began from (`float_start`; runs made before that field record none),
and the table refuses a directory whose runs record another start than the one it holds.

"""
