"""The batching launcher: a sweep's runs trained as groups, every run still a run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from analysis.load import load_jobs
from tests.conftest import ACROBOT_ENVPOOL_SWEEP, ROOT

MIXED = (
    "-m",
    "task=digits",
    "envelope@envelopes.classification=identity,step,sigmoid",
    "envelopes.classification.quantile=0.1,0.5",
    "seed=0,1",
    "task.epochs=2",
    "tensorboard=false",
)


def sweep(tmp_path: Path, name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "run_ablation.py"), *args, f"hydra.sweep.dir={tmp_path / name}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def results(directory: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(directory.glob("*/result.json"))}


def assert_same_runs(ours_dir: Path, theirs_dir: Path) -> None:
    """The twelve jobs of MIXED in both sweeps: the same directories, run ids, statuses and final val_loss."""
    ours, theirs = results(ours_dir), results(theirs_dir)
    assert sorted(ours) == sorted(theirs) and len(ours) == 12
    for job, result in ours.items():
        assert (result["run_id"], result["status"]) == (theirs[job]["run_id"], theirs[job]["status"])
        if result["status"] == "completed":
            assert result["final"]["val_loss"] == theirs[job]["final"]["val_loss"], job


def test_a_mixed_sweep_gives_the_runs_of_the_basic_launcher(tmp_path):
    basic, batched = sweep(tmp_path, "basic", *MIXED), sweep(tmp_path, "batched", *MIXED, "hydra/launcher=batched")
    assert basic.returncode == 0 and batched.returncode == 0, batched.stderr[-2000:]
    assert "Launching 12 jobs in 1 batched groups (at most 256 runs to train each)" in batched.stderr + batched.stdout
    ours, theirs = results(tmp_path / "batched"), results(tmp_path / "basic")
    assert sorted(ours) == sorted(theirs) and len(ours) == 12  # the same directories
    for job in ours:  # the same files: Hydra's .hydra/ and run_ablation.log too
        files = [
            sorted(p.relative_to(d / job).as_posix() for p in (d / job).rglob("*") if p.is_file())
            for d in (tmp_path / "batched", tmp_path / "basic")
        ]
        assert files[0] == files[1], job
    assert "seed 0 completed" in (tmp_path / "batched" / "0" / "run_ablation.log").read_text()
    completed = [r for r in ours.values() if r["status"] == "completed"]
    assert {r["group_size"] for r in completed} == {len(completed)}  # one group; alone, each run is its own
    assert {r["group_size"] for r in theirs.values() if r["status"] == "completed"} == {1}
    for job, result in ours.items():
        other = theirs[job]
        assert (result["run_id"], result["status"], result["overrides"]) == (
            other["run_id"],
            other["status"],
            other["overrides"],
        )
        assert (tmp_path / "batched" / job / ".hydra" / "overrides.yaml").read_text() == (
            tmp_path / "basic" / job / ".hydra" / "overrides.yaml"
        ).read_text()
        if result["status"] == "completed":
            # the batch's matrix products round differently from a model alone
            for key in ("val_loss", "val_accuracy", "train_raw_loss_mean"):
                assert result["final"][key] == pytest.approx(other["final"][key], rel=1e-4), (job, key)
            assert result["batch"]["seeds"] == [0, 1] * 5
    assert load_jobs(tmp_path / "batched")["status"].value_counts().to_dict() == {"completed": 10, "duplicate": 2}


def test_a_groups_log_is_written_once_and_is_in_every_jobs_directory(tmp_path):
    import logging

    from runner.job import group_logs

    dirs = [tmp_path / str(job) for job in range(4)]
    dirs[2].mkdir()
    (dirs[2] / "run_ablation.log").write_text("an earlier attempt\n")  # a resumed job appends to its own
    handlers = group_logs(dirs)
    try:
        logging.getLogger("tests.group").info("seed 0 completed")
    finally:
        for handler in handlers:
            handler.close()
    assert len(handlers) == 2 and not set(handlers) & set(logging.getLogger().handlers)
    texts = [(d / "run_ablation.log").read_text() for d in dirs]
    assert all(text.count("seed 0 completed") == 1 for text in texts), texts
    assert texts[2].startswith("an earlier attempt\n") and texts[0] == texts[1] == texts[3]
    assert (dirs[0] / "run_ablation.log").stat().st_nlink == 3  # one file for the three new jobs
    handlers = group_logs(dirs)  # the group again (a resumed sweep): each file gets each line once
    try:
        logging.getLogger("tests.group").info("seed 1 completed")
    finally:
        for handler in handlers:
            handler.close()
    assert len(handlers) == 2
    assert all((d / "run_ablation.log").read_text().count("seed 1 completed") == 1 for d in dirs)


def test_max_batch_splits_a_group_counting_runs_to_train(tmp_path):
    # 12 jobs, 10 runs to train (identity's two quantiles are one configuration): 5, 5
    proc = sweep(tmp_path, "split", *MIXED, "hydra/launcher=batched", "hydra.launcher.max_batch=5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Launching 12 jobs in 2 batched groups (at most 5 runs to train each)" in proc.stderr + proc.stdout
    assert len(results(tmp_path / "split")) == 12


@pytest.mark.slow  # two sweeps of submitit jobs, about 25 s: CI runs it with the slow tests
def test_groups_run_as_submitit_jobs_and_match_the_groups_run_here(tmp_path):
    # executor=local: each group is one submitit job (a process of its own), as executor=slurm makes it one
    # Slurm job; the runs are those of the groups trained in the launching process
    here = sweep(tmp_path, "here", *MIXED, "hydra/launcher=batched", "hydra.launcher.max_batch=5")
    local = sweep(
        tmp_path,
        "local",
        *MIXED,
        "hydra/launcher=batched",
        "hydra.launcher.max_batch=5",
        "hydra.launcher.executor=local",
        "+hydra.launcher.submitit.timeout_min=10",
    )
    assert here.returncode == 0 and local.returncode == 0, local.stderr[-2000:]
    log = local.stderr + local.stdout
    assert "group 1 submitted: local job" in log and "group 2 submitted: local job" in log
    assert len(list((tmp_path / "local" / ".submitit").glob("*/*_log.out"))) == 2  # one job per group
    assert_same_runs(tmp_path / "local", tmp_path / "here")
    bad = sweep(tmp_path, "bad", *MIXED, "hydra/launcher=batched", "hydra.launcher.executor=pbs")
    assert bad.returncode != 0 and "hydra.launcher.executor must be one of ['here', 'slurm', 'local'], got 'pbs'" in (
        bad.stderr
    )


@pytest.mark.slow  # a multi-process end-to-end check of 9-25 s: CI runs it with the slow tests
def test_worker_processes_train_groups_at_once_and_match_the_groups_run_in_one_process(tmp_path):
    # workers=2: three groups (4, 4 and 2 runs) train two at a time in two spawned processes of one torch thread
    # each, the third in whichever process is free first; every run's id, status and final metrics are those of the
    # groups trained one after another
    here = sweep(tmp_path, "here", *MIXED, "hydra/launcher=batched", "hydra.launcher.max_batch=4")
    workers = sweep(
        tmp_path, "workers", *MIXED, "hydra/launcher=batched", "hydra.launcher.max_batch=4", "hydra.launcher.workers=2"
    )
    assert here.returncode == 0 and workers.returncode == 0, workers.stderr[-2000:]
    log = workers.stderr + workers.stdout
    assert "2 worker processes" in log and "Launching 12 jobs in 3 batched groups" in log
    assert_same_runs(tmp_path / "workers", tmp_path / "here")
    # a claim names the process that trained its run: two processes trained the three groups
    trainers = {path.read_text().splitlines()[1] for path in (tmp_path / "workers" / ".claims").glob("[!.]*")}
    assert len(trainers) == 2, trainers
    bad = sweep(
        tmp_path, "bad", *MIXED, "hydra/launcher=batched", "hydra.launcher.workers=2", "hydra.launcher.executor=local"
    )
    assert (
        bad.returncode != 0 and "with executor=local each group is a job of its own: leave workers at 1" in bad.stderr
    )


def test_a_run_that_fails_inside_a_group_leaves_the_others_completed(compose, tmp_path, monkeypatch):
    import tasks.common as common
    from runner.job import Member, run_members

    calls: dict[str, int] = {}
    real = common.divergence

    def second_run_diverges(metrics, step):  # the loop checks runs in order: the second one fails at epoch 1
        calls[step] = calls.get(step, 0) + 1
        return "diverged at epoch 1: injected" if (step, calls[step]) == ("epoch 1", 2) else real(metrics, step)

    monkeypatch.setattr(common, "divergence", second_run_diverges)
    members = [
        Member(
            compose("task.epochs=2", "tensorboard=false", f"seed={seed}", *extra),
            tmp_path / str(i),
            [f"seed={seed}", *extra],
            write_hydra_files=True,
        )
        for i, (seed, extra) in enumerate(
            [
                (0, []),
                (1, ["envelope@envelopes.classification=step"]),
                (2, ["envelope@envelopes.classification=sigmoid"]),
            ]
        )
    ]
    values = run_members(members, tmp_path, reraise=False)
    statuses = [json.loads((tmp_path / str(i) / "result.json").read_text())["status"] for i in range(3)]
    assert statuses == ["completed", "failed", "completed"]
    failed = json.loads((tmp_path / "1" / "result.json").read_text())
    assert failed["error"] == "DivergedError: diverged at epoch 1: injected"
    assert values[0] == values[0] and values[1] != values[1] and values[2] == values[2]  # NaN only for the failed job


@pytest.mark.slow  # a multi-process end-to-end check of 9-25 s: CI runs it with the slow tests
def test_an_interrupted_batched_sweep_resumes(tmp_path):
    args = (*MIXED, "hydra/launcher=batched")
    assert sweep(tmp_path, "s", *args).returncode == 0
    before = results(tmp_path / "s")
    # jobs 4 and 9 were "interrupted": no result, a partial metrics file
    for job in ("4", "9"):
        (tmp_path / "s" / job / "result.json").unlink()
        (tmp_path / "s" / job / "metrics.jsonl").write_text('{"epoch": 1, "val_loss": 99.0}\n')
    kept = (tmp_path / "s" / "0" / "metrics.jsonl").stat().st_mtime_ns
    proc = sweep(tmp_path, "s", *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = results(tmp_path / "s")
    assert (tmp_path / "s" / "0" / "metrics.jsonl").stat().st_mtime_ns == kept  # finished runs left alone
    for job in ("4", "9"):
        assert after[job]["status"] == "completed" and after[job]["run_id"] == before[job]["run_id"]
        rows = (tmp_path / "s" / job / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(r)["epoch"] for r in rows] == [1, 2]
        assert after[job]["batch"]["seeds"] == [0, 1]  # only the two unfinished runs trained, as one group
    assert {k: v["status"] for k, v in after.items()} == {k: v["status"] for k, v in before.items()}


def test_the_acrobot_envpool_command_writes_four_completed_runs(tmp_path):
    pytest.importorskip("envpool")
    proc = sweep(tmp_path, "rl", *ACROBOT_ENVPOOL_SWEEP, "hydra/launcher=batched")
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = results(tmp_path / "rl")
    assert [r["status"] for r in found.values()] == ["completed"] * 4
    assert all(r["batch"]["seeds"] == [0, 1, 0, 1] and r["final"]["env_steps"] == 1000 for r in found.values())


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the worker processes through /proc")
def two_groups(tmp_path, slow_epochs: int) -> tuple[str, ...]:
    """A sweep of two groups on digits, each in its own worker process: 1 epoch (jobs 0 and 2) and ``slow_epochs``."""
    return (
        sys.executable,
        str(ROOT / "run_ablation.py"),
        "-m",
        "task=digits",
        "envelope@envelopes.classification=identity,step",
        f"task.epochs=1,{slow_epochs}",
        "task.train_size=100",
        "task.batch_size=100",
        "tensorboard=false",
        "hydra/launcher=batched",
        "hydra.launcher.workers=2",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )


def wait_for_the_fast_group(proc, tmp_path) -> list[Path]:
    """Wait (up to 2 min, while the sweep runs) for the fast group's results; return their paths."""
    import time

    fast = [tmp_path / "sweep" / str(job) / "result.json" for job in (0, 2)]
    deadline = time.time() + 120
    while not all(path.exists() for path in fast) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    return fast


