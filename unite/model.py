"""UNITE: one Generative Encoder that both tokenizes images and denoises latents, plus a ViT
pixel decoder, trained jointly by a reconstruction loss and a flow-matching loss.

Time runs from t = 0 (pure noise) to t = 1 (data): x_t = t x1 + (1 - t) x0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from unite.config import ModelConfig


def shift_time(t: Tensor, alpha: float) -> Tensor:
    """Timestep shift t -> a t / (1 + (a - 1) t); keeps 0 and 1 fixed, a < 1 favours noisy times."""
    return alpha * t / (1 + (alpha - 1) * t)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x (1 + scale) + shift, as one fused kernel."""
    return torch.addcmul(shift, x, 1 + scale)


def sincos_1d(num_positions: int, dim: int) -> Tensor:
    """(num_positions, dim) table: first half sin, second half cos, frequencies 1/10000^(i/(dim/2))."""
    freqs = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = torch.arange(num_positions, dtype=torch.float64)[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_2d_with_cls(grid_size: int, dim: int) -> Tensor:
    """MAE-style fixed 2-D table with a zero row for the CLS token: (1 + grid_size^2, dim)."""
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    half = dim // 2
    freqs = 1.0 / 10000 ** (torch.arange(half // 2, dtype=torch.float64) / (half / 2))

    def encode(positions: Tensor) -> Tensor:
        angles = positions.reshape(-1, 1) * freqs[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    # MAE's meshgrid puts the column coordinate first.
    table = torch.cat([encode(cols), encode(rows)], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table]).float()


def rope_tables(num_positions: int, head_dim: int) -> tuple[Tensor, Tensor]:
    """1-D RoPE cos/sin of shape (num_positions, head_dim); each frequency drives two adjacent
    channels, frequencies 1/10000^(2k/head_dim)."""
    # float32 throughout, as the reference computes it (float64 differs by ~1e-5 at far positions).
    freqs = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.arange(num_positions, dtype=torch.float32)[:, None] * freqs[None]
    angles = angles.repeat_interleave(2, dim=1)
    return angles.cos(), angles.sin()


def rope_complex(cos: Tensor, sin: Tensor) -> Tensor:
    """The rotations of a (L, head_dim) cos/sin table as (L, head_dim/2) complex64 numbers
    cos + i sin (one per adjacent channel pair)."""
    return torch.complex(cos[:, 0::2].float(), sin[:, 0::2].float())


def apply_rope(x: Tensor, rotation: Tensor) -> Tensor:
    """Rotate adjacent channel pairs (x0, x1) of x (..., L, head_dim) by position-dependent
    angles, as one complex multiply: (x0 + i x1)(cos + i sin) = (x0 cos - x1 sin) + i (x1 cos +
    x0 sin). Computed in float32."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * rotation).flatten(-2)


class RMSNorm(nn.Module):
    """Weighted RMSNorm computed in float32 and cast back (stable under bf16 autocast)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # The same computation with the weight fused into the norm kernel (no cast needed).
            return F.rms_norm(x, (x.shape[-1],), self.weight, eps=self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


class Attention(nn.Module):
    """Self-attention with QK-norm and RoPE on queries and keys."""

    def __init__(self, dim: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(dim // heads) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(dim // heads) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rotation: Tensor) -> Tensor:
        """x (B, L, dim); rotation: the RoPE table as complex numbers (L, head_dim / 2)."""
        batch, length, dim = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.heads, -1)
        # QK-norm while each token's heads are still adjacent in memory (B, L, heads, head_dim):
        # the same values as after the move to (B, heads, L, head_dim), and on CPU the attention
        # layer runs about a quarter faster at inference.
        q = apply_rope(self.q_norm(qkv[:, :, 0]).transpose(1, 2), rotation).to(qkv.dtype)
        k = apply_rope(self.k_norm(qkv[:, :, 1]).transpose(1, 2), rotation).to(qkv.dtype)
        out = F.scaled_dot_product_attention(q, k, qkv[:, :, 2].transpose(1, 2))
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class SwiGLU(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        hidden = int(2 / 3 * 4 * dim)
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class EncoderBlock(nn.Module):
    """Pre-norm adaLN block (DiT style) with a closing RMSNorm after the residual branches."""

    def __init__(self, dim: int, heads: int, qk_norm: bool):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, heads, qk_norm)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim)
        self.norm3 = RMSNorm(dim)
        self.modulation = nn.Linear(dim, 6 * dim)

    def forward(self, x: Tensor, c: Tensor, rotation: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.modulation(F.silu(c)).unsqueeze(1).chunk(6, dim=-1)
        )
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rotation)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return self.norm3(x)


class FourierTimeEmbedding(nn.Module):
    """Gaussian Fourier features of t (fixed random frequencies) followed by an MLP."""

    def __init__(self, dim: int, num_frequencies: int = 256):
        super().__init__()
        # Fixed, not trained; stored in the state dict so that a checkpoint carries them.
        self.register_buffer("freqs", torch.randn(num_frequencies))
        self.mlp = nn.Sequential(
            nn.Linear(2 * num_frequencies, dim), nn.SiLU(), nn.Linear(dim, dim)
        )
        # Quirk: the reference holds this trainable vector but never uses it. It is kept so that
        # parameter counts and reference checkpoints match.
        self.special_time_emb = nn.Parameter(torch.zeros(dim))

    def forward(self, t: Tensor) -> Tensor:
        angles = t.float()[:, None] * self.freqs[None] * (2 * math.pi)
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=-1)).float()


class GenerativeEncoder(nn.Module):
    """The shared transformer: (latent tokens [+ image tokens], t, label) -> latent prediction.

    Token order: [in-context class tokens (from block `in_context_start` on), latent tokens,
    image tokens]. RoPE positions run over latent then image tokens; in-context tokens get
    the identity rotation.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dim = cfg.encoder_hidden
        self.in_context_start = cfg.in_context_start
        self.in_context_len = cfg.in_context_len
        self.latent_in = nn.Linear(cfg.latent_dim, dim)
        self.time_embed = FourierTimeEmbedding(dim)
        self.label_embed = nn.Embedding(cfg.num_classes + 2, dim)  # row num_classes = null label
        self.in_context_pos = nn.Parameter(torch.zeros(1, cfg.in_context_len, dim))
        self.blocks = nn.ModuleList(
            EncoderBlock(dim, cfg.encoder_heads, cfg.qk_norm) for _ in range(cfg.encoder_depth)
        )
        self.final_norm = RMSNorm(dim)
        self.final_modulation = nn.Linear(dim, 2 * dim)
        self.final_linear = nn.Linear(dim, cfg.latent_dim)

        cos, sin = rope_tables(cfg.num_latent_tokens + cfg.num_patches, dim // cfg.encoder_heads)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        identity = torch.ones(cfg.in_context_len, cos.shape[1])
        self.register_buffer("rope_cos_ctx", torch.cat([identity, cos]), persistent=False)
        self.register_buffer("rope_sin_ctx", torch.cat([0 * identity, sin]), persistent=False)
        self.checkpoint_blocks = False

    def forward(
        self,
        latents: Tensor,
        t: Tensor,
        labels: Tensor,
        latent_pos: Tensor,
        image_tokens: Tensor | None = None,
    ) -> Tensor:
        num_latent = latents.shape[1]
        x = self.latent_in(latents) + latent_pos
        if image_tokens is not None:
            x = torch.cat([x, image_tokens], dim=1)
        length = x.shape[1]
        label_emb = self.label_embed(labels)
        c = self.time_embed(t) + label_emb

        # The RoPE tables as complex rotations (built per call, not stored: a complex buffer
        # would not survive module.to(dtype)); the attention applies them in one multiply.
        rotation = rope_complex(self.rope_cos[:length], self.rope_sin[:length])
        for index, block in enumerate(self.blocks):
            if index == self.in_context_start:
                in_context = label_emb.unsqueeze(1) + self.in_context_pos
                x = torch.cat([in_context.to(x.dtype), x], dim=1)
                end = self.in_context_len + length
                rotation = rope_complex(self.rope_cos_ctx[:end], self.rope_sin_ctx[:end])
            if self.checkpoint_blocks and torch.is_grad_enabled():
                x = checkpoint(block, x, c, rotation, use_reentrant=False)
            else:
                x = block(x, c, rotation)

        x = x[:, self.in_context_len : self.in_context_len + num_latent]
        shift, scale = self.final_modulation(F.silu(c)).unsqueeze(1).chunk(2, dim=-1)
        return self.final_linear(modulate(self.final_norm(x), shift, scale))


class DecoderBlock(nn.Module):
    """Pre-LayerNorm ViT block with an exact-GELU MLP."""

    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-12)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-12)
        self.fc1 = nn.Linear(dim, mlp)
        self.fc2 = nn.Linear(mlp, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, length, dim)
        x = x + self.proj(attn)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class PixelDecoder(nn.Module):
    """ViT decoder: latent token i -> pixels of image patch i."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dim = cfg.decoder_hidden
        self.patch_size = cfg.patch_size
        self.grid_size = cfg.image_size // cfg.patch_size
        self.latent_proj = nn.Linear(cfg.latent_dim, cfg.decoder_proj_dim)
        self.embed = nn.Linear(cfg.decoder_proj_dim, dim)
        self.cls_token = nn.Parameter(torch.zeros(dim))
        self.register_buffer("pos_embed", sincos_2d_with_cls(self.grid_size, dim)[None], persistent=False)
        self.blocks = nn.ModuleList(
            DecoderBlock(dim, cfg.decoder_heads, cfg.decoder_mlp) for _ in range(cfg.decoder_layers)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-12)
        self.head = nn.Linear(dim, cfg.patch_size**2 * 3)

    def forward(self, latents: Tensor) -> Tensor:
        x = self.embed(self.latent_proj(latents))
        cls = self.cls_token.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        patches = self.head(self.norm(x))[:, 1:]
        # Patch pixel layout is (row in patch, column in patch, channel).
        g, p = self.grid_size, self.patch_size
        patches = patches.reshape(-1, g, g, p, p, 3)
        return torch.einsum("nhwpqc->nchpwq", patches).reshape(-1, 3, g * p, g * p)


class UNITE(nn.Module):
    """Tokenizer and latent generator sharing one Generative Encoder."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.latent_pos = nn.Parameter(sincos_1d(cfg.num_latent_tokens, cfg.encoder_hidden)[None])
        self.patch_embed = nn.Conv2d(3, cfg.encoder_hidden, cfg.patch_size, stride=cfg.patch_size)
        self.encoder = GenerativeEncoder(cfg)
        self.latent_norm = nn.LayerNorm(cfg.latent_dim, eps=1e-5)
        self.decoder = PixelDecoder(cfg)
        self._init_weights()
        # Built after init so its frozen weights are untouched; excluded from trainable counts.
        self.perceptual = None
        if cfg.perceptual_weight > 0:
            from unite.perceptual import build_lpips

            self.perceptual = build_lpips(cfg.lpips_vgg_weights, random_backbone=cfg.lpips_random_backbone)
            # lpips builds itself in eval mode; follow the model's mode instead, so that training
            # (model.train(), as the reference calls every epoch) runs LPIPS's head dropout (quirk).
            self.perceptual.train(self.training)

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        encoder = self.encoder
        nn.init.normal_(encoder.label_embed.weight, std=0.02)
        nn.init.normal_(encoder.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(encoder.time_embed.mlp[2].weight, std=0.02)
        nn.init.normal_(encoder.in_context_pos, std=0.02)
        for linear in [block.modulation for block in encoder.blocks] + [
            encoder.final_modulation,
            encoder.final_linear,
        ]:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    @property
    def null_label(self) -> int:
        return self.cfg.num_classes

    # ----------------------------------------------------------------- input checks
    # Shapes and dtypes are always checked. Values are checked on CPU tensors only: reading them
    # back from an accelerator would cost a host sync per micro-batch.
    def check_images(self, images: Tensor) -> None:
        """Shape (B, 3, S, S), a float dtype and, on CPU, values in [0, 1]."""
        size = self.cfg.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(
                f"images: expected shape (B, 3, {size}, {size}), got {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise ValueError(f"images: expected a float tensor in [0, 1], got dtype {images.dtype}")
        if images.device.type != "cpu":
            return
        low, high = torch.aminmax(images.detach())
        if low < 0 or high > 1:
            raise ValueError(
                f"images: values must lie in [0, 1] (no mean/std normalisation), "
                f"got min {low.item():.4g}, max {high.item():.4g}"
            )

    def check_labels(self, labels: Tensor, allow_null: bool) -> None:
        """A 1-D integer tensor and, on CPU, values from 0 to the last class (or the null label)."""
        high = self.cfg.num_classes if allow_null else self.cfg.num_classes - 1
        if labels.ndim != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(
                f"labels: expected a 1-D integer tensor, got dtype {labels.dtype}, shape {tuple(labels.shape)}"
            )
        if labels.numel() and labels.device.type == "cpu":
            low, top = torch.aminmax(labels.detach())
            if low < 0 or top > high:
                rule = f"[0, {high}]" + (f" ({high} is the null label)" if allow_null else "")
                raise ValueError(
                    f"labels: values must lie in {rule}, got min {low.item()}, max {top.item()}"
                )

    # ----------------------------------------------------------------- the three jobs
    def tokenize(
        self,
        images: Tensor,
        noise: Tensor | None = None,
        t: Tensor | None = None,
        normalize: bool = True,
    ) -> Tensor:
        """Image in [0, 1] -> latent (B, N, C); layer-normalised unless normalize=False.

        noise and t default to fresh draws: N(0, I) latents and t ~ U[0, recon_t_max)."""
        cfg = self.cfg
        batch = images.shape[0]
        if noise is None:
            noise = torch.randn(batch, cfg.num_latent_tokens, cfg.latent_dim, device=images.device)
        if t is None:
            t = torch.rand(batch, device=images.device) * cfg.recon_t_max
        null = torch.full((batch,), self.null_label, dtype=torch.long, device=images.device)
        image_tokens = self.patch_embed(images).flatten(2).transpose(1, 2)
        z = self.encoder(noise, t, null, self.latent_pos, image_tokens)
        return self.latent_norm(z) if normalize else z

    def decode(self, latents: Tensor) -> Tensor:
        """Latent (B, N, C) -> image (B, 3, H, W), not clamped."""
        return self.decoder(latents)

    def predict(self, x_t: Tensor, t: Tensor, labels: Tensor, normalize: bool = True) -> Tensor:
        """Denoised latent x_hat for noisy latent x_t at time t (B,), labels (B,) (null allowed)."""
        x_hat = self.encoder(x_t, t, labels, self.latent_pos)
        return self.latent_norm(x_hat) if normalize else x_hat

    # ----------------------------------------------------------------- training losses
    def velocity(self, x: Tensor, x_t: Tensor, t: Tensor, eps: float | None = None) -> Tensor:
        """Velocity that carries x_t to x by t = 1, with 1 - t clamped at eps (default
        cfg.velocity_eps)."""
        eps = self.cfg.velocity_eps if eps is None else eps
        return (x - x_t) / (1 - t).clamp_min(eps).view(-1, 1, 1)

    def flow_matching_loss(self, x1: Tensor, x0: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        """One flow draw: mean squared velocity error, averaged over tokens, channels and batch."""
        x_t = t.view(-1, 1, 1) * x1 + (1 - t.view(-1, 1, 1)) * x0
        x_hat = self.predict(x_t, t, labels)
        error = self.velocity(x1, x_t, t) - self.velocity(x_hat, x_t, t)
        return error.float().square().mean()

    def sample_flow_time(self, n: int, device: torch.device) -> Tensor:
        """Logit-normal t, then the timestep shift."""
        t = torch.sigmoid(torch.randn(n, device=device))
        return shift_time(t, self.cfg.timestep_shift)

    def drop_labels(self, labels: Tensor) -> Tensor:
        drop = torch.rand(labels.shape, device=labels.device) < self.cfg.label_drop_prob
        return torch.where(drop, torch.full_like(labels, self.null_label), labels)

    def forward(self, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """The joint step's loss: reconstruction (L1 + LPIPS) + flow matching over K draws.

        Returns `loss` (to back-propagate) and its parts `recon`, `l1`, `lpips`, `flow`.
        It is `forward` so that DistributedDataParallel wraps the whole training step."""
        cfg = self.cfg
        self.check_images(images)
        self.check_labels(labels, allow_null=False)
        batch, device = images.shape[0], images.device

        z = self.tokenize(images)
        noisy = torch.rand(batch, device=device) < cfg.decoder_noise_prob
        keep = torch.empty(batch, device=device).uniform_(cfg.decoder_noise_t_min, 1.0).view(-1, 1, 1)
        noised = keep * z + (1 - keep) * torch.randn_like(z)
        recon = self.decode(torch.where(noisy.view(-1, 1, 1), noised, z))
        l1 = (recon.float() - images).abs().mean()
        lpips = torch.zeros((), device=device)
        if self.perceptual is not None:
            lpips = self.perceptual(images, recon.float()).mean()
        recon_loss = l1 + cfg.perceptual_weight * lpips

        # Targets carry no gradient: the flow loss reaches the shared weights only through
        # the denoising pass.
        x1 = z.detach()
        flow = torch.zeros((), device=device)
        self.encoder.checkpoint_blocks = cfg.flow_steps_per_recon > 4
        try:
            for start in range(0, cfg.flow_steps_per_recon, cfg.flow_mini_batch):
                draws = min(cfg.flow_mini_batch, cfg.flow_steps_per_recon - start)
                x1_draws = x1.repeat(draws, 1, 1)
                t = self.sample_flow_time(draws * batch, device)
                y = self.drop_labels(labels.repeat(draws))
                # The batch mean over `draws` stacked draws times `draws` = sum of per-draw losses.
                flow = flow + draws * self.flow_matching_loss(x1_draws, torch.randn_like(x1_draws), t, y)
        finally:
            self.encoder.checkpoint_blocks = False

        loss = recon_loss + cfg.gen_loss_weight * flow
        return {"loss": loss, "recon": recon_loss, "l1": l1, "lpips": lpips, "flow": flow}


def count_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
