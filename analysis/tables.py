"""The paper's table form: the best configuration per envelope shape, tested against identity.

Selection and reporting are separate: the configuration of each row is
chosen on a validation metric (mean over seeds), and where the task has a
test split the row reports the test metric, so the winner is not judged on
the data that chose it. Each row is compared with the all-identity
baseline by Welch's t-test over seeds, Holm-corrected over the rows; rows
whose corrected p-value is at least ``alpha`` are marked as within noise.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pandas as pd

from analysis.stats import aggregate, difference_interval, holm, iqm_interval, paired_difference, welch_test
from envelopes.shapes import shape_order
from runner.config import AS_ALWAYS


@dataclass
class TableSpec:
    select: str  # column of the jobs table, e.g. final_val_loss
    mode: str  # min | max
    report: list[str]  # columns reported; report[0] is the one tested
    alpha: float = 0.05

    @property
    def selected_on_report(self) -> bool:
        return self.report[0] == self.select


def selection_column(metric: str) -> str:
    """The jobs' column a metric names: ``val_loss`` is the last value, ``final_val_loss``; ``best_`` as given."""
    return metric if metric.startswith(("final_", "best_")) else f"final_{metric}"


def default_spec(jobs: pd.DataFrame, metric: str | None = None, mode: str | None = None) -> TableSpec:
    """Selection metric from the argument or the jobs' objective; report its test twin when present."""
    done = jobs[jobs["status"] == "completed"]
    if metric is None:
        metric = done["objective_metric"].dropna().iloc[0] if not done.empty else "val_loss"
    if mode is None:
        mode = (
            done["objective_mode"].dropna().iloc[0]
            if not done.empty and metric == done["objective_metric"].dropna().iloc[0]
            else "min"
        )
    if mode not in ("min", "max"):
        raise ValueError(f"--mode must be one of ['min', 'max'], got {mode!r}")
    select = selection_column(metric)
    if select not in jobs.columns:
        available = sorted(c for c in jobs.columns if c.startswith(("final_", "best_")))
        raise ValueError(f"--metric {metric!r} is not in the results; available: {available}")
    report = [select]
    name = select.split("_", 1)[1]
    if name.startswith("val_") and f"final_test_{name[4:]}" in jobs.columns:
        report = [f"final_test_{name[4:]}", select]
    return TableSpec(select=select, mode=mode, report=report)


def parse_fixed(items: list[str]) -> dict[str, object]:
    """``KEY=VALUE`` strings (``--fix step_size=0.1``) as a dict; values read as YAML scalars."""
    import yaml

    fixed = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ValueError(
                f"--fix takes KEY=VALUE (e.g. step_size=0.1 or envelopes.classification.quantile=0.9), got {item!r}"
            )
        fixed[key] = yaml.safe_load(value)
    return fixed


