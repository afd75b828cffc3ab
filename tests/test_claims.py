"""Run identity and ownership: the data is part of a run's id; a claim belongs to a live process."""

import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from runner.claims import claim, live_claims, release
from runner.config import config_id, effective_config, validate
from runner.job import run_job
from tasks.datasets import DataNotFoundError
from tests.conftest import ROOT, SHARED_DATA
from tests.test_regression import needs_california

HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from runner.claims import claim
    print(claim(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])).status, flush=True)
    time.sleep(60)
""")


def hold_claim(sweep: Path, key: str, run_dir: Path) -> subprocess.Popen:
    """Another process that claims ``key`` for ``run_dir`` and keeps it while it lives."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(sweep), key, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "mine"
    return proc


def test_a_claim_held_by_a_live_process_is_busy_or_a_duplicate_and_is_redone_once_it_dies(tmp_path):
    sweep, mine, other = tmp_path / "sweep", tmp_path / "sweep" / "0", tmp_path / "sweep" / "1"
    holder = hold_claim(sweep, "run", mine)
    try:
        assert claim(sweep, "run", mine).status == "busy"  # a concurrent sweep is training this very directory
        taken = claim(sweep, "run", other)
        assert (taken.status, taken.owner) == ("duplicate", mine)
        assert live_claims(sweep) == [mine]
    finally:
        holder.kill()
        holder.wait()
    # its owner died without a result: the claim is taken over, and is this process's until released
    assert claim(sweep, "run", other).status == "mine"
    assert live_claims(sweep) == []  # this process's own claims are not waited for
    assert claim(sweep, "run", mine).status == "duplicate"
    release(other)
    assert claim(sweep, "run", mine).status == "mine"  # the new owner ended without a result too
    release(mine)


def test_a_failed_run_never_makes_another_a_duplicate(compose, tmp_path):
    sweep = tmp_path / "sweep"
    args = ("task.epochs=1", "tensorboard=false")
    run_job(compose(*args, "task.lr=1e30"), sweep / "0", sweep, [], reraise=False)
    assert json.loads((sweep / "0" / "result.json").read_text())["status"] == "failed"
    # same run id (a failure does not change it), so the second job finds the first one's claim
    cfg = compose(*args, "task.lr=1e30")
    run_job(cfg, sweep / "1", sweep, [], reraise=False)
    second = json.loads((sweep / "1" / "result.json").read_text())
    assert second["status"] == "failed" and "duplicate_of" not in second  # trained, not skipped


@pytest.mark.slow  # a multi-process end-to-end check of 9-25 s: CI runs it with the slow tests
def test_two_identical_sweeps_into_one_directory_train_each_run_once(tmp_path):
    sweep = tmp_path / "sweep"
    args = [
        sys.executable,
        str(ROOT / "run_ablation.py"),
        "-m",
        "envelope@envelopes.classification=identity,step",
        "seed=0,1,2",
        "task.epochs=8",
        "tensorboard=false",
        f"hydra.sweep.dir={sweep}",
    ]
    procs = [
        subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    trained = sum(out.count(" completed: val_loss") for out in outputs)
    assert trained == 6, outputs  # six runs, each trained by one of the two processes
    for job in range(6):
        result = json.loads((sweep / str(job) / "result.json").read_text())
        assert result["status"] == "completed"
        rows = (sweep / str(job) / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(r)["epoch"] for r in rows] == list(range(1, 9))  # one writer: no repeated rows
    # each report counts all six, the second to end having waited for the first one's runs
    for out in outputs:
        assert "6 runs: 6 completed" in out


@needs_california
def test_the_run_id_follows_the_data_read_not_where_it_lies(compose, tmp_path):
    csv = SHARED_DATA / "california_housing" / "cal_housing.csv"
    for name in ("copy", "edited"):
        (tmp_path / name / "california_housing").mkdir(parents=True)
        shutil.copy(csv, tmp_path / name / "california_housing" / "cal_housing.csv")
    edited = tmp_path / "edited" / "california_housing" / "cal_housing.csv"
    lines = edited.read_text().splitlines(keepends=True)
    lines[1] = lines[1].replace(lines[1].split(",")[0], "-122.0", 1)
    edited.write_text("".join(lines))

    def run_id(root):
        cfg = compose("task=california_housing", f"data_root={root}")
        return config_id(effective_config(cfg, validate(cfg)), with_seed=True)

    assert run_id(SHARED_DATA) == run_id(tmp_path / "copy")  # the same bytes elsewhere: the same run
    assert run_id(SHARED_DATA) != run_id(tmp_path / "edited")  # other bytes: another run
    with pytest.raises(DataNotFoundError, match=str(tmp_path / "missing")):
        run_id(tmp_path / "missing")


@needs_california
def test_a_sweep_over_missing_and_present_data_is_refused_before_any_job(tmp_path):
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "run_ablation.py"),
            "-m",
            "task=california_housing",
            f"data_root={tmp_path / 'bad'},{SHARED_DATA}",
            "seed=0,1",
            "task.epochs=1",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "2 of 4 jobs have an invalid config or unusable data; nothing was run" in proc.stderr
    assert proc.stderr.count("not found") == 1  # one data source, listed once for its two jobs
    assert "data of 2 jobs" in proc.stderr
    assert not any(p.is_dir() for p in sweep.iterdir() if p.name != ".claims") if sweep.exists() else True


def test_a_claim_of_a_process_that_ended_long_ago_is_taken_over(tmp_path):
    # the claim files of an older layout (the run directory alone, no lock): nobody holds them
    sweep, run_dir = tmp_path / "sweep", tmp_path / "sweep" / "3"
    (sweep / ".claims").mkdir(parents=True)
    (sweep / ".claims" / "run").write_text(str(tmp_path / "sweep" / "2"))
    start = time.time()
    assert claim(sweep, "run", run_dir).status == "mine"
    assert time.time() - start < 1
    release(run_dir)


def test_releasing_a_run_gives_up_its_claims_only(tmp_path):
    from runner import claims

    sweep, runs = tmp_path / "sweep", [tmp_path / "sweep" / str(i) for i in range(3)]
    for number, run in enumerate(runs):
        assert claim(sweep, f"id{number}", run).status == "mine"
    assert claim(sweep, "id0b", runs[0]).status == "mine"  # a second claim of the same directory
    release(tmp_path / "sweep" / "x" / ".." / "0")  # the same directory, spelt otherwise
    assert sorted(Path(p).name for p in claims._held) == ["id1", "id2"]
    release(runs[1])
    release(runs[2])
    assert not claims._held and not claims._by_owner
