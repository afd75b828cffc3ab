"""PPO-clip with per-sample policy and value envelopes (LunarLander-v3, Acrobot-v1, CartPole-v1).

Read top to bottom: seeding and environments, networks, then per update a
rollout (no autograd), advantage estimation (GAE), the PPO update with the
two envelopes, and logging against environment steps.

Losses an envelope can shape, per sample of a minibatch:

- ``policy``: ``-min(r A, clip(r, 1 - eps, 1 + eps) A)`` (clip variant) or
  ``-r A + beta KL(pi_old || pi)`` (KL-penalty variant). It can be negative:
  the envelope's quantiles work on signed values, so "low loss" means the
  most negative, i.e. the samples whose objective is already best served;
- ``value``: ``(V - R)^2``.

The total is ``policy + value_coef * value``, **summed** over the minibatch
as the paper does (``reduction=sum``); ``reduction=mean`` averages instead.

Correctness the paper's code lacked: a time-limit truncation is not a
termination (the value of the final observation is bootstrapped, unless the
episode also terminated on that step;
``truncation=terminate`` restores the paper's behaviour), a rollout in which
no episode ends logs no return rather than NaN, and rollouts run without
gradient tracking.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from envelopes import EnvelopeBank
from tasks.common import DivergedError, EnvelopeMeter, MeanStd, check, check_optimizer, divergence, make_optimizer
from tasks.seed_batch import seed_outcomes

OBJECTIVE = ("charts/return_ma100", "max")
# what a run records (file names; * any ending), for checking report.metric before training
METRICS = ("step", "env_steps", "charts_*", "losses_*", "return_ma100_final_phase", "train_*", "envelope_*")
ENVIRONMENTS = ("LunarLander-v3", "Acrobot-v1", "CartPole-v1")
BACKENDS = ("gymnasium", "envpool")
SEED_BATCH = True


@dataclass
class PPOConfig:
    name: str = "ppo"
    env_id: str = "CartPole-v1"
    total_steps: int = 200_000
    num_envs: int = 1
    rollout_steps: int = 500
    update_epochs: int = 4
    minibatch_size: int = 100
    lr: float = 3e-4
    optimizer: str = "adam"  # adam | sgd
    momentum: float = 0.9  # sgd's momentum (adam ignores it)
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip: float = 0.2
    value_coef: float = 0.5
    hidden: list[int] = field(default_factory=lambda: [64, 64])
    reduction: str = "sum"
    normalise_advantages: bool = True
    truncation: str = "bootstrap"
    kl_penalty: str = "none"
    kl_coef: float = 0.01
    kl_target: float = 0.01
    moving_average: int = 100
    max_episode_steps: int | None = None  # override the environment's time limit
    backend: str = "gymnasium"  # gymnasium | envpool (C++ batched environments)


Config = PPOConfig


def loss_names(task_cfg) -> tuple[str, ...]:
    return ("policy", "value")


def validate(task_cfg) -> None:
    check_optimizer(task_cfg)
    check(task_cfg.env_id in ENVIRONMENTS, "env_id", f"must be one of {list(ENVIRONMENTS)}", task_cfg.env_id)
    for key in ("total_steps", "num_envs", "rollout_steps", "update_epochs", "minibatch_size", "moving_average"):
        check(task_cfg[key] > 0, key, "must be a positive integer", task_cfg[key])
    check(0 < task_cfg.gamma <= 1, "gamma", "must lie in (0, 1]", task_cfg.gamma)
    check(0 <= task_cfg.gae_lambda <= 1, "gae_lambda", "must lie in [0, 1]", task_cfg.gae_lambda)
    check(task_cfg.clip > 0, "clip", "must be > 0", task_cfg.clip)
    check(task_cfg.value_coef >= 0, "value_coef", "must be >= 0", task_cfg.value_coef)
    check(
        len(task_cfg.hidden) > 0 and all(h > 0 for h in task_cfg.hidden),
        "hidden",
        "must be a non-empty list of positive layer widths",
        list(task_cfg.hidden),
    )
    check(task_cfg.reduction in ("sum", "mean"), "reduction", "must be one of ['sum', 'mean']", task_cfg.reduction)
    check(
        task_cfg.truncation in ("bootstrap", "terminate"),
        "truncation",
        "must be one of ['bootstrap', 'terminate']",
        task_cfg.truncation,
    )
    check(task_cfg.backend in BACKENDS, "backend", f"must be one of {list(BACKENDS)}", task_cfg.backend)
    if task_cfg.backend == "envpool":
        import importlib.util

        check(
            importlib.util.find_spec("envpool") is not None,
            "backend",
            "envpool needs the envpool package (pip install -r requirements-envpool.txt); allowed here: ['gymnasium']",
            task_cfg.backend,
        )
    check(
        task_cfg.kl_penalty in ("none", "fixed", "adaptive"),
        "kl_penalty",
        "must be one of ['none', 'fixed', 'adaptive']",
        task_cfg.kl_penalty,
    )
    check(task_cfg.kl_coef >= 0, "kl_coef", "must be >= 0", task_cfg.kl_coef)
    check(task_cfg.kl_target > 0, "kl_target", "must be > 0", task_cfg.kl_target)
    check(
        task_cfg.max_episode_steps is None or task_cfg.max_episode_steps > 0,
        "max_episode_steps",
        "must be null or a positive integer",
        task_cfg.max_episode_steps,
    )
    batch = task_cfg.rollout_steps * task_cfg.num_envs
    check(
        task_cfg.minibatch_size <= batch,
        "minibatch_size",
        f"must be at most rollout_steps x num_envs = {batch}",
        task_cfg.minibatch_size,
    )


def mlp(sizes: list[int], out_gain: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        linear = nn.Linear(a, b)
        nn.init.orthogonal_(linear.weight, out_gain if i == len(sizes) - 2 else np.sqrt(2))
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def agent_networks(
    seeds: list[int], observation: int, hidden: list[int], actions: int
) -> tuple[list[nn.Sequential], list[nn.Sequential]]:
    """Each agent's actor and critic as a run alone builds them: seeded, then its actor, then its critic."""
    actors, critics = [], []
    for seed in seeds:
        torch.manual_seed(seed)
        actors.append(mlp([observation, *hidden, actions], 0.01))
        critics.append(mlp([observation, *hidden, 1], 1.0))
    return actors, critics