def _equal(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def hold_fixed(jobs: pd.DataFrame, fixed: dict[str, object]) -> pd.DataFrame:
    """The runs whose configuration has each ``fixed`` parameter at its value, so selection happens among them.

    Keys: ``<param>`` (an envelope parameter of every loss, e.g. ``step_size``),
    ``envelopes.<loss>.<param>``, or ``task.<key>``. An envelope parameter
    its shape ignores (the identity's step size) does not exclude a run: the
    paper's tables fix the step size and still list identity.
    """
    if not fixed:
        return jobs
    keep = pd.Series(True, index=jobs.index)
    env_columns = [c for c in jobs.columns if c.startswith("env_") and not c.endswith("_shape")]
    losses = loss_names(jobs)
    for key, value in fixed.items():
        if key.startswith("task."):
            name = key[len("task.") :]
            params = jobs["task_json"].map(lambda t: json.loads(t) if isinstance(t, str) else {})
            if not params.map(lambda p, name=name: name in p).any() and name not in AS_ALWAYS:
                known = sorted({f"task.{k}" for p in params for k in p})
                raise ValueError(f"--fix {key}: no run has task.{name}; task keys in these runs: {known}")
            keep &= params.map(lambda p, name=name, value=value: _equal(task_value(p, name), value))
            continue
        if key.startswith("envelopes."):
            loss, _, param = key[len("envelopes.") :].partition(".")
            columns = [f"env_{loss}_{param}"]
        else:
            columns = [f"env_{loss}_{key}" for loss in losses]
        columns = [c for c in columns if c in env_columns and jobs[c].notna().any()]
        if not columns:
            params = sorted(
                {
                    c[len(f"env_{loss}_") :]
                    for loss in losses
                    for c in env_columns
                    if c.startswith(f"env_{loss}_") and jobs[c].notna().any()
                }
            )
            raise ValueError(
                f"--fix {key}: no run sets that parameter; envelope parameters in these runs: "
                f"{params} (or envelopes.<loss>.<param>, task.<key>)"
            )
        for column in columns:
            keep &= jobs[column].map(
                lambda v, value=value: v is None or (isinstance(v, float) and math.isnan(v)) or _equal(v, value)
            )
    kept = jobs[keep].copy()
    kept.attrs.update(jobs.attrs)
    kept.attrs["fixed"] = dict(fixed)
    return kept


def loss_names(jobs: pd.DataFrame) -> list[str]:
    return sorted(
        c[len("env_") : -len("_shape")] for c in jobs.columns if c.startswith("env_") and c.endswith("_shape")
    )


def best_per_shapes(agg: pd.DataFrame, spec: TableSpec) -> pd.DataFrame:
    """The selection of a table: per envelope shape (per combination of shapes, with several losses; VWPR and a
    controller mode set apart), the configuration with the best mean ``spec.select``, in display order, with
    ``shapes`` and ``candidates`` (how many configurations it was chosen from).

    ``agg`` is one row per configuration as :func:`aggregate` gives it (or as a report's ``configs.csv`` holds it).
    """
    losses = loss_names(agg)
    agg = agg.copy()
    shape_columns = [f"env_{loss}_shape" for loss in losses]
    agg["shapes"] = agg[shape_columns].astype(str).agg(" / ".join, axis=1)
    vwpr = agg["vwpr"].fillna(False).astype(bool) if "vwpr" in agg.columns else pd.Series(False, index=agg.index)
    agg.loc[vwpr, "shapes"] = agg.loc[vwpr, "shapes"] + " + VWPR"
    controller = agg["controller"] if "controller" in agg.columns else pd.Series(None, index=agg.index)
    controller = controller.where(controller.notna(), None)
    with_controller = controller.notna()
    agg.loc[with_controller, "shapes"] = (  # as text: a column of no modes at all is a float column of NaN
        agg.loc[with_controller, "shapes"] + " + controller " + controller[with_controller].astype(str)
    )
    agg["controller"] = controller
    mode_order = {None: 0, "baseline": 1, "monitor_only": 2, "controller_only": 3, "full": 4}
    agg["_order"] = [
        tuple(shape_order(v) for v in r) + (int(w), mode_order.get(None if pd.isna(c) else c, 9))
        for r, w, c in zip(agg[shape_columns].values, vwpr, controller)
    ]
    ascending = spec.mode == "min"
    best = (
        agg.sort_values(f"{spec.select}_mean", ascending=ascending)
        .groupby("shapes", sort=False)
        .head(1)
        .sort_values("_order")
    )
    best["candidates"] = best["shapes"].map(agg.groupby("shapes").size())
    return best


def paper_table(jobs: pd.DataFrame, spec: TableSpec) -> pd.DataFrame:
    """One row per envelope shape (per combination of shapes, with several losses)."""
    losses = loss_names(jobs)
    metrics = list(dict.fromkeys([spec.select, *spec.report]))
    agg = aggregate(jobs, metrics)
    if agg.empty:
        return agg
    best = best_per_shapes(agg, spec)
    shape_columns = [f"env_{loss}_shape" for loss in losses]
    controller = best["controller"]

    done = jobs[jobs["status"] == "completed"]
    values = {cid: group[spec.report[0]].to_numpy(float) for cid, group in done.groupby("config_id")}
    # the baseline: identity everywhere, no VWPR, and no controller (or its base-loss-only mode)
    plain = best[shape_columns].eq("identity").all(axis=1) & ~best["shapes"].str.contains("+ VWPR", regex=False)
    modes = controller
    baseline = best[plain & modes.isna()]
    if baseline.empty:
        baseline = best[plain & (modes == "baseline")]
    base_values = values.get(baseline["config_id"].iloc[0]) if not baseline.empty else None
    base_id = baseline["config_id"].iloc[0] if not baseline.empty else None
    is_base = [cid == base_id for cid in best["config_id"]]
    p_values = [
        math.nan if base_values is None or base else welch_test(values[cid], base_values)
        for cid, base in zip(best["config_id"], is_base)
    ]
    best["p"] = p_values
    best["p_holm"] = holm(p_values)
    if (best["task"] == "ppo").all():  # RL: the interquartile mean with its bootstrap interval, beside mean ± std
        intervals = [iqm_interval(values[cid]) for cid in best["config_id"]]
        best["iqm"], best["iqm_low"], best["iqm_high"] = (list(x) for x in zip(*intervals))
    base_mean = base_values.mean() if base_values is not None else math.nan
    best["difference"] = [
        math.nan if base else d for d, base in zip(best[f"{spec.report[0]}_mean"] - base_mean, is_base)
    ]
    better = (best["difference"] < 0) == (spec.mode == "min")
    best["verdict"] = [
        "baseline"
        if base
        else ""
        if math.isnan(p)
        else "within noise"
        if p >= spec.alpha
        else ("better" if b else "worse")
        for base, p, b in zip(is_base, best["p_holm"], better)
    ]
    best = best.drop(columns=["_order"]).reset_index(drop=True)
    factors = [f for f in varying_factors(jobs) if f != "envelopes"]
    if "envelopes_json" in jobs.columns and jobs["envelopes_json"].nunique() > 1:
        factors.insert(0, "envelopes")
    best["label"] = [factor_label(row, factors) for _, row in best.iterrows()]
    best.attrs["losses"] = losses
    best.attrs["factors"] = factors
    return best


def _pm(row, metric: str, digits: int) -> str:
    mean, std, n = row.get(f"{metric}_mean"), row.get(f"{metric}_std"), row.get(f"{metric}_n")
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    std_text = "" if std is None or math.isnan(std) else f" ± {std:.{digits}f}"
    return f"{mean:.{digits}f}{std_text} ({int(n)})"


def _columns(spec: TableSpec, table: pd.DataFrame) -> list[str]:
    names = [f"{m.replace('final_', '')} mean ± std (n)" for m in spec.report]
    losses = table.attrs.get("losses", [])
    shapes = f"shapes ({' / '.join(losses)})" if len(losses) > 1 else "shape"
    iqm = [f"IQM [95% CI] of {spec.report[0].replace('final_', '')}"] if "iqm" in table.columns else []
    return [shapes, "envelope (selected)", *names, *iqm, "Δ vs identity", "p (Holm)", "verdict"]


def _iqm(row, digits: int) -> str:
    if math.isnan(row["iqm"]):
        return "-"
    return f"{row['iqm']:.{digits}f} [{row['iqm_low']:.{digits}f}, {row['iqm_high']:.{digits}f}]"


def _cells(table: pd.DataFrame, spec: TableSpec, digits: int) -> list[list[str]]:
    rows = []
    for _, row in table.iterrows():
        diff = row["difference"]
        rows.append(
            [
                row["shapes"],
                row["envelopes"],
                *[_pm(row, m, digits) for m in spec.report],
                *([_iqm(row, digits)] if "iqm" in table.columns else []),
                "" if math.isnan(diff) else f"{diff:+.{digits}f}",
                "" if math.isnan(row["p_holm"]) else f"{row['p_holm']:.3g}",
                row["verdict"],
            ]
        )
    return rows


def to_markdown(table: pd.DataFrame, spec: TableSpec, digits: int = 4) -> str:
    header = _columns(spec, table)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in _cells(table, spec, digits)]
    note = f"Each row: the configuration of that shape with the best mean `{spec.select}` ({spec.mode}) over seeds"
    note += "." if spec.selected_on_report else f"; reported on `{spec.report[0]}` (not used for selection)."
    if spec.selected_on_report:
        note += " No test split: the reported metric is the one that selected the row, so it is optimistic."
    note += (
        f" p: Welch's t-test against the baseline on `{spec.report[0]}`, Holm-corrected over the rows; "
        f"'within noise' means corrected p ≥ {spec.alpha}. The baseline: identity envelopes with every method off "
        "(no VWPR; the loss controller off or in its baseline mode)."
    )
    note += (
        " Envelope labels: q = threshold quantile, w = width (a quantile span), a = EMA step size of the"
        " adaptive statistics, T = static threshold, s = static inverse slope."
    )
    if "iqm" in table.columns:
        note += (
            " IQM: interquartile mean over seeds with a 95% percentile bootstrap interval (2,000 resamples of "
            "the runs; Agarwal et al. 2021)."
        )
    return "\n".join(lines) + "\n\n" + note + "\n"


