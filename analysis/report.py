"""Everything for one or more sweeps: tables, figures, paper comparison, report.md."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from analysis import figures
from analysis.confirm import confirmation_table, shared_plan
from analysis.confirm import to_markdown as confirmation_markdown
from analysis.html import write_html
from analysis.load import load_jobs, load_metrics, read_at_step
from analysis.stats import aggregate
from analysis.tables import (
    contributions_markdown,
    controller_contributions,
    default_spec,
    hold_fixed,
    loss_names,
    paper_table,
    task_value,
    to_latex,
    to_markdown,
    varying_task_keys,
    vwpr_contributions,
)

PAPER_RESULTS = Path(__file__).resolve().parent.parent / "experiments" / "paper_results.csv"


def _same_envelopes(paper: dict, effective: dict) -> bool:
    """A paper row matches a config when every parameter the paper states is equal.

    A loss the paper does not mention must have the identity envelope; a
    step size the paper does not state may take any value.
    """
    if not set(paper) <= set(effective):
        return False
    if any(effective[loss] != {"shape": "identity"} for loss in set(effective) - set(paper)):
        return False
    for loss, params in paper.items():
        for key, value in params.items():
            if effective[loss].get(key) != value:
                return False
        if any(k not in params and k not in ("step_size",) for k in effective[loss]):
            return False
    return True


def _at_protocol(task: dict, required: dict) -> bool:
    """Whether a run's recorded task has every setting a paper row requires."""
    return all(task_value(task, key) == value for key, value in required.items())


def _protocol_gap(params: pd.Series, required: dict, read_at: int | None, at_step: int | None) -> str | None:
    """Why no run (``params``: their task configs) is at the table's protocol (the first key no run matches), or None."""
    if read_at != at_step and not (
        read_at is None and at_step is not None and "total_steps" in required and at_step >= required["total_steps"]
    ):
        ours = "the end of training" if at_step is None else f"{at_step:,} steps"
        theirs = "the end of training" if read_at is None else f"{read_at:,} steps (--at-step {read_at})"
        return f"not the paper's protocol: read at {ours}, the table reads at {theirs}"
    for key, value in required.items():
        if not params.map(lambda p, key=key, value=value: task_value(p, key) == value).any():
            found = sorted({json.dumps(task_value(p, key)) for p in params})
            return f"not the paper's protocol: {key}={', '.join(found)}, the table has {key}={json.dumps(value)}"
    return None


def paper_comparison(jobs: pd.DataFrame, paper_file: Path = PAPER_RESULTS, table: str | None = None) -> pd.DataFrame:
    """The paper's rows for the sweep's task and data set, beside the runs at the same protocol.

    A paper row states its protocol (``task_params``: values the run's task
    config must have, such as epochs, training-set size, environment steps
    and rollout length; ``read_at_step``: where in training the table reads
    an RL run). Only runs that match it are put beside it; where the sweep
    has runs of the task but none at the protocol, the row says which key
    differs instead of a number. ``table`` keeps one table's rows.
    """
    if not paper_file.exists() or jobs.empty:
        return pd.DataFrame()
    paper = pd.read_csv(paper_file, dtype={"table": str})
    if table is not None:
        paper = paper[paper["table"] == str(table)]
    done = jobs[jobs["status"] == "completed"]
    at_step = jobs.attrs.get("at_step")
    rows = []
    for _, ref in paper.iterrows():
        same_task = done[done["task"] == ref["task"]]
        subset = same_task[same_task["dataset"].astype(str) == str(ref["dataset"])]
        if subset.empty and (table is None or same_task.empty):
            continue  # another experiment
        if subset.empty:  # the table was asked for by number: say why nothing is beside it
            found = ", ".join(sorted(same_task["dataset"].astype(str).unique()))
            rows.append(
                _paper_row(
                    ref,
                    json.loads(ref["envelopes"]),
                    f"not comparable: dataset={found}, the table has dataset={ref['dataset']}",
                    0,
                )
            )
            continue
        required = json.loads(ref["task_params"]) if isinstance(ref.get("task_params"), str) else {}
        read_at = ref.get("read_at_step")
        read_at = None if read_at is None or (isinstance(read_at, float) and math.isnan(read_at)) else int(read_at)
        params = subset["task_json"].map(json.loads)
        gap = _protocol_gap(params, required, read_at, at_step)
        wanted = json.loads(ref["envelopes"])
        column = f"final_{ref['metric']}"
        matches: list[str] = []
        if gap is None:
            subset = subset[params.map(lambda p, required=required: _at_protocol(p, required))]
            matches = [
                cid
                for cid, group in subset.groupby("config_id")
                if _same_envelopes(wanted, json.loads(group["envelopes_json"].iloc[0]))
            ]
            if column not in subset.columns:
                units = ref.get("units") or "the table's units"
                gap = f"the runs do not record {ref['metric']} ({units})"
        reproduced = subset[subset["config_id"].isin(matches)][column] if gap is None else pd.Series(dtype=float)
        rows.append(
            _paper_row(
                ref,
                wanted,
                gap
                if gap is not None
                else "not in this sweep"
                if reproduced.empty
                else f"{reproduced.mean():.4g} ± {reproduced.std(ddof=1):.2g} ({reproduced.count()})",
                len(matches),
            )
        )
    return pd.DataFrame(rows)


