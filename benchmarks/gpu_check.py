"""The GPU check: one command, within 8 minutes on one CUDA GPU, printing one JSON object.

    .venv/bin/python -m benchmarks.gpu_check

1. The UNITE-B rehearsal on the GPU (`stages.rehearse`, 1 rank, bf16 autocast, compiled decoder):
   the whole pipeline in miniature, where CUDA-only code paths (bf16, TF32, torch.compile with
   Triton, NCCL-free single rank) run for real.
2. The UNITE-B training step as the paper trains it per GPU: batch 64, K = 3 flow draws, bf16,
   compiled decoder, LPIPS on (random VGG16 trunk: the same compute): images/s, peak memory, and a
   model FLOP utilisation estimate (FLOPs of one step counted by torch's FlopCounterMode, over the
   GPU's dense bf16 peak).
3. Sampling with UNITE-B (random weights, perturbed so that predictions vary; CFG 3.4, fp32 as the
   evaluation runs): images/s and NFE of dopri5 and of heun with 25 steps.

4. The dry run's prediction for the same batch (`unite.dry_run` on fake tensors, what
   `python -m stages.rehearse NAME --true-size` reports): measured / predicted peak training
   memory and FLOPs per image, and the measured MFU beside the 40% the dry run assumes.

Random weights make the NFE of dopri5 only indicative: a trained model's drift is smoother.
On a machine without CUDA it refuses and says what to run instead.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# Dense bf16 tensor-core peaks (TFLOP/s) of GPUs this project is run on, by a substring of the name.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "RTX 4090": 165.2}


def rehearsal_seconds() -> float:
    """Run the UNITE-B rehearsal on one rank of this GPU; its seconds."""
    from stages.rehearse import rehearse

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="unite-gpu-check-") as folder:
        rehearse("unite-b", Path(folder) / "run", nproc=1, device="cuda")
    return time.perf_counter() - start


def training_step(batch: int) -> dict:
    """benchmarks.bench_train for UNITE-B, batch 64, K = 3, bf16, compiled decoder."""
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_train", "--preset", "unite-b", "--batch", str(batch),
         "--compile", "--steps", "10", "--warmup", "5"],
        capture_output=True, text=True, check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def training_flops_per_image() -> float:
    """FLOPs of one UNITE-B training forward and backward (K = 3, LPIPS on) per image."""
    from torch.utils.flop_counter import FlopCounterMode

    from unite.config import model_config
    from unite.model import UNITE

    model = UNITE(model_config("B", "B", flow_steps_per_recon=3, lpips_random_backbone=True)).cuda().train()
    images, labels = torch.rand(2, 3, 256, 256, device="cuda"), torch.tensor([0, 1], device="cuda")
    with FlopCounterMode(display=False) as counter, torch.autocast("cuda", torch.bfloat16):
        model(images, labels)["loss"].backward()
    return counter.get_total_flops() / 2


def predicted(batch: int, sample_images: int) -> dict:
    """The dry run's prediction (`unite.dry_run`, fake tensors) for the same training batch and
    sampling block as measured here: peak memory and FLOPs per image."""
    from unite.dry_run import Generation, measure_generation, measure_training
    from unite.sampling import Guidance
    from unite.train_config import TrainConfig, recipe_for

    model = {"encoder": "B", "decoder": "B", "flow_steps_per_recon": 3, "perceptual_weight": 1.0,
             "lpips_random_backbone": True}
    cfg = TrainConfig.from_dict({"model": model, "data": {"kind": "synthetic", "num_images": batch},
                                 "out_dir": "unused", "max_steps": 1, "global_batch": batch,
                                 "per_device_batch": batch, "progress": False})
    train = measure_training(cfg, recipe_for(cfg, 1), world_size=1)
    generation = measure_generation(cfg, Generation(sample_images, Guidance(scale=3.4), lpips=False, inception=False))
    return {"train_peak_gib": round(train["peak_gib"], 2),
            "train_tflops_per_image": round(train["forward_backward_flops_per_image"] / 1e12, 4),
            "generation_peak_gib": round(generation["peak_gib"], 2)}


def sampling(num_images: int) -> dict:
    from unite.config import model_config
    from unite.model import UNITE
    from unite.sampling import Guidance, sample

    torch.manual_seed(0)
    model = UNITE(model_config("B", "B", perceptual_weight=0.0)).cuda().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    noise = torch.randn(num_images, 256, 32, device="cuda")
    labels = torch.arange(num_images, device="cuda") % 1000
    guidance = Guidance(scale=3.4, interval=(0.1, 1.0), norm_order="norm_first")
    results = {}
    for name, solver, steps in (("dopri5", "dopri5", 49), ("heun25", "heun", 25)):
        sample(model, noise[:8], labels[:8], guidance, solver=solver, steps=steps)  # warm-up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = sample(model, noise, labels, guidance, solver=solver, steps=steps)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        results[name] = {"images_per_s": round(num_images / seconds, 1), "nfe": out.nfe, "seconds": round(seconds, 2),
                         "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64, help="training images per GPU (default 64)")
    parser.add_argument("--sample-images", type=int, default=250, help="images per sampling run (default 250)")
    parser.add_argument("--skip-rehearsal", action="store_true", help="only the step and sampling figures")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); it measures GPU "
              "figures only. On a CPU, rehearse the presets with `python -m stages.rehearse --all`.", file=sys.stderr)
        return 2

    name = torch.cuda.get_device_name()
    report: dict = {"device_name": name, "torch": torch.__version__}
    if not args.skip_rehearsal:
        report["rehearsal_unite_b_s"] = round(rehearsal_seconds(), 1)
    step = training_step(args.batch)
    flops = training_flops_per_image()
    peak = next((tflops for key, tflops in PEAK_BF16_TFLOPS.items() if key in name), None)
    report["train_step"] = {
        "batch": args.batch, "flow_steps": step["flow_steps"], "bf16": step["bf16"],
        "compile_decoder": step["compile_decoder"], "images_per_s": step["images_per_s"],
        "median_s_per_step": step["median_s_per_step"], "peak_memory_gib": step.get("peak_memory_gib"),
        "tflops_per_image": round(flops / 1e12, 4),
        "mfu": round(flops * step["images_per_s"] / (peak * 1e12), 4) if peak else None,
        "peak_bf16_tflops": peak,
    }
    report["sampling"] = sampling(args.sample_images)
    prediction = predicted(args.batch, args.sample_images)
    measured_peak = step.get("peak_memory_gib")
    report["dry_run"] = {
        **prediction,
        "train_memory_measured_over_predicted": round(measured_peak / prediction["train_peak_gib"], 3)
        if measured_peak else None,
        "generation_memory_measured_over_predicted": round(
            report["sampling"]["heun25"]["peak_memory_gib"] / prediction["generation_peak_gib"], 3),
        "train_flops_measured_over_predicted": round(flops / 1e12 / prediction["train_tflops_per_image"], 3),
        "mfu_measured": report["train_step"]["mfu"],
        "mfu_assumed_by_dry_run": 0.4,
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