def _latex_escape(text: str) -> str:
    for a, b in (
        ("\\", r"\textbackslash{}"),
        ("&", r"\&"),
        ("%", r"\%"),
        ("_", r"\_"),
        ("#", r"\#"),
        ("±", r"$\pm$"),
        ("Δ", r"$\Delta$"),
    ):
        text = text.replace(a, b)
    return text


def to_latex(table: pd.DataFrame, spec: TableSpec, digits: int = 4) -> str:
    header = _columns(spec, table)
    lines = [
        r"\begin{tabular}{" + "l" * len(header) + "}",
        r"\toprule",
        " & ".join(_latex_escape(h) for h in header) + r" \\",
        r"\midrule",
    ]
    lines += [" & ".join(_latex_escape(c) for c in cells) + r" \\" for cells in _cells(table, spec, digits)]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


CONTROLLER_COMPONENTS = {
    "monitor_only": "RL loss monitor",
    "controller_only": "meta-learning controller",
    "full": "monitor + controller (full)",
}


VWPR_COMPONENTS = {"on": "VWPR"}


def controller_contributions(jobs: pd.DataFrame, spec: TableSpec, alpha: float = 0.05) -> pd.DataFrame:
    """Each loss-controller mode minus ``baseline`` on the reported metric, per configuration.

    ``baseline`` (the base loss alone) is the run without the controller:
    the runner trains and identifies the two as one run, so runs with the
    controller off are the baseline. Configurations are matched on
    everything but the mode (envelopes, VWPR, task parameters), and each row
    names the other settings that vary in the sweep (``vwpr``,
    ``task.<key>``), so rows that differ only there are told apart. The
    difference of means over seeds comes with its 95% interval and p-value,
    Holm-corrected over the rows: paired by seed where both sides ran the
    same seeds (each seed's initialisation and data are shared, so its own
    variation cancels), Welch's otherwise (column ``test``). Empty when no
    run has a controller mode other than baseline.
    """
    return _contributions(jobs, spec, "controller", alpha)


