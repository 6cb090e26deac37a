"""Stage report: PNG figures of the run (training losses, learning rate, grad norm, the sweep's
metric against the CFG scale, the sample grid, validation originals above their reconstructions)
under reports/figures/, and reports/report.html, one self-contained page with the params, the
metrics, the figures and the provenance. `dvc plots show/diff` draw the figures as image plots."""

import json
import os

import torch
from PIL import Image

from stages.launch import run_stage
from stages.params import load_stage_params
from stages.paths import EVAL_METRICS, EXPORT, FIGURES, REPORT, SAMPLES, SHARDS, SWEEP_JSON, SWEEP_TSV, TRAIN_METRICS
from unite.evaluation import load_exported_model, reconstruct
from unite.report import (cfg_figure, curve_figure, device_name, enlarged, git_state, package_versions, params_hash,
                          read_table, reconstruction_grid, render_report)

TRAIN_TSV = TRAIN_METRICS.with_suffix(".tsv")
TRAIN_JSON = TRAIN_METRICS.with_suffix(".json")
RECON_IMAGES = 16  # the first validation images, in shard order
PACKAGES = ("unite", "torch", "torchvision", "numpy", "safetensors", "webdataset", "dvc", "prefect", "matplotlib")


def main() -> None:
    params = load_stage_params("report")
    figures = {
        "Training losses": FIGURES / "loss.png",
        "Learning rate": FIGURES / "lr.png",
        "Gradient norm": FIGURES / "grad_norm.png",
        "Metric vs CFG scale": FIGURES / "cfg.png",
        "Samples (a row per class)": FIGURES / "samples.png",
        "Validation originals above their reconstructions": FIGURES / "reconstructions.png",
    }
    curve_figure(TRAIN_TSV, {"loss": "total", "recon": "reconstruction", "flow": "flow"},
                 figures["Training losses"], "Training losses", "loss", log=True)
    curve_figure(TRAIN_TSV, {"lr": "learning rate"}, figures["Learning rate"], "Learning rate", "lr")
    curve_figure(TRAIN_TSV, {"grad_norm": "before clipping"}, figures["Gradient norm"], "Gradient norm",
                 "grad norm", log=True)
    sweep = json.loads(SWEEP_JSON.read_text())
    cfg_figure(SWEEP_TSV, sweep["metric"], sweep["chosen"], figures["Metric vs CFG scale"])
    enlarged(Image.open(SAMPLES / "grid.png").convert("RGB")).save(figures["Samples (a row per class)"])

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_exported_model(EXPORT, device)
    originals, reconstructions = next(
        reconstruct(model, SHARDS / "val", RECON_IMAGES, limit=RECON_IMAGES, seed=params["evaluate"]["seed"]))
    enlarged(reconstruction_grid(originals, reconstructions)).save(
        figures["Validation originals above their reconstructions"])

    sweep_rows = read_table(SWEEP_TSV)
    provenance = {
        "git commit": git_state(),
        "params sha256": params_hash(params),
        "experiment": os.environ.get("DVC_EXP_NAME", "workspace"),
        "device (reconstructions)": device_name(device),
        "evaluation": json.loads((SAMPLES / "provenance.json").read_text()),
        "packages": package_versions(PACKAGES),
    }
    page = render_report(
        "UNITE run report",
        params,
        {"train (last logged window)": json.loads(TRAIN_JSON.read_text()),
         f"sweep (chosen by {sweep['metric']})": sweep["chosen"],
         "evaluate": json.loads(EVAL_METRICS.read_text())},
        figures,
        provenance,
        tables={"CFG sweep points": (list(sweep_rows[0]), [list(row.values()) for row in sweep_rows])},
    )
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(page)
    print(f"report: {REPORT} and {len(figures)} figures in {FIGURES}/")


if __name__ == "__main__":
    run_stage(main)
