"""The training config: TrainConfig with every key's meaning and default, its validation, and
the recipe it gives on a world size (`recipe_for`: per-device batch, accumulation, peak learning
rate and schedule). Every error names the key, the value and the rule."""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from unite.config import ConfigError, ModelConfig, model_config
from unite.optim import MUON_DTYPES, LRSchedule, scaled_lr, unite_b_schedule
from unite.options import check_choice, has_type

# Keys that may differ between a checkpoint's config and the config that resumes it. A resume
# on another world size keeps the checkpoint's schedule in steps (`lr_schedule_steps`) and
# carries the data position over from the saved run's micro-batch (`micro_batch`).
RESUME_MAY_CHANGE = frozenset(
    {"out_dir", "max_steps", "log_every", "checkpoint_every", "keep_last", "max_nonfinite",
     "resume", "progress", "compile_decoder", "live_metrics", "world_size", "lr_schedule_steps",
     "micro_batch", "muon_dtype", "tf32"}
)
# Keys that configs saved by earlier versions hold and this one no longer has: a checkpoint
# holding them still resumes.
RETIRED_KEYS = frozenset({"initial_cfg_scale"})


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on. Defaults follow the UNITE-B recipe."""

    model: ModelConfig
    data: dict[str, Any]  # {"kind": "synthetic", ...} or {"kind": "python", "source": "mod:fn", ...}
    out_dir: str
    max_steps: int  # optimizer steps
    global_batch: int = 1024  # images per optimizer step, all ranks and micro-batches together
    per_device_batch: int = 64  # the most images per micro-batch on one rank (see recipe_for)
    base_lr: float = 1e-4  # at a global batch of 384, scaled linearly
    schedule: dict[str, Any] = field(
        default_factory=lambda: {"preset": "unite_b", "images_per_epoch": 1_281_167}
    )
    grad_clip: float = 3.0  # total gradient norm
    ema_decay: float = 0.9978  # per optimizer step
    seed: int = 0
    device: str = "auto"  # auto (CUDA when available), cuda or cpu
    bf16: bool = True  # bf16 autocast on CUDA; CPU always runs float32
    tf32: bool = True  # TF32 matmuls and cuDNN convolutions on CUDA, as the reference allows
    muon_dtype: str = "auto"  # Muon's Newton-Schulz: auto (bf16 where native), bfloat16 or float32
    compile_decoder: bool = False  # torch.compile the pixel decoder
    log_every: int = 50
    checkpoint_every: int = 1000
    keep_last: int = 3
    max_nonfinite: int = 10  # consecutive skipped steps (non-finite loss or grad norm) before stopping
    resume: str = "auto"  # auto: latest checkpoint in out_dir if any; or a checkpoint file or folder
    progress: bool = True
    live_metrics: str = ""  # path stem: also keep <stem>.tsv and <stem>.json current ("": only out_dir's)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Validate a config mapping; every error names the key, the value and the rule."""
        if not isinstance(values, dict):
            raise ConfigError(f"config: expected a mapping of keys to values, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
        for key in ("model", "data", "out_dir", "max_steps"):
            if key not in values:
                raise ConfigError(f"{key}: required key is missing")
        kwargs = dict(values)
        kwargs["model"] = _model_config(values["model"])
        kwargs["data"] = _check_data(values["data"])
        _check_scalar_types(cls, kwargs)
        config = cls(**kwargs)
        for key in ("max_steps", "global_batch", "per_device_batch", "log_every", "checkpoint_every",
                    "keep_last", "max_nonfinite"):
            if getattr(config, key) <= 0:
                raise ConfigError(f"{key}={getattr(config, key)}: must be a positive integer")
        for key in ("base_lr", "grad_clip"):
            if not getattr(config, key) > 0:
                raise ConfigError(f"{key}={getattr(config, key)}: must be > 0")
        if not 0.0 <= config.ema_decay < 1.0:
            raise ConfigError(f"ema_decay={config.ema_decay}: must lie in [0, 1)")
        check_choice("muon_dtype", config.muon_dtype, MUON_DTYPES, ConfigError)
        check_choice("device", config.device, ("auto", "cpu", "cuda"), ConfigError)
        build_schedule(config.schedule, config.global_batch, 1)  # validates the section
        return config


def _check_scalar_types(schema: type, values: dict[str, Any], prefix: str = "") -> None:
    """The values of `schema`'s int, float, str and bool fields present in `values` have those
    types by the one rule of unite.options.has_type (a bool is no int)."""
    for name, expected in typing.get_type_hints(schema).items():
        if expected in (int, float, str, bool) and name in values and not has_type(values[name], expected):
            raise ConfigError(f"{prefix}{name}={values[name]!r}: must be of type {expected.__name__}")


def _model_config(section: Any) -> ModelConfig:
    """`model:` holds named sizes (`encoder`, `decoder`, default B) plus any ModelConfig field."""
    if not isinstance(section, dict):
        raise ConfigError(f"model={section!r}: must be a mapping (encoder, decoder, field overrides)")
    fields = dict(section)
    try:
        return model_config(fields.pop("encoder", "B"), fields.pop("decoder", "B"), **fields)
    except ConfigError as error:
        raise ConfigError(f"model: {error}") from None


def _check_data(section: Any) -> dict[str, Any]:
    allowed = {"synthetic": {"kind", "num_images", "seed"}, "python": {"kind", "source", "options"}}
    kind = section.get("kind") if isinstance(section, dict) else None
    check_choice("data.kind", kind, tuple(sorted(allowed)), ConfigError)
    unknown = sorted(set(section) - allowed[kind])
    if unknown:
        raise ConfigError(f"data: unknown keys {unknown} for kind {kind}; known: {sorted(allowed[kind])}")
    if kind == "synthetic":
        if not has_type(section.get("num_images"), int) or section["num_images"] <= 0:
            raise ConfigError(f"data.num_images={section.get('num_images')!r}: must be a positive integer")
        seed = section.get("seed", 0)
        if not has_type(seed, int):
            raise ConfigError(f"data.seed={seed!r}: must be of type int")
    else:
        source = section.get("source")
        if not isinstance(source, str) or source.count(":") != 1:
            raise ConfigError(f"data.source={source!r}: must be 'module:function'")
        if not isinstance(section.get("options", {}), dict):
            raise ConfigError(f"data.options={section['options']!r}: must be a mapping")
    return dict(section)


def load_config(path: str | Path) -> TrainConfig:
    """Read a YAML or JSON config file (by its suffix) and validate it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    return TrainConfig.from_dict(values)


def build_schedule(section: dict[str, Any], global_batch: int, world_size: int) -> LRSchedule:
    """`schedule:` is either {preset: unite_b, images_per_epoch: N} or the four LRSchedule
    fields in optimizer steps (warmup_steps, hold_until_step, decay_until_step, final_lr_factor)."""
    if not isinstance(section, dict):
        raise ConfigError(f"schedule={section!r}: must be a mapping")
    if "preset" in section:
        if section["preset"] != "unite_b" or set(section) != {"preset", "images_per_epoch"}:
            raise ConfigError(
                f"schedule={section}: a preset takes exactly {{preset: unite_b, images_per_epoch: N}}"
            )
        images = section["images_per_epoch"]
        if not has_type(images, int) or images <= 0:
            raise ConfigError(f"schedule.images_per_epoch={images!r}: must be a positive integer")
        try:
            return unite_b_schedule(images, global_batch, world_size)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    names = [f.name for f in dataclasses.fields(LRSchedule)]
    if set(section) != set(names):
        raise ConfigError(f"schedule={section}: needs exactly the keys {names} (or a preset)")
    _check_scalar_types(LRSchedule, section, prefix="schedule.")
    try:
        return LRSchedule(**section)
    except ValueError as error:
        raise ConfigError(str(error)) from None


@dataclass(frozen=True)
class Recipe:
    """What a run trains with on a given world size. The global batch, peak learning rate and
    schedule in optimizer steps are the same on every world size that can split the batch; only
    how each rank splits its share into micro-batches differs."""

    global_batch: int        # images per optimizer step, all ranks
    per_device_batch: int    # images per micro-batch on one rank (derived)
    accumulation: int        # micro-batches per optimizer step on each rank
    peak_lr: float           # scaled_lr(base_lr, global_batch)
    schedule: LRSchedule     # in optimizer steps


def recipe_for(cfg: TrainConfig, world_size: int) -> Recipe:
    """The recipe of `cfg` on `world_size` ranks: each rank takes global_batch / world_size
    images a step, in micro-batches of the largest divisor of that share that is at most
    cfg.per_device_batch. A cap that divides the share is the micro-batch itself, so a setting
    where per_device_batch x world_size divides global_batch keeps that micro-batch and
    accumulation. Raises ConfigError when the world size cannot split the global batch
    (`check_world_size`)."""
    check_world_size(cfg, world_size)
    share = cfg.global_batch // world_size
    micro = max(size for size in range(1, min(share, cfg.per_device_batch) + 1) if share % size == 0)
    return Recipe(
        global_batch=cfg.global_batch,
        per_device_batch=micro,
        accumulation=share // micro,
        peak_lr=scaled_lr(cfg.base_lr, cfg.global_batch),
        schedule=build_schedule(cfg.schedule, cfg.global_batch, world_size),
    )


def check_world_size(cfg: TrainConfig, world_size: int, key: str = "world_size", prefix: str = "") -> None:
    """Refuse, before anything starts, a world size that cannot split the global batch: every
    rank takes the same whole number of images per step, and the unite_b schedule (the
    reference's 2 micro-batches per rank) needs a multiple of 2 x world_size. `prefix` and `key`
    name the setting as the user wrote it (`train.` and `nproc_per_node` in params.yaml)."""
    if world_size < 1:
        raise ConfigError(f"{prefix}{key}={world_size}: must be >= 1")
    parts = 2 if "preset" in cfg.schedule else 1  # the unite_b preset splits each rank's share in two
    unit = parts * world_size
    if cfg.global_batch % unit == 0:
        return
    batch = f"{prefix}global_batch={cfg.global_batch}"
    rule = (f"the unite_b schedule counts epochs in micro-batches of global_batch / (2 x {world_size}) images, "
            f"as the reference splits it, so it must be a multiple of {unit}" if parts == 2 else
            f"every rank takes the same number of images, so the global batch must be a multiple of {world_size}")
    valid = [count for count in range(1, cfg.global_batch + 1) if cfg.global_batch % (parts * count) == 0]
    nearest = [c for c in valid if c < world_size][-1:] + [c for c in valid if c > world_size][:1]
    raise ConfigError(
        f"{prefix}{key}={world_size}: {batch} cannot be split over {world_size} processes (GPUs): {rule}; "
        f"use {' or '.join(map(str, nearest))} processes (any number that divides "
        f"{cfg.global_batch // parts}) or another {prefix}global_batch"
    )
