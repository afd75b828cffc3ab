"""Selection-corrected verdicts: the configurations a table selected, trained again on fresh seeds.

A best-of-N row is judged on the numbers that chose it: with N configurations
of equal merit, the best of them looks better than identity by chance. Here
selection and verdict use different seeds. :func:`write_plan` takes a
selection sweep, selects each row of its table as the report does (and,
for a paper table, the paper's own rows too), and writes a confirmation
plan: ``confirmation.json`` (the rows, their selection-stage figures, the
fresh seeds) and ``jobs.yaml`` (each selected configuration with each fresh
seed, one run per job) for ``hydra.sweeper.jobs``. The confirmation sweep
holds the plan too, so its report (:func:`confirmation_table`) puts each
row's selection-stage figure beside the confirmed one and gives a verdict
from the confirmed runs alone: the difference from identity on the fresh
seeds, paired by seed, with its 95% interval and Holm's correction over the
rows.

    python -m analysis <selection sweep> --confirm-seeds 20 [--paper-table N]
    python run_ablation.py -m hydra.sweeper.jobs=<plan>/jobs.yaml hydra.sweep.dir=<plan>/sweep ...
    python -m analysis <plan>/sweep
"""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import pandas as pd
import yaml

from analysis.stats import holm, paired_difference, welch_test

PLAN_FILE = "confirmation.json"
JOBS_FILE = "jobs.yaml"


def _overrides(job_dir: str) -> list[str]:
    """A run's overrides without its seed and seed batch (each confirmation job is one run of one seed)."""
    listed = yaml.safe_load((Path(job_dir) / ".hydra" / "overrides.yaml").read_text()) or []
    return [o for o in listed if o.split("=", 1)[0].lstrip("+~") not in ("seed", "seed_batch")]


def _figure(values: pd.Series) -> dict:
    values = values.dropna().astype(float)
    return {
        "mean": float(values.mean()) if len(values) else math.nan,
        "std": float(values.std(ddof=1)) if len(values) > 1 else math.nan,
        "n": int(len(values)),
    }


