"""Config composition, schemas, validation messages and canonical ids."""

import json
from pathlib import Path

import pytest
import yaml
from hydra.errors import ConfigCompositionException

from runner.config import ConfigError, config_id, effective_config, validate

ROOT = Path(__file__).resolve().parent.parent


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


def check_composes(compose, task: str, envelope: str) -> None:
    cfg = compose(f"task={task}")
    loss_names = list(cfg.envelopes)
    assert loss_names, task
    cfg = compose(f"task={task}", *[f"envelope@envelopes.{name}={envelope}" for name in loss_names])
    envelopes = validate(cfg)
    assert set(envelopes) == set(loss_names)
    declared = yaml.safe_load((ROOT / "conf" / "envelope" / f"{envelope}.yaml").read_text())["shape"]
    assert all(e.shape == declared for e in envelopes.values())


@pytest.mark.parametrize("task", options("task"))
def test_every_task_composes_and_validates_with_an_adaptive_envelope_on_each_loss(compose, task):
    check_composes(compose, task, "sigmoid")


@pytest.mark.parametrize("envelope", options("envelope"))
def test_every_envelope_composes_and_validates(compose, envelope):
    check_composes(compose, "digits", envelope)


def _sweep_config(experiment: str):
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    return (
        GlobalHydra.instance()
        .config_loader()
        .load_configuration("config", [f"experiment={experiment}"], RunMode.MULTIRUN)
    )


@pytest.mark.parametrize("experiment", [e for e in options("experiment") if not e.startswith("optuna")])
def test_every_experiment_preset_validates_and_sweeps(experiment):
    from hydra import initialize_config_dir

    from runner.callbacks import check_sweep, expand_sweep
    from runner.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = _sweep_config(experiment)
        assert len(expand_sweep(cfg)) >= 2, f"experiment {experiment} sweeps nothing"
        validate(cfg)
        if "paper" not in experiment:  # paper grids have thousands of jobs: see the slow test below
            jobs, runs, distinct = check_sweep(cfg, data=False)
            assert 2 <= distinct <= runs and jobs <= runs


