"""params.yaml for the stages: read it and validate every section before any work starts.

Each error names the key (as `section.key`), the value and the rule.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from unite.config import ConfigError
from unite.options import (FEATURE_SPACES, NORM_ORDERS, PROTOCOLS, SEARCH_METRICS, SHARD_STORES, SOLVERS, check_choice,
                           check_interval, has_type)

if TYPE_CHECKING:
    from unite.train_config import TrainConfig

PARAMS_FILE = Path("params.yaml")

# Stage-level train keys; every other train key goes to unite.train_config.TrainConfig.
TRAIN_STAGE_KEYS = {"nproc_per_node": int, "hflip": bool, "num_workers": int}

SCHEMA: dict[str, dict[str, Any]] = {
    "demo_data": {"image_size": int, "val_fraction": float, "seed": int},
    "manifest": {"root": str},
    "shard": {"image_size": int, "shard_size": int, "store": str, "png_level": int, "workers": int,
              "seed": int, "strict": bool},
    "fid_ref": {"feature_space": str, "stats": (str, None), "reference_batch": (str, None), "split": str,
                "set_images": int, "inception_weights": (str, None), "batch_size": int},
    "sweep": {"nproc_per_node": int, "num_images": int, "seed": int, "start_scale": float, "step": float,
              "max_extra_steps": int, "interval": list, "norm_order": str, "solver": str, "steps": int,
              "block_size": int, "wide": list, "wide_changes_choice": bool, "metric": str, "kid_subsets": int,
              "kid_subset_size": int},
    "evaluate": {"nproc_per_node": int, "protocol": str, "num_images": int, "seed": int, "solver": str, "steps": int,
                 "block_size": int, "grid_per_class": int, "recon_images": int, "class_consistency": bool,
                 "lpips": bool, "kid_subsets": int, "kid_subset_size": int},
    # not a stage: how `python -m stages.slurm submit` asks Slurm for the pipeline's job
    "slurm": {"nodes": int, "tasks_per_node": int, "gpus_per_node": int, "cpus_per_task": (int, None), "time": str,
              "partition": (str, None), "signal_seconds": int, "max_requeues": int, "sbatch_args": list},
}
CHOICES = {
    ("shard", "store"): SHARD_STORES,
    ("fid_ref", "feature_space"): FEATURE_SPACES,
    ("fid_ref", "split"): ("train", "val"),
    ("sweep", "norm_order"): NORM_ORDERS,
    ("sweep", "solver"): SOLVERS,
    ("sweep", "metric"): SEARCH_METRICS,
    ("evaluate", "protocol"): PROTOCOLS,
    ("evaluate", "solver"): SOLVERS,
}
# Keys that were dropped, and what replaces each: a file that still sets one is refused with this.
RETIRED = {
    ("sweep", "search_set"): "retired: evaluate.protocol replaces it (reference: search on evaluate's images, "
                             "as the reference does)",
}


def _type_name(expected: Any) -> str:
    if isinstance(expected, tuple):
        return " or ".join(_type_name(e) for e in expected)
    return "null" if expected is None else expected.__name__


def _check_section(name: str, section: Any, schema: dict[str, Any]) -> None:
    if not isinstance(section, dict):
        raise ConfigError(f"{name}: expected a mapping, got {section!r}")
    for key in section:
        if (name, key) in RETIRED:
            raise ConfigError(f"{name}.{key}={section[key]!r}: {RETIRED[(name, key)]}")
    unknown = sorted(set(section) - set(schema))
    if unknown:
        raise ConfigError(f"{name}: unknown keys {unknown}; known keys: {sorted(schema)}")
    for key, expected in schema.items():
        if key not in section:
            raise ConfigError(f"{name}.{key}: required key is missing")
        value = section[key]
        if not has_type(value, expected):
            raise ConfigError(f"{name}.{key}={value!r}: must be {_type_name(expected)}")
        if (name, key) in CHOICES:
            check_choice(f"{name}.{key}", value, CHOICES[(name, key)], ConfigError)


def _check_wide_point(key: str, point: Any) -> None:
    """One point of the wider CFG sweep: {norm_order: ..., interval: [low, high]}."""
    if not isinstance(point, dict) or set(point) != {"norm_order", "interval"}:
        raise ConfigError(f"{key}={point!r}: must be a mapping with exactly the keys norm_order and interval")
    check_choice(f"{key}.norm_order", point["norm_order"], NORM_ORDERS, ConfigError)
    check_interval(f"{key}.interval", point["interval"], ConfigError)


def _check_sweep_kid(sweep: dict[str, Any], evaluate: dict[str, Any]) -> None:
    """KID subsets that the images the search scores can fill: the sweep's own, or evaluate's under
    the reference protocol."""
    from unite.evaluation import EvaluationProtocol  # the protocol's rule, read only for a search by KID

    protocol = EvaluationProtocol.named(evaluate["protocol"])
    key = f"{'evaluate' if protocol.search_on_reported else 'sweep'}.num_images"
    count = protocol.search_images({"sweep": sweep, "evaluate": evaluate})["num_images"]
    if sweep["kid_subsets"] < 1 or not 2 <= sweep["kid_subset_size"] <= count:
        raise ConfigError(
            f"sweep.kid_subsets={sweep['kid_subsets']}, sweep.kid_subset_size={sweep['kid_subset_size']} with "
            f"sweep.metric=kernel_distance: need kid_subsets >= 1 and 2 <= kid_subset_size <= {key}={count} (the "
            f"images each point is scored on); lower sweep.kid_subset_size")


def train_config(section: dict[str, Any], out_dir: str, data: dict[str, Any]) -> "TrainConfig":
    """The trainer's config from the train section (stage-level keys removed)."""
    from unite.train_config import TrainConfig  # the trainer's code only where the train section is read

    values = {k: v for k, v in section.items() if k not in TRAIN_STAGE_KEYS}
    return TrainConfig.from_dict({**values, "out_dir": out_dir, "data": data})


