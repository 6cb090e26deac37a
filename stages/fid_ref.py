"""Stage fid_ref: the reference set (an npz) in the configured feature space: Gaussian statistics
(FID), spatial statistics (sFID, Inception only) and the features of up to fid_ref.set_images
images (KID, precision/recall). From an ADM reference batch (fid_ref.reference_batch), or from
precomputed statistics (fid_ref.stats) with the rest from the shards, or all from the shards of
fid_ref.split."""

from collections.abc import Iterable, Iterator

from torch import Tensor

from stages.launch import StageArguments, run_stage
from stages.params import load_stage_params
from unite.config import ConfigError
from unite.evaluation import feature_space, real_batches
from unite.data.shards import read_index
from unite.metrics.features import feature_space_kind
from unite.metrics.fid import GaussianStats, ReferenceSet, compute_reference_set


def arguments() -> StageArguments:
    """The paths dvc.yaml passes (`--help` lists them)."""
    parser = StageArguments("stages.fid_ref", __doc__)
    parser.add_input("--shards", "folder", "the shard stage's output; the reference is of its fid_ref.split split")
    parser.add_output("--out", "file", "the reference set (npz)")
    return parser


def first_images(batches: Iterable[Tensor], count: int) -> Iterator[Tensor]:
    """The batches cut to their first `count` images."""
    for batch in batches:
        if count <= 0:
            return
        yield batch[:count]
        count -= len(batch)


def main(argv: list[str] | None = None) -> None:
    args = arguments().parse(argv)
    params = load_stage_params("fid_ref")["fid_ref"]
    if params["stats"] is not None and params["reference_batch"] is not None:
        raise ConfigError(f"fid_ref.stats={params['stats']!r} and fid_ref.reference_batch="
                          f"{params['reference_batch']!r}: give one (a reference batch holds its own statistics)")
    shards = args.shards / params["split"]
    batches = (images for images, _ in real_batches(shards, params["batch_size"]))
    if params["stats"] is None or params["set_images"]:  # else nothing is computed
        space = feature_space(params["feature_space"], args.shards / "train", params["inception_weights"])
    if params["reference_batch"] is not None:
        reference = ReferenceSet.from_adm_batch(params["reference_batch"], space, batch_size=params["batch_size"])
    elif params["stats"] is not None:
        stats = GaussianStats.load(params["stats"])
        if feature_space_kind(stats.feature_space) != params["feature_space"]:
            raise ConfigError(
                f"fid_ref.stats={params['stats']!r} holds {stats.feature_space} statistics, but "
                f"fid_ref.feature_space={params['feature_space']!r}: the two must name the same kind of space"
            )
        # The spatial statistics and the features come from the split's first set_images images.
        extra = None
        if params["set_images"]:
            extra = compute_reference_set(first_images(batches, params["set_images"]), space,
                                          set_images=params["set_images"])
        reference = ReferenceSet(stats, extra and extra.spatial, extra and extra.features)
    else:
        reference = compute_reference_set(batches, space, set_images=params["set_images"],
                                          total=read_index(shards)["totals"]["written"])
    reference.save(args.out)
    count = reference.stats.num_images or "an unrecorded number of"  # JiT's files hold only mu and sigma
    kept = 0 if reference.features is None else len(reference.features)
    spatial = "with" if reference.spatial is not None else "without"
    print(f"fid_ref: statistics of {count} images, features of {kept}, {spatial} spatial statistics, "
          f"{reference.stats.feature_space} space -> {args.out}")


if __name__ == "__main__":
    run_stage(main)
