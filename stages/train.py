"""Stage train: joint UNITE training under torchrun; resumes from the checkpoint store after a kill.

Checkpoints go to <store>/<hash of the training data and params>, so a changed recipe starts
afresh while a rerun of the same recipe resumes, also on another number of processes. The store
lies outside the workspace (UNITE_CHECKPOINT_STORE, by default $XDG_CACHE_HOME/unite/checkpoints
or ~/.cache/unite/checkpoints), so every workspace on a machine (a second clone, the temporary
copies of `dvc exp run --queue` and `--temp`, Prefect runs) resumes and reuses the same runs. The
checkpoint at max_steps is linked to --final. The --table tsv and the --metrics json are put back
from the checkpoint folder when the stage starts (DVC deletes them before running it) and kept
current by the trainer at every log interval.
"""

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

from stages.launch import StageArguments, run_stage
from stages.params import load_stage_params, train_config
from unite.checkpoint import latest_checkpoint
from unite.train import Preempted, train
from unite.train_config import RESUME_MAY_CHANGE

UNKEYED = RESUME_MAY_CHANGE | {"nproc_per_node", "num_workers"}
STORE_ENV = "UNITE_CHECKPOINT_STORE"
# Where the train stage kept checkpoints before the store: <workspace>/checkpoints/<hash>.
WORKSPACE_CHECKPOINTS = Path("checkpoints")


def checkpoint_store() -> Path:
    """The machine's checkpoint store: $UNITE_CHECKPOINT_STORE, else the user's cache folder."""
    if os.environ.get(STORE_ENV):
        return Path(os.environ[STORE_ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "unite" / "checkpoints"


def adopt_workspace_run(run_dir: Path, workspace_checkpoints: Path = WORKSPACE_CHECKPOINTS) -> None:
    """Move a run that an earlier version kept in the workspace (checkpoints/<hash>) into the
    store, unless the store holds that run already; say which, so the user knows where it is."""
    legacy = workspace_checkpoints / run_dir.name
    if not legacy.is_dir():
        return
    if run_dir.exists():
        print(f"stages.train: {legacy} is this recipe's run from the workspace, but the store already holds "
              f"{run_dir}; training uses the store's, and {legacy} can be removed", file=sys.stderr)
        return
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(legacy, run_dir)
    print(f"stages.train: moved this recipe's run from {legacy} to the checkpoint store: {run_dir}",
          file=sys.stderr)


def run_directory(checkpoints: Path, section: dict, shard_index: Path) -> Path:
    """<checkpoints>/<hash>: the hash covers the training data and every param that a resume must
    match, so new data or a new recipe starts afresh; the number of processes is not among them."""
    keyed = {k: v for k, v in section.items() if k not in UNKEYED}
    digest = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode() + shard_index.read_bytes())
    return checkpoints / digest.hexdigest()[:12]


def restore_metrics(out_dir: Path, log: Path, metrics: Path) -> None:
    """Copy the run's metrics log to the declared outputs before training starts, so that a run
    failing early still leaves the last good training metrics (rows logged after the last
    checkpoint are dropped again when training resumes)."""
    for source, target in ((out_dir / "metrics.tsv", log), (out_dir / "metrics.json", metrics)):
        if source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = target.with_name(f".{target.name}.tmp")
            shutil.copyfile(source, temporary)
            os.replace(temporary, target)


def arguments() -> StageArguments:
    """The paths dvc.yaml passes (`--help` lists them)."""
    parser = StageArguments("stages.train", __doc__)
    parser.add_input("--shards", "folder", "the shard stage's output; training reads its train split")
    parser.add_output("--final", "file", "the checkpoint at max_steps")
    parser.add_output("--table", "file", "every logged row: <name>.tsv, beside --metrics")
    parser.add_output("--metrics", "file", "the last logged row: <name>.json")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = arguments()
    args = parser.parse(argv)
    if args.metrics.suffix != ".json" or args.table != args.metrics.with_suffix(".tsv"):
        parser.error(f"--table {args.table} --metrics {args.metrics}: must be <name>.tsv and <name>.json in "
                     "one folder (the trainer writes the two side by side)")
    section = load_stage_params("train")["train"]
    out_dir = run_directory(checkpoint_store(), section, args.shards / "train" / "index.json")
    data = {
        "kind": "python",
        "source": "unite.data.loaders:shard_loader",
        "options": {"shard_dir": str(args.shards / "train"), "num_workers": section["num_workers"],
                    "flip": section["hflip"]},
    }
    is_main = int(os.environ.get("RANK", "0")) == 0
    if is_main:
        adopt_workspace_run(out_dir)
        print(f"stages.train: checkpoints in {out_dir}", file=sys.stderr)
        restore_metrics(out_dir, args.table, args.metrics)
    live_metrics = str(args.metrics.with_suffix(""))
    try:
        result = train(train_config({**section, "live_metrics": live_metrics}, str(out_dir), data))
    except Preempted as stopped:  # the checkpoint is written; `dvc repro` resumes from it
        print(stopped, file=sys.stderr)
        sys.exit(128 + stopped.signum)
    if not is_main:
        return
    final = result.checkpoint or latest_checkpoint(out_dir / "checkpoints", section["max_steps"])
    args.final.parent.mkdir(parents=True, exist_ok=True)
    args.final.unlink(missing_ok=True)
    try:
        os.link(final, args.final)  # no second copy of a large checkpoint where the filesystem allows
    except OSError:
        shutil.copy2(final, args.final)


if __name__ == "__main__":
    run_stage(main)
