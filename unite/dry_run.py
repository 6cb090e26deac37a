"""The production run at true size, on a CPU, before any GPU is rented.

torch's fake tensors (`FakeTensorMode`) carry shapes, dtypes and devices but no memory and no
values, so a UNITE-L training step at 64 images per GPU runs here in seconds. The dry run does
two passes over the project's own code:

1. On fake CUDA tensors (torch accepts `device="cuda"` on a machine without a GPU): the trainer's
   optimizer step (its micro-batches' forward passes, clipping, Muon, AdamW, EMA) and the EMA
   export; one generation block with guidance through a fixed-step solver, as the sweep and
   evaluate stages generate it; Inception features of that block and LPIPS of a reconstruction
   at their input sizes. A tensor on the wrong device anywhere fails the pass and names the place.
   Autograd's backward on fake CUDA tensors needs a CUDA context, so in this pass each backward
   gives every leaf of the loss's graph a gradient of its shape instead (the backward of these
   ops reads nothing on the host); the backward itself runs in pass 2. CUDA events, which need
   the runtime, do nothing. The host's reads of device values in one optimizer step are counted here
   (`unite.host_syncs`); value checks that fake tensors cannot answer get a fixed answer.
2. On fake CPU tensors, for the numbers: two optimizer steps of the trainer with the backward,
   one micro-batch each, under bf16 autocast as on CUDA (CUDA's autocast is off without a GPU;
   CPU autocast stands in: matrix products, convolutions and attention in bf16, as CUDA's lists
   have them). The second step's peak of live tensor memory (counted per storage at the
   dispatcher, `LiveMemory`), with the gradients held as DDP's buckets and accumulation hold
   them, is the per-GPU training peak; FLOPs come from torch's FlopCounterMode. Attention runs torch's CPU
   flash kernel, which keeps what CUDA's flash attention keeps (output and log-sum-exp, no
   L x L matrix). The decoder runs eagerly (torch.compile, which cannot compile for a fake GPU,
   only lowers memory).

The peak counts tensors only: the CUDA context, NCCL's buffers and the caching allocator's
fragmentation are not in it, which is what the headroom (10% by default) is for.

KID and precision/recall need every generated image's features and the reference set's, which
the evaluating rank holds at the end of evaluate; their memory is a closed form of what
`unite.metrics.kid` and `unite.metrics.precision_recall` allocate (`evaluation_feature_memory`),
added to the generation pass's resident networks for the scoring peak.
"""

from __future__ import annotations

import dataclasses
import math
import traceback
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import Tensor, nn
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_backward_flop, sdpa_flop

from unite.checkpoint import exported_tensors
from unite.distributed import Runtime
from unite.generate import generate
from unite.host_syncs import HostSyncCounter
from unite.metrics.features import POOL_DIM
from unite.metrics.kid import KID_SUBSET_SIZE
from unite.metrics.precision_recall import BLOCK_ROWS
from unite.model import UNITE
from unite.sampling import Guidance, sample_latents
from unite.train_config import Recipe, TrainConfig, recipe_for
from unite.train_step import Engine

GIB = 2**30
# Dense bf16 tensor-core peak of an H200 (and H100 SXM), TFLOP/s.
H200_PEAK_BF16_TFLOPS = 989.4
# The paper's speed for UNITE-B on 8 H200: about 26 minutes per ImageNet epoch.
PAPER_UNITE_B = {"gpus": 8, "epoch_minutes": 26.0, "images_per_epoch": 1_281_167}
PROJECT_ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("unite", "stages", "flows", "benchmarks", "tests")

aten = torch.ops.aten
# torch's FLOP counter knows CUDA's attention kernels; the CPU flash kernel does the same work.
register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)(
    lambda query, key, value, *args, out_shape=None, **kwargs: sdpa_flop(query, key, value)
)
register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)(
    lambda grad_out, query, key, value, *args, out_shape=None, **kwargs: sdpa_backward_flop(grad_out, query, key, value)
)


class DryRunFailed(RuntimeError):
    """A shape or device error in the dry run; the message names the place in the code."""


