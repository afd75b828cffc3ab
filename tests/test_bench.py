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
    "ppo_parts.py": ([], "sum of the floors and the EnvPool step"),
    "ppo_sps.py": ([], "LunarLander-v3"),
    "seed_batch.py": (["--task", "regression", "--data-root", str(SHARED_DATA)], "speed-up:"),
    "threads.py": ([], "x threads=1"),
}
NEEDS = {
    "ppo_grid.py": None,
    "classification_run.py": FASHION_DIR / "train-images-idx3-ubyte.gz",
    "seed_batch.py": SHARED_DATA / "california_housing" / "cal_housing.csv",
}


def test_every_script_in_bench_is_covered():
    assert sorted(p.name for p in (ROOT / "bench").glob("*.py")) == sorted(SCRIPTS)


@pytest.mark.slow  # about 90 s for all of them: CI runs them with the slow tests
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_benchmark_script_runs(script):
    if script in ("ppo_grid.py", "ppo_parts.py"):
        pytest.importorskip("envpool")
    elif script in NEEDS and not NEEDS[script].exists():
        pytest.skip(f"needs {NEEDS[script]}")
    args, expected = SCRIPTS[script]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--smoke", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert expected in proc.stdout, proc.stdout
