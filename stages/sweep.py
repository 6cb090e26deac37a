"""Stage sweep: the adaptive CFG search on its own budget of samples (its own seed, not the images
that evaluate reports), optionally followed by a wider sweep of CFG intervals and normalisation
orders at the best scale. Writes metrics/sweep.json (chosen setting, every point) and
metrics/sweep.tsv (Frechet distance vs CFG scale).

Runs under torchrun: every rank generates its share of each point's images, rank 0 scores them
and shares the score, so that all ranks walk the same search."""

from pathlib import Path

import torch.distributed as dist

from stages.export import OUT as MODEL
from stages.fid_ref import OUT as REFERENCE
from stages.launch import run_stage
from stages.params import load_params
from stages.shard import OUT as SHARDS
from unite.cfg_search import CfgResult, adaptive_cfg_search, cfg_sweep
from unite.distributed import close_runtime, init_runtime
from unite.evaluation import feature_space, generate_and_score, load_exported_model
from unite.fid import GaussianStats, distance_key
from unite.sampling import Guidance

METRICS_JSON = Path("metrics/sweep.json")
METRICS_TSV = Path("metrics/sweep.tsv")
METRIC = "frechet_distance"


def main() -> None:
    params = load_params()
    sweep, ref = params["sweep"], params["fid_ref"]
    runtime = init_runtime()
    model = load_exported_model(MODEL, runtime.device)
    space = reference = None
    if runtime.is_main:
        space = feature_space(ref["feature_space"], SHARDS / "train", ref["inception_weights"], str(runtime.device))
        reference = GaussianStats.load(REFERENCE)

    def evaluate(scale: float, interval: tuple[float, float], norm_order: str) -> float:
        guidance = Guidance(scale=scale, interval=interval, norm_order=norm_order)
        scored = generate_and_score(model, space, reference, sweep["num_images"], guidance, sweep["seed"],
                                    sweep["solver"], sweep["steps"], sweep["block_size"], runtime)
        value = [scored[0][distance_key(ref["feature_space"])] if scored else None]
        if runtime.world_size > 1:
            dist.broadcast_object_list(value, src=0)
        if runtime.is_main:
            print(f"sweep: cfg {scale:.2f} interval {interval} {norm_order}: {METRIC} {value[0]:.4f}", flush=True)
        return value[0]

    result = adaptive_cfg_search(
        evaluate, start=sweep["start_scale"], step=sweep["step"], max_extra_steps=sweep["max_extra_steps"],
        interval=tuple(sweep["interval"]), norm_order=sweep["norm_order"], metric=METRIC,
    )
    if sweep["wide_intervals"] or sweep["wide_norm_orders"]:
        # The wider sweep: other CFG intervals and normalisation orders at the best scale.
        wide = cfg_sweep(
            evaluate, [result.chosen.scale], [tuple(i) for i in sweep["wide_intervals"]] or [tuple(sweep["interval"])],
            sweep["wide_norm_orders"] or [sweep["norm_order"]], known=result.points, metric=METRIC,
        )
        points = result.points + [p for p in wide.points if p not in result.points]
        result = CfgResult(min(points, key=lambda p: p.value), points, METRIC)
    close_runtime()
    if runtime.is_main:
        result.write(METRICS_JSON, METRICS_TSV)
        chosen = result.chosen
        print(f"sweep: chose cfg {chosen.scale:.2f} ({METRIC} {chosen.value:.4f}) after {len(result.points)} points")


if __name__ == "__main__":
    run_stage(main)
