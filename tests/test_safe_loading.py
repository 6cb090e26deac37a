"""Files from elsewhere never run code: released reference checkpoints, parity fixtures, training
checkpoints to resume, Inception and VGG16 weights, statistics and image `.npz` files and shard
members load without unpickling arbitrary objects; a file that needs more is refused in one line,
or loaded after a warning where the user opts in."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from conftest import small_config
from test_data import SIZE, _epoch, make_folder, read_tar_samples
from test_train import train_config, train_values
from unite.checkpoint import load_checkpoint
from unite.cli import main as unite_main
from unite.config import ConfigError
from unite.data.loaders import shard_loader
from unite.data.manifest import write_manifest
from unite.data.shards import write_shards
from unite.evaluation import load_exported_model
from unite.model import UNITE
from unite.safe_load import UntrustedPickleError, load_torch_file
from unite.train import main as train_main
from unite.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

UNITE_COMMAND = str(Path(sys.executable).parent / "unite")


class RunsCode:
    """Unpickling this creates `marker`: what a tampered file does, in a form a test can see."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def run_unite(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([UNITE_COMMAND, *args], capture_output=True, text=True, timeout=600)


def reference_checkpoint(ema: dict[str, torch.Tensor], cfg_scale: float) -> dict:
    """A checkpoint laid out as the reference's save_checkpoint writes it: `model` and `ema` state
    dicts, AdamW and Muon state after one optimizer step, their LambdaLR schedulers, `step`,
    `epoch` and `current_best_cfg_scale`."""
    params = {name: nn.Parameter(t.clone()) for name, t in ema.items() if t.is_floating_point()}
    muon = torch.optim.Muon([p for p in params.values() if p.ndim == 2], lr=1e-4, momentum=0.95, nesterov=True,
                            eps=1e-6, adjust_lr_fn="match_rms_adamw", weight_decay=0.0)
    adamw = torch.optim.AdamW([p for p in params.values() if p.ndim != 2], lr=1e-4, betas=(0.9, 0.999), eps=1e-6,
                              weight_decay=0.0)

    def warmup(step: int) -> float:
        return min(1.0, (step + 1) / 20)

    schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, warmup) for opt in (adamw, muon)]
    generator = torch.Generator().manual_seed(0)
    for p in params.values():
        p.grad = torch.randn(p.shape, generator=generator) * 1e-3
    for optimizer, scheduler in zip((adamw, muon), schedulers):
        optimizer.step()
        scheduler.step()
    assert muon.state and adamw.state  # both hold per-parameter state after the step
    model = {name: params[name].detach() if name in params else t for name, t in ema.items()}
    return {"model": model, "ema": ema, "optimizer": adamw.state_dict(), "scheduler": schedulers[0].state_dict(),
            "optimizer_muon": muon.state_dict(), "scheduler_muon": schedulers[1].state_dict(),
            "step": 1, "epoch": 0, "current_best_cfg_scale": cfg_scale}


IMPORT_TINY = ("--encoder", "Tiny", "--decoder", "Tiny", "--num-classes", "10")  # the fixture's model


def assert_one_line_refusal(output: str, prefix: str, opt_in: str) -> None:
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    assert lines[0].startswith(prefix) and "refused to load" in lines[0], lines[0]
    assert "builtins.exec" in lines[0] and f"opt in with {opt_in}" in lines[0], lines[0]


# ------------------------------------------------------------------------------ reference checkpoints
@pytest.mark.parametrize("cfg_scale", [3.4, np.float64(3.4)], ids=["python-float", "numpy-float64"])
def test_import_reference_loads_a_released_checkpoint_without_the_opt_in(parity_fixture, tmp_path, cfg_scale):
    path, out = tmp_path / "released.pt", tmp_path / "ema.safetensors"
    torch.save(reference_checkpoint(parity_fixture["state_dict"], cfg_scale), path)
    result = run_unite("import-reference", str(path), "--out", str(out), *IMPORT_TINY)
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr
    model = load_exported_model(out, torch.device("cpu"))
    inputs = parity_fixture["inputs"]
    with torch.no_grad():
        got = model.predict(inputs["x_t"], inputs["t"], inputs["labels"], normalize=False)
    assert (got - parity_fixture["outputs"]["x_pred_cond"]).abs().max() < 1e-4


