"""Stage manifest: list manifest.root/{train,val} as data/manifest/{train,val}.tsv."""

from pathlib import Path

from stages.launch import run_stage
from stages.params import load_stage_params
from stages.paths import MANIFESTS, SPLITS
from unite.data.manifest import write_manifest

def main() -> None:
    root = Path(load_stage_params("manifest")["manifest"]["root"])
    for split in SPLITS:
        write_manifest(root / split, MANIFESTS / f"{split}.tsv")


if __name__ == "__main__":
    run_stage(main)
