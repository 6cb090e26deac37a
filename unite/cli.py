"""The `unite` command line: one subcommand per tool."""

from __future__ import annotations

import argparse
import sys

from unite.options import NORM_ORDERS, SOLVERS


def _parity(args: argparse.Namespace) -> int:
    from unite.parity import run_parity

    return run_parity(args.fixture, trust_pickle=args.trust_pickle)


def _feature_space(args: argparse.Namespace):
    """The feature space of `--feature-space`, on `--device` (auto: cuda if available)."""
    import torch

    from unite.metrics.features import build_feature_space

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return build_feature_space(args.feature_space, inception_weights=args.inception_weights, device=device)


def _fid(args: argparse.Namespace) -> int:
    import json

    from unite.data.errors import DataError
    from unite.data.readers import open_images
    from unite.metrics.fid import evaluate_images, load_reference, resolve_reference_stats
    from unite.metrics.inputs import MetricsInputError

    reading = dict(batch_size=args.batch_size, num_workers=args.num_workers, recursive=args.recursive)
    try:
        ref = str(args.ref if args.ref is not None else resolve_reference_stats(None))
        space = _feature_space(args)
        reference = load_reference(ref, space, set_images=args.ref_images if args.kid_prc else 0, **reading)
        if args.kid_prc and reference.features is None:
            raise MetricsInputError(
                f"--kid-prc: the reference {ref!r} holds statistics only; KID and precision/recall need reference "
                f"images (a folder, an image npz, shards or an ADM reference batch with arr_0)")
        batches, total = open_images(args.gen, **reading)
        result = evaluate_images(batches, reference, space, total=total, is_splits=args.is_splits,
                                 kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size,
                                 device=getattr(space, "device", "cpu"))
    except (MetricsInputError, DataError) as exc:
        print(f"unite fid: error: {exc}", file=sys.stderr)
        return 2
    result["gen"], result["ref"] = str(args.gen), ref
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0


def _fid_stats(args: argparse.Namespace) -> int:
    from unite.data.errors import DataError
    from unite.data.readers import open_images
    from unite.metrics.fid import compute_reference_set
    from unite.metrics.inputs import MetricsInputError

    try:
        space = _feature_space(args)
        batches, total = open_images(args.source, batch_size=args.batch_size, num_workers=args.num_workers,
                                     recursive=args.recursive)
        reference = compute_reference_set(batches, space, set_images=args.ref_images, total=total)
    except (MetricsInputError, DataError) as exc:
        print(f"unite fid-stats: error: {exc}", file=sys.stderr)
        return 2
    reference.save(args.out)
    stats, kept = reference.stats, 0 if reference.features is None else len(reference.features)
    spatial = ", spatial statistics" if reference.spatial is not None else ""
    print(f"wrote {args.out}: {stats.num_images} images, {stats.mu.shape[0]} features ({space.name}){spatial}, "
          f"features of {kept} images", file=sys.stderr)
    return 0


def _add_feature_args(command: argparse.ArgumentParser) -> None:
    command.add_argument("--inception-weights", metavar="PATH", default=None,
                         help="weights-inception-2015-12-05-6726825d.pth (default: env INCEPTION_WEIGHTS)")
    command.add_argument("--feature-space", choices=("inception", "pixel"), default="inception",
                         help="inception: FID/IS; pixel: Frechet distance on 8x8 pixels (demo, no weights)")
    command.add_argument("--batch-size", type=int, default=64)
    command.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    command.add_argument("--num-workers", type=int, default=0, help="image decoding processes")
    command.add_argument("--recursive", action="store_true", help="also read images in subfolders")


def _add_trust_pickle(command: argparse.ArgumentParser) -> None:
    command.add_argument("--trust-pickle", action="store_true",
                         help="fully unpickle a file that holds more than tensors and plain values; that can "
                              "run any code the file holds, so only for files you trust (a warning is printed)")