def test_import_reference_refuses_a_file_that_runs_code(parity_fixture, tmp_path):
    path, out, marker = tmp_path / "tampered.pt", tmp_path / "ema.safetensors", tmp_path / "marker"
    torch.save({"ema": parity_fixture["state_dict"], "step": 1, "payload": RunsCode(marker)}, path)
    refused = run_unite("import-reference", str(path), "--out", str(out), *IMPORT_TINY)
    assert refused.returncode == 2
    assert_one_line_refusal(refused.stderr, f"unite import-reference: error: {path}: ", "--trust-pickle")
    assert not marker.exists() and not out.exists()

    trusted = run_unite("import-reference", str(path), "--out", str(out), *IMPORT_TINY, "--trust-pickle")
    assert trusted.returncode == 0, trusted.stderr
    assert f"warning: fully unpickling {path} (--trust-pickle" in trusted.stderr
    assert marker.exists() and out.exists()


# ------------------------------------------------------------------------------ parity fixtures
def test_parity_refuses_a_fixture_that_runs_code(parity_fixture, tmp_path):
    path, marker = tmp_path / "tampered.pt", tmp_path / "marker"
    torch.save({**parity_fixture, "payload": RunsCode(marker)}, path)
    refused = run_unite("parity", str(path))
    assert refused.returncode == 2
    assert_one_line_refusal(refused.stdout, f"unite parity: {path}: ", "--trust-pickle")
    assert not marker.exists()

    # With the opt-in the file is unpickled (the marker appears) after a warning; this one holds
    # no outputs, so parity then stops at once.
    torch.save({"config": parity_fixture["config"], "payload": RunsCode(marker)}, path)
    trusted = run_unite("parity", str(path), "--trust-pickle")
    assert f"warning: fully unpickling {path} (--trust-pickle" in trusted.stderr
    assert marker.exists()
    assert trusted.returncode == 2 and "is not a parity fixture" in trusted.stdout


def test_only_the_allowlisted_numpy_scalar_loads(tmp_path):
    allowed, other = tmp_path / "float64.pt", tmp_path / "float32.pt"
    torch.save({"scale": np.float64(3.4), "weights": torch.ones(2)}, allowed)
    torch.save({"scale": np.float32(3.4)}, other)
    loaded = load_torch_file(allowed, "--trust-pickle")
    assert loaded["scale"] == np.float64(3.4) and type(loaded["scale"]) is np.float64
    with pytest.raises(UntrustedPickleError, match=r"wants to unpickle numpy\.dtypes\.Float32DType"):
        load_torch_file(other, "--trust-pickle")


