"""Stage demo_data: scikit-learn's bundled digits written as an image folder ({train,val}/<class>/)."""

from stages.launch import StageArguments, run_stage
from stages.params import load_stage_params
from unite.demo_data import write_demo_folder


def arguments() -> StageArguments:
    """The paths dvc.yaml passes (`--help` lists them)."""
    parser = StageArguments("stages.demo_data", __doc__)
    parser.add_output("--out", "folder", "the image folder to write")
    return parser


def main(argv: list[str] | None = None) -> None:
    out = arguments().parse(argv).out
    params = load_stage_params("demo_data")["demo_data"]
    counts = write_demo_folder(out, image_size=params["image_size"], val_fraction=params["val_fraction"],
                               seed=params["seed"])
    print(f"demo_data: {counts['train']} train and {counts['val']} val digits in {out}")


if __name__ == "__main__":
    run_stage(main)
