"""Peak resident memory of each rank of the sweep's and evaluate's generation and scoring, for two
image counts, so that the figures show whether memory grows with the number of images.

Each run is a fresh `torchrun` launch (peak RSS is per process) of a small random UNITE at
--image-size pixels that generates class-balanced images with a cheap solver and scores them in
the pixel feature space (with 1000 IS logits per image under --is-logits), as the stages do:

- sweep: scores only (`generate_and_score`);
- evaluate: scores, the images written to an npz block by block, the sample grid;
- hold: evaluate, with the main process also keeping every image, as evaluation did before it
  streamed (the figure that grows with the count, for comparison).

Prints the median over --repeats of each rank's peak RSS (MiB) per mode and count, and the
growth from the smallest to the largest count:

    .venv/bin/python -m benchmarks.bench_eval_memory --counts 2000 8000 --nproc 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import torch

MODES = ("sweep", "evaluate", "hold")


class WithLogits:
    """A feature space that also gives 1000 IS logits (a fixed projection of its features), so that
    the Inception Score's streaming is measured without Inception's cost."""

    def __init__(self, space):
        self.space, self.name, self.projection = space, space.name, None

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, _ = self.space(images)
        if self.projection is None:
            self.projection = torch.randn(features.shape[1], 1000, generator=torch.Generator().manual_seed(0),
                                          dtype=features.dtype)
        return features, features @ self.projection


def worker(args: argparse.Namespace) -> None:
    """One rank of one run: generate and score, then record this process's peak RSS."""
    from unite.config import model_config
    from unite.distributed import close_runtime, init_runtime
    from unite.evaluation import generate_and_score
    from unite.metrics.features import PixelFeatures
    from unite.metrics.fid import compute_reference_stats
    from unite.generate import GridSamples, NpzImageWriter
    from unite.model import UNITE
    from unite.sampling import Guidance

    runtime = init_runtime("cpu")
    size = args.image_size
    torch.manual_seed(0)
    cfg = model_config("Tiny", "Tiny", image_size=size, patch_size=size // 4, num_latent_tokens=16, latent_dim=8,
                       num_classes=10, perceptual_weight=0.0)
    model = UNITE(cfg).eval()
    space = PixelFeatures(8)
    if args.is_logits:
        space = WithLogits(space)
    reference = None
    if runtime.is_main:
        real = torch.randint(0, 256, (256, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        reference = compute_reference_stats(real.split(64), space, progress=False)
    held = []
    with tempfile.TemporaryDirectory() as folder, ExitStack() as stack:
        consumers = []
        if runtime.is_main and args.mode != "sweep":
            npz = NpzImageWriter(Path(folder) / "images.npz", (args.num_images, size, size, 3))
            consumers = [stack.enter_context(npz), GridSamples(model.cfg.num_classes, 8)]
            if args.mode == "hold":
                consumers.append(lambda indices, labels, images: held.append(images))
        generate_and_score(model, space if runtime.is_main else None, reference, args.num_images, Guidance(scale=2.0),
                           seed=0, solver="euler", steps=args.steps, block_size=args.block_size, runtime=runtime,
                           consumers=consumers)
    close_runtime()
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    Path(args.report, f"rank{runtime.rank}.json").write_text(json.dumps({"rank": runtime.rank, "peak_mib": peak_mib}))


def run_once(mode: str, count: int, args: argparse.Namespace) -> list[float]:
    with tempfile.TemporaryDirectory() as report:
        command = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", str(args.nproc),
                   "-m", "benchmarks.bench_eval_memory", "--worker", "--mode", mode, "--num-images", str(count),
                   "--image-size", str(args.image_size), "--block-size", str(args.block_size), "--steps",
                   str(args.steps), "--report", report, *(["--is-logits"] if args.is_logits else [])]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        ranks = [json.loads(p.read_text()) for p in Path(report).glob("rank*.json")]
    return [r["peak_mib"] for r in sorted(ranks, key=lambda r: r["rank"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[2000, 8000])
    parser.add_argument("--nproc", type=int, default=2, help="torchrun ranks")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=100)
    parser.add_argument("--steps", type=int, default=2, help="euler steps (the cost, not the memory, grows with it)")
    parser.add_argument("--is-logits", action="store_true",
                        help="score with 1000 IS logits per image too (the Inception Score path)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--num-images", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    print(f"peak RSS per rank (MiB), median of {args.repeats}; {args.nproc} ranks on CPU, {args.image_size}x"
          f"{args.image_size} images, blocks of {args.block_size}")
    ranks = " ".join(f"{f'rank {r}':>9}" for r in range(args.nproc))
    print(f"{'mode':<9} {'images':>7} {ranks}")
    for mode in args.modes:
        medians = {}
        for count in args.counts:
            runs = [run_once(mode, count, args) for _ in range(args.repeats)]
            medians[count] = [statistics.median(run[r] for run in runs) for r in range(args.nproc)]
            print(f"{mode:<9} {count:>7} " + " ".join(f"{m:>9.1f}" for m in medians[count]), flush=True)
        low, high = min(args.counts), max(args.counts)
        growth = " ".join(f"{h - l:>+9.1f}" for l, h in zip(medians[low], medians[high]))
        print(f"{mode:<9} {'growth':>7} {growth}   ({low} -> {high} images)", flush=True)


if __name__ == "__main__":
    main()
