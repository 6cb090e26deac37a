"""Expected failures of the stages end in one line and a non-zero exit, under torchrun too; bugs
keep their traceback. Each test runs the stage commands of dvc.yaml in a workspace of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.launch import run_stage

ROOT = Path(__file__).resolve().parents[1]
FIX_PARAMS = "; fix it in params.yaml and rerun"


def _workspace(tmp_path: Path, train: dict | None = None, **sections: dict) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, changes in {"train": train or {}, **sections}.items():
        params[name].update(changes)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def _stage(workspace: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m <args>` as dvc.yaml runs it, in `workspace`, with this checkout's code."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", *args], cwd=workspace, env=env, capture_output=True, text=True,
                          timeout=300)


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 1, output
    assert "Traceback" not in output
    assert len(output.splitlines()) == 1, output
    return output


def test_a_bad_param_stops_the_launcher_before_torchrun_starts(tmp_path: Path) -> None:
    workspace = _workspace(tmp_path, {"global_batch": 100, "per_device_batch": 128})
    line = _one_line(_stage(workspace, "stages.launch", "train"))
    assert line.startswith("error: train: train.global_batch=100: must be a multiple of per_device_batch=128")
    assert line.endswith(FIX_PARAMS)


def test_the_same_failure_on_every_rank_is_one_line(tmp_path: Path) -> None:
    """Two workers, no shards yet: both fail alike; torchrun's report and warnings are left out."""
    workspace = _workspace(tmp_path, {"nproc_per_node": 2, "per_device_batch": 64})
    line = _one_line(_stage(workspace, "stages.launch", "train"))
    assert line.startswith("error: train: ") and "data/shards/train/index.json" in line


@pytest.mark.parametrize(("command", "missing"), [
    (["stages.manifest"], "data/raw/train"),
    (["stages.shard"], "data/raw/train"),
    (["stages.fid_ref"], "data/shards/train/index.json"),
    (["stages.export"], "models/final.pt"),
    (["stages.launch", "sweep"], "models/unite-ema.safetensors"),
    (["stages.launch", "evaluate"], "models/unite-ema.safetensors"),
])
def test_every_stage_reports_a_missing_input_in_one_line(tmp_path: Path, command: list[str], missing: str) -> None:
    stage = command[-1].removeprefix("stages.")
    line = _one_line(_stage(_workspace(tmp_path), *command))
    assert line.startswith(f"error: {stage}: ") and missing in line


def test_a_missing_weights_file_is_one_line(tmp_path: Path) -> None:
    workspace = _workspace(tmp_path, fid_ref={"feature_space": "inception", "inception_weights": "/nowhere/fid.pth"})
    line = _one_line(_stage(workspace, "stages.fid_ref"))
    assert line.startswith("error: fid_ref: ") and "/nowhere/fid.pth" in line


def test_no_readable_checkpoint_stops_training_in_one_line(tmp_path: Path) -> None:
    workspace = _workspace(tmp_path, {"max_steps": 2})
    for stage in ("demo_data", "manifest", "shard"):
        assert _stage(workspace, f"stages.{stage}").returncode == 0
    from stages.train import run_directory

    run_dir = workspace / run_directory(yaml.safe_load((workspace / "params.yaml").read_text())["train"],
                                        workspace / "data/shards/train/index.json")
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_00000001.pt").write_bytes(b"cut short")
    result = _stage(workspace, "stages.launch", "train")
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 1, output
    assert "Traceback" not in output
    last = output.splitlines()[-1]
    assert last.startswith("error: train: ") and str(run_dir.relative_to(workspace)) in last and "read" in last


def test_run_stage_turns_an_expected_failure_into_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    def main() -> None:
        raise FileNotFoundError("weights /nowhere/vgg16.pth not found")

    with pytest.raises(SystemExit) as stopped:
        run_stage(main)
    assert stopped.value.code == 1
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: ") and ": weights /nowhere/vgg16.pth not found; check the path" in line


def test_run_stage_keeps_a_bug_as_it_is() -> None:
    def main() -> None:
        {}["missing"]

    with pytest.raises(KeyError, match="missing"):
        run_stage(main)
