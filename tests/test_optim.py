"""unite.optim.Muon against torch.optim.Muon (bit for bit in bfloat16) and against the closed
form of its Newton-Schulz iteration (float32), and how the trainer picks that dtype."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import perturb_
from test_train import one_thread  # noqa: F401  (autouse fixture: one intra-op thread here too)
from test_train import TINY_MODEL, train_config
from unite.checkpoint import list_checkpoints
from unite.config import ConfigError, model_config
from unite.distributed import init_runtime
from unite.model import UNITE
from unite.optim import NS_COEFFICIENTS, NS_STEPS, build_optimizers, newton_schulz_dtype, split_parameters
from unite.train import train
from unite.train_config import build_schedule
from unite.train_step import Engine


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


def test_bfloat16_muon_matches_torch_bit_for_bit() -> None:
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
        muon.step()
        reference.step()
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
            assert torch.equal(p, q), f"step {step}: {name} differs from torch.optim.Muon"
    moved = [n for n, _ in split_parameters(ours)[0] if not torch.equal(start[n], dict(ours.named_parameters())[n])]
    assert len(moved) == len(split_parameters(ours)[0])


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
    engine = Engine(UNITE(cfg.model), cfg, init_runtime("cpu"), build_schedule(cfg.schedule, 4, 1))
    assert engine.muon.ns_dtype == expected


def test_unknown_muon_dtype_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"muon_dtype='float16': must be one of auto, bfloat16, float32"):
        train_config(tmp_path, muon_dtype="float16")


def test_a_run_resumes_with_another_muon_dtype(tmp_path: Path) -> None:
    """The dtype fits the machine, so a run moved from a GPU to a CPU (or a checkpoint written
    before the key existed) resumes; its other settings must still match."""
    train(train_config(tmp_path, max_steps=1, muon_dtype="bfloat16"))
    assert [path.name for path in list_checkpoints(tmp_path / "checkpoints")] == ["step_00000001.pt"]
    assert train(train_config(tmp_path, max_steps=2, muon_dtype="float32")).step == 2
    with pytest.raises(ConfigError, match="base_lr"):
        train(train_config(tmp_path, max_steps=3, base_lr=0.5))
