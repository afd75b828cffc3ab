"""Seed-batched training: N seeds in one job give each seed the results of its own run."""

import json

import pytest
import torch

from analysis.load import load_jobs
from envelopes import Envelope
from runner.config import ConfigError, validate
from runner.job import run_job
from tasks.seed_batch import ModelGroup, take
from tests.conftest import SHARED_DATA, needs_mnist
from tests.test_regression import needs_california

SEEDS = 3


def metrics(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def count_tolerances(result: dict, elements: dict[str, int]) -> dict[str, float]:
    """Tolerances of the statistics that count elements against a threshold: one whole element.

    A rounding difference between a batched and a single run can move one
    element across a threshold (one of 1,600 prior elements crossed a step
    threshold on a fresh install), which moves such a statistic by exactly
    one element's share of the epoch: ``1 / elements[loss]``, where
    ``elements[loss]`` is how many losses that envelope weighs in an epoch.
    The fraction attenuated counts for every shape; the mean weight counts
    for a step (weights are 0 or 1). Every other statistic keeps the tight
    tolerance.
    """
    out = {}
    for loss, n in elements.items():
        one_element = 1.0 / n + 1e-12
        out[f"envelope_{loss}_fraction_attenuated"] = one_element
        if result["effective"]["envelopes"][loss]["shape"] in ("step", "hard_mining"):
            out[f"envelope_{loss}_mean_weight"] = one_element
    return out


def assert_same_runs(compose, tmp_path, overrides, rtol, elements, atol=1e-6, units_tol=0.0, per_dimension=True):
    """Seeds 0..2 batched in one job against three single-seed jobs: same run ids, same metrics per epoch.

    ``elements``: per loss, the losses its envelope weighs in an epoch (see
    :func:`count_tolerances`); ``units_tol``: how far a count of active
    latent units may move.
    """
    run_job(compose(*overrides, f"seed_batch={SEEDS}"), tmp_path / "batch", None, [], reraise=True)
    batch = json.loads((tmp_path / "batch" / "result.json").read_text())
    assert batch["status"] == "batch" and batch["trained"] == list(range(SEEDS))
    for seed in range(SEEDS):
        run_job(compose(*overrides, f"seed={seed}"), tmp_path / f"single_{seed}", None, [], reraise=True)
        batched_dir, single_dir = tmp_path / "batch" / f"seed_{seed}", tmp_path / f"single_{seed}"
        batched = json.loads((batched_dir / "result.json").read_text())
        single = json.loads((single_dir / "result.json").read_text())
        assert batched["status"] == single["status"] == "completed"
        assert batched["run_id"] == single["run_id"] and batched["seed"] == seed
        assert batched["batch"]["seeds"] == list(range(SEEDS))
        counted = count_tolerances(batched, elements)
        rows_batched, rows_single = metrics(batched_dir), metrics(single_dir)
        assert len(rows_batched) == len(rows_single) > 0
        for a, b in zip(rows_batched, rows_single):
            assert a.keys() == b.keys()
            for key in a:
                if not per_dimension and "_dim_" in key:
                    continue
                tolerance = units_tol if key.endswith("active_units") else counted.get(key, atol)
                assert a[key] == pytest.approx(b[key], rel=0 if key in counted else rtol, abs=tolerance), (
                    seed,
                    a["epoch"],
                    key,
                )
        # the seed's config file is the single run's: running it again reproduces the seed
        assert (batched_dir / "config.yaml").read_text() == (single_dir / "config.yaml").read_text()
    # different seeds really differ
    assert metrics(tmp_path / "single_0")[-1] != metrics(tmp_path / "single_1")[-1]


@needs_mnist
def test_vae_seeds_batched_match_single_runs(compose, tmp_path):
    # every loss with a smoothed adaptive envelope, so per-seed quantiles and EMA state are exercised
    overrides = (
        "task=vae_overparameterised",
        "tensorboard=false",
        f"data_root={SHARED_DATA}",
        "task.epochs=2",
        "task.val_size=300",
        "task.kl_annealing_steps=3",
        "envelope@envelopes.prior=step",
        "envelopes.prior.quantile=0.9",
        "envelopes.prior.step_size=0.1",
        "envelope@envelopes.recon=linear",
        "envelopes.recon.quantile=0.1",
        "envelopes.recon.width=0.01",
        "envelopes.recon.step_size=0.1",
        "envelope@envelopes.total=sigmoid",
    )
    # an epoch: 200 images, 8 latent dimensions, 784 pixels
    assert_same_runs(
        compose, tmp_path, overrides, rtol=1e-4, elements={"prior": 200 * 8, "recon": 200 * 784, "total": 200}
    )


@needs_mnist
def test_vae_drift_seeds_batched_match_single_runs(compose, tmp_path):
    # Two epochs of 4 steps, each drawn under each seed's own class weights. Batched and single runs
    # differ by rounding (gradients agree to 1e-6 at first), but Adam divides by each gradient's own
    # size, so near-zero gradients carry rounding into the parameters (in one run the KL values went
    # from 4e-7 apart at step 3 to 1e-4 at step 4 and 5e-3 at step 8), and the latent space's
    # near-symmetries share the KL among dimensions a little differently: per-dimension KLs are left
    # out, and a count may move by one.
    overrides = (
        "task=vae_drift",
        "tensorboard=false",
        f"data_root={SHARED_DATA}",
        "task.epochs=2",
        "task.val_size=300",
        "task.train_size=200",
        "task.drift_pool_size=1000",
        "envelope@envelopes.prior=linear",
        "envelopes.prior.quantile=0.5",
        "envelopes.prior.width=0.3",
    )
    assert_same_runs(
        compose,
        tmp_path,
        overrides,
        rtol=1e-3,
        elements={"prior": 200 * 8, "recon": 200 * 784, "total": 200},
        units_tol=1.0,
        per_dimension=False,
    )


@needs_california
def test_regression_seeds_batched_match_single_runs(compose, tmp_path):
    overrides = (
        "task=california_housing",
        "tensorboard=false",
        f"data_root={SHARED_DATA}",
        "task.epochs=2",
        "task.test_fraction=0.1",
        "envelope@envelopes.mse=paper/mse_sigmoid",
    )
    # 20,640 rows less 2,064 test and 4,128 validation rows
    assert_same_runs(compose, tmp_path, overrides, rtol=1e-4, elements={"mse": 14448})


def test_classification_seeds_batched_match_single_runs(compose, tmp_path):
    overrides = (
        "task=digits",
        "tensorboard=false",
        "task.epochs=3",
        "envelope@envelopes.classification=step",
        "envelopes.classification.quantile=0.5",
        "envelopes.classification.step_size=0.1",
    )
    assert_same_runs(compose, tmp_path, overrides, rtol=1e-4, elements={"classification": 1200})


def test_a_bank_of_one_envelope_per_seed_equals_one_envelope_per_seed():
    from envelopes import EnvelopeBank

    gen = torch.Generator().manual_seed(0)
    kwargs = {"quantile": 0.7, "width": 0.2, "step_size": 0.3}
    grouped = EnvelopeBank([Envelope("sigmoid", **kwargs) for _ in range(4)])
    separate = [Envelope("sigmoid", **kwargs) for _ in range(4)]
    for _ in range(3):  # the smoothed state too
        loss = torch.rand(4, 50, 3, generator=gen) * torch.tensor([1.0, 2.0, 5.0, 10.0]).reshape(4, 1, 1)
        weight = grouped.compute_weight(loss)
        for g, envelope in enumerate(separate):
            torch.testing.assert_close(weight[g], envelope.compute_weight(loss[g]))
    stats = grouped.statistics()
    for g, envelope in enumerate(separate):
        single = envelope.statistics()
        for key in ("mean_weight", "fraction_attenuated", "threshold", "inverse_slope"):
            torch.testing.assert_close(stats[key][g], single[key])
    with pytest.raises(ValueError, match=r"EnvelopeBank of 4 envelopes needs losses of shape \(4, ...\)"):
        grouped(torch.rand(3, 10))
    with pytest.raises(ValueError, match="at least one envelope"):
        EnvelopeBank([])


def test_model_group_calls_each_seed_model_on_its_own_inputs():
    build = lambda: torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 2))  # noqa: E731
    group = ModelGroup(build, [3, 4], torch.device("cpu"))
    x = torch.rand(2, 6, 5)
    out = group(x)
    for i, seed in enumerate((3, 4)):
        torch.manual_seed(seed)
        torch.testing.assert_close(out[i], build()(x[i]))  # same initialisation as a run of that seed
    data = torch.arange(2 * 4 * 3).reshape(2, 4, 3)
    index = torch.tensor([[3, 0], [1, 1]])
    assert torch.equal(take(data, index), torch.stack([data[0, [3, 0]], data[1, [1, 1]]]))


