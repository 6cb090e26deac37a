"""Median milliseconds of one Muon step on a model's Muon weights, variants side by side.

    .venv/bin/python -m benchmarks.bench_muon --preset demo --threads 1
    .venv/bin/python -m benchmarks.bench_muon --preset demo --nproc 2

Times torch.optim.Muon and unite.optim.Muon with the Newton-Schulz iteration in bfloat16 and
float32, one matrix at a time (as trained) and, as a candidate, with same-shaped matrices
stacked into one batched product per iteration step; interleaved in one run on the same random
gradients of the Muon weights of a `benchmarks.bench_train` preset's model. Prints one JSON
line per variant.

With `--nproc N` (N > 1) it starts N processes in one process group (gloo on CPU, NCCL on
CUDA with one GPU per rank), each with the same gradients, and times unite.optim.Muon with every
rank orthogonalising every matrix against the share-out (`share_across_ranks`: each rank its
share), its results exchanged by one all-gather (what unite.optim.Muon does on NCCL) and by
one broadcast per rank (what it does on gloo), in an order that rotates every round. A step's
time is the slowest rank's (the ranks start it together); CPU time is the mean over ranks.
Threads per rank: `--threads`, default 1.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.bench_train import PRESETS
from unite.config import model_config
from unite.model import UNITE
from unite.optim import (
    NS_COEFFICIENTS,
    NS_STEPS,
    Muon,
    adjusted_lr,
    gather_by_all_gather,
    gather_by_broadcasts,
    split_parameters,
)

RECIPE = {"lr": 1e-3, "weight_decay": 0.0, "momentum": 0.95, "nesterov": True, "eps": 1e-6,
          "adjust_lr_fn": "match_rms_adamw"}


def orthogonalise_stack(updates: torch.Tensor, dtype: torch.dtype, eps: float) -> torch.Tensor:
    """unite.optim.orthogonalise on a (count, rows, cols) stack: batched products."""
    a, b, c = NS_COEFFICIENTS
    x = updates.to(dtype)
    tall = updates.size(-2) > updates.size(-1)
    if tall:
        x = x.mT
    x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(NS_STEPS):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


class BatchedMuon(Muon):
    """The candidate: unite.optim.Muon orthogonalising same-shaped matrices together (for the
    recipe's hyperparameters only: Nesterov momentum, no weight decay)."""

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        for group in self.param_groups:
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            buffers: list[torch.Tensor] = []
            self._init_group(group, params, grads, buffers)
            by_shape: dict[tuple[int, ...], list[int]] = {}
            updates = []
            for index, (grad, buffer) in enumerate(zip(grads, buffers)):
                buffer.lerp_(grad, 1 - group["momentum"])
                updates.append(grad.lerp(buffer, group["momentum"]))
                by_shape.setdefault(tuple(grad.shape), []).append(index)
            for indices in by_shape.values():
                stack = orthogonalise_stack(torch.stack([updates[i] for i in indices]), self.ns_dtype, group["eps"])
                for i, update in zip(indices, stack.unbind()):
                    lr = adjusted_lr(group["lr"], group["adjust_lr_fn"], params[i].shape)
                    params[i].add_(update, alpha=-lr)


class AllGatherShareMuon(Muon):
    """The share-out with the results exchanged by one all-gather (NCCL's way)."""

    _gather_results = staticmethod(gather_by_all_gather)


class BroadcastShareMuon(Muon):
    """The share-out with the results exchanged by one broadcast per rank (gloo's way)."""

    _gather_results = staticmethod(gather_by_broadcasts)


def variants(params: list[torch.nn.Parameter]) -> dict[str, torch.optim.Optimizer]:
    return {
        "torch.optim.Muon": torch.optim.Muon(params, **RECIPE),
        "bfloat16": Muon(params, ns_dtype=torch.bfloat16, **RECIPE),
        "bfloat16 batched": BatchedMuon(params, ns_dtype=torch.bfloat16, **RECIPE),
        "float32": Muon(params, ns_dtype=torch.float32, **RECIPE),
        "float32 batched": BatchedMuon(params, ns_dtype=torch.float32, **RECIPE),
    }


def shared_variants(params: list[torch.nn.Parameter]) -> dict[str, torch.optim.Optimizer]:
    found = {}
    for dtype in ("float32", "bfloat16"):
        ns_dtype = getattr(torch, dtype)
        found[dtype] = Muon(params, ns_dtype=ns_dtype, **RECIPE)
        for name, share in (("all-gather", AllGatherShareMuon), ("broadcasts", BroadcastShareMuon)):
            found[f"{dtype} shared {name}"] = share(params, ns_dtype=ns_dtype, share_across_ranks=True, **RECIPE)
    return found


def muon_weights_with_grads(preset_name: str, device: torch.device) -> list[torch.nn.Parameter]:
    """The Muon weights of the preset's model, with random gradients (the same for a seed)."""
    model_fields = dict(PRESETS[preset_name]["model"])
    model_fields.pop("lpips_random_backbone", None)
    model_fields["perceptual_weight"] = 0.0  # only the Muon weights matter here
    torch.manual_seed(0)
    model = UNITE(model_config(model_fields.pop("encoder"), model_fields.pop("decoder"), **model_fields))
    params = [p for _, p in split_parameters(model.to(device))[0]]
    torch.manual_seed(0)
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def timed_step(optimizer: torch.optim.Optimizer, device: torch.device) -> tuple[float, float]:
    """(wall, CPU) seconds of one optimizer step, the device synchronised on both sides."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, time.process_time() - cpu_start


def run_rank(rank: int, args: argparse.Namespace, port: int) -> None:
    """One rank of the `--nproc` run: times every shared-out variant; rank 0 prints."""
    torch.set_num_threads(args.threads or 1)
    device = torch.device(args.device or PRESETS[args.preset]["device"])
    if device.type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.nproc)
    try:
        params = muon_weights_with_grads(args.preset, device)
        optimizers = shared_variants(params)
        times = {name: [] for name in optimizers}
        cpu_times = {name: [] for name in optimizers}
        names = list(optimizers)
        for index in range(args.steps + 1):  # the first round warms up
            for name in names[index % len(names):] + names[:index % len(names)]:
                dist.barrier()
                wall, cpu = timed_step(optimizers[name], device)
                if index:
                    times[name].append(wall)
                    cpu_times[name].append(cpu)
        slowest = torch.tensor([times[name] for name in names], dtype=torch.float64, device=device)
        cpu_sum = torch.tensor([cpu_times[name] for name in names], dtype=torch.float64, device=device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        dist.all_reduce(cpu_sum)
        if rank == 0:
            medians = {name: statistics.median(slowest[i].tolist()) for i, name in enumerate(names)}
            for i, name in enumerate(names):
                unshared = medians[name.split()[0]]
                print(json.dumps({"preset": args.preset, "device": str(device), "nproc": args.nproc,
                                  "threads_per_rank": torch.get_num_threads(), "variant": name,
                                  "matrices": len(params), "median_ms": round(1e3 * medians[name], 2),
                                  "median_cpu_ms_per_rank": round(1e3 * statistics.median(
                                      (cpu_sum[i] / args.nproc).tolist()), 2),
                                  "vs_unshared": round(medians[name] / unshared, 3)}), flush=True)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    parser.add_argument("--device", help="cpu or cuda (default: the preset's)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads on CPU (default: torch's; 1 per rank "
                                                     "with --nproc)")
    parser.add_argument("--steps", type=int, default=9, help="timed steps per variant, interleaved")
    parser.add_argument("--nproc", type=int, default=1, help="processes in one group: times the share-out")
    args = parser.parse_args(argv)
    if args.nproc > 1:
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads or 1))
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        mp.spawn(run_rank, args=(args, port), nprocs=args.nproc)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or PRESETS[args.preset]["device"])
    params = muon_weights_with_grads(args.preset, device)
    optimizers = variants(params)
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    cpu_times: dict[str, list[float]] = {name: [] for name in optimizers}
    for index in range(args.steps + 1):  # the first round warms up
        for name, optimizer in optimizers.items():
            wall, cpu = timed_step(optimizer, device)
            if index:
                times[name].append(wall)
                cpu_times[name].append(cpu)
    # On CPU the ratio is of CPU time (this process, all threads), which a shared machine
    # disturbs far less than wall time; on CUDA it is of wall time.
    ratio_of = cpu_times if device.type == "cpu" else times
    reference = statistics.median(ratio_of["torch.optim.Muon"])
    for name, values in times.items():
        print(json.dumps({"preset": args.preset, "device": str(device), "threads": torch.get_num_threads(),
                          "variant": name, "matrices": len(params),
                          "median_ms": round(1e3 * statistics.median(values), 2),
                          "median_cpu_ms": round(1e3 * statistics.median(cpu_times[name]), 2),
                          "vs_torch": round(statistics.median(ratio_of[name]) / reference, 3)}))


if __name__ == "__main__":
    main()
