"""Model configuration: named sizes, free sizes, and validation that fails at construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from unite.options import has_type

# (depth, hidden, heads) of the Generative Encoder.
ENCODER_SIZES: dict[str, tuple[int, int, int]] = {
    "Tiny": (6, 64, 2),
    "B": (12, 768, 12),
    "M": (12, 1024, 16),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}

# (layers, hidden, heads, mlp) of the pixel decoder.
DECODER_SIZES: dict[str, tuple[int, int, int, int]] = {
    "Tiny": (2, 64, 2, 128),
    "S": (12, 384, 6, 1536),
    "B": (12, 768, 12, 3072),
    "L": (24, 1024, 16, 4096),
}

_SIZE_ALIASES = {"base": "B", "medium": "M", "large": "L", "small": "S", "tiny": "Tiny", "xl": "XL"}


class ConfigError(ValueError):
    """An invalid configuration value; the message names the field, the value and the rule."""


@dataclass(frozen=True)
class ModelConfig:
    # Generative Encoder
    encoder_depth: int = 12
    encoder_hidden: int = 768
    encoder_heads: int = 12
    in_context_len: int = 32
    in_context_start: int = 4
    qk_norm: bool = True
    # Pixel decoder
    decoder_layers: int = 12
    decoder_hidden: int = 768
    decoder_heads: int = 12
    decoder_mlp: int = 3072
    decoder_proj_dim: int = 768  # width of the latent up-projection in front of the decoder
    # Geometry
    image_size: int = 256
    patch_size: int = 16
    num_latent_tokens: int = 256
    latent_dim: int = 32
    num_classes: int = 1000
    # Flow matching
    timestep_shift: float = 0.5  # t <- a t / (1 + (a - 1) t)
    velocity_eps: float = 0.05  # velocities divide by max(1 - t, velocity_eps)
    # Joint training loss
    label_drop_prob: float = 0.1
    recon_t_max: float = 0.01  # tokenization pass time ~ U[0, recon_t_max)
    decoder_noise_prob: float = 0.5
    decoder_noise_t_min: float = 0.7  # decoder noise keeps t z + (1 - t) e, t ~ U[t_min, 1)
    perceptual_weight: float = 1.0
    gen_loss_weight: float = 1.0
    flow_steps_per_recon: int = 3  # K flow draws per reconstruction
    flow_mini_batch: int = 3  # draws batched together (memory knob)
    # LPIPS backbone: torchvision VGG16 ImageNet weights; None looks in the torch hub cache.
    lpips_vgg_weights: str | None = None
    lpips_random_backbone: bool = False  # tests only: random VGG16 trunk, no file needed

    def __post_init__(self) -> None:
        positive = [
            "encoder_depth", "encoder_hidden", "encoder_heads", "in_context_len", "decoder_layers",
            "decoder_hidden", "decoder_heads", "decoder_mlp", "decoder_proj_dim", "image_size",
            "patch_size", "num_latent_tokens", "latent_dim", "num_classes", "flow_steps_per_recon",
            "flow_mini_batch",
        ]
        for name in positive:
            value = getattr(self, name)
            if not has_type(value, int) or value <= 0:
                raise ConfigError(f"{name}={value!r}: must be a positive integer")
        if self.in_context_start < 0:
            raise ConfigError(f"in_context_start={self.in_context_start}: must be >= 0")
        if self.encoder_depth <= self.in_context_start:
            raise ConfigError(
                f"encoder_depth={self.encoder_depth}: must be greater than in_context_start="
                f"{self.in_context_start} (the in-context class tokens enter at that block)"
            )
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"image_size={self.image_size}: must be divisible by patch_size={self.patch_size}"
            )
        for part, hidden, heads in [
            ("encoder", self.encoder_hidden, self.encoder_heads),
            ("decoder", self.decoder_hidden, self.decoder_heads),
        ]:
            if hidden % heads:
                raise ConfigError(
                    f"{part}_hidden={hidden}: must be divisible by {part}_heads={heads}"
                )
        if (self.encoder_hidden // self.encoder_heads) % 2:
            raise ConfigError(
                f"encoder_hidden/encoder_heads={self.encoder_hidden // self.encoder_heads}: "
                "the head dim must be even (RoPE rotates channel pairs)"
            )
        if self.encoder_hidden % 2:
            raise ConfigError(f"encoder_hidden={self.encoder_hidden}: must be even (sin/cos table)")
        if self.decoder_hidden % 4:
            raise ConfigError(
                f"decoder_hidden={self.decoder_hidden}: must be divisible by 4 (2-D sin/cos table)"
            )
        if self.num_latent_tokens != self.num_patches:
            raise ConfigError(
                f"num_latent_tokens={self.num_latent_tokens}: must equal the number of image patches "
                f"(image_size/patch_size)^2={self.num_patches}; the pixel decoder maps latent token i "
                "to image patch i"
            )
        for name in ["label_drop_prob", "decoder_noise_prob"]:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name}={value}: must lie in [0, 1]")
        if not 0.0 <= self.decoder_noise_t_min <= 1.0:
            raise ConfigError(f"decoder_noise_t_min={self.decoder_noise_t_min}: must lie in [0, 1]")
        if not 0.0 <= self.recon_t_max <= 1.0:
            raise ConfigError(f"recon_t_max={self.recon_t_max}: must lie in [0, 1]")
        if self.timestep_shift <= 0:
            raise ConfigError(f"timestep_shift={self.timestep_shift}: must be > 0")
        if not 0.0 < self.velocity_eps <= 1.0:
            raise ConfigError(f"velocity_eps={self.velocity_eps}: must lie in (0, 1]")
        for name in ["perceptual_weight", "gen_loss_weight"]:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)}: must be >= 0")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys {unknown}; known keys: {sorted(known)}")
        return cls(**values)


def _size_name(name: str, table: dict[str, Any], field: str) -> str:
    key = _SIZE_ALIASES.get(name.lower(), name) if isinstance(name, str) else name
    if key not in table:
        raise ConfigError(f"{field}={name!r}: unknown size name; known sizes: {sorted(table)}")
    return key


def model_config(encoder: str = "B", decoder: str = "B", **overrides: Any) -> ModelConfig:
    """A config from named sizes (e.g. encoder "B", decoder "B"), with any field overridden."""
    depth, hidden, heads = ENCODER_SIZES[_size_name(encoder, ENCODER_SIZES, "encoder")]
    layers, dec_hidden, dec_heads, mlp = DECODER_SIZES[_size_name(decoder, DECODER_SIZES, "decoder")]
    values: dict[str, Any] = dict(
        encoder_depth=depth, encoder_hidden=hidden, encoder_heads=heads,
        decoder_layers=layers, decoder_hidden=dec_hidden, decoder_heads=dec_heads, decoder_mlp=mlp,
    )
    values.update(overrides)
    return ModelConfig.from_dict(values)
