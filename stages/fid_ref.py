"""Stage fid_ref: reference statistics (an npz) in the configured feature space, copied from a
precomputed npz (fid_ref.stats) or computed from the train shards."""

from stages.launch import StageArguments, run_stage
from stages.params import load_stage_params
from unite.config import ConfigError
from unite.evaluation import feature_space, real_batches
from unite.data.shards import read_index
from unite.metrics.features import feature_space_kind
from unite.metrics.fid import GaussianStats, compute_reference_stats


def arguments() -> StageArguments:
    """The paths dvc.yaml passes (`--help` lists them)."""
    parser = StageArguments("stages.fid_ref", __doc__)
    parser.add_input("--shards", "folder", "the shard stage's output; the statistics are of its train split")
    parser.add_output("--out", "file", "the reference statistics (npz)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = arguments().parse(argv)
    train_shards = args.shards / "train"
    params = load_stage_params("fid_ref")["fid_ref"]
    if params["stats"] is not None:
        stats = GaussianStats.load(params["stats"])
        if feature_space_kind(stats.feature_space) != params["feature_space"]:
            raise ConfigError(
                f"fid_ref.stats={params['stats']!r} holds {stats.feature_space} statistics, but "
                f"fid_ref.feature_space={params['feature_space']!r}: the two must name the same kind of space"
            )
    else:
        space = feature_space(params["feature_space"], train_shards, params["inception_weights"])
        batches = (images for images, _ in real_batches(train_shards, params["batch_size"]))
        stats = compute_reference_stats(batches, space, total=read_index(train_shards)["totals"]["written"])
    stats.save(args.out)
    count = stats.num_images or "an unrecorded number of"  # JiT's files hold only mu and sigma
    print(f"fid_ref: {count} images, {stats.feature_space} space -> {args.out}")


if __name__ == "__main__":
    run_stage(main)
