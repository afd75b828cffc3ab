"""The adaptive loss controller: executor guards, DQN monitor, meta controller, modes in the runner, CIFAR-10 data."""

import hashlib
import json
import math
import pickle
import tarfile

import numpy as np
import pytest
import torch

from methods.loss_controller import ControllerSettings, LossController, LossExecutor, LossMonitor, MetaController
from runner.config import ConfigError, validate
from runner.job import run_job
from tests.conftest import SHARED_DATA, needs_mnist

TINY = ("task.epochs=4", "task.batch_size=100", "controller.interval=3", "tensorboard=true")


def test_executor_clamps_bounds_and_rejects_non_finite_weights():
    executor = LossExecutor(
        ["a"], ControllerSettings(mode="full", init_weight=0.1, max_weight=0.5, max_change=0.05), torch.device("cpu")
    )
    assert executor.adjust("a", 0.9) == pytest.approx(0.15)  # at most max_change per adjustment
    for _ in range(20):
        executor.adjust("a", 0.9)
    assert executor.weights["a"] == 0.5  # clamped to max_weight
    executor.set_range("a", 0.2, 0.3)
    assert executor.weights["a"] == 0.3
    assert executor.adjust("a", math.nan) == 0.3 and executor.rejected_weights == 1
    assert executor.epoch_counts()["executor/rejected_weights"] == 1.0


def test_executor_skips_non_finite_aux_losses_and_falls_back_on_divergence():
    settings = ControllerSettings(mode="full", init_weight=0.5, divergence_factor=10.0, fallback_steps=3)
    executor = LossExecutor(["a", "b"], settings, torch.device("cpu"))
    base = torch.tensor(2.0)
    combined = executor.combine(base, {"a": torch.tensor(4.0), "b": torch.tensor(math.nan)})
    assert combined.item() == 4.0  # 2 + 0.5 * 4; the NaN loss is left out
    assert executor.epoch_counts()["executor/skipped_b"] == 1.0
    diverged = executor.combine(base, {"a": torch.tensor(1e6), "b": torch.tensor(0.0)})
    assert diverged.item() == 2.0  # above 10x the base level: the base loss alone
    for _ in range(3):  # and for fallback_steps more steps
        assert executor.combine(base, {"a": torch.tensor(4.0), "b": torch.tensor(0.0)}).item() == 2.0
    assert executor.combine(base, {"a": torch.tensor(4.0), "b": torch.tensor(0.0)}).item() == 4.0
    assert executor.epoch_counts()["executor/fallback_steps"] == 4.0


def test_monitor_dqn_learns_which_action_pays_in_which_state():
    settings = ControllerSettings(mode="monitor_only", batch_size=16, target_sync=10, lr=1e-2, gamma=0.0)
    monitor = LossMonitor(1, settings, seed=0, planned=600)  # 3 actions; state dim 6
    states = [torch.tensor([1.0, 0, 0, 0, 0, 0]), torch.tensor([0.0, 1, 0, 0, 0, 0])]
    best = [0, 2]  # decrease in the first state, increase in the second
    gen = torch.Generator().manual_seed(1)
    for _ in range(600):
        which = int(torch.randint(2, (), generator=gen))
        action = monitor.act(states[which])
        reward = 1.0 if action == best[which] else 0.0
        monitor.remember(states[which], action, reward, states[int(torch.randint(2, (), generator=gen))])
        monitor.learn()
    with torch.no_grad():
        assert [int(monitor.q(s).argmax()) for s in states] == best
    assert monitor.epsilon < 0.05 + 1e-9 and monitor.updates > 500
    assert torch.equal(monitor.target(states[0]), monitor.target(states[0]))
    assert monitor.deltas(0) == [-1] and monitor.deltas(2) == [1]
    fresh = LossMonitor(1, settings, seed=5)
    fresh.load_state_dict(monitor.state_dict())
    assert torch.equal(fresh.q(states[1]), monitor.q(states[1])) and fresh.epsilon == monitor.epsilon