def vwpr_contributions(jobs: pd.DataFrame, spec: TableSpec, alpha: float = 0.05) -> pd.DataFrame:
    """VWPR on minus off on the reported metric, per configuration (matched on everything else).

    As :func:`controller_contributions`, with VWPR the factor: rows name the
    other settings that vary (``controller``, ``task.<key>``). Empty unless
    some configuration ran with VWPR both off and on.
    """
    return _contributions(jobs, spec, "vwpr", alpha)


def _factor_levels(done: pd.DataFrame, factor: str) -> pd.Series:
    if factor == "controller":
        return done["controller"].where(done["controller"].notna(), "baseline")
    return done["vwpr"].map({True: "on", False: "off"})


def _contributions(jobs: pd.DataFrame, spec: TableSpec, factor: str, alpha: float) -> pd.DataFrame:
    done = jobs[jobs["status"] == "completed"]
    if factor not in done.columns or done.empty:
        return pd.DataFrame()
    reference, components = ("baseline", CONTROLLER_COMPONENTS) if factor == "controller" else ("off", VWPR_COMPONENTS)
    levels = _factor_levels(done, factor)
    if not (levels != reference).any() or not (levels == reference).any():
        return pd.DataFrame()
    other = "vwpr" if factor == "controller" else "controller"
    others = _factor_levels(done, other) if other in done.columns else pd.Series("", index=done.index)
    metric = spec.report[0]
    done = done.assign(_level=levels, _key=done["envelopes_json"] + done["task_json"] + others.astype(str))
    settings = _varying_settings(done, exclude=factor)
    rows = []
    for _, group in done.groupby("_key", sort=False):
        base = group.loc[group["_level"] == reference, metric].to_numpy(float)
        if len(base) == 0:
            continue
        base_seeds = group.loc[group["_level"] == reference, "seed"]
        for level, label in components.items():
            values = group.loc[group["_level"] == level, metric].to_numpy(float)
            if len(values) == 0:
                continue
            seeds = group.loc[group["_level"] == level, "seed"]
            # the same seeds on both sides (the same initialisation and data): paired by seed
            paired = seeds.is_unique and base_seeds.is_unique and set(seeds) == set(base_seeds)
            if paired:
                by_seed = group[group["_level"] == reference].set_index("seed")[metric]
                half, p = paired_difference(values, by_seed.loc[seeds.to_numpy()].to_numpy(float))
            else:
                (half, _), p = difference_interval(values, base), welch_test(values, base)
            first = group.index[0]
            rows.append(
                {
                    "envelopes": group["envelopes"].iloc[0],
                    **{name: column[first] for name, column in settings.items()},
                    "dataset": group["dataset"].iloc[0],
                    "mode": level,
                    "component": label,
                    "metric": metric,
                    "difference": values.mean() - base.mean(),
                    "ci95": half,
                    "n_mode": len(values),
                    "n_baseline": len(base),
                    "test": "paired t" if paired else "Welch",
                    "p": p,
                }
            )
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table.attrs["settings"] = list(settings)
    table.attrs["factor"], table.attrs["reference"] = factor, reference
    table["p_holm"] = holm(table["p"].tolist())
    better = (table["difference"] < 0) == (spec.mode == "min")
    table["verdict"] = [
        "" if math.isnan(p) else "within noise" if p >= alpha else ("better" if b else "worse")
        for p, b in zip(table["p_holm"], better)
    ]
    return table


