"""Stage report: PNG figures of the run (training losses, learning rate, grad norm, the sweep's
metric against the CFG scale, the sample grid, validation originals above their reconstructions)
in --figures, and --out, one self-contained HTML page with the params, the metrics, the figures and
the provenance. `dvc plots show/diff` draw the figures as image plots."""

import json
import os

import torch
from PIL import Image

from stages.launch import StageArguments, run_stage
from stages.params import load_stage_params
from unite.evaluation import load_exported_model, reconstruct, search_metric_name
from unite.provenance import device_name, git_state, package_versions, params_hash
from unite.report import (cfg_figure, curve_figure, enlarged, history_table, quality_table, read_table,
                          reconstruction_grid, render_report)

RECON_IMAGES = 16  # the first validation images, in shard order
FIGURES = {
    "Training losses": "loss.png",
    "Learning rate": "lr.png",
    "Gradient norm": "grad_norm.png",
    "{metric} vs CFG scale": "cfg.png",  # the search's metric: FID or KID, or their kin in the run's feature space
    "Samples (a row per class)": "samples.png",
    "Validation originals above their reconstructions": "reconstructions.png",
}
PACKAGES = ("unite", "torch", "torchvision", "numpy", "safetensors", "webdataset", "dvc", "prefect", "matplotlib")


def arguments() -> StageArguments:
    """The paths dvc.yaml passes (`--help` lists them)."""
    parser = StageArguments("stages.report", __doc__)
    parser.add_input("--train-table", "file", "the train stage's logged rows (tsv)")
    parser.add_input("--train-metrics", "file", "the train stage's last logged row (json)")
    parser.add_input("--sweep", "file", "the sweep stage's chosen setting and points (json)")
    parser.add_input("--sweep-table", "file", "the sweep stage's points (tsv)")
    parser.add_input("--eval", "file", "the evaluate stage's scores (json)")
    parser.add_input("--samples", "folder", "the evaluate stage's grid.png and provenance.json")
    parser.add_input("--model", "file", "the exported EMA model (safetensors, with its .json config beside it)")
    parser.add_input("--shards", "folder", "the shard stage's output; the first val images are reconstructed")
    parser.add_output("--figures", "folder", "where the figures go: " + ", ".join(FIGURES.values()))
    parser.add_output("--out", "file", "the report (html)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = arguments().parse(argv)
    params = load_stage_params("report")
    evaluation = json.loads(args.eval.read_text())
    sweep = json.loads(args.sweep.read_text())
    metric = search_metric_name(sweep["metric"], evaluation["generation"]["feature_space"])
    figures = {title.format(metric=metric): args.figures / name for title, name in FIGURES.items()}
    curve_figure(args.train_table, {"loss": "total", "recon": "reconstruction", "flow": "flow"},
                 figures["Training losses"], "Training losses", "loss", log=True)
    curve_figure(args.train_table, {"lr": "learning rate"}, figures["Learning rate"], "Learning rate", "lr")
    curve_figure(args.train_table, {"grad_norm": "before clipping"}, figures["Gradient norm"], "Gradient norm",
                 "grad norm", log=True)
    cfg_figure(args.sweep_table, sweep["metric"], sweep["chosen"], figures[f"{metric} vs CFG scale"], metric)
    enlarged(Image.open(args.samples / "grid.png").convert("RGB")).save(figures["Samples (a row per class)"])

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_exported_model(args.model, device)
    originals, reconstructions = next(
        reconstruct(model, args.shards / "val", RECON_IMAGES, limit=RECON_IMAGES, seed=params["evaluate"]["seed"]))
    enlarged(reconstruction_grid(originals, reconstructions)).save(
        figures["Validation originals above their reconstructions"])

    sweep_rows = read_table(args.sweep_table)
    evaluation = json.loads(args.eval.read_text())
    provenance = {
        "git commit": git_state(),
        "params sha256": params_hash(params),
        "experiment": os.environ.get("DVC_EXP_NAME", "workspace"),
        "device (reconstructions)": device_name(device),
        "evaluation": json.loads((args.samples / "provenance.json").read_text()),
        "packages": package_versions(PACKAGES),
    }
    page = render_report(
        "UNITE run report",
        params,
        {"train (last logged window)": json.loads(args.train_metrics.read_text()),
         f"sweep (chosen by {sweep['metric']})": sweep["chosen"],
         "evaluate": evaluation},
        figures,
        provenance,
        tables={"Sample quality (evaluate)": quality_table(evaluation["generation"]),
                "Training runs that made the model": history_table(
                    json.loads(args.model.with_suffix(".json").read_text()).get("history", [])),
                "CFG sweep points": (list(sweep_rows[0]), [list(row.values()) for row in sweep_rows])},
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(page)
    print(f"report: {args.out} and {len(figures)} figures in {args.figures}/")


if __name__ == "__main__":
    run_stage(main)