def paper_rows(done: pd.DataFrame, table: str, paper_file: Path = PAPER_RESULTS) -> list[tuple[str, str]]:
    """``(the paper's envelopes, config_id)`` of each row of the paper's Table ``table`` that the completed runs
    ``done`` hold at its protocol (the same task, data set, task parameters and envelopes)."""
    if not paper_file.exists() or done.empty:
        return []
    paper = pd.read_csv(paper_file, dtype={"table": str})
    out = []
    for _, ref in paper[paper["table"] == str(table)].drop_duplicates("envelopes").iterrows():
        subset = done[(done["task"] == ref["task"]) & (done["dataset"].astype(str) == str(ref["dataset"]))]
        required = json.loads(ref["task_params"]) if isinstance(ref.get("task_params"), str) else {}
        params = subset["task_json"].map(json.loads)
        subset = subset[params.map(lambda p, required=required: _at_protocol(p, required))]
        wanted = json.loads(ref["envelopes"])
        for cid, group in subset.groupby("config_id"):
            if _same_envelopes(wanted, json.loads(group["envelopes_json"].iloc[0])):
                out.append((json.dumps(wanted), cid))
    return out


def _paper_row(ref: pd.Series, wanted: dict, reproduced: str, matched: int) -> dict:
    n = ref["n"]
    return {
        "table": ref["table"],
        "paper envelopes": json.dumps(wanted),
        "metric": ref["metric"],
        "paper": f"{ref['mean']:g} ± {ref['std']:g}"
        + ("" if isinstance(n, float) and math.isnan(n) else f" ({int(n)})"),
        "reproduced": reproduced,
        "configs matched": matched,
    }


@dataclass
class PaperTableProtocol:
    """How the paper read one of its tables: the selection metric and mode, where RL runs are read, what is held fixed."""

    table: str
    metric: str
    mode: str
    at_step: int | None
    fixed: dict


def paper_tables(paper_file: Path = PAPER_RESULTS) -> list[str]:
    """The table numbers ``paper_file`` has rows for."""
    if not paper_file.exists():
        return []
    return sorted(pd.read_csv(paper_file, dtype={"table": str})["table"].unique(), key=lambda t: (len(t), t))


def paper_table_protocol(table: str, paper_file: Path = PAPER_RESULTS) -> PaperTableProtocol:
    """Table ``table``'s reading protocol from its rows of ``paper_file`` (ValueError for a table it lacks)."""
    paper = pd.read_csv(paper_file, dtype={"table": str}) if paper_file.exists() else pd.DataFrame(columns=["table"])
    rows = paper[paper["table"] == str(table)]
    if rows.empty:
        raise ValueError(f"--paper-table {table}: {paper_file} has no such table; tables: {paper_tables(paper_file)}")
    first = rows.iloc[0]
    metric = (
        str(first["selected_by"])
        if "selected_by" in rows.columns and isinstance(first["selected_by"], str)
        else str(first["metric"])
    )
    mode = first.get("select_mode")
    if not isinstance(mode, str):
        mode = "max" if any(word in metric for word in ("accuracy", "return")) else "min"
    read_at = first.get("read_at_step")
    at_step = None if read_at is None or (isinstance(read_at, float) and math.isnan(read_at)) else int(read_at)
    fixed = first.get("hold_fixed")
    fixed = json.loads(fixed) if isinstance(fixed, str) and fixed.strip() else {}
    return PaperTableProtocol(str(table), metric, mode, at_step, fixed)


def split_by_task_parameters(done: pd.DataFrame) -> list[tuple[tuple, pd.DataFrame]]:
    """Completed jobs grouped by the task parameters that vary across them (one group if none vary).

    Configurations that differ in the task (a latent size, a data set) are
    different experiments: each gets its own table rather than a shared "best".
    """
    if done.empty or "task_json" not in done.columns:
        return [((), done)]
    params = done["task_json"].map(json.loads)
    varying = varying_task_keys(params)
    if not varying:
        return [((), done)]
    labels = params.map(lambda p: tuple((k, task_value(p, k)) for k in varying))

    def natural(label):
        return [(k, (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))) for k, v in label]

    return [(label, done[labels == label]) for label in sorted(labels.unique(), key=natural)]


