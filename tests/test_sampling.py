"""Guided sampling: the time grid, CFG orders and interval, solvers and their NFE."""

from __future__ import annotations

import pytest
import torch

from conftest import perturb_, small_config
from unite.model import UNITE
from unite.sampling import Guidance, guided_prediction, sample, sample_latents, time_grid


@pytest.fixture(scope="module")
def model() -> UNITE:
    torch.manual_seed(0)
    model = UNITE(small_config()).eval()
    perturb_(model)
    with torch.no_grad():  # a non-trivial latent LayerNorm, so norm orders differ
        model.latent_norm.weight.add_(0.5)
        model.latent_norm.bias.add_(0.3)
    return model


def test_time_grid_is_the_shifted_linspace():
    grid = time_grid(5, 0.5)
    s = torch.linspace(0, 1, 5)
    assert torch.allclose(grid, 0.5 * s / (1 - 0.5 * s))
    assert grid[0] == 0 and grid[-1] == 1 and (grid.diff() > 0).all()


@torch.no_grad()
def test_guidance_orders_match_their_definitions(model):
    x, labels = torch.randn(2, 64, 8), torch.tensor([3, 7])
    t = torch.tensor([0.3, 0.6])
    null = torch.full_like(labels, model.null_label)
    cond = model.predict(x, t, labels, normalize=False)
    uncond = model.predict(x, t, null, normalize=False)
    ln, w = model.latent_norm, 2.5
    # As the reference computes them: no LayerNorm after combining (see the Guidance docstring).
    expected = {
        "norm_first": ln(uncond) + w * (ln(cond) - ln(uncond)),
        "cfg_first": uncond + w * (cond - uncond),
        "both": ln(uncond) + w * (ln(cond) - ln(uncond)),
    }
    for order, value in expected.items():
        got = guided_prediction(model, x, t, labels, Guidance(scale=w, norm_order=order))
        assert torch.allclose(got, value, atol=1e-5), order


@torch.no_grad()
def test_guidance_applies_only_inside_the_interval(model):
    x, labels = torch.randn(3, 64, 8), torch.tensor([1, 2, 3])
    t = torch.tensor([0.05, 0.5, 0.95])
    guidance = Guidance(scale=3.0, interval=(0.1, 0.9))
    got = guided_prediction(model, x, t, labels, guidance)
    cond = model.predict(x, t, labels)
    uncond = model.predict(x, t, torch.full_like(labels, model.null_label))
    assert torch.allclose(got[0], cond[0], atol=1e-5)  # below the interval: scale 1
    assert torch.allclose(got[1], uncond[1] + 3.0 * (cond[1] - uncond[1]), atol=1e-5)
    assert torch.allclose(got[2], cond[2], atol=1e-5)  # above: scale 1
    # low = 0 means no lower bound at all.
    open_low = guided_prediction(model, x, t, labels, Guidance(scale=3.0, interval=(0.0, 0.9)))
    assert torch.allclose(open_low[0], uncond[0] + 3.0 * (cond[0] - uncond[0]), atol=1e-5)


@torch.no_grad()
def test_unguided_norm_first_skips_the_latent_norm(model):
    # Quirk of the reference: scale <= 1 with norm_first uses the raw prediction.
    x, t, labels = torch.randn(2, 64, 8), torch.tensor([0.3, 0.6]), torch.tensor([0, 1])
    raw = model.predict(x, t, labels, normalize=False)
    assert torch.equal(guided_prediction(model, x, t, labels, Guidance(scale=1.0)), raw)
    cfg_first = guided_prediction(model, x, t, labels, Guidance(scale=1.0, norm_order="cfg_first"))
    assert torch.allclose(cfg_first, model.latent_norm(raw))


@pytest.mark.parametrize("solver, steps, nfe", [("euler", 7, 7), ("heun", 5, 10)])
def test_fixed_step_solvers_count_their_evaluations(model, solver, steps, nfe):
    noise, labels = torch.randn(2, 64, 8), torch.tensor([4, 5])
    result = sample(model, noise, labels, Guidance(scale=2.0), solver=solver, steps=steps)
    assert result.nfe == nfe
    assert result.images.shape == (2, 3, 32, 32)
    assert result.images.min() >= 0 and result.images.max() <= 1


@torch.no_grad()
def test_euler_follows_the_shifted_grid(model):
    # A hand-written Euler loop over the same grid: an independent implementation.
    noise, labels, guidance = torch.randn(2, 64, 8), torch.tensor([4, 5]), Guidance(scale=2.0)
    grid = time_grid(5, model.cfg.timestep_shift)
    x = noise
    for t0, t1 in zip(grid[:-1], grid[1:]):
        tb = t0.expand(2)
        x = x + (t1 - t0) * model.velocity(guided_prediction(model, x, tb, labels, guidance), x, tb)
    latents, _ = sample_latents(model, noise, labels, guidance, solver="euler", steps=4)
    assert torch.allclose(latents, x, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, text",
    [
        (dict(solver="rk45"), "solver='rk45'"),
        (dict(solver="euler", steps=0), "steps=0"),
    ],
)
def test_bad_sampler_arguments(model, kwargs, text):
    with pytest.raises(ValueError) as error:
        sample_latents(model, torch.randn(2, 64, 8), torch.tensor([0, 1]), **kwargs)
    assert text in str(error.value)


def test_bad_sampler_inputs(model):
    with pytest.raises(ValueError, match="noise: expected shape"):
        sample_latents(model, torch.randn(2, 32, 8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"labels: values must lie in \[0, 10\]"):
        sample_latents(model, torch.randn(2, 64, 8), torch.tensor([0, 11]))


@pytest.mark.parametrize(
    "kwargs, text",
    [
        (dict(norm_order="ln_last"), "norm_order='ln_last'"),
        (dict(interval=(0.5, 0.2)), "interval=(0.5, 0.2)"),
        (dict(scale=-1.0), "scale=-1.0"),
    ],
)
def test_bad_guidance(kwargs, text):
    with pytest.raises(ValueError) as error:
        Guidance(**kwargs)
    assert text in str(error.value)
