"""PPO's environments: K agents x N environments stepped as one batch, on gymnasium, EnvPool or torch."""

from __future__ import annotations

import logging
import math
import time

import gymnasium as gym
import numpy as np
import torch

log = logging.getLogger(__name__)

# the environments each back end can step (the torch back end implements them itself)
TORCH_ENVIRONMENTS = ("Acrobot-v1",)


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
    - ``torch``: Acrobot-v1 as one compiled tensor program a step
      (:class:`TorchAcrobot`); made with ``fused_rollout``, whole rollouts
      act and step in one C++ loop instead (:meth:`rollout`).
    """

    def __init__(
        self,
        backend: str,
        env_id: str,
        seeds: list[int],
        num_envs: int,
        max_episode_steps: int | None,
        fused_rollout: bool = False,
    ):
        self.count = len(seeds) * num_envs
        # agent k's environment j seeded seed_k + j, as in a run alone
        env_seeds = [int(seed) + j for seed in seeds for j in range(num_envs)]
        limit = max_episode_steps if max_episode_steps is not None else gym.spec(env_id).max_episode_steps
        if backend == "torch":
            if env_id not in TORCH_ENVIRONMENTS:
                raise ValueError(f"backend=torch steps only {list(TORCH_ENVIRONMENTS)}, not {env_id!r}")
            self.envs = TorchAcrobot(env_seeds, limit, compile_step=not fused_rollout)
            self.observation_size, self.actions = TorchAcrobot.observation_size, TorchAcrobot.actions
            return
        if backend == "envpool":
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
        if isinstance(self.envs, TorchAcrobot):
            return self.envs.reset()
        obs, _ = self.envs.reset() if self.reset_seeds is None else self.envs.reset(seed=self.reset_seeds)
        return np.asarray(obs, dtype=np.float32)

    def step(self, actions: np.ndarray):
        if isinstance(self.envs, TorchAcrobot):
            return self.envs.step(actions)
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

    def rollout(self, *args, **kwargs) -> tuple[np.ndarray, np.ndarray]:
        """A whole rollout in one C++ loop: :meth:`TorchAcrobot.rollout` (``backend=torch`` made with
        ``fused_rollout``)."""
        if not isinstance(self.envs, TorchAcrobot):
            raise ValueError("a fused rollout steps backend=torch's Acrobot-v1 only")
        return self.envs.rollout(*args, **kwargs)

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


def acrobot_derivatives(theta1, theta2, dtheta1, dtheta2, torque):
    """gymnasium's ``AcrobotEnv._dsdt`` ("book" dynamics), term for term, on tensors."""
    m1 = m2 = l1 = 1.0
    lc1 = lc2 = 0.5
    I1 = I2 = 1.0
    g = 9.8
    d1 = m1 * lc1**2 + m2 * (l1**2 + lc2**2 + 2 * l1 * lc2 * torch.cos(theta2)) + I1 + I2
    d2 = m2 * (lc2**2 + l1 * lc2 * torch.cos(theta2)) + I2
    phi2 = m2 * lc2 * g * torch.cos(theta1 + theta2 - math.pi / 2.0)
    phi1 = (
        -m2 * l1 * lc2 * dtheta2**2 * torch.sin(theta2)
        - 2 * m2 * l1 * lc2 * dtheta2 * dtheta1 * torch.sin(theta2)
        + (m1 * lc1 + m2 * l1) * g * torch.cos(theta1 - math.pi / 2)
        + phi2
    )
    ddtheta2 = (torque + d2 / d1 * phi1 - m2 * l1 * lc2 * dtheta1**2 * torch.sin(theta2) - phi2) / (
        m2 * lc2**2 + I2 - d2**2 / d1
    )
    ddtheta1 = -(d2 * ddtheta2 + phi1) / d1
    return dtheta1, dtheta2, ddtheta1, ddtheta2


def acrobot_observation(state):
    theta1, theta2, dtheta1, dtheta2 = state.unbind(-1)
    cos, sin = torch.cos, torch.sin
    return torch.stack([cos(theta1), sin(theta1), cos(theta2), sin(theta2), dtheta1, dtheta2], -1).float()


def wrap(angle):
    """gymnasium's ``wrap(x, -pi, pi)``: 2 pi subtracted or added until the angle lies in [-pi, pi], k times at once.

    The same arithmetic as gymnasium's loop where one turn is enough (k = 1),
    the case of all but the fastest steps.
    """
    turn = 2 * math.pi
    angle = torch.where(angle > math.pi, angle - torch.ceil((angle - math.pi) / turn) * turn, angle)
    return torch.where(angle < -math.pi, angle + torch.ceil((-math.pi - angle) / turn) * turn, angle)


