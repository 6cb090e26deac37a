"""Stage evaluate: the reported scores at the setting the sweep chose (on images of their own
unless evaluate.protocol is "reference"):
Frechet distance (FID in Inception space, with IS and sFID), KID and precision/recall where the
reference set holds features, class consistency, reconstruction metrics on
the validation split, a per-class sample grid, and the provenance of the run. The protocol
(unite.evaluation.EvaluationProtocol) also sets the generation block size, the Inception Score's
splits and TF32; the metrics record the settings in effect.

Runs under torchrun: every rank generates its share of the images and passes each block on to
rank 0, which scores it, writes it to <samples>/images.npz and drops it (memory stays flat in the
image count); rank 0 does the rest."""

import json
from contextlib import ExitStack

from stages.launch import StageArguments, run_stage
from stages.params import load_stage_params
from unite.distributed import close_runtime, init_runtime
from unite.evaluation import (EvaluationProtocol, allow_tf32_matmul, feature_space, generate_and_score,
                              load_exported_model, load_split, reconstruct)
from unite.metrics.fid import ReferenceSet
from unite.generate import GridSamples, NpzImageWriter
from unite.metrics.class_consistency import ClassConsistency
from unite.metrics.pixel_classifiers import PixelClassifier
from unite.metrics.reconstruction import reconstruction_metrics
from unite.perceptual import build_lpips
from unite.provenance import run_environment
from unite.sampling import Guidance

GRID_MIN_CELL = 64  # pixels: smaller samples are enlarged (nearest neighbour) in the grid


def arguments() -> StageArguments:
    """The paths dvc.yaml passes (`--help` lists them)."""
    parser = StageArguments("stages.evaluate", __doc__)
    parser.add_input("--model", "file", "the exported EMA model (safetensors, with its .json config beside it)")
    parser.add_input("--sweep", "file", "the sweep stage's json; its chosen setting is evaluated")
    parser.add_input("--reference", "file", "the reference set (npz: statistics, features) to score against")
    parser.add_input("--shards", "folder", "the shard stage's output: train for the classifiers, val to reconstruct")
    parser.add_output("--samples", "folder", "images.npz (every generated image), grid.png and provenance.json")
    parser.add_output("--metrics", "file", "the scores (json)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = arguments().parse(argv)
    params = load_stage_params("evaluate")
    evaluate, ref = params["evaluate"], params["fid_ref"]
    protocol = EvaluationProtocol.named(evaluate["protocol"])
    generation = protocol.generation(evaluate)
    runtime = init_runtime()
    device = runtime.device
    allow_tf32_matmul(protocol.tf32, device)
    model = load_exported_model(args.model, device)
    chosen = json.loads(args.sweep.read_text())["chosen"]
    guidance = Guidance(scale=chosen["scale"], interval=tuple(chosen["interval"]), norm_order=chosen["norm_order"])
    space = reference = None
    consumers = []
    with ExitStack() as stack:
        if runtime.is_main:
            space = feature_space(ref["feature_space"], args.shards / "train", ref["inception_weights"], str(device))
            reference = ReferenceSet.load(args.reference)
            size = model.cfg.image_size
            args.samples.mkdir(parents=True, exist_ok=True)
            grid = GridSamples(model.cfg.num_classes, evaluate["grid_per_class"])
            npz = NpzImageWriter(args.samples / "images.npz", (evaluate["num_images"], size, size, 3))
            consumers = [stack.enter_context(npz), grid]
            if evaluate["class_consistency"]:
                consistency = ClassConsistency(PixelClassifier(*load_split(args.shards / "train")))
                consumers.append(consistency)
        scores = generate_and_score(model, space, reference, generation["num_images"], guidance, generation["seed"],
                                    generation["solver"], generation["steps"], generation["block_size"], runtime,
                                    consumers, is_split_order=protocol.is_split_order,
                                    kid_subsets=evaluate["kid_subsets"], kid_subset_size=evaluate["kid_subset_size"])
    close_runtime()
    if not runtime.is_main:
        return
    metrics = {**protocol.record(), "generation": {**scores, "cfg_scale": guidance.scale, **generation}}
    if evaluate["class_consistency"]:
        metrics["generation"]["class_consistency"] = consistency.value
    lpips = build_lpips().to(device) if evaluate["lpips"] else None
    pairs = reconstruct(model, args.shards / "val", evaluate["block_size"], evaluate["recon_images"], evaluate["seed"])
    metrics["reconstruction"] = reconstruction_metrics(pairs, feature_space=space, lpips=lpips)

    # Small images (the demo's 16-pixel digits) are enlarged so that the grid can be seen.
    grid.grid(scale=max(1, -(-GRID_MIN_CELL // size))).save(args.samples / "grid.png")
    (args.samples / "provenance.json").write_text(json.dumps(run_environment(device), indent=2) + "\n")
    args.metrics.parent.mkdir(parents=True, exist_ok=True)
    args.metrics.write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    run_stage(main)
