"""unite.optim.Muon against torch.optim.Muon (bit for bit in bfloat16) and against the closed
form of its Newton-Schulz iteration (float32), how the trainer picks that dtype, and the
share-out of the iteration across two gloo ranks (bit for bit the unshared step)."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import perturb_
from test_train import TINY_MODEL, train_config
from unite.checkpoint import list_checkpoints
from unite.config import ConfigError, model_config
from unite.distributed import init_runtime
from unite.model import UNITE
import unite.optim
from unite.optim import (
    NS_COEFFICIENTS,
    NS_STEPS,
    assign_owners,
    build_optimizers,
    gather_by_all_gather,
    newton_schulz_cost,
    newton_schulz_dtype,
    split_parameters,
)
from unite.train import train
from unite.train_config import recipe_for
from unite.train_step import Engine

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model_with_grads(seed: int) -> UNITE:
    """The tiny UNITE, perturbed so that every weight gets a gradient, with the gradients of one
    joint loss on random images."""
    torch.manual_seed(seed)
    model = UNITE(model_config(**TINY_MODEL))
    perturb_(model)
    images, labels = torch.rand(4, 3, 16, 16), torch.randint(0, 10, (4,))
    model(images, labels)["loss"].backward()
    return model


def newton_schulz_closed_form(grad: torch.Tensor) -> torch.Tensor:
    """The iteration acts on singular values alone: G = U S V^T becomes U p(p(...p(S/|G|_F))) V^T
    with p(s) = a s + b s^3 + c s^5, computed here in float64 from the SVD."""
    u, s, vh = torch.linalg.svd(grad.double(), full_matrices=False)
    a, b, c = NS_COEFFICIENTS
    s = s / s.norm()
    for _ in range(NS_STEPS):
        s = a * s + b * s**3 + c * s**5
    return u @ torch.diag(s) @ vh


@pytest.mark.parametrize("found_inf", [None, 0.0], ids=["no-flag", "finite-flag"])
def test_bfloat16_muon_matches_torch_bit_for_bit(found_inf: float | None) -> None:
    """Also with the device-side skip flag given as 0 (a finite step): torch's update exactly."""
    flag = None if found_inf is None else torch.tensor(found_inf)
    ours, theirs = tiny_model_with_grads(0), tiny_model_with_grads(0)
    muon, _ = build_optimizers(ours, lr=0.02, ns_dtype=torch.bfloat16)
    # The recipe's hyperparameters, written out independently of build_optimizers.
    reference = torch.optim.Muon([p for _, p in split_parameters(theirs)[0]], lr=0.02, weight_decay=0.0,
                                 momentum=0.95, nesterov=True, eps=1e-6, adjust_lr_fn="match_rms_adamw")
    shapes = {tuple(p.shape) for p in reference.param_groups[0]["params"]}
    assert any(r > c for r, c in shapes) and any(r < c for r, c in shapes)  # tall and wide matrices
    start = {name: p.detach().clone() for name, p in ours.named_parameters()}
    generator = torch.Generator().manual_seed(1)
    for step in range(4):
        if step:  # fresh gradients, the same for both
            for p, q in zip(ours.parameters(), theirs.parameters()):
                p.grad = torch.randn(p.shape, generator=generator)
                q.grad = p.grad.clone()
        muon.step(found_inf=flag)
        reference.step()
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
            assert torch.equal(p, q), f"step {step}: {name} differs from torch.optim.Muon"
    moved = [n for n, _ in split_parameters(ours)[0] if not torch.equal(start[n], dict(ours.named_parameters())[n])]
    assert len(moved) == len(split_parameters(ours)[0])


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_a_flagged_muon_step_keeps_parameters_and_momentum_bit_for_bit(weight_decay: float) -> None:
    """found_inf = 1 with NaN gradients: parameters and momentum buffers keep their bits, and the
    next finite step is the one an optimizer that never saw the flagged step takes."""
    model, twin = tiny_model_with_grads(0), tiny_model_with_grads(0)
    muon = build_optimizers(model, lr=0.02, ns_dtype=torch.float32)[0]
    plain = build_optimizers(twin, lr=0.02, ns_dtype=torch.float32)[0]
    for optimizer in (muon, plain):
        optimizer.param_groups[0]["weight_decay"] = weight_decay
        optimizer.step(found_inf=torch.tensor(0.0))
    params = [p for _, p in split_parameters(model)[0]]
    before = [p.detach().clone() for p in params]
    buffers = [muon.state[p]["momentum_buffer"].clone() for p in params]
    for p in params:
        p.grad = torch.full_like(p, float("nan"))
    muon.step(found_inf=torch.tensor(1.0))
    for p, kept, buffer in zip(params, before, buffers):
        assert torch.equal(p, kept) and torch.equal(muon.state[p]["momentum_buffer"], buffer)
    generator = torch.Generator().manual_seed(2)
    for p, q in zip(params, [q for _, q in split_parameters(twin)[0]]):
        p.grad = torch.randn(p.shape, generator=generator)
        q.grad = p.grad.clone()
    muon.step(found_inf=torch.tensor(0.0))
    plain.step()
    for p, q in zip(params, [q for _, q in split_parameters(twin)[0]]):
        assert torch.equal(p, q)


