"""Stage demo_data: scikit-learn's bundled digits written as an image folder (data/raw)."""

from stages.launch import run_stage
from stages.params import load_stage_params
from stages.paths import DEMO_FOLDER
from unite.demo_data import write_demo_folder

def main() -> None:
    params = load_stage_params("demo_data")["demo_data"]
    counts = write_demo_folder(DEMO_FOLDER, image_size=params["image_size"], val_fraction=params["val_fraction"],
                               seed=params["seed"])
    print(f"demo_data: {counts['train']} train and {counts['val']} val digits in {DEMO_FOLDER}")


if __name__ == "__main__":
    run_stage(main)