# ------------------------------------------------------------------------------ training resume
def test_training_resume_refuses_a_checkpoint_that_runs_code(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("UNITE_TRUST_PICKLE", raising=False)
    run, marker, tampered = tmp_path / "run", tmp_path / "marker", tmp_path / "tampered.pt"
    first = train(train_config(run, max_steps=2))
    torch.save({**load_checkpoint(first.checkpoint), "payload": RunsCode(marker)}, tampered)
    config = tmp_path / "resume.yaml"
    config.write_text(yaml.safe_dump(train_values(run, max_steps=3, resume=str(tampered))))
    capsys.readouterr()

    assert train_main([str(config)]) == 2
    assert_one_line_refusal(capsys.readouterr().err, f"unite.train: error: {tampered}: ", "UNITE_TRUST_PICKLE=1")
    assert not marker.exists()

    monkeypatch.setenv("UNITE_TRUST_PICKLE", "1")
    assert train_main([str(config)]) == 0
    err = capsys.readouterr().err
    assert f"warning: fully unpickling {tampered} (UNITE_TRUST_PICKLE=1)" in err
    assert marker.exists() and f"resuming from {tampered} at step 2" in err


def test_the_trust_variable_takes_only_0_or_1(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    torch.save({"step": 1}, path)
    monkeypatch.setenv("UNITE_TRUST_PICKLE", "yes")
    with pytest.raises(ConfigError, match=r"UNITE_TRUST_PICKLE='yes': must be 1 \(trust pickled files\) or 0"):
        load_checkpoint(path)


# ------------------------------------------------------------------------------ weights files
def test_inception_weights_that_run_code_are_refused(tmp_path, capsys):
    weights, marker = tmp_path / "inception.pth", tmp_path / "marker"
    torch.save({"fc.weight": torch.zeros(1), "payload": RunsCode(marker)}, weights)
    (tmp_path / "gen").mkdir()
    assert unite_main(["fid", str(tmp_path / "gen"), str(tmp_path / "ref.npz"),
                       "--inception-weights", str(weights)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"unite fid: error: inception_weights: {weights}: refused")
    assert "builtins.exec" in lines[0] and not marker.exists()


def test_vgg16_weights_that_run_code_are_refused(tmp_path):
    weights, marker = tmp_path / "vgg16.pth", tmp_path / "marker"
    torch.save({"features.0.weight": torch.zeros(1), "payload": RunsCode(marker)}, weights)
    with pytest.raises(UntrustedPickleError, match=r"wants to unpickle builtins\.exec"):
        UNITE(small_config(perceptual_weight=1.0, lpips_vgg_weights=str(weights)))
    assert not marker.exists()


# ------------------------------------------------------------------------------ npz and shard members
def write_pngs(folder: Path, count: int = 4) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{index}.png")


@pytest.mark.parametrize("role", ["statistics", "reference images", "generated images", "fid-stats source"])
def test_npz_with_a_pickled_object_array_is_refused(tmp_path, capsys, role):
    marker, npz, folder = tmp_path / "marker", tmp_path / "bad.npz", tmp_path / "images"
    write_pngs(folder)
    payload = np.array([RunsCode(marker)], dtype=object)
    if role == "statistics":
        np.savez(npz, mu=payload, sigma=np.eye(2))
        argv = ["fid", str(folder), str(npz)]
    elif role == "reference images":
        np.savez(npz, labels=payload, images=np.zeros((4, 8, 8, 3), np.uint8))
        argv = ["fid", str(folder), str(npz)]
    elif role == "generated images":
        np.savez(npz, labels=payload, images=np.zeros((4, 8, 8, 3), np.uint8))
        argv = ["fid", str(npz), str(folder)]
    else:
        np.savez(npz, labels=payload, images=np.zeros((4, 8, 8, 3), np.uint8))
        argv = ["fid-stats", str(npz), str(tmp_path / "stats.npz")]
    key = "mu" if role == "statistics" else "labels"
    assert unite_main([*argv, "--feature-space", "pixel"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("unite ")]  # no progress bars
    assert len(lines) == 1 and lines[0].startswith(f"unite {argv[0]}: error: "), lines
    assert f"array {key!r} cannot be read (Object arrays cannot be loaded when allow_pickle=False)" in lines[0]
    assert "pickled object arrays are refused" in lines[0]
    assert not marker.exists() and not (tmp_path / "stats.npz").exists()


def test_a_shard_npy_member_holding_pickled_objects_is_never_unpickled(tmp_path):
    root = make_folder(tmp_path / "images", {"a": 3, "b": 3})
    manifest, shards, marker = tmp_path / "manifest.tsv", tmp_path / "shards", tmp_path / "marker"
    write_manifest(root, manifest, progress=False)
    write_shards(root, manifest, shards, image_size=SIZE, shard_size=10, store="npy", workers=1, progress=False)
    [shard] = sorted(shards.glob("*.tar"))
    samples = read_tar_samples(shard)
    victim = sorted(samples)[0]
    pickled = io.BytesIO()
    np.save(pickled, np.array([RunsCode(marker)], dtype=object), allow_pickle=True)
    with tarfile.open(shard, "w") as tar:
        for name, fields in sorted(samples.items()):
            for field, data in fields.items():
                data = pickled.getvalue() if (name, field) == (victim, "npy") else data
                info = tarfile.TarInfo(f"{name}.{field}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    loader = shard_loader(shards, 2, train=False, num_workers=0)
    with pytest.warns(RuntimeWarning, match=rf"sample '{victim}'.*expected C-ordered uint8"):
        keys = [k for batch in _epoch(loader) for k in batch.keys]
    assert victim not in keys and len(keys) == 5 and loader.lost == 1
    assert not marker.exists()
