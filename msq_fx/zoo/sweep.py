"""Run ``msq-fx check`` over a model zoo and tabulate which models MSQ handles.

    tools/zoo_sweep --source torchvision                    # all 80 classification models
    tools/zoo_sweep --source torchvision-tasks              # segmentation, detection, video, ...
    tools/zoo_sweep --source timm --sample 50 --seed 1      # a fixed random 50 of ~1400
    tools/zoo_sweep --source all --shard 0/4 --jobs 2
    tools/zoo_sweep --source timm --filter 'vit|deit' --out results/zoo_vit

Each model runs in its own ``python -m msq_fx.cli check --json`` subprocess, with a wall-clock
timeout and an address-space cap (RLIMIT_AS), so a hang, an out-of-memory or a crash of one model
is recorded and the sweep goes on. Statuses: the check's PASS / FAIL / SKIP (SKIP: the model does
not build or run eagerly at its default input, so it says nothing about quantization), plus
TIMEOUT (no result in time), OOM (an allocation failed under the cap) and CRASH (the subprocess
died without a result, e.g. killed by a signal). A check that runs out of memory is tried once
more in a fresh process at batch 1 with the finite-difference Hessian and the saved activations
on disk (runner.LEAN_RETRY), and an allocator that returns freed tensors to the system
(runner.LEAN_ENV); a pass there is a PASS whose note says so.

Outputs, rewritten after every model so an interrupted sweep keeps what it did:
    PREFIX.csv  one row per model (model, graph_nodes, leaves, quantized_weights, float_leftovers,
                seconds, status, reason, then stage, max_abs_diff, input_size, float_details,
                peak_mib: the check process's peak resident memory, hessian: how the prune
                computed H v, "autograd" or the "finite_difference" fallback, note: e.g. a
                check that passed at batch 1 because batch 2 ran out of memory)
    PREFIX.md   the table, counts per status, the pass rate, the failures with their reasons and
                every weight left in float
Models already in PREFIX.csv are skipped, so re-running the same command resumes a sweep;
``--rerun FAIL,TIMEOUT`` checks the models with those statuses again.

This module is the command line of ``tools/zoo_sweep``: :mod:`.selection` picks the models,
:mod:`.runner` checks each in its subprocess and :mod:`.sweep_report` writes the two files.
"""
from __future__ import annotations

import argparse
import signal
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm import tqdm

from ..check.exports import add_export_option
from .runner import CHILDREN, Limits, run_check
from .selection import SOURCES, lean_specs, select, smallest_first, zoo_specs
from .sweep_report import markdown_report, read_rows, settings_text, write_rows