@dataclasses.dataclass(frozen=True)
class Generation:
    """What the sweep and evaluate stages generate and score, per GPU."""

    block_size: int  # images per generation block
    guidance: Guidance
    lpips: bool  # evaluate computes LPIPS of reconstructions
    inception: bool  # images are scored in Inception's feature space
    scored_images: int = 0  # generated images whose features KID and precision/recall keep (evaluate.num_images)
    reference_features: int = 0  # the reference set's kept features (fid_ref.set_images; 0: no KID, no P/R)
    kid_subset_size: int = KID_SUBSET_SIZE


def evaluation_feature_memory(generated: int, reference: int, kid_subset_size: int,
                              dim: int = POOL_DIM) -> dict[str, int]:
    """Bytes that KID and precision/recall take on the evaluating rank (none without reference
    features), from what their code allocates:
    host: both sets' features kept as float32 (`extract`, the reference npz), and KID's float64
      numpy copies of both;
    device: the float64 copies of both sets that KID and then precision/recall move to the scoring
      device, plus the larger working set: KID's two subsets and five subset_size^2 kernel
      matrices (three kept, two temporaries of the cube), or precision/recall's block of
      distances to the larger set and the float64 copy of that set, padded by two columns, that
      torch.cdist makes for its matrix product."""
    if not generated or not reference:
        return {"host": 0, "device": 0}
    rows, larger, subset = generated + reference, max(generated, reference), kid_subset_size
    kid = 2 * subset * dim * 8 + 5 * subset * subset * 8
    precision_recall = larger * (dim + 2) * 8 + BLOCK_ROWS * larger * 8
    return {"host": rows * dim * 4 + rows * dim * 8, "device": rows * dim * 8 + max(kid, precision_recall)}


