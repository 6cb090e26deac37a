"""Stage shard: the listed images -> webdataset shards in data/shards/{train,val}."""

import json
from pathlib import Path

from stages.launch import run_stage
from stages.params import load_stage_params
from stages.paths import MANIFESTS, SHARD_METRICS, SHARDS, SPLITS
from unite.data.shards import write_shards

def main() -> None:
    params = load_stage_params("shard")
    root, shard = Path(params["manifest"]["root"]), params["shard"]
    summary = {}
    for split in SPLITS:
        index = write_shards(
            root / split, MANIFESTS / f"{split}.tsv", SHARDS / split,
            image_size=shard["image_size"], shard_size=shard["shard_size"], seed=shard["seed"],
            store=shard["store"], png_level=shard["png_level"], workers=shard["workers"], strict=shard["strict"],
        )
        summary[split] = {key: index["totals"][key] for key in ("listed", "written", "skipped")}
    SHARD_METRICS.parent.mkdir(exist_ok=True)
    SHARD_METRICS.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    run_stage(main)
