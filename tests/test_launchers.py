"""Cluster launchers: each runs the jobs elsewhere, and the end-of-sweep analysis finds their results."""

import json
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from tests.test_cli import run_cli

SWEEP = ("envelope@envelopes.classification=identity,step", "task.epochs=2", "tensorboard=false")


def assert_sweep_analysed(sweep: Path, threads: int) -> None:
    results = [json.loads((sweep / str(i) / "result.json").read_text()) for i in range(2)]
    assert [r["status"] for r in results] == ["completed", "completed"]
    assert all(r["threads"] == threads for r in results)
    jobs = (sweep / "jobs.csv").read_text()
    assert (sweep / "report.md").exists() and jobs.count("completed") == 2


@pytest.mark.slow  # a job per process through submitit, about 13 s: CI runs it with the slow tests
def test_submitit_launcher_runs_jobs_in_their_own_processes(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    # submitit's local executor: what the Slurm launcher does, with processes on this machine
    proc = run_cli(
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.timeout_min=5",
        *SWEEP,
        f"hydra.sweep.dir={sweep}",
    )
    assert proc.returncode == 0, proc.stderr
    assert_sweep_analysed(sweep, threads=1)
    assert list((sweep / ".submitit").glob("*/*_result.pkl"))  # run by submitit, not in this process


def test_slurm_preset_composes_for_submitit(compose):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = compose("hydra/launcher=slurm", "hydra.launcher.partition=gpu", return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.cpus_per_task == 2 and launcher.max_num_timeout == 2


@pytest.mark.ray
def test_ray_launcher_keeps_its_files_and_token_in_the_output_directory(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_ray_launcher")
    sweep = tmp_path / "sweep"
    # Ray's socket paths must stay under 107 characters: a short directory, removed afterwards
    ray_dir = Path(tempfile.mkdtemp(prefix="lae_ray_", dir="/tmp"))
    try:
        proc = run_cli(
            "-m",
            "hydra/launcher=ray_local",
            f"hydra.launcher.ray.init._temp_dir={ray_dir}",
            *SWEEP,
            f"hydra.sweep.dir={sweep}",
        )
        assert proc.returncode == 0, proc.stderr
        assert_sweep_analysed(sweep, threads=1)
        token = ray_dir / "auth_token"
        assert len(token.read_text()) == 64 and stat.S_IMODE(token.stat().st_mode) == 0o600
        assert list(ray_dir.glob("session_*/logs"))
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)


@pytest.mark.optuna
def test_optuna_preset_tunes_an_envelope_and_reports_the_best_trial(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    import yaml

    sweep = tmp_path / "sweep"
    proc = run_cli(
        "-m",
        "experiment=optuna_digits_quick",
        "hydra.sweeper.n_trials=3",
        "task.epochs=2",
        "tensorboard=false",
        f"hydra.sweep.dir={sweep}",
    )
    assert proc.returncode == 0, proc.stderr
    results = [json.loads((sweep / str(i) / "result.json").read_text()) for i in range(3)]
    assert [r["status"] for r in results] == ["completed"] * 3
    envelopes = [r["effective"]["envelopes"]["classification"] for r in results]
    assert len({e["quantile"] for e in envelopes}) == 3 and all(e["shape"] == "sigmoid" for e in envelopes)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(min(r["objective"]["value"] for r in results))
    assert (sweep / "report.md").exists() and (sweep / "optuna.db").exists()