def _meta_loop(meta: MetaController, start: dict[str, float], epochs: int, gain) -> list[list[int]]:
    """Drive ``meta`` as the runner does: each epoch's weights move to the last decision's targets, and the
    next epoch improves by ``gain(moves)``, ``moves`` the direction each weight moved."""
    weights, previous, improvement, chosen = dict(start), dict(start), math.nan, []
    for epoch in range(1, epochs + 1):
        decisions = meta.decide(epoch, previous, weights, improvement)
        chosen.append([d.chosen for d in decisions])
        improvement = gain({d.weight: d.chosen for d in decisions})
        previous, weights = weights, {d.weight: d.target for d in decisions}
    return chosen


def test_meta_controller_learns_the_direction_that_preceded_improvement():
    settings = ControllerSettings(mode="controller_only", target_step=0.05, range_radius=0.2, meta_explore=0.0)
    meta = MetaController(["a"], settings)
    # lowering the weight helps: the epoch after a decrease improves by more than usual
    chosen = [c[0] for c in _meta_loop(meta, {"a": 0.5}, 12, lambda moves: 0.02 + (0.05 if moves["a"] < 0 else 0))]
    assert chosen[:4] == [1, 1, -1, 0]  # the first scored epoch only sets the baseline: up is tried again
    assert chosen[-4:] == [-1, -1, -1, -1]
    assert meta.score("a", -1) > meta.score("a", 1)
    last = meta.decisions[-1]
    assert last.high - last.low < 2 * settings.range_radius  # the range narrows while down keeps winning


def test_meta_controller_tells_equal_weights_apart_and_keeps_exploring():
    settings = ControllerSettings(mode="controller_only", target_step=0.02, meta_explore=0.2)
    meta = MetaController(["a", "b"], settings, seed=0)

    def gain(moves):  # lowering a helps, raising b helps; each epoch shows only the weight that moved
        return 0.02 + 0.05 * (moves["a"] == -1) + 0.05 * (moves["b"] == 1)

    chosen = _meta_loop(meta, {"a": 0.5, "b": 0.5}, 60, gain)
    assert all(sum(c != 0 for c in epoch) <= 1 for epoch in chosen)  # one weight perturbed per epoch
    assert meta.score("a", -1) > max(meta.score("a", 0), meta.score("a", 1))
    assert meta.score("b", 1) > max(meta.score("b", 0), meta.score("b", -1))
    final = {d.weight: d.target for d in meta.decisions[-2:]}
    assert final["a"] < 0.4 < 0.6 < final["b"]  # equal at the start, apart now
    late = [c for epoch in chosen[20:] for c in epoch if c != 0]
    assert {-1, 1} <= set(late)  # exploration goes on after the first epochs (b's up and a's down, and others)
    a_late = [epoch[0] for epoch in chosen[20::2]]
    assert a_late.count(-1) < len(a_late)  # a still tries other directions now and then