def acrobot_step(state, action, elapsed, episode_return, fresh, limit: int):
    """One step of every environment, then same-step autoreset from ``fresh``, as gymnasium's Acrobot-v1.

    One explicit RK4 step of 0.2 s (gymnasium's ``rk4`` over ``[0, dt]``),
    angles wrapped into [-pi, pi], velocities bounded to 4 pi and 9 pi,
    reward -1 until the tip is above the bar, ``truncated`` at ``limit``
    steps (both flags where it also terminated, as gymnasium's
    ``TimeLimit``). Returns the new state, elapsed steps and returns (ended
    episodes restarted from ``fresh``), the observation to act on next, the
    reward, both flags, the final observation, and each ended episode's
    return and length (0 elsewhere).
    """
    dt = 0.2
    torque = action.to(state.dtype) - 1.0  # gymnasium's AVAIL_TORQUE = [-1, 0, 1]
    y = state.unbind(-1)
    k1 = acrobot_derivatives(*y, torque)
    k2 = acrobot_derivatives(*[a + dt / 2.0 * b for a, b in zip(y, k1)], torque)
    k3 = acrobot_derivatives(*[a + dt / 2.0 * b for a, b in zip(y, k2)], torque)
    k4 = acrobot_derivatives(*[a + dt * b for a, b in zip(y, k3)], torque)
    theta1, theta2, dtheta1, dtheta2 = [
        a + dt / 6.0 * (p + 2 * q + 2 * r + w) for a, p, q, r, w in zip(y, k1, k2, k3, k4)
    ]
    theta1, theta2 = wrap(theta1), wrap(theta2)
    dtheta1 = dtheta1.clamp(-4 * math.pi, 4 * math.pi)
    dtheta2 = dtheta2.clamp(-9 * math.pi, 9 * math.pi)
    stepped = torch.stack([theta1, theta2, dtheta1, dtheta2], -1)
    terminated = -torch.cos(theta1) - torch.cos(theta2 + theta1) > 1.0
    reward = torch.where(terminated, 0.0, -1.0).float()
    elapsed = elapsed + 1
    truncated = elapsed >= limit
    done = terminated | truncated
    episode_return = episode_return + reward
    final = acrobot_observation(stepped)
    state = torch.where(done[:, None], fresh, stepped)
    obs = torch.where(done[:, None], acrobot_observation(fresh), final)
    ended_returns = torch.where(done, episode_return, 0.0)
    ended_lengths = torch.where(done, elapsed, 0)
    episode_return = torch.where(done, 0.0, episode_return)
    elapsed = torch.where(done, 0, elapsed)
    return state, elapsed, episode_return, obs, reward, terminated, truncated, final, done, ended_returns, ended_lengths


