"""Time to load a sweep of N jobs (result.json + metrics.jsonl each) into DataFrames.

Writes a synthetic sweep in the runner's layout (20 epochs per job) to a
temporary directory, then times ``load_jobs``, ``load_metrics`` and the
paper table.

    python bench/analysis_load.py [--jobs 1000] [--smoke]

``--write DIR --rows 2000 --wide`` writes the sweep to DIR and stops: rows
as wide as a PPO run logs (20 metrics), for timing a whole report and its
peak memory, e.g. ``/usr/bin/time -v python -m analysis DIR --out OUT``.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analysis.load import load_jobs, load_metrics
from analysis.tables import default_spec, paper_table

WIDE = [
    f"train_{loss}_{kind}_loss_{stat}"
    for loss in ("policy", "value")
    for kind in ("raw", "shaped")
    for stat in ("mean", "std")
] + [
    "envelope_classification_fraction_attenuated",
    "losses_explained_variance",
    "losses_approx_kl",
    "losses_clipfrac",
    "losses_kl_coef",
    "charts_rollout_SPS",
    "charts_SPS",
    "test_loss",
]


def write_sweep(root: Path, jobs: int, epochs: int = 20, wide: bool = False) -> None:
    shapes = ["identity", "step", "linear", "sigmoid"]
    for num in range(jobs):
        job = root / str(num)
        (job / ".hydra").mkdir(parents=True)
        shape, seed, quantile = shapes[num % 4], num // 40, [0.1, 0.5, 0.9][(num // 4) % 3]
        (job / ".hydra" / "overrides.yaml").write_text(f"- envelope@envelopes.classification={shape}\n- seed={seed}\n")
        envelope = {"shape": shape} if shape == "identity" else {"shape": shape, "quantile": quantile, "step_size": 0.1}
        config_id = f"{shape}-{quantile}" if shape != "identity" else "identity"
        final = {"epoch": epochs, "val_loss": 0.3 + 0.01 * (num % 7), "test_loss": 0.31, "val_accuracy": 0.9}
        (job / "result.json").write_text(
            json.dumps(
                {
                    "status": "completed",
                    "task": "classification",
                    "seed": seed,
                    "config_id": config_id,
                    "run_id": f"{config_id}-{seed}",
                    "effective": {"task": {"dataset": "mnist"}, "envelopes": {"classification": envelope}},
                    "objective": {"metric": "val_loss", "mode": "min", "value": final["val_loss"]},
                    "final": final,
                    "best": final,
                }
            )
        )
        rows = [
            {
                "epoch": e,
                "val_loss": 1.0 / e,
                "train_raw_loss_mean": 1.0 / e,
                "envelope_classification_mean_weight": 0.9,
                **({key: 0.5 + 1e-3 * e for key in WIDE} if wide else {}),
            }
            for e in range(1, epochs + 1)
        ]
        (job / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--smoke", action="store_true", help="a tiny setting that checks the script runs (8 jobs)")
    parser.add_argument("--rows", type=int, default=20, help="metric rows per job (epochs or updates)")
    parser.add_argument("--wide", action="store_true", help="rows as wide as a PPO run logs (20 metrics)")
    parser.add_argument("--write", type=Path, metavar="DIR", help="write the sweep to DIR (new) and stop")
    args = parser.parse_args()
    if args.smoke:
        args.jobs = 8
    if args.write is not None:
        args.write.mkdir(parents=True)
        write_sweep(args.write, args.jobs, args.rows, args.wide)
        print(f"{args.jobs} jobs x {args.rows} rows written to {args.write}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        write_sweep(Path(tmp), args.jobs, args.rows, args.wide)
        start = time.perf_counter()
        jobs = load_jobs(tmp)
        loaded = time.perf_counter()
        metrics = load_metrics(jobs)
        long_loaded = time.perf_counter()
        paper_table(jobs, default_spec(jobs))
        tabled = time.perf_counter()
    print(
        f"{args.jobs} jobs: load_jobs {loaded - start:.2f} s, load_metrics ({len(metrics)} rows) "
        f"{long_loaded - loaded:.2f} s, paper table {tabled - long_loaded:.2f} s"
    )


if __name__ == "__main__":
    main()
