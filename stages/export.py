"""Stage export: the EMA weights of the final checkpoint as safetensors + json config."""

from pathlib import Path

from stages.launch import run_stage
from stages.train import FINAL
from unite.checkpoint import export_ema

OUT = Path("models/unite-ema.safetensors")


def main() -> None:
    weights, config = export_ema(FINAL, OUT)
    print(f"export: {weights} and {config}")


if __name__ == "__main__":
    run_stage(main)
