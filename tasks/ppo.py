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

import time
from collections import deque
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tasks.common import EnvelopeMeter, DivergedError, MeanStd, adam, check, divergence

OBJECTIVE = ("charts/return_ma100", "max")
ENVIRONMENTS = ("LunarLander-v3", "Acrobot-v1", "CartPole-v1")


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
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip: float = 0.2
    value_coef: float = 0.5
    hidden: List[int] = field(default_factory=lambda: [64, 64])
    reduction: str = "sum"
    normalise_advantages: bool = True
    truncation: str = "bootstrap"
    kl_penalty: str = "none"
    kl_coef: float = 0.01
    kl_target: float = 0.01
    moving_average: int = 100
    max_episode_steps: Optional[int] = None  # override the environment's time limit


Config = PPOConfig


def loss_names(task_cfg) -> tuple[str, ...]:
    return ("policy", "value")


def validate(task_cfg) -> None:
    check(task_cfg.env_id in ENVIRONMENTS, "env_id", f"must be one of {list(ENVIRONMENTS)}", task_cfg.env_id)
    for key in ("total_steps", "num_envs", "rollout_steps", "update_epochs", "minibatch_size", "moving_average"):
        check(task_cfg[key] > 0, key, "must be a positive integer", task_cfg[key])
    check(task_cfg.lr > 0, "lr", "must be > 0", task_cfg.lr)
    check(0 < task_cfg.gamma <= 1, "gamma", "must lie in (0, 1]", task_cfg.gamma)
    check(0 <= task_cfg.gae_lambda <= 1, "gae_lambda", "must lie in [0, 1]", task_cfg.gae_lambda)
    check(task_cfg.clip > 0, "clip", "must be > 0", task_cfg.clip)
    check(task_cfg.value_coef >= 0, "value_coef", "must be >= 0", task_cfg.value_coef)
    check(len(task_cfg.hidden) > 0 and all(h > 0 for h in task_cfg.hidden), "hidden",
          "must be a non-empty list of positive layer widths", list(task_cfg.hidden))
    check(task_cfg.reduction in ("sum", "mean"), "reduction", "must be one of ['sum', 'mean']", task_cfg.reduction)
    check(task_cfg.truncation in ("bootstrap", "terminate"), "truncation", "must be one of ['bootstrap', 'terminate']", task_cfg.truncation)
    check(task_cfg.kl_penalty in ("none", "fixed", "adaptive"), "kl_penalty", "must be one of ['none', 'fixed', 'adaptive']", task_cfg.kl_penalty)
    check(task_cfg.kl_coef >= 0, "kl_coef", "must be >= 0", task_cfg.kl_coef)
    check(task_cfg.kl_target > 0, "kl_target", "must be > 0", task_cfg.kl_target)
    check(task_cfg.max_episode_steps is None or task_cfg.max_episode_steps > 0, "max_episode_steps",
          "must be null or a positive integer", task_cfg.max_episode_steps)
    batch = task_cfg.rollout_steps * task_cfg.num_envs
    check(task_cfg.minibatch_size <= batch, "minibatch_size", f"must be at most rollout_steps x num_envs = {batch}", task_cfg.minibatch_size)


def mlp(sizes: list[int], out_gain: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        linear = nn.Linear(a, b)
        nn.init.orthogonal_(linear.weight, out_gain if i == len(sizes) - 2 else np.sqrt(2))
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def make_envs(env_id: str, num_envs: int, seed: int, max_episode_steps: int | None = None):
    import gymnasium as gym

    kwargs = {} if max_episode_steps is None else {"max_episode_steps": max_episode_steps}
    envs = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="sync",
                        vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP}, **kwargs)
    envs.action_space.seed(seed)
    return envs


def bootstrap_time_limits(reward: np.ndarray, terminated: np.ndarray, truncated: np.ndarray, info: dict,
                          critic: nn.Module, gamma: float) -> np.ndarray:
    """Rewards with ``gamma * V(final observation)`` added where a time limit alone ended the episode.

    A time limit is not an ending, so its final state is bootstrapped. A
    time limit reached on the very step the episode terminated sets both
    flags (gymnasium's TimeLimit does); that state is terminal and nothing
    is added. ``info["final_obs"]`` holds the final observations (same-step
    autoreset).
    """
    cut = truncated & ~terminated
    if not cut.any():
        return reward
    final = torch.as_tensor(np.stack([info["final_obs"][i] for i in np.flatnonzero(cut)]), dtype=torch.float32)
    reward = reward.copy()
    reward[cut] += gamma * critic(final).squeeze(-1).numpy()
    return reward


