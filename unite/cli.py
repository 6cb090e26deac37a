"""The `unite` command line: one subcommand per tool."""

from __future__ import annotations

import argparse
import sys


def _parity(args: argparse.Namespace) -> int:
    from unite.parity import run_parity

    return run_parity(args.fixture)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unite", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    parity = commands.add_parser(
        "parity", help="recompute a reference fixture's outputs and compare them within tolerance"
    )
    parity.add_argument("fixture", help="fixture .pt file (config, state_dict, inputs, outputs)")
    parity.set_defaults(handler=_parity)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
