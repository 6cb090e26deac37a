"""Rehearse a recipe from presets/ end to end in miniature before spending GPU-days on it:

    python -m stages.rehearse unite-b            # one preset
    python -m stages.rehearse --all              # every preset in presets/
    python -m stages.rehearse unite-b-release --true-size --nproc 8 --nnodes 1 --json   # dry run at true size

In a temporary copy of this repository (the workspace's params and data, and the machine's
checkpoint store, are never touched), it runs exactly what a user runs for the real thing,
`python -m stages.preset NAME` and `dvc repro`, with only the sizes shrunk (model widths and depths, image size, class count, image
counts, steps, batch sizes, process counts): every other setting and code path stays, so a preset
that would stop after hours of sharding or days of training stops here in minutes.

What it stands in for, since nothing can be downloaded: an ImageNet-layout folder of JPEGs of
varied sizes (`data/imagenet/{train,val}/<wnid>/*.JPEG`), a JiT-format statistics file (only `mu`
and `sigma`), and random Inception and VGG16 weights in a throwaway cache (INCEPTION_WEIGHTS,
TORCH_HOME). The metrics mark those weights as not official, and the scores mean nothing; what
counts is that every stage ran.

`--true-size` checks what the rehearsal shrinks: it runs no pipeline, but the preset's training
step, generation block and scoring at their true sizes on torch's fake tensors
(`unite.dry_run`), and prints the recipe on `--nnodes` x `--nproc` GPUs, the peak memory per
GPU, the FLOPs per image, the host syncs per optimizer step and the speed they imply. It fails
(exit 1, naming the place) when a tensor lands on the wrong device or a preset does not fit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

from unite.data.image import center_crop, to_rgb
from unite.metrics.features import InceptionFeatures
from unite.metrics.fid import extract
from unite.perceptual import VGG16_FILE
from unite.sampling import Guidance
from unite.stand_in_weights import write_random_inception_weights, write_random_vgg16_trunk

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "presets"

CLASSES = 4
TRAIN_PER_CLASS = 12
VAL_PER_CLASS = 4
IMAGE_SIZE = 32
PER_DEVICE_BATCH = 2
ACCUMULATION = 2  # micro-batches per optimizer step, as the presets have


def shrunk_sizes(nproc: int, num_train: int) -> dict[str, Any]:
    """The sizes a rehearsal changes; everything else keeps the preset's value."""
    evaluation = {"nproc_per_node": nproc, "num_images": 4 * CLASSES, "block_size": 4}
    search = {"nproc_per_node": nproc, "num_images": 3 * CLASSES, "block_size": 4}  # per point; IS needs 10
    return {
        "shard": {"image_size": IMAGE_SIZE, "shard_size": 8, "workers": 2},
        "fid_ref": {"batch_size": 16, "set_images": 16},
        "train": {
            "nproc_per_node": nproc,
            "model": {
                "encoder_depth": 5, "encoder_hidden": 64, "encoder_heads": 2, "in_context_len": 4,
                "decoder_layers": 1, "decoder_hidden": 64, "decoder_heads": 2, "decoder_mlp": 128,
                "decoder_proj_dim": 64, "image_size": IMAGE_SIZE, "patch_size": 8, "num_latent_tokens": 16,
                "num_classes": CLASSES,
            },
            "per_device_batch": PER_DEVICE_BATCH,
            "global_batch": PER_DEVICE_BATCH * nproc * ACCUMULATION,
            "max_steps": 8,  # crosses an epoch boundary: an epoch is 6 optimizer steps on 2 ranks
            "log_every": 2,
            "checkpoint_every": 4,
            "num_workers": 1,
        },
        "schedule": {"images_per_epoch": num_train},
        "sweep": {**search, "max_extra_steps": 1, "steps": 4, "kid_subset_size": 8},
        "evaluate": {**evaluation, "steps": 4, "grid_per_class": 2, "recon_images": 8, "kid_subset_size": 8},
    }