def _varying_settings(done: pd.DataFrame, exclude: str) -> dict[str, pd.Series]:
    """The settings besides envelopes and ``exclude`` that take more than one value: ``vwpr``,
    ``controller`` and ``task.<key>``."""
    settings = {}
    for factor in ("vwpr", "controller"):
        if factor != exclude and factor in done.columns:
            levels = _factor_levels(done, factor)
            if levels.nunique() > 1:
                settings[factor] = levels
    params = done["task_json"].map(json.loads)
    for key in varying_task_keys(params):
        settings[f"task.{key}"] = params.map(lambda p, key=key: task_value(p, key))
    return settings


def varying_factors(jobs: pd.DataFrame) -> list[str]:
    """What varies across the completed runs besides the seed, among the envelopes, the loss controller's mode,
    VWPR and the task's keys (``task.<key>``), in that order."""
    done = jobs[jobs["status"] == "completed"] if "status" in jobs.columns else jobs
    factors = []
    if "envelopes_json" in done.columns and done["envelopes_json"].nunique() > 1:
        factors.append("envelopes")
    if "controller" in done.columns and done["controller"].map(_controller_name).nunique() > 1:
        factors.append("controller")
    if "vwpr" in done.columns and done["vwpr"].fillna(False).astype(bool).nunique() > 1:
        factors.append("vwpr")
    if "task_json" in done.columns:
        factors += [f"task.{k}" for k in varying_task_keys(done["task_json"].map(json.loads))]
    return factors


