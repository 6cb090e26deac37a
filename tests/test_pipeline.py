"""The real DVC pipeline on the demo, shrunk to a handful of steps and samples, in a temporary copy
of the repository: a full `dvc repro`, a no-op rerun, an evaluation-only change, a SIGKILL of the
train stage followed by a resuming rerun (training metrics readable mid-run, no row lost or repeated),
a failed train run followed by a good one, and a corrupt source image."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from stages.preset import merge_params
from stages.rehearse import copy_files

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

TINY = {
    "demo_data": {"image_size": 16},
    "shard": {"shard_size": 100, "workers": 2},
    "fid_ref": {"feature_space": "pixel"},
    "train": {"max_steps": 4, "checkpoint_every": 2, "log_every": 2, "global_batch": 16, "per_device_batch": 16,
              "num_workers": 1, "schedule": {"warmup_steps": 2, "hold_until_step": 3, "decay_until_step": 4,
                                              "final_lr_factor": 0.5}},
    # Blocks of 7 of 20 images: with 2 ranks, rank 0 makes two blocks and rank 1 one.
    "sweep": {"num_images": 20, "max_extra_steps": 1, "solver": "euler", "steps": 3, "block_size": 7,
              "wide": [{"norm_order": "cfg_first", "interval": [0.1, 1.0]}]},
    "evaluate": {"num_images": 20, "solver": "euler", "steps": 3, "block_size": 7, "grid_per_class": 2,
                 "kid_subset_size": 10},
}


class Repo:
    def __init__(self, path: Path):
        self.path = path
        # One thread per process, as torchrun gives each of several ranks: CPU float reductions
        # depend on the thread count, and the two-rank test compares metrics bit for bit.
        self.env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                    "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

    def run(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        result = subprocess.run(args, cwd=self.path, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def set_params(self, changes: dict) -> None:
        params_file = self.path / "params.yaml"
        params_file.write_text(yaml.safe_dump(merge_params(yaml.safe_load(params_file.read_text()), changes)))

    def metrics(self, name: str) -> dict:
        return json.loads((self.path / "metrics" / f"{name}.json").read_text())

    def logged_steps(self) -> list[int]:
        lines = (self.path / "metrics" / "train.tsv").read_text().splitlines()
        assert lines[0].startswith("step\t")
        return [int(line.split("\t")[0]) for line in lines[1:]]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Repo:
    path = tmp_path_factory.mktemp("pipeline") / "repo"
    copy_files(path)
    repo = Repo(path)
    repo.set_params(TINY)
    repo.run("git", "init", "-q")
    repo.run("git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "init",
             "--allow-empty")
    repo.run("git", "add", "-A")
    repo.run("git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "pipeline")
    repo.first = repo.run("dvc", "repro")
    return repo


def test_repro_runs_every_stage_and_reports_metrics(repo):
    for stage in ["demo_data", "manifest", "shard", "fid_ref", "train", "export", "sweep", "evaluate", "report"]:
        assert f"Running stage '{stage}'" in repo.first.stdout, stage
    assert repo.metrics("train")["step"] == 4
    sweep = repo.metrics("sweep")
    assert len(sweep["points"]) >= 3 and sweep["chosen"]["frechet_distance"] >= 0
    assert [p["stage"] for p in sweep["points"]][-1] == "sweep" and sweep["points"][-1]["norm_order"] == "cfg_first"
    evaluation = repo.metrics("eval")
    assert evaluation["generation"]["num_images"] == 20
    assert 0 <= evaluation["generation"]["class_consistency"] <= 1
    assert evaluation["reconstruction"]["num_images"] == repo.metrics("shard")["val"]["written"]
    # The suite beside FD, in pixel space: KD (not KID), precision and recall against every train
    # image's features (fewer than fid_ref.set_images), and no sFID, which only Inception has.
    generation = evaluation["generation"]
    assert generation["num_ref_features"] == repo.metrics("shard")["train"]["written"]
    assert 0 <= generation["precision"] <= 1 and 0 <= generation["recall"] <= 1 and generation["kd_std"] >= 0
    assert "kid_mean" not in generation and generation["sfid"].startswith("none: sFID is defined on Inception")
    assert (repo.path / "samples" / "grid.png").is_file()
    shown = json.dumps(json.loads(repo.run("dvc", "metrics", "show", "--json").stdout))
    assert "metrics/eval.json" in shown and '"kd_mean"' in shown and '"precision"' in shown


def test_second_repro_runs_nothing(repo):
    start = time.monotonic()
    result = repo.run("dvc", "repro")
    assert time.monotonic() - start < 30
    assert "Running stage" not in result.stdout
    assert "Data and pipelines are up to date." in result.stdout


def test_plots_and_the_report_render_offline(repo, tmp_path):
    """`dvc plots show`, and `dvc plots diff` of two experiments, write pages that load nothing from
    the network and show every declared image plot as a PNG; reports/report.html embeds its figures."""
    from html.parser import HTMLParser
    from urllib.parse import urlparse

    from PIL import Image

    class Page(HTMLParser):
        def __init__(self, path: Path):
            super().__init__()
            self.urls: list[str] = []
            self.feed(path.read_text())

        def handle_starttag(self, tag, attrs):
            self.urls += [value for name, value in attrs if name in ("src", "href", "data", "srcset") and value]

    def check(page_file: Path, revs: list[str]) -> dict[str, bytes]:
        page = Page(page_file)
        assert [u for u in page.urls if urlparse(u).scheme not in ("", "data")] == [], page_file
        assert page_file.read_text().count("vegaEmbed(") >= 2  # the loss curves and the sweep
        pngs = {}
        for url in page.urls:
            with Image.open(page_file.parent / url) as image:
                assert image.format == "PNG", url
            pngs[url] = (page_file.parent / url).read_bytes()
        for rev in revs:
            for plot in images:
                assert sum(rev in url and Path(plot).name in url for url in pngs) == 1, (rev, plot, list(pngs))
        return pngs

    declared = yaml.safe_load((repo.path / "dvc.yaml").read_text())["plots"]
    images = [plot for plot in declared if isinstance(plot, str) and plot.endswith(".png")]
    assert len(images) == 6
    report = Page(repo.path / "reports" / "report.html")
    assert len(report.urls) == len(images) and all(u.startswith("data:image/png;base64,") for u in report.urls)
    assert "Sample quality (evaluate)" in (repo.path / "reports" / "report.html").read_text()
    assert "KD: unbiased squared MMD" in (repo.path / "reports" / "report.html").read_text()

    repo.run("dvc", "plots", "show", "-o", str(tmp_path / "show"))
    check(tmp_path / "show" / "index.html", ["workspace"])
    repo.run("git", "config", "user.name", "test")  # experiments are commits
    repo.run("git", "config", "user.email", "test@example.com")
    for seed in (1, 2):
        repo.run("dvc", "exp", "run", "-n", f"seed-{seed}", "-S", f"evaluate.seed={seed}")
    repo.run("dvc", "plots", "diff", "seed-1", "seed-2", "-o", str(tmp_path / "diff"))
    pngs = check(tmp_path / "diff" / "index.html", ["seed-1", "seed-2"])
    samples = [data for url, data in pngs.items() if "samples" in url]
    assert len(samples) == 2 and samples[0] != samples[1]  # each experiment's own grid


def test_an_evaluation_param_reruns_only_evaluation(repo):
    repo.set_params({"evaluate": {"grid_per_class": 3}})  # evaluate.seed would also rerun sweep (evaluate.protocol)
    result = repo.run("dvc", "repro")
    assert "Running stage 'evaluate'" in result.stdout
    for stage in ["demo_data", "manifest", "shard", "fid_ref", "train", "export", "sweep"]:
        assert f"Running stage '{stage}'" not in result.stdout, stage


def test_two_ranks_sweep_and_evaluate_exactly_as_one(repo):
    before = {name: repo.metrics(name) for name in ("sweep", "eval")}
    with np.load(repo.path / "samples" / "images.npz") as data:
        images = data["arr_0"]
    repo.set_params({"sweep": {"nproc_per_node": 2}, "evaluate": {"nproc_per_node": 2}})
    result = repo.run("dvc", "repro")
    assert "Running stage 'sweep'" in result.stdout and "Running stage 'evaluate'" in result.stdout
    assert "Running stage 'train'" not in result.stdout
    assert repo.metrics("sweep") == before["sweep"]
    assert repo.metrics("eval") == before["eval"]
    with np.load(repo.path / "samples" / "images.npz") as data:
        assert np.array_equal(data["arr_0"], images)
    repo.set_params({"sweep": {"nproc_per_node": 1}, "evaluate": {"nproc_per_node": 1}})


def test_a_killed_train_stage_resumes(repo, tmp_path):
    """SIGKILL of `dvc repro` (as a cancelled run does to its process group) stops the torchrun
    worker too (SIGHUP), which writes a last checkpoint; the rerun waits for it and resumes from it.
    The first run aims far beyond where it is killed, so no machine is fast enough to finish it."""
    repo.set_params({"train": {"max_steps": 100_000, "checkpoint_every": 2}})
    first_log = tmp_path / "first.log"
    with open(first_log, "w") as log_file:
        process = subprocess.Popen(["dvc", "repro", "train"], cwd=repo.path, env=repo.env, start_new_session=True,
                                   stdout=log_file, stderr=subprocess.STDOUT)
    checkpoints = repo.path / "checkpoints"

    def latest_step() -> int:
        return max((int(path.stem.split("_")[1]) for path in checkpoints.glob("*/checkpoints/step_*.pt")), default=0)

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and latest_step() < 6:
        assert process.poll() is None, first_log.read_text()
        time.sleep(0.05)
    # Mid-run, the declared metrics file holds every row so far (one per 2 steps, from step 2 of
    # the first repro's run, which this one continues).
    mid_run = repo.logged_steps()
    assert mid_run == list(range(2, mid_run[-1] + 1, 2)) and mid_run[-1] >= 6, mid_run
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 120  # the orphaned worker finishes its step and says so
    while time.monotonic() < deadline and "SIGHUP received" not in first_log.read_text():
        time.sleep(0.1)
    stopped = re.search(r"SIGHUP received; finished step (\d+), wrote", first_log.read_text())
    assert stopped and int(stopped.group(1)) >= 6, first_log.read_text()
    stopped_step = int(stopped.group(1))
    repo.set_params({"train": {"max_steps": stopped_step + 4}})
    result = repo.run("dvc", "repro")
    log = result.stdout + result.stderr
    resumed = re.search(r"resuming from \S+ at step (\d+)", log)
    assert resumed and int(resumed.group(1)) == stopped_step, log
    assert repo.metrics("train")["step"] == stopped_step + 4
    assert "Running stage 'evaluate'" in result.stdout
    # Every second step and the steps each run stopped at, once each.
    expected = sorted(set(range(2, stopped_step + 5, 2)) | {stopped_step, stopped_step + 4})
    assert repo.logged_steps() == expected


def test_a_failed_train_run_leaves_the_training_metrics_to_the_next(repo):
    """DVC deletes the train stage's declared metrics before running it; a good run after a
    failed one puts them back complete from the checkpoint folder."""
    tsv = repo.path / "metrics" / "train.tsv"
    before, before_json = tsv.read_text(), repo.metrics("train")
    good_batch = yaml.safe_load((repo.path / "params.yaml").read_text())["train"]["global_batch"]
    repo.set_params({"train": {"global_batch": 0}})
    failed = repo.run("dvc", "repro", "train", check=False)
    assert failed.returncode != 0 and "global_batch=0: must be a positive integer" in failed.stdout + failed.stderr
    repo.set_params({"train": {"global_batch": good_batch}})
    result = repo.run("dvc", "repro")
    assert "Running stage 'train'" in result.stdout
    assert tsv.read_text() == before
    assert repo.metrics("train") == before_json


def test_a_corrupt_source_image_is_reported_and_the_pipeline_finishes(repo):
    source = repo.path / "source"
    shutil.copytree(repo.path / "data" / "raw", source)
    (source / "train" / "3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    repo.set_params({"manifest": {"root": "source"}, "train": {"max_steps": 4}})
    repo.run("dvc", "repro")
    index = json.loads((repo.path / "data" / "shards" / "train" / "index.json").read_text())
    skipped = json.dumps(index["skipped"])
    assert "broken.png" in skipped
    assert repo.metrics("shard")["train"]["skipped"] == 1
    assert repo.metrics("eval")["generation"]["num_images"] == 20
