"""The UNITE optimisation recipe: Muon + AdamW parameter split, learning-rate schedule, EMA."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from unite.options import check_choice

# The learning rate is given for this global batch and scaled linearly with the actual one.
REFERENCE_BATCH = 384

# 2-D (or larger) weights that the recipe keeps on AdamW instead of Muon: the patch embedding,
# the encoder's final layer, the in-context table and the latent position table.
ADAMW_NAMES = ("patch_embed.weight", "encoder.in_context_pos", "latent_pos")
ADAMW_PREFIXES = ("encoder.final_norm.", "encoder.final_modulation.", "encoder.final_linear.")

# The frozen LPIPS network lives in the model but is neither trained nor averaged nor saved.
FROZEN_PREFIX = "perceptual."


def trained_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Every trainable parameter with its name (LPIPS excluded)."""
    return [
        (name, p)
        for name, p in model.named_parameters()
        if p.requires_grad and not name.startswith(FROZEN_PREFIX)
    ]


def split_parameters(
    model: nn.Module,
) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(Muon, AdamW) named parameters: Muon takes the >= 2-D weights the recipe names, AdamW
    the rest. torch's Muon only accepts 2-D weights, so any other >= 2-D weight is an error."""
    muon, adamw = [], []
    for name, p in trained_parameters(model):
        if p.ndim < 2 or name in ADAMW_NAMES or name.startswith(ADAMW_PREFIXES):
            adamw.append((name, p))
        elif p.ndim == 2:
            muon.append((name, p))
        else:
            raise ValueError(
                f"parameter {name} has shape {tuple(p.shape)}: Muon takes 2-D weights only; "
                "add it to unite.optim.ADAMW_NAMES or give it a 2-D shape"
            )
    return muon, adamw


# Muon's Newton-Schulz iteration: the quintic coefficients and step count of torch.optim.Muon.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
MUON_DTYPES = ("auto", *NS_DTYPES)  # the choices of train.muon_dtype

# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) below which bf16 matrix products are emulated.
_ONEDNN_ISAS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI"}


def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bfloat16 matrices in hardware (AVX512-BF16 or AMX-BF16).

    torch runs CPU bf16 matmuls through oneDNN, which emulates them elsewhere: on an AVX2-only
    CPU a bf16 product of Muon-sized matrices takes about 20x as long as the float32 one, on
    AVX-512 without BF16 about 1.3x; with the instructions it takes about 0.4x.
    `torch.backends.cpu.get_cpu_capability()` names only the vector ISA of torch's own kernels
    ("AVX512" also on CPUs without BF16), so the CPU's flags are read through torch's cpuinfo
    instead, which works on every OS. A cap on oneDNN's ISA (ONEDNN_MAX_CPU_ISA, e.g. AVX2)
    disables the instructions and counts as their absence.
    """
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")).upper()
    if cap in _ONEDNN_ISAS_WITHOUT_BF16:
        return False
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def newton_schulz_dtype(choice: str, device: torch.device) -> torch.dtype:
    """The dtype of Muon's Newton-Schulz iteration: `auto` takes bfloat16 (torch's Muon) where
    the device multiplies it natively (CUDA, CPUs with AVX512-BF16/AMX) and float32 elsewhere;
    `bfloat16` or `float32` force it."""
    if choice == "auto":
        native = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
        return torch.bfloat16 if native else torch.float32
    check_choice("muon_dtype", choice, MUON_DTYPES)
    return NS_DTYPES[choice]


def orthogonalise(update: Tensor, dtype: torch.dtype, eps: float) -> Tensor:
    """Newton-Schulz orthogonalisation of a matrix in `dtype`: torch.optim.Muon's iteration,
    operation for operation, so that in bfloat16 the result is torch's bit for bit."""
    a, b, c = NS_COEFFICIENTS
    x = update.to(dtype)
    tall = update.size(0) > update.size(1)
    if tall:
        x = x.T
    x = x.div(x.norm().clamp(min=eps))  # spectral norm at most 1
    for _ in range(NS_STEPS):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def flatten_orthogonalised(result: Tensor) -> Tensor:
    """`orthogonalise`'s result as a flat view: it is contiguous, or (tall matrices) the
    transpose of a contiguous matrix."""
    return (result.T if result.size(0) > result.size(1) else result).reshape(-1)


def unflatten_orthogonalised(flat: Tensor, shape: torch.Size) -> Tensor:
    """The inverse of `flatten_orthogonalised`, in `orthogonalise`'s memory layout (transposed
    for tall matrices), so that applying it runs the same kernels as applying the original."""
    rows, cols = shape
    return flat.view(cols, rows).T if rows > cols else flat.view(rows, cols)


