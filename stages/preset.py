"""Apply a recipe from presets/ to params.yaml: `python -m stages.preset unite-b` (or unite-l).

Each key of a preset section replaces that key of params.yaml (a nested mapping such as
train.model is replaced whole), with the preset's comment on it where the preset has one; every
other key and comment stays, and the file's header names the preset. A preset may start from
another (`extends: unite-b`). The result is validated, and `dvc params diff` shows the change.
A preset that reads another image folder also drops the demo's data stage from dvc.yaml, so
`dvc repro` does not write the digits.
"""

import argparse
import copy
import io
from pathlib import Path

from ruamel.yaml import YAML
from ruamel.yaml.representer import RoundTripRepresenter

from stages.params import PARAMS_FILE, validate

PRESETS = Path("presets")
DVC_FILE = Path("dvc.yaml")
DEMO_STAGE = "demo_data"


def apply_preset(name: str, params_file: Path = PARAMS_FILE) -> list[str]:
    """Rewrite params_file with the preset applied; returns the changed keys."""
    preset_file(name)  # an unknown preset is named before params_file is read
    yaml = _round_trip()
    params = yaml.load(params_file.read_text())
    changed = _apply(name, params, yaml=yaml)
    text = _dump(yaml, params)
    validate(YAML(typ="safe").load(text))
    header = (f"# Every knob of every stage, one section per stage: presets/{name}.yaml applied by\n"
              f"# `python -m stages.preset {name}`; `dvc params diff` shows what it changed.\n\n")
    body = text.splitlines(keepends=True)
    while body and (body[0].startswith("#") or not body[0].strip()):  # the old header
        body.pop(0)
    params_file.write_text(header + "".join(body))
    return changed


def drop_demo_stage(root: str, dvc_file: Path = DVC_FILE) -> bool:
    """Remove the demo's data stage from dvc_file, with the manifest stage's dep on the folder it
    writes, when the manifest lists another folder (`root`); returns whether it did."""
    yaml = YAML()
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)
    pipeline = yaml.load(dvc_file.read_text())
    stages = pipeline["stages"]
    if DEMO_STAGE not in stages or root in stages[DEMO_STAGE]["outs"]:
        return False
    for out in stages[DEMO_STAGE]["outs"]:
        if out in stages["manifest"]["deps"]:
            stages["manifest"]["deps"].remove(out)
    del stages[DEMO_STAGE]
    dvc_file.write_text(_dump(yaml, pipeline))
    return True


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


def _apply(name: str, params: dict, presets: Path = PRESETS, yaml: YAML | None = None) -> list[str]:
    """Each key of the preset's sections replaces that key of `params` (and its comment, when both
    were read by the round-trip `yaml`); returns the changed keys."""
    path = preset_file(name, presets)
    changed = []
    for section, values in load_preset(path, yaml).items():
        if section not in params:
            raise SystemExit(f"{path}: unknown section {section!r}")
        for key, value in values.items():
            if params[section].get(key) != value:
                params[section][key] = value
                _copy_comment(values, params[section], key)
                changed.append(f"{section}.{key}")
    return changed


def load_preset(preset_file: Path, yaml: YAML | None = None) -> dict:
    """A preset's sections, read by `yaml` (default: plain values, no comments). `extends: NAME`
    starts from presets/NAME.yaml and merges this file into it mapping by mapping (so
    `train: {model: {flow_steps_per_recon: 14}}` changes one key)."""
    preset = (yaml or YAML(typ="safe")).load(preset_file.read_text()) or {}
    base = preset.pop("extends", None)
    if base is None:
        return preset
    base_file = preset_file.parent / f"{base}.yaml"
    if not base_file.is_file():
        raise SystemExit(f"{preset_file}: extends {base!r}, but there is no {base_file}")
    return merge_params(load_preset(base_file, yaml), preset)


def merge_params(base: dict, changes: dict) -> dict:
    """A copy of `base` with `changes` written in key by key, nested mappings merged rather than
    replaced (and comments carried, for round-trip mappings). Neither argument is changed, nor
    shares a mapping with the result."""
    merged = copy.deepcopy(base)
    for key, value in changes.items():
        nested = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = merge_params(merged[key], value) if nested else copy.deepcopy(value)
        _copy_comment(changes, merged, key)
    return merged


def _copy_comment(source, target, key: str) -> None:
    """The comment on `key` in a round-trip mapping, onto the same key of another (if it has one)."""
    comment = getattr(source, "ca", None) and source.ca.items.get(key)
    if not (comment and hasattr(target, "ca")):
        return
    old = target.ca.items.get(key)
    if old and old[2] and comment[2]:  # keep the target's comment column, continuation lines too
        first, *rest = comment[2].value.split("\n")
        comment[2].value = "\n".join([first, *(" " * old[2].column + line.lstrip() if line.strip() else line
                                               for line in rest)])
        comment[2].column = old[2].column
    target.ca.items[key] = comment


class _NullRepresenter(RoundTripRepresenter):
    """Writes None as `null` (ruamel's default writes nothing), in params.yaml only: dvc.yaml's
    `params.yaml:` must stay as it is."""


_NullRepresenter.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))


def _round_trip() -> YAML:
    """A YAML that keeps comments and writes null as `null`."""
    yaml = YAML()
    yaml.Representer = _NullRepresenter
    yaml.width = 4096
    return yaml


def _dump(yaml: YAML, data) -> str:
    stream = io.StringIO()
    yaml.dump(data, stream)
    return stream.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", help="name of a file in presets/, e.g. unite-b")
    name = parser.parse_args().preset
    changed = apply_preset(name)
    print(f"{PARAMS_FILE}: {len(changed)} keys changed: {', '.join(changed)}")
    root = YAML(typ="safe").load(PARAMS_FILE.read_text())["manifest"]["root"]
    if drop_demo_stage(root):
        print(f"{DVC_FILE}: stage {DEMO_STAGE} dropped (the manifest lists {root}, not the digits)")


if __name__ == "__main__":
    main()
