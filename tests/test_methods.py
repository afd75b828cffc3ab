"""Focal loss and hard example mining as envelopes; Value-Weighted Parameter Refinement."""

import json

import pytest
import torch
import torch.nn.functional as F

from envelopes import Envelope, focal_weight
from methods.vwpr import ValueWeightedRefinement
from runner.config import ConfigError, validate
from runner.job import run_job


def test_focal_envelope_equals_focal_loss_value():
    torch.manual_seed(0)
    logits, target = torch.randn(64, 5), torch.randint(0, 5, (64,))
    ce = F.cross_entropy(logits, target, reduction="none")
    p = torch.softmax(logits, 1).gather(1, target[:, None]).squeeze(1)
    focal = -((1 - p) ** 2) * torch.log(p)
    torch.testing.assert_close(Envelope("focal", gamma=2.0)(ce), focal)


def test_focal_envelope_gradient_is_focal_gradient_with_the_modulating_factor_detached():
    torch.manual_seed(0)
    logits, target = torch.randn(64, 5, requires_grad=True), torch.randint(0, 5, (64,))
    gamma = 2.0

    def grad_of(loss):
        (g,) = torch.autograd.grad(loss.sum(), logits, retain_graph=True)
        return g

    ce = F.cross_entropy(logits, target, reduction="none")
    p = torch.softmax(logits, 1).gather(1, target[:, None]).squeeze(1)
    envelope_grad = grad_of(Envelope("focal", gamma=gamma)(ce))
    detached_focal = grad_of(-((1 - p) ** gamma).detach() * torch.log(p))
    torch.testing.assert_close(envelope_grad, detached_focal)
    # The full focal loss also differentiates (1 - p)^gamma: that term is what an envelope leaves out.
    full_focal = grad_of(-((1 - p) ** gamma) * torch.log(p))
    modulating_term = grad_of(((1 - p) ** gamma) * ce.detach())
    torch.testing.assert_close(full_focal, detached_focal + modulating_term)
    assert (full_focal - envelope_grad).abs().max() > 1e-3
    # full_gradient=True is the published focal loss, gradient included
    published = Envelope("focal", gamma=gamma, full_gradient=True)
    torch.testing.assert_close(grad_of(published(ce)), full_focal)
    torch.testing.assert_close(published.weight, ((1 - p) ** gamma).detach())
    assert published.config() == {"shape": "focal", "gamma": gamma, "full_gradient": True}
    with pytest.raises(ValueError, match="full_gradient applies to shape 'focal' only, got shape 'step'"):
        Envelope("step", threshold=1.0, full_gradient=True)


def test_focal_weight_range_monotone_and_errors():
    loss = torch.linspace(-1, 10, 1000)
    w = focal_weight(loss, 2.0)
    assert (w >= 0).all() and (w <= 1).all() and (w[1:] >= w[:-1]).all() and w[0] == 0
    assert Envelope("focal", gamma=0.0)(torch.tensor([0.5, 2.0])).tolist() == [0.5, 2.0]
    with pytest.raises(ValueError, match="shape 'focal' needs gamma"):
        Envelope("focal")
    with pytest.raises(ValueError, match="gamma must be >= 0, got -1"):
        Envelope("focal", gamma=-1.0)
    assert Envelope("step", threshold=1.0, gamma=3.0).config() == {"shape": "step", "threshold": 1.0}


@pytest.mark.parametrize("n, k", [(100, 0.3), (1000, 0.1), (50, 0.5), (256, 0.25)])
def test_hard_mining_is_an_unsmoothed_adaptive_step(n, k):
    torch.manual_seed(n)
    loss = torch.randn(n)
    keep = int(round(k * n))
    ohem = torch.zeros(n)
    ohem[loss.topk(keep).indices] = 1.0
    weight = Envelope("step", quantile=1 - k, step_size=1.0).compute_weight(loss)
    assert torch.equal(weight, ohem)
    mining = Envelope("hard_mining", fraction=k)
    assert torch.equal(mining.compute_weight(loss), ohem)
    assert mining.config() == {"shape": "hard_mining", "fraction": k} and mining.state_dict() == {}


