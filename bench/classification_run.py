"""Wall time of one paper-sized classification run on Fashion-MNIST.

55,000 train / 5,000 val images, 20 epochs, batch 1,000, MLP 784-256-10,
validation every epoch, test at the end: the real command line, run
``--repeats`` times per envelope. Prints the job's own wall time (from
``result.json``: config composition to result) and the whole process's
(interpreter and library start-up included).

Needs Fashion-MNIST: apt-get install dataset-fashion-mnist, or
data_root=<dir holding fashion-mnist/>.

    python bench/classification_run.py [--repeats 2] [--envelopes identity sigmoid] [--smoke]
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--envelopes", nargs="+", default=["identity", "sigmoid"])
    parser.add_argument("overrides", nargs="*", help="extra overrides, e.g. device=cuda")
    parser.add_argument("--smoke", action="store_true", help="a tiny setting that checks the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.repeats = 1
        args.overrides += ["task.train_size=1000", "task.val_size=200", "task.epochs=1", "tensorboard=false"]
    rows = {name: [] for name in args.envelopes}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for name in args.envelopes:
                run_dir = Path(tmp) / f"{name}-{repeat}"
                start = time.perf_counter()
                subprocess.run(
                    [
                        sys.executable,
                        str(ROOT / "run_ablation.py"),
                        "task=fashion_mnist",
                        f"envelope@envelopes.classification={name}",
                        f"hydra.run.dir={run_dir}",
                        *args.overrides,
                    ],
                    check=True,
                    cwd=ROOT,
                    capture_output=True,
                )
                process = time.perf_counter() - start
                result = json.loads((run_dir / "result.json").read_text())
                rows[name].append((result["wall_time_s"], process, result["final"]["test_accuracy"]))
    print(
        "Fashion-MNIST, 55,000 train images, 20 epochs, batch 1,000, validation every epoch"
        + (f" (overridden: {' '.join(args.overrides)})" if args.overrides else "")
    )
    for name, values in rows.items():
        jobs = [v[0] for v in values]
        processes = [v[1] for v in values]
        print(
            f"  {name:9s} job wall time median {statistics.median(jobs):5.1f} s (runs: {', '.join(f'{j:.1f}' for j in jobs)}); "
            f"whole process {statistics.median(processes):5.1f} s; test accuracy {values[-1][2]:.4f}"
        )


if __name__ == "__main__":
    main()
