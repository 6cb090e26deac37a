"""Stage demo_data: scikit-learn's bundled digits written as an image folder (data/raw)."""

from stages.launch import run_stage
from stages.params import load_params
from unite.demo_data import write_demo_folder

OUT = "data/raw"


def main() -> None:
    params = load_params()["demo_data"]
    counts = write_demo_folder(OUT, image_size=params["image_size"], val_fraction=params["val_fraction"],
                               seed=params["seed"])
    print(f"demo_data: {counts['train']} train and {counts['val']} val digits in {OUT}")


if __name__ == "__main__":
    run_stage(main)
