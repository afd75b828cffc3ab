"""Environment steps per second of a slice of the paper's PPO grids, batched and one agent per job.

For each environment, the slice is seed 0 of the paper grid (bootstrapped
truncation): its 121 distinct policy x value envelope pairs (10% of the
Acrobot grid's 1,210 runs, 5% of LunarLander's 2,420), each for
``--updates`` x 500 environment steps at the paper's protocol (rollouts of
100 steps for Acrobot, 500 for LunarLander; 4 epochs of minibatches of 100).

- batched: the whole slice as one command with ``hydra/launcher=batched``
  and ``task.backend=envpool`` (one process, one model for all 121 runs);
- with ``--workers W``: W slices (seeds 0 .. W-1) as groups of 121 that
  train at once in W worker processes (``hydra.launcher.workers=W``, one
  torch thread each on 2 cores); the rate is the sum of the groups' rates;
- one agent per job: ``--single`` of the slice's runs, each its own job
  under the basic launcher with the gymnasium back end, as a sweep ran
  them before the batching launcher.

Rates are the median over updates of what each run logs
(``charts/SPS``: environment steps of all the group's agents
per second of rollout plus update), so start-up is left out; the
command's whole wall time is printed too. The extrapolation divides the
paper grid's environment steps by the rate (one process on this machine).

    python bench/ppo_grid.py [--env acrobot lunarlander] [--updates 2] [--single 4] [--workers 2]
    python bench/ppo_grid.py --smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# runs, environment steps per run, preset and rollout length of each paper grid (Acrobot: 121 envelope
# pairs x 5 seeds x 2 truncation settings; LunarLander: 121 pairs x 20 seeds)
GRIDS = {
    "acrobot": (121 * 5 * 2, 200_000, "acrobot_paper", 100),
    "lunarlander": (121 * 20, 500_000, "lunarlander_paper", 500),
}


def sweep(args: list[str], out: Path) -> tuple[float, list[float]]:
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "run_ablation.py"),
            "-m",
            *args,
            f"hydra.sweep.dir={out}",
            "tensorboard=false",
            "progress=false",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"sweep failed:\n{proc.stderr[-3000:]}")
    rates, groups = [], {}
    for metrics in sorted(out.glob("*/metrics.jsonl")):
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        rates.append(statistics.median(r["charts_SPS"] for r in rows))
        # every run of a group logs the group's rate; a group is the runs that share one batch record
        batch = json.loads((metrics.parent / "result.json").read_text()).get("batch")
        groups[json.dumps(batch, sort_keys=True)] = rates[-1]
    return wall, rates, sum(groups.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", nargs="+", choices=sorted(GRIDS), default=sorted(GRIDS))
    parser.add_argument("--updates", type=int, default=2)
    parser.add_argument("--single", type=int, default=4, help="runs of the slice timed one agent per job (0: none)")
    parser.add_argument("--workers", type=int, default=1, help="slices trained at once, one worker process each")
    parser.add_argument(
        "--smoke", action="store_true", help="Acrobot, 4 runs batched and 2 alone: checks the script runs"
    )
    args = parser.parse_args()
    for env in args.env if not args.smoke else ["acrobot"]:
        runs, steps, preset, rollout = GRIDS[env]
        updates = args.updates * 500 // rollout  # the same environment steps per run for either protocol
        common = [
            f"experiment={preset}",
            f"task.total_steps={updates * rollout}",
            "seed=0",
            "task.truncation=bootstrap",
        ]
        if args.smoke:
            common += [
                "envelope@envelopes.value=identity",
                "envelopes.policy.quantile=0.1",
                "envelopes.policy.width=0.1",
            ]
        with tempfile.TemporaryDirectory() as tmp:
            batched_args = common + ["hydra/launcher=batched", "task.backend=envpool"]
            if args.workers > 1:
                batched_args = [a for a in batched_args if a != "seed=0"] + [
                    f"seed=range({args.workers})",
                    "hydra.launcher.max_batch=121",
                    f"hydra.launcher.workers={args.workers}",
                ]
            wall, rates, batched = sweep(batched_args, Path(tmp) / "batched")
            group = len(rates)
            if not args.single:
                single = float("nan")
            else:
                single_wall, single_rates, _ = sweep(
                    common
                    + [
                        "envelope@envelopes.policy=identity",
                        "envelope@envelopes.value=identity",
                        f"seed=range({args.single})" if not args.smoke else "seed=0,1",
                    ],
                    Path(tmp) / "single",
                )
                single = statistics.median(single_rates)
        grid_steps = runs * steps
        print(f"{env}: {group} runs x {updates} updates of {rollout} steps; paper grid {runs} runs x {steps:,} steps")
        print(
            f"  batched ({args.workers} worker process(es), EnvPool): {batched:,.0f} env steps/s (command {wall:.0f} s); "
            f"whole grid {grid_steps / batched / 3600:.2f} h"
        )
        print(
            f"  one agent per job (gymnasium):  {single:,.0f} env steps/s per job; "
            f"whole grid {grid_steps / single / 3600:.2f} h one job at a time"
        )


if __name__ == "__main__":
    main()
