"""The three CFG norm orders against the reference's own code (tests/fixtures/unite_cfg_orders.pt,
recorded by tests/fixtures/record_cfg_orders.py on the parity fixture's model and inputs)."""

from __future__ import annotations

import pytest
import torch

from conftest import FIXTURES
from unite.model import UNITE
from unite.options import NORM_ORDERS
from unite.parity import FORWARD_TOLERANCE, SAMPLER_TOLERANCE, config_from_fixture
from unite.reference import load_reference_state_dict
from unite.sampling import Guidance, guided_prediction, sample_latents


@pytest.fixture(scope="module")
def recorded() -> dict:
    return torch.load(FIXTURES / "unite_cfg_orders.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def model(parity_fixture) -> UNITE:
    model = UNITE(config_from_fixture(parity_fixture["config"])).eval()
    load_reference_state_dict(model, parity_fixture["state_dict"])
    return model


def guidance(recorded: dict, order: str, scale: float | None = None) -> Guidance:
    return Guidance(scale=recorded["cfg_scale"] if scale is None else scale,
                    interval=tuple(recorded["cfg_interval"]), norm_order=order)


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape
    return (actual - expected).abs().max().item()


def test_fixture_inputs_are_the_parity_fixtures(recorded, parity_fixture):
    for key, value in recorded["inputs"].items():
        assert torch.equal(value, parity_fixture["inputs"][key]), key


@pytest.mark.parametrize("order", NORM_ORDERS)
@torch.no_grad()
def test_guided_prediction_and_drift_match_the_reference(model, recorded, order):
    x_t, t, labels = (recorded["inputs"][k] for k in ("x_t", "t", "labels"))
    x_hat = guided_prediction(model, x_t, t, labels, guidance(recorded, order))
    assert max_error(x_hat, recorded["guided"][order]) <= FORWARD_TOLERANCE
    drift = model.velocity(x_hat, x_t, t)
    assert max_error(drift, recorded["drift"][order]) <= FORWARD_TOLERANCE


@pytest.mark.parametrize("order", NORM_ORDERS)
@torch.no_grad()
def test_unguided_drift_matches_the_reference(model, recorded, order):
    x_t, t, labels = (recorded["inputs"][k] for k in ("x_t", "t", "labels"))
    x_hat = guided_prediction(model, x_t, t, labels, guidance(recorded, order, scale=1.0))
    assert max_error(model.velocity(x_hat, x_t, t), recorded["unguided_drift"][order]) <= FORWARD_TOLERANCE


@pytest.mark.parametrize("order", NORM_ORDERS)
@torch.no_grad()
def test_dopri5_samples_match_the_reference(model, recorded, order, one_thread):
    inputs = recorded["inputs"]
    latents, _ = sample_latents(model, inputs["gen_noise"], inputs["labels"], guidance(recorded, order))
    assert max_error(latents, recorded["samples_z"][order]) <= SAMPLER_TOLERANCE
