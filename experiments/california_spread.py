"""Why Table 3's spread across seeds is larger in our runs than in the paper: the last epoch's spikes.

    python experiments/california_spread.py <california sweep> [--out DIR]

Reads a California Housing sweep (``experiment=california_paper``) and
prints, for the runs as a whole and for the configurations of the paper's
Table 3 rows: how often a run's final validation MSE (the epoch the paper's
table reads, the 100th) lies well above the best epoch of the same run, and
the final value's mean ± std, median and interquartile mean over seeds, in
the paper's units ($100,000, squared). With ``--out`` it also draws the
identity runs' validation curves (``california_spread.png``). With
``--data-root`` it prints, per seed, the most extreme standardised feature
value in the validation split beside the training split's: the spikes come
from validation rows far outside the range the model was fitted on.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analysis.load import load_jobs
from analysis.report import PAPER_RESULTS, _same_envelopes

SPIKE = 1.5  # a final value this many times the run's best epoch counts as a spike


def summary(values: np.ndarray) -> str:
    return (
        f"{values.mean():.4f} ± {values.std(ddof=1):.4f}, median {np.median(values):.4f}, "
        f"IQM {stats.trim_mean(values, 0.25):.4f} (n={len(values)})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--out", type=Path, help="directory for california_spread.png")
    parser.add_argument("--data-root", type=Path, help="the runs' data_root: print each seed's most extreme rows")
    args = parser.parse_args(argv)
    jobs = load_jobs(args.sweep)
    done = jobs[(jobs["status"] == "completed") & (jobs["task"] == "regression")]
    if done.empty or "final_val_mse_target_units" not in done.columns:
        print(f"error: no completed California Housing runs with val_mse_target_units in {args.sweep}", file=sys.stderr)
        return 2
    ratio = done["final_val_mse"] / done["best_val_mse"]
    spiked = ratio > SPIKE
    print(
        f"{len(done)} runs; final validation MSE above {SPIKE}x the run's best epoch in {spiked.sum()} "
        f"({spiked.mean():.1%}); final/best quantiles: "
        + ", ".join(f"{q:.0%} {v:.3f}" for q, v in ratio.quantile([0.5, 0.75, 0.9, 0.99]).items())
    )
    per_config = done.groupby("config_id")["final_val_mse_target_units"].std()
    calm = done[~spiked].groupby("config_id")["final_val_mse_target_units"].std()
    print(
        f"std over seeds per configuration ($100k^2): median {per_config.median():.4f} with every run, "
        f"{calm.median():.4f} without the spiked runs"
    )

    paper = pd.read_csv(PAPER_RESULTS, dtype={"table": str})
    print("\nTable 3 rows (final epoch, $100k^2): paper | ours: mean ± std, median, IQM | spiked seeds")
    for _, ref in paper[paper["table"] == "3"].iterrows():
        wanted = json.loads(ref["envelopes"])
        rows = done[done["envelopes_json"].map(lambda e, wanted=wanted: _same_envelopes(wanted, json.loads(e)))]
        if rows.empty:
            print(f"{json.dumps(wanted)}: not in this sweep")
            continue
        values = rows["final_val_mse_target_units"].to_numpy(float)
        print(
            f"{rows['envelopes'].iloc[0]}: {ref['mean']:.4f} ± {ref['std']:.4f} | {summary(values)} | "
            f"{int(spiked[rows.index].sum())} of {len(rows)}"
        )

    if args.data_root is not None:
        from tasks.regression import FEATURES, load_california_housing, split_and_standardise

        features, target = load_california_housing(args.data_root / "california_housing")
        task = json.loads(done["task_json"].iloc[0])
        print(
            "\nseed: largest |z| in validation (feature) | in training | runs of the seed (every configuration) "
            "that spiked at the end"
        )
        by_seed = spiked.groupby(done["seed"])
        for seed in sorted(done["seed"].unique()):
            splits, _ = split_and_standardise(features, target, task["val_fraction"], task["test_fraction"], int(seed))
            val, train = splits["val"][0].abs(), splits["train"][0].abs()
            column = int(val.max(0).values.argmax())
            print(
                f"{seed}: {val.max():.0f} ({FEATURES[column]}) | {train.max():.0f} | "
                f"{by_seed.sum()[seed]} of {by_seed.size()[seed]}"
            )

    if args.out is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        identity = done[done["env_mse_shape"] == "identity"].sort_values("seed")
        fig, ax = plt.subplots(figsize=(7, 4))
        for job in identity.itertuples():
            rows = [json.loads(line) for line in (Path(job.job_dir) / "metrics.jsonl").read_text().splitlines() if line]
            epochs = [r["epoch"] for r in rows]
            ax.plot(
                epochs,
                [r["val_mse_target_units"] for r in rows],
                lw=0.9,
                label=f"seed {job.seed}" + (" (spiked at the end)" if spiked[job.Index] else ""),
            )
        ax.axhline(0.312, color="black", ls="--", lw=0.8, label="paper, identity: 0.312")
        ax.set(
            xlabel="epoch",
            ylabel="validation MSE ($100k²)",
            ylim=(0.25, 0.8),
            title="California Housing, identity: validation MSE per epoch and seed",
        )
        ax.legend(fontsize=7, ncol=2)
        args.out.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(args.out / "california_spread.png", dpi=120)
        print(f"\nFigure: {args.out / 'california_spread.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
