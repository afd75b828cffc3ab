"""Everything for one or more sweeps: tables, figures, paper comparison, report.md."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from analysis import figures
from analysis.load import load_jobs, load_metrics
from analysis.stats import aggregate
from analysis.tables import default_spec, loss_names, paper_table, to_latex, to_markdown

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


def paper_comparison(jobs: pd.DataFrame, paper_file: Path = PAPER_RESULTS) -> pd.DataFrame:
    """The paper's rows for the sweep's task and data set, with the reproduced mean ± std (n)."""
    if not paper_file.exists() or jobs.empty:
        return pd.DataFrame()
    paper = pd.read_csv(paper_file)
    done = jobs[jobs["status"] == "completed"]
    rows = []
    for _, ref in paper.iterrows():
        subset = done[(done["task"] == ref["task"]) & (done["dataset"].astype(str) == str(ref["dataset"]))]
        if subset.empty:
            continue
        wanted = json.loads(ref["envelopes"])
        column = f"final_{ref['metric']}"
        matches = [cid for cid, group in subset.groupby("config_id")
                   if _same_envelopes(wanted, json.loads(group["envelopes_json"].iloc[0]))]
        reproduced = subset[subset["config_id"].isin(matches)][column] if column in subset.columns else pd.Series(dtype=float)
        rows.append({
            "table": ref["table"], "paper envelopes": json.dumps(wanted), "metric": ref["metric"],
            "paper": f"{ref['mean']:g} ± {ref['std']:g}" + ("" if math.isnan(ref["n"]) else f" ({int(ref['n'])})"),
            "reproduced": "not in this sweep" if reproduced.empty else
            f"{reproduced.mean():.4g} ± {reproduced.std(ddof=1):.2g} ({reproduced.count()})",
            "configs matched": len(matches),
        })
    return pd.DataFrame(rows)


def _markdown_frame(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(frame.columns) + " |\n|" + "---|" * len(frame.columns) + "\n"
    return header + "".join("| " + " | ".join(str(v) for v in row) + " |\n" for row in frame.itertuples(index=False))


def write_report(sweep_dirs: list[Path], out_dir: Path, metric: str | None = None, mode: str | None = None,
                 make_figures: bool = True) -> Path:
    """Write table.md, table.tex, jobs.csv, configs.csv, figures/ and report.md into ``out_dir``; print the table."""
    jobs = load_jobs(*sweep_dirs)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs.to_csv(out_dir / "jobs.csv", index=False)
    counts = jobs["status"].value_counts().to_dict() if not jobs.empty else {}
    summary = f"{len(jobs)} jobs: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    lines = ["# Sweep report\n\n", f"Sweeps: {', '.join(str(d) for d in sweep_dirs)}\n\n", f"{summary}\n"]
    failed = jobs[jobs["status"].isin(["failed", "unfinished"])] if not jobs.empty else jobs
    failures = [f"- `{r.job_dir}` ({r.status}): {r.error if isinstance(r.error, str) else ''}\n" for r in failed.itertuples()]
    if failures:
        lines += ["\n## Jobs that did not complete\n\n", *failures]
    print(f"\nSweep {', '.join(str(d) for d in sweep_dirs)}: {summary}")
    print("".join(failures), end="")
    if counts.get("completed", 0) == 0:
        (out_dir / "report.md").write_text("".join(lines))
        return out_dir / "report.md"

    spec = default_spec(jobs, metric, mode)
    table = paper_table(jobs, spec)
    markdown = to_markdown(table, spec)
    (out_dir / "table.md").write_text(markdown)
    (out_dir / "table.tex").write_text(to_latex(table, spec))
    agg = aggregate(jobs, list(dict.fromkeys([spec.select, *spec.report])))
    agg.to_csv(out_dir / "configs.csv", index=False)
    lines += ["\n## Best configuration per envelope shape\n\n", markdown,
              f"\nAll {len(agg)} configurations: `configs.csv` (mean, std, n, 95% CI per metric). LaTeX: `table.tex`.\n"]

    comparison = paper_comparison(jobs)
    if not comparison.empty:
        lines += ["\n## The paper, side by side\n\n", _markdown_frame(comparison)]

    if make_figures:
        figure_dir = out_dir / "figures"
        metrics = load_metrics(jobs)
        plotted = figures.envelope_shapes(figure_dir)
        curve_metric = spec.select.split("_", 1)[1]
        plotted += figures.learning_curves(metrics, table, curve_metric, figure_dir)
        for loss in loss_names(jobs):
            plotted += figures.sensitivity_heatmaps(agg, loss, spec.select, spec.mode, figure_dir)
            plotted += figures.envelope_dynamics(metrics, table, loss, figure_dir)
        pngs = [p for p in plotted if p.suffix == ".png"]
        lines.append("\n## Figures\n\n")
        lines += [f"![{p.stem}](figures/{p.name})\n\n" for p in pngs]
    report = out_dir / "report.md"
    report.write_text("".join(lines))
    print(markdown)
    if not comparison.empty:
        print(_markdown_frame(comparison))
    print(f"Results: {out_dir} (report.md, table.md/.tex, configs.csv, jobs.csv, figures/)")
    return report