def test_batch_skips_seeds_another_job_already_claimed(compose, tmp_path):
    sweep = tmp_path / "sweep"
    common = ("task=digits", "tensorboard=false", "task.epochs=1", "seed_batch=2")
    run_job(compose(*common, "seed=0"), sweep / "0", sweep, ["seed=0", "seed_batch=2"], reraise=False)
    run_job(compose(*common, "seed=1"), sweep / "1", sweep, ["seed=1", "seed_batch=2"], reraise=False)
    second = json.loads((sweep / "1" / "result.json").read_text())
    assert second["seeds"] == [1, 2] and second["trained"] == [2]
    duplicate = json.loads((sweep / "1" / "seed_1" / "result.json").read_text())
    assert duplicate["status"] == "duplicate" and duplicate["duplicate_of"].endswith("seed_1")
    jobs = load_jobs(sweep)
    assert sorted(
        jobs["job_dir"].map(
            lambda p: (
                p.split(
                    "/",
                )[-2]
                + "/"
                + p.split("/")[-1]
            )
        )
    ) == ["0/seed_0", "0/seed_1", "1/seed_1", "1/seed_2"]
    assert jobs["status"].value_counts().to_dict() == {"completed": 3, "duplicate": 1}
    assert set(jobs["config"]) == {"(defaults)"}  # seed and seed_batch are not part of the configuration


