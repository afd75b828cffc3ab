"""Where a batched PPO group's time goes: each part of a rollout step and of an update minibatch, timed alone.

For K agents (the paper's 64-64 actor and critic per agent, stacked as
``tasks.ppo_networks.ActorCritic``) on one torch thread:

- rollout forward, hot: the actors' logits for one observation per agent
  (``ActorCritic.actor``, as the rollout acts; the critics' values follow
  after the rollout in one product), repeated, so the weights stay in the
  caches;
- rollout forward, after an environment step: the same, each time right
  after EnvPool has stepped the K environments, as in a rollout, where the
  actors' weights (about 18 KB an agent) are read from memory again;
- EnvPool step of the K environments (random actions);
- update minibatch: forward and backward of both networks on 100 samples
  per agent, then the optimiser step (fused Adam).

And two floors, the least the same arithmetic on these tensors costs (one
environment per agent, float32):

- weights read once, after an environment step: a sum over every actor's
  stacked weights and biases, the memory traffic a rollout forward cannot
  avoid (each step acts on new observations with every agent's actor);
- the minibatch's batched products alone (forward, input and weight
  gradients of each layer), at MKL's rate, without the elementwise work,
  the losses or the optimiser.

Medians over repeats, in milliseconds, and per agent-step in microseconds.
The rollout's share of a step is forward plus environment plus the loop's
own bookkeeping; the update's is 4 minibatches per 100 steps at the paper's
protocol (4 epochs of minibatches of 100 over rollouts of 100 or 500).

``--compile`` adds the task's own minibatch step (``tasks.ppo.minibatch_losses``:
forward, clipped policy loss, value loss, adaptive envelopes of the four
shapes, backward and fused Adam), eager and through ``torch.compile``
(compilation left out of the timing).

``--kernels fused`` runs the networks on ``tasks.fused_mlp``'s C++ kernels
(``kernels=fused``) instead of torch's products.

    python bench/ppo_parts.py [--env Acrobot-v1] [--agents 121] [--compile] [--kernels fused]
    python bench/ppo_parts.py --smoke
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runner.job import keep_freed_memory
from tasks.common import make_optimizer
from tasks.ppo_envs import Environments
from tasks.ppo_networks import ActorCritic, agent_networks


def median_ms(fn, repeats: int, rounds: int = 5) -> float:
    times = []
    for _ in range(rounds):
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        times.append((time.perf_counter() - start) / repeats * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="Acrobot-v1", choices=["Acrobot-v1", "LunarLander-v3", "CartPole-v1"])
    parser.add_argument("--agents", type=int, default=121)
    parser.add_argument("--smoke", action="store_true", help="4 agents, few repeats: checks the script runs")
    parser.add_argument("--compile", action="store_true", help="also the task's minibatch step, eager and compiled")
    parser.add_argument("--kernels", default="torch", choices=["torch", "fused"], help="the networks' kernels")
    args = parser.parse_args()
    if args.compile and args.kernels == "fused":
        parser.error("--compile compiles torch's kernels, which --kernels fused replaces: use one of them")
    agents = 4 if args.smoke else args.agents
    steps, minibatches = (5, 2) if args.smoke else (300, 20)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    keep_freed_memory()

    envs = Environments("envpool", args.env, list(range(agents)), 1, None)
    envs.reset()
    observation, actions = envs.observation_size, envs.actions
    networks = agent_networks(list(range(agents)), observation, [64, 64], actions)
    net = ActorCritic(*networks, torch.device("cpu"), fused=args.kernels == "fused")
    optimizer = make_optimizer(net.parameters(), argparse.Namespace(optimizer="adam", lr=3e-4))
    rng = np.random.default_rng(0)
    one = torch.randn(agents, 1, observation)
    samples = torch.randn(agents, 100, observation)

    def forward():
        with torch.inference_mode():
            net.actor(one)

    def env_step():
        envs.step(rng.integers(0, actions, size=agents))

    def after_env(fn):  # seconds of fn alone, run right after an environment step
        env_step()
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def update():
        logits, values = net(samples)
        optimizer.zero_grad(set_to_none=True)
        (logits.square().sum() + values.square().sum()).backward()
        optimizer.step()

    parameters = [p.detach()[:agents] for p in net.parameters()]  # the actors' (the first K of each stack)

    def read_weights():  # one pass over every actor's weights
        for p in parameters:
            p.sum()

    hidden = [w.detach() for w in net.weights]
    inputs = [torch.randn(w.shape[0], 100, w.shape[1]) for w in hidden]
    grads = [torch.randn(w.shape[0], 100, w.shape[2]) for w in hidden]
    head = net.head_weight.detach()
    head_grad = torch.randn(head.shape[0], head.shape[1], 100)

    def products():  # every batched product of one minibatch's forward and backward, nothing else
        for x, w, g in zip(inputs, hidden, grads):
            torch.bmm(x, w)
            torch.bmm(x.transpose(1, 2), g)  # weight gradient
        for w, g in zip(hidden[1:], grads[1:]):
            torch.bmm(g, w.transpose(1, 2))  # input gradient (none for the observations)
        torch.bmm(head, grads[-1].transpose(1, 2))
        torch.bmm(head_grad, grads[-1])
        torch.bmm(head_grad.transpose(1, 2), head)

    hot = median_ms(forward, steps)
    cold = statistics.median(after_env(forward) for _ in range(steps)) * 1e3
    env = median_ms(env_step, steps)
    minibatch = median_ms(update, minibatches)
    weights_read = statistics.median(after_env(read_weights) for _ in range(steps)) * 1e3
    products_only = median_ms(products, minibatches)
    envs.close()
    with_envelopes = args.compile or args.kernels == "fused"
    steps_with_envelopes = (
        task_steps(net, observation, actions, agents, minibatches, args.compile) if with_envelopes else {}
    )

    def per_step(ms, minibatch=False):  # us per agent-step; an update has 4 minibatches per 100 steps
        return ms * (4 / 100 if minibatch else 1) * 1e3 / agents

    def row(name, ms, minibatch=False):
        note = " at 4 minibatches per 100 steps" if minibatch else ""
        print(f"  {name:45s} {ms:8.3f} ms  {per_step(ms, minibatch):7.2f} us per agent-step{note}")

    print(f"{args.env}, {agents} agents, 1 torch thread, {args.kernels} kernels")
    row("rollout forward, hot", hot)
    row("rollout forward, after an environment step", cold)
    row("EnvPool step", env)
    row("update minibatch (forward, backward, Adam)", minibatch, minibatch=True)
    print("floors:")
    row("weights read once, after an environment step", weights_read)
    row("the minibatch products alone", products_only, minibatch=True)
    for name, ms in steps_with_envelopes.items():
        row(f"task minibatch step with envelopes, {name}", ms, minibatch=True)
    floor = per_step(weights_read) + per_step(products_only, minibatch=True) + per_step(env)
    print(f"  {'sum of the floors and the EnvPool step':45s} {'':8s}    {floor:7.2f} us per agent-step")


def task_steps(net, observation: int, actions: int, agents: int, repeats: int, compiled: bool) -> dict[str, float]:
    """Milliseconds of the task's minibatch step (100 samples per agent), eager and, where asked, compiled."""
    from envelopes import Envelope, EnvelopeBank
    from tasks.ppo import Penalty, Rollout, minibatch_losses

    shapes = [
        Envelope("identity"),
        Envelope("step", quantile=0.3, step_size=0.1),
        Envelope("linear", quantile=0.3, width=0.1, step_size=0.1),
        Envelope("sigmoid", quantile=0.1, width=0.3, step_size=0.1),
    ]
    banks = [EnvelopeBank([shapes[(k + shift) % 4] for k in range(agents)]) for shift in (0, 1)]
    rollout = Rollout(
        torch.randn(agents, 100, observation),
        torch.randint(0, actions, (agents, 100)),
        torch.randn(agents, 100, actions),
        -torch.rand(agents, 100) - 0.5,
        torch.randn(agents, 100),
        torch.randn(agents, 100),
    )
    idx = torch.randperm(100).expand(agents, 100)
    kl_coef, penalty = torch.full((agents,), 0.01), Penalty(False, 0.2, 0.5)
    optimizer = make_optimizer(net.parameters(), argparse.Namespace(optimizer="adam", lr=3e-4))
    for bank in banks:
        bank.prepare(100, rollout.advantages)
    out = {}
    steps = [("eager", minibatch_losses)]
    if compiled:
        steps.append(("compiled", torch.compile(minibatch_losses, dynamic=False)))
    for name, losses in steps:

        def step(losses=losses):
            loss = losses(net, *banks, rollout, idx, kl_coef, penalty, "sum")[0]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        step()  # compiles (the compiled one), outside the timing
        out[name] = median_ms(step, repeats)
    return out


if __name__ == "__main__":
    main()
