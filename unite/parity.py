"""Parity against tensors recorded from the reference implementation (`unite parity FIXTURE`).

A fixture is a dict with `config`, `state_dict` (reference key names), `inputs` and `outputs`;
see tests/fixtures/README.md for the meaning of each entry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from unite.config import ModelConfig
from unite.model import UNITE
from unite.reference import load_reference_state_dict
from unite.safe_load import TRUST_PICKLE_FLAG, UntrustedPickleError, load_torch_file
from unite.sampling import Guidance, guided_prediction, sample_latents

FORWARD_TOLERANCE = 1e-4
SAMPLER_TOLERANCE = 1e-3


def config_from_fixture(config: dict[str, Any]) -> ModelConfig:
    depth, hidden, heads = config["encoder"]
    layers, dec_hidden, dec_heads, mlp = config["decoder"]
    return ModelConfig(
        encoder_depth=depth, encoder_hidden=hidden, encoder_heads=heads,
        decoder_layers=layers, decoder_hidden=dec_hidden, decoder_heads=dec_heads, decoder_mlp=mlp,
        num_classes=config["num_classes"], image_size=config["image_size"],
        patch_size=config["patch_size"], num_latent_tokens=config["num_latent_tokens"],
        latent_dim=config["latent_dim"], in_context_len=config["in_context_len"],
        in_context_start=config["in_context_start"], qk_norm=config["qk_norm"],
        timestep_shift=config["timestep_shift_alpha"], velocity_eps=config["train_eps"],
        perceptual_weight=0.0,
    )


def recompute_outputs(fixture: dict[str, Any]) -> dict[str, Callable[[], Tensor]]:
    """Each fixture output name -> a function recomputing it with this project's model."""
    config, inputs = fixture["config"], fixture["inputs"]
    model = UNITE(config_from_fixture(config)).eval()
    load_reference_state_dict(model, fixture["state_dict"])
    guidance = Guidance(
        scale=config["cfg_scale"], interval=tuple(config["cfg_interval"]), norm_order=config["cfg_norm_order"]
    )
    unguided = Guidance(scale=1.0, interval=guidance.interval, norm_order=guidance.norm_order)
    images, labels, x_t, t = inputs["images"], inputs["labels"], inputs["x_t"], inputs["t"]
    null = torch.full_like(labels, model.null_label)
    cache: dict[str, Tensor] = {}

    def z() -> Tensor:
        if "z" not in cache:
            cache["z"] = model.tokenize(images, noise=inputs["z_noise"], t=inputs["recon_t"], normalize=False)
        return cache["z"]

    def guided() -> Tensor:
        out = guided_prediction(model, x_t, t, labels, guidance)
        return torch.cat([out, out])  # the reference guides a doubled batch; both halves agree

    def sampled(g: Guidance) -> Tensor:
        key = f"samples_{g.scale}"
        if key not in cache:
            cache[key], _ = sample_latents(model, inputs["gen_noise"], labels, g, eps=config["sample_eps"])
        return cache[key]

    return {
        "z": z,
        "z_normed": lambda: model.latent_norm(z()),
        "recon": lambda: model.decode(model.latent_norm(z())),
        "x_pred_cond": lambda: model.predict(x_t, t, labels, normalize=False),
        "x_pred_null": lambda: model.predict(x_t, t, null, normalize=False),
        "cfg_out": guided,
        "flow_loss": lambda: model.flow_matching_loss(inputs["x1"], inputs["x0"], t, labels),
        "samples_z": lambda: sampled(guidance),
        "samples_img": lambda: model.decode(sampled(guidance)),
        "samples_z_nocfg": lambda: sampled(unguided),
        "samples_img_nocfg": lambda: model.decode(sampled(unguided)),
    }


def tolerance(name: str) -> float:
    return SAMPLER_TOLERANCE if name.startswith("samples") else FORWARD_TOLERANCE


@torch.no_grad()
def compare(fixture: dict[str, Any]) -> list[tuple[str, float, float, bool]]:
    """(output, max abs error, tolerance, ok) for every output in the fixture."""
    recompute = recompute_outputs(fixture)
    rows = []
    for name, expected in fixture["outputs"].items():
        if name not in recompute:
            rows.append((name, float("nan"), tolerance(name), False))
            continue
        actual = recompute[name]()
        if actual.shape != expected.shape:
            rows.append((name, float("inf"), tolerance(name), False))
            continue
        error = (actual.float() - expected.float()).abs().max().item()
        rows.append((name, error, tolerance(name), error <= tolerance(name)))
    return rows


def run_parity(path: str | Path, trust_pickle: bool = False) -> int:
    """Print the comparison table; 0 if every output is within tolerance, 1 otherwise. The fixture
    is rebuilt weights-only; one that needs more is refused (exit 2) unless `trust_pickle`."""
    path = Path(path)
    if not path.is_file():
        print(f"unite parity: fixture {str(path)!r} does not exist")
        return 2
    try:
        fixture = load_torch_file(path, TRUST_PICKLE_FLAG, trust_pickle)
    except UntrustedPickleError as error:
        print(f"unite parity: {error}")
        return 2
    missing = [k for k in ("config", "state_dict", "inputs", "outputs") if k not in fixture]
    if missing:
        print(f"unite parity: {path} is not a parity fixture (no {missing})")
        return 2
    torch.manual_seed(0)
    rows = compare(fixture)
    width = max(len(name) for name, *_ in rows)
    print(f"{'output':<{width}}  {'max abs error':>13}  {'tolerance':>9}  result")
    for name, error, tol, ok in rows:
        note = "ok" if ok else ("not recomputed" if error != error else "FAIL")
        print(f"{name:<{width}}  {error:>13.3e}  {tol:>9.0e}  {note}")
    failed = [name for name, *_, ok in rows if not ok]
    print(f"{len(rows) - len(failed)}/{len(rows)} outputs within tolerance" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0