def _check_train(train: Any, shard_image_size: int | None) -> None:
    from unite.train_config import check_world_size

    if not isinstance(train, dict):
        raise ConfigError(f"train: expected a mapping, got {train!r}")
    model = train.get("model")
    if isinstance(model, dict) and "lpips_random_backbone" in model:
        raise ConfigError(
            f"train.model.lpips_random_backbone={model['lpips_random_backbone']!r}: not a params.yaml key: a random "
            "VGG16 trunk is for the library's tests, and no metric would record it; remove the key and put the "
            "official vgg16-397923af.pth in $TORCH_HOME/hub/checkpoints (or set train.model.perceptual_weight: 0)"
        )
    for key, expected in TRAIN_STAGE_KEYS.items():
        if key not in train:
            raise ConfigError(f"train.{key}: required key is missing")
        if not has_type(train[key], expected):
            raise ConfigError(f"train.{key}={train[key]!r}: must be {_type_name(expected)}")
    try:
        cfg = train_config(train, out_dir="checkpoints", data={"kind": "synthetic", "num_images": 1, "seed": 0})
    except ConfigError as error:
        raise ConfigError(f"train.{error}") from None
    # The stage runs on one node: its world size is nproc_per_node (the trainer checks again on many).
    check_world_size(cfg, train["nproc_per_node"], key="nproc_per_node", prefix="train.")
    if shard_image_size is not None and cfg.model.image_size != shard_image_size:
        raise ConfigError(
            f"train.model.image_size={cfg.model.image_size}: must equal shard.image_size="
            f"{shard_image_size} (the shards hold images of that size)"
        )


def validate(params: Any, sections: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Check the file's sections and validate the named ones (all by default)."""
    if not isinstance(params, dict):
        raise ConfigError(f"{PARAMS_FILE}: expected a mapping of stage sections")
    known = set(SCHEMA) | {"train"}
    unknown = sorted(set(params) - known)
    missing = sorted(known - set(params))
    if unknown:
        raise ConfigError(f"{PARAMS_FILE}: unknown sections {unknown}; known sections: {sorted(known)}")
    if missing:
        raise ConfigError(f"{PARAMS_FILE}: missing sections {missing}")
    sections = tuple(known) if sections is None else sections
    for name in sections:
        if name in SCHEMA:
            _check_section(name, params[name], SCHEMA[name])
    for name in {"sweep", "evaluate"} & set(sections):
        if params[name]["nproc_per_node"] < 1:
            raise ConfigError(f"{name}.nproc_per_node={params[name]['nproc_per_node']}: must be >= 1")
    if "fid_ref" in sections and params["fid_ref"]["set_images"] < 0:
        raise ConfigError(f"fid_ref.set_images={params['fid_ref']['set_images']}: must be >= 0 (0: no KID, "
                          f"precision or recall)")
    if "evaluate" in sections:
        evaluate = params["evaluate"]
        if evaluate["kid_subsets"] < 1 or not 2 <= evaluate["kid_subset_size"] <= evaluate["num_images"]:
            raise ConfigError(
                f"evaluate.kid_subsets={evaluate['kid_subsets']}, evaluate.kid_subset_size="
                f"{evaluate['kid_subset_size']}: need kid_subsets >= 1 and 2 <= kid_subset_size <= "
                f"evaluate.num_images={evaluate['num_images']}; lower kid_subset_size")
    if "sweep" in sections:
        check_interval("sweep.interval", params["sweep"]["interval"], ConfigError)
        for number, point in enumerate(params["sweep"]["wide"]):
            _check_wide_point(f"sweep.wide[{number}]", point)
        if params["sweep"]["metric"] == "kernel_distance":
            _check_sweep_kid(params["sweep"], params["evaluate"])
    if "train" in sections:
        _check_train(params["train"], params["shard"]["image_size"] if "shard" in sections else None)
    return params


# The params.yaml sections each stage reads, as dvc.yaml declares them (tests/test_dvc_deps.py
# checks the two agree): a stage validates these only, so it runs none of the other stages' code.
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "demo_data": ("demo_data",),
    "manifest": ("manifest",),
    "shard": ("manifest", "shard"),
    "fid_ref": ("fid_ref",),
    "train": ("train", "shard"),
    "sweep": ("sweep", "fid_ref", "evaluate"),
    "evaluate": ("evaluate", "fid_ref"),
    "report": ("demo_data", "manifest", "shard", "fid_ref", "train", "sweep", "evaluate"),  # shows them all
}


def _read(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"{path}: not found (run the stages from the repository root)")
    return yaml.safe_load(path.read_text())


def load_params(path: Path = PARAMS_FILE) -> dict[str, Any]:
    """All sections of params.yaml, validated."""
    return validate(_read(path))


def load_stage_params(stage: str, path: Path = PARAMS_FILE) -> dict[str, Any]:
    """The sections `stage` reads, validated; reading any other section is a KeyError."""
    sections = STAGE_SECTIONS[stage]
    params = validate(_read(path), sections)
    return {name: params[name] for name in sections}
