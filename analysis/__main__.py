"""Tables, figures and a report from one or more sweep directories.

    python -m analysis outputs/sweeps/<date>/<time>_<experiment> [more sweeps...]
        [--metric val_loss] [--mode min] [--out DIR] [--no-figures] [--at-step N]
        [--fix KEY=VALUE ...] [--paper-table N] [--confirm-seeds N [--pin KEY=VALUE ...]]

``--metric`` selects the configuration of each table row (default: the
task's objective); where the task has a test split, the row reports the
test twin of that metric. Output goes into the first sweep directory
unless ``--out`` says otherwise. ``--paper-table N`` reads the sweep as
the paper read its Table N (experiments/paper_results.csv): its selection
metric, its step for RL runs (Table 6: 50,000), the parameters it held
fixed (Tables 1-2: step size 0.1), and only that table beside the runs.

``--confirm-seeds N`` corrects for selection: instead of a report, it writes
a plan to train each row's selected configuration again on N fresh seeds
(``<out>/confirm/``); the confirmation sweep's own report then shows each
row's selection-stage figure beside the confirmed one, with a verdict from
the fresh seeds alone (analysis/confirm.py).
"""

import argparse
import sys
from pathlib import Path

import pandas as pd

from analysis.confirm import plan_rows, plan_rows_from_configs, read_configs, write_plan
from analysis.report import Reading, paper_table_protocol, paper_tables, write_report
from analysis.tables import TableSpec, default_spec, hold_fixed, parse_fixed, selection_column


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "sweeps",
        nargs="+",
        type=Path,
        help="sweep directories (Hydra multirun layout), or reports' jobs.csv files where the runs are gone "
        "(no curves then); with --confirm-seeds, also a report's configs.csv",
    )
    parser.add_argument(
        "--metric", help="selection metric, e.g. val_loss or best_val_accuracy (default: the objective)"
    )
    parser.add_argument("--mode", choices=["min", "max"], help="whether lower or higher --metric is better")
    parser.add_argument("--out", type=Path, help="output directory (default: the first sweep directory)")
    parser.add_argument("--no-figures", action="store_true")
    parser.add_argument(
        "--at-step",
        type=int,
        metavar="N",
        help="read RL runs at N environment steps (their last logged row at or before N), "
        "e.g. the paper's Table 6 at 50000",
    )
    parser.add_argument(
        "--fix",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="select only among runs with this parameter at this value, e.g. step_size=0.1, "
        "envelopes.policy.quantile=0.3 or task.truncation=terminate (repeatable)",
    )
    parser.add_argument(
        "--paper-table",
        metavar="N",
        choices=paper_tables(),
        help="read the sweep as the paper's Table N: its selection metric, step and fixed "
        f"parameters, and its rows side by side ({', '.join(paper_tables())})",
    )
    parser.add_argument(
        "--confirm-seeds",
        type=int,
        metavar="N",
        help="write a confirmation plan instead of a report: each row's selected configuration (identity and, "
        "with --paper-table, the paper's rows too) to train again on N fresh seeds, so that the verdict does not "
        "rest on the numbers that chose it; prints the command that runs it (into <out>/confirm/)",
    )
    parser.add_argument(
        "--pin",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --confirm-seeds: an override added to every confirmation job (and to composing a configs.csv's "
        "tasks), to train what the selection trained where a preset changed since, e.g. task.init=orthogonal "
        "for a PPO paper sweep before 2026-12-06 (repeatable; settings a sweep's runs record are pinned "
        "without it)",
    )
    args = parser.parse_args(argv)
    if args.pin and args.confirm_seeds is None:
        parser.error("--pin applies to a confirmation plan: give it with --confirm-seeds")
    for pin in args.pin:
        if "=" not in pin or not pin.split("=", 1)[0]:
            parser.error(f"--pin takes KEY=VALUE (a Hydra override such as task.init=orthogonal), got {pin!r}")
    if args.at_step is not None and args.at_step <= 0:
        parser.error(f"--at-step must be a positive number of environment steps, got {args.at_step}")
    try:
        fixed = parse_fixed(args.fix) if args.fix else None
        if args.confirm_seeds is not None:
            _confirmation_plan(args, fixed)
            return 0
        write_report(
            args.sweeps,
            args.out or args.sweeps[0],
            args.metric,
            args.mode,
            not args.no_figures,
            at_step=args.at_step,
            fixed=fixed,
            table_number=args.paper_table,
        )
    except (FileNotFoundError, ValueError) as error:  # NoRunsError among them
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def _confirmation_plan(args: argparse.Namespace, fixed: dict | None) -> None:
    """--confirm-seeds: the plan from the sweeps' runs, or from a report's configs.csv (selected as the report
    selected; the file holds the figures at the step that report read its runs)."""
    source = args.sweeps[0]
    out = (args.out or (source.parent if source.suffix == ".csv" else source)) / "confirm"
    per_config = source.suffix == ".csv" and "job_dir" not in pd.read_csv(source, nrows=0).columns  # configs.csv
    if not per_config:
        reading = Reading.of(args.sweeps, args.metric, args.mode, args.at_step, fixed, args.paper_table)
        spec = default_spec(reading.jobs, reading.metric, reading.mode)
        rows = plan_rows(reading.jobs, spec, args.paper_table, args.pin)
        seeds, at_step, fixed = reading.jobs["seed"], reading.jobs.attrs.get("at_step"), reading.fixed
    else:
        if len(args.sweeps) > 1:
            raise ValueError("--confirm-seeds takes one configs.csv, or sweep directories, not several files")
        protocol = paper_table_protocol(args.paper_table) if args.paper_table else None
        metric = args.metric or (protocol.metric if protocol else None)
        mode = args.mode or (protocol.mode if protocol else None)
        if metric is None or mode is None:
            raise ValueError(f"{source} names no objective: give --metric and --mode, or --paper-table")
        select = selection_column(metric)
        spec = TableSpec(select, mode, [select])
        at_step = args.at_step if args.at_step is not None else (protocol.at_step if protocol else None)
        fixed = fixed if fixed is not None else (protocol.fixed if protocol else {})
        configs = hold_fixed(read_configs(source), fixed or {})
        rows = plan_rows_from_configs(configs, spec, args.paper_table, args.pin)
        seeds = pd.Series([int(s) for listed in configs["seeds"] for s in listed])
    write_plan(rows, seeds, spec, args.confirm_seeds, out, args.sweeps, args.paper_table, at_step, fixed)


if __name__ == "__main__":
    sys.exit(main())
