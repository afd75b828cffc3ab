"""A quick sweep run serially and with the joblib launcher (n_jobs=2), both from the command line.

Each run is the whole ``python run_ablation.py -m ...`` command (start-up, every job, the
end-of-sweep report) in a fresh output directory; prints both wall times and their ratio.
Each job has one torch thread (the default) in both.

    python bench/joblib_sweep.py                                  # california_quick (12 jobs)
    python bench/joblib_sweep.py --experiment quick_digits        # jobs of about a second
    python bench/joblib_sweep.py --smoke                          # a tiny setting that checks the script runs
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = os.environ.get("LAE_SHARED_DATA", str(ROOT.parent / "shared" / "data"))


def timed_sweep(args: list[str], sweep_dir: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run_ablation.py"), "-m", *args, f"hydra.sweep.dir={sweep_dir}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"sweep failed:\n{proc.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="california_quick")
    parser.add_argument("--n-jobs", type=int, default=2)
    parser.add_argument("--data-root", default=DATA)
    parser.add_argument("--smoke", action="store_true", help="quick_digits with 1 epoch: checks the script runs")
    args = parser.parse_args()
    common = [f"experiment={args.experiment}", f"data_root={args.data_root}", "progress=false"]
    if args.smoke:
        common = ["experiment=quick_digits", "task.epochs=1", "tensorboard=false", "progress=false"]
    out = Path(tempfile.mkdtemp(prefix="lae_bench_joblib_"))
    try:
        serial = timed_sweep(common, out / "serial")
        parallel = timed_sweep(
            common + ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={args.n_jobs}"], out / "joblib"
        )
        jobs = len([p for p in (out / "serial").iterdir() if (p / "result.json").exists()])
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(f"{' '.join(common[:-1])}: {jobs} jobs, {os.cpu_count()} cores")
    print(f"serial:              {serial:.1f} s")
    print(f"joblib n_jobs={args.n_jobs}:     {parallel:.1f} s")
    print(f"speed-up:            {serial / parallel:.2f}x")


if __name__ == "__main__":
    main()