def _controller_name(mode) -> str:
    return "off" if mode is None or (isinstance(mode, float) and math.isnan(mode)) or mode == "baseline" else mode


def factor_label(row, factors: list[str]) -> str:
    """A configuration named by the factors that vary in its sweep alone (its envelopes when nothing else varies):
    ``classification: step q=0.5 a=0.1; controller full; VWPR on; task.optimizer=sgd``."""
    parts = []
    for factor in factors:
        if factor == "envelopes":
            parts.append(str(row["envelopes"]))
        elif factor == "controller":
            parts.append(f"controller {_controller_name(row.get('controller'))}")
        elif factor == "vwpr":
            parts.append(f"VWPR {'on' if bool(row.get('vwpr')) else 'off'}")
        else:
            value = task_value(json.loads(row["task_json"]), factor.removeprefix("task."))
            parts.append(f"{factor}={json.dumps(value)}")
    return "; ".join(parts) or str(row["envelopes"])


def varying_task_keys(params: pd.Series) -> list[str]:
    """The task parameters (``params``: parsed task configs) that take more than one value, sorted."""
    keys = sorted({k for p in params for k in p})
    return [k for k in keys if params.map(lambda p, k=k: json.dumps(task_value(p, k), sort_keys=True)).nunique() > 1]


def task_value(task: dict, key: str):
    """A run's task setting (``task``: its recorded task config). A recorded task without a setting of
    :data:`runner.config.AS_ALWAYS` had it at the value runs always had (its id leaves it out there)."""
    return task[key] if key in task else AS_ALWAYS.get(key, (None,))[0]


def contributions_markdown(table: pd.DataFrame, digits: int = 4) -> str:
    """The contributions as a Markdown table; an accuracy is shown in percentage points."""
    metric = table["metric"].iloc[0]
    points = "accuracy" in metric
    scale, unit = (100.0, " (pp)") if points else (1.0, "")
    places = 2 if points else digits
    settings = table.attrs.get("settings", [])
    factor, reference = table.attrs.get("factor", "controller"), table.attrs.get("reference", "baseline")
    header = [
        "envelopes",
        *settings,
        "component (mode)" if factor == "controller" else factor,
        f"Δ vs {reference} ± 95% CI{unit}",
        f"n ({'mode' if factor == 'controller' else 'on'} / {reference})",
        "p (Holm)",
        "verdict",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in table.iterrows():
        ci = "" if math.isnan(row["ci95"]) else f" ± {scale * row['ci95']:.{places}f}"
        p = "" if math.isnan(row["p_holm"]) else f"{row['p_holm']:.3g}"
        cells = [
            row["envelopes"],
            *[str(row[name]) for name in settings],
            f"{row['component']} (`{row['mode']}`)" if factor == "controller" else row["mode"],
            f"{scale * row['difference']:+.{places}f}{ci}",
            f"{row['n_mode']} / {row['n_baseline']}",
            p,
            row["verdict"],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    what = "percentage points of " if points else ""
    kinds = set(table["test"]) if "test" in table else {"Welch"}
    tests = (
        "paired by seed (each seed run both ways: the same initialisation and data), paired t-test"
        if kinds == {"paired t"}
        else "Welch's t-test"
        if kinds == {"Welch"}
        else "paired t-test where a row's seeds ran both ways, else Welch's (column `test` of the CSV)"
    )
    if factor == "controller":
        minus = "of the mode minus that of `baseline` (the base loss alone, the same run as no controller)"
    else:
        minus = "with VWPR on minus that with it off"
    return (
        "\n".join(lines)
        + f"\n\nΔ: mean `{metric}` {minus} with the same other settings, over seeds, in {what}the metric's units, "
        f"with its 95% interval and p-value, Holm-corrected over the rows: {tests}.\n"
    )
