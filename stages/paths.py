"""Every path the stages read or write, as dvc.yaml declares them: one place, so that no stage
imports another to learn where its inputs are."""

from pathlib import Path

DEMO_FOLDER = Path("data/raw")
MANIFESTS = Path("data/manifest")
SPLITS = ("train", "val")
SHARDS = Path("data/shards")
SHARD_METRICS = Path("metrics/shard.json")
FID_REFERENCE = Path("data/fid_ref.npz")
CHECKPOINTS = Path("checkpoints")
FINAL_CHECKPOINT = Path("models/final.pt")
TRAIN_METRICS = Path("metrics/train")  # the stem of metrics/train.tsv and metrics/train.json
EXPORT = Path("models/unite-ema.safetensors")  # with its config beside it (.json)
SWEEP_JSON = Path("metrics/sweep.json")
SWEEP_TSV = Path("metrics/sweep.tsv")
SAMPLES = Path("samples")
EVAL_METRICS = Path("metrics/eval.json")
FIGURES = Path("reports/figures")
REPORT = Path("reports/report.html")
