"""Median milliseconds of one Muon step on a model's Muon weights, variants side by side.

    .venv/bin/python -m benchmarks.bench_muon --preset demo --threads 1

Times torch.optim.Muon and unite.optim.Muon with the Newton-Schulz iteration in bfloat16 and
float32, one matrix at a time and with same-shaped matrices batched, in one run on the same
random gradients (the model is that of a `benchmarks.bench_train` preset). Prints one JSON line
per variant.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks.bench_train import PRESETS
from unite.config import model_config
from unite.model import UNITE
from unite.optim import Muon, split_parameters

RECIPE = {"lr": 1e-3, "weight_decay": 0.0, "momentum": 0.95, "nesterov": True, "eps": 1e-6,
          "adjust_lr_fn": "match_rms_adamw"}


def variants(params: list[torch.nn.Parameter]) -> dict[str, torch.optim.Optimizer]:
    return {
        "torch.optim.Muon": torch.optim.Muon(params, **RECIPE),
        "bfloat16": Muon(params, ns_dtype=torch.bfloat16, **RECIPE),
        "bfloat16 batched": Muon(params, ns_dtype=torch.bfloat16, batched=True, **RECIPE),
        "float32": Muon(params, ns_dtype=torch.float32, **RECIPE),
        "float32 batched": Muon(params, ns_dtype=torch.float32, batched=True, **RECIPE),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    parser.add_argument("--device", help="cpu or cuda (default: the preset's)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads on CPU (default: torch's)")
    parser.add_argument("--steps", type=int, default=9, help="timed steps per variant, interleaved")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    device = torch.device(args.device or preset["device"])
    model_fields = dict(preset["model"])
    model_fields.pop("lpips_random_backbone", None)
    model_fields["perceptual_weight"] = 0.0  # only the Muon weights matter here
    model = UNITE(model_config(model_fields.pop("encoder"), model_fields.pop("decoder"), **model_fields))
    params = [p for _, p in split_parameters(model.to(device))[0]]
    torch.manual_seed(0)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizers = variants(params)
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    cpu_times: dict[str, list[float]] = {name: [] for name in optimizers}
    for index in range(args.steps + 1):  # the first round warms up
        for name, optimizer in optimizers.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if index:
                times[name].append(time.perf_counter() - start)
                cpu_times[name].append(time.process_time() - cpu_start)
    reference = statistics.median(times["torch.optim.Muon"])
    for name, values in times.items():
        median = statistics.median(values)
        print(json.dumps({"preset": args.preset, "device": str(device), "threads": torch.get_num_threads(),
                          "variant": name, "matrices": len(params), "median_ms": round(1e3 * median, 2),
                          "vs_torch": round(median / reference, 3),
                          # CPU time of this process (all threads): robust to a shared machine.
                          "median_cpu_ms": round(1e3 * statistics.median(cpu_times[name]), 2)}))


if __name__ == "__main__":
    main()