def test_a_killed_worker_loses_its_own_group_only_and_resume_redoes_just_it(tmp_path):
    import os
    import signal

    # two groups (1 and 800 epochs), each in its own worker process; the slow one's process is killed
    args = two_groups(tmp_path, 800)
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    fast = wait_for_the_fast_group(proc, tmp_path)
    workers = children(proc.pid)
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert workers and proc.returncode == 1, out[-3000:]
    status = {job: r["status"] for job, r in results(tmp_path / "sweep").items()}
    assert status == {"0": "completed", "2": "completed"}, status  # the killed group wrote no result
    assert "(worker process) failed: worker process exited with status -9; its runs stay unfinished" in out, out[-3000:]
    assert "Error: 2 of 4 runs did not complete" in out
    assert (tmp_path / "sweep" / "report.md").exists()
    resumed = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = results(tmp_path / "sweep")
    assert {r["status"] for r in again.values()} == {"completed"} and len(again) == 4
    # the runs that had completed were not trained again
    assert (
        "already completed" in resumed.stderr
        and again["0"]["wall_time_s"] == json.loads(fast[0].read_text())["wall_time_s"]
    )


def test_workers_end_when_their_launcher_is_killed(tmp_path):
    import os
    import signal
    import time

    # one long group in a worker process; the launcher is killed outright (no clean-up): the worker must not
    # train on as an orphan
    args = two_groups(tmp_path, 100000)  # the second group trains for minutes
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_the_fast_group(proc, tmp_path)
    workers = [pid for pid in children(proc.pid) if "spawn_main" in command_line(pid)]
    assert workers and proc.poll() is None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 20
    try:
        while any(children_state(pid) not in (None, "Z") for pid in workers):
            assert time.time() < deadline, "a worker outlived its killed launcher"
            time.sleep(0.1)
    finally:
        for pid in workers:
            if children_state(pid) not in (None, "Z"):
                os.kill(pid, signal.SIGKILL)