class ActorCritic:
    """K agents' actors and critics (MLPs of one architecture, tanh between layers) as stacked tensors.

    The hidden layers of all 2K networks are one stack: weights (2K, in,
    out), biases (2K, 1, out), the K actors first and then the K critics,
    so that each hidden layer of every actor and critic is one batched
    product. The output layers are one stack too, in ``nn.Linear``'s (out,
    in) layout: (2K, actions, hidden), each critic's value in its first row
    and zeros below it (their gradients are exactly zero, so they stay zero
    under Adam and SGD). Computing them as one product on the whole hidden
    stack, rather than on its actor and critic halves, keeps the backward
    pass from building a zero-filled gradient of the whole stack for each
    half; and as ``W @ h^T``, whose batched product is several times faster
    on the CPU with so few outputs than ``h @ W^T`` (121 agents, 100
    samples, 3 actions: 1.7 ms against 0.5 ms, the weight gradient 1.4 ms
    against 0.25).

    Agent k's layers are built as a single run of its seed builds them
    (``torch.manual_seed(seed)``, then the actor, then the critic) and
    stacked, so each agent sees only its own parameters and inputs.
    """

    def __init__(self, actors: list[nn.Sequential], critics: list[nn.Sequential], device: torch.device):
        def linears(modules):
            return [[m for m in module if isinstance(m, nn.Linear)] for module in modules]

        actor_layers, critic_layers = linears(actors), linears(critics)
        hidden = len(actor_layers[0]) - 1
        self.agents = len(actors)

        def stack(tensors):
            return torch.stack(tensors).contiguous().to(device).requires_grad_()

        self.weights = [
            stack([net[i].weight.detach().T for net in actor_layers + critic_layers]) for i in range(hidden)
        ]
        self.biases = [
            stack([net[i].bias.detach()[None] for net in actor_layers + critic_layers]) for i in range(hidden)
        ]
        actions = actor_layers[0][-1].out_features
        head_weight = torch.zeros(2 * self.agents, actions, actor_layers[0][-1].in_features)
        head_bias = torch.zeros(2 * self.agents, actions, 1)
        for k, net in enumerate(actor_layers + critic_layers):
            rows = net[-1].out_features  # the actor's actions, the critic's one value
            head_weight[k, :rows] = net[-1].weight.detach()
            head_bias[k, :rows, 0] = net[-1].bias.detach()
        self.head_weight = head_weight.to(device).requires_grad_()
        self.head_bias = head_bias.to(device).requires_grad_()
        # On the CPU, MKL's batched product of one row per network is five times slower with an input
        # width that is not a multiple of 8 (242 networks of 6 -> 64: 0.16 ms; of 8 -> 64: 0.03 ms), so
        # the rollout (one observation per environment) uses the first layer's weights with zero rows
        # appended, remade whenever the optimiser has changed them.
        inputs = self.weights[0].shape[1]
        self.padding = (-inputs) % 8 if device.type == "cpu" else 0
        self._padded: tuple[int, torch.Tensor] | None = None

    def _padded_first_weight(self) -> torch.Tensor:
        weight = self.weights[0]
        if self._padded is None or self._padded[0] != weight._version:
            padded = torch.nn.functional.pad(weight.detach(), (0, 0, 0, self.padding))
            self._padded = (weight._version, padded)
        return self._padded[1]

    def parameters(self) -> list[torch.Tensor]:
        pairs = [*zip(self.weights, self.biases), (self.head_weight, self.head_bias)]
        return [t for pair in pairs for t in pair]

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Observations (K, B, obs) to logits (K, B, actions) and values (K, B)."""
        h = x.repeat(2, 1, 1)  # each agent's observations to its actor (first K) and its critic (last K)
        weights = self.weights
        if self.padding and x.shape[1] == 1 and not torch.is_grad_enabled():
            h = torch.nn.functional.pad(h, (0, self.padding))
            weights = [self._padded_first_weight(), *weights[1:]]
        for weight, bias in zip(weights, self.biases):
            h = tanh_layer(h, weight, bias)
        out = torch.baddbmm(self.head_bias, self.head_weight, h.transpose(1, 2))  # (2K, actions, B)
        return out[: self.agents].transpose(1, 2), out[self.agents :, 0]


def tanh_layer(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``tanh(bias + x @ weight)`` for batched (K, B, in) inputs, (K, in, out) weights and (K, 1, out) biases.

    On the CPU, torch's ``tanh`` kernel is slow: 2.6 ns an element on two
    cores here, twice the batched product before it and five times its own
    ``sigmoid``. This computes ``tanh(z) = 2 sigmoid(2z) - 1`` instead, with
    the 2 folded into the product (``alpha = beta = 2``, exact in binary):
    within 1.8e-7 of the exact tanh everywhere (torch's own: 6e-8), about
    three ulps of 1, below the rounding of the products that feed it. The
    backward pass is the one autograd would take (``(1 - y^2)`` times the
    incoming gradient, then the product's gradients). Elsewhere (CUDA),
    torch's ``tanh``.
    """
    if x.device.type != "cpu":
        return torch.tanh(torch.baddbmm(bias, x, weight))
    if not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad or bias.requires_grad):
        return _cpu_tanh_layer(x, weight, bias)
    return _TanhLayer.apply(x, weight, bias)


