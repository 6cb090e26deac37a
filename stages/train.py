"""Stage train: joint UNITE training under torchrun; resumes from checkpoints/ after a kill.

Checkpoints go to checkpoints/<hash of the training params>, so a changed recipe starts afresh
while a rerun of the same recipe resumes. The final checkpoint is linked to models/final.pt.
"""

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

from stages.launch import run_stage
from stages.params import load_params, train_config
from stages.shard import OUT as SHARDS
from unite.checkpoint import latest_checkpoint
from unite.train import RESUME_MAY_CHANGE, Preempted, train

CHECKPOINTS = Path("checkpoints")
FINAL = Path("models/final.pt")
METRICS_JSON = Path("metrics/train.json")
METRICS_TSV = Path("metrics/train.tsv")


def run_directory(section: dict, shard_index: Path) -> Path:
    """checkpoints/<hash>: the hash covers the training data and every param that a resume must
    match, so new data or a new recipe starts afresh."""
    keyed = {k: v for k, v in section.items() if k not in RESUME_MAY_CHANGE and k != "num_workers"}
    digest = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode() + shard_index.read_bytes())
    return CHECKPOINTS / digest.hexdigest()[:12]


def main() -> None:
    section = load_params()["train"]
    out_dir = run_directory(section, SHARDS / "train" / "index.json")
    data = {
        "kind": "python",
        "source": "unite.data.loaders:shard_loader",
        "options": {"shard_dir": str(SHARDS / "train"), "num_workers": section["num_workers"],
                    "flip": section["hflip"]},
    }
    try:
        result = train(train_config(section, str(out_dir), data))
    except Preempted as stopped:  # the checkpoint is written; `dvc repro` resumes from it
        print(stopped, file=sys.stderr)
        sys.exit(128 + stopped.signum)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    final = result.checkpoint or latest_checkpoint(out_dir / "checkpoints")
    FINAL.parent.mkdir(exist_ok=True)
    FINAL.unlink(missing_ok=True)
    try:
        os.link(final, FINAL)  # no second copy of a large checkpoint where the filesystem allows
    except OSError:
        shutil.copy2(final, FINAL)
    METRICS_JSON.parent.mkdir(exist_ok=True)
    shutil.copy2(out_dir / "metrics.json", METRICS_JSON)
    shutil.copy2(out_dir / "metrics.tsv", METRICS_TSV)


if __name__ == "__main__":
    run_stage(main)
