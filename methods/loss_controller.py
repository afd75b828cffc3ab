"""Adaptive loss weighting: an RL loss monitor, a meta-learning controller and a loss executor.

The training loss is ``base + sum_i w_i * aux_i``, where ``base`` is the
task's loss (shaped by its envelope, if any) and each ``aux_i`` an auxiliary
loss. Three parts set and guard the weights ``w``:

- :class:`LossExecutor` combines the losses and keeps training stable:
  weights clamped to an allowed range, a bounded change per adjustment,
  non-finite auxiliary losses or weights skipped and counted, and a
  fallback to the base loss for a while when the combined loss diverges.
  Its per-step work stays on the device.
- :class:`LossMonitor`, a Deep Q-Network, looks at training every
  ``interval`` steps (base-loss trend and variance over the interval,
  gradient norm, the change of a held-out probe batch's loss, training
  progress, current weights) and picks, for each auxiliary weight, decrease,
  keep or increase. Its reward is the relative improvement of the probe
  loss over the interval. Replay buffer, target network, epsilon-greedy
  exploration with decay.
- :class:`MetaController` acts once per epoch. It perturbs one weight per
  epoch, in turn, the others holding their targets, and keeps for each
  weight a score per direction of change (down, none, up): the mean
  advantage of the epochs in which that weight alone moved that way, where
  an epoch's advantage is its relative validation improvement minus a
  running average of the previous epochs' (improvements shrink as training
  goes on, so raw improvements would favour whichever direction was tried
  first; the first improvement only sets that average). The perturbed
  weight tries each direction once, then the best-scoring one, or a random
  one with chance ``meta_explore``; the monitor gets a range around each
  target, narrowing while the same direction keeps winning.

Modes (one switch): ``baseline`` (base loss only), ``monitor_only``,
``controller_only``, ``full`` (the controller sets each epoch's targets and
range, the monitor adjusts within it).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

MODES = ("baseline", "monitor_only", "controller_only", "full")
DIRECTIONS = (-1, 0, 1)


@dataclass
class ControllerSettings:
    """The controller's settings (``controller.*`` in the runner's config)."""

    mode: str = "full"
    init_weight: float = 0.1
    min_weight: float = 0.0
    max_weight: float = 1.0
    max_change: float = 0.05  # largest change of a weight per adjustment
    # optimiser steps between the monitor's decisions; null: the run's steps / decisions
    interval: int | None = None
    decisions: int = 200  # the monitor's decisions over the run (when interval is null)
    adjust_step: float = 0.05  # the monitor's increase/decrease
    divergence_factor: float = 10.0  # combined loss above this times the base loss level diverges
    fallback_steps: int = 50  # steps on the base loss alone after a divergence
    # monitor (DQN)
    hidden: int = 64
    lr: float = 1e-3
    gamma: float = 0.9
    buffer_size: int = 2000
    batch_size: int = 16
    updates_per_decision: int = 4  # Q-learning updates on replayed minibatches after each decision
    warmup: float = 0.1  # fraction of the run's decisions stored before learning starts (at least batch_size)
    target_sync: int = 20  # learning updates between target-network copies
    epsilon_start: float = 1.0
    epsilon_end: float = 0.05
    explore_fraction: float = 0.5  # epsilon falls linearly to epsilon_end over this fraction of the decisions
    # meta controller
    target_step: float = 0.05  # the target's move per epoch
    meta_explore: float = 0.2  # chance that the perturbed weight tries a random direction instead of the best
    range_radius: float = 0.2  # half-width of the range given to the monitor


def check_settings(settings: ControllerSettings) -> None:
    """Raise ``ValueError("key ...")`` for a value out of range."""

    def need(ok: bool, key: str, allowed: str, value: Any) -> None:
        if not ok:
            raise ValueError(f"{key} {allowed}, got {value!r}")

    need(settings.mode in MODES, "mode", f"must be one of {list(MODES)}", settings.mode)
    need(
        0 <= settings.min_weight <= settings.max_weight,
        "min_weight",
        "must satisfy 0 <= min_weight <= max_weight",
        (settings.min_weight, settings.max_weight),
    )
    need(
        settings.min_weight <= settings.init_weight <= settings.max_weight,
        "init_weight",
        "must lie in [min_weight, max_weight]",
        settings.init_weight,
    )
    for key in ("max_change", "adjust_step", "target_step", "range_radius", "lr"):
        need(getattr(settings, key) > 0, key, "must be > 0", getattr(settings, key))
    for key in ("decisions", "hidden", "buffer_size", "batch_size", "target_sync", "updates_per_decision"):
        need(getattr(settings, key) >= 1, key, "must be a positive integer", getattr(settings, key))
    need(
        settings.interval is None or settings.interval >= 2,
        "interval",
        "must be an integer >= 2 or null (the monitor's state has the loss trend and variance over it)",
        settings.interval,
    )
    need(0 <= settings.warmup < 1, "warmup", "must lie in [0, 1)", settings.warmup)
    need(settings.fallback_steps >= 0, "fallback_steps", "must be >= 0", settings.fallback_steps)
    need(settings.divergence_factor > 1, "divergence_factor", "must be > 1", settings.divergence_factor)
    need(0 <= settings.gamma < 1, "gamma", "must lie in [0, 1)", settings.gamma)
    need(
        0 <= settings.epsilon_end <= settings.epsilon_start <= 1,
        "epsilon_start",
        "must satisfy 0 <= epsilon_end <= epsilon_start <= 1",
        (settings.epsilon_start, settings.epsilon_end),
    )
    need(0 <= settings.meta_explore <= 1, "meta_explore", "must lie in [0, 1]", settings.meta_explore)
    need(0 < settings.explore_fraction <= 1, "explore_fraction", "must lie in (0, 1]", settings.explore_fraction)


class LossExecutor:
    """Combines base and auxiliary losses with the current weights, and guards the result.

    Weights are Python floats (they change every ``interval`` steps, on the
    host); the per-step combination, the skipping of non-finite auxiliary
    losses and the divergence fallback are tensor operations, counted on the
    device and read once per epoch.
    """

    def __init__(self, names: Sequence[str], settings: ControllerSettings, device: torch.device):
        self.names = list(names)
        self.settings = settings
        initial = 0.0 if settings.mode == "baseline" else settings.init_weight
        self.weights = {name: initial for name in self.names}
        self.ranges = {name: (settings.min_weight, settings.max_weight) for name in self.names}
        self.rejected_weights = 0  # non-finite weight proposals, skipped
        zero = torch.zeros((), device=device)
        self.level = zero.clone()  # running level of the base loss (EMA), for divergence
        self.seen = zero.clone()
        self.fallback_left = zero.clone()
        self.skipped = {name: zero.clone() for name in self.names}
        self.fallbacks = zero.clone()  # steps trained on the base loss alone

    def set_range(self, name: str, low: float, high: float) -> None:
        low, high = max(low, self.settings.min_weight), min(high, self.settings.max_weight)
        self.ranges[name] = (low, max(low, high))
        self.weights[name] = min(max(self.weights[name], self.ranges[name][0]), self.ranges[name][1])

    def adjust(self, name: str, proposed: float) -> float:
        """Move weight ``name`` towards ``proposed``: at most ``max_change``, within its range."""
        if not math.isfinite(proposed):
            self.rejected_weights += 1
            return self.weights[name]
        current = self.weights[name]
        change = max(-self.settings.max_change, min(self.settings.max_change, proposed - current))
        low, high = self.ranges[name]
        self.weights[name] = min(max(current + change, low), high)
        return self.weights[name]

    def combine(self, base: Tensor, aux: dict[str, Tensor]) -> Tensor:
        """``base + sum w_i aux_i`` (0-d tensors), guarded; no host synchronisation.

        A non-finite auxiliary loss is left out of the sum (and counted). Its
        gradient is then zero, but a NaN produced inside its own graph could
        still reach the parameters in the backward pass; the fallback catches
        the combined loss, not such gradients.
        """
        total = base
        for name in self.names:
            weight = self.weights[name]
            if weight == 0.0 or name not in aux:
                continue
            finite = torch.isfinite(aux[name])
            self.skipped[name] += (~finite).float()
            total = total + torch.where(finite, weight * aux[name], torch.zeros_like(base))
        return self.guard(total, base)

    def guard(self, combined: Tensor, base: Tensor) -> Tensor:
        """``combined``, or ``base`` while falling back: after a non-finite combined loss or one
        above ``divergence_factor`` times the base loss's running level, for ``fallback_steps`` steps."""
        base_value = base.detach()
        first = self.seen == 0
        self.level.copy_(torch.where(first, base_value.abs(), 0.9 * self.level + 0.1 * base_value.abs()))
        self.seen += 1
        value = combined.detach()
        diverged = ~torch.isfinite(value) | (value.abs() > self.settings.divergence_factor * self.level.clamp_min(1e-8))
        use_base = diverged | (self.fallback_left > 0)
        self.fallback_left.copy_(
            torch.where(
                diverged,
                torch.full_like(self.fallback_left, self.settings.fallback_steps),
                (self.fallback_left - 1).clamp_min(0),
            )
        )
        self.fallbacks += use_base.float()
        return torch.where(use_base, base, combined)

    def epoch_counts(self) -> dict[str, float]:
        """Counts since the start (one host transfer)."""
        values = torch.stack([self.fallbacks, *self.skipped.values()]).tolist()
        out = {"executor/fallback_steps": values[0], "executor/rejected_weights": float(self.rejected_weights)}
        out.update({f"executor/skipped_{name}": v for name, v in zip(self.names, values[1:])})
        return out


