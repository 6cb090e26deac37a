"""Reference checkpoints: loading, key translation, errors, and the `unite parity` command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unite.model import UNITE
from unite.parity import config_from_fixture
from unite.reference import ReferenceCheckpointError, load_reference_state_dict

UNITE_COMMAND = str(Path(sys.executable).parent / "unite")


def run_unite(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([UNITE_COMMAND, *args], capture_output=True, text=True, timeout=600)


def test_parity_fixture_reproduces(parity_fixture_path):
    result = run_unite("parity", str(parity_fixture_path))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["output", "max", "abs", "error"]
    for name in ["z", "recon", "cfg_out", "flow_loss", "samples_z", "samples_img_nocfg"]:
        assert any(line.split()[0] == name and line.endswith("ok") for line in lines), name
    assert lines[-1] == "11/11 outputs within tolerance"


def test_parity_reports_an_output_out_of_tolerance(parity_fixture, tmp_path):
    outputs = parity_fixture["outputs"]
    broken = dict(parity_fixture, outputs={
        "z": outputs["z"],
        "x_pred_cond": outputs["x_pred_cond"] + 3e-4,  # beyond the 1e-4 forward tolerance
        "flow_loss": outputs["flow_loss"],
    })
    path = tmp_path / "broken.pt"
    torch.save(broken, path)
    result = run_unite("parity", str(path))
    assert result.returncode == 1
    row = next(line for line in result.stdout.splitlines() if line.startswith("x_pred_cond"))
    assert row.endswith("FAIL") and float(row.split()[1]) == pytest.approx(3e-4, rel=0.05)
    assert "failed: x_pred_cond" in result.stdout


def test_parity_rejects_a_missing_file(tmp_path):
    result = run_unite("parity", str(tmp_path / "nope.pt"))
    assert result.returncode == 2 and "does not exist" in result.stdout


def fresh_model(fixture) -> UNITE:
    return UNITE(config_from_fixture(fixture["config"]))


def test_released_checkpoint_layout_selects_ema_or_model(parity_fixture):
    state = parity_fixture["state_dict"]
    shifted = {k: v + 1 if v.is_floating_point() and k == "latent_tokens" else v for k, v in state.items()}
    released = {"model": shifted, "ema": state, "step": 10, "current_best_cfg_scale": 3.4}
    model = fresh_model(parity_fixture)
    load_reference_state_dict(model, released)  # ema by default
    assert torch.equal(model.latent_pos, state["latent_tokens"])
    load_reference_state_dict(model, released, weights="model")
    assert torch.equal(model.latent_pos, state["latent_tokens"] + 1)


def test_wrapper_prefixes_and_lpips_keys_are_handled(parity_fixture, tmp_path):
    state = {f"module._orig_mod.{k}": v for k, v in parity_fixture["state_dict"].items()}
    state["perceptual_loss.lin0.model.1.weight"] = torch.zeros(1, 64, 1, 1)
    path = tmp_path / "ckpt.pt"
    torch.save({"ema": state}, path)
    model = fresh_model(parity_fixture)
    load_reference_state_dict(model, path)
    expected = parity_fixture["state_dict"]["encoder.blocks.3.adaLN_modulation.1.weight"]
    assert torch.equal(model.encoder.blocks[3].modulation.weight, expected)


def test_every_problem_is_named_in_one_message(parity_fixture):
    state = dict(parity_fixture["state_dict"])
    del state["encoder.blocks.0.attn.qkv.bias"]
    state["encoder.blocks.0.attn.extra.weight"] = torch.zeros(1)
    state["patch_embed.position_embeddings"] = torch.ones(1, 257, 64)
    with pytest.raises(ReferenceCheckpointError) as error:
        load_reference_state_dict(fresh_model(parity_fixture), state)
    message = str(error.value)
    assert "missing keys (1): encoder.blocks.0.attn.qkv.bias" in message
    assert "unexpected keys (1): encoder.blocks.0.attn.extra.weight" in message
    assert "patch_embed.position_embeddings: expected all zeros" in message


def test_a_checkpoint_of_another_size_reports_shape_mismatches(parity_fixture):
    cfg = config_from_fixture(dict(parity_fixture["config"], num_classes=20))
    with pytest.raises(ReferenceCheckpointError, match=r"encoder.label_embed.weight: checkpoint \(12, 64\) vs model \(22, 64\)"):
        load_reference_state_dict(UNITE(cfg), parity_fixture["state_dict"])


def test_missing_entries_and_files_are_errors(parity_fixture, tmp_path):
    with pytest.raises(ReferenceCheckpointError, match="no 'ema' entry"):
        load_reference_state_dict(fresh_model(parity_fixture), {"model": parity_fixture["state_dict"]})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_reference_state_dict(fresh_model(parity_fixture), tmp_path / "missing.pt")


def test_import_reference_writes_an_export_that_predicts_like_the_reference(parity_fixture, parity_fixture_path, tmp_path):
    from unite.evaluation import load_exported_model

    out = tmp_path / "ema.safetensors"
    # The fixture's model is this project's Tiny/Tiny size at the ImageNet geometry with 10 classes.
    result = run_unite("import-reference", str(parity_fixture_path), "--out", str(out), "--encoder", "Tiny",
                       "--decoder", "Tiny", "--num-classes", "10")
    assert result.returncode == 0, result.stderr
    model = load_exported_model(out, torch.device("cpu"))
    inputs = parity_fixture["inputs"]
    with torch.no_grad():
        got = model.predict(inputs["x_t"], inputs["t"], inputs["labels"], normalize=False)
    assert (got - parity_fixture["outputs"]["x_pred_cond"]).abs().max() < 1e-4


def test_import_reference_of_the_wrong_size_fails_clearly(parity_fixture_path, tmp_path):
    result = run_unite("import-reference", str(parity_fixture_path), "--out", str(tmp_path / "x.safetensors"),
                       "--encoder", "B", "--num-classes", "10")
    assert result.returncode != 0 and "shape mismatches" in result.stderr
    assert not (tmp_path / "x.safetensors").exists()