def test_seed_batch_is_refused_where_unsupported(compose):
    validate(compose("task=cartpole", "seed_batch=2"))  # every task batches seeds now
    with pytest.raises(ConfigError, match="seed_batch: VWPR"):
        validate(compose("seed_batch=2", "vwpr.enabled=true"))
    with pytest.raises(ConfigError, match="seed_batch must be a positive integer"):
        validate(compose("seed_batch=0"))


def test_a_batch_whose_data_would_not_fit_in_memory_is_refused_with_what_to_do(compose, tmp_path, monkeypatch):
    import tasks.seed_batch as seed_batch

    monkeypatch.setattr(seed_batch, "available_memory", lambda device: 2**20)  # 1 MiB free
    cfg = compose("seed_batch=3", "task.epochs=1", "tensorboard=false")
    # three copies of digits' splits (about 0.45 MiB each) need more than 80% of 1 MiB
    with pytest.raises(
        MemoryError, match=r"for 3 seeds batched together needs 0\.0 GiB .* hydra\.launcher\.max_batch=1"
    ):
        run_job(cfg, tmp_path, None, [], reraise=True)
    monkeypatch.setattr(seed_batch, "available_memory", lambda device: 2**30)
    run_job(cfg, tmp_path / "fits", None, [], reraise=True)  # with room, the same batch trains


def test_runs_of_one_seed_share_their_data_and_read_it_as_their_own():
    from tasks.seed_batch import PerRun, per_run

    draws = {0: torch.arange(12.0).reshape(6, 2), 1: -torch.arange(12.0).reshape(6, 2)}
    seeds = [0, 1, 0, 0]
    shared = per_run([draws[s] for s in seeds], seeds)
    plain = torch.stack([draws[s] for s in seeds])
    assert isinstance(shared, PerRun) and shared.base.shape == (2, 6, 2)  # two copies for four runs
    assert shared.shape == plain.shape and shared.device == plain.device
    index = torch.tensor([[5, 0], [1, 2], [3, 3], [0, 4]])
    assert torch.equal(take(shared, index), take(plain, index))
    assert torch.equal(shared[:, 2:5], plain[:, 2:5])
    assert isinstance(per_run([draws[0], draws[1]], [0, 1]), torch.Tensor)  # distinct seeds: stacked as before
