"""The copy of a checkout that the rehearsal and the pipeline tests start from: the tracked source
files as a fresh clone has them, never the lock or an output of a pipeline that already ran."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from stages.rehearse import copy_files

DVC_YAML = {
    "stages": {
        "prepare": {"cmd": "python prepare.py", "outs": ["data/raw", {"data/shards/": {"cache": True}}]},
        "train": {"cmd": "python train.py", "deps": ["data/shards", "train.py"],
                  "outs": [{"checkpoints": {"persist": True, "cache": False}}, "models/final.pt"],
                  "metrics": [{"metrics/train.json": {"cache": False}}], "plots": ["reports/loss.png"]},
    },
    "plots": ["reports/loss.png"],
}


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args], cwd=repo,
                   check=True, capture_output=True)


def test_copy_files_takes_tracked_sources_and_leaves_every_pipeline_output(tmp_path: Path) -> None:
    source, target = tmp_path / "checkout", tmp_path / "copy"
    files = {
        "dvc.yaml": yaml.safe_dump(DVC_YAML), ".gitignore": "*.log\n", "train.py": "print('v1')\n",
        "prepare.py": "", "docs/notes.md": "notes",
        # A run's results, committed by a user after `dvc repro` (git add -A): tracked, never copied.
        "dvc.lock": "schema: '2.0'\n", "metrics/train.json": "{}", "data/raw/0/a.png": "png",
        "data/shards/train/index.json": "{}", "checkpoints/0a1b/step_1.pt": "pt", "models/final.pt": "pt",
        "reports/loss.png": "png",
    }
    for name, text in files.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text(text)
    git(source, "init", "-q")
    git(source, "add", "-A")
    git(source, "commit", "-qm", "a run, committed")
    (source / "train.py").write_text("print('v2')\n")  # an uncommitted edit travels with the copy
    (source / "scratch.py").write_text("")  # untracked
    (source / "run.log").write_text("")  # ignored
    (source / "metrics" / "eval.json").write_text("{}")  # untracked output
    target.mkdir()
    copy_files(target, source)
    copied = sorted(str(path.relative_to(target)) for path in target.rglob("*") if path.is_file())
    assert copied == [".gitignore", "docs/notes.md", "dvc.yaml", "prepare.py", "train.py"]
    assert (target / "train.py").read_text() == "print('v2')\n"
