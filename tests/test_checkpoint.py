"""Checkpoints: atomic writes (also under SIGKILL mid-write), keep-last-N, random states and the
EMA export."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from test_train import assert_same_training_state, child_env, train_config, train_values
from unite.checkpoint import (
    CheckpointError,
    capture_rng_state,
    exclusive_folder,
    export_ema,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_exported,
    load_newest_readable,
    main,
    restore_rng_state,
    save_checkpoint,
)
from unite.model import UNITE
from unite.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def test_keep_last_and_latest(tmp_path: Path) -> None:
    for step in (5, 10, 15, 20):
        save_checkpoint({"step": step}, tmp_path, step, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000015.pt", "step_00000020.pt"]
    assert load_checkpoint(latest_checkpoint(tmp_path)) == {"step": 20}
    assert latest_checkpoint(tmp_path / "absent") is None


def test_temporary_files_are_never_picked_and_are_cleaned(tmp_path: Path) -> None:
    save_checkpoint({"step": 1}, tmp_path, 1, keep_last=3)
    leftover = tmp_path / ".step_00000002.pt.999.tmp"  # what a killed writer leaves
    leftover.write_bytes(b"partial")
    assert latest_checkpoint(tmp_path).name == "step_00000001.pt"
    save_checkpoint({"step": 3}, tmp_path, 3, keep_last=3)
    assert not leftover.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001.pt", "step_00000003.pt"]


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "step_00000001.pt")
    path = save_checkpoint({"weights": torch.ones(1000)}, tmp_path, 1, keep_last=1)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="cannot be read .* may be corrupt"):
        load_checkpoint(path)


def test_unreadable_checkpoints_are_set_aside_newest_first(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        save_checkpoint({"step": step}, tmp_path, step, keep_last=3)
    (tmp_path / "step_00000003.pt").write_bytes(b"cut short")
    (tmp_path / "step_00000002.pt.unreadable").write_bytes(b"set aside by an earlier run")
    warnings: list[str] = []
    path, state = load_newest_readable(tmp_path, warnings.append)
    assert path.name == "step_00000002.pt" and state == {"step": 2}
    assert len(warnings) == 1 and "step_00000003.pt.unreadable" in warnings[0]
    assert (tmp_path / "step_00000003.pt.unreadable").read_bytes() == b"cut short"
    # Pruning after the next save leaves set-aside files alone.
    save_checkpoint({"step": 4}, tmp_path, 4, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step_00000002.pt.unreadable", "step_00000003.pt.unreadable", "step_00000004.pt"]

    # A name already taken by an earlier set-aside file gets a number; nothing is overwritten.
    (tmp_path / "step_00000002.pt").write_bytes(b"")
    (tmp_path / "step_00000004.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"none of the 2 checkpoints in .* can be read"):
        load_newest_readable(tmp_path, warnings.append)
    assert (tmp_path / "step_00000002.pt.unreadable").read_bytes() == b"set aside by an earlier run"
    assert (tmp_path / "step_00000002.pt.unreadable.1").read_bytes() == b""
    assert load_newest_readable(tmp_path / "absent", warnings.append) is None


def test_rng_state_round_trip_through_a_file(tmp_path: Path) -> None:
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.normal()  # leaves a cached Gaussian in numpy's state
    path = save_checkpoint({"rng": capture_rng_state()}, tmp_path, 1, keep_last=1)

    def draws() -> tuple:
        return random.random(), np.random.normal(), torch.rand(3)

    first = draws()
    restore_rng_state(load_checkpoint(path)["rng"])
    again = draws()
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


def test_training_checkpoints_hold_only_what_weights_only_loading_rebuilds(tmp_path: Path) -> None:
    """No allowlist needed: random states, optimizers, config and data position are all tensors
    and plain values, so a resume never has to unpickle arbitrary objects."""
    result = train(train_config(tmp_path / "run", max_steps=1))
    assert torch.serialization.get_unsafe_globals_in_checkpoint(result.checkpoint) == []
    state = torch.load(result.checkpoint, map_location="cpu", weights_only=True)
    assert {"model", "ema", "optimizer", "optimizer_muon", "rng", "config", "data_position"} <= state.keys()


# A training process whose checkpoint write of step 4 stops half-way, as if killed mid-write.
_KILLED_WRITER = """
import io, os, sys, time, torch
real_save = torch.save
def save(obj, handle, *args, **kwargs):
    if isinstance(obj, dict) and obj.get("step") == 4:
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        handle.flush()
        os.fsync(handle.fileno())
        open(sys.argv[2], "w").close()
        time.sleep(600)
    return real_save(obj, handle, *args, **kwargs)
