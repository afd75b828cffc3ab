"""Analysis: loading sweeps, statistics, the paper table, the command line."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from analysis.load import load_jobs, load_metrics
from analysis.report import paper_comparison, write_report
from analysis.stats import aggregate, holm, welch_test
from analysis.tables import default_spec, paper_table, to_latex, to_markdown

ROOT = Path(__file__).resolve().parent.parent


def make_job(
    sweep: Path,
    num: int,
    shape: str,
    seed: int,
    val: float,
    test: float | None = None,
    status: str = "completed",
    quantile: float | None = None,
    epochs: int = 3,
    step_size: float = 0.1,
    dataset: str = "digits",
) -> Path:
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    overrides = [f"envelope@envelopes.classification={shape}", f"seed={seed}"]
    if quantile is not None:
        overrides.append(f"envelopes.classification.quantile={quantile}")
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if status == "unfinished":
        return job
    envelope = (
        {"shape": shape}
        if shape == "identity"
        else {"shape": shape, "quantile": quantile or 0.1, "step_size": step_size}
    )
    config_id = f"{shape}-{quantile}" + ("" if step_size == 0.1 else f"-{step_size}")
    final = {"epoch": epochs, "val_loss": val}
    if test is not None:
        final["test_loss"] = test
    result = {
        "status": status,
        "task": "classification",
        "seed": seed,
        "config_id": config_id,
        "run_id": f"{config_id}-{seed}",
        "effective": {
            "task": {"dataset": dataset, "epochs": epochs},
            "envelopes": {"classification": envelope},
            "seed": seed,
        },
        "objective": {"metric": "val_loss", "mode": "min", "value": val},
        "final": final,
        "best": final,
        "wall_time_s": 1.0,
    }
    if status == "failed":
        result = {
            "status": "failed",
            "error": "NonFiniteLossError: non-finite training loss at epoch 2",
            "task": "classification",
            "seed": seed,
        }
    (job / "result.json").write_text(json.dumps(result))
    rows = [
        {
            "epoch": e,
            "val_loss": val + (epochs - e) * 0.1,
            "envelope_classification_mean_weight": 0.9,
            "envelope_classification_fraction_attenuated": 0.1,
        }
        for e in range(1, epochs + 1)
    ]
    (job / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return job


@pytest.fixture
def sweep(tmp_path):
    sweep = tmp_path / "sweep"
    values = {
        "identity": [1.00, 1.02, 0.98, 1.01],
        "step": [0.80, 0.81, 0.79, 0.80],
        "sigmoid": [1.00, 0.99, 1.03, 1.00],
    }
    num = 0
    for shape, vals in values.items():
        for seed, v in enumerate(vals):
            make_job(sweep, num, shape, seed, v + 0.05, test=v, quantile=None if shape == "identity" else 0.1)
            num += 1
    make_job(sweep, num, "step", 0, 5.0, test=5.0, quantile=0.9)  # a worse step config (1 seed)
    make_job(sweep, num + 1, "step", 1, 0.0, status="failed", quantile=0.9)
    make_job(sweep, num + 2, "sigmoid", 9, 0.0, status="unfinished", quantile=0.1)
    return sweep


def test_load_jobs_counts_every_status(sweep):
    jobs = load_jobs(sweep)
    assert len(jobs) == 15
    assert jobs["status"].value_counts().to_dict() == {"completed": 13, "failed": 1, "unfinished": 1}
    assert jobs.loc[jobs["status"] == "failed", "error"].iloc[0].startswith("NonFiniteLossError")
    assert set(jobs["env_classification_shape"].dropna()) == {"identity", "step", "sigmoid"}
    metrics = load_metrics(jobs)
    assert len(metrics) == 13 * 3 and set(metrics["epoch"]) == {1, 2, 3}


def test_load_metrics_holds_only_the_runs_and_metrics_asked_for_and_still_reads_every_file(sweep):
    jobs = load_jobs(sweep)
    done = jobs[jobs["status"] == "completed"]
    kept = done["job_dir"].iloc[:2]
    with (Path(done["job_dir"].iloc[-1]) / "metrics.jsonl").open("a") as handle:
        handle.write('{"epoch": 4, "val_lo')  # a run not kept: its truncated file is named all the same
    with pytest.warns(UserWarning, match="line 4 cannot be read"):
        metrics = load_metrics(done, keep=kept, columns=["val_loss"])
    assert set(metrics["job_dir"]) == set(kept) and len(metrics) == 2 * 3
    assert set(metrics.columns) == {"epoch", "val_loss", "job_dir", "config_id", "seed"}
    assert len(metrics.attrs["unreadable"]) == 1


@pytest.mark.parametrize(
    "lines",
    [
        # a metric first logged after some rows (an episode's return), then in every row
        [
            '{"step": 100, "loss": 0.5}',
            '{"step": 200, "loss": 0.25, "charts_return": -500.0}',
            '{"step": 300, "loss": 0.1, "charts_return": -90.5}',
        ],
        # a value whose type changes between lines, and an empty line
        ['{"epoch": 1, "val": 1}', '{"epoch": 2, "val": 0.5}', ""],
        # rows that log different metrics
        ['{"epoch": 1, "a": 1.0}', '{"epoch": 2, "b": 2.0}'],
    ],
)
def test_a_metrics_file_reads_as_its_lines_read_one_by_one(tmp_path, lines):
    import json

    import pandas as pd

    from analysis.load import read_metrics_file

    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(lines) + "\n")
    expected = pd.DataFrame.from_records([json.loads(line) for line in lines if line])
    read = read_metrics_file(path)
    pd.testing.assert_frame_equal(read, expected)
    for columns in ({"epoch", "step", "a"}, {"step", "charts_return", "b"}):
        records = [{k: v for k, v in json.loads(line).items() if k in columns} for line in lines if line]
        pd.testing.assert_frame_equal(read_metrics_file(path, columns), pd.DataFrame(records))  # a row per line


def test_missing_sweep_dir_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_jobs(tmp_path / "nope")


def test_aggregate_mean_std_n_ci(sweep):
    agg = aggregate(load_jobs(sweep), ["final_test_loss"]).set_index("config_id")
    row = agg.loc["step-0.1"]
    values = np.array([0.80, 0.81, 0.79, 0.80])
    assert row["final_test_loss_mean"] == pytest.approx(values.mean())
    assert row["final_test_loss_std"] == pytest.approx(values.std(ddof=1))
    assert row["final_test_loss_n"] == 4
    assert row["final_test_loss_ci95"] == pytest.approx(stats.t.ppf(0.975, 3) * values.std(ddof=1) / 2)
    assert math.isnan(agg.loc["step-0.9", "final_test_loss_ci95"])


def test_holm_known_values():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    adjusted = holm([0.2, math.nan, 0.01])
    assert adjusted[0] == pytest.approx(0.2) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.02)
    assert holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])


def test_welch_matches_scipy_and_handles_edges():
    a, b = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0]
    assert welch_test(a, b) == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)
    assert math.isnan(welch_test([1.0], [1.0, 2.0]))
    assert welch_test([1.0, 1.0], [1.0, 1.0]) == 1.0


def test_paper_table_selects_on_validation_reports_test_and_marks_noise(sweep):
    jobs = load_jobs(sweep)
    spec = default_spec(jobs)
    assert (spec.select, spec.mode, spec.report) == ("final_val_loss", "min", ["final_test_loss", "final_val_loss"])
    table = paper_table(jobs, spec).set_index("shapes")
    assert list(table.index) == ["identity", "step", "sigmoid"]
    assert table.loc["step", "config_id"] == "step-0.1"  # not the worse q=0.9 config
    assert table.loc["step", "candidates"] == 2
    assert table.loc["step", "verdict"] == "better"
    assert table.loc["sigmoid", "verdict"] == "within noise"
    assert table.loc["identity", "verdict"] == "baseline"
    p_raw = [
        stats.ttest_ind([0.80, 0.81, 0.79, 0.80], [1.00, 1.02, 0.98, 1.01], equal_var=False).pvalue,
        stats.ttest_ind([1.00, 0.99, 1.03, 1.00], [1.00, 1.02, 0.98, 1.01], equal_var=False).pvalue,
    ]
    assert table.loc["step", "p_holm"] == pytest.approx(holm(p_raw)[0])
    markdown = to_markdown(table.reset_index(), spec)
    assert "| step | classification: step q=0.1 a=0.1 | 0.8000 ± 0.0082 (4) |" in markdown
    assert "reported on `final_test_loss` (not used for selection)" in markdown
    latex = to_latex(table.reset_index(), spec)
    assert latex.startswith("\\begin{tabular}") and "$\\pm$" in latex and "\\_" in latex


def test_selecting_on_the_reported_metric_is_flagged(sweep):
    jobs = load_jobs(sweep)
    spec = default_spec(jobs, metric="test_loss", mode="min")
    assert spec.report == ["final_test_loss"]
    assert "optimistic" in to_markdown(paper_table(jobs, spec), spec)


def test_unknown_metric_lists_available(sweep):
    with pytest.raises(ValueError, match=r"--metric 'val_acc' is not in the results; available: \['best_epoch'"):
        default_spec(load_jobs(sweep), metric="val_acc")


def test_paper_comparison_pairs_only_runs_at_the_papers_protocol(tmp_path, sweep):
    paper = tmp_path / "paper.csv"
    paper.write_text(
        "experiment,table,task,dataset,task_params,read_at_step,envelopes,metric,mean,std,n,note\n"
        'x,1,classification,digits,"{""epochs"": 3}",,"{""classification"": {""shape"": ""step"", ""quantile"": 0.1}}",test_loss,0.5,0.1,10,\n'
        'x,1,classification,digits,{},,"{""classification"": {""shape"": ""linear"", ""quantile"": 0.1}}",test_loss,0.6,0.1,10,\n'
        'x,1,classification,mnist,{},,"{""classification"": {""shape"": ""identity""}}",test_loss,0.6,0.1,10,\n'
        'x,2,classification,digits,"{""epochs"": 99}",,"{""classification"": {""shape"": ""identity""}}",test_loss,0.6,0.1,10,\n'
        'x,3,classification,digits,"{""epochs"": 3}",2,"{""classification"": {""shape"": ""identity""}}",test_loss,0.6,0.1,10,\n'
        'x,4,classification,digits,"{""optimizer"": ""adam""}",,"{""classification"": {""shape"": ""step"", ""quantile"": 0.1}}",test_loss,0.5,0.1,10,\n'
        'x,5,classification,digits,"{""optimizer"": ""sgd""}",,"{""classification"": {""shape"": ""identity""}}",test_loss,0.6,0.1,10,\n'
    )
    comparison = paper_comparison(load_jobs(sweep), paper)
    assert len(comparison) == 6  # the mnist row is another experiment
    assert comparison["reproduced"].tolist() == [
        "0.8 ± 0.0082 (4)",
        "not in this sweep",
        "not the paper's protocol: epochs=3, the table has epochs=99",  # a run of another protocol is never paired
        "not the paper's protocol: read at the end of training, the table reads at 2 steps (--at-step 2)",
        # a recorded task without a setting added since had it as runs always had it (Adam, say: the id leaves
        # it out there), so it matches a table that requires that value and is named by it where one does not
        "0.8 ± 0.0082 (4)",
        'not the paper\'s protocol: optimizer="adam", the table has optimizer="sgd"',
    ]
    assert comparison["configs matched"].tolist() == [1, 0, 0, 0, 1, 0]
    assert paper_comparison(load_jobs(sweep), paper, table="2")["table"].tolist() == ["2"]


def test_reading_runs_at_a_step(sweep):
    from analysis.load import read_at_step

    jobs = read_at_step(load_jobs(sweep), 2)
    done = jobs[jobs["status"] == "completed"]
    # rows hold val_loss + (3 - epoch) * 0.1: at epoch 2, 0.1 above the final value
    identity = done[done["config_id"] == "identity-None"].sort_values("seed")
    assert identity["final_val_loss"].round(6).tolist() == [1.15, 1.17, 1.13, 1.16]
    assert identity["final_epoch"].tolist() == [2, 2, 2, 2]
    assert "test_loss" not in {
        c[len("final_") :] for c in done.columns if done[c].notna().any()
    }  # end-only metrics left out
    assert (read_at_step(load_jobs(sweep), 0)["status"] == "no_row_at_step").sum() == 13


def test_a_jobs_csv_read_at_a_step_stands_for_runs_whose_metrics_are_gone(sweep, tmp_path):
    import shutil

    from analysis.load import read_at_step

    jobs = read_at_step(load_jobs(sweep), 2)
    jobs.to_csv(tmp_path / "jobs.csv", index=False)
    shutil.rmtree(sweep)
    again = read_at_step(load_jobs(tmp_path / "jobs.csv"), 2)
    assert again.attrs["at_step"] == 2 and (again["read_at_step"] == 2).all()
    done = again[again["status"] == "completed"]
    identity = done[done["config_id"] == "identity-None"].sort_values("seed")
    assert identity["final_val_loss"].round(6).tolist() == [1.15, 1.17, 1.13, 1.16]  # as read at step 2
    with pytest.raises(ValueError, match=r"read at \[2\] environment steps .* not at 3"):
        read_at_step(load_jobs(tmp_path / "jobs.csv"), 3)


def test_rl_tables_give_the_interquartile_mean_with_a_bootstrap_interval():
    import numpy as np

    from analysis.stats import iqm_interval

    values = np.array([-500.0, -90.0, -85.0, -84.0, -83.0, -82.0, -80.0, 40.0])
    assert iqm_interval(values)[0] == pytest.approx(np.mean([-85.0, -84.0, -83.0, -82.0]))  # the middle half
    values = np.random.default_rng(0).normal(-85.0, 3.0, 20)
    values[:2] = -500.0, 50.0  # two outlying seeds of 20
    iqm, low, high = iqm_interval(values)
    assert -88 < low <= iqm <= high < -82  # they move neither the IQM nor its interval far
    assert all(np.isnan(iqm_interval(np.array([1.0]))))  # NaN with one value


def test_report_writes_tables_figures_and_report(sweep):
    report = write_report([sweep], sweep)
    text = report.read_text()
    for name in ("table.md", "table.tex", "configs.csv", "jobs.csv"):
        assert (sweep / name).exists(), name
    for figure in (
        "envelope_shapes",
        "learning_curves_val_loss",
        "envelope_dynamics_classification",
        "sensitivity_classification_final_val_loss",
    ):
        assert (sweep / "figures" / f"{figure}.png").stat().st_size > 1000
        assert (sweep / "figures" / f"{figure}.pdf").exists()
        assert f"figures/{figure}.png" in text
    assert "(failed)" in text and "(unfinished)" in text


def test_a_sensitivity_cell_of_several_configurations_shows_their_mean_and_says_so(tmp_path, monkeypatch):
    # a grid over two losses' envelopes: each policy cell holds one configuration per value envelope
    import pandas as pd

    from analysis import figures

    captured = []
    monkeypatch.setattr(figures, "save", lambda fig, out_dir, name: captured.append(fig) or [])
    agg = pd.DataFrame(
        {
            "env_policy_shape": ["step"] * 4,
            "env_policy_quantile": [0.1, 0.1, 0.3, 0.3],
            "env_policy_step_size": [0.1] * 4,
            "env_policy_width": [math.nan] * 4,
            "final_x_mean": [1.0, 3.0, 5.0, 6.0],
        }
    )
    figures.sensitivity_heatmaps(agg, "policy", "final_x", "max", tmp_path)
    (fig,) = captured
    assert sorted(text.get_text() for text in fig.axes[0].texts) == ["2", "5.5"]  # not the last of each cell
    assert "each cell: the mean of 2 configurations" in fig._suptitle.get_text()
    # the colour bar lies below the panels, its label along it
    assert fig.axes[-1].get_xlabel() == "final_x (mean over seeds, then over a cell's configurations)"
    captured.clear()
    figures.sensitivity_heatmaps(agg.iloc[[0, 2]], "policy", "final_x", "max", tmp_path)
    assert sorted(text.get_text() for text in captured[0].axes[0].texts) == ["1", "5"]
    assert "each cell" not in captured[0]._suptitle.get_text()


def test_command_line(sweep, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "analysis", str(sweep), "--out", str(out), "--no-figures"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| step |" in proc.stdout and (out / "report.md").exists() and not (out / "figures").exists()
    assert (
        f"Results: {out} (report.md, report.html, table.md/.tex, configs.csv, jobs.csv)" in proc.stdout
    )  # what was written
    bad = subprocess.run(
        [sys.executable, "-m", "analysis", str(tmp_path / "missing")], cwd=ROOT, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "does not exist" in bad.stderr


def test_a_directory_without_runs_is_an_error_and_keeps_its_report(tmp_path):
    # a results directory holds a report and tables but no runs: the analysis must not overwrite them
    (tmp_path / "report.md").write_text("the real report\n")
    proc = subprocess.run([sys.executable, "-m", "analysis", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: no runs in {tmp_path}")
    assert (tmp_path / "report.md").read_text() == "the real report\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


def test_welch_interval_is_the_textbook_one():
    import numpy as np
    from scipy import stats as sps

    from analysis.stats import difference_interval

    a, b = np.array([1.0, 2.0, 3.0, 4.5]), np.array([0.0, 1.5, 1.0, 2.0, 2.2])
    va, vb = a.var(ddof=1) / 4, b.var(ddof=1) / 5
    df = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 4)
    half, got_df = difference_interval(a, b)
    assert half == pytest.approx(sps.t.ppf(0.975, df) * (va + vb) ** 0.5) and got_df == pytest.approx(df)
    assert difference_interval(np.ones(3), np.ones(4)) == (0.0, float("inf"))


def test_holding_a_parameter_fixed_selects_among_the_runs_at_that_value(tmp_path):
    from analysis.tables import hold_fixed, parse_fixed

    sweep = tmp_path / "sweep"
    num = 0
    for seed, (base, step_a, step_b) in enumerate([(1.0, 0.9, 0.5), (1.1, 0.8, 0.6), (0.9, 0.85, 0.55)]):
        make_job(sweep, num, "identity", seed, base)
        make_job(sweep, num + 1, "step", seed, step_a, quantile=0.9, step_size=0.1)
        make_job(sweep, num + 2, "step", seed, step_b, quantile=0.5, step_size=1.0)  # better, at another step size
        num += 3
    jobs = load_jobs(sweep)
    spec = default_spec(jobs)
    assert paper_table(jobs, spec).set_index("shapes").loc["step", "config_id"] == "step-0.5-1.0"
    held = hold_fixed(jobs, parse_fixed(["step_size=0.1"]))
    # identity has no step size and stays; the step run at step size 1.0 is out
    assert sorted(held["config_id"].unique()) == ["identity-None", "step-0.9"]
    assert paper_table(held, spec).set_index("shapes").loc["step", "config_id"] == "step-0.9"
    assert len(hold_fixed(jobs, {"envelopes.classification.quantile": 0.5})) == 6
    assert len(hold_fixed(jobs, {"task.epochs": 3})) == 9 and hold_fixed(jobs, {"task.epochs": 4}).empty
    with pytest.raises(
        ValueError,
        match=r"--fix width: no run sets that parameter; envelope parameters in these "
        r"runs: \['quantile', 'step_size'\]",
    ):
        hold_fixed(jobs, {"width": 0.1})
    with pytest.raises(ValueError, match="--fix takes KEY=VALUE"):
        parse_fixed(["step_size"])
    report = write_report([sweep], tmp_path / "out", make_figures=False, fixed={"step_size": 0.1}).read_text()
    assert "Held fixed: `step_size` = 0.1 (3 of 9 runs, at other values, left out" in report
    assert "step-0.5" not in (tmp_path / "out" / "configs.csv").read_text()


def test_each_paper_table_has_its_reading_protocol():
    from analysis.report import paper_table_protocol, paper_tables

    assert paper_tables() == ["1", "2", "3", "4", "5", "6", "7"]
    one, two = paper_table_protocol("1"), paper_table_protocol("2")
    assert (one.metric, one.mode, one.fixed) == ("val_loss", "min", {"step_size": 0.1})
    assert (two.metric, two.mode, two.fixed) == ("val_accuracy", "max", {"step_size": 0.1})
    six, seven = paper_table_protocol("6"), paper_table_protocol("7")
    assert (six.metric, six.mode, six.at_step, seven.at_step) == ("charts_return_ma100", "max", 50000, None)
    with pytest.raises(ValueError, match=r"--paper-table 8: .* has no such table; tables: \['1', '2'"):
        paper_table_protocol("8")


def test_a_paper_table_asked_for_on_another_data_set_says_it_is_not_comparable(tmp_path, sweep):
    paper = tmp_path / "paper.csv"
    paper.write_text(
        "experiment,table,task,dataset,task_params,read_at_step,envelopes,metric,mean,std,n,note\n"
        'x,1,classification,mnist,{},,"{""classification"": {""shape"": ""identity""}}",val_loss,0.6,0.1,10,\n'
    )
    assert paper_comparison(load_jobs(sweep), paper).empty  # not asked for: another experiment, no row
    row = paper_comparison(load_jobs(sweep), paper, table="1").iloc[0]
    assert row["reproduced"] == "not comparable: dataset=digits, the table has dataset=mnist"


def test_command_line_reads_a_sweep_as_a_paper_table(tmp_path):
    sweep = tmp_path / "sweep"
    for seed in range(3):
        make_job(sweep, 2 * seed, "identity", seed, 1.0 + seed / 10, dataset="fashion_mnist")
        make_job(sweep, 2 * seed + 1, "step", seed, 0.5, quantile=0.9, step_size=1.0, dataset="fashion_mnist")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "analysis", str(sweep), "--out", str(out), "--no-figures", "--paper-table", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    report = (out / "report.md").read_text()
    assert "Read as the paper's Table 1: selected by `val_loss` (min)." in report
    assert "Held fixed: `step_size` = 0.1 (3 of 6 runs" in report  # the step runs at step size 1.0 are out
    assert "## The paper's Table 1, side by side" in report
    assert "not comparable: dataset=fashion_mnist, the table has dataset=mnist" in report
    bad = subprocess.run(
        [sys.executable, "-m", "analysis", str(sweep), "--paper-table", "9"], cwd=ROOT, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "invalid choice: '9'" in bad.stderr


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs a headless browser: apt-get install chromium (CI installs it)")
def test_the_html_report_renders_its_tables_and_figures_in_a_browser(sweep, tmp_path):
    import matplotlib.image

    write_report([sweep], sweep)
    page = sweep / "report.html"
    shutil.copy(page, tmp_path / "alone.html")  # self-contained: nothing beside it
    browser = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run(
        [*browser, "--dump-dom", (tmp_path / "alone.html").as_uri()], capture_output=True, text=True, timeout=120
    ).stdout
    assert dom.count("<table>") == 1 and "<th>shape</th>" in dom and "<td>step</td>" in dom
    figures = sorted((sweep / "figures").glob("*.png"))
    assert len(figures) >= 4 and dom.count('src="data:image/png;base64,') == len(figures)
    shot = tmp_path / "shot.png"
    subprocess.run(
        [*browser, f"--screenshot={shot}", "--window-size=1200,3000", (tmp_path / "alone.html").as_uri()],
        capture_output=True,
        timeout=120,
    )
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (3000, 1200)
    assert (pixels < 0.9).mean() > 0.02  # text, table rules and plots: not a blank page
    # the figures are drawn: some pixels carry the plots' colours, not only grey text
    saturation = pixels.max(-1) - pixels.min(-1)
    assert (saturation > 0.3).mean() > 0.001


def test_learning_curves_show_differences_from_identity_with_spelled_out_legends(sweep, monkeypatch):
    from analysis import figures
    from analysis.figures import readable

    assert (
        readable("mse: linear q=0.9 w=0.3 a=0.01") == "mse: linear, threshold quantile 0.9, width 0.3, step size 0.01"
    )
    jobs = load_jobs(sweep)
    spec = default_spec(jobs)
    table = paper_table(jobs, spec)
    captured = []
    monkeypatch.setattr(figures, "save", lambda fig, out_dir, name: captured.append(fig) or [])
    figures.learning_curves(load_metrics(jobs[jobs["status"] == "completed"]), table, "val_loss", sweep)
    (fig,) = captured
    absolute, difference = fig.axes
    assert "minus identity" in difference.get_ylabel()
    # identity's own difference is zero at every epoch; step's is its mean minus identity's
    lines = {line.get_color(): line.get_ydata() for line in difference.get_lines()[1:]}  # [0] is the zero line
    assert any(np.allclose(values, 0.0) for values in lines.values())
    assert any(np.allclose(values, 0.85 - 1.0525) for values in lines.values())
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "classification: step, threshold quantile 0.1, step size 0.1 (n=4)" in labels
    assert not any(" q=" in label for label in labels)


def test_long_curves_are_drawn_as_means_of_bins_of_logged_steps_and_say_so(monkeypatch):
    # 2,000 logged steps (a PPO run's updates): at most MAX_POINTS points a line, each the mean of 5 steps at
    # their mean step; a short curve is drawn as it is
    from analysis import figures

    steps = np.arange(1, 2001) * 100
    rows = [
        {"config_id": c, "step": int(step), "charts_return_ma100": float(step) / 1000 + seed + offset}
        for c, offset in (("a", 0.0), ("b", 2.0))
        for seed in (0, 1)
        for step in steps
    ]
    metrics = pd.DataFrame(rows)
    table = pd.DataFrame(
        {"config_id": ["a", "b"], "shapes": ["identity", "step"], "envelopes": ["identity", "step"],
         "verdict": ["baseline", "n.s."], "label": ["identity", "step"]}
    )  # fmt: skip
    captured = []
    monkeypatch.setattr(figures, "save", lambda fig, out_dir, name: captured.append(fig) or [])
    figures.learning_curves(metrics, table, "charts_return_ma100", Path("."))
    (fig,) = captured
    absolute, difference = fig.axes
    (line_a, line_b) = absolute.get_lines()
    assert len(line_a.get_xdata()) == figures.MAX_POINTS == 2000 // 5
    np.testing.assert_allclose(line_a.get_xdata()[:2], [300.0, 800.0])  # steps 100-500, 600-1000
    np.testing.assert_allclose(line_a.get_ydata()[:2], [0.3 + 0.5, 0.8 + 0.5])  # the mean over seeds 0 and 1
    differences = [line.get_ydata() for line in difference.get_lines() if len(line.get_ydata()) > 2]
    assert len(differences) == 2 and any(np.allclose(d, 2.0) for d in differences)  # b's offset, binned alike
    assert "means over bins of 5 logged steps" in absolute.get_title()
    assert "(n=2)" in fig.legends[0].get_texts()[0].get_text()
    captured.clear()
    figures.learning_curves(metrics[metrics["step"] <= 30_000], table, "charts_return_ma100", Path("."))
    assert len(captured[0].axes[0].get_lines()[0].get_xdata()) == 300
    assert "bins" not in captured[0].axes[0].get_title()


def test_step_axes_read_in_thousands_and_epoch_axes_in_whole_epochs():
    import matplotlib.pyplot as plt

    from analysis import figures

    fig, (steps, epochs) = plt.subplots(1, 2)
    figures._x_axis(steps, "step")
    figures._x_axis(epochs, "epoch")
    label = steps.xaxis.get_major_formatter()
    assert [label(x) for x in (0, 50_000, 500_000, 1_500_000)] == ["0", "50k", "500k", "1.5M"]
    epochs.set_xlim(0, 2)
    assert all(float(tick).is_integer() for tick in epochs.get_xticks())
    assert steps.get_xlabel() == "step" and epochs.get_xlabel() == "epoch"
    plt.close(fig)


def test_the_report_says_why_test_differs_from_validation():
    import pandas as pd

    from analysis.report import _split_note
    from analysis.tables import TableSpec

    group = pd.DataFrame({"task_json": [json.dumps({"train_size": 1200, "val_size": 300, "test_size": 297})]})
    note = _split_note(group, TableSpec("final_val_loss", "min", ["final_test_loss", "final_val_loss"]))
    assert "validation is 300 examples drawn afresh for each seed, test the same 297 examples for every seed" in note
    assert _split_note(group, TableSpec("final_val_loss", "min", ["final_val_loss"])) is None  # no test reported


def test_an_unreadable_result_or_metrics_file_is_named_and_its_run_left_out(sweep, tmp_path):
    (sweep / "0" / "result.json").write_text("")
    (sweep / "1" / "result.json").write_text('{"status": "compl')
    with (sweep / "2" / "metrics.jsonl").open("a") as handle:
        handle.write('{"epoch": 4, "val_lo')
    with pytest.warns(UserWarning, match="cannot be read"):
        jobs = load_jobs(sweep)
    unreadable = jobs[jobs["status"] == "unreadable"]
    assert sorted(Path(d).name for d in unreadable["job_dir"]) == ["0", "1"]
    for job in unreadable.itertuples():  # each names its own file
        assert job.error.startswith(f"{Path(job.job_dir) / 'result.json'}: cannot be read")
    with pytest.warns(UserWarning, match=r"metrics.jsonl: line 4 cannot be read"):
        report = write_report([sweep], tmp_path / "out", jobs=jobs)
    text = report.read_text()
    assert "2 unreadable" in text and f"`{sweep / '0'}` (unreadable)" in text
    assert f"{sweep / '2' / 'metrics.jsonl'}: line 4 cannot be read" in text
    assert (tmp_path / "out" / "table.md").exists()  # the others are still tabulated


def test_a_sweep_of_unfinished_runs_reports_that_nothing_completed(tmp_path):
    for num in range(2):
        make_job(tmp_path / "sweep", num, "identity", num, 1.0, status="unfinished")
    proc = subprocess.run(
        [sys.executable, "-m", "analysis", str(tmp_path / "sweep")], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    assert "2 runs: 2 unfinished" in proc.stdout and "No run completed, so there is no table" in proc.stdout
    assert "No run completed" in (tmp_path / "sweep" / "report.md").read_text()


def test_a_pure_noise_grids_apparent_winner_vanishes_under_confirmation(tmp_path):
    from analysis.confirm import PLAN_FILE

    # one fixed draw: under pure noise a confirmation still calls a row 'better' with probability alpha (seed 7
    # is such a draw); seeds 0-2 are not, and this checks the pipeline on one of them
    rng = np.random.default_rng(0)
    noise = lambda: float(rng.normal(1.0, 0.1))  # noqa: E731  every configuration is the same
    sweep, num = tmp_path / "selection", 0
    for seed in range(3):
        make_job(sweep, num, "identity", seed, noise(), test=noise())
        num += 1
    for quantile in [round(0.02 * k, 2) for k in range(1, 31)]:  # 30 step configurations
        for seed in range(3):
            make_job(sweep, num, "step", seed, noise(), test=noise(), quantile=quantile)
            num += 1
    selection = write_report([sweep], tmp_path / "selection_report")
    assert "| step |" in selection.read_text()
    proc = subprocess.run(
        [sys.executable, "-m", "analysis", str(sweep), "--confirm-seeds", "10"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "2 configurations x 10 fresh seeds (1000-1009) = 20 runs" in proc.stdout
    plan = json.loads((sweep / "confirm" / PLAN_FILE).read_text())
    step = next(row for row in plan["rows"] if row["row"] == "step")
    identity = next(row for row in plan["rows"] if row["identity"])
    assert step["candidates"] == 30 and plan["seeds"] == list(range(1000, 1010))
    # the selection stage: the best of 30 equal configurations looks better than identity on its own seeds
    apparent = identity["selection"]["final_val_loss"]["mean"] - step["selection"]["final_val_loss"]["mean"]
    assert apparent > 0.1  # one standard deviation of the noise
    listed = yaml.safe_load((sweep / "confirm" / "jobs.yaml").read_text())
    assert len(listed) == 20 and all("seed_batch=1" in job for job in listed)
    confirm, num = sweep / "confirm" / "sweep", 0
    for row in plan["rows"]:  # the confirmation: the same configurations, fresh noise
        for seed in plan["seeds"]:
            quantile = None if row["identity"] else json.loads(row["config_id"].split("-")[1])
            make_job(
                confirm, num, "identity" if row["identity"] else "step", seed, noise(), test=noise(), quantile=quantile
            )
            num += 1
    report = write_report([confirm], confirm)
    text = (confirm / "confirmation.md").read_text()
    assert "## Confirmation on fresh seeds" in report.read_text() and "Best configuration per envelope" not in text
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert rows["step"].rstrip(" |").endswith("within noise") and rows["identity"].rstrip(" |").endswith("baseline")
    assert "paired by seed (10)" in text and "fresh seeds 1000-1009" in text
    # the committed files alone (the report's jobs.csv, the plan beside it) give the same confirmation
    again = write_report([confirm / "jobs.csv"], tmp_path / "again")
    assert (tmp_path / "again" / "confirmation.md").read_text() == text and again.exists()
    # a confirmation run in two parts (by seed), each part's jobs.csv with a copy of the plan: the same verdicts
    import pandas as pd

    rows = pd.read_csv(confirm / "jobs.csv")
    for part, seeds in (("a", range(1000, 1005)), ("b", range(1005, 1010))):
        (tmp_path / part).mkdir()
        rows[rows["seed"].isin(seeds)].to_csv(tmp_path / part / "jobs.csv", index=False)
        (tmp_path / part / PLAN_FILE).write_text((sweep / "confirm" / PLAN_FILE).read_text())
    write_report([tmp_path / "a" / "jobs.csv", tmp_path / "b" / "jobs.csv"], tmp_path / "parts")
    assert (tmp_path / "parts" / "confirmation.md").read_text() == text
    (tmp_path / "b" / PLAN_FILE).write_text(json.dumps({**plan, "seeds": [1]}))
    with pytest.raises(ValueError, match="confirmation plans .* differ"):
        write_report([tmp_path / "a" / "jobs.csv", tmp_path / "b" / "jobs.csv"], tmp_path / "mixed")
    # a plan that reads its runs at a step: the report reads them there, and its jobs.csv is written as read
    stepped = tmp_path / "stepped"
    shutil.copytree(confirm, stepped, ignore=shutil.ignore_patterns("*.csv", "*.md", "*.html"))
    (stepped / PLAN_FILE).write_text(json.dumps({**plan, "at_step": 2}))
    with pytest.raises(ValueError, match=r"--at-step 3: this confirmation's plan reads its runs at 2 steps"):
        write_report([stepped], tmp_path / "wrong_step", at_step=3)
    assert not (tmp_path / "wrong_step").exists()  # refused before anything is written
    report = write_report([stepped], tmp_path / "read_at_2")
    written = pd.read_csv(tmp_path / "read_at_2" / "jobs.csv")
    assert (written["read_at_step"] == 2).all() and (written["final_epoch"] == 2).all()
    assert "Read at 2 environment steps" in report.read_text()
    at_two = (tmp_path / "read_at_2" / "confirmation.md").read_text()
    assert at_two != text  # the runs' values at step 2 (0.1 above their final ones), not their final values
    shutil.rmtree(stepped)  # the committed jobs.csv and plan alone give the same confirmation
    (tmp_path / "read_at_2" / PLAN_FILE).write_text(json.dumps({**plan, "at_step": 2}))
    write_report([tmp_path / "read_at_2" / "jobs.csv"], tmp_path / "again_at_2")
    assert (tmp_path / "again_at_2" / "confirmation.md").read_text() == at_two


@pytest.mark.parametrize("named", [True, False])  # plans written before rows named their group: the label's prefix
def test_a_confirmation_compares_each_group_of_task_parameters_with_its_own_identity(named):
    import pandas as pd

    from analysis.confirm import confirmation_table

    figure = {"mean": 0.0, "std": 1.0, "n": 5}
    rows = [
        {"row": f"task.truncation={t}: {shape}", "identity": shape == "identity", "config_id": f"{shape}-{t}"}
        | {"envelopes": shape, "source": "", "selection": {"final_x": figure}}
        | ({"group": f"task.truncation={t}"} if named else {})
        for t in ("bootstrap", "terminate")
        for shape in ("identity", "step")
    ]
    plan = {"selected_by": {"metric": "final_x", "mode": "max"}, "reported": "final_x", "rows": rows}
    noise = [0.3, -0.2, 0.1, -0.4, 0.2]
    level = {"identity-bootstrap": 0.0, "step-bootstrap": 10.0, "identity-terminate": 100.0, "step-terminate": 110.0}
    jobs = pd.DataFrame(
        [
            {"status": "completed", "config_id": cid, "seed": 1000 + i, "final_x": value + n * (1 + (j % 2))}
            for j, (cid, value) in enumerate(level.items())
            for i, n in enumerate(noise)
        ]
    )
    table = confirmation_table(jobs, plan).set_index("row")
    assert table.loc["task.truncation=terminate: identity", "verdict"] == "baseline"
    assert table.loc["task.truncation=bootstrap: identity", "verdict"] == "baseline"
    assert table.loc["task.truncation=terminate: step", "difference"] == pytest.approx(10.0)  # not 110
    assert table.loc["task.truncation=bootstrap: step", "difference"] == pytest.approx(10.0)
    assert (
        table.loc[["task.truncation=terminate: step", "task.truncation=bootstrap: step"], "verdict"]
        == "better than identity"
    ).all()


def test_a_reports_jobs_csv_or_configs_csv_stands_for_a_sweep_whose_runs_are_gone(tmp_path):
    from analysis.confirm import PLAN_FILE

    rng = np.random.default_rng(1)
    sweep, num = tmp_path / "selection", 0
    for shape, quantiles in (("identity", [None]), ("step", [0.1, 0.5, 0.9])):
        for quantile in quantiles:
            for seed in range(3):
                make_job(sweep, num, shape, seed, float(rng.normal(1.0, 0.1)), quantile=quantile)
                num += 1
    write_report([sweep], tmp_path / "report", make_figures=False)
    # the table again from the report's jobs.csv alone: the same
    write_report([tmp_path / "report" / "jobs.csv"], tmp_path / "again", make_figures=False)
    assert (tmp_path / "again" / "table.md").read_text() == (tmp_path / "report" / "table.md").read_text()
    plans = {}
    sources = (
        ("sweep", sweep),
        ("jobs", tmp_path / "report" / "jobs.csv"),
        ("csv", tmp_path / "report" / "configs.csv"),
    )
    for name, source in sources:
        proc = subprocess.run(
            [sys.executable, "-m", "analysis", str(source), "--confirm-seeds", "4", "--out", str(tmp_path / name)]
            + (["--metric", "val_loss", "--mode", "min"] if name == "csv" else []),
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert proc.returncode == 0, proc.stderr
        plans[name] = json.loads((tmp_path / name / "confirm" / PLAN_FILE).read_text())
    keys = ("row", "config_id", "identity", "selection", "selection_seeds", "candidates")
    for name in ("jobs", "csv"):  # each selects the rows the sweep's runs select, with the same overrides
        assert [{k: r[k] for k in keys} for r in plans[name]["rows"]] == [
            {k: r[k] for k in keys} for r in plans["sweep"]["rows"]
        ]
        assert [sorted(r["overrides"]) for r in plans[name]["rows"]] == [
            sorted(r["overrides"]) for r in plans["sweep"]["rows"]
        ]
        assert plans[name]["seeds"] == plans["sweep"]["seeds"] == [1000, 1001, 1002, 1003]
    # a configs.csv names no objective: the metric comes from the command line or the paper's table
    proc = subprocess.run(
        [sys.executable, "-m", "analysis", str(tmp_path / "report" / "configs.csv"), "--confirm-seeds", "4"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and "give --metric and --mode, or --paper-table" in proc.stderr


def test_a_confirmation_pins_the_setting_a_preset_changed_since_its_runs_trained(tmp_path):
    # runs of a preset (experiment=acrobot_paper) from before it set task.init=torch: their recorded task has no
    # init (orthogonal, as runs always had it), and their confirmation jobs must train that again
    from analysis.confirm import PLAN_FILE

    def sweep_of(name: str, recorded: dict) -> Path:
        sweep = tmp_path / name
        for num, (shape, quantile, seed) in enumerate(
            (s, q, seed) for s, q in (("identity", None), ("step", 0.1)) for seed in range(3)
        ):
            job = make_job(sweep, num, shape, seed, 1.0 + 0.1 * seed - 0.2 * (shape == "step"), quantile=quantile)
            listed = (job / ".hydra" / "overrides.yaml").read_text()
            (job / ".hydra" / "overrides.yaml").write_text(listed + "- experiment=acrobot_paper\n")
            result = json.loads((job / "result.json").read_text())
            result["effective"]["task"].update(recorded)
            (job / "result.json").write_text(json.dumps(result))
        return sweep

    def plan(*args: str) -> tuple[subprocess.CompletedProcess, list]:
        out = tmp_path / f"plan{len(list(tmp_path.glob('plan*')))}"
        proc = subprocess.run(
            [sys.executable, "-m", "analysis", *args, "--confirm-seeds", "2", "--out", str(out)],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert proc.returncode == 0, proc.stderr
        rows = json.loads((out / "confirm" / PLAN_FILE).read_text())["rows"]
        jobs = yaml.safe_load((out / "confirm" / "jobs.yaml").read_text())
        return proc, [row["overrides"] for row in rows], jobs

    old = sweep_of("old", {})
    _, pinned_by_runs, jobs = plan(str(old))
    assert len(pinned_by_runs) == 2 and all(o.count("task.init=orthogonal") == 1 for o in pinned_by_runs)
    assert all("task.init=orthogonal" in job for job in jobs)
    # runs that recorded the preset's value need no pin
    _, overrides, _ = plan(str(sweep_of("new", {"init": "torch"})))
    assert not any(o.startswith("task.init") for row in overrides for o in row)
    # a report's configs.csv does not record the task: --pin says what the preset set then
    write_report([old], tmp_path / "report", make_figures=False)
    configs = str(tmp_path / "report" / "configs.csv")
    _, unpinned, _ = plan(configs, "--metric", "val_loss", "--mode", "min")
    assert not any(o.startswith("task.init") for row in unpinned for o in row)
    _, pinned, _ = plan(configs, "--metric", "val_loss", "--mode", "min", "--pin", "task.init=orthogonal")
    assert [sorted(o) for o in pinned] == [sorted(o) for o in pinned_by_runs]
    for bad, message in (
        (["--pin", "task.init=orthogonal"], "--pin applies to a confirmation plan"),
        (["--confirm-seeds", "2", "--pin", "task.init"], "--pin takes KEY=VALUE"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "analysis", str(old), *bad], capture_output=True, text=True, cwd=ROOT
        )
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("factor", "values", "named"),
    [
        (
            "controller",
            [None, "monitor_only", "full"],
            ["controller off", "controller monitor_only", "controller full"],
        ),
        ("vwpr", [False, True], ["VWPR off", "VWPR on"]),
    ],
)
def test_a_sweep_over_another_factor_names_it_in_tables_and_legends(tmp_path, monkeypatch, factor, values, named):
    from analysis import figures

    sweep, num = tmp_path / "sweep", 0
    for value in values:
        for seed in range(3):
            job = make_job(sweep, num, "identity", seed, 1.0 + 0.1 * seed + 0.05 * values.index(value), test=1.0)
            result = json.loads((job / "result.json").read_text())
            result["config_id"] = f"{factor}-{value}"
            if factor == "controller":
                result["effective"]["controller"] = {"mode": value}
            else:
                result["effective"]["vwpr"] = {"enabled": value}
            (job / "result.json").write_text(json.dumps(result))
            num += 1
    captured = []
    monkeypatch.setattr(figures, "save", lambda fig, out_dir, name: captured.append((name, fig)) or [])
    text = write_report([sweep], tmp_path / "out").read_text()
    title = {"controller": "loss-controller mode", "vwpr": "VWPR on or off"}[factor]
    assert f"## Best configuration per {title}" in text and "envelope shape" not in text
    assert "envelope_shapes" not in [name for name, _ in captured]  # only identity ran: no shapes figure
    (curves,) = [fig for name, fig in captured if name.startswith("learning_curves")]
    legend = [t.get_text() for t in curves.legends[0].get_texts()]
    assert [entry.split(" (n=")[0] for entry in legend] == named  # the factor, not "classification: identity"
    assert all(
        float(t.get_text().replace("−", "-")).is_integer() for t in curves.axes[0].get_xticklabels() if t.get_text()
    )
    if CHROMIUM is not None:  # the page a reader opens names the factor too
        page = (tmp_path / "out" / "report.html").as_uri()
        browser = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page]
        dom = subprocess.run(browser, capture_output=True, text=True, timeout=120).stdout
        assert f"Best configuration per {title}</h2>" in dom
        cell = {"controller": "identity + controller full", "vwpr": "identity + VWPR"}[factor]
        assert f"<td>{cell}</td>" in dom