def fewer_wide_points(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The wider sweep's first point of each normalisation order: every path of the wide sweep at
    a fraction of its points (each point generates and scores a whole image budget)."""
    firsts: dict[str, dict[str, Any]] = {}
    for point in points:
        firsts.setdefault(point["norm_order"], point)
    return list(firsts.values())


def apply_sizes(params: dict[str, Any], sizes: dict[str, Any]) -> dict[str, Any]:
    """Overwrite the size keys in params (train.model and train.schedule key by key) and keep
    fewer of the wider sweep's points."""
    params["sweep"]["wide"] = fewer_wide_points(params["sweep"]["wide"])
    for section, values in sizes.items():
        if section == "schedule":
            schedule = params["train"]["schedule"]
            if "images_per_epoch" in schedule:  # the unite_b schedule counts the data set's images
                schedule.update(values)
            continue
        for key, value in values.items():
            if key == "model":
                params[section]["model"].update(value)
            elif key in params[section]:
                params[section][key] = value
            else:
                raise KeyError(f"params.yaml has no {section}.{key}: the rehearsal's sizes are out of date")
    return params


def write_imagenet_folder(root: Path, seed: int = 0) -> None:
    """JPEGs in ImageNet's layout and naming, of varied sizes and aspect ratios (some large enough
    for the crop's BOX halving, one grayscale), each class with its own colour."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for cls in range(CLASSES):
            wnid = f"n{1440764 + cls:08d}"
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            colour = rng.uniform(40, 215, 3)
            for index in range(count):
                width, height = (int(v) for v in rng.integers(24, 160, 2))  # some below the crop: upsampled
                ramp = np.linspace(-1, 1, width)[None, :, None] * rng.uniform(-40, 40, 3)
                noise = rng.normal(0, 25, (height, width, 3))
                pixels = np.clip(colour + ramp + noise, 0, 255).astype(np.uint8)
                image = Image.fromarray(pixels)
                if split == "train" and cls == 0 and index == 0:
                    image = image.convert("L")  # ImageNet holds a few grayscale JPEGs
                image.save(folder / f"{wnid}_{1000 + index}.JPEG", quality=90)


def crops(folder: Path) -> torch.Tensor:
    """uint8 (N, 3, S, S) centre crops of every JPEG under folder."""
    images = [np.asarray(center_crop(to_rgb(Image.open(p)), IMAGE_SIZE)) for p in sorted(folder.rglob("*.JPEG"))]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def write_jit_stats(path: Path, images: torch.Tensor, inception_weights: Path) -> None:
    """mu and sigma of the images' Inception features, and nothing else: JiT's file format."""
    stats = extract(InceptionFeatures(inception_weights), images.split(16), progress=False).stats
    np.savez(path, mu=stats.mu, sigma=stats.sigma)


def pipeline_outputs(root: Path) -> set[str]:
    """dvc.lock and every path that a stage of root's dvc.yaml writes (outs, metrics, plots)."""
    stages = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages", {})
    outputs = {"dvc.lock"}
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                outputs.add(str(next(iter(entry)) if isinstance(entry, dict) else entry).rstrip("/"))
    return outputs


def copy_files(target: Path, source: Path = ROOT) -> None:
    """Copy source's tracked files (git's index, as they are in the working tree) into target, as
    a fresh clone has them: nothing untracked, and never dvc.lock or a stage's output, even if
    tracked, so the copy starts from a pipeline that has never run."""
    listed = subprocess.run(["git", "ls-files", "-c", "-z"], cwd=source, capture_output=True, text=True,
                            check=True).stdout.split("\0")
    outputs = pipeline_outputs(source)
    for name in listed:
        produced = any(name == out or name.startswith(f"{out}/") for out in outputs)
        if name and not produced and (source / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, target / name)


def copy_repository(target: Path) -> None:
    """copy_files into a new git repository with one commit, as a clone is."""
    copy_files(target)
    identity = ["-c", "user.name=unite-rehearsal", "-c", "user.email=rehearsal@localhost"]
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", *identity, "commit", "-qm", "rehearsal"]):
        subprocess.run(command, cwd=target, check=True, capture_output=True)


def run(command: list[str], cwd: Path, env: dict[str, str]) -> None:
    """Run a user command with its output on this console; stop on failure."""
    print(f"\n$ {' '.join(command)}", flush=True)
    result = subprocess.run(command, cwd=cwd, env=env)
    if result.returncode != 0:
        raise RehearsalFailed(f"`{' '.join(command)}` failed with exit code {result.returncode} in {cwd}")


class RehearsalFailed(RuntimeError):
    pass


def rehearse(preset: str, workdir: Path, nproc: int = 2, device: str = "auto") -> dict[str, Any]:
    """Rehearse one preset in workdir (created; must not exist); returns metrics/eval.json."""
    repo, cache = workdir / "repo", workdir / "stand-ins"
    repo.mkdir(parents=True)
    copy_repository(repo)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "TORCH_HOME": str(cache / "torch"), "INCEPTION_WEIGHTS": str(cache / "inception-random.pth"),
           "UNITE_CHECKPOINT_STORE": str(workdir / "checkpoint-store")}  # never the machine's store
    env.setdefault("OMP_NUM_THREADS", "1")  # several ranks and loader workers share a few cores
    run([sys.executable, "-m", "stages.preset", preset], repo, env)

    params_file = repo / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    source = repo / params["manifest"]["root"]
    write_imagenet_folder(source)
    sizes = shrunk_sizes(nproc, num_train=CLASSES * TRAIN_PER_CLASS)
    params = apply_sizes(params, sizes)
    params["train"]["device"] = device
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    print(f"\nrehearsal: {preset} with sizes shrunk: {json.dumps(sizes)}", flush=True)

    val_crops = crops(source / "val")  # any images serve: a third of train's Inception passes
    write_random_vgg16_trunk(cache / "torch" / "hub" / "checkpoints" / VGG16_FILE)
    write_random_inception_weights(env["INCEPTION_WEIGHTS"], val_crops)
    if params["fid_ref"]["stats"] is not None:
        write_jit_stats(repo / params["fid_ref"]["stats"], val_crops, Path(env["INCEPTION_WEIGHTS"]))

    run(["dvc", "repro"], repo, env)
    return json.loads((repo / "metrics" / "eval.json").read_text())


