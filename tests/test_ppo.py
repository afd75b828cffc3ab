"""PPO: GAE, truncation, episode statistics without NaN, envelopes and options change training."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from runner.config import ConfigError, validate
from runner.job import run_job
from tasks.common import make_optimizer
from tasks.ppo import bootstrap_time_limits, critic_values, gae
from tasks.ppo_envs import acrobot_observation
from tasks.ppo_networks import ActorCritic, agent_networks, tanh_layer

pytest.importorskip("gymnasium")

SMALL = ("tensorboard=false", "task.rollout_steps=100", "task.minibatch_size=50", "task.update_epochs=2")


def rows_of(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_gae_known_values():
    rewards = torch.tensor([[1.0], [1.0], [1.0]])
    values = torch.tensor([[0.5], [0.5], [0.5]])
    dones = torch.tensor([[0.0], [1.0], [0.0]])
    next_value = torch.tensor([2.0])
    advantages, returns = gae(rewards, values, dones, next_value, gamma=0.9, lam=0.5)
    # t=2: delta = 1 + 0.9*2 - 0.5 = 2.3; t=1 (done): delta = 1 - 0.5 = 0.5; t=0: delta = 1 + 0.45 - 0.5 = 0.95, A = 0.95 + 0.45*0.5
    torch.testing.assert_close(advantages, torch.tensor([[0.95 + 0.45 * 0.5], [0.5], [2.3]]))
    torch.testing.assert_close(returns, advantages + values)


def test_log_probabilities_are_log_softmax_over_the_actions_with_its_gradient():
    from tasks.ppo import log_probabilities

    logits = (torch.randn(7, 50, 3, dtype=torch.float64) * 5).requires_grad_()
    ours, theirs = log_probabilities(logits), torch.log_softmax(logits, -1)
    assert ours.shape == theirs.shape == (7, 50, 3)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    upstream = torch.randn_like(theirs)
    (got,) = torch.autograd.grad((ours * upstream).sum(), logits)
    (expected,) = torch.autograd.grad((theirs * upstream).sum(), logits)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_the_cpu_tanh_layer_is_tanh_within_its_stated_error_with_autograds_gradients():
    # tanh(bias + x @ weight) as 2 sigmoid(2z) - 1: within 1.8e-7 of the exact tanh (float64) of z over the range
    # pre-activations take, and saturating to exactly +-1; gradients those autograd gives torch's tanh
    torch.manual_seed(0)
    x, weight, bias = torch.randn(3, 400, 8) * 4, torch.randn(3, 8, 16), torch.randn(3, 1, 16)
    exact = torch.tanh(torch.baddbmm(bias, x, weight).double())  # of the same float32 pre-activation
    fast = tanh_layer(x, weight, bias)
    assert (fast.double() - exact).abs().max() <= 1.8e-7
    assert (fast.double() - exact).abs().max() > 0  # not torch's tanh
    assert tanh_layer(torch.full((1, 1, 1), 50.0), torch.ones(1, 1, 1), torch.zeros(1, 1, 1)).item() == 1.0
    assert tanh_layer(torch.full((1, 1, 1), -50.0), torch.ones(1, 1, 1), torch.zeros(1, 1, 1)).item() == -1.0
    double = [t.double().requires_grad_() for t in (x[:, :5], weight, bias)]
    assert torch.autograd.gradcheck(tanh_layer, double)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    upstream = torch.randn(3, 400, 16)
    tanh_layer(*leaves).backward(upstream)
    reference = [t.clone().requires_grad_() for t in (x, weight, bias)]
    torch.tanh(torch.baddbmm(reference[2], reference[0], reference[1])).backward(upstream)
    for ours, theirs in zip(leaves, reference):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=2e-5)
    with torch.no_grad():  # the rollout's path, without autograd, computes the same values
        assert torch.equal(tanh_layer(x, weight, bias), fast)


@pytest.mark.parametrize("observation, actions, hidden", [(6, 3, (64, 64)), (8, 4, (16,)), (4, 2, (8, 8, 8))])
def test_the_actor_critic_stack_is_each_agents_own_networks_and_its_padding_stays_zero(observation, actions, hidden):
    # Every agent's logits and value are its own actor's and critic's (nn.Sequential with torch's tanh), for a
    # batch of samples and for the rollout's one observation, before and after optimiser steps with every
    # optimiser the task makes (fused Adam, which leaves tensors' version counters alone, and SGD) and with
    # foreach Adam; the zero rows of the padded first layer and below each critic's value row stay zero.
    def check_against_own_networks(net, actors, critics, rtol=1e-5, atol=1e-6):
        for rows in (100, 1):
            x = torch.randn(5, rows, observation)
            with torch.no_grad():
                logits, values = net(x)
                for k in range(5):
                    torch.testing.assert_close(logits[k], actors[k](x[k]), rtol=rtol, atol=atol)
                    torch.testing.assert_close(values[k], critics[k](x[k]).squeeze(-1), rtol=rtol, atol=atol)
            with torch.inference_mode():  # the rollout's path: both networks, and the actors or critics alone
                assert torch.equal(net(x)[0], logits) and torch.equal(net(x)[1], values)
                torch.testing.assert_close(net.actor(x), logits, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(net.critic(x), values, rtol=1e-5, atol=1e-6)

    def own_networks(net):  # each agent's actor and critic made again from the stacked tensors
        actors, critics = agent_networks(list(range(5)), observation, list(hidden), actions)
        with torch.no_grad():
            for k, module in enumerate(actors + critics):
                linears = [m for m in module if isinstance(m, nn.Linear)]
                for layer, weight, bias in zip(linears, net.weights, net.biases):
                    layer.weight.copy_(weight[k, :observation].T if layer is linears[0] else weight[k].T)
                    layer.bias.copy_(bias[k, 0])
                linears[-1].weight.copy_(net.head_weight[k, : linears[-1].out_features])
                linears[-1].bias.copy_(net.head_bias[k, : linears[-1].out_features, 0])
        return actors, critics

    actors, critics = agent_networks(list(range(5)), observation, list(hidden), actions)
    net = ActorCritic(actors, critics, torch.device("cpu"))
    check_against_own_networks(net, actors, critics)
    assert net.padding == (-observation) % 8 and net.weights[0].shape[1] == observation + net.padding
    for optimizer in (
        make_optimizer(net.parameters(), SimpleNamespace(optimizer="adam", lr=0.01)),
        make_optimizer(net.parameters(), SimpleNamespace(optimizer="sgd", lr=0.01, momentum=0.9)),
        torch.optim.Adam(net.parameters(), lr=0.01, foreach=True),
    ):
        for _ in range(3):
            logits, values = net(torch.randn(5, 20, observation))
            optimizer.zero_grad()
            (logits.square().sum() + values.sin().sum()).backward()
            optimizer.step()
        assert torch.all(net.head_weight[5:, 1:] == 0) and torch.all(net.head_bias[5:, 1:] == 0)
        assert net.head_weight[5:, 0].abs().sum() > 0
        assert torch.all(net.weights[0][:, observation:] == 0)
        check_against_own_networks(net, *own_networks(net), rtol=1e-4, atol=1e-5)  # trained: larger outputs


@pytest.mark.parametrize("envs", [1, 3])
def test_a_rollouts_values_after_it_are_those_of_each_step_with_time_limits_bootstrapped(envs):
    # critic_values computes after the rollout what each step would have: every observation's value, the
    # bootstrap value of the one after the last, and gamma V(final observation) added where a time limit alone
    # ended an episode; agent k's environments are columns k * envs ... of the host's (T, K * envs) arrays.
    K, T, observation, gamma = 4, 7, 6, 0.9
    net = ActorCritic(*agent_networks(list(range(K)), observation, [16, 16], 3), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    steps = torch.randn(T, K, envs, observation, generator=g)  # as the rollout stores them: (T, K, N, obs)
    following = torch.randn(K, envs, observation, generator=g)
    finals = torch.randn(T, K * envs, observation, generator=g).numpy()
    rewards = torch.randn(T, K * envs, generator=g).numpy()
    terminated = (torch.rand(T, K * envs, generator=g) < 0.3).numpy()
    truncated = (torch.rand(T, K * envs, generator=g) < 0.4).numpy()
    assert (truncated & ~terminated).any() and (truncated & terminated).any()
    observations = steps.transpose(0, 1).reshape(K, T * envs, observation)

    values, next_value, fed = critic_values(net, observations, following, rewards, terminated, truncated, finals, gamma)
    with torch.no_grad():
        for t in range(T):  # each step as the rollout would compute it then
            step_values = net(steps[t])[1]
            torch.testing.assert_close(values.reshape(K, T, envs)[:, t], step_values, rtol=1e-5, atol=1e-6)
            final_value = net(torch.as_tensor(finals[t]).reshape(K, envs, observation))[1].reshape(-1).numpy()
            expected = bootstrap_time_limits(rewards[t], terminated[t], truncated[t], lambda v=final_value: v, gamma)
            np.testing.assert_allclose(fed[t], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(next_value, net(following)[1], rtol=1e-5, atol=1e-6)
    cut = truncated & ~terminated
    assert np.array_equal(fed[~cut], rewards[~cut]) and not np.allclose(fed[cut], rewards[cut])
    _, _, untouched = critic_values(net, observations, following, rewards, terminated, truncated, finals, None)
    assert np.array_equal(untouched, rewards)  # truncation=terminate: nothing bootstrapped


def test_progress_shows_the_steps_per_second_of_training_not_of_the_rollout_alone(
    compose, tmp_path, caplog, monkeypatch
):
    import logging
    import re
    import sys
    import time

    from runner import recorder

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    monkeypatch.setattr(recorder, "PROGRESS_LOG_INTERVAL_S", 0.0)  # a line every update
    cfg = compose("task=cartpole", "task.total_steps=2000", "task.rollout_steps=100", "tensorboard=false")
    begun = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="runner.recorder"):
        run_job(cfg, tmp_path, None, [], reraise=True)
    wall = time.perf_counter() - begun
    shown = {}
    for record in caplog.records:
        found = re.search(r"(\d+)/20 updates.*, sps (\d+)", record.getMessage())
        if found:
            shown[int(found[1])] = int(found[2])
    # the rollouts' own time so far (each update's charts/rollout_SPS is its rollout's rate)
    rollout_time = np.cumsum([100 / row["charts_rollout_SPS"] for row in rows_of(tmp_path)])
    assert len(shown) >= 10
    for update, sps in shown.items():
        assert sps >= update * 100 / wall * 0.99  # all the steps so far over at most the whole run's time
        assert sps < update * 100 / rollout_time[update - 1]  # and over more than the rollouts' time


def test_cartpole_learns_and_reports_final_phase(compose, tmp_path):
    cfg = compose("task=cartpole", "task.total_steps=15000", "tensorboard=false")
    run_job(cfg, tmp_path, None, [], reraise=True)
    result = json.loads((tmp_path / "result.json").read_text())
    rows = rows_of(tmp_path)
    assert rows[-1]["step"] == 15000 == result["final"]["env_steps"]
    assert result["objective"]["metric"] == "charts_return_ma100" and result["objective"]["mode"] == "max"
    assert result["final"]["charts_return_ma100"] > 40  # a random policy averages about 22
    final_phase = [r["charts_return_ma100"] for r in rows if r["step"] >= 0.9 * 15000]
    assert result["final"]["return_ma100_final_phase"] == pytest.approx(sum(final_phase) / len(final_phase))
    for key in (
        "train_policy_raw_loss_mean",
        "train_value_shaped_loss_mean",
        "losses_approx_kl",
        "losses_clipfrac",
        "losses_explained_variance",
        "charts_rollout_SPS",
        "charts_SPS",
        "charts_episodic_length",
        "envelope_policy_mean_weight",
    ):
        assert key in rows[-1], key


def test_episodic_return_excludes_the_bootstrap_term(compose, tmp_path):
    # CartPole pays 1 per step, so an episode's return equals its length unless the
    # bootstrapped value of a truncated episode leaked into the statistics.
    cfg = compose("task=cartpole", *SMALL, "task.total_steps=2000", "task.max_episode_steps=15")
    run_job(cfg, tmp_path, None, [], reraise=True)
    for row in rows_of(tmp_path):
        assert row["charts_episodic_return"] == row["charts_episodic_length"] <= 15


def test_truncation_bootstrap_differs_from_the_papers_termination(compose, tmp_path):
    args = ("task=cartpole", *SMALL, "task.total_steps=2000", "task.max_episode_steps=15")
    run_job(compose(*args), tmp_path / "a", None, [], reraise=True)
    run_job(compose(*args, "task.truncation=terminate"), tmp_path / "b", None, [], reraise=True)
    a, b = rows_of(tmp_path / "a"), rows_of(tmp_path / "b")
    # the same episodes (same seed, same first policy), but bootstrapped value targets
    assert a[0]["charts_episodic_return"] == b[0]["charts_episodic_return"]
    assert a[0]["train_value_raw_loss_mean"] != b[0]["train_value_raw_loss_mean"]


@pytest.mark.parametrize("backend", ["gymnasium", "envpool"])
def test_a_step_that_terminates_at_the_time_limit_is_not_bootstrapped(backend):
    # CartPole-v1, seed 0, constant action 0 terminates (at step 11 in gymnasium, 8 in EnvPool): with
    # a limit of that many steps both flags are set, and the state is terminal all the same.
    if backend == "envpool":
        pytest.importorskip("envpool")
    from tasks.ppo_envs import Environments

    def feed(limit):
        envs = Environments(backend, "CartPole-v1", [0], 1, limit)
        envs.reset()
        for step in range(1, 600):
            _, reward, terminated, truncated, _, _ = envs.step(np.zeros(1, dtype=np.int64))
            if terminated[0] or truncated[0]:
                fed = bootstrap_time_limits(reward, terminated, truncated, lambda: np.ones(1, dtype=np.float32), 0.99)
                return step, bool(terminated[0]), bool(truncated[0]), float(fed[0])

    natural = feed(None)[0]
    assert feed(None) == (natural, True, False, 1.0)
    assert feed(natural) == (natural, True, True, 1.0)
    assert feed(natural - 3) == (natural - 3, False, True, pytest.approx(1.99))  # cut by the limit alone: bootstrapped


def test_a_rollout_without_an_ending_logs_no_nan(compose, tmp_path):
    # A near-random Acrobot policy needs about 500 steps per episode: 100-step rollouts end none at first.
    cfg = compose("task=acrobot", *SMALL, "task.total_steps=300")
    run_job(cfg, tmp_path, None, [], reraise=True)
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "null" not in text
    assert "charts_episodic_return" not in rows_of(tmp_path)[0]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["status"] == "completed"


def test_same_seed_same_metrics(compose, tmp_path):
    args = ("task=cartpole", *SMALL, "task.total_steps=600", "envelope@envelopes.policy=sigmoid")
    run_job(compose(*args), tmp_path / "a", None, [], reraise=True)
    run_job(compose(*args), tmp_path / "b", None, [], reraise=True)

    def strip(rows):  # rates differ from run to run
        return [{k: v for k, v in r.items() if not k.startswith(("charts_rollout_SPS", "charts_SPS"))} for r in rows]

    assert strip(rows_of(tmp_path / "a")) == strip(rows_of(tmp_path / "b"))


@pytest.mark.parametrize(
    "override",
    [
        "envelope@envelopes.policy=step",
        "envelope@envelopes.value=sigmoid",
        "task.reduction=mean",
        "task.kl_penalty=adaptive",
        "task.num_envs=4",
    ],
)
def test_options_change_training(compose, tmp_path, override):
    args = ("task=cartpole", *SMALL, "task.total_steps=800")
    run_job(compose(*args), tmp_path / "base", None, [], reraise=True)
    run_job(compose(*args, override), tmp_path / "other", None, [], reraise=True)
    key = "train_policy_raw_loss_mean"
    assert [r[key] for r in rows_of(tmp_path / "base")] != [r[key] for r in rows_of(tmp_path / "other")]
    if "kl_penalty" in override:
        coefs = [r["losses_kl_coef"] for r in rows_of(tmp_path / "other")]
        assert coefs[0] > 0 and len(set(coefs)) > 1  # the adaptive coefficient moves


def test_lunarlander_runs(compose, tmp_path):
    pytest.importorskip("Box2D")
    cfg = compose("task=lunarlander", *SMALL, "task.total_steps=200", "task.num_envs=2")
    run_job(cfg, tmp_path, None, [], reraise=True)
    assert rows_of(tmp_path)[-1]["step"] == 200


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "task.env_id=Pong-v5",
            "task.env_id must be one of ['LunarLander-v3', 'Acrobot-v1', 'CartPole-v1'], got 'Pong-v5'",
        ),
        ("task.minibatch_size=1000", "task.minibatch_size must be at most rollout_steps x num_envs = 500, got 1000"),
        ("task.kl_penalty=huge", "task.kl_penalty must be one of ['none', 'fixed', 'adaptive'], got 'huge'"),
    ],
)
def test_config_errors(compose, override, message):
    with pytest.raises(ConfigError) as info:
        validate(compose("task=cartpole", override))
    assert str(info.value) == message


needs_envpool = pytest.mark.skipif(
    __import__("importlib").util.find_spec("envpool") is None, reason="pip install -r requirements-envpool.txt"
)


@needs_envpool
def test_envpool_terminal_step_at_the_time_limit_is_terminal_and_not_bootstrapped():
    # EnvPool itself reports this step as truncated only; the wrapper applies the limit as TimeLimit does
    from tasks.ppo_envs import Environments

    def ending(backend, limit):
        envs = Environments(backend, "CartPole-v1", [0], 1, limit)
        envs.reset()
        for step in range(1, 600):
            _, _, terminated, truncated, _, _ = envs.step(np.zeros(1, dtype=np.int64))
            if terminated[0] or truncated[0]:
                return step, bool(terminated[0]), bool(truncated[0])

    natural = ending("envpool", None)
    assert natural[1:] == (True, False)
    assert ending("envpool", natural[0]) == (natural[0], True, True)
    assert ending("envpool", natural[0] - 1) == (natural[0] - 1, False, True)


def episodes(backend, env_id, count, seed=0, envs_per_batch=16):
    """Returns and lengths of ``count`` episodes under a fixed random policy (a NumPy stream).

    Read from the episode statistics ``step`` reports, each checked against
    the sum of the rewards ``step`` returned over that episode.
    """
    from tasks.ppo_envs import Environments

    envs = Environments(backend, env_id, [seed], envs_per_batch, None)
    envs.reset()
    rng = np.random.default_rng(seed)
    ret, length, out = np.zeros(envs_per_batch), np.zeros(envs_per_batch, dtype=int), []
    while len(out) < count:
        _, reward, terminated, truncated, _, ended = envs.step(rng.integers(0, envs.actions, envs_per_batch))
        ret += reward
        length += 1
        done = terminated | truncated
        assert (ended is not None) == done.any()
        if ended is not None:
            mask, returns, lengths = ended
            assert np.array_equal(mask, done)
            np.testing.assert_allclose(returns[done], ret[done], rtol=1e-5, atol=1e-3)
            assert np.array_equal(lengths[done], length[done])
            out += list(zip(returns[done], lengths[done]))
            ret[done], length[done] = 0.0, 0
    envs.close()
    return np.array(out[:count])


@needs_envpool
@pytest.mark.parametrize("env_id", ["CartPole-v1", "Acrobot-v1", "LunarLander-v3"])
def test_envpool_and_gymnasium_give_the_same_episodes_in_distribution(env_id):
    from scipy.stats import ks_2samp

    if env_id == "LunarLander-v3":
        pytest.importorskip("Box2D")
    count = 200 if env_id != "Acrobot-v1" else 48  # a random Acrobot policy almost always runs the full 500 steps
    ours, theirs = episodes("gymnasium", env_id, count), episodes("envpool", env_id, count, seed=1)
    for column, name in ((0, "return"), (1, "length")):
        a, b = ours[:, column], theirs[:, column]
        if np.ptp(a) == 0 and np.ptp(b) == 0:
            assert a[0] == b[0], name
        else:
            assert ks_2samp(a, b).pvalue > 1e-3, (env_id, name, a.mean(), b.mean())


@needs_envpool
def test_envpool_and_gymnasium_step_the_same_dynamics_from_the_same_state():
    import envpool
    import gymnasium as gym

    rng = np.random.default_rng(0)
    # Acrobot: EnvPool exposes its angles (the velocities are observed); gymnasium's state can be set
    pool = envpool.make_gymnasium("Acrobot-v1", num_envs=1, seed=3)
    obs_pool, info = pool.reset()
    env = gym.make("Acrobot-v1").unwrapped
    env.reset(seed=0)
    for _ in range(50):
        env.state = np.array([*info["state"][0], *obs_pool[0, 4:]], dtype=np.float64)
        action = int(rng.integers(0, 3))
        obs_pool, _, _, _, info = pool.step(np.array([action]))
        obs_gym, *_ = env.step(action)
        np.testing.assert_allclose(obs_pool[0], obs_gym, rtol=1e-5, atol=1e-5)
    # CartPole: the observation is the state
    pool = envpool.make_gymnasium("CartPole-v1", num_envs=1, seed=3)
    obs_pool, _ = pool.reset()
    env = gym.make("CartPole-v1").unwrapped
    env.reset(seed=0)
    for _ in range(8):
        env.state = np.asarray(obs_pool[0], dtype=np.float64)
        action = int(rng.integers(0, 2))
        obs_pool, *_ = pool.step(np.array([action]))
        obs_gym, *_ = env.step(action)
        np.testing.assert_allclose(obs_pool[0], obs_gym, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["gymnasium", "envpool"])
def test_seed_batched_agents_train_as_they_would_alone(compose, tmp_path, backend):
    # Same episodes (actions agree), losses equal to rounding: a batch's matrix products round differently
    if backend == "envpool":
        pytest.importorskip("envpool")
    args = (
        "task=cartpole",
        *SMALL,
        "task.total_steps=1000",
        "envelope@envelopes.policy=sigmoid",
        "envelope@envelopes.value=step",
        f"task.backend={backend}",
    )
    run_job(compose(*args, "seed_batch=3"), tmp_path / "batch", None, [], reraise=True)
    for seed in range(3):
        run_job(compose(*args, f"seed={seed}"), tmp_path / f"single_{seed}", None, [], reraise=True)
        batched, single = rows_of(tmp_path / "batch" / f"seed_{seed}"), rows_of(tmp_path / f"single_{seed}")
        assert len(batched) == len(single) == 10
        for a, b in zip(batched, single):
            assert a["charts_episodic_return"] == b["charts_episodic_return"]
            assert a["envelope_value_fraction_attenuated"] == b["envelope_value_fraction_attenuated"]
            for key in ("train_policy_raw_loss_mean", "train_value_raw_loss_mean", "envelope_policy_threshold"):
                assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-6), key
    results = [json.loads((tmp_path / "batch" / f"seed_{s}" / "result.json").read_text()) for s in range(3)]
    assert len({r["run_id"] for r in results}) == 3 and all(r["status"] == "completed" for r in results)


@needs_envpool
def test_the_envpool_backend_trains_four_runs_from_the_command_line(tmp_path):
    from tests.conftest import ACROBOT_ENVPOOL_SWEEP
    from tests.test_cli import run_cli

    proc = run_cli(*ACROBOT_ENVPOOL_SWEEP, f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "4 runs: 4 completed" in proc.stdout


def test_compile_is_refused_for_a_task_without_a_compiled_step_and_without_a_cpp_compiler(compose, monkeypatch):
    with pytest.raises(ConfigError) as info:
        validate(compose("task=digits", "compile=true"))
    assert str(info.value) == (
        "compile: task 'classification' has no compiled step; compile=true is supported by the tasks ['ppo'], "
        "got compile=true"
    )
    monkeypatch.setattr("shutil.which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(ConfigError, match=r"compile: torch.compile on the CPU builds C\+\+ kernels, and none of"):
        validate(compose("task=cartpole", "compile=true", "device=cpu"))
    validate(compose("task=cartpole", "compile=false", "device=cpu"))  # the eager step needs no compiler


@pytest.mark.slow  # two compilations, about 20 s each
@pytest.mark.parametrize("kl", [False, True])
def test_the_compiled_minibatch_step_is_the_eager_one_up_to_rounding(kl):
    # The same five minibatch steps (fused Adam) of 6 agents with static and adaptive envelopes, eager and
    # through torch.compile: the same losses, envelope state and parameters up to float32 rounding
    from envelopes import Envelope, EnvelopeBank
    from tasks.ppo import Penalty, Rollout, minibatch_losses

    envelopes = [
        Envelope("identity"),
        Envelope("step", quantile=0.3, step_size=0.1),
        Envelope("linear", quantile=0.5, width=0.2, step_size=0.1),
        Envelope("sigmoid", quantile=0.9, width=0.1, step_size=0.1),
        Envelope("sigmoid", threshold=0.1, inverse_slope=0.5),
        Envelope("linear", quantile=0.7, width=0.3, step_size=1.0),
    ]
    K, B, batch = len(envelopes), 50, 200
    g = torch.Generator().manual_seed(0)
    rollout = Rollout(
        torch.randn(K, batch, 6, generator=g),
        torch.randint(0, 3, (K, batch), generator=g),
        torch.randn(K, batch, 3, generator=g),
        -torch.rand(K, batch, generator=g) - 0.5,
        torch.randn(K, batch, generator=g),
        torch.randn(K, batch, generator=g),
    )
    kl_coef = torch.full((K,), 0.01)
    penalty = Penalty(kl, 0.2, 0.5)

    def learner():
        net = ActorCritic(*agent_networks(list(range(K)), 6, [64, 64], 3), torch.device("cpu"))
        banks = EnvelopeBank(envelopes), EnvelopeBank(envelopes[::-1])
        return net, banks, make_optimizer(net.parameters(), SimpleNamespace(optimizer="adam", lr=3e-4))

    compiled = torch.compile(minibatch_losses, dynamic=False)
    outputs = {}
    for name, losses in (("eager", minibatch_losses), ("compiled", compiled)):
        net, (policy_bank, value_bank), optimizer = learner()
        steps = []
        for step in range(5):
            idx = torch.randperm(batch, generator=torch.Generator().manual_seed(step))[:B].expand(K, B)
            out = losses(net, policy_bank, value_bank, rollout, idx, kl_coef, penalty, "sum")
            optimizer.zero_grad(set_to_none=True)
            out[0].backward()
            optimizer.step()
            steps.append([t.detach().clone() for t in out] + [policy_bank.threshold.clone(), value_bank.weight.clone()])
        outputs[name] = steps, net.parameters(), (policy_bank.estimate, value_bank.estimate, value_bank.trace)
    (eager_steps, eager_params, eager_state), (compiled_steps, compiled_params, compiled_state) = outputs.values()
    for eager, compiled_ in zip(eager_steps, compiled_steps):
        for a, b in zip(eager, compiled_):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    for a, b in zip(eager_params, compiled_params):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    for a, b in zip(eager_state, compiled_state):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    assert eager_state[0].abs().sum() > 0  # the adaptive envelopes moved their estimates


@pytest.mark.slow  # one compilation
def test_a_compiled_run_logs_the_eager_runs_first_update_and_is_compiled_once(compose, tmp_path, monkeypatch):
    args = ("task=cartpole", *SMALL, "task.total_steps=200", "envelope@envelopes.policy=sigmoid", "device=cpu")
    run_job(compose(*args), tmp_path / "eager", None, [], reraise=True)
    torch._dynamo.reset()  # forget other tests' compilations of the step
    # a second compilation (the adaptive envelopes' quantile positions cached after the first) is an error
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    run_job(compose(*args, "compile=true"), tmp_path / "compiled", None, [], reraise=True)
    eager, compiled = rows_of(tmp_path / "eager"), rows_of(tmp_path / "compiled")
    assert len(eager) == len(compiled) == 2
    # the first update trains on the same rollout (the initial networks act): the same losses up to rounding
    for key in ("train_policy_raw_loss_mean", "train_value_shaped_loss_mean", "envelope_policy_threshold"):
        assert compiled[0][key] == pytest.approx(eager[0][key], rel=1e-4, abs=1e-6), key
    assert json.loads((tmp_path / "compiled" / "result.json").read_text())["compile_s"] > 0  # its compile time
    assert "compile_s" not in json.loads((tmp_path / "eager" / "result.json").read_text())


def test_init_torch_builds_each_agent_as_the_papers_code_does_and_has_its_own_run_id(compose):
    # task.init=torch: under the agent's seed, an actor then a critic of plain nn.Linear layers (their own
    # initialisation); the default stays CleanRL's orthogonal one, with the run id runs always had
    from runner.config import config_id, effective_config

    actors, critics = agent_networks([3, 7], 8, [64, 64], 4, "torch")
    for k, seed in enumerate([3, 7]):
        torch.manual_seed(seed)
        actor = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4))
        critic = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
        for ours, theirs in zip(
            [*actors[k].parameters(), *critics[k].parameters()], [*actor.parameters(), *critic.parameters()]
        ):
            assert torch.equal(ours, theirs)
    orthogonal, _ = agent_networks([3], 8, [64, 64], 4)
    assert not orthogonal[0][0].bias.any() and actors[0][0].bias.abs().min() > 0  # zero biases only there

    def identity(*overrides):
        cfg = compose("task=lunarlander", *overrides)
        return effective_config(cfg, validate(cfg), data=False)

    assert "init" not in identity()["task"] and identity("task.init=torch")["task"]["init"] == "torch"
    assert config_id(identity("task.init=orthogonal")) == config_id(identity())
    assert config_id(identity("task.init=torch")) != config_id(identity())
    with pytest.raises(ConfigError, match=r"init.*must be one of \['orthogonal', 'torch'\].*xavier"):
        validate(compose("task=lunarlander", "task.init=xavier"))
    # the paper presets set the paper's initialisation; the task presets keep the default
    for preset in ("lunarlander_paper", "acrobot_paper", "paper_table5", "paper_table6", "paper_table7"):
        assert compose(f"experiment={preset}").task.init == "torch", preset
    assert compose("task=acrobot").task.init == compose("experiment=acrobot_quick").task.init == "orthogonal"


def acrobot_states(count):
    """``count`` random Acrobot states over the whole range and an action each: angles wrap, velocities reach
    their bounds."""
    rng = np.random.default_rng(0)
    state = np.column_stack(
        [rng.uniform(-np.pi, np.pi, (count, 2)), rng.uniform(-4, 4, count) * np.pi, rng.uniform(-9, 9, count) * np.pi]
    )
    return state, rng.integers(0, 3, count)


def assert_gymnasiums_step(state, action, reward, terminated, final, stepped):
    """One step from each of ``state`` taking ``action`` gave gymnasium's reward, termination and observation
    (to 1e-6), and its next state (to 1e-12) where the episode went on. Returns how many steps wrapped an
    angle and how many reached a velocity bound."""
    import gymnasium as gym

    env = gym.make("Acrobot-v1").unwrapped
    env.reset(seed=0)
    wrapped = bounded = 0
    for i in range(len(state)):
        env.state = state[i].copy()
        obs, r, term, trunc, _ = env.step(int(action[i]))
        assert (float(reward[i]), bool(terminated[i])) == (r, term), i
        np.testing.assert_allclose(final[i], obs, rtol=0, atol=1e-6)
        if not term:  # a terminated environment's state is already the next episode's
            np.testing.assert_allclose(stepped[i], env.state, rtol=1e-12, atol=1e-12)
        wrapped += abs(state[i, 0] + 0.2 * state[i, 2]) > np.pi
        bounded += abs(env.state[3]) == 9 * np.pi
    return wrapped, bounded


def test_the_torch_acrobot_step_is_gymnasiums_from_any_state():
    # eager arithmetic
    from tasks.ppo_envs import acrobot_step

    count = 512
    state, action = acrobot_states(count)
    out = acrobot_step(
        torch.tensor(state),
        torch.tensor(action),
        torch.zeros(count, dtype=torch.int64),
        torch.zeros(count),
        torch.zeros(count, 4, dtype=torch.float64),
        500,
    )
    stepped, reward, terminated, final = out[0], out[4], out[5], out[7]
    wrapped, bounded = assert_gymnasiums_step(state, action, reward, terminated, final.numpy(), stepped.numpy())
    assert wrapped > 50 and bounded > 5 and 0 < terminated.sum() < count


def test_the_torch_acrobot_backend_follows_gymnasium_resets_and_limits_and_keeps_each_environments_stream():
    import gymnasium as gym

    from tasks.ppo_envs import Environments

    # compiled: along a trajectory from the same state, gymnasium's observations, rewards and endings
    envs = Environments("torch", "Acrobot-v1", [3, 4], 1, None)
    first = envs.reset()
    assert first.shape == (2, 6) and first.dtype == np.float32
    start = envs.envs.state.numpy().copy()
    assert np.all(np.abs(start) <= 0.1) and np.array_equal(start, start.astype(np.float32))  # as gymnasium's reset
    env = gym.make("Acrobot-v1").unwrapped
    env.reset(seed=0)
    env.state = start[0].copy()
    rng = np.random.default_rng(1)
    for _ in range(200):
        action = rng.integers(0, 3, 2)
        obs, reward, terminated, truncated, final, _ = envs.step(action)
        expected, r, term, _, _ = env.step(int(action[0]))
        np.testing.assert_allclose(final[0], expected, rtol=0, atol=1e-5)
        assert (reward[0], terminated[0], truncated[0]) == (r, term, False)
        if term:
            break
        env.state = envs.envs.state[0].numpy().copy()  # rounding in the compiled program stays at one step's

    # a limit of 5 steps: truncated, the episode's return and length reported, the next initial state drawn
    envs = Environments("torch", "Acrobot-v1", [3, 4], 1, 5)
    envs.reset()
    outs = [envs.step(np.array([2, 0])) for _ in range(5)]
    assert all(out[5] is None for out in outs[:4])
    obs, reward, terminated, truncated, final, (ended, returns, lengths) = outs[4]
    assert truncated.all() and not terminated.any() and ended.all()
    assert list(returns) == [-5.0, -5.0] and list(lengths) == [5, 5]
    assert not np.array_equal(obs, final)
    generator = torch.Generator().manual_seed(3)
    draws = [(-0.1 + 0.2 * torch.rand(4, generator=generator, dtype=torch.float64)).float() for _ in range(2)]
    np.testing.assert_array_equal(envs.envs.state[0].float().numpy(), draws[1].numpy())  # the second draw of seed 3

    # environment 1 (seed 4) steps as it would alone
    alone = Environments("torch", "Acrobot-v1", [4], 1, 5)
    single = [alone.reset()[0]] + [alone.step(np.array([0]))[0][0] for _ in range(7)]
    envs = Environments("torch", "Acrobot-v1", [3, 4], 1, 5)
    paired = [envs.reset()[1]] + [envs.step(np.array([2, 0]))[0][1] for _ in range(7)]
    np.testing.assert_array_equal(np.stack(single), np.stack(paired))


def fused_rollout_or_loop(fused, seeds, num_envs, steps, limit, start=None, gumbel=None):
    """One rollout of ``steps`` on the torch Acrobot back end: the C++ loop (``fused``) or the Python loop of
    tasks/ppo.py, the same actors acting; ``start`` (E, 4) replaces the first states. All it records."""
    from tasks.ppo_envs import Environments

    K, N = len(seeds), num_envs
    envs = Environments("torch", "Acrobot-v1", seeds, N, limit, fused_rollout=fused)
    net = ActorCritic(*agent_networks(seeds, 6, [64, 64], 3, "torch"), torch.device("cpu"), fused=True)
    obs = torch.as_tensor(envs.reset()).reshape(K, N, 6)
    if start is not None:
        envs.envs.state = torch.as_tensor(start, dtype=torch.float64).clone()
        obs = acrobot_observation(envs.envs.state).reshape(K, N, 6)
    if gumbel is None:
        uniform = torch.rand(steps, K, N, 3, generator=torch.Generator().manual_seed(1))
        gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-20)))
    E = K * N
    out = {
        "obs": torch.zeros(steps, K, N, 6),
        "actions": torch.zeros(steps, K, N, dtype=torch.long),
        "logits": torch.zeros(steps, K, N, 3),
        "rewards": np.zeros((steps, E), np.float32),
        "terminated": np.zeros((steps, E), bool),
        "truncated": np.zeros((steps, E), bool),
        "final": np.zeros((steps, E, 6), np.float32),
        "returns": np.zeros((steps, E), np.float32),
        "lengths": np.zeros((steps, E), np.int64),
    }
    with torch.inference_mode():
        if fused:
            obs = obs.contiguous()
            buffers = [out[k] for k in ("obs", "actions", "logits", "rewards", "terminated", "truncated", "final")]
            out["returns"], out["lengths"] = envs.rollout(obs, net.actor_parameters(), gumbel, *buffers)
        else:
            for t in range(steps):
                logits = net.actor(obs)
                action = (logits + gumbel[t]).argmax(-1)
                next_obs, reward, terminated, truncated, final, episodes = envs.step(action.reshape(-1).numpy())
                out["obs"][t], out["actions"][t], out["logits"][t] = obs, action, logits
                out["rewards"][t], out["terminated"][t], out["truncated"][t], out["final"][t] = (
                    reward, terminated, truncated, final,
                )  # fmt: skip
                if episodes is not None:
                    out["returns"][t], out["lengths"][t] = episodes[1], episodes[2]
                obs = torch.as_tensor(next_obs).reshape(K, N, 6)
    out["next"] = obs
    return out, envs.envs


@pytest.mark.skipif(
    __import__("tasks.fused_mlp").fused_mlp.missing_tools() is not None,
    reason="the fused rollout needs a C++ compiler and ninja",
)
def test_the_fused_acrobot_rollout_records_what_the_python_loop_records():
    # 3 agents x 2 environments, a limit of 25 steps over 80: every environment restarts three times, so the C++
    # loop stops where one would need a second initial state and goes on once it is drawn; two environments
    # start near the top and terminate. Rounding of sin and cos alone may differ (glibc's against the compiled
    # program's): observations to 1e-6, all else exactly
    start = np.zeros((6, 4))
    start[1] = [2.9, 0.3, 0.0, 0.0]
    start[4] = [-2.8, -0.4, 1.0, 0.0]
    loop, _ = fused_rollout_or_loop(False, [5, 6, 7], 2, 80, 25, start)
    fused, envs = fused_rollout_or_loop(True, [5, 6, 7], 2, 80, 25, start)
    assert loop["terminated"][:, [1, 4]].any(axis=0).all() and loop["truncated"].sum(0).min() >= 3
    for key in ("actions", "rewards", "terminated", "truncated", "returns", "lengths"):
        np.testing.assert_array_equal(np.asarray(fused[key]), np.asarray(loop[key]), err_msg=key)
    for key in ("obs", "logits", "final", "next"):
        np.testing.assert_allclose(np.asarray(fused[key]), np.asarray(loop[key]), rtol=0, atol=1e-6, err_msg=key)
    assert not envs.used.any()  # every taken initial state replaced by the environment's next draw


@pytest.mark.skipif(
    __import__("tasks.fused_mlp").fused_mlp.missing_tools() is not None,
    reason="the fused rollout needs a C++ compiler and ninja",
)
def test_the_fused_acrobot_step_is_gymnasiums_from_any_state():
    # one step from each state, its action forced by its Gumbel noise
    count = 256
    state, action = acrobot_states(count)
    gumbel = torch.zeros(1, count, 1, 3)
    gumbel[0, torch.arange(count), 0, torch.as_tensor(action)] = 1e6
    out, envs = fused_rollout_or_loop(True, list(range(count)), 1, 1, 500, state, gumbel)
    assert np.array_equal(out["actions"].reshape(-1).numpy(), action)
    wrapped, bounded = assert_gymnasiums_step(
        state, action, out["rewards"][0], out["terminated"][0], out["final"][0], envs.state.numpy()
    )
    assert wrapped > 25 and bounded > 2 and 0 < out["terminated"].sum() < count


def test_the_torch_backend_is_refused_for_other_environments_and_without_a_cpp_compiler(compose, monkeypatch):
    with pytest.raises(ConfigError, match=r"task.backend torch steps only \['Acrobot-v1'\], not CartPole-v1"):
        validate(compose("task=cartpole", "task.backend=torch"))
    monkeypatch.setattr("shutil.which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(ConfigError, match=r"task.backend torch compiles its environment step .* none of the C\+\+"):
        validate(compose("task=acrobot", "task.backend=torch"))


def test_torch_acrobot_agents_train_batched_as_they_would_alone(compose, tmp_path):
    args = ("task=acrobot", *SMALL, "task.total_steps=1000", "task.max_episode_steps=60", "task.backend=torch")
    run_job(compose(*args, "seed_batch=2"), tmp_path / "batch", None, [], reraise=True)
    for seed in range(2):
        run_job(compose(*args, f"seed={seed}"), tmp_path / f"single_{seed}", None, [], reraise=True)
        batched, single = rows_of(tmp_path / "batch" / f"seed_{seed}"), rows_of(tmp_path / f"single_{seed}")
        assert len(batched) == len(single) == 10
        assert [r["charts_episodic_return"] for r in batched] == [r["charts_episodic_return"] for r in single]
        assert all(r["charts_episodic_length"] <= 60 for r in batched)
