"""The default torch threads against fixed choices, on an idle machine and beside a second sweep.

Runs the whole ``python run_ablation.py -m experiment=quick_digits`` command (start-up, 12 jobs, the
report) with the default threads (none given), ``threads=1`` and ``threads=<cores>``, interleaved in
rounds so that each setting sees the same minutes. "Loaded" rounds run a second sweep beside the
timed one (the same preset, default threads, in a loop until the timed one ends), as on a shared
machine. Prints each setting's median wall time and its ratio to ``threads=1``.

    python bench/threads.py                       # 3 rounds, idle and loaded
    python bench/threads.py --rounds 5 --experiment california_quick --data-root ../shared/data
    python bench/threads.py --smoke               # 1 epoch, 1 round: checks the script runs
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = os.environ.get("LAE_SHARED_DATA", str(ROOT.parent / "shared" / "data"))


def command(args: list[str], sweep_dir: Path) -> list[str]:
    return [sys.executable, str(ROOT / "run_ablation.py"), "-m", *args, f"hydra.sweep.dir={sweep_dir}"]


def timed(args: list[str], sweep_dir: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run(command(args, sweep_dir), cwd=ROOT, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"sweep failed:\n{proc.stderr[-2000:]}")
    return elapsed


def beside(args: list[str], out: Path) -> subprocess.Popen:
    """A second sweep in a loop (a shell loop, killed with its process group when the timed one ends)."""
    loop = " ".join(f"'{a}'" for a in command(args, out / "beside"))
    return subprocess.Popen(
        ["bash", "-c", f"while true; do rm -rf '{out / 'beside'}'; {loop} >/dev/null 2>&1; done"],
        cwd=ROOT,
        start_new_session=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="quick_digits")
    parser.add_argument("--data-root", default=DATA)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="1 epoch, 1 round, idle only: checks the script runs")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    common = [f"experiment={args.experiment}", f"data_root={args.data_root}", "progress=false", "tensorboard=false"]
    if args.smoke:
        common += ["task.epochs=1"]
    settings = {"default": [], "threads=1": ["threads=1"], f"threads={cores}": [f"threads={cores}"]}
    conditions = ["idle"] if args.smoke else ["idle", "loaded"]
    rounds = 1 if args.smoke else args.rounds
    times: dict[tuple[str, str], list[float]] = {}
    out = Path(tempfile.mkdtemp(prefix="lae_bench_threads_"))
    try:
        for condition in conditions:
            for number in range(rounds):
                for name, extra in settings.items():
                    other = beside(common, out) if condition == "loaded" else None
                    try:
                        if other is not None:
                            time.sleep(3.0)  # the second sweep past its start-up
                        elapsed = timed(common + extra, out / f"{condition}_{number}_{name.replace('=', '')}")
                    finally:
                        if other is not None:
                            os.killpg(other.pid, 9)
                            other.wait()
                    times.setdefault((condition, name), []).append(elapsed)
                    print(f"{condition} round {number + 1}: {name:<10} {elapsed:6.1f} s", flush=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(f"\n{args.experiment}, {cores} cores, {rounds} round(s), median wall time of the whole command:")
    for condition in conditions:
        base = statistics.median(times[(condition, "threads=1")])
        for name in settings:
            median = statistics.median(times[(condition, name)])
            print(f"{condition:<7} {name:<10} {median:6.1f} s   {median / base:.2f}x threads=1")


if __name__ == "__main__":
    main()