def fresh_seeds(jobs: pd.DataFrame, count: int) -> list[int]:
    """``count`` seeds that no run of the selection used: from the next multiple of 1,000 above the largest."""
    used = pd.to_numeric(jobs["seed"], errors="coerce").dropna()
    start = (int(used.max()) // 1000 + 1) * 1000 if len(used) else 1000
    return list(range(start, start + count))


def plan_rows(jobs: pd.DataFrame, spec, table_number: str | None = None) -> list[dict]:
    """The configurations to confirm: each table row's selection (per group of task parameters), identity
    included, then the paper's rows of ``table_number`` found in the sweep; each once."""
    from analysis.report import paper_rows, split_by_task_parameters
    from analysis.tables import paper_table

    done = jobs[jobs["status"] == "completed"]
    rows: list[dict] = []
    seen: set[str] = set()

    def add(config_id: str, label: str, source: str, group: pd.DataFrame) -> None:
        if config_id in seen:
            return
        seen.add(config_id)
        runs = group[group["config_id"] == config_id]
        rows.append(
            {
                "row": label,
                "source": source,
                "config_id": config_id,
                "envelopes": str(runs["envelopes"].iloc[0]),
                "identity": bool(
                    all(e == {"shape": "identity"} for e in json.loads(runs["envelopes_json"].iloc[0]).values())
                ),
                "overrides": _overrides(runs.sort_values("seed")["job_dir"].iloc[0]),
                "selection": {m: _figure(runs[m]) for m in dict.fromkeys([spec.select, *spec.report])},
                "selection_seeds": sorted(int(s) for s in runs["seed"]),
                "candidates": None,
            }
        )

    for label, group in split_by_task_parameters(done):
        prefix = "" if not label else ", ".join(f"task.{k}={v}" for k, v in label) + ": "
        table = paper_table(group, spec)
        for _, row in table.iterrows():
            add(row["config_id"], prefix + row["shapes"], f"best of {int(row['candidates'])} by {spec.select}", group)
            rows[-1]["candidates"] = int(row["candidates"])
        if table_number is not None:
            for envelopes, config_id in paper_rows(group, table_number):
                add(config_id, prefix + f"paper: {envelopes}", f"the paper's Table {table_number} row", group)
    return rows


def write_plan(
    jobs: pd.DataFrame,
    spec,
    seeds: int,
    out_dir: Path,
    sweep_dirs: list[Path],
    table_number: str | None = None,
) -> Path:
    """Write ``confirmation.json`` and ``jobs.yaml`` into ``out_dir``; print the command that runs them."""
    if seeds < 2:
        raise ValueError(f"--confirm-seeds must be at least 2 (a confirmed figure needs a spread), got {seeds}")
    rows = plan_rows(jobs, spec, table_number)
    if not rows:
        raise ValueError("no completed configuration to confirm")
    new_seeds = fresh_seeds(jobs, seeds)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = {
        "selection_sweeps": [str(d) for d in sweep_dirs],
        "selected_by": {"metric": spec.select, "mode": spec.mode},
        "reported": spec.report[0],
        "at_step": jobs.attrs.get("at_step"),
        "fixed": jobs.attrs.get("fixed") or {},
        "paper_table": table_number,
        "seeds": new_seeds,
        "rows": rows,
    }
    (out_dir / PLAN_FILE).write_text(json.dumps(plan, indent=2) + "\n")
    listed = [[*row["overrides"], "seed_batch=1", f"seed={seed}"] for row in rows for seed in new_seeds]
    (out_dir / JOBS_FILE).write_text(yaml.safe_dump(listed, default_flow_style=None, width=1000))
    sweep = out_dir / "sweep"
    sweep.mkdir(exist_ok=True)
    (sweep / PLAN_FILE).write_text(json.dumps(plan, indent=2) + "\n")  # the confirmation sweep's report reads it
    command = (
        f"python run_ablation.py -m hydra.sweeper.jobs={shlex.quote(str(out_dir / JOBS_FILE))} "
        f"hydra.sweep.dir={shlex.quote(str(sweep))} hydra/launcher=batched"
    )
    (out_dir / "run.sh").write_text(f"#!/usr/bin/env bash\n# {len(listed)} runs\n{command}\n")
    print(
        f"Confirmation plan: {len(rows)} configurations x {seeds} fresh seeds ({new_seeds[0]}-{new_seeds[-1]}) "
        f"= {len(listed)} runs, in {out_dir} ({PLAN_FILE}, {JOBS_FILE}, run.sh). Run it with:\n  {command}\n"
        f"then: python -m analysis {sweep}"
    )
    return out_dir / PLAN_FILE


def read_plan(sweep_dir: Path) -> dict | None:
    path = Path(sweep_dir) / PLAN_FILE
    return json.loads(path.read_text()) if path.exists() else None


def confirmation_table(jobs: pd.DataFrame, plan: dict, alpha: float = 0.05) -> pd.DataFrame:
    """Per planned row: the selection-stage figure, the confirmed one (fresh seeds), and a verdict from the
    confirmed runs alone (the difference from identity, paired by seed, Holm over the rows)."""
    selected = plan["selected_by"]["metric"]
    reported = plan["reported"]
    done = jobs[jobs["status"] == "completed"]
    metric = reported if reported in done.columns else selected
    by_config = {cid: group.set_index("seed")[metric].astype(float) for cid, group in done.groupby("config_id")}
    base_row = next((row for row in plan["rows"] if row["identity"]), None)
    base = by_config.get(base_row["config_id"]) if base_row is not None else None
    out = []
    for row in plan["rows"]:
        values = by_config.get(row["config_id"], pd.Series(dtype=float))
        figure = _figure(values)
        half = float(values.std(ddof=1) / math.sqrt(len(values)) * _t(len(values) - 1)) if len(values) > 1 else math.nan
        entry = {
            "row": row["row"],
            "envelopes": row["envelopes"],
            "source": row["source"],
            "selection": row["selection"].get(reported, row["selection"][selected]),
            "confirmed": figure,
            "ci95": half,
            "difference": math.nan,
            "difference_ci95": math.nan,
            "test": "",
            "p": math.nan,
        }
        if base is not None and row is not base_row and len(values) > 1:
            common = values.index.intersection(base.index)
            entry["difference"] = float(values.mean() - base.mean())
            if len(common) >= 2:
                entry["difference_ci95"], entry["p"] = paired_difference(
                    values[common].to_numpy(), base[common].to_numpy()
                )
                entry["test"] = f"paired by seed ({len(common)})"
            else:
                from analysis.stats import difference_interval

                entry["difference_ci95"] = difference_interval(values.to_numpy(), base.to_numpy())[0]
                entry["p"] = welch_test(values.to_numpy(), base.to_numpy())
                entry["test"] = "Welch"
        out.append(entry)
    table = pd.DataFrame(out)
    table["p_holm"] = holm(list(table["p"]))
    lower_better = plan["selected_by"]["mode"] == "min"
    table["verdict"] = [
        "baseline"
        if base_row is not None and r["row"] == base_row["row"]
        else "not run yet"
        if r["confirmed"]["n"] == 0
        else "no identity to compare"
        if math.isnan(r["p_holm"])
        else "within noise"
        if r["p_holm"] >= alpha
        else ("better than identity" if (r["difference"] < 0) == lower_better else "worse than identity")
        for _, r in table.iterrows()
    ]
    table.attrs.update(metric=metric, selected=selected, mode=plan["selected_by"]["mode"])
    return table


def _t(df: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.975, df))


