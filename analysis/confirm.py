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

import functools
import json
import math
import shlex
from pathlib import Path

import pandas as pd
import yaml

from analysis.stats import holm, paired_difference, welch_test
from runner.config import AS_ALWAYS

PLAN_FILE = "confirmation.json"
JOBS_FILE = "jobs.yaml"


def _overrides(run: pd.Series) -> list[str]:
    """A run's overrides without its seed and seed batch (each confirmation job is one run of one seed): from its
    ``.hydra/overrides.yaml``, or where the run directory is gone (a report's jobs.csv) its ``overrides`` column."""
    path = Path(str(run["job_dir"])) / ".hydra" / "overrides.yaml"
    listed = (yaml.safe_load(path.read_text()) or []) if path.exists() else str(run["overrides"]).split()
    return [o for o in listed if o.split("=", 1)[0].lstrip("+~") not in ("seed", "seed_batch")]


def _figure(values: pd.Series) -> dict:
    values = values.dropna().astype(float)
    return {
        "mean": float(values.mean()) if len(values) else math.nan,
        "std": float(values.std(ddof=1)) if len(values) > 1 else math.nan,
        "n": int(len(values)),
    }


def fresh_seeds(used: pd.Series, count: int) -> list[int]:
    """``count`` seeds that no run of the selection used: from the next multiple of 1,000 above the largest."""
    used = pd.to_numeric(used, errors="coerce").dropna()
    start = (int(used.max()) // 1000 + 1) * 1000 if len(used) else 1000
    return list(range(start, start + count))


def _selected_rows(groups, spec, table_number, overrides_of) -> list[dict]:
    """Each group's selection (``(label, configurations as aggregate() gives them, runs or configurations for
    the paper's rows)``): every table row's configuration, identity included, then the paper's rows of
    ``table_number`` found there; each configuration once."""
    from analysis.report import paper_rows
    from analysis.tables import best_per_shapes, loss_names

    metrics = list(dict.fromkeys([spec.select, *spec.report]))
    rows: list[dict] = []
    seen: set[str] = set()

    def add(config: pd.Series, label: str, source: str, candidates: int | None, group: str, losses: list) -> None:
        if config["config_id"] in seen:
            return
        seen.add(config["config_id"])
        figures = {
            m: {
                "mean": float(config[f"{m}_mean"]),
                "std": float(config[f"{m}_std"]),
                "n": int(config[f"{m}_n"]),
            }
            for m in metrics
            if f"{m}_mean" in config.index
        }
        rows.append(
            {
                "row": label,
                "group": group,
                "source": source,
                "config_id": config["config_id"],
                "envelopes": str(config["envelopes"]),
                "identity": all(config[f"env_{loss}_shape"] == "identity" for loss in losses),
                "overrides": overrides_of(config),
                "selection": figures,
                "selection_seeds": sorted(int(s) for s in config["seeds"]),
                "candidates": candidates,
            }
        )

    for label, agg, runs in groups:
        group_name = ", ".join(f"task.{k}={v}" for k, v in label)
        prefix = group_name + ": " if group_name else ""
        by_id = agg.set_index("config_id", drop=False)
        losses = loss_names(agg)
        for _, row in best_per_shapes(agg, spec).iterrows():
            source = f"best of {int(row['candidates'])} by {spec.select}"
            add(row, prefix + row["shapes"], source, int(row["candidates"]), group_name, losses)
        if table_number is not None:
            for envelopes, config_id in paper_rows(runs, table_number):
                source = f"the paper's Table {table_number} row"
                add(by_id.loc[config_id], prefix + f"paper: {envelopes}", source, None, group_name, losses)
    return rows


def plan_rows(jobs: pd.DataFrame, spec, table_number: str | None = None, pins: list[str] = ()) -> list[dict]:
    """The configurations to confirm, from a sweep's runs: each table row's selection (per group of task
    parameters), identity included, then the paper's rows of ``table_number`` found in the sweep; each once.
    ``pins`` (overrides) are added to every row's overrides."""
    from analysis.report import split_by_task_parameters
    from analysis.stats import aggregate

    done = jobs[jobs["status"] == "completed"]
    metrics = list(dict.fromkeys([spec.select, *spec.report]))
    first_run = done.sort_values("seed").groupby("config_id").first()
    groups = [(label, aggregate(group, metrics), group) for label, group in split_by_task_parameters(done)]

    def overrides_of(config: pd.Series) -> list[str]:
        run = first_run.loc[config["config_id"]]
        return _pinned([*_overrides(run), *pins], json.loads(run["task_json"]) if "task_json" in run.index else {})

    return _selected_rows(groups, spec, table_number, overrides_of)


def _pinned(overrides: list[str], recorded: dict) -> list[str]:
    """``overrides`` with ``task.<key>=<value>`` added for each setting the runs had as always
    (:data:`runner.config.AS_ALWAYS`) that the overrides compose to another value today: a preset changed since
    the runs trained (the paper presets' ``task.init``, say), so that their confirmation trains what they did."""
    from analysis.tables import task_value

    composed = _composed_task(_non_envelope(overrides))
    pins = [
        f"task.{key}={_override_value(task_value(recorded, key))}"
        for key in AS_ALWAYS
        if key in composed and composed[key] != task_value(recorded, key)
    ]
    return [*overrides, *pins]


def _override_value(value) -> str:
    return value if isinstance(value, str) else json.dumps(value).replace(" ", "")


def plan_rows_from_configs(
    configs: pd.DataFrame, spec, table_number: str | None = None, pins: list[str] = ()
) -> list[dict]:
    """The configurations to confirm, from a report's ``configs.csv`` (one row per configuration with the mean,
    std and n of the selection metric) where the sweep's runs are no longer at hand: the same selection as
    :func:`plan_rows`. Each configuration's task parameters (for the groups and the paper's protocol) come from
    composing its overrides with Hydra; its overrides are the ``config`` column's, and ``pins`` after them (a
    configs.csv does not record the task: where a preset changed since its runs trained, pin what it set then).
    ``configs`` as :func:`read_configs` reads it."""
    from analysis.load import ENVELOPE_PARAMETERS
    from analysis.report import split_by_task_parameters
    from analysis.tables import loss_names

    configs = configs.copy()
    if not {"config_id", "config", "seeds", f"{spec.select}_mean"} <= set(configs.columns):
        raise ValueError(
            f"a configs.csv for a confirmation plan needs the columns config_id, config, seeds and "
            f"{spec.select}_mean (a report's configs.csv); got {sorted(configs.columns)}"
        )
    overrides = configs["config"].map(
        lambda c: [*(o for o in str(c).split() if not o.startswith("seed_batch=")), *pins]
    )
    tasks = {key: _composed_task(key) for key in {_non_envelope(o) for o in overrides}}
    configs["task_json"] = [json.dumps(tasks[_non_envelope(o)], sort_keys=True) for o in overrides]
    configs["envelopes_json"] = [
        json.dumps(
            {
                loss: {
                    p: _plain(row[f"env_{loss}_{p}"]) for p in ENVELOPE_PARAMETERS if _given(row.get(f"env_{loss}_{p}"))
                }
                for loss in loss_names(configs)
            },
            sort_keys=True,
        )
        for _, row in configs.iterrows()
    ]
    configs["_overrides"] = overrides
    configs["status"] = "completed"
    groups = [(label, group, group) for label, group in split_by_task_parameters(configs)]
    return _selected_rows(groups, spec, table_number, lambda config: list(config["_overrides"]))


def read_configs(path: Path) -> pd.DataFrame:
    """A report's ``configs.csv``, each configuration's ``seeds`` as a list again."""
    import ast

    configs = pd.read_csv(path)
    if "seeds" in configs.columns:
        configs["seeds"] = configs["seeds"].map(lambda s: ast.literal_eval(s) if isinstance(s, str) else s)
    return configs


def _non_envelope(overrides: list[str]) -> tuple[str, ...]:
    return tuple(o for o in overrides if not o.split("=", 1)[0].lstrip("+~").startswith(("envelope", "hydra")))


@functools.cache
def _composed_task(overrides: tuple[str, ...]) -> dict:
    """The task config that Hydra composes from these overrides (the project's ``conf/``), once per process for
    each set of overrides (callers do not change it)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from runner.config import register_configs

    register_configs()
    conf = Path(__file__).resolve().parent.parent / "conf"
    with initialize_config_dir(str(conf), version_base="1.3"):
        return OmegaConf.to_container(compose("config", overrides=list(overrides)).task, resolve=True)


def _given(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _plain(value):
    """A CSV cell as the value a result.json held: whole numbers of a float column stay floats (0.1, 1.0)."""
    return value.item() if hasattr(value, "item") else value


def write_plan(
    rows: list[dict],
    used_seeds: pd.Series,
    spec,
    seeds: int,
    out_dir: Path,
    sources: list[Path],
    table_number: str | None = None,
    at_step: int | None = None,
    fixed: dict | None = None,
) -> Path:
    """Write ``confirmation.json`` and ``jobs.yaml`` into ``out_dir``; print the command that runs them."""
    if seeds < 2:
        raise ValueError(f"--confirm-seeds must be at least 2 (a confirmed figure needs a spread), got {seeds}")
    if not rows:
        raise ValueError("no completed configuration to confirm")
    new_seeds = fresh_seeds(used_seeds, seeds)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = {
        "selection_sweeps": [str(d) for d in sources],
        "selected_by": {"metric": spec.select, "mode": spec.mode},
        "reported": spec.report[0],
        "at_step": at_step,
        "fixed": fixed or {},
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
    """The confirmation plan of a confirmation sweep (or of a report's jobs.csv: the plan beside it)."""
    sweep_dir = Path(sweep_dir)
    path = (sweep_dir.parent if sweep_dir.is_file() else sweep_dir) / PLAN_FILE
    return json.loads(path.read_text()) if path.exists() else None


def shared_plan(sweep_dirs: list[Path]) -> dict | None:
    """The one confirmation plan beside every one of ``sweep_dirs`` (a confirmation run in parts, say by
    seed, each part's jobs.csv with a copy of the plan), or None where any has none; parts with different
    plans are an error."""
    plans = [read_plan(d) for d in sweep_dirs]
    if not plans or any(plan is None for plan in plans):
        return None
    if any(plan != plans[0] for plan in plans[1:]):
        raise ValueError(
            f"{', '.join(str(d) for d in sweep_dirs)}: their confirmation plans ({PLAN_FILE}) differ; "
            "a confirmation's parts must share one plan"
        )
    return plans[0]


def confirmation_table(jobs: pd.DataFrame, plan: dict, alpha: float = 0.05) -> pd.DataFrame:
    """Per planned row: the selection-stage figure, the confirmed one (fresh seeds), and a verdict from the
    confirmed runs alone (the difference from identity, paired by seed, Holm over the rows)."""
    selected = plan["selected_by"]["metric"]
    reported = plan["reported"]
    done = jobs[jobs["status"] == "completed"]
    metric = reported if reported in done.columns else selected
    by_config = {cid: group.set_index("seed")[metric].astype(float) for cid, group in done.groupby("config_id")}
    # each group of task parameters (a truncation setting, say) against its own identity
    base_rows: dict[str, dict] = {}
    for row in plan["rows"]:
        if row["identity"]:
            base_rows.setdefault(_group(row), row)
    out = []
    for row in plan["rows"]:
        base_row = base_rows.get(_group(row))
        base = by_config.get(base_row["config_id"]) if base_row is not None else None
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
        if any(r["row"] == base["row"] for base in base_rows.values())
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


def _group(row: dict) -> str:
    """A planned row's group of task parameters (``task.truncation=bootstrap``; empty if one group). Plans
    written before rows named it carry it as the label's ``task.`` prefix."""
    if "group" in row:
        return row["group"]
    label = row["row"]
    return label.split(": ", 1)[0] if label.startswith("task.") and ": " in label else ""


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
        f"verdict comes from these runs alone: the difference from identity with the same task parameters "
        f"({', '.join(tests) or 'no test'}), "
        f"Holm-corrected over the rows; 'within noise' means corrected p ≥ 0.05."
    )
    return "\n".join(lines) + "\n\n" + note + "\n"