def newton_schulz_cost(shape: torch.Size) -> int:
    """Multiply-adds of `orthogonalise` on a (rows, cols) matrix, up to a constant: per step
    the Gram matrix and the product with X take m^2 n each, the Gram's square m^3 (m <= n)."""
    m, n = sorted(shape[:2])
    return 2 * m * m * n + m**3


def assign_owners(shapes: list[torch.Size], world_size: int) -> list[int]:
    """The rank that orthogonalises each matrix: greedy, costliest first (ties by position),
    each to the least loaded rank (ties to the lowest); the same on every rank."""
    loads = [0] * world_size
    owners = [0] * len(shapes)
    for index in sorted(range(len(shapes)), key=lambda i: (-newton_schulz_cost(shapes[i]), i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[index] = rank
        loads[rank] += newton_schulz_cost(shapes[index])
    return owners


class Muon(torch.optim.Muon):
    """torch.optim.Muon (same hyperparameters, state and checkpoints) whose Newton-Schulz
    iteration runs in `ns_dtype`: bfloat16 reproduces torch's update bit for bit, float32 is
    what a CPU without native bf16 runs fast (see `cpu_has_native_bf16`).

    With `share_across_ranks` and a process group of several ranks, each rank orthogonalises
    only the matrices `assign_owners` gives it and receives the others' results
    (`_gather_results`). It is meant for DDP, where the gradients, momentum buffers and hence
    the updates are the same on every rank, so the parameters stay bit for bit those of the
    unshared step; every rank must step with the same parameters holding gradients."""

    def __init__(self, params: Any, *, ns_dtype: torch.dtype, share_across_ranks: bool = False, **kwargs: Any):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype
        self.share_across_ranks = share_across_ranks

    @torch.no_grad()
    def step(self, closure: Any = None, *, found_inf: Tensor | None = None) -> Any:
        """torch's Muon step; with `found_inf` (a 0-dim device tensor, 1 where the gradients are
        not finite, as GradScaler passes to fused AdamW) it is decided on the device whether to
        update: where it is 1, parameters and momentum buffers keep their bits, so the host need
        not read the flag before stepping."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        keep = None if found_inf is None else found_inf == 0
        sharing = self.share_across_ranks and dist.is_available() and dist.is_initialized()
        sharing = sharing and dist.get_world_size() > 1
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            buffers: list[Tensor] = []
            self._init_group(group, params, grads, buffers)
            if sharing:
                self._shared_group_step(group, params, grads, buffers, keep)
                continue
            for param, grad, buffer in zip(params, grads, buffers):
                grad = self._advance_momentum(group, grad, buffer, keep)
                update = orthogonalise(self._momentum_update(group, grad, buffer), self.ns_dtype, group["eps"])
                self._apply(group, param, update, keep)
        return loss

    @staticmethod
    def _advance_momentum(group: dict[str, Any], grad: Tensor, buffer: Tensor, keep: Tensor | None) -> Tensor:
        """Advances the buffer and returns the gradient the update uses. Where `keep` is False the
        gradient is replaced by the buffer itself: lerp(b, b, w) is b exactly, and the update
        computed from it is finite (it is then dropped by `_apply`)."""
        if keep is not None:
            grad = torch.where(keep, grad, buffer)
        buffer.lerp_(grad, 1 - group["momentum"])
        return grad

    @staticmethod
    def _momentum_update(group: dict[str, Any], grad: Tensor, buffer: Tensor) -> Tensor:
        """The matrix to orthogonalise, from the advanced momentum buffer."""
        return grad.lerp(buffer, group["momentum"]) if group["nesterov"] else buffer

    @staticmethod
    def _apply(group: dict[str, Any], param: Tensor, update: Tensor, keep: Tensor | None) -> None:
        """torch's update; where `keep` is False the decay factor is 1 and the update 0, so the
        parameter keeps its bits (torch.where selects, so a kept update is torch's exactly)."""
        lr = group["lr"]
        decay = 1 - lr * group["weight_decay"]
        if keep is not None:
            update = torch.where(keep, update, 0)
            if decay != 1:
                decay = torch.where(keep, decay, 1.0)
        param.mul_(decay)
        param.add_(update, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], param.shape))

    def _shared_group_step(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], buffers: list[Tensor],
        keep: Tensor | None,
    ) -> None:
        """Every rank advances every momentum buffer; rank r orthogonalises its own matrices into
        its slot of a flat buffer (slots padded to the largest), and `_gather_results` hands
        every rank all the slots."""
        if not params:
            return
        rank, world_size = dist.get_rank(), dist.get_world_size()
        owners = assign_owners([p.shape for p in params], world_size)
        offsets, sizes = [], [0] * world_size
        for param, owner in zip(params, owners):
            offsets.append(sizes[owner])
            sizes[owner] += param.numel()
        slot = max(sizes)
        mine = torch.empty(slot, dtype=self.ns_dtype, device=params[0].device)
        mine[sizes[rank]:].zero_()
        for param, grad, buffer, owner, offset in zip(params, grads, buffers, owners, offsets):
            grad = self._advance_momentum(group, grad, buffer, keep)
            if owner == rank:
                result = orthogonalise(self._momentum_update(group, grad, buffer), self.ns_dtype, group["eps"])
                mine[offset:offset + param.numel()].copy_(flatten_orthogonalised(result))
        gathered = self._gather_results(mine)
        for param, owner, offset in zip(params, owners, offsets):
            start = owner * slot + offset
            self._apply(group, param, unflatten_orthogonalised(gathered[start:start + param.numel()], param.shape),
                        keep)

    @staticmethod
    def _gather_results(mine: Tensor) -> Tensor:
        """Every rank's slot, in rank order, in one flat buffer: by one broadcast per rank on
        gloo (5 to 10% less CPU time there than the all-gather on the reference-cpu preset's
        matrices, benchmarks.bench_muon --nproc 2), by one all-gather on other backends (one
        collective instead of one per rank)."""
        if dist.get_backend() == "gloo":
            return gather_by_broadcasts(mine)
        return gather_by_all_gather(mine)


