"""params.yaml: validation before any work, and the ImageNet presets."""

from __future__ import annotations

import copy
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from stages.params import load_params, validate
from stages.preset import apply_preset, merge_params
from stages.preset import main as preset_main
from unite.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(path.stem for path in (ROOT / "presets").glob("*.yaml"))
COMMENT = re.compile(r"(?:^|\s)#\s*(.*)$")  # no value in these files holds a '#'


@pytest.fixture()
def params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_the_committed_params_are_valid():
    assert load_params(ROOT / "params.yaml")["train"]["model"]["encoder"] == "Tiny"


@pytest.mark.parametrize(
    "path, value, text",
    [
        (("sweep", "seeed"), 1, "sweep: unknown keys ['seeed']"),
        (("shard", "image_size"), "16", "shard.image_size='16': must be int"),
        (("sweep", "solver"), "rk4", "sweep.solver='rk4': must be one of"),
        (("train", "global_batch"), 0, "train.global_batch=0: must be a positive integer"),
        (("train", "nproc_per_node"), 3, "train.nproc_per_node=3: train.global_batch=128 cannot be split over 3"),
        (("train", "nproc_per_node"), 0, "train.nproc_per_node=0: must be >= 1"),
        (("train", "lr"), 0.1, "unknown config keys ['lr']"),
        (("sweep", "interval"), [0.5, 0.2], "sweep.interval=[0.5, 0.2]"),
        (("evaluate", "nproc_per_node"), 0, "evaluate.nproc_per_node=0: must be >= 1"),
        (("evaluate", "protocol"), "reported", "evaluate.protocol='reported': must be one of ['separate', 'reference']"),
        (("sweep", "search_set"), "reported",
         "sweep.search_set='reported': retired: evaluate.protocol replaces it"),
        (("sweep", "wide"), [[0.0, 1.0]],
         "sweep.wide[0]=[0.0, 1.0]: must be a mapping with exactly the keys norm_order and interval"),
        (("sweep", "wide"),
         [{"norm_order": "cfg_first", "interval": [0.1, 1.0]}, {"norm_order": "last", "interval": [0.0, 1.0]}],
         "sweep.wide[1].norm_order='last': must be one of ['norm_first', 'cfg_first', 'both']"),
        (("sweep", "wide"), [{"norm_order": "cfg_first", "interval": [0.2, 0.1]}],
         "sweep.wide[0].interval=[0.2, 0.1]: must be [low, high] with 0 <= low < high <= 1"),
        (("sweep", "wide_changes_choice"), "no", "sweep.wide_changes_choice='no': must be bool"),
        (("sweep", "metric"), "kid",
         "sweep.metric='kid': must be one of ['frechet_distance', 'kernel_distance']"),
        (("demo_data",), None, "demo_data: expected a mapping"),
        # A random VGG16 trunk is for tests (set in TrainConfig): no metric would record it.
        (("train", "model", "lpips_random_backbone"), True,
         "train.model.lpips_random_backbone=True: not a params.yaml key: a random VGG16 trunk is for the library's"),
        (("fid_ref", "split"), "test", "fid_ref.split='test': must be one of ['train', 'val']"),
        (("fid_ref", "set_images"), -1, "fid_ref.set_images=-1: must be >= 0"),
        (("evaluate", "kid_subset_size"), 1001,
         "evaluate.kid_subset_size=1001: need kid_subsets >= 1 and 2 <= kid_subset_size <= evaluate.num_images=1000"),
    ],
)
def test_bad_params_name_the_key(params, path, value, text):
    bad = copy.deepcopy(params)
    section = bad
    for key in path[:-1]:
        section = section[key]
    section[path[-1]] = value
    with pytest.raises(ConfigError) as error:
        validate(bad)
    assert text in str(error.value)


@pytest.mark.parametrize("protocol, images", [("separate", "sweep.num_images=200"),
                                              ("reference", "evaluate.num_images=150")])
def test_kid_subsets_of_the_sweep_fit_the_images_it_searches(params, protocol, images):
    """Only a search by KID needs them; the images are the sweep's own, or evaluate's under the
    reference protocol."""
    params["sweep"].update(num_images=200, kid_subset_size=180)
    params["evaluate"].update(protocol=protocol, num_images=150, kid_subset_size=100)
    fits = protocol == "separate"
    validate(params)  # frechet_distance: the KID keys are not used
    params["sweep"]["metric"] = "kernel_distance"
    if fits:
        validate(params)
        params["sweep"]["kid_subset_size"] = 201
    with pytest.raises(ConfigError) as error:
        validate(params)
    assert (f"sweep.kid_subset_size={params['sweep']['kid_subset_size']} with sweep.metric=kernel_distance: need "
            f"kid_subsets >= 1 and 2 <= kid_subset_size <= {images}") in str(error.value)


def test_model_and_shard_sizes_must_agree(params):
    params["shard"]["image_size"] = 32
    with pytest.raises(ConfigError, match="train.model.image_size=16: must equal shard.image_size=32"):
        validate(params)


