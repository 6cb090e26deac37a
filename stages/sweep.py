"""Stage sweep: the adaptive CFG search, optionally followed by the reference's wider sweep of
(normalisation order, CFG interval) points at the scale the search chose. Writes --metrics
(json: chosen setting, every point) and --table (tsv: Frechet distance vs CFG scale, one row per
point).

evaluate.protocol says which images the search scores (unite.evaluation.EvaluationProtocol):
"separate" (default) generates the sweep's own budget (sweep.num_images, sweep.seed, sweep.solver,
sweep.steps, sweep.block_size), so the reported scores are not tuned on the images they are
measured on; "reference" generates exactly the images that evaluate reports (evaluate's
num_images, seed, solver and steps) in the reference's blocks of 16, with TF32 matmuls on CUDA, as
the reference does, for comparison with its numbers. The wide points are reported and, as in the
reference, never change the chosen setting unless sweep.wide_changes_choice is true.

Runs under torchrun: every rank generates its share of each point's images, rank 0 scores them
as they arrive and shares the score, so that all ranks walk the same search."""

import torch.distributed as dist

from stages.launch import StageArguments, run_stage
from stages.params import load_stage_params
from unite.cfg_search import adaptive_cfg_search, wide_sweep
from unite.distributed import close_runtime, init_runtime
from unite.evaluation import (EvaluationProtocol, allow_tf32_matmul, feature_space, generate_and_score,
                              load_exported_model)
from unite.metrics.features import distance_key
from unite.metrics.fid import GaussianStats
from unite.sampling import Guidance

METRIC = "frechet_distance"


def arguments() -> StageArguments:
    """The paths dvc.yaml passes (`--help` lists them)."""
    parser = StageArguments("stages.sweep", __doc__)
    parser.add_input("--model", "file", "the exported EMA model (safetensors, with its .json config beside it)")
    parser.add_input("--reference", "file", "the reference statistics (npz) that the images are scored against")
    parser.add_input("--shards", "folder", "the shard stage's output (the classifier feature space learns from train)")
    parser.add_output("--metrics", "file", "the chosen setting and every point (json)")
    parser.add_output("--table", "file", "one row per point (tsv)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = arguments().parse(argv)
    params = load_stage_params("sweep")
    sweep, ref = params["sweep"], params["fid_ref"]
    protocol = EvaluationProtocol.named(params["evaluate"]["protocol"])
    images = protocol.search_images(params)
    runtime = init_runtime()
    allow_tf32_matmul(protocol.tf32, runtime.device)
    model = load_exported_model(args.model, runtime.device)
    space = reference = None
    if runtime.is_main:
        space = feature_space(ref["feature_space"], args.shards / "train", ref["inception_weights"],
                              str(runtime.device))
        reference = GaussianStats.load(args.reference)

    def evaluate(scale: float, interval: tuple[float, float], norm_order: str) -> float:
        guidance = Guidance(scale=scale, interval=interval, norm_order=norm_order)
        scores = generate_and_score(model, space, reference, images["num_images"], guidance, images["seed"],
                                    images["solver"], images["steps"], images["block_size"], runtime,
                                    is_split_order=protocol.is_split_order)
        value = [scores[distance_key(ref["feature_space"])] if scores else None]
        if runtime.world_size > 1:
            dist.broadcast_object_list(value, src=0)
        if runtime.is_main:
            print(f"sweep: cfg {scale:.2f} interval {interval} {norm_order}: {METRIC} {value[0]:.4f}", flush=True)
        return value[0]

    result = adaptive_cfg_search(
        evaluate, start=sweep["start_scale"], step=sweep["step"], max_extra_steps=sweep["max_extra_steps"],
        interval=tuple(sweep["interval"]), norm_order=sweep["norm_order"], metric=METRIC,
    )
    if sweep["wide"]:
        settings = [(point["norm_order"], tuple(point["interval"])) for point in sweep["wide"]]
        result = wide_sweep(evaluate, result, settings, may_change_choice=sweep["wide_changes_choice"])
    close_runtime()
    if runtime.is_main:
        result.write(args.metrics, args.table, {**protocol.record(), "search_images": images})
        chosen = result.chosen
        print(f"sweep: chose cfg {chosen.scale:.2f} ({METRIC} {chosen.value:.4f}) after {len(result.points)} points")


if __name__ == "__main__":
    run_stage(main)
