"""Focal loss and hard example mining as envelopes; Value-Weighted Parameter Refinement."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from envelopes import Envelope, focal_weight
from methods.vwpr import EnhancedVWPRWrapper
from runner.config import ConfigError, validate
from runner.job import run_job
from tasks.common import optimise


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


@pytest.mark.parametrize("rule", ["document", "bounded"])
@pytest.mark.parametrize("per_element", [False, True])
@pytest.mark.parametrize("normalise", [False, True])
def test_vwpr_training_loss_goes_down(rule, per_element, normalise):
    x, y, model = make_problem()
    vwpr = EnhancedVWPRWrapper(
        model, normalize_phi=normalise, phi_clip_value=5.0, track_history=True, rule=rule, per_element=per_element
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    start = F.mse_loss(vwpr(x), y).item()
    for _ in range(200):
        l_map, phi_vals = vwpr.apply_vwpr_step(F.mse_loss(vwpr(x), y), optimizer)
    assert F.mse_loss(model(x), y).item() < 0.1 * start
    assert list(l_map) == list(phi_vals) == [name for name, _ in model.named_parameters()]
    phi = vwpr.phi_values()
    assert (phi > 0).all() and phi.max() <= 5.0
    assert vwpr.get_phi_history().shape == (200, 4)
    assert [p.shape for p in vwpr.phi_params()] == ([p.shape for p in model.parameters()] if per_element else [()] * 4)


def test_the_wrapper_has_the_documented_interface_and_defaults(tmp_path, monkeypatch):
    import inspect

    monkeypatch.chdir(tmp_path)  # the figure goes to ./figures, which is not the checkout's

    _, _, model = make_problem()
    vwpr = EnhancedVWPRWrapper(model)
    assert vwpr.base_model is model
    defaults = {k: v.default for k, v in inspect.signature(EnhancedVWPRWrapper).parameters.items()}
    assert {k: defaults[k] for k in ("normalize_phi", "l1_lambda", "phi_clip_value", "track_history")} == {
        "normalize_phi": False,
        "l1_lambda": 0.01,
        "phi_clip_value": None,
        "track_history": False,
    }
    x = torch.randn(5, 6)
    torch.testing.assert_close(vwpr(x), model(x))
    figure = vwpr.visualize_phi_distribution(epoch=1)
    assert figure.axes[0].get_xlabel() == "value weight phi"
    assert (tmp_path / "figures" / "phi_distribution_epoch_1.png").is_file()


def test_vwpr_scales_each_gradient_by_its_weight():
    x, y, model = make_problem()
    vwpr = EnhancedVWPRWrapper(model, rule="bounded", alpha=0.1)
    plain = [torch.autograd.grad(F.mse_loss(model(x), y), p)[0] for p in model.parameters()]
    signals = torch.stack([g.abs().mean() for g in plain])

    class Capture(torch.optim.SGD):
        def step(self, closure=None):
            self.captured = [p.grad.clone() for p in self.param_groups[0]["params"]]

    optimizer = Capture(model.parameters(), lr=0.0)
    l_map, phi_vals = vwpr.apply_vwpr_step(F.mse_loss(model(x), y), optimizer)
    for grad, base, weight in zip(optimizer.captured, plain, phi_vals.values()):
        torch.testing.assert_close(grad, base * weight)
    torch.testing.assert_close(torch.stack(list(l_map.values())), signals / signals.mean())


def _constant_signal_steps(vwpr: EnhancedVWPRWrapper, steps: int) -> list[float]:
    """Steps with gradients of fixed size (an SGD of rate 0 leaves the model where it is)."""
    model = vwpr.base_model
    x, y = torch.randn(32, 6, generator=torch.Generator().manual_seed(0)), torch.zeros(32, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    for _ in range(steps):
        _, phi_vals = vwpr.apply_vwpr_step(F.mse_loss(model(x) + 1.0, y), optimizer)
    return [float(v) for v in phi_vals.values()]


def test_the_document_rule_grows_without_bound_and_ignores_lambda():
    phis = {}
    for l1 in (0.0, 0.5):
        _, _, model = make_problem()
        phis[l1] = _constant_signal_steps(EnhancedVWPRWrapper(model, rule="document", l1_lambda=l1), 400)
    assert phis[0.0] == phis[0.5]  # lambda changes nothing, as written
    _, _, model = make_problem()
    vwpr = EnhancedVWPRWrapper(model, rule="document")
    first, second = _constant_signal_steps(vwpr, 400), _constant_signal_steps(vwpr, 400)
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(0))
    l_map, _ = vwpr.apply_vwpr_step(
        F.mse_loss(model(x) + 1.0, torch.zeros(32, 1)), torch.optim.SGD(model.parameters(), lr=0.0)
    )
    # softplus(phi + a l) > phi + a l: phi climbs by more than a l every step, with no end in sight
    for before, after, signal in zip(first, second, l_map.values()):
        assert before > 1.0 and after - before > 0.99 * 400 * 0.01 * float(signal)


def test_the_bounded_rule_settles_at_one_plus_signal_over_strength_without_clipping():
    finals = {}
    for strength in (1.0, 4.0):
        _, _, model = make_problem()
        vwpr = EnhancedVWPRWrapper(model, rule="bounded", strength=strength, alpha=0.05)
        finals[strength] = _constant_signal_steps(vwpr, 1500)
        l_map, _ = vwpr.apply_vwpr_step(
            F.mse_loss(model(torch.zeros(1, 6)) + 1.0, torch.zeros(1, 1)), torch.optim.SGD(model.parameters(), lr=0.0)
        )
    _, _, model = make_problem()
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(0))
    grads = torch.autograd.grad(F.mse_loss(model(x) + 1.0, torch.zeros(32, 1)), list(model.parameters()))
    signal = torch.stack([g.abs().mean() for g in grads])
    signal = signal / signal.mean()
    for strength, phi in finals.items():
        torch.testing.assert_close(torch.tensor(phi), 1.0 + signal / strength, rtol=0.02, atol=0.02)
    assert finals[1.0] != finals[4.0]  # the regularisation's strength moves phi


def test_vwpr_errors():
    _, _, model = make_problem()
    with pytest.raises(ValueError, match="l1 must be >= 0, got -1"):
        EnhancedVWPRWrapper(model, l1_lambda=-1)
    with pytest.raises(ValueError, match=r"rule must be one of \['document', 'bounded'\], got 'adam'"):
        EnhancedVWPRWrapper(model, rule="adam")
    with pytest.raises(ValueError, match="strength must be > 0"):
        EnhancedVWPRWrapper(model, rule="bounded", strength=0)
    with pytest.warns(UserWarning, match="construct the wrapper with track_history=True to keep one"):
        assert EnhancedVWPRWrapper(model).get_phi_history().shape == (0, 4)


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


def _parameters_after(optimizer_name: str, vwpr_on: bool, steps: int = 20) -> torch.Tensor:
    from tasks.common import make_optimizer
    from tasks.regression import RegressionConfig

    x, y, model = make_problem()
    optimizer = make_optimizer(model.parameters(), RegressionConfig(optimizer=optimizer_name, lr=1e-2))
    vwpr = EnhancedVWPRWrapper(model, rule="bounded", alpha=0.1) if vwpr_on else None
    for _ in range(steps):
        optimise(F.mse_loss(model(x), y), optimizer, vwpr)
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_vwpr_moves_parameters_under_sgd_where_adam_cancels_it():
    """Adam divides each element's step by its own gradient scale: a weight on a whole tensor cancels."""
    _, _, model = make_problem()
    start = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    relative = {}
    for name in ("adam", "sgd"):
        plain = _parameters_after(name, False, steps=1)
        relative[name] = ((_parameters_after(name, True, steps=1) - plain).norm() / (plain - start).norm()).item()
    assert relative["adam"] < 1e-4 and relative["sgd"] > 1e-2


