"""Does overlapping EnvPool's stepping with the policy's forward pay? The rollout loop alone, three ways.

K agents (the paper's 64-64 actor and critic per agent, stacked as
``tasks.ppo_networks.ActorCritic``, one torch thread), one environment each,
acting greedily for a number of steps:

- ``sync``: one pool, ``step`` of all K, then the forward of all K (as
  ``tasks.ppo`` does), EnvPool's own threads (its default: one per core);
- ``sync1``: the same with one EnvPool thread;
- ``overlap``: the agents in two halves, each with its own pool; a half's
  actions are sent (``send``) and its forward for the next step runs while
  the other half's environments step, then ``recv``.

Each mode prints environment steps per second. ``--processes 2`` runs two
copies of the script at once and prints each one's rate (a grid's two
workers on two cores); the copies set up first and start timing at the
same moment (``--start-at``, 15 s after they are launched), so that their
timed loops overlap.

    python bench/rollout_overlap.py [--env LunarLander-v3] [--agents 121] [--steps 1000] [--rounds 3]
    python bench/rollout_overlap.py --processes 2 --modes sync,overlap
    python bench/rollout_overlap.py --smoke
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks.ppo_networks import ActorCritic, agent_networks

MODES = ("sync", "sync1", "overlap")


def pool(env: str, seeds: list[int], threads: int | None):
    import envpool

    extra = {} if threads is None else {"num_threads": threads}
    return envpool.make_gymnasium(env, num_envs=len(seeds), env_seed=seeds, **extra)


def policy(envs, seeds: list[int]):
    """The greedy actions of ``seeds``' actors (as ``tasks.ppo``'s rollout acts) for the pool ``envs``."""
    observation, actions = int(np.prod(envs.observation_space.shape)), int(envs.action_space.n)
    net = ActorCritic(*agent_networks(seeds, observation, [64, 64], actions), torch.device("cpu"))

    def act(obs: np.ndarray) -> np.ndarray:
        logits = net.actor(torch.as_tensor(obs, dtype=torch.float32).reshape(len(seeds), 1, observation))
        return logits.argmax(-1).reshape(-1).numpy()

    return act


def wait_until(start_at: float | None) -> None:
    """Sleep until the wall-clock time ``start_at`` (the copies of ``--processes`` start timing together);
    a copy that gets there late says so on stderr."""
    if start_at is not None:
        if time.time() > start_at:
            print(f"started timing {time.time() - start_at:.1f} s late", file=sys.stderr)
        time.sleep(max(0.0, start_at - time.time()))


def sync(env: str, agents: int, steps: int, threads: int | None, start_at: float | None = None) -> float:
    seeds = list(range(agents))
    envs = pool(env, seeds, threads)
    act = policy(envs, seeds)
    obs, _ = envs.reset()
    wait_until(start_at)
    start = time.perf_counter()
    for _ in range(steps):
        obs = envs.step(act(obs))[0]
    rate = agents * steps / (time.perf_counter() - start)
    envs.close()
    return rate


def overlap(env: str, agents: int, steps: int, start_at: float | None = None) -> float:
    halves = [list(range(agents // 2)), list(range(agents // 2, agents))]
    pools = [pool(env, seeds, None) for seeds in halves]
    acts = [policy(p, seeds) for p, seeds in zip(pools, halves)]
    ids = [np.arange(len(seeds), dtype=np.int32) for seeds in halves]
    first = [p.reset()[0] for p in pools]
    wait_until(start_at)
    start = time.perf_counter()
    for h in range(2):
        pools[h].send(acts[h](first[h]), ids[h])
    for _ in range(steps - 1):
        for h in range(2):  # this half's forward runs while the other half's environments step
            obs = pools[h].recv()[0]
            pools[h].send(acts[h](obs), ids[h])
    for h in range(2):
        pools[h].recv()
    rate = agents * steps / (time.perf_counter() - start)
    for p in pools:
        p.close()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="LunarLander-v3", choices=["LunarLander-v3", "Acrobot-v1", "CartPole-v1"])
    parser.add_argument("--agents", type=int, default=121)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--processes", type=int, default=1, help="copies of this script run at once")
    parser.add_argument("--smoke", action="store_true", help="4 agents, 20 steps, one round: checks the script runs")
    parser.add_argument("--json", action="store_true", help="one JSON line per mode and round (for --processes)")
    parser.add_argument("--start-at", type=float, help="wall-clock time (epoch seconds) to start timing at")
    args = parser.parse_args()
    modes = args.modes.split(",")
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"--modes: unknown {', '.join(unknown)}; allowed: {', '.join(MODES)}")
    agents, steps, rounds = (4, 20, 1) if args.smoke else (args.agents, args.steps, args.rounds)
    torch.set_num_threads(1)

    if args.processes > 1:  # each mode: the copies at once, each one round of that mode
        own = [sys.executable, __file__, "--env", args.env, "--agents", str(agents), "--steps", str(steps), "--json"]
        for r in range(rounds):
            for mode in modes:
                # the copies set up (imports, pools, networks), then start timing together
                start_at = f"{time.time() + (5 if args.smoke else 15):.3f}"
                copies = [
                    subprocess.Popen(
                        [*own, "--rounds", "1", "--modes", mode, "--start-at", start_at],
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                    for _ in range(args.processes)
                ]
                outputs = [c.communicate()[0] for c in copies]
                if any(c.returncode for c in copies):
                    sys.exit(f"a copy failed (exit statuses {[c.returncode for c in copies]})")
                rates = [json.loads(out)["steps_per_s"] for out in outputs]
                print(
                    f"round {r + 1}, {args.processes} processes at once, {mode}: "
                    f"{' + '.join(f'{x:,.0f}' for x in rates)} = {sum(rates):,.0f} env steps/s",
                    flush=True,
                )
        return

    with torch.inference_mode():
        for r in range(rounds):
            for mode in modes:
                rate = (
                    overlap(args.env, agents, steps, args.start_at)
                    if mode == "overlap"
                    else sync(args.env, agents, steps, 1 if mode == "sync1" else None, args.start_at)
                )
                if args.json:
                    print(
                        json.dumps(
                            {"round": r + 1, "env": args.env, "agents": agents, "mode": mode, "steps_per_s": rate}
                        )
                    )
                else:
                    print(f"round {r + 1}, {args.env}, {agents} agents, {mode}: {rate:.0f} env steps/s", flush=True)


if __name__ == "__main__":
    main()