class LossMonitor:
    """A Deep Q-Network choosing, every ``interval`` steps, a direction for each auxiliary weight.

    Actions are the 3^n combinations of (decrease, keep, increase) over n
    weights. Runs on the CPU (its inputs are a few numbers per decision).
    Its schedule is in units of the run's ``planned`` decisions, so that a
    run of any length learns: learning starts once ``warmup`` of them are
    stored, each decision is followed by ``updates_per_decision`` replayed
    updates, the target network is copied every ``target_sync`` updates, and
    epsilon falls linearly over the first ``explore_fraction`` of them.
    """

    def __init__(self, n_weights: int, settings: ControllerSettings, seed: int, planned: int | None = None):
        self.settings = settings
        self.planned = max(1, planned if planned is not None else settings.decisions)
        self.made = 0  # decisions taken
        self.syncs = 0  # target-network copies
        self.n_weights = n_weights
        self.state_dim = 5 + n_weights
        self.n_actions = 3**n_weights
        self.generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.q = nn.Sequential(
                nn.Linear(self.state_dim, settings.hidden),
                nn.ReLU(),
                nn.Linear(settings.hidden, settings.hidden),
                nn.ReLU(),
                nn.Linear(settings.hidden, self.n_actions),
            )
        self.target = copy.deepcopy(self.q)
        self.optimizer = torch.optim.Adam(self.q.parameters(), lr=settings.lr)
        size = settings.buffer_size
        self.buffer = {
            "state": torch.zeros(size, self.state_dim),
            "action": torch.zeros(size, dtype=torch.long),
            "reward": torch.zeros(size),
            "next_state": torch.zeros(size, self.state_dim),
        }
        self.stored = 0
        self.updates = 0
        self.epsilon = settings.epsilon_start
        self.last_td_loss: float | None = None

    def deltas(self, action: int) -> list[int]:
        """The action as a direction (-1, 0, +1) per weight (base-3 digits)."""
        out = []
        for _ in range(self.n_weights):
            action, digit = divmod(action, 3)
            out.append(digit - 1)
        return out

    def act(self, state: Tensor) -> int:
        """Epsilon-greedy; then epsilon steps along its linear schedule over the run's decisions."""
        explore = torch.rand((), generator=self.generator).item() < self.epsilon
        if explore:
            action = int(torch.randint(self.n_actions, (), generator=self.generator))
        else:
            with torch.no_grad():
                action = int(self.q(state).argmax())
        self.made += 1
        progress = min(1.0, self.made / (self.settings.explore_fraction * self.planned))
        start, end = self.settings.epsilon_start, self.settings.epsilon_end
        self.epsilon = start + (end - start) * progress
        return action

    @property
    def warmed_up(self) -> bool:
        filled = min(self.stored, self.settings.buffer_size)
        return filled >= max(self.settings.batch_size, math.ceil(self.settings.warmup * self.planned))

    def remember(self, state: Tensor, action: int, reward: float, next_state: Tensor) -> None:
        slot = self.stored % self.settings.buffer_size
        self.buffer["state"][slot] = state
        self.buffer["action"][slot] = action
        self.buffer["reward"][slot] = reward
        self.buffer["next_state"][slot] = next_state
        self.stored += 1

    def learn(self) -> float | None:
        """One Q-learning update on a replayed minibatch (Huber loss, target network)."""
        if not self.warmed_up:
            return None
        filled = min(self.stored, self.settings.buffer_size)
        index = torch.randint(filled, (self.settings.batch_size,), generator=self.generator)
        state, action = self.buffer["state"][index], self.buffer["action"][index]
        reward, next_state = self.buffer["reward"][index], self.buffer["next_state"][index]
        with torch.no_grad():
            target = reward + self.settings.gamma * self.target(next_state).max(1).values
        predicted = self.q(state).gather(1, action.unsqueeze(1)).squeeze(1)
        loss = nn.functional.smooth_l1_loss(predicted, target)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.updates += 1
        if self.updates % self.settings.target_sync == 0:
            self.target.load_state_dict(self.q.state_dict())
            self.syncs += 1
        self.last_td_loss = loss.item()
        return self.last_td_loss

    def state_dict(self) -> dict[str, Any]:
        return {
            "q": self.q.state_dict(),
            "target": self.target.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "buffer": self.buffer,
            "stored": self.stored,
            "updates": self.updates,
            "made": self.made,
            "syncs": self.syncs,
            "epsilon": self.epsilon,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.q.load_state_dict(state["q"])
        self.target.load_state_dict(state["target"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.buffer = state["buffer"]
        self.stored, self.updates, self.epsilon = state["stored"], state["updates"], state["epsilon"]
        self.made, self.syncs = state["made"], state["syncs"]
        self.generator.set_state(state["generator"])


@dataclass
class Decision:
    epoch: int
    weight: str
    moved: int  # direction the weight moved over the epoch
    improvement: float  # validation improvement over the epoch
    chosen: int  # direction chosen for the next epoch
    target: float
    low: float
    high: float
    scores: dict[int, float | None] = field(default_factory=dict)


class MetaController:
    """Learns across epochs which direction of each weight's change preceded validation improvement.

    One weight is perturbed per epoch, in turn, and the others hold their
    targets, so an epoch's advantage is credited to the one weight that
    moved, for the direction it moved: weights that start equal are told
    apart. An epoch is scored only against a baseline (the running average
    of the epochs before it), so the first improvement sets the baseline
    and is not counted. The perturbed weight tries each direction once,
    then takes the best-scoring one, or, with chance ``meta_explore``, a
    random one, so exploration never stops.
    """

    def __init__(self, names: Sequence[str], settings: ControllerSettings, seed: int = 0):
        self.names = list(names)
        self.settings = settings
        self.totals = {name: {d: 0.0 for d in DIRECTIONS} for name in self.names}
        self.counts = {name: {d: 0 for d in DIRECTIONS} for name in self.names}
        self.last_choice: dict[str, int | None] = {name: None for name in self.names}
        self.streak = {name: 0 for name in self.names}
        self.decisions: list[Decision] = []
        self.typical: float | None = None  # running average of the epochs' relative improvements
        self.active: str | None = None  # the weight perturbed over the epoch now ending
        self.turn = 0
        self.generator = torch.Generator().manual_seed(seed)

    def score(self, name: str, direction: int) -> float | None:
        count = self.counts[name][direction]
        return self.totals[name][direction] / count if count else None

    def _choose(self, name: str) -> int:
        untried = [d for d in (1, -1, 0) if self.counts[name][d] == 0]
        if untried:
            return untried[0]
        if torch.rand((), generator=self.generator).item() < self.settings.meta_explore:
            return DIRECTIONS[int(torch.randint(len(DIRECTIONS), (), generator=self.generator))]
        return max(DIRECTIONS, key=lambda d: (self.score(name, d), -abs(d)))

    def decide(
        self, epoch: int, before: dict[str, float], after: dict[str, float], improvement: float
    ) -> list[Decision]:
        """Record the epoch's outcome (``improvement``: relative validation improvement); return each
        weight's target and range for the next epoch."""
        advantage = math.nan
        if math.isfinite(improvement):
            if self.typical is not None:  # scored against the epochs before; the first sets the baseline
                advantage = improvement - self.typical
            self.typical = improvement if self.typical is None else 0.5 * self.typical + 0.5 * improvement
        moves = {}
        for name in self.names:
            change = after[name] - before[name]
            moves[name] = 0 if abs(change) < 1e-12 else (1 if change > 0 else -1)
        if self.active is not None and math.isfinite(advantage):
            self.totals[self.active][moves[self.active]] += advantage
            self.counts[self.active][moves[self.active]] += 1
        active = self.names[self.turn % len(self.names)]
        self.turn += 1
        out = []
        for name in self.names:
            chosen = self._choose(name) if name == active else 0  # the others hold their targets
            if name == active:
                self.streak[name] = self.streak[name] + 1 if chosen == self.last_choice[name] else 0
                self.last_choice[name] = chosen
            low_bound, high_bound = self.settings.min_weight, self.settings.max_weight
            target = min(max(after[name] + chosen * self.settings.target_step, low_bound), high_bound)
            radius = self.settings.range_radius / (1 + self.streak[name])
            decision = Decision(
                epoch,
                name,
                moves[name],
                improvement,
                chosen,
                target,
                max(low_bound, target - radius),
                min(high_bound, target + radius),
                {d: self.score(name, d) for d in DIRECTIONS},
            )
            self.decisions.append(decision)
            out.append(decision)
        self.active = active
        return out


class LossController:
    """The three parts in one training loop, by mode; logs to the run's recorder.

    Per step: :meth:`combine` (executor) and :meth:`after_step` (the monitor
    every ``interval`` steps). Per epoch: :meth:`epoch_start` and
    :meth:`epoch_end` (the meta controller).
    """

    def __init__(
        self,
        names: Sequence[str],
        settings: ControllerSettings,
        device: torch.device,
        seed: int,
        probe: Callable[[], float],
        parameters: Sequence[Tensor],
        total_steps: int,
        writer=None,
    ):
        check_settings(settings)
        self.names = list(names)
        self.settings = settings
        self.mode = settings.mode
        self.executor = LossExecutor(self.names, settings, device)
        self.total_steps = max(total_steps, 1)
        # decisions in units the run has: every `interval` steps, by default spread so the run makes `decisions`
        # (at least 2 steps apart: the monitor's state has the loss trend and variance over its interval)
        self.interval = settings.interval or max(2, self.total_steps // settings.decisions)
        planned = self.total_steps // self.interval
        self.monitor = (
            LossMonitor(len(self.names), settings, seed, planned) if self.mode in ("monitor_only", "full") else None
        )
        self.meta = MetaController(self.names, settings, seed) if self.mode in ("controller_only", "full") else None
        self.probe = probe
        self.parameters = list(parameters)
        self.writer = writer
        self.step = 0
        self.recent = torch.zeros(self.interval, device=device)
        self.previous: tuple[Tensor, int] | None = None  # the monitor's last state and action
        self.probe_loss = probe() if self.monitor is not None else math.nan
        self.rewards: list[float] = []
        self.actions: list[int] = []
        self.epoch_weights = dict(self.executor.weights)
        self.previous_val: float | None = None

    @property
    def weights(self) -> dict[str, float]:
        return self.executor.weights

    def schedule_warnings(self) -> list[str]:
        """What the run's schedule leaves the monitor's DQN unable to do: learn at all, or copy its target network.

        The monitor decides every ``interval`` steps; each decision after the
        first stores a transition, and learning starts once ``max(batch_size,
        warmup x decisions)`` are stored (``updates_per_decision`` updates per
        decision from then on); the target network is copied every
        ``target_sync`` updates.
        """
        if self.monitor is None:
            return []
        s = self.settings
        decisions = self.total_steps // self.interval
        transitions = max(decisions - 1, 0)
        needed = max(s.batch_size, math.ceil(s.warmup * decisions))
        updates = max(transitions - needed + 1, 0) * s.updates_per_decision
        where = (
            f"{decisions} decisions (every {self.interval} of the run's {self.total_steps} optimiser steps) store "
            f"{transitions} transitions"
        )
        if updates == 0:
            return [
                f"loss monitor: its DQN makes no learning update in this run: {where}, fewer than the {needed} it "
                "stores before learning (controller.batch_size, controller.warmup); train longer or lower "
                "controller.interval"
            ]
        if updates < s.target_sync:
            return [
                f"loss monitor: its DQN never copies its target network in this run: {where}, so {updates} "
                f"learning updates, fewer than controller.target_sync = {s.target_sync}"
            ]
        return []

    def combine(self, base: Tensor, aux: dict[str, Tensor]) -> Tensor:
        return self.executor.combine(base, aux)

    def guard(self, combined: Tensor, base: Tensor) -> Tensor:
        return self.executor.guard(combined, base)

    def after_step(self, base: Tensor) -> None:
        """Call after each optimiser step, with the step's base loss (gradients still in place)."""
        self.recent[self.step % self.interval] = base.detach()
        self.step += 1
        if self.monitor is None or self.step % self.interval:
            return
        self._decide()

    def _state(self, probe_change: float) -> Tensor:
        norms = torch.stack([p.grad.norm() for p in self.parameters if p.grad is not None])
        values = torch.cat(
            [self.recent.float(), torch.linalg.vector_norm(norms).float().reshape(1)]
        ).cpu()  # one transfer
        losses, grad_norm = values[:-1], float(values[-1])
        mean = losses.mean()
        steps = torch.arange(len(losses), dtype=torch.float32)
        centred = steps - steps.mean()
        slope = float((centred * (losses - mean)).sum() / centred.square().sum()) / max(abs(float(mean)), 1e-8)
        low, high = self.settings.min_weight, self.settings.max_weight
        span = max(high - low, 1e-8)
        features = [
            slope * len(losses),
            math.log(float(losses.var()) + 1e-12),
            math.log(grad_norm + 1e-12),
            probe_change,
            self.step / self.total_steps,
        ]
        features += [(self.weights[name] - low) / span for name in self.names]
        state = torch.tensor(features, dtype=torch.float32)
        return torch.nan_to_num(state, nan=0.0, posinf=10.0, neginf=-10.0).clamp(-10.0, 10.0)

    def _decide(self) -> None:
        probe = self.probe()
        reward = (self.probe_loss - probe) / max(abs(self.probe_loss), 1e-8)
        reward = reward if math.isfinite(reward) else -1.0
        self.probe_loss = probe
        state = self._state(reward)
        td_loss = None
        if self.previous is not None:
            previous_state, previous_action = self.previous
            self.monitor.remember(previous_state, previous_action, reward, state)
            for _ in range(self.settings.updates_per_decision):
                td_loss = self.monitor.learn()
            self.rewards.append(reward)
        action = self.monitor.act(state)
        self.actions.append(action)
        for name, delta in zip(self.names, self.monitor.deltas(action)):
            self.executor.adjust(name, self.weights[name] + delta * self.settings.adjust_step)
        self.previous = (state, action)
        if self.writer is not None:
            self.writer.add_scalar("monitor_step/reward", reward, self.step)
            self.writer.add_scalar("monitor_step/epsilon", self.monitor.epsilon, self.step)
            self.writer.add_scalar("monitor_step/action", action, self.step)
            self.writer.add_scalar("monitor_step/probe_loss", probe, self.step)
            if td_loss is not None:
                self.writer.add_scalar("monitor_step/td_loss", td_loss, self.step)
            for name in self.names:
                self.writer.add_scalar(f"monitor_step/weight_{name}", self.weights[name], self.step)

    def epoch_start(self) -> None:
        self.rewards, self.actions = [], []

    def epoch_end(self, epoch: int, val: float) -> dict[str, float]:
        """The meta controller's decision (controller modes) and the epoch's controller metrics."""
        metrics = {f"controller/weight_{name}": w for name, w in self.weights.items()}
        metrics.update(self.executor.epoch_counts())
        if self.monitor is not None:
            metrics["monitor/epsilon"] = self.monitor.epsilon
            metrics["monitor/decisions"] = float(len(self.actions))
            if self.rewards:
                metrics["monitor/mean_reward"] = sum(self.rewards) / len(self.rewards)
            if self.monitor.last_td_loss is not None:
                metrics["monitor/td_loss"] = self.monitor.last_td_loss
            metrics["monitor/updates"] = float(self.monitor.updates)
            metrics["monitor/target_syncs"] = float(self.monitor.syncs)
        if self.meta is not None:
            # the change since the last decision (before its own adjustment) preceded this epoch's improvement
            improvement = (
                math.nan
                if self.previous_val is None
                else (self.previous_val - val) / max(abs(self.previous_val), 1e-12)
            )
            before, self.epoch_weights = self.epoch_weights, dict(self.weights)
            for decision in self.meta.decide(epoch, before, self.weights, improvement):
                name = decision.weight
                self.executor.set_range(name, decision.low, decision.high)
                self.executor.adjust(name, decision.target)
                metrics[f"controller/target_{name}"] = decision.target
                metrics[f"controller/direction_{name}"] = float(decision.chosen)
                metrics[f"controller/range_low_{name}"] = decision.low
                metrics[f"controller/range_high_{name}"] = decision.high
                for direction, value in decision.scores.items():
                    if value is not None:
                        metrics[f"controller/score_{name}_{['down', 'none', 'up'][direction + 1]}"] = value
        self.previous_val = val
        return metrics

    def save(self, path: Path) -> None:
        """The controller's state, saved with the run: weights, ranges, the DQN, the meta controller's history."""
        state: dict[str, Any] = {
            "mode": self.mode,
            "weights": self.weights,
            "ranges": self.executor.ranges,
            "step": self.step,
        }
        if self.monitor is not None:
            state["monitor"] = self.monitor.state_dict()
        if self.meta is not None:
            state["meta"] = {
                "totals": self.meta.totals,
                "counts": self.meta.counts,
                "decisions": [vars(d) for d in self.meta.decisions],
            }
        torch.save(state, path)
