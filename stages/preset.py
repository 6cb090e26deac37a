"""Apply a recipe from presets/ to params.yaml: `python -m stages.preset unite-b` (or unite-l).

Each key of a preset section replaces that key of params.yaml (a nested mapping such as
train.model is replaced whole); everything else, comments included, stays. A preset may start from
another (`extends: unite-b`). The result is validated, and `dvc params diff` shows the change.
"""

import argparse
import io
from pathlib import Path

from ruamel.yaml import YAML

from stages.params import PARAMS_FILE, validate

PRESETS = Path("presets")


def apply_preset(name: str, params_file: Path = PARAMS_FILE) -> list[str]:
    """Rewrite params_file with the preset applied; returns the changed keys."""
    preset_file(name)  # an unknown preset is named before params_file is read
    yaml = YAML()
    yaml.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    params = yaml.load(params_file.read_text())
    changed = _apply(name, params)
    validate(YAML(typ="safe").load(_dump(yaml, params)))
    params_file.write_text(_dump(yaml, params))
    return changed


def preset_params(name: str, params_file: Path = PARAMS_FILE, presets: Path = PRESETS) -> dict:
    """The params `apply_preset` would write, validated, without writing them."""
    params = YAML(typ="safe").load(params_file.read_text())
    _apply(name, params, presets)
    return validate(params)


def preset_file(name: str, presets: Path = PRESETS) -> Path:
    """presets/NAME.yaml, or SystemExit naming the known presets."""
    path = presets / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in presets.glob("*.yaml"))
        raise SystemExit(f"preset {name!r}: no {path}; known presets: {known}")
    return path


def _apply(name: str, params: dict, presets: Path = PRESETS) -> list[str]:
    """Each key of the preset's sections replaces that key of `params`; returns the changed keys."""
    path = preset_file(name, presets)
    changed = []
    for section, values in load_preset(path).items():
        if section not in params:
            raise SystemExit(f"{path}: unknown section {section!r}")
        for key, value in values.items():
            if params[section].get(key) != value:
                params[section][key] = value
                changed.append(f"{section}.{key}")
    return changed


def load_preset(preset_file: Path) -> dict:
    """A preset's sections. `extends: NAME` starts from presets/NAME.yaml and merges this file
    into it mapping by mapping (so `train: {model: {flow_steps_per_recon: 14}}` changes one key)."""
    preset = YAML(typ="safe").load(preset_file.read_text()) or {}
    base = preset.pop("extends", None)
    if base is None:
        return preset
    base_file = preset_file.parent / f"{base}.yaml"
    if not base_file.is_file():
        raise SystemExit(f"{preset_file}: extends {base!r}, but there is no {base_file}")
    return merge_params(load_preset(base_file), preset)


def merge_params(base: dict, changes: dict) -> dict:
    """`changes` written into `base` key by key, nested mappings merged rather than replaced."""
    for key, value in changes.items():
        base[key] = merge_params(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return base


def _dump(yaml: YAML, data) -> str:
    stream = io.StringIO()
    yaml.dump(data, stream)
    return stream.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", help="name of a file in presets/, e.g. unite-b")
    changed = apply_preset(parser.parse_args().preset)
    print(f"{PARAMS_FILE}: {len(changed)} keys changed: {', '.join(changed)}")


if __name__ == "__main__":
    main()
