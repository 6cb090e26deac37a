"""Stage fid_ref: reference statistics (data/fid_ref.npz) in the configured feature space, copied
from a precomputed npz or computed from the train shards."""


from stages.launch import run_stage
from stages.params import load_stage_params
from stages.paths import FID_REFERENCE, SHARDS
from unite.config import ConfigError
from unite.evaluation import feature_space, real_batches
from unite.data.shards import read_index
from unite.metrics.features import feature_space_kind
from unite.metrics.fid import GaussianStats, compute_reference_stats

def main() -> None:
    params = load_stage_params("fid_ref")["fid_ref"]
    if params["stats"] is not None:
        stats = GaussianStats.load(params["stats"])
        if feature_space_kind(stats.feature_space) != params["feature_space"]:
            raise ConfigError(
                f"fid_ref.stats={params['stats']!r} holds {stats.feature_space} statistics, but "
                f"fid_ref.feature_space={params['feature_space']!r}: the two must name the same kind of space"
            )
    else:
        space = feature_space(params["feature_space"], SHARDS / "train", params["inception_weights"])
        batches = (images for images, _ in real_batches(SHARDS / "train", params["batch_size"]))
        stats = compute_reference_stats(batches, space, total=read_index(SHARDS / "train")["totals"]["written"])
    stats.save(FID_REFERENCE)
    count = stats.num_images or "an unrecorded number of"  # JiT's files hold only mu and sigma
    print(f"fid_ref: {count} images, {stats.feature_space} space -> {FID_REFERENCE}")


if __name__ == "__main__":
    run_stage(main)