def _markdown_frame(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(frame.columns) + " |\n|" + "---|" * len(frame.columns) + "\n"
    return header + "".join("| " + " | ".join(str(v) for v in row) + " |\n" for row in frame.itertuples(index=False))


def _table_title(factors: list[str]) -> str:
    """The heading of a table whose rows are the best configuration of each combination of the factors that vary."""
    names = {"envelopes": "envelope shape", "controller": "loss-controller mode", "vwpr": "VWPR on or off"}
    named = [names[f] for f in factors if f in names]
    return f"Best configuration per {' and '.join(named)}" if named else "The configuration"


def _split_note(group: pd.DataFrame, spec, table: pd.DataFrame | None = None) -> str | None:
    """Why the reported test metric differs from the validation one that selected the rows (supervised tasks)."""
    if not spec.report[0].startswith("final_test_") or "task_json" not in group.columns:
        return None
    task = json.loads(group["task_json"].iloc[0])
    if "val_size" in task and "test_size" in task:
        val = f"{task['val_size']:,} examples drawn afresh for each seed"
        test = f"the same {task['test_size']:,} examples for every seed (the last of the data pool)"
    elif "val_fraction" in task and "test_fraction" in task:
        val = f"{task['val_fraction']:.0%} of the rows drawn afresh for each seed"
        test = f"the same {task['test_fraction']:.0%} of the rows for every seed (drawn once, with a fixed seed)"
    else:
        return None
    spread = ""
    stds = [f"{m}_std" for m in spec.report[:2]]
    if table is not None and len(spec.report) > 1 and all(c in table.columns for c in stds):
        test_std, val_std = (float(table[c].mean()) for c in stds)
        if math.isfinite(test_std) and math.isfinite(val_std):
            spread = (
                f" Across seeds, test figures vary {'less' if test_std < val_std else 'more'} than validation "
                f"ones here (mean std over the rows {test_std:.2g} against {val_std:.2g})."
            )
    return (
        f"Why test and validation figures differ: validation is {val}, test {test}; the two hold different "
        f"examples.{spread} The rows were chosen on validation, so test is the figure not biased by that choice."
    )


def _write(out_dir: Path, lines: list[str]) -> Path:
    """``report.md`` and its self-contained ``report.html``; returns the Markdown file's path."""
    report = out_dir / "report.md"
    report.write_text("".join(lines))
    write_html(report)
    return report


# statuses of runs that did not complete: each is listed in the report and makes a sweep exit 1
INCOMPLETE = ("failed", "unfinished", "unreadable")


@dataclass
class Reading:
    """How a report reads its sweeps: the selection metric and mode, where RL runs are read, what is held fixed
    (a paper table's own reading where the caller sets none), and the runs so read (``total``: before holding
    parameters fixed)."""

    metric: str | None
    mode: str | None
    at_step: int | None
    fixed: dict | None
    jobs: pd.DataFrame
    total: int

    @classmethod
    def of(
        cls,
        sweep_dirs: list[Path],
        metric: str | None = None,
        mode: str | None = None,
        at_step: int | None = None,
        fixed: dict | None = None,
        table_number: str | None = None,
        jobs: pd.DataFrame | None = None,
    ) -> Reading:
        if table_number is not None:
            protocol = paper_table_protocol(table_number)
            metric, mode = metric or protocol.metric, mode or protocol.mode
            at_step = protocol.at_step if at_step is None else at_step
            fixed = protocol.fixed if fixed is None else fixed
        jobs = load_jobs(*sweep_dirs) if jobs is None else jobs
        if jobs.empty:
            raise NoRunsError(
                f"no runs in {', '.join(str(d) for d in sweep_dirs)} (a run is a directory with "
                ".hydra/overrides.yaml); nothing written"
            )
        if at_step is not None:
            jobs = read_at_step(jobs, at_step)
        total = len(jobs)
        return cls(metric, mode, at_step, fixed, hold_fixed(jobs, fixed or {}), total)


def _confirmation_report(jobs: pd.DataFrame, plan: dict, out_dir: Path, lines: list[str]) -> Path:
    """A confirmation sweep's report: each planned row, selection stage beside confirmed, and the verdicts."""
    table = confirmation_table(jobs, plan)
    markdown = confirmation_markdown(table, plan)
    (out_dir / "confirmation.md").write_text(markdown)
    lines += ["\n## Confirmation on fresh seeds\n\n", markdown]
    aggregate(jobs, [table.attrs["metric"]]).to_csv(out_dir / "configs.csv", index=False)
    report = _write(out_dir, lines)
    print(markdown)
    print(f"Results: {out_dir} (report.md, report.html, confirmation.md, configs.csv, jobs.csv)")
    return report


class NoRunsError(ValueError):
    """The directories given hold no runs (nothing to report, and no report is written)."""


def write_report(
    sweep_dirs: list[Path],
    out_dir: Path,
    metric: str | None = None,
    mode: str | None = None,
    make_figures: bool = True,
    jobs: pd.DataFrame | None = None,
    at_step: int | None = None,
    fixed: dict | None = None,
    table_number: str | None = None,
) -> Path:
    """Write table.md, table.tex, jobs.csv, configs.csv, figures/ and report.md into ``out_dir``; print the table.

    ``jobs`` is ``load_jobs(*sweep_dirs)`` when the caller has it already.
    ``fixed`` keeps the runs with those parameters at those values
    (:func:`analysis.tables.hold_fixed`), so the tables select among them;
    ``table_number`` reads the sweep as that table of the paper (:func:`paper_table_protocol`) and
    puts only its rows beside the runs.
    Directories without a single run raise :class:`NoRunsError` before
    anything is written, so an existing report is never replaced by an
    empty one.
    """
    plan = shared_plan(sweep_dirs)
    planned_step = None if plan is None else plan.get("at_step")
    if planned_step is not None:  # a confirmation reads its runs where its plan says
        if at_step is not None and at_step != planned_step:
            raise ValueError(
                f"--at-step {at_step}: this confirmation's plan reads its runs at {planned_step:,} steps "
                f"({', '.join(str(d) for d in sweep_dirs)}); leave --at-step out or give {planned_step}"
            )
        at_step = int(planned_step)
    reading = Reading.of(sweep_dirs, metric, mode, at_step, fixed, table_number, jobs)
    metric, mode, at_step, fixed, jobs, total = (
        reading.metric,
        reading.mode,
        reading.at_step,
        reading.fixed,
        reading.jobs,
        reading.total,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs.to_csv(out_dir / "jobs.csv", index=False)
    counts = jobs["status"].value_counts().to_dict() if not jobs.empty else {}
    summary = f"{len(jobs)} runs: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    lines = ["# Sweep report\n\n", f"Sweeps: {', '.join(str(d) for d in sweep_dirs)}\n\n", f"{summary}\n"]
    if at_step is not None:
        lines.append(
            f"\nRead at {at_step:,} environment steps: every metric is the run's last logged value at or "
            f"before that step (`--at-step {at_step}`).\n"
        )
    if fixed:
        held = ", ".join(f"`{k}` = {v}" for k, v in fixed.items())
        lines.append(
            f"\nHeld fixed: {held} ({total - len(jobs)} of {total} runs, at other values, left out; a "
            f"parameter a shape ignores excludes no run).\n"
        )
    if table_number is not None:
        lines.append(f"\nRead as the paper's Table {table_number}: selected by `{metric}` ({mode}).\n")
    failed = jobs[jobs["status"].isin(INCOMPLETE)] if not jobs.empty else jobs
    failures = [  # a sweep with no failed run has no error column
        f"- `{r.job_dir}` ({r.status}): {error if isinstance(error := getattr(r, 'error', None), str) else ''}\n"
        for r in failed.itertuples()
    ]
    if failures:
        lines += ["\n## Runs that did not complete\n\n", *failures]
    print(f"\nSweep {', '.join(str(d) for d in sweep_dirs)}: {summary}")
    print("".join(failures), end="")
    if counts.get("completed", 0) == 0:
        message = (
            "No run completed, so there is no table: an unfinished run was interrupted (the same sweep command "
            "resumes it), a failed one says why above."
        )
        print(message)
        lines.append(f"\n{message}\n")
        return _write(out_dir, lines)

    try:
        spec = default_spec(jobs, metric, mode)
    except ValueError as error:
        if metric is not None:  # asked for by name: the caller's error
            raise
        # no completed run logged the objective (a PPO run in which no episode ended, say)
        lines.append(f"\nNo table: {error}\n".replace("--metric ", "the objective "))
        print(f"No table: the objective is in no completed run's final metrics ({error})")
        return _write(out_dir, lines)
    done = jobs[jobs["status"] == "completed"]
    if plan is not None:  # a confirmation sweep: its planned rows, not a new selection on its own numbers
        return _confirmation_report(jobs, plan, out_dir, lines)
    groups = split_by_task_parameters(done)
    tables = [paper_table(group, spec) for _, group in groups]
    # the figures plot the tables' rows: only their runs' curves, and only the metrics drawn, are held
    drawn = set().union(*(set(t["config_id"]) for t in tables if not t.empty))
    curve_metric = spec.select.split("_", 1)[1]
    envelope_columns = [f"envelope_{loss}_{name}" for loss in loss_names(done) for name, _ in figures.ENVELOPE_SERIES]
    metrics = (
        load_metrics(
            done, keep=done.loc[done["config_id"].isin(drawn), "job_dir"], columns=[curve_metric, *envelope_columns]
        )
        if make_figures
        else pd.DataFrame()
    )
    if metrics.attrs.get("unreadable"):
        lines += ["\n## Runs whose metrics could not be read (left out of the figures)\n\n"]
        lines += [f"- {message}\n" for message in metrics.attrs["unreadable"]]
    figure_dir = out_dir / "figures"
    shaped = any(  # the shapes figure only where an envelope other than identity ran
        done[c].dropna().ne("identity").any() for c in done.columns if c.startswith("env_") and c.endswith("_shape")
    )
    plotted = figures.envelope_shapes(figure_dir) if make_figures and shaped else []
    printed = []
    written = ["report.md"]
    for (label, group), table in zip(groups, tables):
        suffix = "" if not label else "_" + "_".join(f"{k}{v}" for k, v in label)
        heading = "" if not label else " (" + ", ".join(f"task.{k}={v}" for k, v in label) + ")"
        markdown = to_markdown(table, spec)
        (out_dir / f"table{suffix}.md").write_text(markdown)
        (out_dir / f"table{suffix}.tex").write_text(to_latex(table, spec))
        written.append(f"table{suffix}.md/.tex")
        lines += [f"\n## {_table_title(table.attrs.get('factors', []))}{heading}\n\n", markdown]
        split = _split_note(group, spec, table)
        if split:
            lines.append(f"\n{split}\n")
        printed.append(f"{heading.strip(' ()')}\n{markdown}" if heading else markdown)
        if make_figures:
            agg_group = aggregate(group, [spec.select])
            group_metrics = metrics[metrics["job_dir"].isin(group["job_dir"])] if not metrics.empty else metrics
            plotted += figures.learning_curves(group_metrics, table, curve_metric, figure_dir, suffix)
            for loss in loss_names(group):
                plotted += figures.sensitivity_heatmaps(agg_group, loss, spec.select, spec.mode, figure_dir, suffix)
                plotted += figures.envelope_dynamics(group_metrics, table, loss, figure_dir, suffix)
    agg = aggregate(jobs, list(dict.fromkeys([spec.select, *spec.report])))
    agg.to_csv(out_dir / "configs.csv", index=False)
    written += ["configs.csv", "jobs.csv"]
    tex = ", ".join(f"`{name.split('/')[0].removesuffix('.md')}.tex`" for name in written if name.startswith("table"))
    lines.append(f"\nAll {len(agg)} configurations: `configs.csv` (mean, std, n, 95% CI per metric). LaTeX: {tex}.\n")

    for name, contributions, title, label in (
        (
            "contributions",
            controller_contributions(jobs, spec),
            "each loss-controller component",
            "Loss-controller components against baseline",
        ),
        ("vwpr_effect", vwpr_contributions(jobs, spec), "VWPR", "VWPR on against off"),
    ):
        if not contributions.empty:
            contributions.to_csv(out_dir / f"{name}.csv", index=False)
            written.append(f"{name}.csv")
            markdown = contributions_markdown(contributions)
            lines += [f"\n## Contribution of {title}\n\n", markdown]
            printed.append(f"{label}\n{markdown}")

    comparison = paper_comparison(jobs, table=table_number)
    if not comparison.empty:
        title = "The paper, side by side" if table_number is None else f"The paper's Table {table_number}, side by side"
        lines += [f"\n## {title}\n\n", _markdown_frame(comparison)]
    if plotted:
        lines.append("\n## Figures\n\n")
        lines += [f"![{p.stem}](figures/{p.name})\n\n" for p in plotted if p.suffix == ".png"]
    report = _write(out_dir, lines)
    written.insert(1, "report.html")
    print("\n".join(printed))
    if not comparison.empty:
        print(_markdown_frame(comparison))
    print(f"Results: {out_dir} ({', '.join(written + (['figures/'] if plotted else []))})")
    return report