# VWPR's documented usage, as its document writes it: the import, two optimisers, a step, a figure each step, the
# history at the end
DOCUMENTED_USAGE = """
import torch
from enhanced_vwpr_wrapper import EnhancedVWPRWrapper

base_model = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
model = EnhancedVWPRWrapper(base_model, normalize_phi=False, l1_lambda=0.01, phi_clip_value=None, track_history=False)
optimizer_theta = torch.optim.Adam(model.base_model.parameters(), lr=1e-3)
optimizer_phi = torch.optim.Adam(model.phi_params(), lr=1e-2)
x, y = torch.randn(64, 6), torch.randn(64, 1)
for epoch in range(5):
    for step in range(5):
        base_loss = torch.nn.functional.mse_loss(model(x), y)
        l_map, phi_vals = model.apply_vwpr_step(base_loss, optimizer_theta, optimizer_phi)
        model.visualize_phi_distribution(epoch)
history = model.get_phi_history()
"""


def test_the_documented_usage_runs_as_written_and_learns_phi_with_optimizer_phi(tmp_path):
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    check = "\nprint(sorted(round(float(p.detach()), 6) for p in model.phi_params()), tuple(history.shape))\n"
    proc = subprocess.run(
        [sys.executable, "-c", DOCUMENTED_USAGE + check],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "More than 20 figures" not in proc.stderr and "track_history=True" in proc.stderr
    raw = json.loads(proc.stdout.split(" (")[0])
    start = math.log(math.e - 1.0)  # phi = softplus(raw) = 1 at the start
    assert all(abs(r - start) > 1e-4 for r in raw)  # optimizer_phi stepped every weight
    assert proc.stdout.strip().endswith("(0, 4)")
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == [
        f"phi_distribution_epoch_{e}.png" for e in range(5)
    ]


def test_an_optimizer_phi_that_the_document_rule_would_never_step_is_refused():
    x, y, model = make_problem()
    vwpr = EnhancedVWPRWrapper(model, rule="document")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match="optimizer_phi: the document rule sets phi by its own formula"):
        vwpr.apply_vwpr_step(F.mse_loss(vwpr(x), y), optimizer, torch.optim.Adam(vwpr.phi_params(), lr=0.01))
    assert all(p.grad is None for p in model.parameters())  # refused before anything ran