def command_line(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_text()
    except OSError:
        return ""


def children_state(pid: int) -> str | None:
    """A process's state letter (Z: exited, not yet reaped), or None once it is gone."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def test_workers_with_a_single_group_say_it_trains_in_this_process(tmp_path):
    proc = sweep(
        tmp_path,
        "one",
        "-m",
        "envelope@envelopes.classification=identity,step",
        "task.epochs=1",
        "tensorboard=false",
        "hydra/launcher=batched",
        "hydra.launcher.workers=2",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "workers=2: one group to train, so it trains in this process" in proc.stderr + proc.stdout


def test_a_batched_sweep_validates_each_job_once(tmp_path):
    # the command line as run_ablation.py runs it, with every caller's validate counting its calls
    counting = """
import atexit, runpy, sys
import runner.callbacks, runner.config, runner.job
seeds, real = [], runner.config.validate
def validate(cfg):
    seeds.append(int(cfg.seed))
    return real(cfg)
for module in (runner.config, runner.callbacks, runner.job):
    module.validate = validate
atexit.register(lambda: print("validated seeds", seeds))
sys.argv = ["run_ablation.py", *sys.argv[1:]]
runpy.run_path("run_ablation.py", run_name="__main__")
"""
    args = ["envelope@envelopes.classification=identity,step", "seed=0,1", "task.epochs=1", "task.train_size=200"]
    proc = subprocess.run(
        [sys.executable, "-c", counting, "-m", *args, "tensorboard=false", "hydra/launcher=batched"]
        + [f"hydra.sweep.dir={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {r["status"] for r in results(tmp_path).values()} == {"completed"} and len(results(tmp_path)) == 4
    # the sweep's check validates each configuration once (jobs that differ in their seed share it); the
    # launcher and the runs use what it validated
    assert "validated seeds [0, 0]" in proc.stdout
