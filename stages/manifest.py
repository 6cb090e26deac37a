"""Stage manifest: list manifest.root/{train,val} (a param: the source folder is not a DVC dep) as
<out>/{train,val}.tsv."""

from pathlib import Path

from stages.launch import StageArguments, run_stage
from stages.params import PARAMS_FILE, load_stage_params
from unite.data.errors import DataError
from unite.data.manifest import write_manifest

SPLITS = ("train", "val")


def arguments() -> StageArguments:
    """The paths dvc.yaml passes (`--help` lists them)."""
    parser = StageArguments("stages.manifest", __doc__)
    parser.add_output("--out", "folder", "where the manifests go, one <split>.tsv per split")
    return parser


def main(argv: list[str] | None = None) -> None:
    out = arguments().parse(argv).out
    root = Path(load_stage_params("manifest")["manifest"]["root"])
    for split in SPLITS:
        if not (root / split).is_dir():
            raise DataError(
                f"manifest.root {root}: no folder {root / split}; link an image folder with train/<class>/ and "
                f"val/<class>/ there (`mkdir -p {root.parent} && ln -s /path/to/imagenet {root}`), "
                f"or set manifest.root in {PARAMS_FILE}")
    for split in SPLITS:
        write_manifest(root / split, out / f"{split}.tsv")


if __name__ == "__main__":
    run_stage(main)