class LiveMemory(TorchDispatchMode):
    """Bytes of live tensor storage per device, and their peak, counted at the dispatcher: each
    storage an op returns is added once and taken off when it is freed. Works on fake tensors.
    Tensors that exist before the mode is entered are counted once passed to `track`."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def track(self, *tensors: Any) -> None:
        for tensor in tree_flatten(tensors)[0]:
            if isinstance(tensor, Tensor):
                self._add(tensor)

    def reset_peak(self) -> None:
        self.peak = self.current

    def _add(self, tensor: Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.live:
            return
        self.live[key] = storage.nbytes()
        self.current += self.live[key]
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.track(out)
        return out


def dry_run(cfg: TrainConfig, world_size: int, generation: Generation, *, gpu_memory_gib: float = 141.0,
            headroom: float = 0.1, mfu: float = 0.4, peak_tflops: float = H200_PEAK_BF16_TFLOPS) -> dict[str, Any]:
    """Check and measure one training recipe at true size on `world_size` GPUs; a JSON-ready dict.

    Raises DryRunFailed when any tensor meets one on another device or a shape does not fit."""
    recipe = recipe_for(cfg, world_size)
    # A random VGG16 trunk for LPIPS: the same compute, and no weights file needed.
    model = dataclasses.replace(cfg.model, lpips_random_backbone=cfg.model.perceptual_weight > 0)
    cfg = dataclasses.replace(cfg, model=model, compile_decoder=False, progress=False)
    syncs = check_on_fake_cuda(cfg, recipe, generation)
    train = measure_training(cfg, recipe, world_size)
    gen = measure_generation(cfg, generation)
    # Inception's pool features (the presets' space); the demo's spaces have other widths
    scored = (generation.scored_images, generation.reference_features) if generation.inception else (0, 0)
    features = evaluation_feature_memory(*scored, generation.kid_subset_size)
    scoring_peak_gib = gen["resident_gib"] + features["device"] / GIB

    usable = gpu_memory_gib * (1 - headroom)
    per_image = (train["peak_gib"] - train["state_gib"]) / recipe.per_device_batch
    images_per_s = mfu * peak_tflops * 1e12 / train["flops_per_image"]
    epoch_images = PAPER_UNITE_B["images_per_epoch"]
    return {
        "world_size": world_size,
        "recipe": {
            "global_batch": recipe.global_batch, "per_device_batch": recipe.per_device_batch,
            "accumulation": recipe.accumulation, "peak_lr": recipe.peak_lr,
            "warmup_steps": recipe.schedule.warmup_steps, "hold_until_step": recipe.schedule.hold_until_step,
            "decay_until_step": recipe.schedule.decay_until_step, "max_steps": cfg.max_steps,
        },
        "memory": {
            "train_peak_gib": round(train["peak_gib"], 2),
            "train_state_gib": round(train["state_gib"], 2),
            "generation_peak_gib": round(gen["peak_gib"], 2),
            "evaluation_features": {
                "generated": scored[0],
                "reference": scored[1],
                "host_gib": round(features["host"] / GIB, 3),
                "device_gib": round(features["device"] / GIB, 3),
                "scoring_peak_gib": round(scoring_peak_gib, 2),
            },
            "gpu_memory_gib": gpu_memory_gib,
            "headroom": headroom,
            "max_per_device_batch": max(0, math.floor((usable - train["state_gib"]) / per_image)),
            "fits": max(train["peak_gib"], gen["peak_gib"], scoring_peak_gib) <= usable,
        },
        "flops": {
            "train_per_image": train["flops_per_image"],  # the optimizer's share of a step included
            "train_forward_backward_per_image": train["forward_backward_flops_per_image"],
            "generation_per_image_per_nfe": gen["flops_per_image_per_nfe"],
        },
        "host_syncs_per_step": syncs["syncs"],
        "host_values_per_step": syncs["values"],
        "host_syncs_by_op": syncs["where"],
        "throughput": {
            "assumed_mfu": mfu,
            "peak_bf16_tflops": peak_tflops,
            "step_s": round(recipe.per_device_batch * recipe.accumulation / images_per_s, 3),
            "images_per_s_per_gpu": round(images_per_s, 1),
            "epoch_minutes": round(epoch_images / (images_per_s * world_size) / 60, 1),
            "paper_unite_b_8_h200": {
                "epoch_minutes": PAPER_UNITE_B["epoch_minutes"],
                "images_per_s_per_gpu": round(epoch_images / (PAPER_UNITE_B["epoch_minutes"] * 60)
                                              / PAPER_UNITE_B["gpus"], 1),
            },
        },
    }


# ------------------------------------------------------------------------------ pass 1: devices
def check_on_fake_cuda(cfg: TrainConfig, recipe: Recipe, generation: Generation) -> dict[str, Any]:
    """Pass 1: the trainer's optimizer step, the EMA export, a generation block, Inception
    features and LPIPS on fake CUDA tensors. Returns the host reads of one optimizer step."""
    device = torch.device("cuda", 0)
    with fake_cuda(), failures_named("training step on fake CUDA tensors"):
        model, engine = build_engine(cfg, recipe, device)
        engine.bf16 = False  # CUDA's autocast cannot run without a GPU (pass 2 stands in for it)
        counter = HostSyncCounter(answer=0)  # losses 0, finite, no stop request
        with gradients_instead_of_backward(), counter:
            engine.step(uint8_batches(cfg, recipe.per_device_batch), lambda: False)
        model.load_state_dict(exported_tensors(engine.ema.state_dict()), strict=False)  # the export, loaded
    with fake_cuda(), failures_named("generation and scoring on fake CUDA tensors"):
        model = to_device(UNITE(cfg.model), device).eval()
        check_generation(model, generation, device)
    return {"syncs": counter.syncs, "values": counter.values, "where": dict(counter.where)}


def check_generation(model: UNITE, generation: Generation, device: torch.device) -> None:
    """One block as the stages generate it (noise made on the host, images back as uint8 on the
    host), its Inception features and the LPIPS of a reconstruction."""
    # torchdiffeq checks on the host that the time grid increases: the fixed answer is True.
    with torch.no_grad(), HostSyncCounter():
        (indices, labels, images), = generate(model, generation.block_size, generation.guidance,
                                             block_size=generation.block_size, solver="euler", steps=1,
                                             progress=False)
        if generation.inception:
            features = inception_features(device)
            features(images.permute(0, 3, 1, 2))
        if generation.lpips:
            from unite.metrics.reconstruction import lpips_distance
            from unite.perceptual import build_lpips

            lpips = to_device(build_lpips(random_backbone=True), device)
            x = images.permute(0, 3, 1, 2).to(device).float() / 255
            recon = model.decode(model.tokenize(x)).clamp(0, 1)
            lpips_distance(lpips, x, recon)


def inception_features(device: torch.device):
    """torch-fidelity's Inception network (random weights: same shapes and compute) on `device`,
    in `unite.metrics.features.InceptionFeatures`."""
    from unite.metrics.features import InceptionFeatures
    from unite.stand_in_weights import random_inception_network

    with unset_fake_temporarily():  # torch-fidelity's constructor moves its module; built for real
        network = random_inception_network(["2048", "logits_unbiased"])
    network = to_device(network, device)
    return InceptionFeatures.from_network(network.eval(), device)


# ------------------------------------------------------------------------------ pass 2: numbers
def measure_training(cfg: TrainConfig, recipe: Recipe, world_size: int) -> dict[str, float]:
    """Pass 2: FLOPs of a micro-batch and of the optimizer step, then the peak memory of a
    micro-batch, on fake CPU tensors under bf16 autocast when the config asks for it (as CUDA
    runs). Under DDP (several GPUs) the gradients live in its buckets all the time, and with
    accumulation every micro-batch after the first adds to the gradients of the ones before:
    then the measured micro-batch starts with every gradient held, as those do."""
    with FakeTensorMode(), failures_named("training step on fake CPU tensors"):
        model, engine = build_engine(cfg, recipe, torch.device("cpu"))
        engine.bf16 = cfg.bf16  # CPU autocast stands in for CUDA's (see the module docstring)
        engine.accum = 1
        batches = uint8_batches(cfg, recipe.per_device_batch)
        memory = LiveMemory()
        memory.track(list(model.parameters()), list(model.buffers()), list(engine.ema.state_dict().values()))
        with memory, HostSyncCounter(answer=0):
            with FlopCounterMode(display=False) as flops, optimizer_flops(flops) as in_optimizers:
                engine.step(batches, lambda: False)  # also creates the optimizer states
            state = memory.current
            if world_size > 1 or recipe.accumulation > 1:
                for param in engine.params:
                    param.grad = torch.zeros_like(param)
            memory.reset_peak()
            engine.step(batches, lambda: False)
        micro_batch = flops.get_total_flops() - in_optimizers[0]
        images_per_step = recipe.per_device_batch * recipe.accumulation
        return {"peak_gib": memory.peak / GIB, "state_gib": state / GIB,
                "forward_backward_flops_per_image": micro_batch / recipe.per_device_batch,
                "flops_per_image": micro_batch / recipe.per_device_batch + in_optimizers[0] / images_per_step}


@contextmanager
def optimizer_flops(counter: FlopCounterMode) -> Iterator[list[int]]:
    """The FLOPs `counter` counts inside optimizer steps (Muon's Newton-Schulz products), which
    are paid once per optimizer step, not per micro-batch."""
    total, started = [0], [0]

    def before(optimizer, args, kwargs) -> None:
        started[0] = counter.get_total_flops()

    def after(optimizer, args, kwargs) -> None:
        total[0] += counter.get_total_flops() - started[0]

    handles = [register_optimizer_step_pre_hook(before), register_optimizer_step_post_hook(after)]
    try:
        yield total
    finally:
        for handle in handles:
            handle.remove()


def measure_generation(cfg: TrainConfig, generation: Generation) -> dict[str, float]:
    """Peak memory of a generation block (fp32, as the stages sample) with Inception and LPIPS
    resident, and the FLOPs of one guided function evaluation per image."""
    with FakeTensorMode(), failures_named("generation on fake CPU tensors"):
        model = UNITE(dataclasses.replace(cfg.model, perceptual_weight=0.0)).eval()
        memory = LiveMemory()
        memory.track(list(model.parameters()), list(model.buffers()))
        with memory, torch.no_grad(), HostSyncCounter():
            if generation.inception:
                features = inception_features(torch.device("cpu"))
            if generation.lpips:
                from unite.perceptual import build_lpips

                build_lpips(random_backbone=True)
            resident = memory.current  # the networks evaluate keeps while it scores the features
            noise = torch.randn(generation.block_size, cfg.model.num_latent_tokens, cfg.model.latent_dim)
            labels = torch.arange(generation.block_size) % cfg.model.num_classes
            with FlopCounterMode(display=False) as flops:
                latents, nfe = sample_latents(model, noise, labels, generation.guidance, solver="euler", steps=1)
            images = model.decode(latents).clamp(0, 1)
            if generation.inception:
                features((images * 255).to(torch.uint8))
        return {"peak_gib": memory.peak / GIB, "resident_gib": resident / GIB,
                "flops_per_image_per_nfe": flops.get_total_flops() / (nfe * generation.block_size)}


# ------------------------------------------------------------------------------ shared pieces
def build_engine(cfg: TrainConfig, recipe: Recipe, device: torch.device) -> tuple[UNITE, Engine]:
    """The trainer's model and Engine on `device` (inside a FakeTensorMode), the model built and
    moved as the trainer does it; tensors the code makes later without `device=` stay on the CPU
    and meet the model's CUDA tensors."""
    return (model := to_device(UNITE(cfg.model), device)), Engine(model, cfg, Runtime(0, 1, device), recipe)


def to_device(module: nn.Module, device: torch.device) -> nn.Module:
    """`module.to(device)` inside the active FakeTensorMode, for modules whose `.to` cannot swap
    fake tensors in place: every parameter and buffer not on `device` (or not fake yet) is
    replaced by its fake copy on `device`."""
    mode = detect_fake_mode()

    def moved(tensor: Tensor) -> Tensor:
        if not isinstance(tensor, FakeTensor):
            tensor = mode.from_tensor(tensor)
        return tensor.to(device)

    for submodule in module.modules():
        for name, param in submodule._parameters.items():
            if param is not None and (param.device != device or not isinstance(param, FakeTensor)):
                submodule._parameters[name] = nn.Parameter(moved(param).detach(), param.requires_grad)
        for name, buffer in submodule._buffers.items():
            if buffer is not None and (buffer.device != device or not isinstance(buffer, FakeTensor)):
                submodule._buffers[name] = moved(buffer)
    return module


def uint8_batches(cfg: TrainConfig, batch: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless host batches as the loaders give them: uint8 images and int64 labels."""
    size = cfg.model.image_size
    while True:
        yield (torch.empty(batch, 3, size, size, dtype=torch.uint8),
               torch.zeros(batch, dtype=torch.long))


class _NoEvent:
    """torch.cuda.Event for fake CUDA tensors where no CUDA runtime may run: nothing to record, and
    nothing to wait for."""

    def record(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass


@contextmanager
def fake_cuda() -> Iterator[FakeTensorMode]:
    """Fake CUDA tensors, no GPU needed: FakeTensorMode (taking the meta-built modules' tensors of
    `build_on` as inputs) with CUDA events stubbed out."""
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, mock.patch("torch.cuda.Event", _NoEvent):
        yield mode


def _leaves(loss: torch.Tensor) -> list[torch.Tensor]:
    """The tensors whose gradient `loss.backward()` would accumulate: the AccumulateGrad nodes
    of its autograd graph."""
    leaves, seen, stack = [], set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            leaves.append(node.variable)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return leaves


@contextmanager
def gradients_instead_of_backward() -> Iterator[None]:
    """`Tensor.backward()` gives every leaf of the graph a zero gradient (accumulating, as autograd
    does) instead of running autograd: autograd on fake CUDA tensors needs a CUDA context, and the
    backward of these ops reads nothing on the host, so the count is the same."""

    def backward(self: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        for leaf in _leaves(self):
            if leaf.grad is None:
                leaf.grad = torch.zeros_like(leaf)
            else:
                leaf.grad.add_(torch.zeros_like(leaf))

    with mock.patch.object(torch.Tensor, "backward", backward):
        yield


def _is_project_code(path: Path) -> bool:
    """In this project's packages (a virtual environment may lie inside the checkout), and not
    the dry run's own machinery."""
    path = path.resolve()
    return (path.is_relative_to(PROJECT_ROOT) and path.relative_to(PROJECT_ROOT).parts[0] in PROJECT_PACKAGES
            and path.name not in ("dry_run.py", "host_syncs.py"))


@contextmanager
def failures_named(what: str) -> Iterator[None]:
    """Turns any error into DryRunFailed naming the innermost line of this project's code."""
    try:
        yield
    except DryRunFailed:
        raise
    except Exception as error:  # noqa: BLE001 - every failure of the dry run is reported the same way
        frames = [f for f in traceback.extract_tb(error.__traceback__) if _is_project_code(Path(f.filename))]
        place = f" at {Path(frames[-1].filename).relative_to(PROJECT_ROOT)}:{frames[-1].lineno} " \
                f"({frames[-1].name}: {frames[-1].line})" if frames else ""
        message = " ".join(str(error).split())
        raise DryRunFailed(f"{what}: {type(error).__name__}{place}: {message}") from error
