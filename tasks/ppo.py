"""PPO-clip with per-sample policy and value envelopes (LunarLander-v3, Acrobot-v1, CartPole-v1).

Read top to bottom: the config and its checks, then ``run``: per update a
rollout (no autograd), advantage estimation (GAE), the PPO update with the
two envelopes, and logging against environment steps. The networks are in
``tasks/ppo_networks.py``, the environments (gymnasium, EnvPool) in
``tasks/ppo_envs.py``.

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

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from envelopes import EnvelopeBank
from tasks import fused_mlp
from tasks.common import (
    EnvelopeMeter,
    MeanStd,
    check,
    check_optimizer,
    cpp_compilers,
    divergence,
    log_seeds,
    make_optimizer,
)
from tasks.ppo_envs import TORCH_ENVIRONMENTS, Environments
from tasks.ppo_networks import INITS, ActorCritic, agent_networks
from tasks.seed_batch import seed_outcomes

log = logging.getLogger(__name__)

OBJECTIVE = ("charts/return_ma100", "max")
# what a run records (file names; * any ending), for checking report.metric before training
METRICS = ("step", "env_steps", "charts_*", "losses_*", "return_ma100_final_phase", "train_*", "envelope_*")
ENVIRONMENTS = ("LunarLander-v3", "Acrobot-v1", "CartPole-v1")
BACKENDS = ("gymnasium", "envpool", "torch")
SEED_BATCH = True
COMPILE = True  # compile=true: the update's minibatch step through torch.compile
FUSED = True  # kernels=fused: the networks' forward and backward passes in tasks/fused_mlp.py's C++ kernels


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
    backend: str = "gymnasium"  # gymnasium | envpool (C++ batched environments) | torch (Acrobot-v1, compiled)
    # the networks' initial weights: orthogonal (CleanRL's) | torch (nn.Linear's own, as the paper's code)
    init: str = "orthogonal"


Config = PPOConfig


def kernels_unsupported(task_cfg) -> str | None:
    """Why the fused kernels cannot run this task's networks (None: they can)."""
    return fused_mlp.unsupported(list(task_cfg.hidden))


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
    check(task_cfg.init in INITS, "init", f"must be one of {list(INITS)}", task_cfg.init)
    if task_cfg.backend == "torch":
        check(
            task_cfg.env_id in TORCH_ENVIRONMENTS,
            "backend",
            f"torch steps only {list(TORCH_ENVIRONMENTS)}, not {task_cfg.env_id}; allowed for it: ['gymnasium', 'envpool']",
            task_cfg.backend,
        )
        compilers, found = cpp_compilers()
        check(
            found is not None,
            "backend",
            f"torch compiles its environment step (torch.compile), and none of the C++ compilers {compilers} is "
            "on PATH; install one (apt-get install g++) or use one of ['gymnasium', 'envpool']",
            task_cfg.backend,
        )
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
    """Advantages and returns for (T, ...) tensors; ``dones[t]`` ends the trace after step t.

    The TD errors and decays of all steps are computed at once; only the
    running sum goes step by step (two operations a step).
    """
    not_done = 1.0 - dones
    following = torch.cat([values[1:], next_value[None]])
    deltas = rewards + gamma * following * not_done - values
    decays = gamma * lam * not_done
    advantages = torch.empty_like(rewards)
    running = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[0])):
        running = deltas[t] + decays[t] * running
        advantages[t] = running
    return advantages, advantages + values


