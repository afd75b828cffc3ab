"""PPO's networks: each agent's actor and critic, and K agents' networks stacked as tensors.

``agent_networks`` builds each agent's MLPs as a run alone builds them (seeded,
actor then critic, initialised as ``INITS`` says); ``ActorCritic``
stacks K agents' actors and critics so that each layer of all 2K networks is
one batched product, with ``tanh_layer``'s CPU tanh between layers, or, with
``fused=True``, runs each network's layers in one C++ kernel
(``tasks.fused_mlp``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tasks import fused_mlp

# initialisations (task.init): CleanRL's orthogonal weights (gain sqrt(2), the output layer's out_gain) with zero
# biases; or nn.Linear's own (uniform, scaled by fan-in), as the paper's code builds its networks
INITS = ("orthogonal", "torch")


def mlp(sizes: list[int], out_gain: float, init: str = "orthogonal") -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        linear = nn.Linear(a, b)
        if init == "orthogonal":
            nn.init.orthogonal_(linear.weight, out_gain if i == len(sizes) - 2 else np.sqrt(2))
            nn.init.zeros_(linear.bias)
        layers += [linear, nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def agent_networks(
    seeds: list[int], observation: int, hidden: list[int], actions: int, init: str = "orthogonal"
) -> tuple[list[nn.Sequential], list[nn.Sequential]]:
    """Each agent's actor and critic as a run alone builds them: seeded, then its actor, then its critic."""
    actors, critics = [], []
    for seed in seeds:
        torch.manual_seed(seed)
        actors.append(mlp([observation, *hidden, actions], 0.01, init))
        critics.append(mlp([observation, *hidden, 1], 1.0, init))
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

    The rollout runs the actors alone (:meth:`actor`, the first K networks
    of each stack, as views): a rollout step then reads half the weights,
    and the critics' values of the whole rollout are one product after it
    (:meth:`critic`, ``tasks.ppo.critic_values``), 100-500 rows per agent
    instead of one per step.

    Agent k's layers are built as a single run of its seed builds them
    (``torch.manual_seed(seed)``, then the actor, then the critic) and
    stacked, so each agent sees only its own parameters and inputs.

    With ``fused=True`` (CPU only) every forward and backward pass goes
    through ``tasks.fused_mlp``'s kernels instead of torch's products.
    """

    def __init__(
        self, actors: list[nn.Sequential], critics: list[nn.Sequential], device: torch.device, fused: bool = False
    ):
        if fused and device.type != "cpu":
            raise ValueError(f"the fused kernels run on the CPU, not on {device}")
        self.fused = fused

        def linears(modules):
            return [[m for m in module if isinstance(m, nn.Linear)] for module in modules]

        actor_layers, critic_layers = linears(actors), linears(critics)
        hidden = len(actor_layers[0]) - 1
        self.agents = len(actors)
        # On the CPU, MKL's batched product of one row per network is five times slower with an input
        # width that is not a multiple of 8 (242 networks of 6 -> 64: 0.16 ms; of 8 -> 64: 0.03 ms). The
        # first layer's weights are therefore kept with zero rows appended and every input with zero
        # columns: those rows' gradients are exactly zero, so they stay zero under Adam and SGD, and the
        # rollout and the update read the one tensor that the optimiser changes. The fused kernels take any
        # width as it is.
        inputs = actor_layers[0][0].in_features
        self.padding = (-inputs) % 8 if device.type == "cpu" and not fused else 0

        def stack(tensors, rows=0):
            return nn.functional.pad(torch.stack(tensors), (0, 0, 0, rows)).contiguous().to(device).requires_grad_()

        self.weights = [
            stack([net[i].weight.detach().T for net in actor_layers + critic_layers], self.padding if i == 0 else 0)
            for i in range(hidden)
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

    def parameters(self) -> list[torch.Tensor]:
        pairs = [*zip(self.weights, self.biases), (self.head_weight, self.head_bias)]
        return [t for pair in pairs for t in pair]

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Observations (K, B, obs) to logits (K, B, actions) and values (K, B)."""
        if self.fused:
            out = fused_mlp.forward(x.contiguous(), self.weights, self.biases, self.head_weight, self.head_bias)
            return out[: self.agents].transpose(1, 2), out[self.agents :, 0]
        h = self._hidden(self._pad(x).repeat(2, 1, 1))  # each agent's actor (first K) and critic (last K)
        out = torch.baddbmm(self.head_bias, self.head_weight, h.transpose(1, 2))  # (2K, actions, B)
        return out[: self.agents].transpose(1, 2), out[self.agents :, 0]

    def actor(self, x: torch.Tensor) -> torch.Tensor:
        """Observations (K, B, obs) to logits (K, B, actions): the actors alone, as the rollout acts.

        The same products as ``__call__``'s actor half, on the first K
        networks of each stack (views, no copy), so that a rollout step reads
        only the actors' weights; the critics' values of a whole rollout are
        one product afterwards (:meth:`critic`).
        """
        if self.fused:
            return fused_mlp.forward(x.contiguous(), *self.actor_parameters()).transpose(1, 2)
        head_weight, head_bias = self.head_weight[: self.agents], self.head_bias[: self.agents]
        h = self._hidden(self._pad(x), slice(None, self.agents))
        return torch.baddbmm(head_bias, head_weight, h.transpose(1, 2)).transpose(1, 2)

    def actor_parameters(self) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """The K actors' weights, biases, head and head bias (views of the stacks), as ``tasks.fused_mlp`` takes
        them: what a rollout in C++ acts with (``TorchAcrobot.rollout``)."""
        K = self.agents
        return [w[:K] for w in self.weights], [b[:K] for b in self.biases], self.head_weight[:K], self.head_bias[:K]

    def critic(self, x: torch.Tensor) -> torch.Tensor:
        """Observations (K, B, obs) to values (K, B): the critics alone (the last K networks of each stack)."""
        head_weight, head_bias = self.head_weight[self.agents :, :1], self.head_bias[self.agents :, :1]
        if self.fused:
            return self._fused(x, slice(self.agents, None), head_weight, head_bias)[:, 0]
        h = self._hidden(self._pad(x), slice(self.agents, None))
        return torch.baddbmm(head_bias, head_weight, h.transpose(1, 2))[:, 0]

    def _fused(self, x: torch.Tensor, networks: slice, head_weight: torch.Tensor, head_bias: torch.Tensor):
        weights, biases = [w[networks] for w in self.weights], [b[networks] for b in self.biases]
        return fused_mlp.forward(x.contiguous(), weights, biases, head_weight, head_bias)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.pad(x, (0, self.padding)) if self.padding else x

    def _hidden(self, h: torch.Tensor, networks: slice | None = None) -> torch.Tensor:
        """The hidden layers of every network, or of ``networks`` (a slice of the stacks); no view of the whole
        stacks, whose gradient would pass through a slice's backward."""
        for weight, bias in zip(self.weights, self.biases):
            if networks is not None:
                weight, bias = weight[networks], bias[networks]
            h = tanh_layer(h, weight, bias)
        return h


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
