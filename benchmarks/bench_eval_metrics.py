"""Seconds and peak extra memory of KID and precision/recall, as evaluate computes them, on random
float32 features (torch-fidelity's 2048 Inception pool features by default):

    .venv/bin/python -m benchmarks.bench_eval_metrics --generated 50000 --reference 10000 --repeats 1

Each measurement is a fresh process (peak RSS is per process): it draws the two feature sets, then
times one call of `unite.metrics.kid.kernel_distance` (--kid-subsets subsets of --kid-subset-size,
evaluate's defaults) or `unite.metrics.precision_recall.precision_recall` on --device. Peak extra
memory is the process's peak RSS less its RSS once the features exist: the metric's own float64
copies, kernel matrices and distance blocks (on a CUDA device, host memory only). Prints one JSON
line per metric with the median over --repeats. Precision/recall's work grows with the square of
the feature count ((N + M)^2 distances); KID's with the subsets, not the count.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from unite.metrics.kid import KID_SUBSET_SIZE, KID_SUBSETS, kernel_distance
from unite.metrics.precision_recall import precision_recall

METRICS = ("kid", "precision_recall")


def rss_mib() -> float:
    """This process's resident memory now (Linux)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def measure(args: argparse.Namespace) -> dict:
    """One metric, once, in this process: seconds and peak extra RSS (MiB)."""
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    generated = rng.standard_normal((args.generated, args.dim), dtype=np.float32)
    reference = rng.standard_normal((args.reference, args.dim), dtype=np.float32) + np.float32(0.1)
    before = rss_mib()
    start = time.perf_counter()
    if args.metric == "kid":
        kernel_distance(generated, reference, args.kid_subsets, args.kid_subset_size, device=args.device)
    else:
        precision_recall(generated, reference, device=args.device)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"seconds": seconds, "peak_extra_mib": peak - before}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_eval_metrics", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generated", type=int, default=50_000, help="generated feature rows (default 50000)")
    parser.add_argument("--reference", type=int, default=10_000, help="reference feature rows (default 10000)")
    parser.add_argument("--dim", type=int, default=2048, help="feature dimension (default 2048, Inception's pool)")
    parser.add_argument("--metrics", nargs="+", choices=METRICS, default=list(METRICS))
    parser.add_argument("--kid-subsets", type=int, default=KID_SUBSETS)
    parser.add_argument("--kid-subset-size", type=int, default=KID_SUBSET_SIZE)
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per metric (default 3)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--metric", choices=METRICS, help=argparse.SUPPRESS)  # one measurement, in a child
    args = parser.parse_args(argv)
    if args.metric:
        print(json.dumps(measure(args)))
        return
    shared = [f"--{key.replace('_', '-')}={getattr(args, key)}" for key in
              ("generated", "reference", "dim", "kid_subsets", "kid_subset_size", "threads", "device")]
    for metric in args.metrics:
        runs = []
        for _ in range(args.repeats):
            child = subprocess.run([sys.executable, "-m", "benchmarks.bench_eval_metrics", *shared, f"--metric={metric}"],
                                   capture_output=True, text=True, check=True)
            runs.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(json.dumps({
            "metric": metric, "generated": args.generated, "reference": args.reference, "dim": args.dim,
            **({"kid_subsets": args.kid_subsets, "kid_subset_size": args.kid_subset_size} if metric == "kid" else {}),
            "device": args.device, "threads": args.threads, "repeats": args.repeats,
            "median_s": round(statistics.median(run["seconds"] for run in runs), 2),
            "median_peak_extra_mib": round(statistics.median(run["peak_extra_mib"] for run in runs)),
        }), flush=True)


if __name__ == "__main__":
    main()