def _cpu_tanh_layer(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``2 sigmoid(2 (bias + x @ weight)) - 1``, the 2 folded into the product, in place after it."""
    return torch.baddbmm(bias, x, weight, beta=2, alpha=2).sigmoid_().mul_(2).sub_(1)


class _TanhLayer(torch.autograd.Function):
    """:func:`tanh_layer` on the CPU with its gradient (saves the output, as ``tanh`` does)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        y = _cpu_tanh_layer(x, weight, bias)
        ctx.save_for_backward(x, weight, y)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, y = ctx.saved_tensors
        pre = torch.ops.aten.tanh_backward(grad, y)  # the gradient of bias + x @ weight
        grad_x = torch.bmm(pre, weight.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        grad_weight = torch.bmm(x.transpose(1, 2), pre) if ctx.needs_input_grad[1] else None
        grad_bias = pre.sum(1, keepdim=True) if ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


class Environments:
    """K agents x N environments, stepped as one batch; same-step autoreset on either back end.

    ``step`` returns the observation to act on next (a new episode's first
    where one ended), the reward, ``terminated``, ``truncated``, the final
    observation of every environment (equal to the next observation where
    no episode ended), all (K * N, ...), and the episodes that ended on
    this step: ``(ended, returns, lengths)`` from gymnasium's
    ``RecordEpisodeStatistics`` (the environment's own rewards; ``returns``
    and ``lengths`` hold 0 where ``ended`` is False), or None where none
    ended. Agent k owns environments ``k * N .. k * N + N - 1``.

    Agent k's environment j is seeded ``seed_k + j`` on either back end, as
    in a run alone, so an agent's episodes do not depend on the batch it is
    in (each back end draws initial states from its own generator, so the
    back ends' episodes differ from each other).

    - ``gymnasium``: one synchronous vector env with same-step autoreset.
    - ``envpool``: one C++ pool made a gymnasium vector env with same-step
      autoreset (:class:`EnvPoolVector`).
    """

    def __init__(self, backend: str, env_id: str, seeds: list[int], num_envs: int, max_episode_steps: int | None):
        self.count = len(seeds) * num_envs
        # agent k's environment j seeded seed_k + j, as in a run alone
        env_seeds = [int(seed) + j for seed in seeds for j in range(num_envs)]
        if backend == "envpool":
            limit = max_episode_steps if max_episode_steps is not None else gym.spec(env_id).max_episode_steps
            envs = EnvPoolVector(env_id, env_seeds, limit)
            self.reset_seeds = None
        else:
            kwargs = {} if max_episode_steps is None else {"max_episode_steps": max_episode_steps}
            envs = gym.make_vec(
                env_id,
                num_envs=self.count,
                vectorization_mode="sync",
                vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP},
                **kwargs,
            )
            self.reset_seeds = env_seeds
        self.envs = gym.wrappers.vector.RecordEpisodeStatistics(envs)
        self.observation_size = int(np.prod(self.envs.single_observation_space.shape))
        self.actions = int(self.envs.single_action_space.n)

    def reset(self) -> np.ndarray:
        obs, _ = self.envs.reset() if self.reset_seeds is None else self.envs.reset(seed=self.reset_seeds)
        return np.asarray(obs, dtype=np.float32)

    def step(self, actions: np.ndarray):
        obs, reward, terminated, truncated, info = self.envs.step(actions)
        obs = np.asarray(obs, dtype=np.float32)
        final, episodes = obs, None
        if "_final_obs" in info:  # the ended environments were reset: obs holds their new episodes' first
            ended = info["_final_obs"]
            final = obs.copy()
            final[ended] = np.stack(list(info["final_obs"][ended]))
        if "_episode" in info:
            episodes = (info["_episode"], info["episode"]["r"], info["episode"]["l"])
        return obs, np.asarray(reward, dtype=np.float32), terminated, truncated, final, episodes

    def close(self) -> None:
        self.envs.close()


class EnvPoolVector(gym.vector.VectorEnv):
    """EnvPool's C++ pool as a gymnasium vector env with same-step autoreset.

    EnvPool resets an ended episode on the next ``step`` (that step ignores
    its action and returns reward 0); here ended environments are reset at
    once with ``reset(env_id)`` instead, and their last observations go to
    ``info["final_obs"]`` (mask ``info["_final_obs"]``), as gymnasium's
    same-step vector envs do. EnvPool also reports an episode that
    terminates on the step its time limit is reached as truncated alone
    (CartPole-v1, seed 0, action 0 and a limit of 8 steps), which would
    bootstrap a terminal state; the time limit is therefore applied here,
    as gymnasium's TimeLimit does: ``truncated`` at the limit,
    ``terminated`` as the environment says.
    """

    def __init__(self, env_id: str, seeds: list[int], limit: int):
        import envpool

        self.metadata = {"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP}
        self.num_envs, self.limit = len(seeds), limit
        # the pool's own limit lies past ours, so that it never cuts an episode itself
        self.pool = envpool.make_gymnasium(env_id, num_envs=self.num_envs, max_episode_steps=limit + 1, env_seed=seeds)
        self.single_observation_space = self.pool.observation_space
        self.single_action_space = self.pool.action_space
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, self.num_envs)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, self.num_envs)
        self.elapsed = np.zeros(self.num_envs, dtype=np.int64)

    def reset(self, *, seed=None, options=None):
        if seed is not None:
            raise ValueError("EnvPoolVector is seeded when made (env_seed), not on reset")
        self.elapsed[:] = 0
        obs, _ = self.pool.reset()
        return obs, {}

    def step(self, actions):
        obs, reward, terminated, _, _ = self.pool.step(actions)
        self.elapsed += 1
        truncated = self.elapsed >= self.limit  # both flags where it also terminated, as gymnasium's TimeLimit
        done = terminated | truncated
        info = {}
        if done.any():
            final = obs.copy()
            self.elapsed[done] = 0
            fresh, fresh_info = self.pool.reset(np.flatnonzero(done).astype(np.int32))
            obs[fresh_info["env_id"]] = fresh
            info = {"final_obs": final, "_final_obs": done}
        return obs, reward, terminated, truncated, info

    def close(self) -> None:
        self.pool.close()


