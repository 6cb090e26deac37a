"""The `unite` command line: one subcommand per tool."""

from __future__ import annotations

import argparse
import sys


def _parity(args: argparse.Namespace) -> int:
    from unite.parity import run_parity

    return run_parity(args.fixture)


def _fid(args: argparse.Namespace) -> int:
    from unite.fid import MetricsInputError, run_fid

    try:
        return run_fid(args.gen, args.ref, inception_weights=args.inception_weights,
                       feature_space=args.feature_space, batch_size=args.batch_size, device=args.device,
                       num_workers=args.num_workers, recursive=args.recursive, is_splits=args.is_splits,
                       as_json=args.json)
    except MetricsInputError as exc:
        print(f"unite fid: error: {exc}", file=sys.stderr)
        return 2


def _fid_stats(args: argparse.Namespace) -> int:
    from unite.fid import MetricsInputError, run_fid_stats

    try:
        return run_fid_stats(args.source, args.out, inception_weights=args.inception_weights,
                             feature_space=args.feature_space, batch_size=args.batch_size, device=args.device,
                             num_workers=args.num_workers, recursive=args.recursive)
    except MetricsInputError as exc:
        print(f"unite fid-stats: error: {exc}", file=sys.stderr)
        return 2


def _add_feature_args(command: argparse.ArgumentParser) -> None:
    command.add_argument("--inception-weights", metavar="PATH", default=None,
                         help="weights-inception-2015-12-05-6726825d.pth (default: env INCEPTION_WEIGHTS)")
    command.add_argument("--feature-space", choices=("inception", "pixel"), default="inception",
                         help="inception: FID/IS; pixel: Frechet distance on 8x8 pixels (demo, no weights)")
    command.add_argument("--batch-size", type=int, default=64)
    command.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    command.add_argument("--num-workers", type=int, default=0, help="image decoding processes")
    command.add_argument("--recursive", action="store_true", help="also read images in subfolders")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unite", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    parity = commands.add_parser(
        "parity", help="recompute a reference fixture's outputs and compare them within tolerance"
    )
    parity.add_argument("fixture", help="fixture .pt file (config, state_dict, inputs, outputs)")
    parity.set_defaults(handler=_parity)

    fid = commands.add_parser("fid", help="FID and Inception Score of generated images against a reference")
    fid.add_argument("gen", help="generated images: a folder of PNG/JPEG files or a uint8 image .npz")
    fid.add_argument("ref", nargs="?", default=None,
                     help="reference: statistics .npz (mu, sigma; several shards: write one with fid-stats), "
                          "image folder, image .npz or one .tar shard (default: env IN256_FID_STATS)")
    _add_feature_args(fid)
    fid.add_argument("--is-splits", type=int, default=10)
    fid.add_argument("--json", action="store_true", help="print one JSON object")
    fid.set_defaults(handler=_fid)

    fid_stats = commands.add_parser("fid-stats", help="write reference statistics (mu, sigma) of real images")
    fid_stats.add_argument("source", nargs="+", help="an image folder, an image .npz, or webdataset .tar shards")
    fid_stats.add_argument("out", help="output statistics .npz")
    _add_feature_args(fid_stats)
    fid_stats.set_defaults(handler=_fid_stats)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