class TorchAcrobot:
    """Acrobot-v1 for many environments as float64 tensor arithmetic: one compiled program a step.

    The dynamics are gymnasium's (:func:`acrobot_step`); a test steps both
    from the same states and compares. Environment i draws its initial
    states from its own generator, seeded ``seeds[i]``: uniform in
    [-0.1, 0.1] and rounded to float32, as gymnasium's ``reset``. So an
    environment's episodes do not depend on the batch it is in; they differ
    from gymnasium's and EnvPool's, which draw from other generators.

    The step is compiled with ``torch.compile`` (Inductor's CPU code: one
    loop over the environments instead of a pass per operation) on the
    first ``reset``, before any timing, with one graph for every batch size.
    Compilation needs a C++ compiler, as ``compile=true`` does. The state
    lives on the CPU, as EnvPool's does.

    :meth:`rollout` runs whole rollouts instead, acting and stepping in one
    C++ loop (``tasks/acrobot_rollout.cpp``, the same dynamics in double);
    made with ``compile_step=False``, the environments skip compiling the step.
    """

    observation_size, actions = 6, 3
    _compiled = None

    def __init__(self, seeds: list[int], limit: int, compile_step: bool = True):
        self.num_envs, self.limit, self.compile_step = len(seeds), int(limit), compile_step
        self.generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        self.state = torch.zeros(self.num_envs, 4, dtype=torch.float64)
        self.fresh = torch.zeros_like(self.state)
        self.used = torch.zeros(self.num_envs, dtype=torch.bool)  # fresh states a rollout has taken
        self.elapsed = torch.zeros(self.num_envs, dtype=torch.int64)
        self.episode_return = torch.zeros(self.num_envs, dtype=torch.float32)

    def _draw(self, i: int) -> torch.Tensor:
        uniform = torch.rand(4, generator=self.generators[i], dtype=torch.float64)
        return (-0.1 + 0.2 * uniform).float().double()

    def reset(self) -> np.ndarray:
        if self.compile_step:
            self._compile()
        for i in range(self.num_envs):
            self.state[i] = self._draw(i)
            self.fresh[i] = self._draw(i)  # each environment's next initial state, drawn ahead
        self.used.zero_()
        self.elapsed.zero_()
        self.episode_return.zero_()
        return acrobot_observation(self.state).numpy()

    def _compile(self) -> None:
        if TorchAcrobot._compiled is None:
            TorchAcrobot._compiled = torch.compile(acrobot_step, dynamic=True)
        # one step on a copy, so that a batch size not yet compiled (one environment is compiled apart) is
        # compiled here, before training's clock starts; microseconds where it is
        # Under inference mode, as the rollout steps: there its first step's state is an ordinary tensor and every
        # later one the previous step's output (an inference tensor), and torch.compile makes a graph for each
        start = time.perf_counter()
        state, elapsed, episode_return, fresh = (
            t.clone() for t in (self.state, self.elapsed, self.episode_return, self.fresh)
        )
        with torch.inference_mode():
            actions = torch.zeros(self.num_envs, dtype=torch.int64)
            out = TorchAcrobot._compiled(state, actions, elapsed, episode_return, fresh, self.limit)
            TorchAcrobot._compiled(out[0], actions, out[1], out[2], fresh, self.limit)
        if time.perf_counter() - start > 1.0:
            log.info("compiled the torch Acrobot step in %.1f s", time.perf_counter() - start)

    def step(self, actions: np.ndarray):
        actions = torch.as_tensor(actions)
        (
            self.state,
            self.elapsed,
            self.episode_return,
            obs,
            reward,
            terminated,
            truncated,
            final,
            done,
            returns,
            lengths,
        ) = TorchAcrobot._compiled(self.state, actions, self.elapsed, self.episode_return, self.fresh, self.limit)
        done = done.numpy()
        episodes = None
        if done.any():
            for i in np.flatnonzero(done):
                self.fresh[i] = self._draw(i)
            episodes = (done, returns.numpy(), lengths.numpy())
        return obs.numpy(), reward.numpy(), terminated.numpy(), truncated.numpy(), final.numpy(), episodes

    def rollout(
        self,
        obs: torch.Tensor,
        actor: tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor],
        gumbel: torch.Tensor,
        obs_buf: torch.Tensor,
        actions_buf: torch.Tensor,
        logits_buf: torch.Tensor,
        rewards: np.ndarray,
        terminated: np.ndarray,
        truncated: np.ndarray,
        final: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """T = ``len(gumbel)`` steps of acting and stepping in one C++ loop, as T calls of :meth:`step` would.

        Each step agent k's actor (``actor``: the K actors' stacked weights,
        biases, head and head bias, as ``tasks.fused_mlp`` takes them) acts on
        ``obs`` (K, N, 6) with action ``argmax(logits + gumbel[t])``, and every
        environment steps. Step t's observations, actions and logits go to
        ``obs_buf``, ``actions_buf`` and ``logits_buf`` (T, K, N, ...), its
        rewards, flags and final observations to the host arrays (T, K * N,
        ...); ``obs`` is left holding the observations to act on next. Returns
        each ended episode's return and length (T, K * N; 0 where none ended).

        An environment restarts from its next initial state, drawn here
        from its own generator as :meth:`step` draws it; the loop returns
        early where one would need a second within a call, and goes on once
        it is drawn.
        """
        from tasks import fused_mlp

        steps = gumbel.shape[0]
        ended_returns = np.zeros((steps, self.num_envs), dtype=np.float32)
        ended_lengths = np.zeros((steps, self.num_envs), dtype=np.int64)
        host = [torch.from_numpy(a) for a in (rewards, terminated, truncated, final, ended_returns, ended_lengths)]
        weights, biases, head, head_bias = actor
        t = 0
        while t < steps:
            t = fused_mlp.extension().acrobot_rollout(
                t, obs, weights, biases, head, head_bias, gumbel, self.state, self.elapsed, self.episode_return,
                self.fresh, self.used, self.limit, obs_buf, actions_buf, logits_buf, *host,
            )  # fmt: skip
            for i in np.flatnonzero(self.used.numpy()):
                self.fresh[i] = self._draw(i)
            self.used.zero_()
        return ended_returns, ended_lengths

    def close(self) -> None:
        pass