@pytest.mark.parametrize("mode", ["monitor_only", "controller_only", "full"])
def test_every_mode_changes_training_and_logs_its_decisions(compose, tmp_path, mode):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_job(compose(*TINY, "controller.mode=baseline"), tmp_path / "baseline", None, [], reraise=True)
    run_job(compose(*TINY, f"controller.mode={mode}"), tmp_path / mode, None, [], reraise=True)
    base = json.loads((tmp_path / "baseline" / "result.json").read_text())
    result = json.loads((tmp_path / mode / "result.json").read_text())
    assert result["status"] == "completed" and result["effective"]["controller"]["mode"] == mode
    assert result["final"]["val_loss"] != base["final"]["val_loss"]
    rows = [json.loads(line) for line in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
    weights = {r["controller_weight_label_smoothing"] for r in rows}
    assert len(weights) > 1  # the weight moved
    state = torch.load(tmp_path / mode / "controller.pt", weights_only=False)
    assert state["mode"] == mode
    (tb_run,) = (tmp_path / mode / "tb").iterdir()
    accumulator = EventAccumulator(str(tb_run))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    if mode in ("monitor_only", "full"):
        assert "monitor" in state and state["monitor"]["stored"] > 0
        per_decision = {"reward", "epsilon", "action", "weight_label_smoothing"}
        assert {f"monitor_step/{name}" for name in per_decision} <= tags
        # one x-unit per tag: per-decision values at optimiser steps, per-epoch summaries at epochs 1, 2, ...
        epochs = [row["epoch"] for row in rows]
        for tag in tags:
            steps = [event.step for event in accumulator.Scalars(tag)]
            assert steps == sorted(set(steps)), tag  # no sawtooth of two units
            if tag.startswith(("monitor/", "controller/")):
                assert steps == epochs[-len(steps) :], tag
    if mode in ("controller_only", "full"):
        assert len(state["meta"]["decisions"]) == 4 * 2  # per epoch, per weight
        assert "controller/target_label_smoothing" in tags and "controller/direction_confidence_penalty" in tags


def test_baseline_mode_trains_exactly_as_without_the_controller(compose, tmp_path):
    run_job(compose(*TINY), tmp_path / "off", None, [], reraise=True)
    run_job(compose(*TINY, "controller.mode=baseline"), tmp_path / "baseline", None, [], reraise=True)
    off = [json.loads(line)["val_loss"] for line in (tmp_path / "off" / "metrics.jsonl").read_text().splitlines()]
    base = [json.loads(line)["val_loss"] for line in (tmp_path / "baseline" / "metrics.jsonl").read_text().splitlines()]
    assert off == base
    ids = [json.loads((tmp_path / d / "result.json").read_text())["run_id"] for d in ("off", "baseline")]
    assert ids[0] == ids[1]  # one run: de-duplication and the results cache treat them as one


@needs_mnist
def test_vae_controller_sets_the_kl_weight(compose, tmp_path):
    cfg = compose(
        "task=vae_overparameterised",
        f"data_root={SHARED_DATA}",
        "task.epochs=3",
        "task.val_size=300",
        "controller.mode=full",
        "controller.interval=2",
        "controller.init_weight=0.5",
        "tensorboard=false",
    )
    run_job(cfg, tmp_path, None, [], reraise=True)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    used = [r["train_kl_weight"] for r in rows]  # the KL weight of each epoch's last step
    assert all(0.0 <= w <= 1.0 for w in used) and len(set(used)) > 1 and 1.0 not in used
    assert len({r["controller_weight_kl"] for r in rows}) > 1


def test_controller_config_errors_name_the_key(compose):
    with pytest.raises(
        ConfigError, match=r"controller.mode must be one of \['baseline', 'monitor_only', 'controller_only', 'full'\]"
    ):
        validate(compose("controller.mode=everything"))
    with pytest.raises(
        ConfigError, match=r"controller.mode: task 'ppo' has no auxiliary losses.*\['classification', 'vae'\]"
    ):
        validate(compose("task=cartpole", "controller.mode=full"))
    with pytest.raises(ConfigError, match="seed_batch: the loss controller"):
        validate(compose("controller.mode=full", "seed_batch=2"))
    with pytest.raises(ConfigError, match="controller.init_weight must lie in"):
        validate(compose("controller.mode=full", "controller.init_weight=2.0"))
    with pytest.raises(ConfigError, match="task.kl_annealing_steps: the loss controller sets the KL weight"):
        validate(compose("task=vae_overparameterised", "controller.mode=full", "task.kl_annealing_steps=10"))


def write_cifar(root, per_batch=40):
    """A small data set in the official cifar-10-batches-py format (pickled dicts, channel-major rows)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.integers(0, 10, per_batch).tolist()
        data = rng.integers(0, 16, (per_batch, 3072), dtype=np.uint8)
        data[:, :1024] += np.array(labels, dtype=np.uint8)[:, None] * 24  # the red channel tells the class
        with (folder / name).open("wb") as out:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, out)
    return folder


def test_cifar10_reader_keeps_the_official_layout(tmp_path):
    from tasks.datasets import load_classification_pool

    folder = write_cifar(tmp_path)
    pool = load_classification_pool("cifar10", tmp_path, ["train", "test"])
    assert pool.features.shape == (240, 3072) and pool.image_shape == (3, 32, 32) and pool.num_classes == 10
    with (folder / "test_batch").open("rb") as handle:
        test = pickle.load(handle, encoding="bytes")
    # the test batch comes last, channel-major, scaled to [0, 1]
    assert torch.equal(pool.features[-40:], torch.from_numpy(test[b"data"]).float() / 255)
    assert pool.labels[-40:].tolist() == test[b"labels"]


def test_cifar10_download_is_checksummed(tmp_path, monkeypatch):
    from tasks import datasets

    write_cifar(tmp_path / "source")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "source" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    with pytest.raises(datasets.DataNotFoundError, match="task.download=true"):
        datasets.load_cifar10(tmp_path / "data", "train")
    monkeypatch.setitem(datasets.CIFAR10, "url", archive.as_uri())
    monkeypatch.setitem(datasets.CIFAR10, "md5", "0" * 32)
    with pytest.raises(OSError, match="checksum mismatch"):
        datasets.load_cifar10(tmp_path / "data", "train", download=True)
    monkeypatch.setitem(datasets.CIFAR10, "md5", md5)
    images, labels = datasets.load_cifar10(tmp_path / "data", "train", download=True)
    assert images.shape == (200, 3, 32, 32) and labels.shape == (200,)


def test_cnn_with_the_full_controller_on_cifar10_format_data(compose, tmp_path):
    write_cifar(tmp_path / "cifar10")
    cfg = compose(
        "task=cifar10",
        f"data_root={tmp_path}",
        "task.train_size=160",
        "task.val_size=40",
        "task.test_size=40",
        "task.batch_size=40",
        "task.epochs=8",
        "task.lr=0.003",
        "controller.mode=full",
        "controller.interval=2",
        "tensorboard=false",
    )
    run_job(cfg, tmp_path / "job", None, [], reraise=True)
    result = json.loads((tmp_path / "job" / "result.json").read_text())
    assert (
        result["status"] == "completed" and result["final"]["val_accuracy"] > 0.3
    )  # 3x chance: the red channel tells the class
    assert (tmp_path / "job" / "controller.pt").exists()


def test_report_shows_each_component_against_baseline(tmp_path):
    from tests.test_cli import run_cli

    sweep = tmp_path / "sweep"
    modes = "controller.mode=baseline,monitor_only,controller_only,full"
    proc = run_cli("-m", *TINY, "tensorboard=false", modes, "seed=0,1", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr
    import pandas as pd

    table = pd.read_csv(sweep / "contributions.csv")
    assert list(table["mode"]) == ["monitor_only", "controller_only", "full"]
    assert (table["n_mode"] == 2).all() and (table["n_baseline"] == 2).all() and table["ci95"].notna().all()
    jobs = pd.read_csv(sweep / "jobs.csv")
    # baseline is the run without the controller: its runs say controller = none
    assert jobs["controller"].isna().sum() == 2
    for row in table.itertuples():
        means = jobs.assign(controller=jobs["controller"].fillna("baseline")).groupby("controller")[row.metric].mean()
        assert row.difference == pytest.approx(means[row.mode] - means["baseline"])
    report = (sweep / "report.md").read_text()
    assert "Contribution of each loss-controller component" in report and "meta-learning controller" in report


def test_baseline_and_no_controller_are_one_run(tmp_path):
    from tests.test_cli import run_cli

    sweep = tmp_path / "sweep"
    proc = run_cli(
        "-m", "task.epochs=2", "tensorboard=false", "controller.mode=null,baseline", f"hydra.sweep.dir={sweep}"
    )
    assert proc.returncode == 0, proc.stderr
    first, second = (json.loads((sweep / str(n) / "result.json").read_text()) for n in (0, 1))
    assert first["status"] == "completed" and second["status"] == "duplicate"
    assert second["run_id"] == first["run_id"]  # the same run: trained once


def test_contributions_name_every_other_swept_setting_and_speak_percentage_points():
    import pandas as pd

    from analysis.tables import TableSpec, contributions_markdown, controller_contributions, vwpr_contributions

    rows = []
    for vwpr in (False, True):
        for mode, base in ((None, 0.80), ("full", 0.82)):
            for seed in range(3):
                rows.append(
                    {
                        "status": "completed",
                        "controller": mode,
                        "vwpr": vwpr,
                        "seed": seed,
                        "envelopes": "classification: identity",
                        "envelopes_json": "{}",
                        "dataset": "fashion_mnist",
                        "task_json": json.dumps({"epochs": 25}),
                        "final_val_accuracy": base + (0.05 if vwpr else 0.0) + 0.001 * seed,
                    }
                )
    spec = TableSpec("final_val_accuracy", "max", ["final_val_accuracy"])
    table = controller_contributions(pd.DataFrame(rows), spec)
    assert list(table["vwpr"]) == ["off", "on"]  # rows that differ only in VWPR are told apart
    assert table["difference"].tolist() == pytest.approx([0.02, 0.02])
    markdown = contributions_markdown(table)
    assert "| envelopes | vwpr | component (mode) | Δ vs baseline ± 95% CI (pp) |" in markdown
    assert "| classification: identity | off | monitor + controller (full) (`full`) | +2.00 ± " in markdown
    # the same sweep read for VWPR: on minus off, per controller mode
    effect = vwpr_contributions(pd.DataFrame(rows), spec)
    assert list(effect["controller"]) == ["baseline", "full"] and effect["difference"].tolist() == pytest.approx(
        [0.05] * 2
    )
    markdown = contributions_markdown(effect)
    assert "| envelopes | controller | vwpr | Δ vs off ± 95% CI (pp) | n (on / off) |" in markdown
    assert "| classification: identity | full | on | +5.00 ± " in markdown
    # each seed ran both ways: paired by seed, so the seeds' shared offsets cancel (every pair differs by 0.05)
    assert set(effect["test"]) == {"paired t"} and effect["ci95"].tolist() == [0.0, 0.0]
    assert "paired by seed" in markdown
    unpaired = pd.DataFrame([r for r in rows if not (r["vwpr"] and r["seed"] == 0)])
    effect = vwpr_contributions(unpaired, spec)
    assert set(effect["test"]) == {"Welch"} and (effect["ci95"] > 0).all()


def test_paired_difference_is_the_paired_t_interval():
    from scipy import stats

    from analysis.stats import paired_difference

    rng = np.random.default_rng(0)
    base = rng.normal(0.8, 0.1, 6)  # seeds far apart ...
    treated = base + 0.02 + rng.normal(0, 0.005, 6)  # ... each moved by about 0.02
    half, p = paired_difference(treated, base)
    d = treated - base
    assert half == pytest.approx(stats.t.ppf(0.975, 5) * d.std(ddof=1) / np.sqrt(6))
    assert p < 1e-3 < stats.ttest_ind(treated, base, equal_var=False).pvalue


def test_the_end_of_sweep_report_takes_its_metric_from_the_config(compose):
    from runner.config import ConfigError, validate

    cfg = compose("report.metric=val_accuracy", "report.mode=max")
    assert (cfg.report.metric, cfg.report.mode) == ("val_accuracy", "max")
    with pytest.raises(ConfigError, match=r"report.mode must be one of \['min', 'max'\] or null, got 'high'"):
        validate(compose("report.mode=high"))


def _synthetic_run(seed: int, random_policy: bool):
    """The monitor alone on a problem whose probe loss is lowest at weight 0.6: 1,000 steps, the headline run's
    length (25 epochs of 40 steps), default schedule."""
    settings = ControllerSettings(mode="monitor_only", init_weight=0.1)
    if random_policy:
        settings.epsilon_start = settings.epsilon_end = 1.0
    parameter = torch.nn.Parameter(torch.zeros(3))
    parameter.grad = torch.ones(3)
    holder = {}

    def probe():
        weight = holder["controller"].weights["aux"] if "controller" in holder else settings.init_weight
        return 1.0 + 10.0 * (weight - 0.6) ** 2

    controller = LossController(["aux"], settings, torch.device("cpu"), seed, probe, [parameter], total_steps=1000)
    holder["controller"] = controller
    for _ in range(1000):
        controller.after_step(torch.tensor(1.0))
    return controller


def test_the_monitor_learns_within_a_run_and_beats_a_random_policy():
    learned = [_synthetic_run(seed, random_policy=False) for seed in range(3)]
    monitor = learned[0].monitor
    # scheduled in the run's units: 200 decisions, hundreds of updates, many target copies, exploration ended
    assert learned[0].interval == 5 and monitor.made == 200
    assert monitor.updates >= 500 and monitor.syncs >= 20 and monitor.epsilon == pytest.approx(0.05)
    metrics = learned[0].epoch_end(1, 1.0)
    assert metrics["monitor/updates"] == monitor.updates and "monitor/td_loss" in metrics
    random = [_synthetic_run(seed, random_policy=True) for seed in range(3)]
    distance = [abs(c.weights["aux"] - 0.6) for c in learned]
    chance = [abs(c.weights["aux"] - 0.6) for c in random]
    assert max(distance) <= 0.1 < sum(chance) / len(chance)


def test_a_short_run_decides_every_second_step_and_an_interval_of_one_is_refused():
    from methods.loss_controller import check_settings

    parameter = torch.nn.Parameter(torch.zeros(2))
    parameter.grad = torch.ones(2)
    settings = ControllerSettings(mode="monitor_only")
    controller = LossController(["aux"], settings, torch.device("cpu"), 0, lambda: 1.0, [parameter], total_steps=100)
    assert controller.interval == 2 and controller.monitor.planned == 50  # a trend and a variance need two steps
    with pytest.raises(ValueError, match=r"interval must be an integer >= 2 or null"):
        check_settings(ControllerSettings(interval=1))


def test_a_schedule_that_gives_the_dqn_no_update_warns_in_the_log_and_in_the_result(compose, tmp_path, caplog):
    parameter = torch.nn.Parameter(torch.zeros(2))
    settings = ControllerSettings(mode="monitor_only")
    short = LossController(["aux"], settings, torch.device("cpu"), 0, lambda: 1.0, [parameter], total_steps=20)
    assert short.schedule_warnings() == [
        "loss monitor: its DQN makes no learning update in this run: 10 decisions (every 2 of the run's 20 "
        "optimiser steps) store 9 transitions, fewer than the 16 it stores before learning (controller.batch_size, "
        "controller.warmup); train longer or lower controller.interval"
    ]
    few = LossController(["aux"], settings, torch.device("cpu"), 0, lambda: 1.0, [parameter], total_steps=40)
    assert few.schedule_warnings() == [
        "loss monitor: its DQN never copies its target network in this run: 20 decisions (every 2 of the run's 40 "
        "optimiser steps) store 19 transitions, so 16 learning updates, fewer than controller.target_sync = 20"
    ]
    assert (
        LossController(["aux"], settings, torch.device("cpu"), 0, lambda: 1.0, [parameter], 1000).schedule_warnings()
        == []
    )
    with caplog.at_level("WARNING"):
        run_job(compose(*TINY, "controller.mode=monitor_only", "task.epochs=1"), tmp_path, None, [], reraise=True)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["status"] == "completed" and len(result["warnings"]) == 1
    assert result["warnings"][0].startswith("loss monitor: its DQN makes no learning update in this run")
    assert result["warnings"][0] in caplog.text