def gather_by_all_gather(mine: Tensor) -> Tensor:
    """Every rank's equal-sized `mine`, in rank order, in one flat buffer: one all-gather."""
    world_size = dist.get_world_size()
    gathered = mine.new_empty(world_size * mine.numel())
    dist.all_gather(list(gathered.view(world_size, -1).unbind()), mine)
    return gathered


def gather_by_broadcasts(mine: Tensor) -> Tensor:
    """As `gather_by_all_gather`, by one broadcast from each rank, all in flight at once."""
    world_size = dist.get_world_size()
    slots = mine.new_empty(world_size * mine.numel()).view(world_size, -1)
    slots[dist.get_rank()].copy_(mine)
    for work in [dist.broadcast(slots[rank], src=rank, async_op=True) for rank in range(world_size)]:
        work.wait()
    return slots.view(-1)


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's per-matrix learning rate for a (fan_out, fan_in) weight."""
    fan_out, fan_in = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, fan_out / fan_in))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(fan_out, fan_in))
    return lr * math.sqrt(fan_out / fan_in)  # spectral_unclamped


def build_optimizers(
    model: nn.Module, lr: float, ns_dtype: torch.dtype = torch.bfloat16, share_across_ranks: bool = True
) -> tuple[Muon, torch.optim.AdamW]:
    """Muon (momentum 0.95, Nesterov, RMS matched to AdamW, Newton-Schulz in `ns_dtype`) and
    fused AdamW (0.9/0.999), both with eps 1e-6 and no weight decay, as in the reference recipe.

    Muon shares the iteration out across the ranks of a process group unless told not to: the
    parameters are bit for bit the same, and on 2 gloo ranks its step took about 0.6x the time."""
    muon_params, adamw_params = split_parameters(model)
    muon = Muon(
        [p for _, p in muon_params],
        ns_dtype=ns_dtype,
        share_across_ranks=share_across_ranks,
        lr=lr,
        weight_decay=0.0,
        momentum=0.95,
        nesterov=True,
        eps=1e-6,
        adjust_lr_fn="match_rms_adamw",
    )
    adamw = torch.optim.AdamW(
        [p for _, p in adamw_params],
        lr=lr,
        betas=(0.9, 0.999),
        eps=1e-6,
        weight_decay=0.0,
        fused=True,
    )
    return muon, adamw


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """Linear LR scaling: base_lr is the rate for a global batch of REFERENCE_BATCH images."""
    return base_lr * global_batch / REFERENCE_BATCH