@pytest.mark.parametrize("experiment", [e for e in options("experiment") if not e.startswith("optuna")])
def test_a_job_composed_from_its_group_choices_equals_hydras_composition(experiment):
    """compose_job (the sweep check's and the batching launcher's) composes each set of group choices once and
    sets a job's other overrides on a copy with Hydra's own code; each job's config, hydra node included, must be
    exactly what Hydra composes for that job: two seeds of one job, and jobs spread over the sweep. The task's
    config (task_config, without the hydra node) must be that composition with its hydra node deleted."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf, open_dict

    from runner import callbacks
    from runner.callbacks import compose_job, expand_sweep, forget_compositions, split_seed, task_config
    from runner.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = _sweep_config(experiment)
        jobs = expand_sweep(cfg)
        first = split_seed(jobs[0])[0]
        same = [job for job in jobs if split_seed(job)[0] == first][:2]  # two seeds of one seedless job, if any
        spread = jobs[:: max(1, len(jobs) // 6)][:6]
        forget_compositions(cfg)
        for job in same + spread:
            ours = compose_job(cfg, job)
            hydras = GlobalHydra.instance().config_loader().load_sweep_config(cfg, list(job))
            assert OmegaConf.to_container(ours) == OmegaConf.to_container(hydras), (experiment, job)
            assert OmegaConf.is_struct(ours) and not OmegaConf.is_readonly(ours.hydra)
            for node in ("", "hydra", "hydra.job", "task"):  # types, flags and cached resolver values; parents
                assert OmegaConf.select(ours, node)._metadata == OmegaConf.select(hydras, node)._metadata, node
                assert OmegaConf.select(ours, node)._get_root() is ours
            with open_dict(hydras):
                del hydras["hydra"]
            task = task_config(cfg, job)
            assert OmegaConf.to_container(task) == OmegaConf.to_container(hydras), (experiment, job)
            assert OmegaConf.is_struct(task) and OmegaConf.get_type(task) is OmegaConf.get_type(hydras)
        composed = [key for key in callbacks._by_choices if key[0] == str(cfg.hydra.sweep.dir)]
        forget_compositions(cfg)
    assert 1 <= len(composed) <= len(same + spread)


def test_a_job_override_the_shortcut_does_not_take_is_composed_by_hydra_whole(compose):
    """A job that adds a key, sets a hydra key (composed by Hydra whole) or chooses another task is composed as
    Hydra composes it; a value Hydra refuses gives Hydra's own error."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import ConfigCompositionException
    from omegaconf import OmegaConf

    from runner.callbacks import compose_job, forget_compositions
    from runner.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = _sweep_config("mnist_quick")
        loader = GlobalHydra.instance().config_loader()
        for job in (["+extra=3", "seed=1"], ["hydra.job.name=other", "seed=2"], ["task=mnist_test_split", "+extra=1"]):
            forget_compositions(cfg)
            ours = compose_job(cfg, job)
            assert OmegaConf.to_container(ours) == OmegaConf.to_container(loader.load_sweep_config(cfg, job))
        with pytest.raises(ConfigCompositionException, match="seed=abc"):
            compose_job(cfg, ["seed=abc"])
        forget_compositions(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("experiment", [e for e in options("experiment") if "paper" in e])
def test_every_job_of_every_paper_grid_validates(experiment):
    from hydra import initialize_config_dir

    from runner.callbacks import check_sweep
    from runner.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        jobs, runs, distinct = check_sweep(_sweep_config(experiment), data=False)
    assert 2 <= distinct <= runs and jobs <= runs


@pytest.mark.slow  # a multi-process end-to-end check of 9-25 s: CI runs it with the slow tests
def test_paper_grid_deduplicates_to_distinct_runs():
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    from runner.callbacks import check_sweep
    from runner.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        cfg = loader.load_configuration("config", ["experiment=california_paper"], RunMode.MULTIRUN)
        jobs, runs, distinct = check_sweep(cfg, data=False)
    # identity 1 + step 3 thresholds x 3 step sizes + (linear, sigmoid) 27 each; x 10 seeds, batched in one job
    assert (jobs, runs, distinct) == (4 * 27, 4 * 27 * 10, (1 + 9 + 27 + 27) * 10)


def test_misspelt_key_fails_at_composition(compose):
    with pytest.raises(ConfigCompositionException, match="lrr"):
        compose("task.lrr=0.1")
    with pytest.raises(ConfigCompositionException, match="quantle"):
        compose("envelopes.classification.quantle=0.5")


def test_wrong_type_fails_at_composition(compose):
    with pytest.raises(ConfigCompositionException, match="epochs"):
        compose("task.epochs=abc")


def test_unknown_loss_name_is_an_error(compose):
    cfg = compose("+envelope@envelopes.policy=step")
    with pytest.raises(
        ConfigError, match=r"task 'classification' has no loss named 'policy'; its losses are \['classification'\]"
    ):
        validate(cfg)


def test_missing_loss_name_is_an_error(compose):
    cfg = compose("~envelope@envelopes.classification")
    with pytest.raises(
        ConfigError,
        match=r"needs an envelope for each of its losses \['classification'\]; missing \['classification'\]",
    ):
        validate(cfg)


@pytest.mark.parametrize(
    "override, message",
    [
        ("envelopes.classification.quantile=1.5", "envelopes.classification: quantile must lie in [0, 1], got 1.5"),
        ("envelopes.classification.step_size=0", "envelopes.classification: step_size must lie in (0, 1], got 0.0"),
        (
            "envelopes.classification.shape=cosine",
            "envelopes.classification: shape must be one of ['identity', 'step', 'linear', 'sigmoid', 'focal', 'hard_mining'], got 'cosine'",
        ),
        ("device=gpu", "device must be one of ['auto', 'cpu', 'cuda'], got 'gpu'"),
        ("threads=0", "threads must be a positive integer or null, got 0"),
        ("task.label_noise=1.2", "task.label_noise must lie in [0, 1), got 1.2"),
        (
            "task.dataset=cifar",
            "task.dataset must be one of ['mnist', 'fashion_mnist', 'digits', 'cifar10'], got 'cifar'",
        ),
        ("task.subsets=[val]", "task.subsets must be a non-empty list drawn from ['train', 'test'], got ['val']"),
        ("task.epochs=0", "task.epochs must be a positive integer, got 0"),
        ("task.lr=-1", "task.lr must be > 0, got -1.0"),
        ("task.optimizer=rmsprop", "task.optimizer must be one of ['adam', 'sgd'], got 'rmsprop'"),
        ("task.momentum=1.0", "task.momentum must lie in [0, 1), got 1.0"),
        ("task.rare_fraction=0", "task.rare_fraction must lie in (0, 1], got 0.0"),
        ("task.rare_classes=[12]", "task.rare_classes must be a list of distinct classes (integers 0 to 9), got [12]"),
        (
            "task.rare_classes=[3,3]",
            "task.rare_classes must be a list of distinct classes (integers 0 to 9), got [3, 3]",
        ),
        # a value the chosen shape or method ignores is range-checked all the same
        (
            "envelope@envelopes.classification=identity envelopes.classification.quantile=1.5",
            "envelopes.classification: quantile must lie in [0, 1], got 1.5",
        ),
        (
            "envelope@envelopes.classification=step envelopes.classification.width=2.0",
            "envelopes.classification: width must lie in (0, 1], got 2.0",
        ),
        ("envelopes.classification.gamma=-1", "envelopes.classification: gamma must be >= 0, got -1.0"),
        ("vwpr.l1=-0.1", "vwpr.l1 must be >= 0, got -0.1"),
        ("controller.gamma=1.5", "controller.gamma must lie in [0, 1), got 1.5"),
        ("seed=-1", "seed must be a non-negative integer (it seeds torch, numpy and each run's data split), got -1"),
        ("divergence_factor=0.5", "divergence_factor must be > 1 or null (off), got 0.5"),
        (
            "+envelopes.classificaton.quantile=0.5",
            "envelopes: task 'classification' has no loss named 'classificaton'; its losses are ['classification']",
        ),
        (
            "report.metric=bogus",
            "report.metric: task 'classification' records no metric 'bogus'; its metrics are ['epoch', 'val_loss', "
            "'val_accuracy', 'val_rare_accuracy', 'test_loss', 'test_accuracy', 'test_rare_accuracy', 'train_*', "
            "'envelope_*', 'vwpr_*', 'controller_*', 'monitor_*', 'executor_*'] (* any ending; final_ or best_ in "
            "front selects the last or best value)",
        ),
    ],
)
def test_range_errors_name_key_value_and_allowed(compose, override, message):
    extra = [] if override.startswith("envelope@") else ["envelope@envelopes.classification=sigmoid"]
    with pytest.raises(ConfigError) as info:
        validate(compose(*extra, *override.split()))
    assert str(info.value) == message


def test_ignored_parameters_do_not_change_the_config_id(compose):
    def ids(*overrides):
        cfg = compose(*overrides)
        effective = effective_config(cfg, validate(cfg))
        return config_id(effective), config_id(effective, with_seed=True)

    identity = ids("envelope@envelopes.classification=identity")
    assert (
        ids(
            "envelope@envelopes.classification=identity",
            "envelopes.classification.quantile=0.7",
            "envelopes.classification.step_size=0.5",
        )
        == identity
    )
    step = ids("envelope@envelopes.classification=step")
    assert step != identity
    assert ids("envelope@envelopes.classification=step", "envelopes.classification.width=0.3") == step
    static = ids(
        "envelope@envelopes.classification=step",
        "envelopes.classification.quantile=null",
        "envelopes.classification.threshold=0.2",
    )
    assert (
        ids(
            "envelope@envelopes.classification=step",
            "envelopes.classification.quantile=null",
            "envelopes.classification.threshold=0.2",
            "envelopes.classification.step_size=0.9",
        )
        == static
    )
    # device and progress do not change what is computed; the seed changes only the run id
    assert ids("device=cpu", "progress=false") == identity
    seeded = ids("seed=3")
    assert seeded[0] == identity[0] and seeded[1] != identity[1]
    assert ids("task.lr=0.01")[0] != identity[0]


def test_device_cuda_without_cuda_is_a_config_error(compose, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="device: cuda was asked for but torch sees no CUDA device"):
        validate(compose("device=cuda"))
    validate(compose("device=auto"))


def _preset_covers_its_paper_table(table: str) -> None:
    """Every row of the paper's Table ``table`` has a job of ``experiment=paper_table<table>`` at its protocol."""
    import pandas as pd
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from analysis.report import PAPER_RESULTS, _same_envelopes
    from runner.callbacks import expand_sweep
    from runner.config import effective_config, register_configs, validate

    paper = pd.read_csv(PAPER_RESULTS, dtype={"table": str})
    rows = paper[paper["table"] == table]
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = _sweep_config(f"paper_table{table}")
        assert cfg.hydra.launcher._target_.endswith("BatchedLauncher")
        loader = GlobalHydra.instance().config_loader()
        jobs = [o for o in expand_sweep(cfg) if "seed=0" in o or not any(x.startswith("seed=") for x in o)]
        effective = []
        for overrides in jobs:
            job = loader.load_sweep_config(cfg, list(overrides))
            effective.append(effective_config(job, validate(job), data=False))
    for ref in rows.itertuples():
        required, wanted = json.loads(ref.task_params), json.loads(ref.envelopes)
        at_protocol = [e for e in effective if all(e["task"].get(k) == v for k, v in required.items())]
        assert at_protocol, f"Table {table}: no job at the protocol {required}"
        assert any(_same_envelopes(wanted, e["envelopes"]) for e in at_protocol), f"Table {table}: no job has {wanted}"


@pytest.mark.parametrize("table", ["3", "4", "5"])
def test_paper_table_presets_run_every_row_at_the_papers_protocol(table):
    _preset_covers_its_paper_table(table)


@pytest.mark.slow
@pytest.mark.parametrize("table", ["1", "2", "6", "7"])
def test_paper_table_grid_presets_run_every_row_at_the_papers_protocol(table):
    _preset_covers_its_paper_table(table)


@pytest.mark.parametrize("name", ["classification", "regression", "vae", "ppo"])
def test_every_task_module_implements_the_task_interface(name):
    import dataclasses
    import inspect

    from tasks import TaskModule, task_module

    module = task_module(name)
    assert isinstance(module, TaskModule)
    assert dataclasses.is_dataclass(module.Config) and module.OBJECTIVE[1] in ("min", "max")
    for function, parameters in (("loss_names", 1), ("validate", 1), ("run", 2)):
        assert len(inspect.signature(getattr(module, function)).parameters) == parameters, function
    assert isinstance(module.SEED_BATCH, bool)


def test_optimizer_and_rare_class_keys_leave_earlier_runs_ids_alone(compose):
    def run_id(*overrides):
        cfg = compose(*overrides)
        return config_id(effective_config(cfg, validate(cfg)), with_seed=True)

    plain = run_id()
    # Adam ignores the momentum; with no rare classes the fraction kept is unused
    assert plain == run_id("task.momentum=0.5") == run_id("task.rare_fraction=0.5")
    sgd = run_id("task.optimizer=sgd")
    assert len({plain, sgd, run_id("task.optimizer=sgd", "task.momentum=0.5"), run_id("task.rare_classes=[3]")}) == 4


@pytest.mark.parametrize(
    ("task", "defaults", "paper"),
    [
        ("digits", ["pixel_normalisation"], ["task.pixel_normalisation=[0.1307,0.3081]"]),
        ("california_housing", ["standardise", "split"], ["task.standardise=all", "task.split=randperm"]),
        ("vae_overparameterised", ["split", "val_start"], ["task.split=fixed"]),
    ],
)
def test_the_papers_data_handling_keys_leave_earlier_runs_ids_alone(compose, task, defaults, paper):
    def effective(*overrides):
        cfg = compose(f"task={task}", *overrides)
        return effective_config(cfg, validate(cfg), data=False)

    plain = effective()
    # at their defaults (the handling runs always had) the keys are not in the id: earlier runs keep theirs
    assert not set(defaults) & set(plain["task"])
    for override in paper:  # each changes what is computed, so each changes the id
        assert config_id(effective(override)) != config_id(plain)


@pytest.mark.parametrize(
    ("task", "overrides"),
    [
        ("digits", ["task.epochs=1"]),
        ("california_housing", ["task.epochs=1", "task.test_fraction=0.1"]),
        ("vae_overparameterised", ["task.epochs=1", "task.val_size=300", "task.test_size=100"]),
        ("acrobot", ["task.total_steps=1000"]),
    ],
)
def test_every_metric_a_run_records_is_a_report_metric_the_config_accepts(compose, tmp_path, task, overrides):
    from runner.job import run_job
    from tests.conftest import SHARED_DATA

    if task != "digits" and task != "acrobot" and not SHARED_DATA.exists():
        pytest.skip("needs ../shared/data")
    cfg = compose(f"task={task}", f"data_root={SHARED_DATA}", "tensorboard=false", *overrides)
    run_job(cfg, tmp_path, None, [], reraise=True)
    final = json.loads((tmp_path / "result.json").read_text())["final"]
    for name in final:  # each passes the check made before training
        validate(compose(f"task={task}", f"data_root={SHARED_DATA}", f"report.metric=best_{name}"))


def test_the_garbage_collector_runs_again_after_a_sweep_is_composed_even_on_an_error():
    import gc

    from runner.callbacks import paused_gc

    assert gc.isenabled()
    with pytest.raises(RuntimeError), paused_gc():
        assert not gc.isenabled()
        raise RuntimeError("composition failed")
    assert gc.isenabled()
    gc.disable()  # a caller's own choice is kept
    try:
        with paused_gc():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_paused_gc_with_freeze_keeps_what_was_made_out_of_the_collectors_reach():
    import gc

    from runner.callbacks import paused_gc

    before = gc.get_freeze_count()
    try:
        with paused_gc(freeze=True):
            kept = [{"node": i} for i in range(1000)]
        assert gc.isenabled() and gc.get_freeze_count() >= before + len(kept)
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0


@pytest.mark.parametrize("experiment", [e for e in options("experiment") if not e.startswith("optuna")])
def test_config_yaml_writes_what_omegaconf_writes(compose, experiment):
    """The launcher's workers write a job's config.yaml and hydra.yaml with libyaml's emitter: the same text as
    OmegaConf.to_yaml, on every preset's config and hydra node, resolved or not, and on strings YAML would read
    as another type, long and multi-line strings and unicode."""
    from omegaconf import OmegaConf, open_dict

    from runner.config import config_yaml

    cfg = compose(f"experiment={experiment}", return_hydra_config=True)
    assert config_yaml({"hydra": cfg.hydra}) == OmegaConf.to_yaml(OmegaConf.create({"hydra": cfg.hydra}))
    with open_dict(cfg):
        del cfg["hydra"]
    assert config_yaml(cfg) == OmegaConf.to_yaml(cfg)
    assert config_yaml(cfg, resolve=True) == OmegaConf.to_yaml(cfg, resolve=True)
    tricky = OmegaConf.create(
        {
            "strings": ["1.0", "true", "null", "~", "a: b", "- x", "", " padded ", "0x1F", "1e3", "yes", "#"],
            "long": "word " * 40,
            "lines": "first\nsecond\n  indented\n",
            "unicode": "λ ≥ 0 — naïve",
            "nested": [{"a": [1, 2.5, None, True]}, []],
            "interpolated": "${long}",
            "empty": {},
        }
    )
    for resolve in (False, True):
        assert config_yaml(tricky, resolve=resolve) == OmegaConf.to_yaml(tricky, resolve=resolve)