# UNITE-L takes 32 images per GPU where B takes the paper's 64: 64 does not fit an H200 (the dry run).
@pytest.mark.parametrize("preset, encoder, steps, per_gpu", [("unite-b", "B", 300240, 64), ("unite-l", "L", 150120, 32)])
def test_presets_switch_to_the_imagenet_recipe(tmp_path, monkeypatch, preset, encoder, steps, per_gpu):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(ROOT / "presets", tmp_path / "presets")
    monkeypatch.chdir(tmp_path)
    changed = apply_preset(preset, Path("params.yaml"))
    assert "train.model" in changed
    result = load_params(Path("params.yaml"))
    train = result["train"]
    assert train["model"]["encoder"] == encoder and train["max_steps"] == steps
    assert train["global_batch"] == 1024 and train["per_device_batch"] == per_gpu and train["nproc_per_node"] == 8
    assert result["evaluate"]["num_images"] == 50000 and result["fid_ref"]["feature_space"] == "inception"
    reference_wide = [("norm_first", [0.0, 1.0]), ("norm_first", [0.05, 1.0]), ("norm_first", [0.15, 1.0]),
                      ("norm_first", [0.2, 1.0]), ("cfg_first", [0.1, 1.0])]  # the reference's wider sweep
    assert [(p["norm_order"], p["interval"]) for p in result["sweep"]["wide"]] == reference_wide
    assert result["sweep"]["wide_changes_choice"] is False
    text = Path("params.yaml").read_text()
    assert "# Every knob of every stage" in text and "inception_weights: null" in text  # comments and nulls kept
    assert apply_preset(preset, Path("params.yaml")) == []  # applying twice changes nothing


def test_unknown_preset(tmp_path, monkeypatch):
    shutil.copytree(ROOT / "presets", tmp_path / "presets")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="known presets: \\['unite-b', 'unite-b-release', 'unite-l', 'unite-l-release'\\]"):
        apply_preset("unite-xl")


@pytest.mark.parametrize("preset, base", [("unite-b-release", "unite-b"), ("unite-l-release", "unite-l")])
def test_release_presets_are_their_base_with_14_flow_draws(tmp_path, monkeypatch, preset, base):
    shutil.copytree(ROOT / "presets", tmp_path / "presets")
    monkeypatch.chdir(tmp_path)
    for name in (base, preset):
        shutil.copy(ROOT / "params.yaml", tmp_path / f"{name}.yaml")
        apply_preset(name, Path(f"{name}.yaml"))
    base_params, release = (load_params(Path(f"{name}.yaml")) for name in (base, preset))
    assert release["train"]["model"]["flow_steps_per_recon"] == 14  # the released checkpoints' K
    assert base_params["train"]["model"]["flow_steps_per_recon"] == 3  # the public config's K
    # Everything else is the base recipe: only the flow-draw keys differ.
    for params in (base_params, release):
        params["train"]["model"].pop("flow_steps_per_recon"), params["train"]["model"].pop("flow_mini_batch")
    assert release == base_params


def test_merging_params_changes_neither_argument():
    """Tests merge one set of shrunk params into many copies of params.yaml: a merge that wrote into
    (or shared a mapping with) an argument would carry one test's changes into the next."""
    base = {"train": {"max_steps": 10, "model": {"depth": 2}}, "sweep": {"steps": 4}}
    changes = {"train": {"model": {"depth": 3}}, "evaluate": {"seed": 1, "extra": {"a": 1}}}
    originals = copy.deepcopy((base, changes))
    merged = merge_params(base, changes)
    assert merged == {"train": {"max_steps": 10, "model": {"depth": 3}}, "sweep": {"steps": 4},
                      "evaluate": {"seed": 1, "extra": {"a": 1}}}
    assert (base, changes) == originals
    merged["evaluate"]["extra"]["a"] = 2
    merged["sweep"]["steps"] = 5
    assert (base, changes) == originals


def preset_chain(name: str) -> list[Path]:
    """presets/NAME.yaml and the files it extends."""
    path = ROOT / "presets" / f"{name}.yaml"
    base = yaml.safe_load(path.read_text()).get("extends")
    return [path, *(preset_chain(base) if base else [])]


@pytest.mark.parametrize("preset", PRESETS)
def test_a_preset_rewrites_the_comments_and_the_stages_it_changes(tmp_path, monkeypatch, capsys, preset):
    """After `python -m stages.preset NAME`, params.yaml's header names the preset, each comment of
    the preset's files is on its key, and no comment describes the demo any more (the demo_data
    section aside, whose stage leaves dvc.yaml); dvc.yaml loses that stage and the manifest's dep
    on its folder, and nothing else."""
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "presets", tmp_path / "presets")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["stages.preset", preset])
    preset_main()

    lines = Path("params.yaml").read_text().splitlines()
    assert f"presets/{preset}.yaml" in " ".join(line for line in lines if line.startswith("#"))
    section, about_the_demo = None, []
    for line in lines:
        if line[:1].isalpha():
            section = line.split(":")[0]
        comment = COMMENT.search(line)
        if comment and section != "demo_data" and re.search(r"\bdemo\b|digit", comment.group(1), re.IGNORECASE):
            about_the_demo.append(line)
    assert not about_the_demo, f"after the preset {preset}, params.yaml still describes the demo: {about_the_demo}"
    comments = {COMMENT.search(line).group(1) for line in lines if COMMENT.search(line)}
    unchanged = {line.split("#")[0].strip() for line in (ROOT / "params.yaml").read_text().splitlines()}
    for path in preset_chain(preset):
        for line in path.read_text().splitlines():
            setting = line.split("#")[0].strip()  # a key's own comment, where the preset changes the key
            if line[:1].isspace() and COMMENT.search(line) and setting and setting not in unchanged:
                assert COMMENT.search(line).group(1) in comments, f"{path.name}: {line.strip()!r} not in params.yaml"

    pipeline, expected = yaml.safe_load(Path("dvc.yaml").read_text()), yaml.safe_load((ROOT / "dvc.yaml").read_text())
    demo_outs = expected["stages"].pop("demo_data")["outs"]
    expected["stages"]["manifest"]["deps"] = [d for d in expected["stages"]["manifest"]["deps"] if d not in demo_outs]
    assert pipeline == expected
    assert "dvc.yaml: stage demo_data dropped" in capsys.readouterr().out
