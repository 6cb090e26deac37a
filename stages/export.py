"""Stage export: the EMA weights of the final checkpoint as safetensors + json config."""


from stages.launch import run_stage
from stages.paths import EXPORT, FINAL_CHECKPOINT
from unite.checkpoint import export_ema

def main() -> None:
    weights, config = export_ema(FINAL_CHECKPOINT, EXPORT)
    print(f"export: {weights} and {config}")


if __name__ == "__main__":
    run_stage(main)