def _pm(figure: dict, digits: int) -> str:
    if figure["n"] == 0 or math.isnan(figure["mean"]):
        return "-"
    std = "" if math.isnan(figure["std"]) else f" ± {figure['std']:.{digits}f}"
    return f"{figure['mean']:.{digits}f}{std} ({figure['n']})"


def to_markdown(table: pd.DataFrame, plan: dict, digits: int = 4) -> str:
    metric = table.attrs["metric"].removeprefix("final_")
    header = [
        "row",
        "envelope (selected)",
        "selected as",
        f"selection stage: {metric} mean ± std (n)",
        f"confirmed: {metric} mean ± std (n)",
        "95% CI of the mean",
        "Δ vs identity [95% CI]",
        "p (Holm)",
        "verdict",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, r in table.iterrows():
        confirmed = r["confirmed"]
        ci = (
            "-"
            if math.isnan(r["ci95"])
            else f"{confirmed['mean'] - r['ci95']:.{digits}f} to {confirmed['mean'] + r['ci95']:.{digits}f}"
        )
        diff = (
            "" if math.isnan(r["difference"]) else f"{r['difference']:+.{digits}f} [±{r['difference_ci95']:.{digits}f}]"
        )
        cells = [
            r["row"],
            r["envelopes"],
            r["source"],
            _pm(r["selection"], digits),
            _pm(confirmed, digits),
            ci,
            diff,
            "" if math.isnan(r["p_holm"]) else f"{r['p_holm']:.3g}",
            r["verdict"],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    seeds = plan["seeds"]
    tests = sorted({t for t in table["test"] if t})
    note = (
        f"Selection: each row's configuration was chosen by `{plan['selected_by']['metric']}` "
        f"({plan['selected_by']['mode']}) on the seeds of {', '.join(plan['selection_sweeps'])}; the selection "
        f"stage column is that sweep's `{metric}` of the chosen configuration, optimistic by selection. Confirmed: "
        f"the same configurations trained on fresh seeds {seeds[0]}-{seeds[-1]}, none used in selection; the "
        f"verdict comes from these runs alone: the difference from identity ({', '.join(tests) or 'no test'}), "
        f"Holm-corrected over the rows; 'within noise' means corrected p ≥ 0.05."
    )
    return "\n".join(lines) + "\n\n" + note + "\n"
