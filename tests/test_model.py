"""The model: parameter counts, geometry, fixed tables, losses and where their gradients go."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import perturb_, small_config
from unite.config import ConfigError, ModelConfig, model_config
from unite.model import UNITE, count_trainable, rope_tables, shift_time, sincos_2d_with_cls


def build_on_meta(encoder: str, decoder: str) -> UNITE:
    with torch.device("meta"):
        return UNITE(model_config(encoder, decoder, perceptual_weight=0.0))


@pytest.mark.parametrize(
    "encoder, decoder, total",
    [("B", "B", 217_643_616), ("M", "B", 318_821_456), ("L", "B", 545_528_384), ("XL", "B", 762_776_352)],
)
def test_trainable_parameter_counts_match_the_reference(encoder, decoder, total):
    model = build_on_meta(encoder, decoder)
    assert count_trainable(model) == total


def test_base_module_counts_match_the_reference():
    model = build_on_meta("B", "B")
    assert count_trainable(model.encoder) == 130_593_056
    assert count_trainable(model.decoder) == 86_263_296  # decoder side incl. the 32->768 projection


def test_shapes_for_a_non_default_geometry():
    torch.manual_seed(0)
    cfg = small_config()
    model = UNITE(cfg)
    images = torch.rand(3, 3, 32, 32)
    z = model.tokenize(images)
    assert z.shape == (3, 64, 8)
    assert model.decode(z).shape == (3, 3, 32, 32)
    x_hat = model.predict(torch.randn(3, 64, 8), torch.rand(3), torch.tensor([0, 9, 10]))
    assert x_hat.shape == (3, 64, 8)
    losses = model(images, torch.tensor([1, 2, 3]))
    assert set(losses) == {"loss", "recon", "l1", "lpips", "flow"}
    assert all(v.shape == () and torch.isfinite(v) for v in losses.values())


def test_tokenize_normalises_the_latent_per_token():
    torch.manual_seed(0)
    model = UNITE(small_config())
    perturb_(model.encoder)  # at init the zero final layer makes every output zero
    images, noise, t = torch.rand(2, 3, 32, 32), torch.randn(2, 64, 8), torch.rand(2) * 0.01
    raw = model.tokenize(images, noise=noise, t=t, normalize=False)
    expected = (raw - raw.mean(-1, keepdim=True)) / torch.sqrt(raw.var(-1, unbiased=False, keepdim=True) + 1e-5)
    assert torch.allclose(model.tokenize(images, noise=noise, t=t), expected, atol=1e-5)


def test_decoder_table_matches_the_reference(parity_fixture):
    recorded = parity_fixture["state_dict"]["decoder.decoder_pos_embed"][0]
    grid = parity_fixture["config"]["image_size"] // parity_fixture["config"]["patch_size"]
    assert torch.allclose(sincos_2d_with_cls(grid, recorded.shape[1]), recorded, atol=1e-6)


def test_rope_tables_match_the_reference(parity_fixture):
    state = parity_fixture["state_dict"]
    recorded_cos, recorded_sin = state["encoder.feat_rope.freqs_cos"], state["encoder.feat_rope.freqs_sin"]
    cos, sin = rope_tables(recorded_cos.shape[0], recorded_cos.shape[1])
    assert torch.equal(cos, recorded_cos) and torch.equal(sin, recorded_sin)
    # In-context tokens are prepended with the identity rotation.
    cfg = ModelConfig(
        encoder_depth=6, encoder_hidden=64, encoder_heads=2, decoder_layers=2, decoder_hidden=64,
        decoder_heads=2, decoder_mlp=128, num_classes=10, perceptual_weight=0.0,
    )
    encoder = UNITE(cfg).encoder
    assert torch.allclose(encoder.rope_cos_ctx, state["encoder.feat_rope_incontext.freqs_cos"], atol=1e-5)
    assert torch.allclose(encoder.rope_sin_ctx, state["encoder.feat_rope_incontext.freqs_sin"], atol=1e-5)


def test_timestep_shift_closed_form():
    t = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(shift_time(t, 0.5), torch.tensor([0.0, 1 / 3, 1.0]))
    assert torch.allclose(shift_time(t, 1.0), t)


def test_init_zeroes_the_adaln_and_final_layers():
    model = UNITE(small_config())
    encoder = model.encoder
    for linear in [b.modulation for b in encoder.blocks] + [encoder.final_modulation, encoder.final_linear]:
        assert not linear.weight.any() and not linear.bias.any()
    # A zero final layer makes every prediction zero before the latent LayerNorm.
    out = model.predict(torch.randn(2, 64, 8), torch.rand(2), torch.tensor([0, 1]), normalize=False)
    assert not out.any()
    assert math.isclose(encoder.label_embed.weight.std().item(), 0.02, rel_tol=0.2)


# ---------------------------------------------------------------------- gradients
def grads_of(model: UNITE, part: str) -> dict[str, torch.Tensor | None]:
    torch.manual_seed(1)
    model.zero_grad(set_to_none=True)
    losses = model(torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    losses[part].backward()
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.fixture(scope="module")
def trained_model() -> UNITE:
    torch.manual_seed(0)
    model = UNITE(small_config(label_drop_prob=0.0))
    perturb_(model)
    return model


def nonzero(grad: torch.Tensor | None) -> bool:
    return grad is not None and bool(grad.abs().sum() > 0)


def test_flow_loss_does_not_reach_the_tokenization_pass(trained_model):
    grads = grads_of(trained_model, "flow")
    # The patch embedding and the decoder serve only tokenization and reconstruction.
    assert not nonzero(grads["patch_embed.weight"])
    assert not any(nonzero(g) for name, g in grads.items() if name.startswith("decoder."))
    # ... while the shared encoder learns from the denoising pass.
    assert nonzero(grads["encoder.blocks.0.attn.qkv.weight"])
    assert nonzero(grads["encoder.final_linear.weight"])


def test_attached_targets_would_leak_into_tokenization(trained_model):
    # Control for the test above: the same flow loss on attached targets reaches the patch embedding.
    torch.manual_seed(1)
    trained_model.zero_grad(set_to_none=True)
    z = trained_model.tokenize(torch.rand(4, 3, 32, 32))
    loss = trained_model.flow_matching_loss(z, torch.randn_like(z), torch.rand(4), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert nonzero(trained_model.patch_embed.weight.grad)


def test_reconstruction_loss_trains_encoder_and_decoder(trained_model):
    grads = grads_of(trained_model, "recon")
    assert nonzero(grads["patch_embed.weight"])
    assert nonzero(grads["encoder.blocks.0.mlp.w12.weight"])
    assert nonzero(grads["decoder.blocks.0.fc1.weight"])
    assert nonzero(grads["decoder.latent_proj.weight"])


def test_shared_encoder_gets_gradient_from_both_passes(trained_model):
    total = grads_of(trained_model, "loss")
    recon = grads_of(trained_model, "recon")
    flow = grads_of(trained_model, "flow")
    name = "encoder.blocks.2.attn.qkv.weight"
    assert nonzero(recon[name]) and nonzero(flow[name])
    assert torch.allclose(total[name], recon[name] + flow[name], atol=1e-6)
    # Class rows of the label table learn only through the denoising pass (tokenization uses null).
    label_rows = total["encoder.label_embed.weight"]
    assert nonzero(label_rows[:4]) and not nonzero(recon["encoder.label_embed.weight"][:4])


def test_loss_parts_add_up():
    torch.manual_seed(0)
    model = UNITE(small_config(perceptual_weight=0.5, lpips_random_backbone=True, gen_loss_weight=2.0))
    perturb_(model)
    losses = model(torch.rand(2, 3, 32, 32), torch.tensor([3, 4]))
    assert losses["lpips"] > 0
    assert torch.allclose(losses["recon"], losses["l1"] + 0.5 * losses["lpips"])
    assert torch.allclose(losses["loss"], losses["recon"] + 2.0 * losses["flow"])


@pytest.mark.parametrize("draws, mini_batch, chunks", [(3, 3, [3]), (5, 2, [2, 2, 1]), (4, 1, [1, 1, 1, 1])])
def test_flow_loss_is_the_sum_over_draws_in_chunks(monkeypatch, draws, mini_batch, chunks):
    model = UNITE(small_config(flow_steps_per_recon=draws, flow_mini_batch=mini_batch))
    seen = []

    def unit_loss(x1, x0, t, labels):
        seen.append(x1.shape[0])
        return torch.ones(())

    monkeypatch.setattr(model, "flow_matching_loss", unit_loss)
    losses = model(torch.rand(2, 3, 32, 32), torch.tensor([0, 1]))
    assert losses["flow"].item() == draws  # a sum over draws, not a mean
    assert seen == [2 * c for c in chunks]


def test_block_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = UNITE(small_config())
    perturb_(model)
    args = (torch.randn(2, 64, 8), torch.rand(2), torch.tensor([1, 2]), model.latent_pos)
    results = []
    for flag in (False, True):
        model.zero_grad(set_to_none=True)
        model.encoder.checkpoint_blocks = flag
        model.encoder(*args).square().sum().backward()
        results.append([p.grad.clone() for p in model.encoder.blocks.parameters()])
    model.encoder.checkpoint_blocks = False
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*results))


def test_lpips_dropout_follows_train_mode():
    # Quirk kept from the reference: model.train() reaches LPIPS, so its head dropout is active.
    model = UNITE(small_config(perceptual_weight=1.0, lpips_random_backbone=True))
    model.train()
    assert model.perceptual.training
    assert count_trainable(model.perceptual) == 0
    model.eval()
    assert not model.perceptual.training


# ---------------------------------------------------------------------- bad configuration
@pytest.mark.parametrize(
    "overrides, field, rule",
    [
        (dict(encoder_depth=4, in_context_start=4), "encoder_depth=4", "greater than in_context_start"),
        (dict(image_size=30), "image_size=30", "divisible by patch_size"),
        (dict(encoder_hidden=66, encoder_heads=4), "encoder_hidden=66", "divisible by encoder_heads"),
        (dict(decoder_hidden=66, decoder_heads=4), "decoder_hidden=66", "divisible by decoder_heads"),
        (dict(encoder_hidden=60, encoder_heads=4), "encoder_hidden/encoder_heads=15", "even"),
        (dict(num_latent_tokens=32), "num_latent_tokens=32", "number of image patches"),
        (dict(latent_dim=0), "latent_dim=0", "positive integer"),
        (dict(label_drop_prob=1.5), "label_drop_prob=1.5", "[0, 1]"),
    ],
)
def test_bad_configurations_fail_at_construction(overrides, field, rule):
    with pytest.raises(ConfigError) as error:
        small_config(**overrides)
    assert field in str(error.value) and rule in str(error.value)


@pytest.mark.parametrize("kwargs, text", [(dict(encoder="Huge"), "encoder='Huge'"), (dict(decoder="XXL"), "decoder='XXL'")])
def test_unknown_size_names(kwargs, text):
    with pytest.raises(ConfigError, match="unknown size name") as error:
        model_config(**kwargs)
    assert text in str(error.value)


def test_unknown_config_keys_are_named():
    with pytest.raises(ConfigError, match="encoder_dpeth"):
        ModelConfig.from_dict({"encoder_dpeth": 3})


def test_size_names_accept_long_forms():
    assert model_config("base", "small") == model_config("B", "S")


@pytest.fixture(scope="module")
def small_model() -> UNITE:
    return UNITE(small_config())


@pytest.mark.parametrize(
    "images, text",
    [
        (torch.rand(2, 3, 16, 16), "expected shape (B, 3, 32, 32)"),
        (torch.rand(2, 1, 32, 32), "expected shape (B, 3, 32, 32)"),
        (torch.rand(2, 3, 32, 32) * 2, "values must lie in [0, 1]"),
        (torch.rand(2, 3, 32, 32) - 0.5, "values must lie in [0, 1]"),
        (torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8), "float tensor"),
    ],
)
def test_bad_images_are_rejected(small_model, images, text):
    with pytest.raises(ValueError) as error:
        small_model(images, torch.tensor([0, 1]))
    assert text in str(error.value)


@pytest.mark.parametrize(
    "labels, text",
    [
        (torch.tensor([0, 10]), "[0, 9]"),  # the null label is not a training label
        (torch.tensor([-1, 3]), "min -1"),
        (torch.tensor([0.0, 1.0]), "integer"),
    ],
)
def test_bad_training_labels_are_rejected(small_model, labels, text):
    with pytest.raises(ValueError, match="labels") as error:
        small_model(torch.rand(2, 3, 32, 32), labels)
    assert text in str(error.value)


def test_input_checks_read_no_values_off_the_cpu(small_model):
    """On a device, reading values back would cost a host sync per micro-batch: the checks keep to
    shapes and dtypes there. Meta tensors hold no values, so any read of them fails."""
    small_model.check_images(torch.empty(2, 3, 32, 32, device="meta"))
    small_model.check_labels(torch.empty(2, dtype=torch.long, device="meta"), allow_null=False)
    with pytest.raises(ValueError, match=r"expected shape \(B, 3, 32, 32\)"):
        small_model.check_images(torch.empty(2, 3, 16, 16, device="meta"))
    with pytest.raises(ValueError, match="float tensor"):
        small_model.check_images(torch.empty(2, 3, 32, 32, dtype=torch.uint8, device="meta"))
    with pytest.raises(ValueError, match="1-D integer tensor"):
        small_model.check_labels(torch.empty(2, device="meta"), allow_null=True)


def test_rope_rotates_adjacent_channel_pairs():
    # The spec's definition written out: q' = q cos + rot(q) sin with rot(x0, x1) = (-x1, x0).
    from unite.model import apply_rope, rope_complex

    x = torch.randn(2, 3, 5, 8)
    cos, sin = rope_tables(5, 8)
    rotated = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)
    assert torch.allclose(apply_rope(x, rope_complex(cos, sin)), x * cos + rotated * sin, atol=1e-6)
