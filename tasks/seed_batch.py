"""Several seeds of one configuration trained as one batched model.

With ``seed_batch=N`` a job trains N seeds together. Their N models are
built one by one, each right after ``torch.manual_seed(seed)`` (the same
initialisation as a run of that seed alone), then their parameters are
stacked (``torch.func.stack_module_state``) and the models are called at
once with ``torch.func.vmap``. Data are held with a leading seed dimension:
each seed keeps its own split, data order and sampling noise, drawn from its
own generator in the order a single run draws them; each seed's envelopes
compute their quantiles and smoothed state on that seed's losses alone
(``EnvelopeBank``).

The step minimises the sum over seeds of each seed's loss, whose gradient
with respect to one seed's parameters is that seed's gradient alone; one
Adam over the stacked parameters is N Adams, since Adam acts element by
element. A single seed (N = 1) runs the plain module, without vmap.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap
from torch.utils._pytree import tree_map

from tasks.common import DivergedError


class ModelGroup:
    """One model per seed, called with inputs that have a leading seed dimension."""

    def __init__(self, build: Callable[[], nn.Module], seeds: Sequence[int], device: torch.device):
        modules = []
        for seed in seeds:
            torch.manual_seed(seed)
            modules.append(build().to(device))
        self.size = len(modules)
        self.module = modules[0]
        if self.size > 1:
            params, buffers = stack_module_state(modules)
            if buffers:
                raise ValueError(f"seed batching needs models without buffers, got {sorted(buffers)}")
            self.params = params
            self._stateless = copy.deepcopy(modules[0]).to("meta")

    def parameters(self) -> list[Tensor]:
        return list(self.module.parameters()) if self.size == 1 else list(self.params.values())

    def __call__(self, *args):
        """``module(*args)`` per seed; tensor arguments and outputs have the seed dimension first."""
        if self.size == 1:
            out = self.module(*(a[0] if isinstance(a, Tensor) else a for a in args))
            return tree_map(lambda t: t.unsqueeze(0), out)
        in_dims = (0,) + tuple(0 if isinstance(a, Tensor) else None for a in args)
        return vmap(self._call_one, in_dims=in_dims)(self.params, *args)

    def _call_one(self, params, *args):
        return functional_call(self._stateless, params, args)

    def model(self, index: int) -> nn.Module:
        """Seed ``index``'s model with its current parameters (a copy when batched)."""
        if self.size == 1:
            return self.module
        module = copy.deepcopy(self.module)
        with torch.no_grad():
            for name, parameter in module.named_parameters():
                parameter.copy_(self.params[name][index])
        return module


def generators(seeds: Sequence[int], device: torch.device) -> list[torch.Generator]:
    """One generator per seed for data order and sampling noise, seeded as a single run seeds its own."""
    return [torch.Generator(device=device).manual_seed(seed) for seed in seeds]


def permutations(n: int, gens: Sequence[torch.Generator], device: torch.device) -> Tensor:
    """(seeds, n): a fresh order of n items per seed."""
    return torch.stack([torch.randperm(n, device=device, generator=g) for g in gens])


def normal(shape: Sequence[int], gens: Sequence[torch.Generator], device: torch.device) -> Tensor:
    """(seeds, *shape) standard normal draws, each seed's from its own generator."""
    return torch.stack([torch.randn(tuple(shape), device=device, generator=g) for g in gens])


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on ``device`` (CUDA: free device memory; CPU: MemAvailable), None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_batch_memory(runs: int, bytes_per_run: int, device: torch.device, what: str) -> None:
    """Refuse, with what to do instead, a batch whose per-run data copies would not fit in memory.

    A batched group holds one data draw per distinct seed (``runs`` copies);
    copies of a large data set can exceed the machine, and the kernel would
    kill the whole process without a word. Raises ``MemoryError`` when they need
    more than 80% of the free memory.
    """
    free = available_memory(device)
    need = runs * bytes_per_run
    if free is None or need <= 0.8 * free:
        return
    fits = max(1, int(0.8 * free // max(bytes_per_run, 1)))
    raise MemoryError(
        f"{what} for {runs} seeds batched together needs {need / 2**30:.1f} GiB (one copy per seed, "
        f"{bytes_per_run / 2**20:.0f} MiB each); {free / 2**30:.1f} GiB is free on {device}. Train at most "
        f"{fits} seeds per group: hydra.launcher.max_batch={fits} (or seed_batch={min(fits, runs)})"
    )


class PerRun:
    """The (S, n, ...) data of S runs stored once per distinct draw: ``base`` (U, n, ...), run s reading ``base[slot[s]]``.

    Runs of a batched group that share a seed (they differ in envelopes
    only) draw the same splits; one copy each keeps the group's memory
    independent of how many envelopes it trains. Supports what the tasks
    use of their data: ``shape``, ``device``, ``[:, a:b]`` (materialised
    for the S runs: a batch or an evaluation chunk) and :func:`take`.
    """

    def __init__(self, base: Tensor, slot: Tensor):
        self.base, self.slot = base, slot.to(base.device)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.slot), *self.base.shape[1:]))

    @property
    def device(self) -> torch.device:
        return self.base.device

    def __getitem__(self, key) -> Tensor:
        if not (isinstance(key, tuple) and len(key) == 2 and key[0] == slice(None)):
            raise TypeError(f"PerRun supports [:, rows] only, got {key!r}")
        return self.base[:, key[1]].index_select(0, self.slot)


def per_run(per_seed: Sequence[Tensor], seeds: Sequence[int]) -> Tensor | PerRun:
    """Stack per-run tensors, storing runs of equal seed once (a :class:`PerRun`) where seeds repeat."""
    distinct = list(dict.fromkeys(seeds))
    if len(distinct) == len(seeds):
        return torch.stack(list(per_seed))
    first = {seed: i for i, seed in reversed(list(enumerate(seeds)))}
    base = torch.stack([per_seed[first[seed]] for seed in distinct])
    return PerRun(base, torch.tensor([distinct.index(seed) for seed in seeds]))


def take(data: Tensor | PerRun, index: Tensor) -> Tensor:
    """Rows ``index[s]`` of ``data[s]`` for every seed s: (S, n, ...) and (S, b) give (S, b, ...).

    One index_select on the flattened data (5x faster than advanced indexing).
    """
    if isinstance(data, PerRun):
        n = data.base.shape[1]
        flat_index = index + (data.slot * n).unsqueeze(1)
        base = data.base.reshape(-1, *data.base.shape[2:])
        return base.index_select(0, flat_index.reshape(-1)).reshape(*index.shape, *data.base.shape[2:])
    seeds, n = data.shape[:2]
    flat_index = index if seeds == 1 else index + torch.arange(0, seeds * n, n, device=index.device).unsqueeze(1)
    return (
        data.reshape(seeds * n, *data.shape[2:])
        .index_select(0, flat_index.reshape(-1))
        .reshape(*index.shape, *data.shape[2:])
    )


def stack_seeds(per_seed: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Per-seed dicts of tensors (equal shapes) to one dict of tensors with a leading seed dimension."""
    return {key: torch.stack([d[key] for d in per_seed]) for key in per_seed[0]}


def seed_outcomes(extras: Sequence[dict[str, float]], failed: dict[int, str]) -> list[dict[str, float] | Exception]:
    """Each seed's final extra metrics, or the error that ended it (``failed``: seed index to reason)."""
    return [DivergedError(failed[s]) if s in failed else extra for s, extra in enumerate(extras)]