def true_size(preset: str, nproc: int | None, nnodes: int, gpu_memory_gib: float) -> dict[str, Any]:
    """The dry run of `preset` at its true size on nnodes x nproc GPUs (`unite.dry_run`); nproc
    None takes the preset's train.nproc_per_node."""
    from stages.params import train_config
    from stages.preset import preset_params
    from unite.dry_run import Generation, dry_run
    from unite.evaluation import EvaluationProtocol

    params = preset_params(preset, ROOT / "params.yaml", PRESETS)
    sweep, evaluate = params["sweep"], params["evaluate"]
    cfg = train_config(params["train"], out_dir="checkpoints", data={"kind": "synthetic", "num_images": 1})
    nproc = params["train"]["nproc_per_node"] if nproc is None else nproc
    protocol = EvaluationProtocol.named(evaluate["protocol"])
    blocks = (protocol.search_images(params)["block_size"], protocol.generation(evaluate)["block_size"])
    generation = Generation(
        block_size=max(blocks),
        guidance=Guidance(sweep["start_scale"], tuple(sweep["interval"]), sweep["norm_order"]),
        lpips=evaluate["lpips"],
        inception=params["fid_ref"]["feature_space"] == "inception",
        scored_images=evaluate["num_images"],
        reference_features=params["fid_ref"]["set_images"],
        kid_subset_size=evaluate["kid_subset_size"],
    )
    report = dry_run(cfg, nproc * nnodes, generation, gpu_memory_gib=gpu_memory_gib)
    return {"preset": preset, "nnodes": nnodes, "nproc_per_node": nproc, **report}


def summary(report: dict[str, Any]) -> str:
    """The dry run's report in a few lines."""
    recipe, memory, flops, speed = report["recipe"], report["memory"], report["flops"], report["throughput"]
    features = memory["evaluation_features"]
    fits = "fits" if memory["fits"] else "DOES NOT FIT"
    return "\n".join([
        f"dry run: {report['preset']} on {report['nnodes']} x {report['nproc_per_node']} GPUs: every stage's code "
        "ran at true size on fake CUDA tensors",
        f"  recipe: global batch {recipe['global_batch']} = {recipe['per_device_batch']} per GPU x "
        f"{report['world_size']} GPUs x {recipe['accumulation']} accumulation; peak lr {recipe['peak_lr']:.4g}; "
        f"warmup to step {recipe['warmup_steps']}, hold to {recipe['hold_until_step']}, cosine to "
        f"{recipe['decay_until_step']}, {recipe['max_steps']} steps",
        f"  memory per GPU: training {memory['train_peak_gib']} GiB, generation {memory['generation_peak_gib']} GiB: "
        f"{fits} {memory['gpu_memory_gib']} GiB with {memory['headroom']:.0%} headroom (largest batch per GPU "
        f"{memory['max_per_device_batch']})",
        f"  KID and precision/recall on the evaluating rank: features of {features['generated']} generated and "
        f"{features['reference']} reference images, {features['host_gib']} GiB host memory (float32 kept, KID's "
        f"float64 copies), {features['device_gib']} GiB on its GPU (float64 copies, distance blocks): scoring peak "
        f"{features['scoring_peak_gib']} GiB with the networks",
        f"  FLOPs: training {flops['train_per_image'] / 1e12:.3f} TFLOP per image, generation "
        f"{flops['generation_per_image_per_nfe'] / 1e9:.1f} GFLOP per image per function evaluation",
        f"  at {speed['assumed_mfu']:.0%} of {speed['peak_bf16_tflops']} TFLOP/s: {speed['step_s']} s per step, "
        f"{speed['images_per_s_per_gpu']} images/s per GPU, {speed['epoch_minutes']} min per ImageNet epoch "
        f"(the paper: UNITE-B {speed['paper_unite_b_8_h200']['epoch_minutes']} min on 8 H200)",
        f"  host syncs per optimizer step: {report['host_syncs_per_step']} ({report['host_values_per_step']} values)",
    ])


