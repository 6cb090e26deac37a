"""Stage shard: the images each manifest lists (<split>.tsv, under manifest.root/<split>) ->
webdataset shards in <out>/<split>, and the counts of listed, written and skipped images."""

import json
from pathlib import Path

from stages.launch import StageArguments, run_stage
from stages.params import load_stage_params
from unite.data.shards import write_shards


def arguments() -> StageArguments:
    """The paths dvc.yaml passes (`--help` lists them)."""
    parser = StageArguments("stages.shard", __doc__)
    parser.add_input("--manifests", "folder", "the manifest stage's <split>.tsv files")
    parser.add_output("--out", "folder", "where the shards go, a folder per split")
    parser.add_output("--metrics", "file", "the counts per split (json)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = arguments().parse(argv)
    manifests = sorted(args.manifests.glob("*.tsv"))
    if not manifests:
        raise FileNotFoundError(f"--manifests {args.manifests}: holds no <split>.tsv manifest")
    params = load_stage_params("shard")
    root, shard = Path(params["manifest"]["root"]), params["shard"]
    summary = {}
    for manifest in manifests:
        split = manifest.stem
        index = write_shards(
            root / split, manifest, args.out / split,
            image_size=shard["image_size"], shard_size=shard["shard_size"], seed=shard["seed"],
            store=shard["store"], png_level=shard["png_level"], workers=shard["workers"], strict=shard["strict"],
        )
        summary[split] = {key: index["totals"][key] for key in ("listed", "written", "skipped")}
    args.metrics.parent.mkdir(parents=True, exist_ok=True)
    args.metrics.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    run_stage(main)
