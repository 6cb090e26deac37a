"""The one type rule for config values that unite/config.py, unite/train_config.py and params.yaml share."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from stages.params import load_stage_params
from unite.cfg_search import cfg_sweep
from unite.config import ConfigError, model_config
from unite.options import has_type
from unite.sampling import Guidance
from unite.train_config import TrainConfig


@pytest.mark.parametrize(
    "value, expected, result",
    [
        (3, int, True), (True, int, False), (3.0, int, False),
        (3, float, True), (2.5, float, True), (False, float, False),
        (True, bool, True), (1, bool, False),
        ("a", str, True), (True, str, False),
        (None, None, True), (0, None, False),
        (None, (str, None), True), ("x", (str, None), True), (True, (str, None), False),
        ([1], list, True), (True, dict, False),
    ],
)
def test_has_type_treats_bool_as_no_number(value, expected, result):
    assert has_type(value, expected) is result


ROOT = Path(__file__).resolve().parents[1]


def test_a_bool_count_is_refused_by_the_model_the_trainer_and_params_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"^num_classes=True: must be a positive integer$"):
        model_config("Tiny", "Tiny", num_classes=True)
    with pytest.raises(ConfigError, match=r"^log_every=True: must be of type int$"):
        TrainConfig.from_dict({"model": {"encoder": "Tiny", "decoder": "Tiny"},
                               "data": {"kind": "synthetic", "num_images": 4},
                               "out_dir": str(tmp_path), "max_steps": 1, "log_every": True})
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["shard"]["shard_size"] = True
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=r"^shard.shard_size=True: must be int$"):
        load_stage_params("shard", tmp_path / "params.yaml")


@pytest.mark.parametrize("interval", [[0.5, 0.2], [0.1], [-0.1, 0.5], [0.0, 1.5], [0.1, "1"], [True, 1.0]])
def test_one_interval_rule_for_guidance_the_cfg_search_and_params_yaml(tmp_path, interval):
    rule = r"must be \[low, high\] with 0 <= low < high <= 1$"
    with pytest.raises(ValueError, match=rf"^interval=.*: {rule}"):
        Guidance(2.0, tuple(interval))
    with pytest.raises(ValueError, match=rf"^cfg interval=.*: {rule}"):
        cfg_sweep(lambda *setting: 0.0, scales=[1.0], intervals=[tuple(interval)])
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["sweep"]["interval"] = interval
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=rf"^sweep.interval=.*: {rule}"):
        load_stage_params("sweep", tmp_path / "params.yaml")


def test_one_norm_order_rule_for_guidance_the_cfg_search_and_params_yaml(tmp_path):
    rule = r"must be one of \['norm_first', 'cfg_first', 'both'\]$"
    with pytest.raises(ValueError, match=rf"^norm_order='last': {rule}"):
        Guidance(2.0, norm_order="last")
    with pytest.raises(ValueError, match=rf"^norm_order='last': {rule}"):
        cfg_sweep(lambda *setting: 0.0, scales=[1.0], norm_orders=["last"])
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["sweep"]["norm_order"] = "last"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=rf"^sweep.norm_order='last': {rule}"):
        load_stage_params("sweep", tmp_path / "params.yaml")