def critic_values(
    net: ActorCritic,
    observations: torch.Tensor,
    following: torch.Tensor,
    rewards: np.ndarray,
    terminated: np.ndarray,
    truncated: np.ndarray,
    finals: np.ndarray,
    gamma: float | None,
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """A rollout's values, its bootstrap value and its rewards with time limits bootstrapped, after the rollout.

    The rollout acts with the actors alone; its weights do not change until
    the update, so the critics' values of every observation it acted on,
    ``observations`` (K, T * N, obs), and of the one it stopped at,
    ``following`` (K, N, obs), are one product afterwards, as are the
    values of the final observations ``finals`` (T, K * N, obs) where a time
    limit alone ended an episode (:func:`bootstrap_time_limits`, with the
    host's (T, K * N) ``rewards``, ``terminated`` and ``truncated``;
    ``gamma=None`` bootstraps nothing: ``truncation=terminate``). Returns
    the values (K, T * N), the bootstrap values (K, N) and the rewards.
    """
    K, batch, obs_dim = observations.shape
    T = rewards.shape[0]
    with torch.no_grad():
        values = net.critic(torch.cat([observations, following], 1))
        if gamma is not None:

            def final_values():
                by_agent = torch.as_tensor(finals, device=values.device).reshape(T, K, -1, obs_dim).transpose(0, 1)
                value = net.critic(by_agent.reshape(K, batch, obs_dim)).reshape(K, T, -1)
                return value.transpose(0, 1).reshape(T, -1).cpu().numpy()

            rewards = bootstrap_time_limits(rewards, terminated, truncated, final_values, gamma)
    return values[:, :batch], values[:, batch:], rewards


def log_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """``log_softmax`` over the actions, the last dimension of (..., B, A) logits, as a (..., B, A) view.

    Computed over the second-to-last dimension of a (..., A, B) copy: for
    the few actions of these environments torch's kernel over the last
    dimension took 380 us forward on (121, 100, 3) logits and 4x as long
    forward and backward as over a leading dimension (``bench/ppo_parts.py``
    times the minibatch step). The values agree with the last-dimension
    kernel's to rounding.
    """
    return F.log_softmax(logits.transpose(-1, -2).contiguous(), -2).transpose(-1, -2)


class Rollout(NamedTuple):
    """One update's samples, per agent: (K, T * N, ...)."""

    obs: torch.Tensor
    actions: torch.Tensor
    old_logits: torch.Tensor
    old_logprob: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


class Penalty(NamedTuple):
    """The policy loss's variant and the constants of the total: ``kl`` (the KL-penalty variant) or PPO-clip."""

    kl: bool
    clip: float
    value_coef: float


def minibatch_losses(
    net: ActorCritic,
    policy_bank: EnvelopeBank,
    value_bank: EnvelopeBank,
    rollout: Rollout,
    idx: torch.Tensor,
    kl_coef: torch.Tensor,
    penalty: Penalty,
    reduction: str,
) -> tuple[torch.Tensor, ...]:
    """One minibatch ``idx`` (K, B) of every agent: the total loss to differentiate, then per sample the raw and
    shaped policy and value losses, the probability ratio and its log.

    The envelopes' adaptive state moves by one step. ``torch.compile`` can
    take this function whole (``compile=true``): forward, losses, envelopes
    and, through autograd, the backward pass become one fused program.
    """
    mb_obs = rollout.obs.gather(1, idx[..., None].expand(-1, -1, rollout.obs.shape[-1]))
    mb_actions = rollout.actions.gather(1, idx)
    new_logits, new_values = net(mb_obs)
    new_logprobs_all = log_probabilities(new_logits)
    new_logprob = new_logprobs_all.gather(2, mb_actions[..., None]).squeeze(2)
    log_ratio = new_logprob - rollout.old_logprob.gather(1, idx)
    ratio = log_ratio.exp()
    adv = rollout.advantages.gather(1, idx)
    if not penalty.kl:
        policy_loss = -torch.min(ratio * adv, ratio.clamp(1 - penalty.clip, 1 + penalty.clip) * adv)
    else:
        old_logits = rollout.old_logits.gather(1, idx[..., None].expand(-1, -1, rollout.old_logits.shape[-1]))
        old_logprobs_all = log_probabilities(old_logits)
        exact_kl = (old_logprobs_all.exp() * (old_logprobs_all - new_logprobs_all)).sum(-1)
        policy_loss = -ratio * adv + kl_coef[:, None] * exact_kl
    value_loss = (new_values - rollout.returns.gather(1, idx)).square()
    shaped_policy, shaped_value = policy_bank(policy_loss), value_bank(value_loss)
    reduce = torch.sum if reduction == "sum" else torch.mean
    # each agent's loss; their sum's gradient for an agent's parameters is that agent's own
    loss = (reduce(shaped_policy, dim=1) + penalty.value_coef * reduce(shaped_value, dim=1)).sum()
    return loss, policy_loss, value_loss, shaped_policy, shaped_value, ratio, log_ratio


def finite(agent: int, metrics: dict[str, float], where: str) -> str | None:
    """An agent's run has failed where a recorded value is not finite (returns have no divergence factor)."""
    return divergence(metrics, where)


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

    fused = context.kernels == "fused"
    # Acrobot on the torch back end with fused kernels: each rollout acts and steps in one C++ loop
    fused_rollout = fused and task_cfg.backend == "torch"
    envs = Environments(task_cfg.backend, task_cfg.env_id, seeds, N, task_cfg.max_episode_steps, fused_rollout)
    obs_dim, n_actions = envs.observation_size, envs.actions
    if fused:  # built (or read from torch's cache) before training, so the first update's time is training's
        fused_mlp.extension()
    log.info("%d agents' networks on %s kernels (kernels=%s)", K, context.kernels, cfg.kernels)
    net = ActorCritic(*agent_networks(seeds, obs_dim, task_cfg.hidden, n_actions, task_cfg.init), device, fused)
    optimizer = make_optimizer(net.parameters(), task_cfg)
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]

    obs_buf = torch.zeros(T, K, N, obs_dim, device=device)
    actions_buf = torch.zeros(T, K, N, dtype=torch.long, device=device)
    logits_buf = torch.zeros(T, K, N, n_actions, device=device)
    # rewards, endings and final observations come from the host: kept there during the rollout, moved once after it
    rewards_host = np.zeros((T, K * N), dtype=np.float32)
    terminated_host = np.zeros((T, K * N), dtype=bool)
    truncated_host = np.zeros((T, K * N), dtype=bool)
    final_host = np.zeros((T, K * N, obs_dim), dtype=np.float32)

    obs = torch.as_tensor(envs.reset(), device=device).reshape(K, N, obs_dim)
    recent = [deque(maxlen=task_cfg.moving_average) for _ in range(K)]
    history: list[list[tuple[int, float]]] = [[] for _ in range(K)]
    failed: dict[int, str] = {}
    kl_coef = torch.full((K,), float(task_cfg.kl_coef), device=device)
    bootstrap = task_cfg.truncation == "bootstrap"
    penalty = Penalty(task_cfg.kl_penalty != "none", float(task_cfg.clip), float(task_cfg.value_coef))
    losses = minibatch_losses
    if context.compile:  # one fused program for the update's forward, losses, envelopes and backward
        losses = torch.compile(minibatch_losses, dynamic=False)
        like = torch.empty(0, device=device)
        for size in {task_cfg.minibatch_size, (T * N) % task_cfg.minibatch_size} - {0}:  # no recompilation
            policy_bank.prepare(size, like)
            value_bank.prepare(size, like)
    global_step, updates = 0, max(1, task_cfg.total_steps // (T * N))
    batch = T * N
    agent_of_env = np.repeat(np.arange(K), N)

    bar = recorders[0].progress(range(1, updates + 1), total=updates, unit="update")
    training_start = time.perf_counter()
    for update in bar:
        start = time.perf_counter()
        finished: list[list[tuple[float, int]]] = [[] for _ in range(K)]
        # Rollout: no autograd; actions are Gumbel-max samples, each agent's noise from its own stream. Each step
        # runs the actors alone; the critics' values follow in one product over the whole rollout.
        with torch.inference_mode():
            gumbel = torch.stack(
                [-torch.log(-torch.log(torch.rand(T, N, n_actions, generator=g).clamp_min(1e-20))) for g in generators],
                dim=1,
            ).to(device)
            if fused_rollout:  # the loop below, in C++
                obs = obs.contiguous()
                returns, lengths = envs.rollout(
                    obs, net.actor_parameters(), gumbel, obs_buf, actions_buf, logits_buf,
                    rewards_host, terminated_host, truncated_host, final_host,
                )  # fmt: skip
                for t, i in zip(*np.nonzero(terminated_host | truncated_host)):
                    finished[agent_of_env[i]].append((float(returns[t, i]), int(lengths[t, i])))
            else:
                for t in range(T):
                    logits = net.actor(obs)
                    action = (logits + gumbel[t]).argmax(-1)
                    next_obs, reward, terminated, truncated, final, episodes = envs.step(
                        action.reshape(-1).cpu().numpy()
                    )
                    obs_buf[t], actions_buf[t], logits_buf[t] = obs, action, logits
                    rewards_host[t], terminated_host[t], truncated_host[t] = reward, terminated, truncated
                    if bootstrap:  # where a time limit cuts an episode, its final observation's value is added after
                        final_host[t] = final
                    if episodes is not None:  # the episode's own rewards, without the bootstrap term
                        ended, returns, lengths = episodes
                        for i in np.flatnonzero(ended):
                            finished[agent_of_env[i]].append((float(returns[i]), int(lengths[i])))
                    obs = torch.as_tensor(next_obs, device=device).reshape(K, N, obs_dim)
            global_step += batch

        # per agent: (K, T * N, ...)
        b_obs = obs_buf.transpose(0, 1).reshape(K, batch, obs_dim)
        b_values, next_value, rewards_host[:] = critic_values(
            net,
            b_obs,
            obs,
            rewards_host,
            terminated_host,
            truncated_host,
            final_host,
            task_cfg.gamma if bootstrap else None,
        )
        rollout_seconds = time.perf_counter() - start
        values_buf = b_values.reshape(K, T, N).transpose(0, 1)
        dones_host = terminated_host | truncated_host
        rewards_buf = torch.as_tensor(rewards_host, device=device).reshape(T, K, N)
        dones_buf = torch.as_tensor(dones_host, device=device, dtype=torch.float32).reshape(T, K, N)
        advantages, returns = gae(rewards_buf, values_buf, dones_buf, next_value, task_cfg.gamma, task_cfg.gae_lambda)
        b_actions = actions_buf.transpose(0, 1).reshape(K, batch)
        b_old_logits = logits_buf.transpose(0, 1).reshape(K, batch, n_actions)
        b_old_logprob = log_probabilities(b_old_logits).gather(2, b_actions[..., None]).squeeze(2)
        b_adv = advantages.transpose(0, 1).reshape(K, batch)
        b_returns = returns.transpose(0, 1).reshape(K, batch)
        if task_cfg.normalise_advantages:
            b_adv = (b_adv - b_adv.mean(1, keepdim=True)) / (b_adv.std(1, keepdim=True) + 1e-8)

        # PPO update with the two envelopes, every agent at once.
        rollout = Rollout(b_obs, b_actions, b_old_logits, b_old_logprob, b_adv, b_returns)
        stats = {name: MeanStd(device, K) for name in ("policy_raw", "policy_shaped", "value_raw", "value_shaped")}
        meters = {"policy": EnvelopeMeter(policy_bank, device), "value": EnvelopeMeter(value_bank, device)}
        kl_sum = torch.zeros(K, device=device)
        clipped = torch.zeros(K, device=device)
        batches = 0
        for _ in range(task_cfg.update_epochs):
            order = torch.stack([torch.randperm(batch, generator=g) for g in generators]).to(device)
            for begin in range(0, batch, task_cfg.minibatch_size):
                idx = order[:, begin : begin + task_cfg.minibatch_size]
                first = context.compile and context.compile_s is None
                compiling = time.perf_counter() if first else 0.0
                loss, policy_loss, value_loss, shaped_policy, shaped_value, ratio, log_ratio = losses(
                    net, policy_bank, value_bank, rollout, idx, kl_coef, penalty, task_cfg.reduction
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if first:  # compiled on its first call (forward and backward): reported apart from training
                    context.compile_s = time.perf_counter() - compiling
                    log.info("compiled the update step of %d agents in %.1f s", K, context.compile_s)
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
        rows = {}
        for k in range(K):
            if k in failed:
                continue
            metrics = rows[k] = {}
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
        where = f"update {update} ({global_step} steps)"
        log_seeds(recorders, failed, rows, finite, global_step, where, step_name="step", unit="agent")
        if recent[0]:
            # all agents' environment steps per second since training began, updates included (the
            # rollout's own rate is the charts/rollout_SPS metric)
            sps = update * batch * K / (time.perf_counter() - training_start)
            bar.set_postfix(return_ma=f"{np.mean(recent[0]):.1f}", sps=f"{sps:.0f}")
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
