"""Fused CPU kernels for stacked tanh MLPs: each network's forward and backward pass in one C++ loop.

Torch's CPU path makes one pass over memory per operation: each layer's
batched product, then the tanh, then in the backward pass the tanh's
gradient, two more products and a bias sum, each over all 2K networks'
activations (242 networks x 100 samples x 64 floats: 6 MB a layer, more than
a core's caches hold). ``fused_mlp.cpp`` takes one network at a time
instead: its products run on four rows of activations in registers, the tanh
and its gradient are applied to rows while they are still in the first-level
cache, and nothing but the outputs, the hidden activations kept for the
backward pass and the gradients go back to memory. It reads network n's
observations from ``x[n % K]``, so an :class:`~tasks.ppo_networks.ActorCritic`
stack's actors and critics share the K agents' observations without a copy.

The source is compiled on first use with the machine's C++ compiler
(``torch.utils.cpp_extension``, ``-O3 -march=native``: tens of seconds once;
torch caches the build in ``~/.cache/torch_extensions``, or
``$TORCH_EXTENSIONS_DIR``, keyed by the source, this CPU's flags and the
checkout: :func:`build_name`).

Each network's arithmetic is its own and in a fixed order, so a network's
outputs and gradients do not depend on how many others share the stack: an
agent trained in a group computes exactly what it computes alone. They agree
with torch's products up to float32 rounding (the tests bound it).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("fused_mlp.cpp")
# the extension's sources: the kernels, their shared building blocks, and the Acrobot rollout built on them
SOURCES = (SOURCE, SOURCE.with_name("acrobot_rollout.cpp"))
HEADER = SOURCE.with_name("fused_mlp.h")
VECTOR = 16  # floats per vector in the kernel: hidden widths must be multiples of it


def unsupported(hidden: list[int]) -> str | None:
    """Why the fused kernels cannot run networks of these hidden widths, or None if they can."""
    bad = [h for h in hidden if h % VECTOR]
    return f"hidden widths must be multiples of {VECTOR}, got {list(hidden)}" if bad else None


def _ninja() -> str | None:
    """Ninja, which torch builds extensions with: on PATH, or beside this interpreter (pip's ``ninja``, in a
    virtual environment that is not activated)."""
    return shutil.which("ninja") or shutil.which("ninja", path=str(Path(sys.executable).parent))


def missing_tools() -> str | None:
    """What building the kernels needs and this machine lacks, in words (None: nothing)."""
    from tasks.common import cpp_compilers

    compilers, found = cpp_compilers()
    if found is None:
        return f"none of the C++ compilers {compilers} is on PATH; install one (apt-get install g++)"
    if _ninja() is None:
        return "ninja is not installed (pip install -r requirements.txt)"
    return None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def build_name(source: Path) -> str:
    """The build's name in torch's cache: a digest of the sources, this CPU's flags and ``source``'s path.

    The sources are ``source`` and the files of :data:`SOURCES` and
    :data:`HEADER` beside it. Torch rebuilds a named extension whenever its
    source path changes, so two checkouts sharing one name would rebuild it
    in turn (20-70 s each); with the path in the name each keeps its own build.
    """
    files = [source] + [source.with_name(p.name) for p in (*SOURCES[1:], HEADER)]
    key = b"".join(p.read_bytes() for p in files if p.exists()) + _cpu_flags().encode()
    key += str(source.resolve()).encode()
    return f"lae_fused_mlp_{hashlib.sha256(key).hexdigest()[:12]}"


@functools.cache
def extension():
    """The compiled kernels (built on the first call in a process where no cached build fits)."""
    from torch.utils.cpp_extension import load

    ninja = _ninja()
    if ninja is not None and shutil.which("ninja") is None:  # torch runs `ninja` from PATH
        os.environ["PATH"] = os.pathsep.join([str(Path(ninja).parent), os.environ.get("PATH", "")])
    start = time.perf_counter()
    module = load(
        name=build_name(SOURCE),
        sources=[str(p) for p in SOURCES],
        extra_cflags=["-O3", "-march=native"],
        verbose=False,
    )
    log.info("fused MLP kernels ready in %.1f s (%s)", time.perf_counter() - start, SOURCE.name)
    return module


def forward(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    head_weight: torch.Tensor,
    head_bias: torch.Tensor,
) -> torch.Tensor:
    """The stack's outputs (N, A, B): ``head_weight @ h^T + head_bias`` after the tanh hidden layers.

    Differentiable in the weights, biases and head (not in ``x``, the
    observations); without gradients, the hidden activations are not kept.
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in (*weights, *biases, head_weight, head_bias)):
        return _FusedStack.apply(x, head_weight, head_bias, len(weights), *weights, *biases)
    with torch.no_grad():
        return extension().forward(x, weights, biases, head_weight, head_bias, False)[0]


class _FusedStack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, head_weight, head_bias, layers, *parameters):
        weights, biases = list(parameters[:layers]), list(parameters[layers:])
        out, *hidden = extension().forward(x, weights, biases, head_weight, head_bias, True)
        ctx.layers = layers
        ctx.save_for_backward(x, head_weight, head_bias, *parameters, *hidden)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, head_weight, head_bias, *rest = ctx.saved_tensors
        layers = ctx.layers
        weights, biases, hidden = rest[:layers], rest[layers : 2 * layers], rest[2 * layers :]
        *layer_grads, head_grad, head_bias_grad = extension().backward(
            grad.contiguous(), x, hidden, weights, biases, head_weight, head_bias
        )
        return None, head_grad, head_bias_grad, None, *layer_grads