def bootstrap_time_limits(
    reward: np.ndarray,
    terminated: np.ndarray,
    truncated: np.ndarray,
    final_values: Callable[[], np.ndarray],
    gamma: float,
) -> np.ndarray:
    """Rewards with ``gamma * V(final observation)`` added where a time limit alone ended the episode.

    A time limit is not an ending, so its final state is bootstrapped. A
    time limit reached on the very step the episode terminated sets both
    flags (gymnasium's TimeLimit does, and the EnvPool wrapper here too);
    that state is terminal and nothing is added. ``final_values()`` gives
    the value of every environment's final observation (called only when
    some episode was cut).
    """
    cut = truncated & ~terminated
    if not cut.any():
        return reward
    return reward + np.where(cut, gamma * final_values(), 0.0).astype(np.float32)


def gae(rewards, values, dones, next_value, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns for (T, ...) tensors; ``dones[t]`` ends the trace after step t."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[0])):
        following = next_value if t == rewards.shape[0] - 1 else values[t + 1]
        not_done = 1.0 - dones[t]
        delta = rewards[t] + gamma * following * not_done - values[t]
        running = delta + gamma * lam * not_done * running
        advantages[t] = running
    return advantages, advantages + values


def run(cfg, context) -> list[dict[str, float] | Exception]:
    """Train one PPO agent per seed in ``context.seeds``, all in one process, each as it would train alone.

    Returns one dict of final metrics per agent, or the error that ended it
    (an agent whose values stop being finite is marked failed; the others
    train on).
    """
    task_cfg, device = cfg.task, context.device
    seeds, recorders = list(context.seeds), context.recorders
    K, N, T = len(seeds), task_cfg.num_envs, task_cfg.rollout_steps
    per_run = context.run_envelopes or [context.envelopes] * K
    policy_bank = EnvelopeBank([envelopes["policy"] for envelopes in per_run]).to(device)
    value_bank = EnvelopeBank([envelopes["value"] for envelopes in per_run]).to(device)

    envs = Environments(task_cfg.backend, task_cfg.env_id, seeds, N, task_cfg.max_episode_steps)
    obs_dim, n_actions = envs.observation_size, envs.actions
    net = ActorCritic(*agent_networks(seeds, obs_dim, task_cfg.hidden, n_actions), device)
    optimizer = make_optimizer(net.parameters(), task_cfg)
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]

    obs_buf = torch.zeros(T, K, N, obs_dim, device=device)
    actions_buf = torch.zeros(T, K, N, dtype=torch.long, device=device)
    logits_buf = torch.zeros(T, K, N, n_actions, device=device)
    # rewards and endings come from the host: kept there during the rollout, moved once after it
    rewards_host = np.zeros((T, K * N), dtype=np.float32)
    dones_host = np.zeros((T, K * N), dtype=np.float32)
    values_buf = torch.zeros(T, K, N, device=device)

    obs = torch.as_tensor(envs.reset(), device=device).reshape(K, N, obs_dim)
    recent = [deque(maxlen=task_cfg.moving_average) for _ in range(K)]
    history: list[list[tuple[int, float]]] = [[] for _ in range(K)]
    failed: dict[int, str] = {}
    kl_coef = torch.full((K,), float(task_cfg.kl_coef), device=device)
    bootstrap = task_cfg.truncation == "bootstrap"
    reduce = torch.sum if task_cfg.reduction == "sum" else torch.mean
    global_step, updates = 0, max(1, task_cfg.total_steps // (T * N))
    batch = T * N
    agent_of_env = np.repeat(np.arange(K), N)

    bar = recorders[0].progress(range(1, updates + 1), total=updates, unit="update")
    for update in bar:
        start = time.perf_counter()
        finished: list[list[tuple[float, int]]] = [[] for _ in range(K)]
        # Rollout: no autograd; actions are Gumbel-max samples, each agent's noise from its own stream.
        with torch.inference_mode():
            gumbel = torch.stack(
                [-torch.log(-torch.log(torch.rand(T, N, n_actions, generator=g).clamp_min(1e-20))) for g in generators],
                dim=1,
            ).to(device)
            for t in range(T):
                logits, value = net(obs)
                action = (logits + gumbel[t]).argmax(-1)
                next_obs, raw_reward, terminated, truncated, final, episodes = envs.step(
                    action.reshape(-1).cpu().numpy()
                )
                reward = raw_reward
                if bootstrap:  # a time limit alone is not an ending: add the discounted value of where it stopped

                    def final_values(final=final):
                        return (
                            net(torch.as_tensor(final, device=device).reshape(K, N, obs_dim))[1]
                            .reshape(-1)
                            .cpu()
                            .numpy()
                        )

                    reward = bootstrap_time_limits(raw_reward, terminated, truncated, final_values, task_cfg.gamma)
                done = terminated | truncated
                obs_buf[t], actions_buf[t], logits_buf[t], values_buf[t] = obs, action, logits, value
                rewards_host[t] = reward
                dones_host[t] = done
                if episodes is not None:  # the episode's own rewards, without the bootstrap term
                    ended, returns, lengths = episodes
                    for i in np.flatnonzero(ended):
                        finished[agent_of_env[i]].append((float(returns[i]), int(lengths[i])))
                obs = torch.as_tensor(next_obs, device=device).reshape(K, N, obs_dim)
            global_step += batch
            next_value = net(obs)[1]
        rollout_seconds = time.perf_counter() - start

        rewards_buf = torch.as_tensor(rewards_host, device=device).reshape(T, K, N)
        dones_buf = torch.as_tensor(dones_host, device=device).reshape(T, K, N)
        advantages, returns = gae(rewards_buf, values_buf, dones_buf, next_value, task_cfg.gamma, task_cfg.gae_lambda)
        # per agent: (K, T * N, ...)
        b_obs = obs_buf.transpose(0, 1).reshape(K, batch, obs_dim)
        b_actions = actions_buf.transpose(0, 1).reshape(K, batch)
        b_old_logits = logits_buf.transpose(0, 1).reshape(K, batch, n_actions)
        b_old_logprob = F.log_softmax(b_old_logits, -1).gather(2, b_actions[..., None]).squeeze(2)
        b_adv = advantages.transpose(0, 1).reshape(K, batch)
        b_returns = returns.transpose(0, 1).reshape(K, batch)
        b_values = values_buf.transpose(0, 1).reshape(K, batch)
        if task_cfg.normalise_advantages:
            b_adv = (b_adv - b_adv.mean(1, keepdim=True)) / (b_adv.std(1, keepdim=True) + 1e-8)

        # PPO update with the two envelopes, every agent at once.
        stats = {name: MeanStd(device, K) for name in ("policy_raw", "policy_shaped", "value_raw", "value_shaped")}
        meters = {"policy": EnvelopeMeter(policy_bank, device), "value": EnvelopeMeter(value_bank, device)}
        kl_sum = torch.zeros(K, device=device)
        clipped = torch.zeros(K, device=device)
        batches = 0
        for _ in range(task_cfg.update_epochs):
            order = torch.stack([torch.randperm(batch, generator=g) for g in generators]).to(device)
            for begin in range(0, batch, task_cfg.minibatch_size):
                idx = order[:, begin : begin + task_cfg.minibatch_size]
                mb_obs = b_obs.gather(1, idx[..., None].expand(-1, -1, obs_dim))
                mb_actions = b_actions.gather(1, idx)
                new_logits, new_values = net(mb_obs)
                new_logprobs_all = F.log_softmax(new_logits, -1)
                new_logprob = new_logprobs_all.gather(2, mb_actions[..., None]).squeeze(2)
                log_ratio = new_logprob - b_old_logprob.gather(1, idx)
                ratio = log_ratio.exp()
                adv = b_adv.gather(1, idx)
                if task_cfg.kl_penalty == "none":
                    policy_loss = -torch.min(ratio * adv, ratio.clamp(1 - task_cfg.clip, 1 + task_cfg.clip) * adv)
                else:
                    old_logprobs_all = F.log_softmax(
                        b_old_logits.gather(1, idx[..., None].expand(-1, -1, n_actions)), -1
                    )
                    exact_kl = (old_logprobs_all.exp() * (old_logprobs_all - new_logprobs_all)).sum(-1)
                    policy_loss = -ratio * adv + kl_coef[:, None] * exact_kl
                value_loss = (new_values - b_returns.gather(1, idx)).square()
                shaped_policy, shaped_value = policy_bank(policy_loss), value_bank(value_loss)
                # each agent's loss; their sum's gradient for an agent's parameters is that agent's own
                loss = (reduce(shaped_policy, dim=1) + task_cfg.value_coef * reduce(shaped_value, dim=1)).sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                for name, values in (
                    ("policy_raw", policy_loss),
                    ("policy_shaped", shaped_policy),
                    ("value_raw", value_loss),
                    ("value_shaped", shaped_value),
                ):
                    stats[name].add(values)
                meters["policy"].add()
                meters["value"].add()
                with torch.no_grad():
                    kl_sum += ((ratio - 1) - log_ratio).mean(1)
                    clipped += ((ratio - 1).abs() > task_cfg.clip).float().mean(1)
                batches += 1

        # Logging, against environment steps: one host transfer per quantity per update, for all agents.
        approx_kl = (kl_sum / batches).tolist()
        clip_fraction = (clipped / batches).tolist()
        coefs = kl_coef.tolist()
        if task_cfg.kl_penalty == "adaptive":
            target = task_cfg.kl_target
            factor = [2.0 if kl > 1.5 * target else 0.5 if kl < target / 1.5 else 1.0 for kl in approx_kl]
            kl_coef = kl_coef * torch.tensor(factor, device=device)
            coefs = kl_coef.tolist()
        variance = b_returns.var(1)
        explained = torch.where(variance > 0, 1 - (b_returns - b_values).var(1) / variance, torch.nan).tolist()
        envelope_stats = {name: meter.summaries(f"envelope/{name}", K) for name, meter in meters.items()}
        loss_stats = [
            meter.summaries(f"train/{name.split('_')[0]}_{name.split('_')[1]}_loss") for name, meter in stats.items()
        ]
        elapsed = time.perf_counter() - start
        for k, recorder in enumerate(recorders):
            if k in failed:
                continue
            metrics = {}
            for per_agent in loss_stats:
                metrics.update(per_agent[k])
            metrics.update(envelope_stats["policy"][k])
            metrics.update(envelope_stats["value"][k])
            if math.isfinite(explained[k]):  # returns without spread: explained variance is undefined, not a divergence
                metrics["losses/explained_variance"] = explained[k]
            metrics["losses/approx_kl"] = approx_kl[k]
            metrics["losses/clipfrac"] = clip_fraction[k]
            metrics["losses/kl_coef"] = coefs[k] if task_cfg.kl_penalty != "none" else 0.0
            metrics["charts/rollout_SPS"] = batch * K / rollout_seconds
            metrics["charts/SPS"] = batch * K / elapsed
            if finished[k]:  # no episode ended in this rollout: log no return rather than NaN
                returns_k = [r for r, _ in finished[k]]
                recent[k].extend(returns_k)
                metrics["charts/episodic_return"] = float(np.mean(returns_k))
                metrics["charts/episodic_length"] = float(np.mean([n for _, n in finished[k]]))
                metrics["charts/episodes"] = len(returns_k)
            if recent[k]:
                metrics["charts/return_ma100"] = float(np.mean(recent[k]))
                history[k].append((global_step, metrics["charts/return_ma100"]))
            reason = divergence(metrics, f"update {update} ({global_step} steps)")
            if reason is not None:
                failed[k] = reason
                continue
            recorder.log(global_step, metrics, step_name="step")
        if len(failed) == K:
            raise DivergedError(failed[0] if K == 1 else f"every agent diverged: {failed}")
        if recent[0]:
            bar.set_postfix(return_ma=f"{np.mean(recent[0]):.1f}", sps=f"{batch * K / rollout_seconds:.0f}")
    envs.close()

    extras = []
    for k in range(K):
        final_phase = [ma for step, ma in history[k] if step >= 0.9 * global_step]
        extras.append(
            {
                "return_ma100_final_phase": float(np.mean(final_phase)) if final_phase else float("nan"),
                "env_steps": global_step,
            }
        )
    return seed_outcomes(extras, failed)
