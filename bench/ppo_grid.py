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

Against another program at equal work (``--peer PYTHON --peer-dir DIR``,
Acrobot only): each of ``--rounds`` rounds runs the other program's
``jax_ppo_acrobot.py --agents 121`` (or, with ``--workers W``,
``jax_workers.py --agents 121*W --workers W``; each prints one JSON line
with its median environment steps/s) and then this slice, one after the
other, so both are measured in the same minutes; it prints both rates per
round, their medians and the ratio.

    python bench/ppo_grid.py --env acrobot --updates 4 --single 0 --workers 2 \\
        --peer /tmp/peer-venv/bin/python --peer-dir <dir of the peer scripts> --rounds 3

``--override KEY=VALUE`` (repeatable) adds an override to the batched
slice (``--override task.update_epochs=2``). ``--compile`` runs the batched
slice with ``compile=true``;
``--compare-compile`` runs it eager and compiled in turn for ``--rounds``
rounds and prints both rates and the ratio.
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


def peer_rate(python: str, peer_dir: Path, workers: int, calls: int) -> float:
    """The other program's median environment steps/s on the same work: 121 agents per process."""
    if workers > 1:
        command = [python, str(peer_dir / "jax_workers.py"), "--agents", str(121 * workers), "--workers", str(workers)]
        command += ["--", "--chunk", "1", "--calls", str(calls)]
    else:
        command = [python, str(peer_dir / "jax_ppo_acrobot.py"), "--agents", "121", "--chunk", "1"]
        command += ["--calls", str(calls)]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the peer failed ({' '.join(command)}):\n{proc.stderr[-3000:]}")
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["median"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", nargs="+", choices=sorted(GRIDS), default=sorted(GRIDS))
    parser.add_argument("--updates", type=int, default=2)
    parser.add_argument("--single", type=int, default=4, help="runs of the slice timed one agent per job (0: none)")
    parser.add_argument("--workers", type=int, default=1, help="slices trained at once, one worker process each")
    parser.add_argument(
        "--smoke", action="store_true", help="Acrobot, 4 runs batched and 2 alone: checks the script runs"
    )
    parser.add_argument("--peer", metavar="PYTHON", help="the other program's interpreter (its own environment)")
    parser.add_argument("--peer-dir", type=Path, metavar="DIR", help="the directory of the other program's scripts")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds against --peer")
    parser.add_argument("--peer-calls", type=int, default=20, help="timed calls of the peer per round")
    parser.add_argument("--compile", action="store_true", help="the batched slice with compile=true")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a further override of the batched slice (repeatable), e.g. task.update_epochs=2",
    )
    parser.add_argument(
        "--compare-compile", action="store_true", help="interleaved rounds: the batched slice eager, then compiled"
    )
    args = parser.parse_args()
    if args.compare_compile:
        return against_eager(args)
    if args.peer is not None:
        if args.peer_dir is None:
            parser.error("--peer needs --peer-dir, the directory holding jax_ppo_acrobot.py and jax_workers.py")
        return against_peer(args)
    for env in args.env if not args.smoke else ["acrobot"]:
        runs, steps, _, _ = GRIDS[env]
        common, batched_args, updates, rollout = slice_overrides(env, args.updates, args.smoke, args.workers)
        batched_args += (["compile=true"] if args.compile else []) + args.override
        with tempfile.TemporaryDirectory() as tmp:
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
            f"  batched ({args.workers} worker process(es), {backend_of(batched_args)}): {batched:,.0f} env steps/s (command {wall:.0f} s); "
            f"whole grid {grid_steps / batched / 3600:.2f} h"
        )
        print(
            f"  one agent per job (gymnasium):  {single:,.0f} env steps/s per job; "
            f"whole grid {grid_steps / single / 3600:.2f} h one job at a time"
        )


def backend_of(overrides: list[str]) -> str:
    """The environments' back end the slice's overrides end on (the last task.backend given wins)."""
    backends = [o.split("=", 1)[1] for o in overrides if o.startswith("task.backend=")]
    return {"envpool": "EnvPool", "torch": "torch Acrobot"}.get(backends[-1], backends[-1]) if backends else "gymnasium"