__all__ = ["parse_args", "Sweep", "run", "main"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=SOURCES, default="torchvision",
                        help="torchvision: its 80 classifiers; torchvision-tasks: its other 41 "
                             "models (quantizable classifiers, segmentation, detection, video, "
                             "optical flow); timm; all: torchvision and timm")
    parser.add_argument("--filter", default=None, metavar="REGEX",
                        help="keep specs matching REGEX (re.search on e.g. 'timm:resnet18')")
    parser.add_argument("--sample", type=int, default=None, metavar="N",
                        help="a random N of the selected models (fixed by --seed)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --sample")
    parser.add_argument("--order", choices=("name", "size"), default="name",
                        help="size: cheapest first by parameter count x input pixels (a long "
                             "sweep reports on many models early); timm counts are cached in "
                             "--size-cache")
    parser.add_argument("--size-cache", type=Path, default=Path("results/timm_sizes.json"),
                        help="JSON cache of timm parameter counts and input sizes for --order "
                             "size (default results/timm_sizes.json)")
    parser.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N",
                        help="every N-th model starting at the I-th (I in 0..N-1)")
    parser.add_argument("--timeout", type=float, default=900.0, metavar="SECONDS",
                        help="wall-clock limit per model (default 900)")
    parser.add_argument("--memory-gib", type=float, default=16.0,
                        help="address-space cap per model subprocess in GiB (default 16); "
                             "keep jobs x cap below the machine's RAM. It counts virtual memory: "
                             "torch, torchvision and timm map about 3.5 GiB at import (0.7 GiB "
                             "resident), so a model gets roughly the cap minus 3 GiB of RAM")
    parser.add_argument("--jobs", type=int, default=1, help="models checked at once")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per model (default 1: on a shared machine a thread "
                             "pool competing with other jobs is much slower than one thread)")
    parser.add_argument("--input-size", default=None,
                        help="N, HxW or CxHxW for every model (default: each model's own size)")
    parser.add_argument("--out", default=None, metavar="PREFIX",
                        help="write PREFIX.csv and PREFIX.md (default results/zoo_<source>)")
    parser.add_argument("--rerun", default="", metavar="STATUSES",
                        help="comma-separated statuses whose models are checked again")
    parser.add_argument("--lean-above", type=float, default=None, metavar="PARAMETERS",
                        help="timm models with at least this many parameters (e.g. 1.5e9) are "
                             "checked with the lean-retry options from the start, not after an "
                             "out-of-memory at batch 2 (which they would only run into first)")
    parser.add_argument("--lean-cost-above", type=float, default=None, metavar="COST",
                        help="likewise for timm models whose parameters x input pixels (the cost "
                             "--order size sorts by) reach COST, e.g. 8e13 (300 M parameters at "
                             "512 px): this also catches small models at a large input")
    parser.add_argument("--compile", action="store_true",
                        help="each check also runs the prepared model through torch.compile "
                             "(msq-fx check --compile); column compiled: its graphs and the "
                             "first graph break")
    add_export_option(parser, help="each check also exports the converted model (msq-fx check "
                                   "--export: torch.export, or ONNX run by ONNX Runtime) and "
                                   "compares its outputs; repeatable; column exports")
    parser.add_argument("--report-only", action="store_true",
                        help="check nothing: rewrite PREFIX.md from PREFIX.csv for this "
                             "selection and these settings (e.g. after merging the CSVs of "
                             "--shard runs)")
    parser.add_argument("--list", action="store_true", help="print the selected specs and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    args.out = Path(args.out or f"results/zoo_{args.source.replace('-', '_')}")
    args.rerun = {s.strip().upper() for s in args.rerun.split(",") if s.strip()}
    for option, value in (("--lean-above", args.lean_above),
                          ("--lean-cost-above", args.lean_cost_above)):
        if value is not None and args.source != "timm":
            parser.error(f"{option} needs --source timm (parameter counts and input sizes come "
                         f"from the timm size cache)")
        if value is not None and not value > 0:
            parser.error(f"{option} must be a positive number, got {value:g}")
    return args


def _shard(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    try:
        index, count = int(index), int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N, got {text!r}") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"shard index must be in 0..N-1, got {text!r}")
    return index, count


class Sweep:
    """The rows found so far and the files they go to; rewrites both files after each model."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.csv_path = args.out.with_name(args.out.name + ".csv")
        self.md_path = args.out.with_name(args.out.name + ".md")
        self.rows = {r["model"]: r for r in read_rows(self.csv_path)}
        self.rerun = args.rerun
        self.title = f"MSQ model-zoo sweep: {args.source}"
        self.settings = settings_text(args)
        self.selected: list[str] | None = None  # the specs this run covers, once known

    def pending(self, specs: list[str]) -> list[str]:
        """The specs with no row yet or a row whose status is to be rerun. An old row stays until
        its model's new result replaces it, so an interrupted rerun loses nothing."""
        return [s for s in specs if s not in self.rows or self.rows[s]["status"] in self.rerun]

    def record(self, row: dict) -> None:
        self.rows[row["model"]] = row
        self.save()

    def save(self) -> None:
        rows = list(self.rows.values())
        write_rows(self.csv_path, rows)
        self.md_path.write_text(markdown_report(rows, self.title, self.settings, self.selected))


def run(args: argparse.Namespace) -> int:
    """The sweep ``args`` ask for (or its list, or its page alone); the exit status, 130 when
    interrupted."""
    specs = select(zoo_specs(args.source), args.filter, args.sample, args.seed, args.shard)
    if args.order == "size":
        specs = smallest_first(specs, args.size_cache)
    if args.list:
        print("\n".join(specs), flush=True)
        return 0
    sweep = Sweep(args)
    sweep.selected = specs
    if args.report_only:
        sweep.save()
        print(f"wrote {sweep.md_path} from the {len(sweep.rows)} rows of {sweep.csv_path}",
              file=sys.stderr)
        return 0
    todo = sweep.pending(specs)
    print(f"{len(specs)} models selected, {len(specs) - len(todo)} already in {sweep.csv_path}, "
          f"{len(todo)} to check", file=sys.stderr, flush=True)
    todo_set = set(todo)
    limits = Limits(args.timeout, int(args.memory_gib * 2**30), args.threads, args.input_size,
                    tuple(args.export), args.compile)
    sweep.save()
    counts = Counter(sweep.rows[s]["status"] for s in specs
                     if s in sweep.rows and s not in todo_set)
    signal.signal(signal.SIGTERM, _interrupt)
    with tqdm(total=len(todo), disable=args.no_progress, unit="model", file=sys.stderr) as bar, \
            ThreadPoolExecutor(max_workers=args.jobs) as pool:
        lean = lean_specs(todo, args.lean_above, args.size_cache, args.lean_cost_above)
        futures = [pool.submit(run_check, spec, limits, lean.get(spec)) for spec in todo]
        try:
            for future in as_completed(futures):
                row = {**future.result(), "limits": limits.describe()}
                sweep.record(row)
                counts[row["status"]] += 1
                bar.set_postfix_str(" ".join(f"{s}={n}" for s, n in sorted(counts.items())))
                bar.write(f"{row['status']:7} {row['model']} ({row['seconds']} s)"
                          + (f": {row['reason']}" if row["status"] != "PASS" else ""))
                bar.update(1)
        except (KeyboardInterrupt, Interrupted):
            pool.shutdown(wait=False, cancel_futures=True)
            CHILDREN.kill_all()
            bar.write(f"interrupted: the running checks were stopped; {len(sweep.rows)} results "
                      f"kept in {sweep.csv_path} (run the same command to resume)")
            return 130
    print(f"wrote {sweep.csv_path} and {sweep.md_path}", file=sys.stderr)
    return 0


class Interrupted(Exception):
    """SIGTERM arrived: stop like Ctrl-C does."""


def _interrupt(signum, frame) -> None:
    raise Interrupted


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))
