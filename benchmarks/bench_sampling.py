"""Sampler cost and quality side by side: NFE, images/s and Frechet distance of each solver.

Run after the demo pipeline (it reads the EMA export, the shards and the reference statistics,
by default where dvc.yaml puts them):

    .venv/bin/python -m benchmarks.bench_sampling --num-images 200 --cfg-scale 1.25

Each solver generates the same class-balanced images (same seed) at the same guidance; the
Frechet distance uses the pipeline's feature space and reference statistics, and class
consistency the pixel classifier of the evaluation.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from stages.params import load_params
from unite.evaluation import feature_space, generate_and_score, load_exported_model, load_split
from unite.metrics.class_consistency import ClassConsistency
from unite.metrics.features import distance_key
from unite.metrics.fid import GaussianStats
from unite.metrics.pixel_classifiers import PixelClassifier
from unite.sampling import Guidance, sample_latents

SOLVERS = [("dopri5", 0), ("heun", 25), ("heun", 50), ("euler", 25), ("euler", 50)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--model", type=Path, default=Path("models/unite-ema.safetensors"), help="the EMA export")
    parser.add_argument("--reference", type=Path, default=Path("data/fid_ref.npz"), help="reference statistics")
    parser.add_argument("--shards", type=Path, default=Path("data/shards"), help="the shards (train is used)")
    args = parser.parse_args()

    ref = load_params()["fid_ref"]
    model = load_exported_model(args.model, torch.device("cpu"))
    space = feature_space(ref["feature_space"], args.shards / "train", ref["inception_weights"])
    reference = GaussianStats.load(args.reference)
    judge = PixelClassifier(*load_split(args.shards / "train"))
    guidance = Guidance(scale=args.cfg_scale)
    cfg = model.cfg
    probe = torch.randn(args.num_images, cfg.num_latent_tokens, cfg.latent_dim)
    probe_labels = torch.arange(args.num_images) % cfg.num_classes

    print(f"{args.num_images} images, cfg {args.cfg_scale}, {ref['feature_space']} features, {torch.get_num_threads()} threads")
    print(f"{'solver':<10} {'NFE':>4} {'images/s':>9} {'FD':>8} {'class-consistency':>18}")
    for solver, steps in SOLVERS:
        start = time.perf_counter()
        _, nfe = sample_latents(model, probe, probe_labels, guidance, solver=solver, steps=max(steps, 1))
        rate = args.num_images / (time.perf_counter() - start)
        consistency = ClassConsistency(judge)
        scores = generate_and_score(model, space, reference, args.num_images, guidance, args.seed, solver,
                                    max(steps, 1), args.num_images, consumers=[consistency])
        name = solver if solver == "dopri5" else f"{solver} {steps}"
        distance = scores[distance_key(ref["feature_space"])]
        print(f"{name:<10} {nfe:>4} {rate:>9.1f} {distance:>8.3f} {consistency.value:>18.3f}")


if __name__ == "__main__":
    main()