def test_float32_muon_step_follows_the_closed_form() -> None:
    model = tiny_model_with_grads(0)
    muon, _ = build_optimizers(model, lr=0.01, ns_dtype=torch.float32)
    before = {name: p.detach().double().clone() for name, p in split_parameters(model)[0]}
    grads = {name: p.grad.clone() for name, p in split_parameters(model)[0]}
    muon.step()
    for name, p in split_parameters(model)[0]:
        # First step: the Nesterov update is a multiple of the gradient, and the iteration
        # normalises scale away; the learning rate is matched to AdamW's RMS.
        lr = 0.01 * 0.2 * math.sqrt(max(p.shape))
        expected = before[name] - lr * newton_schulz_closed_form(grads[name])
        torch.testing.assert_close(p.detach().double(), expected, rtol=0, atol=lr * 2e-4, msg=name)


def test_bfloat16_is_farther_from_the_closed_form_than_float32() -> None:
    """Guards the test above: a bfloat16 iteration would not pass its tolerance."""
    errors = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_model_with_grads(0)
        name, weight = split_parameters(model)[0][0]
        grad, before = weight.grad.clone(), weight.detach().double().clone()
        build_optimizers(model, lr=0.01, ns_dtype=dtype)[0].step()
        lr = 0.01 * 0.2 * math.sqrt(max(weight.shape))
        errors[dtype] = ((before - weight.detach().double()) / lr - newton_schulz_closed_form(grad)).abs().max()
    assert errors[torch.float32] < 2e-4 < errors[torch.bfloat16]


@pytest.fixture
def cpu_flags(monkeypatch: pytest.MonkeyPatch):
    """Sets the CPU's bf16 flags as torch's cpuinfo reports them."""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)

    def set_flags(avx512_bf16: bool, amx: bool) -> None:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)

    return set_flags


@pytest.mark.parametrize(("avx512_bf16", "amx", "expected"), [
    (False, False, torch.float32), (True, False, torch.bfloat16), (False, True, torch.bfloat16),
])
def test_auto_dtype_follows_the_cpu_flags(cpu_flags, avx512_bf16: bool, amx: bool, expected) -> None:
    cpu_flags(avx512_bf16, amx)
    assert newton_schulz_dtype("auto", torch.device("cpu")) == expected


def test_auto_dtype_respects_a_onednn_isa_cap(cpu_flags, monkeypatch: pytest.MonkeyPatch) -> None:
    cpu_flags(True, True)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    assert newton_schulz_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert newton_schulz_dtype("auto", torch.device("cpu")) == torch.bfloat16


def test_auto_dtype_is_bfloat16_on_cuda_and_forcing_wins(cpu_flags) -> None:
    cpu_flags(False, False)
    assert newton_schulz_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert newton_schulz_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    cpu_flags(True, True)
    assert newton_schulz_dtype("float32", torch.device("cuda", 0)) == torch.float32


@pytest.mark.parametrize(("muon_dtype", "flags", "expected"), [
    ("auto", (False, False), torch.float32), ("auto", (True, False), torch.bfloat16),
    ("float32", (True, True), torch.float32), ("bfloat16", (False, False), torch.bfloat16),
])
def test_trainer_passes_the_dtype_to_muon(tmp_path: Path, cpu_flags, muon_dtype: str, flags, expected) -> None:
    cpu_flags(*flags)
    cfg = train_config(tmp_path, muon_dtype=muon_dtype, device="cpu")
    engine = Engine(UNITE(cfg.model), cfg, init_runtime("cpu"), recipe_for(cfg, 1))
    assert engine.muon.ns_dtype == expected
    assert engine.muon.share_across_ranks  # the trainer shares the iteration out under DDP


def test_unknown_muon_dtype_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"muon_dtype='float16': must be one of \['auto', 'bfloat16', 'float32'\]"):
        train_config(tmp_path, muon_dtype="float16")


def test_a_run_resumes_with_another_muon_dtype(tmp_path: Path) -> None:
    """The dtype fits the machine, so a run moved from a GPU to a CPU (or a checkpoint written
    before the key existed) resumes; its other settings must still match."""
    train(train_config(tmp_path, max_steps=1, muon_dtype="bfloat16"))
    assert [path.name for path in list_checkpoints(tmp_path / "checkpoints")] == ["step_00000001.pt"]
    assert train(train_config(tmp_path, max_steps=2, muon_dtype="float32")).step == 2
    with pytest.raises(ConfigError, match="base_lr"):
        train(train_config(tmp_path, max_steps=3, base_lr=0.5))


