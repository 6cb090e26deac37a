"""`unite generate`: the same images from one process and from two torchrun ranks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import perturb_, small_config
from unite.model import UNITE

BIN = Path(sys.executable).parent


def export(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    cfg = small_config()
    model = UNITE(cfg)
    perturb_(model)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps({"model_config": cfg.to_dict()}))
    return path


def test_generate_is_the_same_on_one_or_two_ranks(tmp_path):
    model = export(tmp_path)
    args = [str(model), "--num-images", "6", "--seed", "3", "--cfg-scale", "2.0", "--solver", "euler", "--steps", "3",
            "--block-size", "2", "--device", "cpu"]
    single = subprocess.run([str(BIN / "unite"), "generate", *args, "--out", str(tmp_path / "one"),
                             "--npz", str(tmp_path / "one.npz"), "--grid", str(tmp_path / "grid.png"),
                             "--grid-per-class", "1"], capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    split = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "unite.cli",
                            "generate", *args, "--out", str(tmp_path / "two")], capture_output=True, text=True,
                           timeout=300)
    assert split.returncode == 0, split.stderr
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == [f"{i:06d}.png" for i in range(6)]
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir())
    for name in names:
        assert np.array_equal(np.asarray(Image.open(tmp_path / "one" / name)), np.asarray(Image.open(tmp_path / "two" / name)))
    with np.load(tmp_path / "one.npz") as data:
        assert data.files == ["arr_0"] and data["arr_0"].shape == (6, 32, 32, 3) and data["arr_0"].dtype == np.uint8
    assert Image.open(tmp_path / "grid.png").size == (1 * 34, 10 * 34)
