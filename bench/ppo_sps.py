"""PPO environment steps per second: Acrobot-v1 and LunarLander-v3, num_envs 1 and 8.

Runs the real task (identity envelopes) for ``--steps`` environment steps
per setting and prints the median over updates of the rollout rate
(environment and policy, the per-step path) and of the whole-update rate
(rollout plus the PPO update), as the task logs them.

    python bench/ppo_sps.py [--steps 20000] [--smoke]
"""

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--smoke", action="store_true", help="one short update per setting: checks the script runs")
    args = parser.parse_args()
    extra = ["task.rollout_steps=64", "task.minibatch_size=64", "task.update_epochs=1"] if args.smoke else []
    if args.smoke:
        args.steps = 64
    from hydra import compose, initialize_config_dir

    from runner.config import register_configs
    from runner.job import run_job

    register_configs()
    print(f"{'environment':15s} {'num_envs':>8s} {'rollout steps/s':>16s} {'with update':>12s}")
    for task in ("acrobot", "lunarlander"):
        for num_envs in (1, 8):
            with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
                cfg = compose(
                    "config",
                    overrides=[
                        f"task={task}",
                        f"task.num_envs={num_envs}",
                        f"task.total_steps={args.steps}",
                        "tensorboard=false",
                        "progress=false",
                        "device=cpu",
                        *extra,
                    ],
                )
            with tempfile.TemporaryDirectory() as tmp:
                run_job(cfg, Path(tmp), None, [], reraise=True)
                rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
            rollout = statistics.median(r["charts_rollout_SPS"] for r in rows)
            whole = statistics.median(r["charts_SPS"] for r in rows)
            print(f"{cfg.task.env_id:15s} {num_envs:8d} {rollout:16.0f} {whole:12.0f}")


if __name__ == "__main__":
    main()
