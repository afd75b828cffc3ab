"""End to end: the real command line, tiny settings, every file a job writes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from runner.job import run_job

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "run_ablation.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def tensorboard_tags(tb_dir: Path) -> tuple[set[str], set[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(tb_dir))
    accumulator.Reload()
    tags = accumulator.Tags()
    return set(tags["scalars"]), set(accumulator.PluginTagToContent("hparams"))


def test_multirun_writes_every_file_and_survives_a_failing_job(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(
        "-m",
        "envelope@envelopes.classification=identity,sigmoid",
        "task.lr=0.001,1e30",
        "task.epochs=2",
        f"hydra.sweep.dir={sweep}",
    )
    # the report is written, the failed runs are named, and the exit status says a run failed
    assert proc.returncode == 1, proc.stderr
    assert "Error: 2 of 4 runs did not complete (listed above)" in proc.stderr
    jobs = sorted(p for p in sweep.iterdir() if (p / ".hydra").is_dir())
    assert len(jobs) == 4
    statuses = {}
    for job in jobs:
        result = json.loads((job / "result.json").read_text())
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        statuses[" ".join(overrides)] = result["status"]
        config = yaml.safe_load((job / "config.yaml").read_text())
        assert config["task"]["epochs"] == 2 and "${" not in (job / "config.yaml").read_text()
        assert len(result["config_id"]) == 16 and len(result["run_id"]) == 16
        assert result["wall_time_s"] > 0
        if result["status"] == "failed":
            assert result["error"] == "DivergedError: diverged at epoch 1: train/raw_loss_mean is nan"
            continue
        rows = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in rows] == [1, 2]
        for key in (
            "train_raw_loss_mean",
            "train_raw_loss_std",
            "train_shaped_loss_mean",
            "train_shaped_loss_std",
            "val_loss",
            "val_accuracy",
            "envelope_classification_mean_weight",
            "envelope_classification_fraction_attenuated",
        ):
            assert key in rows[-1], key
        assert result["final"]["val_loss"] == rows[-1]["val_loss"]
        assert result["best"]["val_loss"] == min(r["val_loss"] for r in rows)
        assert result["objective"] == {"metric": "val_loss", "mode": "min", "value": rows[-1]["val_loss"]}
        assert 0 < result["final"]["test_accuracy"] <= 1
        (tb_run,) = (job / "tb").iterdir()  # named by what the run is
        assert tb_run.name == ",".join(
            o.replace("envelope@envelopes.", "").replace("envelopes.", "") for o in overrides if "sweep.dir" not in o
        )
        scalars, hparams = tensorboard_tags(tb_run)
        assert {"train/raw_loss_mean", "val/loss", "val/accuracy", "envelope/classification/mean_weight"} <= scalars
        if "sigmoid" in " ".join(overrides):
            assert {"envelope/classification/threshold", "envelope/classification/inverse_slope"} <= scalars
        assert "hparams/val_loss" in scalars and hparams
    assert sorted(statuses.values()) == ["completed", "completed", "failed", "failed"]
    # the end-of-sweep summary ran although jobs failed
    for name in ("report.md", "table.md", "table.tex", "configs.csv", "jobs.csv", "figures/envelope_shapes.png"):
        assert (sweep / name).exists(), name
    assert "4 runs: 2 completed, 2 failed" in proc.stdout and "(failed): DivergedError" in proc.stdout
    assert f"Results: {sweep}" in proc.stdout


def test_duplicate_effective_configs_train_once(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(
        "-m",
        "envelope@envelopes.classification=identity",
        "envelopes.classification.quantile=0.1,0.5,0.9",
        "task.epochs=1",
        "tensorboard=false",
        f"hydra.sweep.dir={sweep}",
    )
    assert proc.returncode == 0, proc.stderr
    results = [json.loads((sweep / str(i) / "result.json").read_text()) for i in range(3)]
    assert [r["status"] for r in results] == ["completed", "duplicate", "duplicate"]
    assert results[1]["duplicate_of"] == str(sweep / "0")
    assert not (sweep / "1" / "metrics.jsonl").exists()
    assert "2 runs repeat an effective config" in proc.stderr + proc.stdout


def test_invalid_sweep_stops_before_any_job(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(
        "-m",
        "envelope@envelopes.classification=step",
        "envelopes.classification.quantile=0.5,1.5",
        "seed=0,1",
        f"hydra.sweep.dir={sweep}",
    )
    assert proc.returncode == 2
    # every invalid job counted; its error listed once, not once per seed
    assert "2 of 4 jobs have an invalid config; nothing was run" in proc.stderr
    assert proc.stderr.count("envelopes.classification: quantile must lie in [0, 1], got 1.5") == 1
    # a large sweep says what it is doing while it checks (minutes for a paper grid)
    proc = run_cli(
        "-m",
        "envelope@envelopes.classification=step",
        "envelopes.classification.quantile=1.5",
        "seed=range(50)",
        f"hydra.sweep.dir={sweep}",
    )
    assert proc.returncode == 2
    assert "Checking the configs of 50 jobs before any trains" in proc.stdout + proc.stderr
    assert "50 of 50 jobs have an invalid config" in proc.stderr
    assert not (sweep / "0").exists()


def test_the_sweeper_composes_each_job_again_only_when_the_sweep_check_did_not(monkeypatch):
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from hydra_plugins.lae_lab.checked_sweeper import CheckedSweeper
    from runner import callbacks

    composed = []
    sweeper = CheckedSweeper(max_batch_size=None)
    sweeper.config = OmegaConf.create({"hydra": {"sweep": {"dir": "/sweeps/a"}}})
    sweeper.hydra_context = SimpleNamespace(
        config_loader=SimpleNamespace(
            load_sweep_config=lambda master_config, sweep_overrides: composed.append(sweep_overrides)
        )
    )
    batch = [["seed=0"], ["seed=1"]]
    monkeypatch.setattr(callbacks, "_checked_sweeps", {"/sweeps/b"})
    sweeper.validate_batch_is_legal(batch)
    assert composed == batch  # another sweep was checked: Hydra's own validation runs
    composed.clear()
    callbacks._checked_sweeps.add("/sweeps/a")
    sweeper.validate_batch_is_legal(batch)
    assert composed == []


def test_an_experiment_preset_that_picks_its_own_sweeper_keeps_it(compose, tmp_path):
    # what the Optuna presets do, with a sweeper every install has
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "own_sweeper.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /hydra/sweeper: basic\n"
    )
    default = compose(return_hydra_config=True).hydra.sweeper
    own = compose(
        "experiment=own_sweeper", f"hydra.searchpath=[file://{tmp_path}]", return_hydra_config=True
    ).hydra.sweeper
    assert default._target_ == "hydra_plugins.lae_lab.checked_sweeper.CheckedSweeper"
    assert own._target_ == "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def test_single_run_failure_exits_non_zero(tmp_path):
    proc = run_cli("task.lr=1e30", "task.epochs=1", "tensorboard=false", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0
    assert "diverged at epoch 1" in proc.stderr
    assert json.loads((tmp_path / "result.json").read_text())["status"] == "failed"


def test_single_run_config_error_is_one_line_and_leaves_no_directory(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(
        "envelope@envelopes.classification=step", "envelopes.classification.quantile=1.5", f"hydra.run.dir={run_dir}"
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "Error: envelopes.classification: quantile must lie in [0, 1], got 1.5"
    assert not run_dir.exists()


def test_unwritable_output_directory_is_one_line(tmp_path):
    # a path below a regular file cannot be created, as root too (a read-only directory is the same OSError)
    (tmp_path / "file").write_text("")
    for args in (
        ["hydra.run.dir=" + str(tmp_path / "file" / "run")],
        ["-m", "hydra.sweep.dir=" + str(tmp_path / "file" / "sweep")],
    ):
        proc = run_cli(*args, "tensorboard=false")
        assert proc.returncode == 2
        assert (
            proc.stderr.strip()
            == f"Error: cannot write the output directory {tmp_path / 'file' / args[-1].split('/')[-1]}: "
            "Not a directory (set hydra.run.dir or hydra.sweep.dir to a writable place)"
        )


def test_sweep_with_a_bad_seed_leads_with_hydras_message(tmp_path):
    proc = run_cli("-m", "seed=0,abc", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 2
    assert proc.stderr.startswith(
        "Error: Error merging override seed=abc\nValue 'abc' of type 'str' could not be converted to Integer"
    )
    assert "Warning" not in proc.stderr and "Traceback" not in proc.stderr


def test_a_sweep_whose_every_run_failed_exits_non_zero(tmp_path):
    proc = run_cli(
        "-m", "task.lr=1e30", "seed=0,1", "task.epochs=1", "tensorboard=false", f"hydra.sweep.dir={tmp_path}"
    )
    assert proc.returncode == 1
    assert "Error: 2 of 2 runs did not complete (listed above)" in proc.stderr
    assert proc.stdout.count("(failed): DivergedError: diverged at epoch 1") == 2
    assert (tmp_path / "report.md").exists()


def test_result_file_has_the_mode_of_the_other_files(tmp_path):
    proc = run_cli("task.epochs=1", "tensorboard=false", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    modes = {name: (tmp_path / name).stat().st_mode & 0o777 for name in ("result.json", "metrics.jsonl", "config.yaml")}
    assert modes["result.json"] == modes["metrics.jsonl"] == modes["config.yaml"], modes


def test_bad_config_key_exits_with_hydra_message(tmp_path):
    proc = run_cli("task.lrr=0.1", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0
    assert "Key 'lrr' not in 'ClassificationConfig'" in proc.stderr


@pytest.mark.slow  # a multi-process end-to-end check of 9-25 s: CI runs it with the slow tests
def test_rerunning_a_sweep_redoes_only_unfinished_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    args = ("-m", "envelope@envelopes.classification=identity,step", "task.epochs=2", f"hydra.sweep.dir={sweep}")
    assert run_cli(*args).returncode == 0
    finished = json.loads((sweep / "0" / "result.json").read_text())
    written = (sweep / "0" / "config.yaml").stat().st_mtime_ns
    # job 1 was "interrupted": no result, a partial metrics file, stale events
    (sweep / "1" / "result.json").unlink()
    (sweep / "1" / "metrics.jsonl").write_text('{"epoch": 1, "val_loss": 99.0}\n')
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert "already completed" in proc.stderr + proc.stdout
    assert json.loads((sweep / "0" / "result.json").read_text()) == finished
    assert (sweep / "0" / "config.yaml").stat().st_mtime_ns == written  # a finished run's files are left alone
    redone = json.loads((sweep / "1" / "result.json").read_text())
    assert redone["status"] == "completed"
    rows = [json.loads(line) for line in (sweep / "1" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[0]["val_loss"] != 99.0
    assert len(list((sweep / "1" / "tb").rglob("events.*"))) == 1


def test_a_sweep_killed_mid_job_resumes_to_the_tables_of_an_uninterrupted_one(tmp_path):
    import os
    import signal
    import time

    import pandas as pd

    # tiny epochs (one step of 100 examples) so that many of them make a job long enough to be killed mid-way
    tiny = ("task.epochs=300", "task.train_size=100", "task.batch_size=100", "tensorboard=false")
    args = ("-m", "envelope@envelopes.classification=identity,step", "seed=0,1", *tiny)
    sweep = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "run_ablation.py"), *args, f"hydra.sweep.dir={sweep}"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        # kill -9 once job 1 has ended and job 2 has logged an epoch
        deadline = time.time() + 240
        while not (
            (sweep / "1" / "result.json").exists()
            and (sweep / "2" / "metrics.jsonl").exists()
            and (sweep / "2" / "metrics.jsonl").read_text().count("\n") >= 1
        ):
            assert proc.poll() is None, "the sweep ended before it could be killed"
            assert time.time() < deadline
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (sweep / "2" / "result.json").exists() and not (sweep / "report.md").exists()
    finished = {i: (sweep / str(i) / "result.json").read_bytes() for i in (0, 1)}

    resumed = run_cli(*args, f"hydra.sweep.dir={sweep}")
    assert resumed.returncode == 0, resumed.stderr
    for i in (0, 1):  # recognised by their result file and run id: not trained again
        assert (sweep / str(i) / "result.json").read_bytes() == finished[i]
    redone = [json.loads(line) for line in (sweep / "2" / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in redone] == list(range(1, 301))  # the half-written job started over

    reference = run_cli(*args, f"hydra.sweep.dir={tmp_path / 'reference'}")
    assert reference.returncode == 0, reference.stderr
    tables = [pd.read_csv(path / "configs.csv") for path in (sweep, tmp_path / "reference")]
    tables = [t[[c for c in t.columns if "wall_time" not in c]] for t in tables]
    pd.testing.assert_frame_equal(*tables)
    assert len(tables[0]) == 2 and (tables[0]["final_val_loss_n"] == 2).all()


@pytest.mark.slow  # a multi-process end-to-end check of 9-25 s: CI runs it with the slow tests
def test_joblib_launcher_caps_threads_and_deduplicates_across_processes(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")

    sweep = tmp_path / "sweep"
    # jobs 0 and 1 are the same effective config and start at the same time in two processes
    proc = run_cli(
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "envelope@envelopes.classification=identity,step",
        "envelopes.classification.quantile=0.1,0.5",
        "task.epochs=1",
        "tensorboard=false",
        f"hydra.sweep.dir={sweep}",
    )
    assert proc.returncode == 0, proc.stderr
    results = [json.loads((sweep / str(i) / "result.json").read_text()) for i in range(4)]
    assert sorted(r["status"] for r in results) == ["completed", "completed", "completed", "duplicate"]
    assert {r["status"] for r in results[:2]} == {"completed", "duplicate"}
    assert {r["threads"] for r in results if r["status"] == "completed"} == {1}  # one per process
    assert (sweep / "report.md").exists()


def test_results_cache_serves_a_second_sweep_and_follows_the_code_version(compose, tmp_path, monkeypatch):
    from runner import cache as cache_module

    cache = tmp_path / "cache"
    common = ("tensorboard=false", "task.epochs=2", f"cache_dir={cache}")
    run_job(compose(*common), tmp_path / "a" / "0", tmp_path / "a", [], reraise=True)
    first = json.loads((tmp_path / "a" / "0" / "result.json").read_text())
    assert first["status"] == "completed" and "cached_from" not in first
    entries = list(cache.glob("*/*/result.json"))
    assert len(entries) == 1 and entries[0].parent.parent.name == first["run_id"]

    run_job(compose(*common, "device=cpu"), tmp_path / "b" / "0", tmp_path / "b", ["device=cpu"], reraise=True)
    second = json.loads((tmp_path / "b" / "0" / "result.json").read_text())
    assert second["status"] == "completed" and second["cached_from"] == str(entries[0].parent)
    assert second["overrides"] == ["device=cpu"] and second["final"] == first["final"]
    assert (tmp_path / "b" / "0" / "metrics.jsonl").read_text() == (tmp_path / "a" / "0" / "metrics.jsonl").read_text()

    # another seed is another run; another code version is another entry
    run_job(compose(*common, "seed=1"), tmp_path / "c" / "0", tmp_path / "c", [], reraise=True)
    assert "cached_from" not in json.loads((tmp_path / "c" / "0" / "result.json").read_text())
    monkeypatch.setattr(cache_module, "code_version", lambda: "edited")
    run_job(compose(*common), tmp_path / "d" / "0", tmp_path / "d", [], reraise=True)
    assert "cached_from" not in json.loads((tmp_path / "d" / "0" / "result.json").read_text())
    assert (cache / first["run_id"] / "edited" / "result.json").exists()


def test_the_code_version_covers_the_kernels_cpp_sources():
    # the fused kernels' C++ changes what a run computes as much as its Python does
    from runner.cache import ROOT, code_files

    files = {p.relative_to(ROOT).as_posix() for p in code_files()}
    assert {"tasks/fused_mlp.cpp", "tasks/fused_mlp.h", "tasks/acrobot_rollout.cpp", "tasks/ppo.py"} <= files
    assert "run_ablation.py" in files and not any(name.endswith((".md", ".yaml")) for name in files)


@pytest.mark.slow  # a multi-process end-to-end check of 9-25 s: CI runs it with the slow tests
def test_tensorboard_hparams_show_every_swept_parameter_of_every_run(tmp_path):
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
    from tensorboard.plugins.hparams import metadata

    sweep = tmp_path / "sweep"
    # the first job is identity, which has no quantile or step size: they must still be columns
    proc = run_cli(
        "-m",
        "envelope@envelopes.classification=identity,sigmoid",
        "envelopes.classification.quantile=0.1,0.5",
        "envelopes.classification.step_size=0.1,1.0",
        "task.epochs=1",
        f"hydra.sweep.dir={sweep}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"tensorboard --logdir {sweep}" in proc.stdout
    multiplexer = EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(sweep))
    multiplexer.Reload()
    content = multiplexer.PluginRunToTagToContent(metadata.PLUGIN_NAME)
    experiments = {
        run: tags[metadata.EXPERIMENT_TAG] for run, tags in content.items() if metadata.EXPERIMENT_TAG in tags
    }
    assert list(experiments) == ["tb_hparams"]  # one experiment summary, the sweep's
    experiment = metadata.parse_experiment_plugin_data(experiments["tb_hparams"])
    infos = {info.name: info for info in experiment.hparam_infos}
    assert {"envelopes.classification.shape", "envelopes.classification.quantile"} <= set(infos)
    assert "envelopes.classification.step_size" in infos and "task.epochs" not in infos  # swept ones only
    assert [v.number_value for v in infos["envelopes.classification.quantile"].domain_discrete.values] == [0.1, 0.5]
    assert {m.name.tag for m in experiment.metric_infos} >= {"hparams/val_loss", "hparams/val_accuracy"}
    sessions = {
        run: metadata.parse_session_start_info_plugin_data(tags[metadata.SESSION_START_INFO_TAG])
        for run, tags in content.items()
        if metadata.SESSION_START_INFO_TAG in tags
    }
    assert len(sessions) == 5  # identity once (its quantile and step size are ignored) + 4 sigmoid runs
    shapes = sorted(s.hparams["envelopes.classification.shape"].string_value for s in sessions.values())
    assert shapes == ["identity"] + ["sigmoid"] * 4
    sigmoid = [s for s in sessions.values() if "envelopes.classification.quantile" in s.hparams]
    assert sorted(
        (
            s.hparams["envelopes.classification.quantile"].number_value,
            s.hparams["envelopes.classification.step_size"].number_value,
        )
        for s in sigmoid
    ) == [(0.1, 0.1), (0.1, 1.0), (0.5, 0.1), (0.5, 1.0)]


def test_a_single_run_says_where_its_files_went(tmp_path):
    proc = run_cli("task.epochs=1", "tensorboard=false", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert f"Run completed: files in {tmp_path} (config.yaml, metrics.jsonl, result.json, tb/)" in proc.stdout


def test_help_names_the_app_gives_examples_and_hides_the_schema_groups():
    proc = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert text.startswith("LAE Lab: ablations of Loss Attenuation Envelopes")
    assert "python run_ablation.py -m experiment=quick_digits" in text and "--paper-table 5" in text
    groups = text.split("== Config groups (group=option) ==")[1].split("==")[0]
    assert "task: acrobot, california_housing" in groups and "envelope@envelopes.<loss>: focal" in groups
    assert "schema" not in groups  # the internal schema groups are not offered
    assert 'eval "$(python run_ablation.py -sc install=bash)"' in text


# the batched launcher's Ctrl-C runs with the slow tests (CI runs them too); the basic one by default
@pytest.mark.parametrize("launcher", ["basic", pytest.param("batched", marks=pytest.mark.slow)])
def test_ctrl_c_mid_sweep_says_so_in_one_line_releases_claims_and_exits_130(tmp_path, launcher):
    import signal
    import time

    from runner.claims import live_claims

    sweep = tmp_path / "sweep"
    args = [
        sys.executable,
        str(ROOT / "run_ablation.py"),
        "-m",
        "envelope@envelopes.classification=identity,step",
        "task.epochs=1200",
        "task.train_size=100",
        "task.batch_size=100",
        "tensorboard=false",
        f"hydra.sweep.dir={sweep}",
        *(["hydra/launcher=batched"] if launcher == "batched" else []),
    ]

    def as_in_a_terminal():  # SIGINT handled by default and not blocked, whatever this process inherited
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    # a process started in the background (nohup, `cmd &` without job control) ignores SIGINT, and its
    # children inherit that: in the full suite run that way the sweep ignored the signal and finished
    proc = subprocess.Popen(
        args,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=as_in_a_terminal,
    )
    deadline = time.time() + 120
    while not list(sweep.glob("*/metrics.jsonl")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)  # training has started
    # a run of 1,200 epochs takes seconds even on a loaded machine: the signal lands in training
    assert proc.poll() is None, "the sweep ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out[-3000:], err[-3000:])
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert f"Interrupted: the sweep in {sweep}; runs in training were left unfinished" in err
    assert "The same command resumes it." in err
    assert live_claims(sweep) == [] and not list(sweep.glob("*/result.json"))
    resumed = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert len(list(sweep.glob("*/result.json"))) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["task.val_size=100000"],
            "Error: task.train_size/val_size/test_size: train_size + val_size = 101200 exceeds the 1500 examples "
            "left after test_size = 297 (pool of 1797)",
        ),
        (
            ["cache_dir={file}/cache"],
            "Error: cannot write the results cache {file}/cache: Not a directory (set cache_dir",
        ),
        (
            ["-m", "cache_dir={file}/cache"],
            "Error: cannot write the results cache {file}/cache: Not a directory (set cache_dir",
        ),
        (
            ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=0"],
            "Error: hydra.launcher.n_jobs must be a non-zero integer (N: N jobs at once; -1: one per core, -2: all "
            "cores but one), got 0",
        ),
    ],
)
def test_bad_input_is_one_line_before_any_training_and_leaves_no_run(tmp_path, args, message):
    (tmp_path / "file").write_text("")
    places = {"file": tmp_path / "file"}
    proc = run_cli(
        *(a.format(**places) for a in args),
        f"hydra.run.dir={tmp_path / 'run'}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().startswith(message.format(**places)) and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob("sweep/*/metrics.jsonl"))


def test_a_run_whose_loss_grows_past_the_divergence_factor_fails_as_diverged(tmp_path):
    proc = run_cli("-m", "task.lr=1e9,0.001", "task.epochs=2", "tensorboard=false", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 1
    diverged, fine = (json.loads((tmp_path / str(job) / "result.json").read_text()) for job in (0, 1))
    assert diverged["status"] == "failed" and fine["status"] == "completed"
    assert "diverged at epoch 1: val/loss is " in diverged["error"]
    assert "more than 1000 times its value 2.3" in diverged["error"] and "(divergence_factor)" in diverged["error"]
    off = run_cli("task.lr=1e9", "task.epochs=1", "divergence_factor=null", f"hydra.run.dir={tmp_path / 'off'}")
    assert off.returncode == 0 and json.loads((tmp_path / "off" / "result.json").read_text())["status"] == "completed"


def test_a_confirmation_plan_runs_as_printed_and_reports_the_selected_rows_on_fresh_seeds(tmp_path):
    import shlex

    sweep = tmp_path / "selection"
    tiny = ("task.epochs=2", "task.train_size=200", "tensorboard=false")
    selection = run_cli(
        "-m",
        "envelope@envelopes.classification=identity,step",
        "envelopes.classification.quantile=0.1,0.5",
        "seed=0,1",
        *tiny,
        "hydra/launcher=batched",
        f"hydra.sweep.dir={sweep}",
    )
    assert selection.returncode == 0, selection.stderr[-2000:]
    plan = subprocess.run(
        [sys.executable, "-m", "analysis", str(sweep), "--confirm-seeds", "2"], capture_output=True, text=True, cwd=ROOT
    )
    assert plan.returncode == 0, plan.stderr
    command = (sweep / "confirm" / "run.sh").read_text().splitlines()[-1]
    assert command in plan.stdout and command.startswith("python run_ablation.py -m hydra.sweeper.jobs=")
    confirmed = run_cli(*shlex.split(command)[2:])
    assert confirmed.returncode == 0, confirmed.stderr[-2000:]
    runs = [json.loads(p.read_text()) for p in (sweep / "confirm" / "sweep").glob("*/result.json")]
    assert sorted(r["seed"] for r in runs) == [1000, 1000, 1001, 1001] and {r["status"] for r in runs} == {"completed"}
    text = (sweep / "confirm" / "sweep" / "confirmation.md").read_text()
    assert "| identity | classification: identity | best of 1 by final_val_loss |" in text
    assert "| step | classification: step q=" in text and "best of 2 by final_val_loss" in text
    assert "paired by seed (2)" in text


def test_tracking_mlflow_exports_each_run_of_a_sweep_with_params_metrics_and_artifacts(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (tmp_path / "mlruns").mkdir()
    proc = run_cli(
        "-m",
        "envelope@envelopes.classification=identity,step",
        "seed=0,1",
        "task.epochs=3",
        "tensorboard=false",
        "tracking=mlflow",
        f"tracking_uri={store}",
        "hydra/launcher=batched",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("sweep")  # a sweep is an experiment, named after its directory
    assert experiment.artifact_location == str(tmp_path / "mlruns" / "artifacts" / "sweep")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}  # batched runs are runs of their own
    results = {json.loads(p.read_text())["run_id"]: p.parent for p in (tmp_path / "sweep").glob("*/result.json")}
    for run in runs:
        run_dir = results[run.data.tags["lae_lab.run_id"]]
        result = json.loads((run_dir / "result.json").read_text())
        assert run.data.params["seed"] == str(result["seed"])
        assert (
            run.data.params["envelopes.classification.shape"]
            == result["effective"]["envelopes"]["classification"]["shape"]
        )
        history = client.get_metric_history(run.info.run_id, "val_loss")
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2, 3]
        assert sorted(m.value for m in history if m.step == 3) == [result["final"]["val_loss"]]
        assert {"config.yaml", "metrics.jsonl", "result.json"} <= {
            a.path for a in client.list_artifacts(run.info.run_id)
        }


def test_tracking_names_its_key_and_how_to_install(compose):
    from runner.config import ConfigError, validate

    with pytest.raises(ConfigError, match=r"tracking must be one of \['mlflow'\] or null, got 'wandb'"):
        validate(compose("tracking=wandb"))


def test_progress_goes_to_the_log_when_stderr_is_not_a_terminal(tmp_path, caplog, monkeypatch):
    import logging

    from runner import recorder as module

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    monkeypatch.setattr(module, "PROGRESS_LOG_INTERVAL_S", 0.0)  # a line every step, not every minute
    recorder = module.Recorder(tmp_path / "7", ("val_loss", "min"), tensorboard=False)
    with caplog.at_level(logging.INFO, logger="runner.recorder"):
        bar = recorder.progress(range(5), total=5, unit="update")
        for step in bar:
            bar.set_postfix({"loss": f"{step / 10:.4g}"})  # as the tasks call it
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "7: 1/5 updates (20%), 0m00s elapsed, about 0m00s left, loss 0", lines
    assert lines[1].startswith("7: 2/5 updates (40%)") and lines[1].endswith("loss 0.1")
    assert len(lines) == 4  # none after the last step
    caplog.clear()
    quiet = module.Recorder(tmp_path / "8", ("val_loss", "min"), tensorboard=False, progress=False)
    with caplog.at_level(logging.INFO, logger="runner.recorder"):
        list(quiet.progress(range(5), total=5))
    assert not caplog.records
