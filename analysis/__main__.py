"""Tables, figures and a report from one or more sweep directories.

    python -m analysis outputs/sweeps/<date>/<time>_<experiment> [more sweeps...]
        [--metric val_loss] [--mode min] [--out DIR] [--no-figures] [--at-step N]

``--metric`` selects the configuration of each table row (default: the
task's objective); where the task has a test split, the row reports the
test twin of that metric. Output goes into the first sweep directory
unless ``--out`` says otherwise.
"""

import argparse
import sys
from pathlib import Path

from analysis.report import write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweeps", nargs="+", type=Path, help="sweep directories (Hydra multirun layout)")
    parser.add_argument("--metric", help="selection metric, e.g. val_loss or best_val_accuracy (default: the objective)")
    parser.add_argument("--mode", choices=["min", "max"], help="whether lower or higher --metric is better")
    parser.add_argument("--out", type=Path, help="output directory (default: the first sweep directory)")
    parser.add_argument("--no-figures", action="store_true")
    parser.add_argument("--at-step", type=int, metavar="N",
                        help="read RL runs at N environment steps (their last logged row at or before N), "
                             "e.g. the paper's Table 6 at 50000")
    args = parser.parse_args(argv)
    if args.at_step is not None and args.at_step <= 0:
        parser.error(f"--at-step must be a positive number of environment steps, got {args.at_step}")
    try:
        write_report(args.sweeps, args.out or args.sweeps[0], args.metric, args.mode, not args.no_figures,
                     at_step=args.at_step)
    except (FileNotFoundError, ValueError) as error:  # NoRunsError among them
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
