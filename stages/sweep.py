"""Stage sweep: the adaptive CFG search, optionally followed by the reference's wider sweep of
(normalisation order, CFG interval) points at the scale the search chose. Writes --metrics
(json: the metric, chosen setting, every point) and --table (tsv: the metric vs CFG scale, one row
per point).

sweep.metric says what the search minimises: the Frechet distance (FID in Inception space) or the
kernel distance (KID in Inception space: torch-fidelity's, the mean over sweep.kid_subsets random
subsets of sweep.kid_subset_size), whose features come from the same pass over the images and
from the reference set's kept features (fid_ref.set_images).

evaluate.protocol says which images the search scores (unite.evaluation.EvaluationProtocol):
"separate" (default) generates the sweep's own budget (sweep.num_images, sweep.seed, sweep.solver,
sweep.steps, sweep.block_size), so the reported scores are not tuned on the images they are
measured on; "reference" generates exactly the images that evaluate reports (evaluate's
num_images, seed, solver and steps) in the reference's blocks of 16, with TF32 matmuls on CUDA, as
the reference does, for comparison with its numbers. The wide points are reported and, as in the
reference, never change the chosen setting unless sweep.wide_changes_choice is true.

Runs under torchrun: every rank generates its share of each point's images, rank 0 scores them
as they arrive and shares the score, so that all ranks walk the same search."""

from pathlib import Path

import torch.distributed as dist

from stages.launch import StageArguments, run_stage
from stages.params import load_stage_params
from unite.cfg_search import adaptive_cfg_search, wide_sweep
from unite.config import ConfigError
from unite.distributed import close_runtime, init_runtime
from unite.evaluation import (EvaluationProtocol, allow_tf32_matmul, feature_space, generate_and_score,
                              load_exported_model, search_score)
from unite.metrics.fid import GaussianStats, ReferenceSet
from unite.sampling import Guidance


def arguments() -> StageArguments:
    """The paths dvc.yaml passes (`--help` lists them)."""
    parser = StageArguments("stages.sweep", __doc__)
    parser.add_input("--model", "file", "the exported EMA model (safetensors, with its .json config beside it)")
    parser.add_input("--reference", "file", "the reference set (npz) the images are scored against: its statistics, "
                                            "and its kept features for sweep.metric kernel_distance")
    parser.add_input("--shards", "folder", "the shard stage's output (the classifier feature space learns from train)")
    parser.add_output("--metrics", "file", "the chosen setting and every point (json)")
    parser.add_output("--table", "file", "one row per point (tsv)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = arguments().parse(argv)
    params = load_stage_params("sweep")
    sweep, ref = params["sweep"], params["fid_ref"]
    metric = sweep["metric"]
    protocol = EvaluationProtocol.named(params["evaluate"]["protocol"])
    images = protocol.search_images(params)
    runtime = init_runtime()
    allow_tf32_matmul(protocol.tf32, runtime.device)
    model = load_exported_model(args.model, runtime.device)
    space = reference = None
    if runtime.is_main:
        space = feature_space(ref["feature_space"], args.shards / "train", ref["inception_weights"],
                              str(runtime.device))
        reference = load_reference(args.reference, metric, sweep["kid_subset_size"])

    def evaluate(scale: float, interval: tuple[float, float], norm_order: str) -> float:
        guidance = Guidance(scale=scale, interval=interval, norm_order=norm_order)
        scores = generate_and_score(model, space, reference, images["num_images"], guidance, images["seed"],
                                    images["solver"], images["steps"], images["block_size"], runtime,
                                    is_split_order=protocol.is_split_order, kid_subsets=sweep["kid_subsets"],
                                    kid_subset_size=sweep["kid_subset_size"], with_precision_recall=False)
        value = [search_score(scores, metric) if scores else None]
        if runtime.world_size > 1:
            dist.broadcast_object_list(value, src=0)
        if runtime.is_main:
            print(f"sweep: cfg {scale:.2f} interval {interval} {norm_order}: {metric} {value[0]:.6g}", flush=True)
        return value[0]

    result = adaptive_cfg_search(
        evaluate, start=sweep["start_scale"], step=sweep["step"], max_extra_steps=sweep["max_extra_steps"],
        interval=tuple(sweep["interval"]), norm_order=sweep["norm_order"], metric=metric,
    )
    if sweep["wide"]:
        settings = [(point["norm_order"], tuple(point["interval"])) for point in sweep["wide"]]
        result = wide_sweep(evaluate, result, settings, may_change_choice=sweep["wide_changes_choice"])
    close_runtime()
    if runtime.is_main:
        kid = {key: sweep[key] for key in ("kid_subsets", "kid_subset_size")} if metric == "kernel_distance" else {}
        result.write(args.metrics, args.table, {**protocol.record(), "search_images": images, **kid})
        chosen = result.chosen
        print(f"sweep: chose cfg {chosen.scale:.2f} ({metric} {chosen.value:.6g}) after {len(result.points)} points")


def load_reference(path: Path, metric: str, kid_subset_size: int) -> GaussianStats | ReferenceSet:
    """What the points are scored against: the statistics for the Frechet distance; the kept
    features too for the kernel distance (not the spatial statistics: no sFID is needed), at least
    kid_subset_size of them, checked before any image is generated."""
    if metric == "frechet_distance":
        return GaussianStats.load(path)
    reference = ReferenceSet.load(path)
    kept = 0 if reference.features is None else len(reference.features)
    if kept < kid_subset_size:
        raise ConfigError(
            f"sweep.metric=kernel_distance, sweep.kid_subset_size={kid_subset_size}: the reference set {str(path)!r} "
            f"holds the features of {kept} images; raise fid_ref.set_images (and rerun fid_ref) or lower "
            f"sweep.kid_subset_size")
    return ReferenceSet(reference.stats, features=reference.features)


if __name__ == "__main__":
    run_stage(main)