def slice_overrides(env: str, updates_of_500: int, smoke: bool, workers: int) -> tuple[list[str], list[str], int, int]:
    """The slice's overrides (alone, and batched on EnvPool), its updates and rollout length."""
    runs, steps, preset, rollout = GRIDS[env]
    updates = updates_of_500 * 500 // rollout  # the same environment steps per run for either protocol
    common = [f"experiment={preset}", f"task.total_steps={updates * rollout}", "seed=0", "task.truncation=bootstrap"]
    if smoke:
        common += ["envelope@envelopes.value=identity", "envelopes.policy.quantile=0.1", "envelopes.policy.width=0.1"]
    batched = common + ["hydra/launcher=batched", "task.backend=envpool"]
    if workers > 1:
        batched = [a for a in batched if a != "seed=0"]
        batched += [f"seed=range({workers})", "hydra.launcher.max_batch=121", f"hydra.launcher.workers={workers}"]
    return common, batched, updates, rollout


def against_peer(args: argparse.Namespace) -> None:
    """Interleaved rounds: the peer, then this project's slice, each round; medians and the ratio."""
    ours, theirs = [], []
    _, overrides, updates, rollout = slice_overrides("acrobot", args.updates, args.smoke, args.workers)
    overrides += (["compile=true"] if args.compile else []) + args.override
    for number in range(1, args.rounds + 1):
        theirs.append(peer_rate(args.peer, args.peer_dir, args.workers, args.peer_calls))
        with tempfile.TemporaryDirectory() as tmp:
            _, rates, rate = sweep(overrides, Path(tmp) / "batched")
        ours.append(rate)
        print(f"round {number}: peer {theirs[-1]:,.0f} env steps/s, LAE Lab {ours[-1]:,.0f} ({len(rates)} runs)")
    peer, lae = statistics.median(theirs), statistics.median(ours)
    print(
        f"Acrobot, {args.workers} process(es), {updates} updates of {rollout} steps per run; medians of "
        f"{args.rounds} rounds: peer {peer:,.0f} env steps/s, LAE Lab {lae:,.0f}; LAE Lab / peer = {lae / peer:.2f}x"
    )


def against_eager(args: argparse.Namespace) -> None:
    """Interleaved rounds of each --env's batched slice: eager, then compile=true; medians and the ratio.

    Each rate is the median over updates, so the compiled slice's first
    update (which pays the compilation) does not count; the compile time is
    printed apart (``compile_s`` in the runs' result.json).
    """
    for env in args.env if not args.smoke else ["acrobot"]:
        _, overrides, updates, rollout = slice_overrides(env, args.updates, args.smoke, args.workers)
        overrides += args.override
        rates: dict[str, list[float]] = {"eager": [], "compiled": []}
        for number in range(1, args.rounds + 1):
            for name, extra in (("eager", []), ("compiled", ["compile=true"])):
                with tempfile.TemporaryDirectory() as tmp:
                    wall, _, rate = sweep(overrides + extra, Path(tmp) / "batched")
                    compile_s = sorted(
                        {
                            json.loads(path.read_text()).get("compile_s")
                            for path in (Path(tmp) / "batched").glob("*/result.json")
                        }
                        - {None}
                    )
                rates[name].append(rate)
                spent = f", compile {', '.join(f'{c:.0f}' for c in compile_s)} s" if compile_s else ""
                print(f"{env} round {number}: {name} {rate:,.0f} env steps/s (command {wall:.0f} s{spent})", flush=True)
        eager, compiled = statistics.median(rates["eager"]), statistics.median(rates["compiled"])
        print(
            f"{env}, {args.workers} process(es), {updates} updates of {rollout} steps per run; medians of "
            f"{args.rounds} rounds: eager {eager:,.0f} env steps/s, compiled {compiled:,.0f}; "
            f"compiled / eager = {compiled / eager:.2f}x"
        )


if __name__ == "__main__":
    main()
