"""Every benchmark script runs against today's code (each on its tiny ``--smoke`` setting)."""

import subprocess
import sys

import pytest

from tests.conftest import FASHION_DIR, ROOT, SHARED_DATA

SCRIPTS = {
    "analysis_load.py": ([], "8 jobs: load_jobs"),
    "classification_run.py": ([], "job wall time median"),
    "envelope_overhead.py": ([], "2. envelope work in isolation"),
    "joblib_sweep.py": ([], "speed-up:"),
    "ppo_grid.py": ([], "batched (1 worker process(es), EnvPool)"),
    "ppo_parts.py": (["--compile"], "task minibatch step with envelopes, compiled"),
    "ppo_sps.py": ([], "LunarLander-v3"),
    "rollout_overlap.py": (["--processes", "2", "--modes", "sync,overlap"], "2 processes at once, overlap:"),
    "seed_batch.py": (["--task", "regression", "--data-root", str(SHARED_DATA)], "speed-up:"),
    "threads.py": ([], "x threads=1"),
}
NEEDS = {
    "ppo_grid.py": None,
    "classification_run.py": FASHION_DIR / "train-images-idx3-ubyte.gz",
    "seed_batch.py": SHARED_DATA / "california_housing" / "cal_housing.csv",
}


def smoke(script, *args, timeout=600):
    """``bench/<script> --smoke`` with ``args``, run from the checkout's root: the finished process."""
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--smoke", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_every_script_in_bench_is_covered():
    assert sorted(p.name for p in (ROOT / "bench").glob("*.py")) == sorted(SCRIPTS)


@pytest.mark.slow  # about 90 s for all of them: CI runs them with the slow tests
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_benchmark_script_runs(script):
    if script in ("ppo_grid.py", "ppo_parts.py", "rollout_overlap.py"):
        pytest.importorskip("envpool")
    elif script in NEEDS and not NEEDS[script].exists():
        pytest.skip(f"needs {NEEDS[script]}")
    args, expected = SCRIPTS[script]
    proc = smoke(script, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert expected in proc.stdout, proc.stdout


@pytest.mark.slow  # two smoke slices of about 10 s each
def test_ppo_grid_against_a_peer_runs_both_in_turn_on_the_same_work_and_prints_the_ratio(tmp_path):
    pytest.importorskip("envpool")
    # a stand-in for the other program: it records its arguments and reports a fixed rate
    (tmp_path / "jax_workers.py").write_text(
        "import json, pathlib, sys\n"
        "log = pathlib.Path(__file__).with_name('calls.txt')\n"
        "log.write_text(log.read_text() + ' '.join(sys.argv[1:]) + '\\n' if log.exists() else ' '.join(sys.argv[1:]) + '\\n')\n"
        "print('compiling'); print(json.dumps({'median': 1000.0}))\n"
    )
    proc = smoke(
        "ppo_grid.py", "--workers", "2", "--rounds", "2", "--peer", sys.executable, "--peer-dir", str(tmp_path)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert calls == ["--agents 242 --workers 2 -- --chunk 1 --calls 20"] * 2  # 121 agents per process, as ours
    rounds = [line for line in proc.stdout.splitlines() if line.startswith("round ")]
    assert len(rounds) == 2 and all("peer 1,000 env steps/s, LAE Lab " in line for line in rounds)
    ours = [float(line.split("LAE Lab ")[1].split(" ")[0].replace(",", "")) for line in rounds]
    ratio = float(proc.stdout.split("LAE Lab / peer = ")[1].split("x")[0])
    assert ratio == pytest.approx(sorted(ours)[0] / 1000 + (sorted(ours)[1] - sorted(ours)[0]) / 2000, abs=0.01)


@pytest.mark.slow  # one compilation of the smoke slice's update, 20-60 s
def test_ppo_grid_compares_compiled_with_eager_and_reports_the_compile_time():
    pytest.importorskip("envpool")
    proc = smoke("ppo_grid.py", "--compare-compile", "--rounds", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    eager, compiled = [line for line in proc.stdout.splitlines() if line.startswith("acrobot round 1: ")]
    assert " eager " in eager and "compile" not in eager.split("eager", 1)[1]
    assert " compiled " in compiled and float(compiled.rsplit(", compile ", 1)[1].split(" s")[0]) > 0
    assert "compiled / eager = " in proc.stdout


def test_ppo_grid_passes_its_overrides_to_the_slice():
    # an override the slice must refuse: the sweep's own check names it, so it reached the command
    pytest.importorskip("envpool")
    proc = smoke("ppo_grid.py", "--override", "task.update_epochs=0", timeout=300)
    assert proc.returncode != 0
    assert "task.update_epochs must be a positive integer, got 0" in proc.stderr + proc.stdout


@pytest.mark.slow  # one smoke slice, its environment step compiled
def test_ppo_grid_names_the_back_end_an_override_chose():
    pytest.importorskip("envpool")  # the slice alone runs on gymnasium, the batched one on the chosen back end
    proc = smoke("ppo_grid.py", "--override", "task.backend=torch")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "batched (1 worker process(es), torch Acrobot): " in proc.stdout, proc.stdout


@pytest.mark.slow  # a smoke run of about 10 s
def test_ppo_parts_times_the_fused_kernels_and_the_task_step_on_them():
    pytest.importorskip("envpool")
    proc = smoke("ppo_parts.py", "--kernels", "fused")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 torch thread, fused kernels" in proc.stdout
    assert "task minibatch step with envelopes, eager" in proc.stdout and "compiled" not in proc.stdout