torch.save = save
from unite.train import main
sys.exit(main([sys.argv[1]]))
"""


def test_sigkill_during_checkpoint_write_resumes_from_the_previous_one(tmp_path: Path) -> None:
    out, marker = tmp_path / "run", tmp_path / "writing"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(train_values(out, checkpoint_every=2)))
    child = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(tmp_path / "c.yaml"), str(marker)],
                             env=child_env(), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert child.poll() is None, child.stderr.read()
        assert time.monotonic() < deadline, "the checkpoint write of step 4 never started"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL

    checkpoints = out / "checkpoints"
    [partial] = checkpoints.glob("*.tmp")
    assert partial.stat().st_size > 0
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step_00000002.pt"]

    # The rerun resumes from step 2 and ends where an uninterrupted run ends.
    resumed = train(train_config(out, checkpoint_every=2))
    straight = train(train_config(tmp_path / "straight", checkpoint_every=2))
    assert_same_training_state(straight.checkpoint, resumed.checkpoint)
    assert not partial.exists()


_LOCK_HOLDER = """
import sys, time
from unite.checkpoint import exclusive_folder
with exclusive_folder(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_locked_checkpoint_folder_times_out_and_a_killed_holder_frees_it(tmp_path: Path) -> None:
    folder = tmp_path / "run" / "checkpoints"
    holder = subprocess.Popen([sys.executable, "-c", _LOCK_HOLDER, str(folder)], env=child_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(TimeoutError, match=rf"checkpoint folder {folder} is still locked .* after 0 s"):
            with exclusive_folder(folder, wait_s=0.3):
                pass
    finally:
        holder.kill()
        holder.wait()
    with exclusive_folder(folder, wait_s=10):
        assert not list(folder.iterdir())  # the lock leaves no file in the folder


def test_training_waits_until_the_previous_run_releases_its_folder(tmp_path: Path) -> None:
    out = tmp_path / "run"
    events: list[str] = []
    held = threading.Event()

    def previous_run() -> None:
        with exclusive_folder(out / "checkpoints"):
            held.set()
            time.sleep(1.0)
            events.append("previous run released")

    thread = threading.Thread(target=previous_run)
    thread.start()
    held.wait()
    result = train(train_config(out, max_steps=1))
    events.append("training finished")
    thread.join()
    assert events == ["previous run released", "training finished"]
    assert result.step == 1


def test_ema_export_loads_into_a_model(tmp_path: Path) -> None:
    result = train(train_config(tmp_path / "run", max_steps=2))
    weights, config_json = export_ema(result.checkpoint, tmp_path / "export" / "unite-ema.safetensors")
    assert config_json == tmp_path / "export" / "unite-ema.json"
    info = json.loads(config_json.read_text())
    assert info["step"] == 2 and info["ema_decay"] == 0.9978

    state, model_cfg = load_exported(weights)
    model = UNITE(model_cfg)
    model.load_state_dict(state)  # strict: every key of the model, nothing else
    ema = load_checkpoint(result.checkpoint)["ema"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ema[name]), name
    trained = load_checkpoint(result.checkpoint)["model"]["decoder.head.weight"]
    assert not torch.equal(model.decoder.head.weight, trained)  # averaged, not the raw weights


def test_an_export_holding_the_retired_current_best_cfg_scale_loads(tmp_path: Path) -> None:
    """Exports written before the CFG scale left checkpoints carry `current_best_cfg_scale` in
    their json and safetensors metadata; they load as before."""
    result = train(train_config(tmp_path / "run", max_steps=1))
    weights, config_json = export_ema(result.checkpoint, tmp_path / "new" / "unite-ema.safetensors")
    info = json.loads(config_json.read_text())
    assert "current_best_cfg_scale" not in info
    old_info = {**info, "current_best_cfg_scale": 3.4}
    old = tmp_path / "old" / "unite-ema.safetensors"
    old.parent.mkdir()
    save_file(load_file(str(weights)), str(old), metadata={"unite": json.dumps(old_info)})
    old.with_suffix(".json").write_text(json.dumps(old_info, indent=2) + "\n")

    state, model_cfg = load_exported(old)
    model = UNITE(model_cfg)
    model.load_state_dict(state)  # strict: every key of the model, nothing else
    ema = load_checkpoint(result.checkpoint)["ema"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ema[name]), name


def test_export_command_takes_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    train(train_config(tmp_path / "run", max_steps=1))
    assert main([str(tmp_path / "run" / "checkpoints"), str(tmp_path / "ema.safetensors")]) == 0
    assert "step_00000001.pt" in capsys.readouterr().out
    assert (tmp_path / "ema.safetensors").is_file() and (tmp_path / "ema.json").is_file()
    with pytest.raises(SystemExit) as stopped:
        main([str(tmp_path), str(tmp_path / "other.safetensors")])
    assert stopped.value.code == 2  # argparse's usage error
    assert f"{tmp_path} holds no complete checkpoint (step_*.pt)" in capsys.readouterr().err
    assert not (tmp_path / "other.safetensors").exists()
