"""PPO's environments: K agents x N environments stepped as one batch, on gymnasium or EnvPool."""

from __future__ import annotations

import gymnasium as gym
import numpy as np


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