def gae(rewards, values, dones, next_value, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns for (T, N) tensors; ``dones[t]`` ends the trace after step t."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[0])):
        following = next_value if t == rewards.shape[0] - 1 else values[t + 1]
        not_done = 1.0 - dones[t]
        delta = rewards[t] + gamma * following * not_done - values[t]
        running = delta + gamma * lam * not_done * running
        advantages[t] = running
    return advantages, advantages + values


def run(cfg, context) -> dict[str, float]:
    task_cfg, device, recorder = cfg.task, context.device, context.recorder
    policy_envelope, value_envelope = context.envelopes["policy"], context.envelopes["value"]

    # Environments and networks. Rollouts run on the CPU, next to the environments.
    envs = make_envs(task_cfg.env_id, task_cfg.num_envs, cfg.seed, task_cfg.max_episode_steps)
    obs_dim = int(np.prod(envs.single_observation_space.shape))
    n_actions = int(envs.single_action_space.n)
    actor = mlp([obs_dim, *task_cfg.hidden, n_actions], 0.01).to(device)
    critic = mlp([obs_dim, *task_cfg.hidden, 1], 1.0).to(device)
    optimizer = adam(list(actor.parameters()) + list(critic.parameters()), task_cfg.lr)
    generator = torch.Generator().manual_seed(cfg.seed)

    T, N = task_cfg.rollout_steps, task_cfg.num_envs
    obs_buf = torch.zeros(T, N, obs_dim)
    actions_buf = torch.zeros(T, N, dtype=torch.long)
    logits_buf = torch.zeros(T, N, n_actions)
    rewards_buf = torch.zeros(T, N)
    dones_buf = torch.zeros(T, N)
    values_buf = torch.zeros(T, N)

    obs, _ = envs.reset(seed=cfg.seed)
    obs = torch.as_tensor(obs, dtype=torch.float32)
    episode_return, episode_length = np.zeros(N), np.zeros(N, dtype=np.int64)
    recent = deque(maxlen=task_cfg.moving_average)
    history: list[tuple[int, float]] = []
    kl_coef = task_cfg.kl_coef
    bootstrap = task_cfg.truncation == "bootstrap"
    global_step, updates = 0, max(1, task_cfg.total_steps // (T * N))
    cpu_actor, cpu_critic = (actor, critic) if device.type == "cpu" else (None, None)

    bar = recorder.progress(range(1, updates + 1), total=updates, unit="update")
    for update in bar:
        start = time.perf_counter()
        finished_returns, finished_lengths = [], []
        if cpu_actor is None:  # a CUDA model: act with a CPU copy (no per-step device round trip)
            import copy

            rollout_actor, rollout_critic = copy.deepcopy(actor).cpu(), copy.deepcopy(critic).cpu()
        else:
            rollout_actor, rollout_critic = cpu_actor, cpu_critic

        # Rollout: no autograd. Actions are Gumbel-max samples; the noise for the whole
        # rollout is drawn in one call rather than per step.
        with torch.inference_mode():
            gumbel = -torch.log(-torch.log(torch.rand(T, N, n_actions, generator=generator).clamp_min(1e-20)))
            for t in range(T):
                logits = rollout_actor(obs)
                value = rollout_critic(obs).squeeze(-1)
                action = (logits + gumbel[t]).argmax(-1)
                next_obs, raw_reward, terminated, truncated, info = envs.step(action.numpy())
                reward = raw_reward.astype(np.float32)
                if bootstrap:
                    reward = bootstrap_time_limits(reward, terminated, truncated, info, rollout_critic, task_cfg.gamma)
                done = terminated | truncated
                obs_buf[t], actions_buf[t], logits_buf[t], values_buf[t] = obs, action, logits, value
                rewards_buf[t] = torch.from_numpy(reward)
                dones_buf[t] = torch.from_numpy(done.astype(np.float32))
                episode_return += raw_reward  # the episode's own rewards, without the bootstrap term
                episode_length += 1
                for i in np.flatnonzero(done):
                    finished_returns.append(float(episode_return[i]))
                    finished_lengths.append(int(episode_length[i]))
                    episode_return[i], episode_length[i] = 0.0, 0
                obs = torch.as_tensor(next_obs, dtype=torch.float32)
            global_step += T * N
            next_value = rollout_critic(obs).squeeze(-1)
        rollout_seconds = time.perf_counter() - start

        advantages, returns = gae(rewards_buf, values_buf, dones_buf, next_value, task_cfg.gamma, task_cfg.gae_lambda)
        b_obs = obs_buf.reshape(T * N, obs_dim).to(device)
        b_actions = actions_buf.reshape(-1).to(device)
        b_old_logits = logits_buf.reshape(T * N, n_actions).to(device)
        b_old_logprob = F.log_softmax(b_old_logits, -1).gather(1, b_actions[:, None]).squeeze(1)
        b_adv = advantages.reshape(-1).to(device)
        b_returns = returns.reshape(-1).to(device)
        b_values = values_buf.reshape(-1).to(device)
        if task_cfg.normalise_advantages:
            b_adv = (b_adv - b_adv.mean()) / (b_adv.std() + 1e-8)

        # PPO update with the two envelopes.
        stats = {name: MeanStd(device) for name in ("policy_raw", "policy_shaped", "value_raw", "value_shaped")}
        meters = {"policy": EnvelopeMeter(policy_envelope, device), "value": EnvelopeMeter(value_envelope, device)}
        kl_sum = torch.zeros((), device=device)
        clipped = torch.zeros((), device=device)
        batches = 0
        for _ in range(task_cfg.update_epochs):
            order = torch.randperm(T * N, generator=generator).to(device)
            for begin in range(0, T * N, task_cfg.minibatch_size):
                idx = order[begin : begin + task_cfg.minibatch_size]
                new_logprobs_all = F.log_softmax(actor(b_obs[idx]), -1)
                new_logprob = new_logprobs_all.gather(1, b_actions[idx, None]).squeeze(1)
                log_ratio = new_logprob - b_old_logprob[idx]
                ratio = log_ratio.exp()
                adv = b_adv[idx]
                old_logprobs_all = F.log_softmax(b_old_logits[idx], -1)
                exact_kl = (old_logprobs_all.exp() * (old_logprobs_all - new_logprobs_all)).sum(-1)
                if task_cfg.kl_penalty == "none":
                    policy_loss = -torch.min(ratio * adv, ratio.clamp(1 - task_cfg.clip, 1 + task_cfg.clip) * adv)
                else:
                    policy_loss = -ratio * adv + kl_coef * exact_kl
                value_loss = (critic(b_obs[idx]).squeeze(-1) - b_returns[idx]).square()
                shaped_policy, shaped_value = policy_envelope(policy_loss), value_envelope(value_loss)
                reduce = torch.sum if task_cfg.reduction == "sum" else torch.mean
                loss = reduce(shaped_policy) + task_cfg.value_coef * reduce(shaped_value)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                for name, values in (("policy_raw", policy_loss), ("policy_shaped", shaped_policy),
                                     ("value_raw", value_loss), ("value_shaped", shaped_value)):
                    stats[name].add(values)
                meters["policy"].add()
                meters["value"].add()
                with torch.no_grad():
                    kl_sum += ((ratio - 1) - log_ratio).mean()
                    clipped += ((ratio - 1).abs() > task_cfg.clip).float().mean()
                batches += 1

        # Logging, against environment steps (one host sync per update).
        approx_kl = (kl_sum / batches).item()
        if task_cfg.kl_penalty == "adaptive":
            kl_coef = kl_coef * 2 if approx_kl > 1.5 * task_cfg.kl_target else kl_coef / 2 if approx_kl < task_cfg.kl_target / 1.5 else kl_coef
        metrics = {}
        for name, meter in stats.items():
            loss_name, kind = name.split("_")
            metrics.update(meter.summary(f"train/{loss_name}_{kind}_loss"))
        for name, meter in meters.items():
            metrics.update(meter.summary(f"envelope/{name}"))
        variance = b_returns.var()
        metrics["train/explained_variance"] = (1 - (b_returns - b_values).var() / variance).item() if variance > 0 else float("nan")
        metrics["train/approx_kl"] = approx_kl
        metrics["train/clip_fraction"] = (clipped / batches).item()
        metrics["train/kl_coef"] = kl_coef if task_cfg.kl_penalty != "none" else 0.0
        metrics["charts/sps"] = T * N / rollout_seconds
        metrics["charts/sps_with_update"] = T * N / (time.perf_counter() - start)
        if finished_returns:  # no episode ended in this rollout: log no return rather than NaN
            recent.extend(finished_returns)
            metrics["charts/episodic_return"] = float(np.mean(finished_returns))
            metrics["charts/episodic_length"] = float(np.mean(finished_lengths))
            metrics["charts/episodes"] = len(finished_returns)
        if recent:
            metrics["charts/return_ma100"] = float(np.mean(recent))
            history.append((global_step, metrics["charts/return_ma100"]))
        if variance == 0:  # returns without spread: explained variance is undefined, not a divergence
            del metrics["train/explained_variance"]
        reason = divergence(metrics, f"update {update} ({global_step} steps)")
        if reason is not None:
            raise DivergedError(reason)
        recorder.log(global_step, metrics, step_name="step")
        if recent:
            bar.set_postfix(return_ma=f"{metrics['charts/return_ma100']:.1f}", sps=f"{metrics['charts/sps']:.0f}")
    envs.close()

    final_phase = [ma for step, ma in history if step >= 0.9 * global_step]
    return {"return_ma100_final_phase": float(np.mean(final_phase)) if final_phase else float("nan"),
            "env_steps": global_step}
