"""The one type rule for config values that unite/config.py, unite/train_config.py and params.yaml share."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from stages.params import load_stage_params
from unite.config import ConfigError, model_config
from unite.options import has_type
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