def dry_runs(names: list[str], args: argparse.Namespace) -> int:
    """`--true-size`: the dry run of each preset; exit 1 when one fails or does not fit."""
    from unite.config import ConfigError
    from unite.dry_run import DryRunFailed

    status = 0
    for name in names:
        print(f"dry run: {name} at true size on fake tensors (about a minute) ...", file=sys.stderr, flush=True)
        try:
            report = true_size(name, args.nproc, args.nnodes, args.gpu_memory_gib)
        except (DryRunFailed, ConfigError) as failure:
            print(f"error: dry run: {name}: {failure}", file=sys.stderr)
            status = 1
            continue
        print(json.dumps(report) if args.json else summary(report), flush=True)
        if not report["memory"]["fits"]:
            print(f"error: dry run: {name}: does not fit {args.gpu_memory_gib} GiB per GPU with 10% headroom; "
                  f"lower train.per_device_batch (at most {report['memory']['max_per_device_batch']}) in "
                  f"presets/{name}.yaml", file=sys.stderr)
            status = 1
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.rehearse", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("presets", nargs="*", help="names of files in presets/, e.g. unite-b")
    parser.add_argument("--all", action="store_true", help="every preset in presets/")
    parser.add_argument("--nproc", type=int,
                        help="torchrun processes per stage (default 2); with --true-size: GPUs per node "
                             "(default: the preset's train.nproc_per_node)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="train.device")
    parser.add_argument("--keep", type=Path, help="work in this new folder and keep it (default: a temporary one)")
    parser.add_argument("--true-size", action="store_true",
                        help="no rehearsal: a dry run of the preset at its true size on fake tensors (about a "
                             "minute, no GPU): device placement, peak memory per GPU, FLOPs, host syncs, the recipe "
                             "on --nnodes x --nproc GPUs")
    parser.add_argument("--nnodes", type=int, default=1, help="with --true-size: nodes (default 1)")
    parser.add_argument("--gpu-memory-gib", type=float, default=141.0,
                        help="with --true-size: memory of one GPU in GiB (default 141, an H200)")
    parser.add_argument("--json", action="store_true", help="with --true-size: one JSON object per preset")
    args = parser.parse_args(argv)
    known = sorted(p.stem for p in PRESETS.glob("*.yaml"))
    names = known if args.all else args.presets
    unknown = sorted(set(names) - set(known))
    if not names or unknown:
        parser.error(f"presets {unknown or names}: name one or more of {known}, or pass --all")
    if args.keep is not None and args.keep.exists():
        parser.error(f"--keep {args.keep}: already exists; give a new folder")

    if args.true_size:
        return dry_runs(names, args)
    for name in names:
        workdir = (args.keep / name) if args.keep else Path(tempfile.mkdtemp(prefix=f"unite-rehearsal-{name}-")) / "run"
        start = time.monotonic()
        print(f"rehearsal: {name} in {workdir}", flush=True)
        try:
            metrics = rehearse(name, workdir, args.nproc or 2, args.device)
        except RehearsalFailed as failure:
            print(f"\nrehearsal: {name} FAILED: {failure}", file=sys.stderr)
            print(f"rehearsal: its workspace is kept for inspection: {workdir / 'repo'}", file=sys.stderr)
            return 1
        generation = metrics["generation"]
        print(f"\nrehearsal: {name} passed in {time.monotonic() - start:.0f} s: every stage ran "
              f"(FID {generation.get('fid', float('nan')):.2f} from random weights: meaningless, "
              f"weights: {generation.get('weights', 'n/a')})", flush=True)
        if args.keep is None:
            shutil.rmtree(workdir.parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