def test_hard_mining_errors():
    with pytest.raises(ValueError, match="shape 'hard_mining' needs fraction"):
        Envelope("hard_mining")
    with pytest.raises(ValueError, match=r"fraction must lie in \(0, 1\], got 1.5"):
        Envelope("hard_mining", fraction=1.5)


def make_problem():
    torch.manual_seed(0)
    x = torch.randn(512, 6)
    y = x @ torch.randn(6, 1) + 0.1 * torch.randn(512, 1)
    model = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    return x, y, model


@pytest.mark.parametrize("per_element", [False, True])
@pytest.mark.parametrize("normalise", [False, True])
def test_vwpr_training_loss_goes_down(per_element, normalise):
    x, y, model = make_problem()
    vwpr = ValueWeightedRefinement(
        model, per_element=per_element, normalise=normalise, l1=0.01, clip=5.0, lr=0.01, track_history=True
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    start = F.mse_loss(model(x), y).item()
    for _ in range(200):
        out = vwpr.dual_step(F.mse_loss(model(x), y), optimizer)
    assert F.mse_loss(model(x), y).item() < 0.1 * start
    assert len(out["phi"]) == len(out["error_signals"]) == 4
    phi = vwpr.phi_values()
    assert (phi > 0).all() and phi.max() <= 5.0
    if normalise and not per_element:
        assert vwpr.phi_values().mean().item() == pytest.approx(1.0, abs=0.3)  # the clip can lower the mean
    assert vwpr.get_phi_history().shape == (200, 4)
    assert [p.shape for p in vwpr.phi_params()] == ([p.shape for p in model.parameters()] if per_element else [()] * 4)


def test_vwpr_scales_each_gradient_by_its_weight_and_grows_weights_with_the_error_signal():
    x, y, model = make_problem()
    vwpr = ValueWeightedRefinement(model, normalise=False, lr=0.1)
    plain = [torch.autograd.grad(F.mse_loss(model(x), y), p)[0] for p in model.parameters()]
    signals = torch.stack([g.abs().mean() for g in plain])

    class Capture(torch.optim.SGD):
        def step(self, closure=None):
            self.captured = [p.grad.clone() for p in self.param_groups[0]["params"]]

    optimizer = Capture(model.parameters(), lr=0.0)
    out = vwpr.dual_step(F.mse_loss(model(x), y), optimizer)
    for grad, base, weight in zip(optimizer.captured, plain, out["phi"]):
        torch.testing.assert_close(grad, base * weight)
    phi = torch.stack(out["phi"])
    # one Adam step moves every weight by about lr, upward (the objective rewards every positive signal)
    assert (phi > 1.0).all()
    torch.testing.assert_close(torch.stack(out["error_signals"]), signals)


def test_vwpr_errors():
    _, _, model = make_problem()
    with pytest.raises(ValueError, match="l1 must be >= 0, got -1"):
        ValueWeightedRefinement(model, l1=-1)
    with pytest.raises(RuntimeError, match="track_history=True"):
        ValueWeightedRefinement(model).get_phi_history()


def test_vwpr_in_the_runner(compose, tmp_path):
    cfg = compose("task.epochs=3", "tensorboard=false", "vwpr.enabled=true", "vwpr.per_element=true", "vwpr.clip=4")
    run_job(cfg, tmp_path, None, [], reraise=True)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"vwpr_phi_mean", "vwpr_phi_min", "vwpr_phi_max"} <= set(rows[-1]) and rows[-1]["vwpr_phi_max"] <= 4.0
    assert (tmp_path / "figures" / "phi_distribution.png").stat().st_size > 1000
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["effective"]["vwpr"]["per_element"] is True
    with pytest.raises(ConfigError, match="vwpr.lr must be > 0, got 0.0"):
        validate(compose("vwpr.enabled=true", "vwpr.lr=0"))


def test_vwpr_settings_do_not_split_configs_when_off(compose):
    from runner.config import config_id, effective_config

    def cid(*overrides):
        cfg = compose(*overrides)
        return config_id(effective_config(cfg, validate(cfg)))

    assert cid() == cid("vwpr.lr=0.5", "vwpr.l1=0.1")
    assert cid("vwpr.enabled=true") != cid("vwpr.enabled=true", "vwpr.lr=0.5")
