"""Cost of an adaptive envelope in a training step of the paper's MNIST MLP.

Two measurements, in one process:

1. Whole steps, alternating: the classification task's own ``train_step``
   (784-256-10, batch 1,000, Adam, statistics accumulated on the device)
   with the identity envelope (A) and with an adaptive sigmoid (B: T at the
   90th percentile, invslope the 10% quantile span, step size 0.1), A and B
   timed back to back in each round. The same is done for A against a
   second identity (A/A): its spread is the machine's noise floor, which
   on a shared 2-core machine can exceed the effect being measured.
2. The envelope's own work in isolation: forward (quantiles, EMA, weight,
   product), the extra backward product and the statistics, minus the same
   for identity, timed in a tight loop on a batch of 1,000 real losses, as
   a fraction of the median identity step.

    python bench/envelope_overhead.py [--rounds 30] [--steps 25] [--device cpu] [--smoke]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from envelopes import Envelope
from tasks.classification import ClassificationConfig, per_sample_cross_entropy
from tasks.common import EnvelopeMeter, MeanStd, make_optimizer
from tasks.datasets import load_classification_pool
from tasks.seed_batch import ModelGroup
from tasks.supervised import build_mlp, train_step


def load_data(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, str]:
    try:
        pool = load_classification_pool("fashion_mnist", "data/fashion-mnist", ["train"])
        return pool.features.to(device), pool.labels.to(device), "Fashion-MNIST train split"
    except FileNotFoundError:
        generator = torch.Generator().manual_seed(0)
        x = torch.rand(60000, 784, generator=generator)
        return x.to(device), torch.randint(0, 10, (60000,), generator=generator).to(device), "random 784-d inputs"


def adaptive_sigmoid() -> Envelope:
    return Envelope("sigmoid", quantile=0.9, width=0.1, step_size=0.1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--keep-denormals", action="store_true", help="do not flush denormals (the runner's flush_denormal=false)"
    )
    parser.add_argument("--smoke", action="store_true", help="a tiny setting that checks the script runs")
    args = parser.parse_args()
    isolation = (2000, 200, 5)  # timed repeats, warm-up repeats, best of
    if args.smoke:
        args.rounds, args.steps, isolation = 2, 2, (20, 2, 1)
    device = torch.device(args.device)
    # As the runner does by default: tiny sigmoid weights make denormal gradients, slow on CPUs.
    torch.set_flush_denormal(not args.keep_denormals)
    x, y, source = load_data(device)
    batch = args.batch_size

    def setup(envelope: Envelope):
        model = ModelGroup(lambda: build_mlp(x.shape[1], [256], 10), [0], device)  # one seed, as a single run
        return model, make_optimizer(model.parameters(), ClassificationConfig(lr=1e-3)), envelope.to(device)

    variants = {
        "identity": setup(Envelope("identity")),
        "identity (A/A)": setup(Envelope("identity")),
        "adaptive sigmoid": setup(adaptive_sigmoid()),
    }

    def timed(name: str, offset: int) -> float:
        model, optimizer, envelope = variants[name]
        raw, shaped, meter = MeanStd(device, 1), MeanStd(device, 1), EnvelopeMeter(envelope, device)
        sync(device)
        start = time.perf_counter()
        for step in range(args.steps):
            begin = ((offset + step) * batch) % (len(x) - batch)
            train_step(
                model,
                optimizer,
                envelope,
                x[None, begin : begin + batch],
                y[None, begin : begin + batch],
                raw,
                shaped,
                meter,
                per_sample_cross_entropy,
            )
        raw.summary("raw", 0)  # one host sync per epoch, as in the task (one seed: group 0)
        sync(device)
        return (time.perf_counter() - start) / args.steps

    for name in variants:  # warm-up
        timed(name, 0)
    times = {name: [] for name in variants}
    for round_ in range(args.rounds):
        names = list(variants) if round_ % 2 == 0 else list(reversed(variants))
        for name in names:
            times[name].append(timed(name, round_ * args.steps))

    print(
        f"data: {source}; device: {device}; torch threads: {torch.get_num_threads()}; "
        f"flush denormals: {not args.keep_denormals}; batch {batch}"
    )
    print(f"1. whole steps, {args.rounds} alternating rounds x {args.steps} steps:")
    for name, values in times.items():
        print(f"   {name:17s} median {statistics.median(values) * 1e3:7.3f} ms/step, min {min(values) * 1e3:7.3f}")
    for name in ("identity (A/A)", "adaptive sigmoid"):
        paired = sorted(a / b for a, b in zip(times[name], times["identity"]))
        q1, q3 = paired[len(paired) // 4], paired[(3 * len(paired)) // 4]
        print(
            f"   {name} / identity: median of paired ratios {statistics.median(paired):.3f} "
            f"(interquartile {q1:.3f}-{q3:.3f}), ratio of minima {min(times[name]) / min(times['identity']):.3f}"
        )

    # 2. The envelope's own work on real per-sample losses of the trained model.
    model = variants["identity"][0]
    with torch.no_grad():
        losses = F.cross_entropy(model(x[None, :batch])[0], y[:batch], reduction="none")

    def envelope_work(envelope: Envelope, repeats: int) -> float:
        meter = EnvelopeMeter(envelope, device)
        leaf = losses.clone().requires_grad_(True)
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            envelope(leaf).mean().backward()
            meter.add()
        sync(device)
        return (time.perf_counter() - start) / repeats

    work = {}
    for name, make in (("identity", lambda: Envelope("identity")), ("adaptive sigmoid", adaptive_sigmoid)):
        envelope = make().to(device)
        envelope_work(envelope, isolation[1])
        work[name] = min(envelope_work(envelope, isolation[0]) for _ in range(isolation[2]))
    extra = work["adaptive sigmoid"] - work["identity"]
    step = statistics.median(times["identity"])
    print(
        f"2. envelope work in isolation (forward, backward of the product, statistics; best of {isolation[2]} x {isolation[0]}):"
    )
    print(
        f"   identity {work['identity'] * 1e6:.1f} us, adaptive sigmoid {work['adaptive sigmoid'] * 1e6:.1f} us: "
        f"{extra * 1e6:.1f} us more = {100 * extra / step:.2f}% of a {step * 1e3:.2f} ms identity step"
    )


if __name__ == "__main__":
    main()
