"""Loading checkpoints of the public UNITE reference implementation into this project's model.

A released checkpoint is a `.pt` dict holding `model` and `ema` (plus optimizer state); a bare
state dict works too. Reference key names are translated to this project's names by the rules
below; keys the reference stores but never uses are dropped.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
from torch import Tensor

from unite.model import UNITE
from unite.safe_load import TRUST_PICKLE_FLAG, load_torch_file

# (reference pattern, this project's name); applied in order, first match wins.
RENAME_RULES: list[tuple[str, str]] = [
    (r"^latent_tokens$", "latent_pos"),
    (r"^patch_embed\.patch_embeddings\.projection\.(weight|bias)$", r"patch_embed.\1"),
    (r"^encoder\.up_sample\.", "encoder.latent_in."),
    (r"^encoder\.in_context_posemb$", "encoder.in_context_pos"),
    (r"^encoder\.t_embedder\.W$", "encoder.time_embed.freqs"),
    (r"^encoder\.t_embedder\.", "encoder.time_embed."),
    (r"^encoder\.y_embedder\.embedding_table\.", "encoder.label_embed."),
    (r"^encoder\.blocks\.(\d+)\.adaLN_modulation\.1\.", r"encoder.blocks.\1.modulation."),
    (r"^encoder\.final_layer\.norm_final\.", "encoder.final_norm."),
    (r"^encoder\.final_layer\.linear\.", "encoder.final_linear."),
    (r"^encoder\.final_layer\.adaLN_modulation\.1\.", "encoder.final_modulation."),
    (r"^encoder_layer_norm\.", "latent_norm."),
    (r"^up_sample_decoder\.", "decoder.latent_proj."),
    (r"^decoder\.trainable_cls_token$", "decoder.cls_token"),
    (r"^decoder\.decoder_embed\.", "decoder.embed."),
    (r"^decoder\.decoder_layers\.(\d+)\.layernorm_before\.", r"decoder.blocks.\1.norm1."),
    (r"^decoder\.decoder_layers\.(\d+)\.layernorm_after\.", r"decoder.blocks.\1.norm2."),
    (r"^decoder\.decoder_layers\.(\d+)\.attn_proj\.", r"decoder.blocks.\1.proj."),
    (r"^decoder\.decoder_layers\.(\d+)\.ffn_up\.", r"decoder.blocks.\1.fc1."),
    (r"^decoder\.decoder_layers\.(\d+)\.ffn_down\.", r"decoder.blocks.\1.fc2."),
    (r"^decoder\.decoder_layers\.(\d+)\.", r"decoder.blocks.\1."),
    (r"^decoder\.decoder_norm\.", "decoder.norm."),
    (r"^decoder\.decoder_pred\.", "decoder.head."),
]

# Stored by the reference but never used by its forward pass; this model recomputes the
# fixed tables (RoPE, decoder 2-D sin/cos) itself.
UNUSED_KEYS = re.compile(
    r"^(encoder\.pos_embed|encoder\.feat_rope(_incontext)?\.freqs_(cos|sin)|decoder\.decoder_pos_embed)$"
)
# Never initialised nor trained by the reference (all zeros); accepted only when it is zero.
ZERO_KEYS = re.compile(r"^patch_embed\.position_embeddings$")
# Wrapper prefixes left by DistributedDataParallel and torch.compile.
WRAPPER_PREFIX = re.compile(r"^(module\.|_orig_mod\.)+")
# Frozen LPIPS weights that a reference checkpoint may carry; this model builds LPIPS itself.
LPIPS_KEY = re.compile(r"(^|\.)(lpips|perceptual_loss|perceptual)\.", re.IGNORECASE)


class ReferenceCheckpointError(ValueError):
    """A reference state dict that does not fit the model; the message lists every problem."""


def reference_to_project_name(name: str) -> str:
    for pattern, replacement in RENAME_RULES:
        new, count = re.subn(pattern, replacement, name)
        if count:
            return new
    return name


def select_state_dict(
    checkpoint: Mapping[str, Any], weights: Literal["ema", "model"] = "ema"
) -> Mapping[str, Tensor]:
    """The state dict inside a released checkpoint (`ema` or `model`), under `state_dict`, or the
    bare state dict itself."""
    if weights not in ("ema", "model"):
        raise ValueError(f"weights={weights!r}: must be 'ema' or 'model'")
    if "model" in checkpoint or "ema" in checkpoint:
        if weights not in checkpoint:
            raise ReferenceCheckpointError(
                f"weights={weights!r}: the checkpoint has no {weights!r} entry "
                f"(it holds {sorted(checkpoint)})"
            )
        return checkpoint[weights]
    if isinstance(checkpoint.get("state_dict"), Mapping):  # e.g. a parity fixture
        return checkpoint["state_dict"]
    return checkpoint


def load_reference_state_dict(
    model: UNITE,
    source: str | Path | Mapping[str, Any],
    weights: Literal["ema", "model"] = "ema",
    trust_pickle: bool = False,
) -> None:
    """Load a reference-format checkpoint (path or dict) into `model`, strictly.

    A file is rebuilt weights-only: one that needs more (arbitrary objects, which could run code)
    raises UntrustedPickleError unless `trust_pickle`. Raises ReferenceCheckpointError naming every
    missing, unexpected or mis-shaped key at once."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"reference checkpoint {str(path)!r} does not exist")
        source = load_torch_file(path, TRUST_PICKLE_FLAG, trust_pickle)
    state = select_state_dict(source, weights)

    translated: dict[str, Tensor] = {}
    problems: list[str] = []
    for raw_name, value in state.items():
        name = WRAPPER_PREFIX.sub("", raw_name)
        if UNUSED_KEYS.match(name) or LPIPS_KEY.search(name):
            continue
        if ZERO_KEYS.match(name):
            if torch.count_nonzero(value):
                problems.append(
                    f"{name}: expected all zeros (the reference never initialises or trains it), "
                    "found non-zero values that this model cannot represent"
                )
            continue
        translated[reference_to_project_name(name)] = value

    expected = model.state_dict()
    expected = {k: v for k, v in expected.items() if not k.startswith("perceptual.")}
    missing = sorted(set(expected) - set(translated))
    unexpected = sorted(set(translated) - set(expected))
    mis_shaped = [
        f"{k}: checkpoint {tuple(translated[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(translated))
        if translated[k].shape != expected[k].shape
    ]
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    if mis_shaped:
        problems.append(f"shape mismatches ({len(mis_shaped)}): {'; '.join(mis_shaped)}")
    if problems:
        raise ReferenceCheckpointError(
            "reference checkpoint does not fit the model config:\n  " + "\n  ".join(problems)
        )
    model.load_state_dict(translated, strict=False)