def _generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from unite.config import ConfigError
    from unite.distributed import close_runtime, init_runtime
    from unite.evaluation import load_exported_model
    from unite.generate import generate, sample_grid, write_npz, write_pngs
    from unite.sampling import Guidance

    try:
        runtime = init_runtime(args.device)
    except ConfigError as exc:
        print(f"unite generate: error: {exc}", file=sys.stderr)
        return 2
    model = load_exported_model(args.model, runtime.device)
    guidance = Guidance(scale=args.cfg_scale, interval=tuple(args.interval), norm_order=args.norm_order)
    out = Path(args.out)
    for indices, _, images in generate(model, args.num_images, guidance, seed=args.seed, block_size=args.block_size,
                                       rank=runtime.rank, world_size=runtime.world_size, solver=args.solver,
                                       steps=args.steps):
        write_pngs(out, indices, images)
    if runtime.world_size > 1:
        import torch.distributed as dist

        dist.barrier()
    close_runtime()
    if runtime.is_main:
        if args.npz:
            write_npz(out, args.num_images, Path(args.npz))
        if args.grid:
            import numpy as np
            from PIL import Image

            per_class = args.grid_per_class
            classes = model.cfg.num_classes
            shown = [i for i in range(args.num_images) if i // classes < per_class]
            images = np.stack([np.asarray(Image.open(out / f"{i:06d}.png").convert("RGB")) for i in shown])
            sample_grid(images, np.array(shown) % classes, classes, per_class).save(args.grid)
        print(f"unite generate: {args.num_images} images in {out}")
    return 0


def _import_reference(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    from unite.config import model_config
    from unite.model import UNITE
    from unite.reference import load_reference_state_dict
    from unite.safe_load import UntrustedPickleError

    cfg = model_config(args.encoder, args.decoder, perceptual_weight=0.0, num_classes=args.num_classes,
                       image_size=args.image_size, patch_size=args.patch_size,
                       num_latent_tokens=(args.image_size // args.patch_size) ** 2, latent_dim=args.latent_dim)
    model = UNITE(cfg)
    try:
        load_reference_state_dict(model, args.checkpoint, weights=args.weights, trust_pickle=args.trust_pickle)
    except UntrustedPickleError as exc:
        print(f"unite import-reference: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
    info = {"model_config": cfg.to_dict(), "source_checkpoint": str(args.checkpoint), "weights": args.weights}
    out.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"unite import-reference: {args.weights} weights of {args.checkpoint} -> {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unite", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    parity = commands.add_parser(
        "parity", help="recompute a reference fixture's outputs and compare them within tolerance"
    )
    parity.add_argument("fixture", help="fixture .pt file (config, state_dict, inputs, outputs)")
    _add_trust_pickle(parity)
    parity.set_defaults(handler=_parity)

    fid = commands.add_parser("fid", help="FID, sFID, Inception Score, KID, precision and recall of generated images "
                                          "against a reference, from one pass over the images")
    fid.add_argument("gen", help="generated images: a folder of PNG/JPEG files or a uint8 image .npz")
    fid.add_argument("ref", nargs="?", default=None,
                     help="reference: statistics .npz (mu, sigma, and mu_s, sigma_s for sFID; several shards: write "
                          "one with fid-stats), an ADM reference batch .npz (arr_0 images and those statistics), "
                          "image folder, image .npz or one .tar shard (default: env IN256_FID_STATS)")
    _add_feature_args(fid)
    fid.add_argument("--is-splits", type=int, default=10)
    fid.add_argument("--kid-prc", action="store_true",
                     help="also KID and precision/recall (k=3): they need the features of reference images, so REF "
                          "must be images or an ADM reference batch, and the generated features are kept "
                          "(8 KB per Inception image)")
    fid.add_argument("--ref-images", type=int, default=10000,
                     help="with --kid-prc: the reference images (the first) whose features are kept (the ADM "
                          "reference batch's 10000; all of an ADM batch's arr_0 are used)")
    fid.add_argument("--kid-subsets", type=int, default=100, help="KID: random subsets averaged (torch-fidelity's 100)")
    fid.add_argument("--kid-subset-size", type=int, default=1000,
                     help="KID: images per subset, at most both counts (torch-fidelity's 1000)")
    fid.add_argument("--json", action="store_true", help="print one JSON object")
    fid.set_defaults(handler=_fid)

    fid_stats = commands.add_parser("fid-stats", help="write reference statistics (mu, sigma; mu_s, sigma_s in "
                                                       "Inception space) of real images")
    fid_stats.add_argument("source", nargs="+", help="an image folder, an image .npz, or .tar shards of any store "
                                                       "(png, npy, source; cropped to the size in their index.json)")
    fid_stats.add_argument("out", help="output statistics .npz")
    _add_feature_args(fid_stats)
    fid_stats.add_argument("--ref-images", type=int, default=0,
                           help="also keep the features of the first N images, for `unite fid --kid-prc`")
    fid_stats.set_defaults(handler=_fid_stats)

    gen = commands.add_parser(
        "generate",
        help="generate class-balanced images from an EMA export (torchrun splits the work across ranks)",
    )
    gen.add_argument("model", help="EMA export: .safetensors with its .json config beside it")
    gen.add_argument("--out", required=True, help="folder for {index:06d}.png files")
    gen.add_argument("--num-images", type=int, required=True)
    gen.add_argument("--seed", type=int, default=0, help="image i's noise depends only on (seed, i)")
    gen.add_argument("--cfg-scale", type=float, default=1.0)
    gen.add_argument("--interval", type=float, nargs=2, default=(0.1, 1.0), metavar=("LOW", "HIGH"))
    gen.add_argument("--norm-order", default="norm_first", choices=NORM_ORDERS)
    gen.add_argument("--solver", default="dopri5", choices=SOLVERS)
    gen.add_argument("--steps", type=int, default=49, help="steps of the fixed-step solvers")
    gen.add_argument("--block-size", type=int, default=64, help="images sampled together")
    gen.add_argument("--npz", help="also write all images as one uint8 (N, H, W, 3) npz")
    gen.add_argument("--grid", help="also write a per-class sample grid PNG")
    gen.add_argument("--grid-per-class", type=int, default=8)
    gen.add_argument("--device", default="auto", help="auto, cpu, cuda (ranks take cuda:LOCAL_RANK) or cuda:N")
    gen.set_defaults(handler=_generate)

    imp = commands.add_parser(
        "import-reference", help="convert a released reference checkpoint to an EMA export for sampling"
    )
    imp.add_argument("checkpoint", help="reference .pt (holding model and ema) or a bare state dict")
    imp.add_argument("--out", required=True, help="output .safetensors (a .json config is written beside it)")
    imp.add_argument("--weights", default="ema", choices=["ema", "model"])
    imp.add_argument("--encoder", default="B", help="encoder size name (Tiny, B, M, L, XL)")
    imp.add_argument("--decoder", default="B", help="decoder size name (Tiny, S, B, L)")
    imp.add_argument("--num-classes", type=int, default=1000)
    imp.add_argument("--image-size", type=int, default=256)
    imp.add_argument("--patch-size", type=int, default=16)
    imp.add_argument("--latent-dim", type=int, default=32)
    _add_trust_pickle(imp)
    imp.set_defaults(handler=_import_reference)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
