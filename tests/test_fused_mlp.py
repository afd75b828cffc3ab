"""The fused CPU kernels (tasks/fused_mlp.py): torch's networks to rounding, each network its own, bad input refused."""

import pytest
import torch

from tasks import fused_mlp
from tasks.ppo_networks import ActorCritic, agent_networks

pytestmark = pytest.mark.skipif(
    fused_mlp.missing_tools() is not None, reason="building the fused kernels needs a C++ compiler and ninja"
)


def unpadded(tensor, like):
    """The torch path's tensor without the zero rows its first layer is padded with (the fused path has none)."""
    return tensor[:, : like.shape[1]] if tensor.shape != like.shape else tensor


def pair(agents, observation, hidden, actions, seed=0):
    networks = agent_networks(list(range(seed, seed + agents)), observation, list(hidden), actions, "torch")
    cpu = torch.device("cpu")
    return ActorCritic(*networks, cpu), ActorCritic(*networks, cpu, fused=True)


@pytest.mark.parametrize(
    "observation, actions, hidden, rows",
    [(6, 3, (64, 64), 100), (8, 4, (64, 64), 7), (4, 2, (16,), 33), (6, 3, (32, 16, 48), 10), (6, 3, (64, 64), 1)],
)
def test_fused_networks_give_torchs_outputs_and_gradients_to_rounding(observation, actions, hidden, rows):
    # outputs of both networks, of the actors and of the critics alone, and every parameter's gradient, against
    # the torch path's; rows not a multiple of 4 (the kernel's row blocks) and widths of 1 to 4 vectors included
    torch.manual_seed(1)
    reference, fused = pair(5, observation, hidden, actions)
    x = torch.randn(5, rows, observation) * 2
    logits, values = reference(x)
    fused_logits, fused_values = fused(x)
    torch.testing.assert_close(fused_logits, logits, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(fused_values, values, rtol=1e-5, atol=2e-6)
    upstream = torch.randn_like(logits), torch.randn_like(values)
    expected = torch.autograd.grad((logits * upstream[0]).sum() + (values * upstream[1]).sum(), reference.parameters())
    got = torch.autograd.grad(
        (fused_logits * upstream[0]).sum() + (fused_values * upstream[1]).sum(), fused.parameters()
    )
    for ours, theirs in zip(got, expected):
        torch.testing.assert_close(ours, unpadded(theirs, ours), rtol=1e-4, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(fused.actor(x), reference.actor(x), rtol=1e-5, atol=2e-6)
        torch.testing.assert_close(fused.critic(x), reference.critic(x), rtol=1e-5, atol=2e-6)
        assert torch.equal(fused.actor(x), fused_logits) and torch.equal(fused.critic(x), fused_values)


def test_each_network_computes_alone_exactly_what_it_computes_in_a_stack():
    # agent 3 of a stack of 7 and the same agent in a stack of its own: bit for bit, outputs and gradients
    _, group = pair(7, 6, (64, 64), 3)
    _, alone = pair(1, 6, (64, 64), 3, seed=3)
    x = torch.randn(7, 100, 6)
    logits, values = group(x)
    own_logits, own_values = alone(x[3:4])
    assert torch.equal(logits[3], own_logits[0]) and torch.equal(values[3], own_values[0])
    (logits.square().sum() + values.sin().sum()).backward()
    (own_logits.square().sum() + own_values.sin().sum()).backward()
    for stacked, own in zip(group.parameters(), alone.parameters()):
        assert torch.equal(stacked.grad[3], own.grad[0])  # the actor
        assert torch.equal(stacked.grad[10], own.grad[1])  # the critic (network 7 + 3)


def test_the_kernels_tanh_is_within_its_stated_error_saturates_and_passes_on_non_finite_values():
    # one layer of weights 1 from one input to 16: each of a row's outputs is tanh of that row's input
    z = torch.cat([torch.linspace(-12, 12, 4096), torch.tensor([-50.0, 50.0, float("inf"), float("nan")])])
    ones, head, head_bias = torch.ones(1, 1, 16), torch.zeros(1, 1, 16), torch.zeros(1, 1, 1)
    _, hidden = fused_mlp.extension().forward(
        z.reshape(1, -1, 1), [ones], [torch.zeros(1, 1, 16)], head, head_bias, True
    )
    hidden, exact = hidden[0], torch.tanh(z.double())[:, None].expand(-1, 16)
    assert (hidden.double() - exact)[:4096].abs().max() <= 1.8e-7
    assert torch.all(hidden[4096:4099] == torch.tensor([[-1.0], [1.0], [1.0]])) and torch.isnan(hidden[4099]).all()


def test_fused_networks_train_with_adam_as_torchs_do_and_keep_the_critics_unused_rows_at_zero():
    # three Adam steps each: the parameters stay within rounding of the torch path's (whose first layer is padded
    # to 8 inputs), the rows below each critic's value at zero
    reference, fused = pair(4, 6, (64, 64), 3)
    optimisers = [torch.optim.Adam(net.parameters(), lr=0.01) for net in (reference, fused)]
    for _ in range(3):
        x = torch.randn(4, 50, 6)
        for net, optimiser in zip((reference, fused), optimisers):
            logits, values = net(x)
            optimiser.zero_grad()
            (logits.square().sum() + values.sin().sum()).backward()
            optimiser.step()
    for ours, theirs in zip(fused.parameters(), reference.parameters()):
        torch.testing.assert_close(ours, unpadded(theirs, ours), rtol=1e-4, atol=1e-5)
    assert fused.padding == 0 and fused.weights[0].shape[1] == 6  # the kernels take 6 inputs as they are
    assert torch.all(fused.head_weight[4:, 1:] == 0)


def test_bad_shapes_are_refused_with_what_is_wrong():
    x, head, head_bias = torch.randn(2, 5, 8), torch.randn(2, 3, 24), torch.zeros(2, 3, 1)
    with pytest.raises(RuntimeError, match="hidden width 24 is not a multiple of 16"):
        fused_mlp.extension().forward(x, [torch.randn(2, 8, 24)], [torch.zeros(2, 1, 24)], head, head_bias, False)
    with pytest.raises(RuntimeError, match="x must be a float32 CPU tensor"):
        fused_mlp.extension().forward(
            x.double(), [torch.randn(2, 8, 16)], [torch.zeros(2, 1, 16)], head, head_bias, False
        )
    assert fused_mlp.unsupported([64, 64]) is None
    assert fused_mlp.unsupported([64, 60]) == "hidden widths must be multiples of 16, got [64, 60]"
    with pytest.raises(ValueError, match="the fused kernels run on the CPU"):
        ActorCritic(*agent_networks([0], 6, [64], 3), torch.device("meta"), fused=True)


def test_kernels_are_checked_before_training_with_the_allowed_values(compose, monkeypatch):
    from runner.config import ConfigError, validate

    with pytest.raises(ConfigError, match=r"^kernels: must be one of \['auto', 'fused', 'torch'\], got 'fast'$"):
        validate(compose("task=cartpole", "kernels=fast"))
    with pytest.raises(ConfigError, match=r"kernels: task 'classification' has no fused kernels; .* \['ppo'\]"):
        validate(compose("task=digits", "kernels=fused"))
    with pytest.raises(ConfigError, match=r"kernels: compile=true compiles torch's own kernels"):
        validate(compose("task=cartpole", "kernels=fused", "compile=true", "device=cpu"))
    with pytest.raises(ConfigError, match=r"kernels: the fused kernels cannot run this task's networks: hidden widths"):
        validate(compose("task=cartpole", "kernels=fused", "task.hidden=[64,60]", "device=cpu"))
    validate(compose("task=cartpole", "kernels=auto", "task.hidden=[64,60]"))  # auto takes torch's kernels there
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    with pytest.raises(ConfigError, match=r"kernels: the fused kernels run on the CPU, and this run's device is CUDA"):
        validate(compose("task=cartpole", "kernels=fused"))
    monkeypatch.setattr("tasks.fused_mlp._ninja", lambda: None)
    with pytest.raises(
        ConfigError, match=r"kernels: .* and ninja is not installed \(pip install -r requirements.txt\)"
    ):
        validate(compose("task=cartpole", "kernels=fused", "device=cpu"))
    monkeypatch.setattr("shutil.which", lambda name, **kwargs: None)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(
        ConfigError, match=r"kernels: the fused kernels are built on this machine, and none of the C\+\+"
    ):
        validate(compose("task=cartpole", "kernels=fused", "device=cpu"))


def test_auto_takes_the_fused_kernels_only_where_they_run(compose, monkeypatch):
    from runner.config import resolve_kernels

    cpu = torch.device("cpu")
    assert resolve_kernels(compose("task=cartpole"), cpu) == "fused"
    assert resolve_kernels(compose("task=cartpole", "kernels=torch"), cpu) == "torch"
    assert resolve_kernels(compose("task=cartpole", "compile=true"), cpu) == "torch"
    assert resolve_kernels(compose("task=cartpole", "task.hidden=[48,40]"), cpu) == "torch"
    assert resolve_kernels(compose("task=cartpole"), torch.device("cuda")) == "torch"
    assert resolve_kernels(compose("task=digits"), cpu) == "torch"
    monkeypatch.setattr("tasks.fused_mlp._ninja", lambda: None)
    assert resolve_kernels(compose("task=cartpole"), cpu) == "torch"  # no ninja
    monkeypatch.undo()
    monkeypatch.setattr("shutil.which", lambda name, **kwargs: None)
    monkeypatch.delenv("CXX", raising=False)
    assert resolve_kernels(compose("task=cartpole"), cpu) == "torch"  # no compiler


def test_a_fused_run_is_the_same_run_as_a_torch_one_to_rounding(compose, tmp_path):
    # kernels change rounding, not what is trained: the same run id; the first update (the initial networks act
    # on the same episodes) has the same losses to rounding; result.json records the kernels
    import json

    from runner.job import run_job

    args = ("task=cartpole", "tensorboard=false", "task.rollout_steps=100", "task.minibatch_size=50")
    args = (*args, "task.update_epochs=2", "task.total_steps=600", "envelope@envelopes.policy=sigmoid")
    for kernels in ("torch", "fused"):
        run_job(compose(*args, f"kernels={kernels}"), tmp_path / kernels, None, [], reraise=True)
    results = {k: json.loads((tmp_path / k / "result.json").read_text()) for k in ("torch", "fused")}
    assert results["torch"]["run_id"] == results["fused"]["run_id"]
    assert results["torch"]["kernels"] == "torch" and results["fused"]["kernels"] == "fused"
    rows = {
        k: [json.loads(line) for line in (tmp_path / k / "metrics.jsonl").read_text().splitlines()] for k in results
    }
    for key in ("train_policy_raw_loss_mean", "train_value_raw_loss_mean", "envelope_policy_threshold"):
        assert rows["fused"][0][key] == pytest.approx(rows["torch"][0][key], rel=1e-4, abs=1e-6), key


def test_each_checkout_and_each_source_has_its_own_build(tmp_path):
    # torch rebuilds a name whose source path changed: two checkouts must not share one
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for folder in ("a", "b"):
        (tmp_path / folder / "fused_mlp.cpp").write_bytes(fused_mlp.SOURCE.read_bytes())
    a, b = (fused_mlp.build_name(tmp_path / folder / "fused_mlp.cpp") for folder in ("a", "b"))
    assert a != b and a == fused_mlp.build_name(tmp_path / "a" / "fused_mlp.cpp")
    (tmp_path / "a" / "fused_mlp.cpp").write_text("// changed")
    assert fused_mlp.build_name(tmp_path / "a" / "fused_mlp.cpp") != a
