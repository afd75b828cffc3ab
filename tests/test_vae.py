"""The VAE task: exact training size, free bits = static step, every envelope axis matters, drift."""

import json
import math

import pytest
import torch

from envelopes import Envelope
from runner.job import run_job
from tasks.vae import VAE, class_weights, effective_rank, elementwise_losses, load_data, vae_loss
from tests.conftest import SHARED_DATA, needs_mnist

TINY = ("tensorboard=false", f"data_root={SHARED_DATA}", "task.epochs=2", "task.val_size=300")


def identity_envelopes():
    return {name: Envelope("identity") for name in ("recon", "prior", "total")}


@needs_mnist
def test_trains_on_exactly_train_size_images(compose, tmp_path):
    cfg = compose("task=vae_overparameterised", *TINY)
    data = load_data(cfg.task, 0, torch.device("cpu"))
    assert data["train_x"].shape == (200, 784) and data["val_x"].shape == (300, 784)
    assert set(data["train_x"].unique().tolist()) == {0.0, 1.0}  # binarised
    run_job(cfg, tmp_path, None, [], reraise=True)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_samples"] for r in rows] == [200, 200]


def test_free_bits_equals_a_static_step_envelope_on_prior():
    torch.manual_seed(0)
    model = VAE(784, [64, 32], 8)
    x = (torch.rand(50, 784) > 0.5).float()
    noise = torch.randn(50, 8, generator=torch.Generator().manual_seed(1))  # the same reparameterisation noise for both
    _, kl, _ = elementwise_losses(model, x, noise)
    ordered = kl.detach().flatten().sort().values
    lam = (ordered[199] + ordered[200]).item() / 2  # between two elements: half the KL terms lie below
    grads = []
    for free_bits, prior in ((lam, Envelope("identity")), (None, Envelope("step", threshold=lam))):
        model.zero_grad()
        recon, kl, _ = elementwise_losses(model, x, noise)
        envelopes = {**identity_envelopes(), "prior": prior}
        loss, _, _, _ = vae_loss(recon, kl, envelopes, 1.0, free_bits)
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert (kl < lam).float().mean().item() == 0.5
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@needs_mnist
@pytest.mark.parametrize("loss", ["recon", "prior", "total"])
def test_every_envelope_axis_changes_training(compose, tmp_path, loss):
    baseline = run_job(compose("task=vae_overparameterised", *TINY), tmp_path / "identity", None, [], reraise=True)
    shaped = run_job(
        compose(
            "task=vae_overparameterised", *TINY, f"envelope@envelopes.{loss}=step", f"envelopes.{loss}.quantile=0.5"
        ),
        tmp_path / loss,
        None,
        [],
        reraise=True,
    )
    assert shaped != baseline
    rows = [json.loads(line) for line in (tmp_path / loss / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1][f"envelope_{loss}_mean_weight"] < 0.9


def test_kl_weight_anneals_linearly():
    from tasks.vae import vae_loss as loss_fn

    recon, kl = torch.ones(2, 3), torch.ones(2, 4)
    for weight, expected in ((0.0, 3.0), (0.5, 5.0), (1.0, 7.0)):
        loss, *_ = loss_fn(recon, kl, identity_envelopes(), weight, None)
        assert loss.item() == expected


@needs_mnist
def test_kl_annealing_and_metrics_in_a_run(compose, tmp_path):
    cfg = compose("task=vae_overparameterised", *TINY, "task.kl_annealing_steps=8")
    run_job(cfg, tmp_path, None, [], reraise=True)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_kl_weight"] for r in rows] == [0.5, 1.0]  # 4 steps per epoch of 200 images, batch 50
    last = rows[-1]
    for key in ("val_recon", "val_kl", "val_elbo", "val_effective_rank", "val_active_units", "val_kl_dim_7"):
        assert key in last, key
    assert last["val_elbo"] == pytest.approx(-(last["val_recon"] + last["val_kl"]))
    assert 1.0 <= last["val_effective_rank"] <= 8.0 and 0 <= last["val_active_units"] <= 8


def test_effective_rank_known_values():
    torch.manual_seed(0)
    isotropic = torch.randn(20000, 3)
    assert effective_rank(isotropic) == pytest.approx(3.0, rel=0.01)
    line = torch.randn(1000, 1) * torch.tensor([[1.0, 2.0, 3.0]])
    assert effective_rank(line) == pytest.approx(1.0, abs=1e-6)


def test_class_weights_move_sinusoidally_and_normalise():
    phase, shift = torch.zeros(10), torch.zeros(10)
    weights = [class_weights(e, phase, shift, 0.5, 0.25) for e in range(5)]
    for w in weights:
        assert w.sum().item() == pytest.approx(1.0) and (w > 0).all()
    phase = torch.linspace(0, math.pi, 10)
    w0, w1 = class_weights(0, phase, shift, 0.5, 0.25), class_weights(1, phase, shift, 0.5, 0.25)
    assert not torch.allclose(w0, w1)
    assert torch.allclose(
        class_weights(0, phase, shift, 0.5, 0.25), class_weights(4, phase, shift, 0.5, 0.25), atol=1e-6
    )


@needs_mnist
def test_drift_setting_resamples_and_reports_three_distributions(compose, tmp_path):
    cfg = compose("task=vae_drift", *TINY, "task.drift_pool_size=1000", "task.train_size=500", "task.epochs=3")
    run_job(cfg, tmp_path, None, [], reraise=True)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_samples"] for r in rows] == [500, 500, 500]
    for key in ("val_recon", "val_recon_current", "val_recon_cumulative", "drift_class_weight_0"):
        assert key in rows[-1], key
    weights = [[r[f"drift_class_weight_{c}"] for c in range(10)] for r in rows]
    assert weights[0] != weights[1] and sum(weights[0]) == pytest.approx(1.0)


def test_image_grids_reach_tensorboard_tiled(tmp_path):
    from types import SimpleNamespace

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from tasks.vae import VAE, log_images

    writer = SummaryWriter(log_dir=str(tmp_path))
    model = VAE(784, [32], 4)
    val_x = torch.rand(20, 784)
    log_images(model, val_x, torch.Generator().manual_seed(0), SimpleNamespace(epochs=3, latent_dim=4), writer)
    writer.close()
    accumulator = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    accumulator.Reload()
    assert set(accumulator.Tags()["images"]) == {"images/reconstructions", "images/samples"}
    (pairs,) = accumulator.Images("images/reconstructions")
    (samples,) = accumulator.Images("images/samples")
    assert pairs.step == 3
    # 32 images (16 shown over 16 reconstructions) and 32 samples, each tiled 8 to a row of 28-pixel tiles
    assert (
        pairs.width > 4 * 28
        and pairs.height > 3 * 28
        and (samples.width, samples.height) == (pairs.width, pairs.height)
    )


@needs_mnist
def test_the_fixed_split_takes_the_same_images_for_every_seed(compose):
    from tasks.datasets import task_pool

    cfg = compose("task=vae_overparameterised", *TINY, "task.split=fixed", "task.val_start=500")
    pool = (task_pool(cfg.task).features > 0.5).float()
    for seed in (0, 3):
        data = load_data(cfg.task, seed, torch.device("cpu"))
        assert torch.equal(data["train_x"], pool[:200]) and torch.equal(data["val_x"], pool[500:800])
    from runner.config import ConfigError, validate

    with pytest.raises(
        ConfigError, match=r"task.val_start must be >= the 200 training images with split=fixed .*got 100"
    ):
        validate(compose("task=vae_overparameterised", *TINY, "task.split=fixed", "task.val_start=100"))