def test_owners_are_balanced_and_the_same_for_the_same_shapes() -> None:
    shapes = [torch.Size(s) for s in [(96, 32), (32, 512), (32, 32), (12, 32), (170, 32), (32, 512), (64, 64)]]
    costs = [newton_schulz_cost(s) for s in shapes]
    assert newton_schulz_cost(torch.Size((96, 32))) == newton_schulz_cost(torch.Size((32, 96)))
    for world_size in (1, 2, 3, 8):
        owners = assign_owners(shapes, world_size)
        assert owners == assign_owners(list(shapes), world_size)
        loads = [sum(c for c, o in zip(costs, owners) if o == rank) for rank in range(world_size)]
        assert set(owners) <= set(range(world_size))
        # Greedy, costliest first: no rank exceeds another by more than the largest matrix.
        assert max(loads) - min(loads) <= max(costs)
    # By hand, costs 2 m^2 n + m^3: the two 32x512 (1,081,344 each) to ranks 0 and 1, 64x64
    # (786,432) to rank 0, then rank 1 is the lighter one for the rest (170x32: 380,928, 96x32:
    # 229,376, 32x32: 98,304, 12x32: 10,944): 1,867,776 against 1,800,896.
    assert assign_owners(shapes, 2) == [1, 0, 1, 1, 1, 1, 0]


def test_share_out_without_a_process_group_is_the_plain_step() -> None:
    shared_model, plain_model = tiny_model_with_grads(0), tiny_model_with_grads(0)
    shared = build_optimizers(shared_model, lr=0.02, ns_dtype=torch.float32, share_across_ranks=True)[0]
    build_optimizers(plain_model, lr=0.02, ns_dtype=torch.float32, share_across_ranks=False)[0].step()
    shared.step()
    for (name, p), q in zip(shared_model.named_parameters(), plain_model.parameters()):
        assert torch.equal(p, q), name


def _share_out_rank(rank: int, port: int, folder: str) -> None:
    """Steps a shared-out Muon and a plain one on the same gradients (the same on both ranks,
    as DDP leaves them) and records whether the parameters and momenta agree bit for bit."""
    torch.set_num_threads(1)
    calls = []
    plain_orthogonalise = unite.optim.orthogonalise

    def counting_orthogonalise(*args, **kwargs):
        calls.append(args[0].shape)
        return plain_orthogonalise(*args, **kwargs)

    unite.optim.orthogonalise = counting_orthogonalise
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    report = {}
    try:
        for dtype, exchange in [(torch.float32, None), (torch.bfloat16, None), (torch.float32, gather_by_all_gather)]:
            shared_model, plain_model = tiny_model_with_grads(0), tiny_model_with_grads(0)
            shared = build_optimizers(shared_model, lr=0.02, ns_dtype=dtype)[0]  # shares by default
            if exchange is not None:  # the exchange used on NCCL, run here on gloo
                shared._gather_results = exchange
            plain = build_optimizers(plain_model, lr=0.02, ns_dtype=dtype, share_across_ranks=False)[0]
            generator = torch.Generator().manual_seed(1)
            differing, shared_calls = [], []
            for step in range(3):
                if step:
                    for p, q in zip(shared_model.parameters(), plain_model.parameters()):
                        p.grad = torch.randn(p.shape, generator=generator)
                        q.grad = p.grad.clone()
                calls.clear()
                shared.step()
                shared_calls.append(len(calls))
                plain.step()
                differing += [f"step {step}: {name}" for (name, p), q in
                              zip(shared_model.named_parameters(), plain_model.parameters()) if not torch.equal(p, q)]
            momenta_equal = all(torch.equal(shared.state[p]["momentum_buffer"], plain.state[q]["momentum_buffer"])
                                for p, q in zip(shared.param_groups[0]["params"], plain.param_groups[0]["params"]))
            flat = torch.cat([p.detach().flatten() for p in shared_model.parameters()])
            gathered = [torch.empty_like(flat) for _ in range(2)]
            dist.all_gather(gathered, flat)
            report[f"{dtype} {exchange and exchange.__name__}"] = {"differing": differing, "momenta_equal": momenta_equal,
                                  "same_on_both_ranks": torch.equal(*gathered), "shared_calls": shared_calls,
                                  "matrices": len(split_parameters(shared_model)[0])}
    finally:
        dist.destroy_process_group()
    (Path(folder) / f"rank{rank}.json").write_text(json.dumps(report))


def test_two_ranks_share_out_the_iteration_and_step_bit_for_bit_as_unshared(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_share_out_rank, args=(port, str(tmp_path)), nprocs=2)
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert reports[0].keys() == {"torch.float32 None", "torch.bfloat16 None", "torch.float32 gather_by_all_gather"}
    for dtype in reports[0]:
        for rank, report in enumerate(reports):
            result = report[dtype]
            assert result["differing"] == [], f"rank {rank}, {dtype}"
            assert result["momenta_equal"] and result["same_on_both_ranks"], f"rank {rank}, {dtype}"
        # Each rank orthogonalised only its share, and together every matrix once per step.
        counts = [report[dtype]["shared_calls"] for report in reports]
        matrices = reports[0][dtype]["matrices"]
        for step_counts in zip(*counts):
            assert sum(step_counts) == matrices and 0 < min(step_counts)
