"""Stage manifest: list manifest.root/{train,val} as data/manifest/{train,val}.tsv."""

from pathlib import Path

from stages.launch import run_stage
from stages.params import load_params
from unite.data.manifest import write_manifest

OUT = Path("data/manifest")
SPLITS = ("train", "val")


def main() -> None:
    root = Path(load_params()["manifest"]["root"])
    for split in SPLITS:
        write_manifest(root / split, OUT / f"{split}.tsv")


if __name__ == "__main__":
    run_stage(main)
