"""Expected failures of the stages end in one line and a non-zero exit, under torchrun too; bugs
keep their traceback. Each test runs the stage commands of dvc.yaml in a workspace of its own."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.launch import TORCHRUN_STAGES, run_stage

ROOT = Path(__file__).resolve().parents[1]
FIX_PARAMS = "; fix it in params.yaml and rerun"
COMMANDS = {name: stage["cmd"] for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items()}


def _workspace(tmp_path: Path, train: dict | None = None, **sections: dict) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, changes in {"train": train or {}, **sections}.items():
        params[name].update(changes)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def _run(workspace: Path, command: list[str]) -> subprocess.CompletedProcess[str]:
    """`python <command>` in `workspace`, with this checkout's code."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *command], cwd=workspace, env=env, capture_output=True, text=True,
                          timeout=300)


def _stage(workspace: Path, stage: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """The stage's command as dvc.yaml runs it (`python -m ...`, then `extra` options)."""
    python, *command = shlex.split(COMMANDS[stage])
    assert python == "python", COMMANDS[stage]
    return _run(workspace, [*command, *extra])


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 1, output
    assert "Traceback" not in output
    assert len(output.splitlines()) == 1, output
    return output


def test_a_bad_param_stops_the_launcher_before_torchrun_starts(tmp_path: Path) -> None:
    workspace = _workspace(tmp_path, {"global_batch": 0})
    line = _one_line(_stage(workspace, "train"))
    assert line.startswith("error: train: train.global_batch=0: must be a positive integer")
    assert line.endswith(FIX_PARAMS)


def test_the_same_failure_on_every_rank_is_one_line(tmp_path: Path) -> None:
    """Two workers, no shards yet: both fail alike; torchrun's report and warnings are left out."""
    workspace = _workspace(tmp_path, {"nproc_per_node": 2, "per_device_batch": 64})
    line = _one_line(_stage(workspace, "train"))
    assert line.startswith("error: train: --shards data/shards: no such folder; check the path")


@pytest.mark.parametrize(("stage", "missing"), [
    ("manifest", "data/raw/train"),  # manifest.root, a param
    ("shard", "--manifests data/manifest: no such folder"),
    ("fid_ref", "--shards data/shards: no such folder"),
    ("export", "--checkpoint models/final.pt: no such file"),
    ("sweep", "--model models/unite-ema.safetensors: no such file"),
    ("evaluate", "--model models/unite-ema.safetensors: no such file"),
    ("report", "--train-table metrics/train.tsv: no such file"),
])
def test_every_stage_reports_a_missing_input_in_one_line(tmp_path: Path, stage: str, missing: str) -> None:
    line = _one_line(_stage(_workspace(tmp_path), stage))
    assert line.startswith(f"error: {stage}: ") and missing in line


def test_a_missing_file_below_an_input_folder_is_one_line(tmp_path: Path) -> None:
    workspace = _workspace(tmp_path)
    (workspace / "data" / "shards").mkdir(parents=True)
    line = _one_line(_stage(workspace, "fid_ref"))
    assert line.startswith("error: fid_ref: ") and "data/shards/train/index.json" in line


@pytest.mark.parametrize(("stage", "options", "message"), [
    # A later option overrides dvc.yaml's.
    ("fid_ref", ["--shards", "params.yaml"], "--shards params.yaml: must be a folder, but it is a file"),
    ("export", ["--out", "."], "--out .: must be a file, but it is a folder"),
    ("fid_ref", ["--stats", "x.npz"], "unrecognized arguments: --stats x.npz; usage: python -m stages.fid_ref"),
    ("train", ["--table", "metrics/log.tsv"],
     "--table metrics/log.tsv --metrics metrics/train.json: must be <name>.tsv and <name>.json in one folder"),
])
def test_a_wrong_option_is_one_line(tmp_path: Path, stage: str, options: list[str], message: str) -> None:
    workspace = _workspace(tmp_path)
    if stage == "export":
        (workspace / "models").mkdir()
        (workspace / "models" / "final.pt").write_bytes(b"")
    if stage == "train":
        (workspace / "data" / "shards").mkdir(parents=True)
    line = _one_line(_stage(workspace, stage, *options))
    assert line.startswith(f"error: {stage}: {message}"), line


def test_a_missing_option_names_it_and_shows_the_usage(tmp_path: Path) -> None:
    line = _one_line(_run(_workspace(tmp_path), ["-m", "stages.shard", "--manifests", "."]))
    assert line == ("error: shard: the following arguments are required: --out, --metrics; "
                    "usage: python -m stages.shard [-h] --manifests FOLDER --out FOLDER --metrics FILE")


def test_the_launcher_passes_the_options_to_every_rank(tmp_path: Path) -> None:
    """Both ranks read the options dvc.yaml gives the launcher: an unknown one is one line from the ranks."""
    workspace = _workspace(tmp_path, evaluate={"nproc_per_node": 2})
    line = _one_line(_stage(workspace, "evaluate", "--unknown"))
    assert line.startswith("error: evaluate: unrecognized arguments: --unknown; usage: python -m stages.evaluate")


@pytest.mark.parametrize("stage", TORCHRUN_STAGES)
def test_torchrun_hands_the_options_of_dvc_yaml_to_the_stage_module(stage: str) -> None:
    """As README's multi-node command runs it: `torchrun ... -m stages.<stage> <its options>`."""
    from torch.distributed.run import parse_args

    python, flag, launcher, name, *options = shlex.split(COMMANDS[stage])
    assert (python, flag, launcher, name) == ("python", "-m", "stages.launch", stage)
    parsed = parse_args(["--nnodes", "2", "--nproc-per-node", "8", "-m", f"stages.{stage}", *options])
    assert (parsed.training_script, parsed.training_script_args) == (f"stages.{stage}", options)


def test_a_missing_weights_file_is_one_line(tmp_path: Path) -> None:
    workspace = _workspace(tmp_path, fid_ref={"feature_space": "inception", "inception_weights": "/nowhere/fid.pth"})
    (workspace / "data" / "shards").mkdir(parents=True)
    line = _one_line(_stage(workspace, "fid_ref"))
    assert line.startswith("error: fid_ref: ") and "/nowhere/fid.pth" in line


def test_no_readable_checkpoint_stops_training_in_one_line(tmp_path: Path, checkpoint_store: Path) -> None:
    """A run an earlier version kept in the workspace (checkpoints/<hash>) moves to the store,
    where its only checkpoint, cut short, stops training with one line naming the store's folder."""
    workspace = _workspace(tmp_path, {"max_steps": 2})
    for stage in ("demo_data", "manifest", "shard"):
        assert _stage(workspace, stage).returncode == 0
    from stages.train import run_directory

    section = yaml.safe_load((workspace / "params.yaml").read_text())["train"]
    legacy = run_directory(workspace / "checkpoints", section, workspace / "data/shards/train/index.json")
    (legacy / "checkpoints").mkdir(parents=True)
    (legacy / "checkpoints" / "step_00000001.pt").write_bytes(b"cut short")
    result = _stage(workspace, "train")
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 1, output
    assert "Traceback" not in output
    run_dir = checkpoint_store / legacy.name
    assert f"moved this recipe's run from checkpoints/{legacy.name} to the checkpoint store: {run_dir}" in output
    assert not legacy.exists() and (run_dir / "checkpoints" / "step_00000001.pt.unreadable").is_file()
    last = output.splitlines()[-1]
    assert last.startswith("error: train: ") and str(run_dir) in last and "read" in last


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
