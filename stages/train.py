"""Stage train: joint UNITE training under torchrun; resumes from checkpoints/ after a kill.

Checkpoints go to checkpoints/<hash of the training params>, so a changed recipe starts afresh
while a rerun of the same recipe resumes, also on another number of processes. The final
checkpoint is linked to models/final.pt. metrics/train.{tsv,json} are put back from the
checkpoint folder when the stage starts (DVC deletes them before running it) and kept current by
the trainer at every log interval.
"""

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

from stages.launch import run_stage
from stages.params import load_stage_params, train_config
from stages.paths import CHECKPOINTS, FINAL_CHECKPOINT, SHARDS, TRAIN_METRICS
from unite.checkpoint import latest_checkpoint
from unite.train import Preempted, train
from unite.train_config import RESUME_MAY_CHANGE

UNKEYED = RESUME_MAY_CHANGE | {"nproc_per_node", "num_workers"}


def run_directory(section: dict, shard_index: Path) -> Path:
    """checkpoints/<hash>: the hash covers the training data and every param that a resume must
    match, so new data or a new recipe starts afresh; the number of processes is not among them."""
    keyed = {k: v for k, v in section.items() if k not in UNKEYED}
    digest = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode() + shard_index.read_bytes())
    return CHECKPOINTS / digest.hexdigest()[:12]


def restore_metrics(out_dir: Path) -> None:
    """Copy the run's metrics log to the declared outputs before training starts, so that a run
    failing early still leaves the last good training metrics (rows logged after the last
    checkpoint are dropped again when training resumes)."""
    for suffix in (".tsv", ".json"):
        source, target = out_dir / f"metrics{suffix}", TRAIN_METRICS.with_name(TRAIN_METRICS.name + suffix)
        if source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = target.with_name(f".{target.name}.tmp")
            shutil.copyfile(source, temporary)
            os.replace(temporary, target)


def main() -> None:
    section = load_stage_params("train")["train"]
    out_dir = run_directory(section, SHARDS / "train" / "index.json")
    data = {
        "kind": "python",
        "source": "unite.data.loaders:shard_loader",
        "options": {"shard_dir": str(SHARDS / "train"), "num_workers": section["num_workers"],
                    "flip": section["hflip"]},
    }
    is_main = int(os.environ.get("RANK", "0")) == 0
    if is_main:
        restore_metrics(out_dir)
    try:
        result = train(train_config({**section, "live_metrics": str(TRAIN_METRICS)}, str(out_dir), data))
    except Preempted as stopped:  # the checkpoint is written; `dvc repro` resumes from it
        print(stopped, file=sys.stderr)
        sys.exit(128 + stopped.signum)
    if not is_main:
        return
    final = result.checkpoint or latest_checkpoint(out_dir / "checkpoints")
    FINAL_CHECKPOINT.parent.mkdir(exist_ok=True)
    FINAL_CHECKPOINT.unlink(missing_ok=True)
    try:
        os.link(final, FINAL_CHECKPOINT)  # no second copy of a large checkpoint where the filesystem allows
    except OSError:
        shutil.copy2(final, FINAL_CHECKPOINT)


if __name__ == "__main__":
    run_stage(main)
