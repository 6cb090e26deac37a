"""The real DVC pipeline on the demo, shrunk to a handful of steps and samples, in a temporary copy
of the repository: a full `dvc repro`, a no-op rerun, an evaluation-only change, a SIGKILL of the
train stage followed by a resuming rerun (training metrics readable mid-run, no row lost or repeated),
a SIGTERM of a two-rank train stage resumed on one rank, a failed train run followed by a good one,
a corrupt source image, queued evaluation-only experiments that train nothing, max_steps raised and
set back, reverted params restored from DVC's run-cache, and results shared through a DVC remote."""

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
import torch
import yaml

from offline_page import PageReferences, network_urls
from stages.preset import merge_params
from stages.rehearse import copy_files
from stages.train import STORE_ENV
from unite.evaluation import load_split
from unite.metrics.class_consistency import class_consistency
from unite.metrics.pixel_classifiers import PixelClassifier

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

TINY = {
    "demo_data": {"image_size": 16},
    "shard": {"shard_size": 100, "workers": 2},
    "fid_ref": {"feature_space": "pixel"},
    "train": {"max_steps": 4, "checkpoint_every": 2, "log_every": 2, "global_batch": 16, "per_device_batch": 16,
              "num_workers": 1, "schedule": {"warmup_steps": 2, "hold_until_step": 3, "decay_until_step": 4,
                                              "final_lr_factor": 0.5}},
    # Blocks of 7 of 20 images: with 2 ranks, rank 0 makes two blocks and rank 1 one. A step of 1
    # takes the search from scale 2 to 1, where no guidance runs: four training steps leave the
    # class barely heard, so guided scales alone give the same images and the same score.
    "sweep": {"num_images": 20, "step": 1.0, "max_extra_steps": 1, "solver": "euler", "steps": 3,
              "block_size": 7, "wide": [{"norm_order": "cfg_first", "interval": [0.1, 1.0]}]},
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
    assert not (path / "dvc.lock").exists() and not (path / "metrics").exists()  # a pipeline never run
    repo = Repo(path)
    repo.set_params(TINY)
    repo.run("git", "init", "-q")
    repo.run("git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "init",
             "--allow-empty")
    repo.run("git", "add", "-A")
    repo.run("git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "pipeline")
    repo.first = repo.run("dvc", "repro")
    repo.first_status = repo.run("git", "status", "--porcelain", "--untracked-files=all").stdout
    return repo


def test_repro_runs_every_stage_and_reports_metrics(repo):
    for stage in ["demo_data", "manifest", "shard", "fid_ref", "train", "export", "sweep", "evaluate", "report"]:
        assert f"Running stage '{stage}'" in repo.first.stdout, stage
    assert repo.metrics("train")["step"] == 4
    sweep = repo.metrics("sweep")
    assert len(sweep["points"]) >= 3
    # The chosen setting is the searched point of least Frechet distance (the wide points only report).
    searched = [point for point in sweep["points"] if point["stage"] != "sweep"]
    assert len({point["frechet_distance"] for point in searched}) > 1  # else any choice would be the least
    assert sweep["chosen"] == min(searched, key=lambda point: point["frechet_distance"])
    assert [p["stage"] for p in sweep["points"]][-1] == "sweep" and sweep["points"][-1]["norm_order"] == "cfg_first"
    evaluation = repo.metrics("eval")
    assert evaluation["generation"]["num_images"] == 20
    # Class consistency counted block by block as the images stream equals its count over the
    # saved images (class i mod 10 for image i).
    with np.load(repo.path / "samples" / "images.npz") as data:
        images = torch.from_numpy(data["arr_0"]).permute(0, 3, 1, 2)
    judge = PixelClassifier(*load_split(repo.path / "data" / "shards" / "train"))
    expected = class_consistency(judge, images, torch.arange(len(images)) % 10)
    assert evaluation["generation"]["class_consistency"] == expected
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
    warnings = [line for line in (repo.first.stdout + repo.first.stderr).splitlines() if re.search(r"warn", line, re.I)]
    assert not warnings, warnings


def test_a_run_leaves_git_status_clean_but_for_its_record(repo):
    """Every output DVC caches is ignored before it is written (DVC adds no .gitignore entry), so
    `git status` lists only dvc.lock and the uncached metrics files, which are there to be committed."""
    stages = yaml.safe_load((repo.path / "dvc.yaml").read_text())["stages"]
    entries = [entry for spec in stages.values() for key in ("outs", "metrics", "plots") for entry in spec.get(key, [])]
    uncached = {path for entry in entries if isinstance(entry, dict) for path, options in entry.items()
                if options and options.get("cache") is False and (repo.path / path).is_file()}
    assert repo.first_status.splitlines() == sorted(f"?? {path}" for path in uncached | {"dvc.lock"})


def test_second_repro_runs_nothing(repo):
    result = repo.run("dvc", "repro")
    assert "Running stage" not in result.stdout
    assert "Data and pipelines are up to date." in result.stdout


def test_queued_evaluation_only_experiments_train_nothing(repo):
    """`dvc exp run --queue` twice, then DVC's queue worker (`dvc queue start -j 1`), in the
    newcomer state (dvc.lock never committed): each experiment runs in a temporary copy of the
    workspace, finds the recipe's run in the checkpoint store and trains nothing."""
    store = Path(repo.env[STORE_ENV])
    checkpoints = {path: path.stat().st_mtime_ns for path in store.rglob("step_*.pt")}
    assert checkpoints
    params = (repo.path / "params.yaml").read_text()
    repo.run("git", "config", "user.name", "test")  # experiments are commits
    repo.run("git", "config", "user.email", "test@example.com")
    experiments = {"eval-14": "evaluate.num_images=14", "sweep-14": "sweep.num_images=14"}
    for name, change in experiments.items():
        repo.run("dvc", "exp", "run", "--queue", "-n", name, "-S", change)
    start = time.monotonic()
    repo.run("dvc", "queue", "start", "-j", "1")
    deadline = start + 900
    while time.monotonic() < deadline:
        status = repo.run("dvc", "queue", "status").stdout
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        time.sleep(2)
    print(f"\ntwo queued evaluation-only experiments, tiny params: {time.monotonic() - start:.0f} s")
    logs = {name: repo.run("dvc", "queue", "logs", name, check=False) for name in experiments}
    for name in experiments:
        assert re.search(rf"\b{name}\b.*\bSuccess\b", status), (status, logs[name].stdout)
        log = logs[name].stdout + logs[name].stderr
        # DVC's run-cache restores the train stage, or the stage finds the model in the store
        assert "Stage 'train' is cached - skipping run" in log or "nothing to train" in log, log
        assert "starting from scratch" not in log and "resuming from" not in log, log
    assert {path: path.stat().st_mtime_ns for path in store.rglob("step_*.pt")} == checkpoints
    shown = json.loads(repo.run("dvc", "exp", "show", "--json").stdout)
    results = {exp["name"]: exp["revs"][0]["data"] for base in shown for exp in base.get("experiments") or []}
    for name in experiments:
        assert results[name]["metrics"]["metrics/train.json"]["data"]["step"] == 4
    assert results["eval-14"]["metrics"]["metrics/eval.json"]["data"]["generation"]["num_images"] == 14
    assert (repo.path / "params.yaml").read_text() == params  # queued runs leave the workspace as it was


def test_max_steps_raised_then_set_back_gives_the_first_model_again(repo):
    """Training on to a higher max_steps and setting it back: the train stage trains nothing, the
    model and its export are the first ones byte for byte, and the stages after them stay put."""
    outputs = ("models/final.pt", "models/unite-ema.safetensors", "models/unite-ema.json")
    first = {name: (repo.path / name).read_bytes() for name in outputs}
    repo.set_params({"train": {"max_steps": 6}})
    repo.run("dvc", "repro", "export")
    assert repo.metrics("train")["step"] == 6
    assert (repo.path / "models/final.pt").read_bytes() != first["models/final.pt"]
    repo.set_params({"train": {"max_steps": 4}})
    result = repo.run("dvc", "repro")
    assert "Stage 'train' is cached - skipping run" in result.stdout, result.stdout
    for name in outputs:
        assert (repo.path / name).read_bytes() == first[name], name
    # Without DVC's run-cache, the stage itself finds the milestone in the store.
    forced = repo.run("dvc", "repro", "--force", "--single-item", "train")
    assert "nothing to train" in forced.stdout + forced.stderr, forced.stdout + forced.stderr
    for name in outputs:
        assert (repo.path / name).read_bytes() == first[name], name
    assert repo.metrics("train")["step"] == 4 and repo.logged_steps() == [2, 4]
    for stage in ("sweep", "evaluate", "report"):  # their inputs are the first ones again
        assert f"Running stage '{stage}'" not in result.stdout, stage
    history = json.loads((repo.path / "models/unite-ema.json").read_text())["history"]
    assert [(s["from_step"], s["to_step"], s["world_size"]) for s in history] == [(0, 4, 1)]


def test_plots_and_the_report_render_offline(repo, tmp_path):
    """`dvc plots show`, and `dvc plots diff` of two experiments, write pages that load nothing from
    the network and show every declared image plot as a PNG; reports/report.html embeds its figures."""
    from PIL import Image

    def check(page_file: Path, revs: list[str]) -> dict[str, bytes]:
        page = PageReferences(page_file.read_text())
        assert network_urls(page_file.read_text()) == [], page_file
        assert page_file.read_text().count("vegaEmbed(") >= 2  # the loss curves and the sweep
        pngs = {}
        for url in page.attributes:
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
    report_page = (repo.path / "reports" / "report.html").read_text()
    assert network_urls(report_page) == []
    report = PageReferences(report_page).attributes
    assert len(report) == len(images) and all(u.startswith("data:image/png;base64,") for u in report)
    assert "Sample quality (evaluate)" in report_page and "KD: unbiased squared MMD" in report_page

    repo.run("dvc", "plots", "show", "-o", str(tmp_path / "show"))
    check(tmp_path / "show" / "index.html", ["workspace"])
    # The sweep's plots name the distance TINY's pixel feature space gives: not FID.
    assert "frechet_distance in pixel features vs CFG scale" in (tmp_path / "show" / "index.html").read_text()
    assert "Frechet distance in pixel features vs CFG scale" in (repo.path / "reports" / "report.html").read_text()
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
    checkpoints = Path(repo.env[STORE_ENV])

    def latest_step() -> int:
        return max((int(path.stem.split("_")[1]) for path in checkpoints.glob("*/checkpoints/step_*.pt")), default=0)

    begin = latest_step()  # the store's newest checkpoint of this recipe: the run resumes there
    repo.set_params({"train": {"max_steps": 100_000, "checkpoint_every": 2}})
    first_log = tmp_path / "first.log"
    with open(first_log, "w") as log_file:
        process = subprocess.Popen(["dvc", "repro", "train"], cwd=repo.path, env=repo.env, start_new_session=True,
                                   stdout=log_file, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and latest_step() < begin + 2:
        assert process.poll() is None, first_log.read_text()
        time.sleep(0.05)
    # Mid-run, the declared metrics file holds every row so far (one per 2 steps, from step 2 of
    # the first repro's run, which this one continues).
    mid_run = repo.logged_steps()
    assert mid_run == list(range(2, mid_run[-1] + 1, 2)) and mid_run[-1] >= begin + 2, mid_run
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 120  # the orphaned worker finishes its step and says so
    while time.monotonic() < deadline and "SIGHUP received" not in first_log.read_text():
        time.sleep(0.1)
    stopped = re.search(r"SIGHUP received; finished step (\d+), wrote", first_log.read_text())
    assert stopped and int(stopped.group(1)) >= begin + 2, first_log.read_text()
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


def test_a_preempted_two_rank_train_stage_resumes_on_one(repo, tmp_path):
    """SIGTERM to `dvc repro`'s process group, as a preempted job gets it, reaches the torchrun
    launcher, whose two workers finish their step and write a checkpoint; `dvc repro` after
    `train.nproc_per_node` changed to 1 resumes that checkpoint, in the same folder (its key leaves
    out the process count)."""
    start_step = repo.metrics("train")["step"]
    repo.set_params({"train": {"nproc_per_node": 2, "max_steps": 100_000}})
    log = tmp_path / "preempted.log"
    with open(log, "w") as log_file:
        process = subprocess.Popen(["dvc", "repro", "train"], cwd=repo.path, env=repo.env, start_new_session=True,
                                   stdout=log_file, stderr=subprocess.STDOUT)

    def last_logged() -> int:
        try:  # DVC deletes the declared metrics before the stage runs
            return repo.logged_steps()[-1]
        except (FileNotFoundError, IndexError):
            return 0

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and last_logged() < start_step + 4:
        assert process.poll() is None, log.read_text()
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGTERM)
    process.wait()
    deadline = time.monotonic() + 120  # the workers finish their step and say so
    while time.monotonic() < deadline and "SIGTERM received" not in log.read_text():
        time.sleep(0.1)
    text = log.read_text()
    assert "the checkpoint was written by 1 process(es), this run has 2" in text, text
    stopped = re.search(r"SIGTERM received; finished step (\d+), wrote (\S+)\.", text)
    assert stopped and int(stopped.group(1)) >= start_step + 4, text
    stopped_step, written = int(stopped.group(1)), Path(stopped.group(2))
    assert written.name == f"step_{stopped_step:08d}.pt"

    repo.set_params({"train": {"nproc_per_node": 1, "max_steps": stopped_step + 2}})
    result = repo.run("dvc", "repro", "train")
    log_text = result.stdout + result.stderr
    resumed = re.search(r"resuming from (\S+) at step (\d+)", log_text)
    assert resumed and int(resumed.group(2)) == stopped_step, log_text
    assert Path(resumed.group(1)).name == written.name
    assert (repo.path / Path(resumed.group(1))).resolve().parent == (repo.path / written).resolve().parent
    assert "the checkpoint was written by 2 process(es), this run has 1" in log_text
    assert repo.metrics("train")["step"] == stopped_step + 2


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
    # Forced, so that the stage itself runs (not DVC's cache or run-cache) and puts them back.
    result = repo.run("dvc", "repro", "--force", "--single-item", "train")
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


def test_reverted_params_restore_sweep_evaluate_and_report_from_the_run_cache(repo):
    """A sweep param and an evaluate param, each changed and changed back: on the way back DVC's
    run-cache restores every stage after training, byte for byte, and none of them runs."""
    outputs = ["metrics/sweep.json", "metrics/sweep.tsv", "metrics/eval.json", "samples/images.npz",
               "reports/report.html"]
    params = yaml.safe_load((repo.path / "params.yaml").read_text())
    for section, key, other in [("sweep", "seed", params["sweep"]["seed"] + 1),
                                ("evaluate", "grid_per_class", params["evaluate"]["grid_per_class"] + 1)]:
        before = {path: (repo.path / path).read_bytes() for path in outputs}
        repo.set_params({section: {key: other}})
        changed = repo.run("dvc", "repro")
        assert f"Running stage '{section}'" in changed.stdout, changed.stdout
        repo.set_params({section: {key: params[section][key]}})
        back = repo.run("dvc", "repro")
        assert "Running stage" not in back.stdout, back.stdout
        rerun = ["sweep", "evaluate", "report"] if section == "sweep" else ["evaluate", "report"]
        for stage in rerun:
            assert f"Stage '{stage}' is cached - skipping run" in back.stdout, (stage, back.stdout)
        assert {path: (repo.path / path).read_bytes() for path in outputs} == before


def test_results_pushed_to_a_remote_are_pulled_into_a_fresh_clone_with_nothing_to_rerun(repo, tmp_path):
    """The README's sharing journey: a DVC remote in a local folder, `dvc push` and a git commit of
    the lock file and metrics; a second clone `dvc pull`s the export, metrics, samples and report,
    and its `dvc repro` has nothing to do. Last in this module: it commits the workspace."""
    repo.run("dvc", "remote", "add", "-d", "shared", str(tmp_path / "remote"))
    repo.run("dvc", "push")
    repo.run("git", "add", "-A")
    repo.run("git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "results")
    clone = Repo(tmp_path / "clone")
    repo.run("git", "clone", "-q", str(repo.path), str(clone.path))
    pulled = ["models/final.pt", "models/unite-ema.safetensors", "models/unite-ema.json", "metrics/train.tsv",
              "metrics/sweep.tsv", "samples/images.npz", "samples/grid.png", "reports/report.html"]
    assert not any((clone.path / path).exists() for path in pulled)
    clone.run("dvc", "pull")
    for path in pulled + ["metrics/train.json", "metrics/sweep.json", "metrics/eval.json"]:
        assert (clone.path / path).read_bytes() == (repo.path / path).read_bytes(), path
    result = clone.run("dvc", "repro")
    assert "Running stage" not in result.stdout and "is cached" not in result.stdout, result.stdout
    assert "Data and pipelines are up to date." in result.stdout


def test_the_readme_preset_commands_without_imagenet_say_what_to_do(tmp_path):
    """The README's commands for a preset, run in a fresh clone with nothing linked, stop at the
    manifest stage with the README's own `ln -s` line, and the demo's digits are not written."""
    readme = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", readme, re.S) if "python -m stages.preset" in b)
    lines = [line.split("#")[0].strip() for line in block.splitlines()]
    link = next(line for line in lines if "ln -s" in line)
    commands = [line for line in lines if line.startswith(("python -m stages.preset", "dvc repro"))]
    assert commands[-1] == "dvc repro", commands
    copy_files(tmp_path)
    repo = Repo(tmp_path)
    for args in (["git", "init", "-q"], ["git", "add", "-A"],
                 ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "clone"]):
        repo.run(*args)
    for command in commands[:-1]:
        repo.run(*command.split())
    result = repo.run("dvc", "repro", check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert re.search(r"^error: manifest: .*data/imagenet.*; .*" + re.escape(link), output, re.M), output
    assert "demo_data" not in output and not (tmp_path / "data" / "raw").exists()
