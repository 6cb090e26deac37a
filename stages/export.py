"""Stage export: the EMA weights of the final checkpoint as safetensors, with the model config
beside them (the same name, .json)."""

from stages.launch import StageArguments, run_stage
from unite.checkpoint import export_ema


def arguments() -> StageArguments:
    """The paths dvc.yaml passes (`--help` lists them)."""
    parser = StageArguments("stages.export", __doc__)
    parser.add_input("--checkpoint", "file", "the train stage's final checkpoint")
    parser.add_output("--out", "file", "the EMA weights (safetensors); the config goes beside it as .json")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = arguments().parse(argv)
    weights, config = export_ema(args.checkpoint, args.out)
    print(f"export: {weights} and {config}")


if __name__ == "__main__":
    run_stage(main)