@dataclass(frozen=True)
class LRSchedule:
    """LR factor as a function of the optimizer step s (0-based count of steps already taken):
    linear warmup s / warmup_steps, flat 1 until hold_until_step, cosine down to
    final_lr_factor at decay_until_step, flat after. The step-s update uses factor(s), so the
    very first update has factor 0 when warmup_steps > 0 (as torch's LambdaLR does)."""

    warmup_steps: int
    hold_until_step: int
    decay_until_step: int
    final_lr_factor: float

    def __post_init__(self) -> None:
        if not 0 <= self.warmup_steps <= self.hold_until_step <= self.decay_until_step:
            raise ValueError(
                f"schedule: need 0 <= warmup_steps ({self.warmup_steps}) <= hold_until_step "
                f"({self.hold_until_step}) <= decay_until_step ({self.decay_until_step})"
            )
        if not 0.0 <= self.final_lr_factor <= 1.0:
            raise ValueError(f"schedule.final_lr_factor={self.final_lr_factor}: must lie in [0, 1]")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / self.warmup_steps
        if step < self.hold_until_step:
            return 1.0
        if step < self.decay_until_step:
            progress = (step - self.hold_until_step) / (self.decay_until_step - self.hold_until_step)
            cosine = 0.5 * (1 + math.cos(math.pi * progress))
            return self.final_lr_factor + (1 - self.final_lr_factor) * cosine
        return self.final_lr_factor


def unite_b_schedule(images_per_epoch: int, global_batch: int, world_size: int) -> LRSchedule:
    """The reference's effective UNITE-B schedule in optimizer steps, the same on any world size.

    The reference states its schedule in epochs (warmup 20, flat to 30, cosine to 0.5 at 50;
    a second decay stage at 3000 epochs is never reached and is left out) but converts epochs to
    steps with the length of one rank's DataLoader, i.e. *micro-batches* per epoch, while stepping
    the schedule once per optimizer step. It keeps 2 accumulation micro-batches and gives each of
    the world_size ranks global_batch / (2 x world_size) images a micro-batch; its
    DistributedSampler pads the data set to ceil(images / world_size) samples per rank and the
    loader drops the last partial batch, so an epoch is
    floor(ceil(images / world_size) / (global_batch / (2 x world_size))) micro-batches, and the
    schedule runs 2x slower in real epochs. On ImageNet's 1,281,167 images at a global batch of
    1024 that is 2,502 micro-batches on 1 to 64 GPUs: warmup over 50,040 optimizer steps
    (40 real epochs), hold until 75,060 (60), 0.5 lr at 125,100 (100). This preset applies the
    same conversion, whatever per-device batch and accumulation this run derives.
    """
    if global_batch % (2 * world_size):
        raise ValueError(
            f"global_batch={global_batch}: the unite_b schedule counts epochs in micro-batches of global_batch / "
            f"(2 x world_size={world_size}) images, as the reference splits it, so it must be a multiple of "
            f"{2 * world_size}"
        )
    reference_batch = global_batch // (2 * world_size)
    micro_batches = math.ceil(images_per_epoch / world_size) // reference_batch
    if micro_batches == 0:
        raise ValueError(
            f"schedule.images_per_epoch={images_per_epoch}: fewer than one micro-batch of {reference_batch} "
            f"per rank on {world_size} rank(s)"
        )
    return LRSchedule(20 * micro_batches, 30 * micro_batches, 50 * micro_batches, 0.5)


class EMA:
    """Exponential moving average of every trained parameter, in float32; the state dict it
    exports is the model's (buffers included, LPIPS excluded) with parameters replaced by
    their averages, so it loads straight into a UNITE for sampling."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay={decay}: must lie in [0, 1)")
        self.decay = decay
        self.names = [name for name, _ in trained_parameters(model)]
        self.state = {
            name: tensor.detach().float().clone() if tensor.is_floating_point() else tensor.detach().clone()
            for name, tensor in model.state_dict().items()
            if not name.startswith(FROZEN_PREFIX)
        }
        self._averages = [self.state[name] for name in self.names]

    @torch.no_grad()
    def update(self, model: nn.Module, keep: Tensor | None = None) -> None:
        """ema <- decay * ema + (1 - decay) * param, once per optimizer step. Where `keep` (a
        0-dim bool device tensor) is False the average is left as it is, decided on the device:
        it moves toward itself (lerp(a, a, w) is a exactly), and where True the same kernel runs
        on the parameters with the same scalar weight as without `keep`, so the bits match."""
        params = [p.detach().float() for _, p in trained_parameters(model)]
        if keep is not None:
            params = [torch.where(keep, p, average) for p, average in zip(params, self._averages)]
        torch._foreach_lerp_(self._averages, params, 1.0 - self.decay)

    def state_dict(self) -> dict[str, Tensor]:
        return self.state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state.keys() != self.state.keys():
            missing, extra = self.state.keys() - state.keys(), state.keys() - self.state.keys()
            raise ValueError(
                f"EMA state does not match the model: missing {sorted(missing)}, unexpected {sorted(extra)}"
            )
        for name, tensor in state.items():
            self.state[name].copy_(tensor)
