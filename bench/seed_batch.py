"""Seed-batched training against sequential runs: N seeds of one configuration, in one process.

(a) N single-seed jobs one after another, each composed by Hydra's compose API as a sweep
composes its jobs, and (b) one job with ``seed_batch=N``. Each job writes its full results
(metrics, TensorBoard events, result.json) as in a sweep. A warm-up job runs first, so one-time
costs (imports, the first optimiser) count for neither. Prints the wall times, their ratio and
the largest per-seed difference in the objective.

    python bench/seed_batch.py --task vae          # the VAE over-parameterised setting (paper size)
    python bench/seed_batch.py --task regression   # California Housing (paper size: 100 epochs)
    python bench/seed_batch.py --smoke             # 2 seeds, 1 epoch: checks the script runs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402

from runner.config import register_configs  # noqa: E402
from runner.job import run_job  # noqa: E402

TASKS = {"vae": "task=vae_overparameterised", "regression": "task=california_housing"}
DATA = os.environ.get("LAE_SHARED_DATA", str(ROOT.parent / "shared" / "data"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="vae")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=None, help="default: the task's (paper) setting")
    parser.add_argument("--data-root", default=DATA)
    parser.add_argument("--smoke", action="store_true", help="2 seeds, 1 epoch: checks the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.seeds, args.epochs = 2, 1
    register_configs()
    base = [TASKS[args.task], f"data_root={args.data_root}", "progress=false"]
    if args.epochs is not None:
        base.append(f"task.epochs={args.epochs}")
    out = Path(tempfile.mkdtemp(prefix="lae_bench_seed_batch_"))

    def job(overrides: list[str], name: str) -> float:
        start = time.perf_counter()
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=base + overrides)
        run_job(cfg, out / name, None, overrides, reraise=True)
        return time.perf_counter() - start

    try:
        job(["task.epochs=1", "seed=99"], "warmup")
        sequential = sum(job([f"seed={seed}"], f"single_{seed}") for seed in range(args.seeds))
        batched = job([f"seed_batch={args.seeds}"], "batch")
        objective, train = [], []
        for seed in range(args.seeds):
            single = json.loads((out / f"single_{seed}" / "result.json").read_text())
            together = json.loads((out / "batch" / f"seed_{seed}" / "result.json").read_text())
            metric = single["objective"]["metric"]
            train_key = next(k for k in single["final"] if k.startswith("train_") and k.endswith("_mean"))
            for values, key in ((objective, metric), (train, train_key)):
                values.append(abs(together["final"][key] - single["final"][key]) / abs(single["final"][key]))
        import torch

        print(
            f"{' '.join(base[:1] + base[3:])}, {args.seeds} seeds, torch threads {torch.get_num_threads()}, "
            f"{os.cpu_count()} cores"
        )
        print(f"sequential: {sequential:.1f} s ({sequential / args.seeds:.2f} s per seed)")
        print(f"batched:    {batched:.1f} s ({batched / args.seeds:.2f} s per seed)")
        print(f"speed-up:   {sequential / batched:.2f}x")
        # Rounding differences grow over training; a metric that jumps from epoch to epoch
        # (California's validation MSE has outliers) shows them most.
        for key, values in ((metric, objective), (train_key, train)):
            values.sort()
            print(
                f"per-seed relative difference in the final {key}: median {values[len(values) // 2]:.1e}, "
                f"largest {values[-1]:.1e}"
            )
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
