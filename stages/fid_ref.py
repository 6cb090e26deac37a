"""Stage fid_ref: reference statistics (data/fid_ref.npz) in the configured feature space, copied
from a precomputed npz or computed from the train shards."""

from pathlib import Path

from stages.launch import run_stage
from stages.params import load_params
from stages.shard import OUT as SHARDS
from unite.evaluation import feature_space, real_batches
from unite.data.shards import read_index
from unite.fid import GaussianStats, compute_reference_stats

OUT = Path("data/fid_ref.npz")


def main() -> None:
    params = load_params()["fid_ref"]
    if params["stats"] is not None:
        stats = GaussianStats.load(params["stats"])
        if stats.feature_space != params["feature_space"]:
            raise SystemExit(
                f"fid_ref.stats={params['stats']!r} holds {stats.feature_space} statistics, but "
                f"fid_ref.feature_space={params['feature_space']!r}"
            )
    else:
        space = feature_space(params["feature_space"], SHARDS / "train", params["inception_weights"])
        batches = (images for images, _ in real_batches(SHARDS / "train", params["batch_size"]))
        stats = compute_reference_stats(batches, space, total=read_index(SHARDS / "train")["totals"]["written"])
    stats.save(OUT)
    print(f"fid_ref: {stats.num_images} images, {stats.feature_space} space -> {OUT}")


if __name__ == "__main__":
    run_stage(main)
