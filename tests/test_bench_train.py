"""benchmarks.bench_train's --reference option: argument handling, and the side-by-side report
against a stand-in checkout with the reference's layout."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest
import yaml

from benchmarks.bench_train import PRESETS, main

ROOT = Path(__file__).resolve().parents[1]

# The reference's module layout with the names the benchmark calls, as small stand-ins.
STAND_IN = {
    "models/unite.py": '''
import torch
ENCODER_CONFIGS, DECODER_CONFIGS = {}, {}
class UNITE(torch.nn.Module):
    def __init__(self, cfg, num_latent_tokens=256, num_classes=1000):
        super().__init__()
        depth, hidden, heads = ENCODER_CONFIGS[cfg["encoder_model_size"]]
        self.encoder = torch.nn.Linear(cfg["diffusion_input_dim"], hidden)
        self.lpips_loss = torch.nn.Linear(2, 2).requires_grad_(False)
    def get_learnable_params(self, muon=False, non_muon=False):
        return [p for p in self.encoder.parameters() if (p.ndim == 2) == muon]
    def forward(self, imgs, labels):
        loss = self.encoder(torch.ones(3, self.encoder.in_features)).square().mean()
        return loss, {"rec_loss": loss, "lpips_loss": loss, "flow/flow_loss": loss}  # what its loop logs
''',
    "modules/autoencoding_utils/lpips.py": '''
from torchvision import models
class LPIPS:
    pass
def _ensure_torchvision_weights_cached(url):
    raise RuntimeError("no downloads")
''',
    "utils/ema.py": '''
def update_ema(ema_model, current_model, decay):
    pass
''',
    "utils/optim.py": '''
import torch
def build_optimizer(params, training_cfg, prefix=""):
    return torch.optim.AdamW(params, lr=training_cfg["optimizer"]["lr"]), ""
def build_optimizer_muon(params, training_cfg, prefix=""):
    return torch.optim.Muon(params, lr=training_cfg["optimizer"]["lr"]), ""
''',
}


@pytest.fixture
def bench(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    """Runs the benchmark's main in this process: (exit code, stdout, stderr). The modules that
    a checkout brings in (models, modules, utils) are forgotten afterwards."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)

    def run(*args: str) -> tuple[int, str, str]:
        try:
            main(list(args))
            code = 0
        except SystemExit as exit_:
            code = exit_.code
        out, err = capsys.readouterr()
        return code, out, err

    yield run
    for name in set(sys.modules) - before:
        if name.split(".")[0] in ("models", "modules", "utils"):
            del sys.modules[name]


def checkout(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_reference_must_be_a_checkout(bench, tmp_path: Path) -> None:
    code, _, err = bench("--reference", str(tmp_path))
    assert code == 2
    assert f"--reference {tmp_path}: not a checkout of the reference implementation (no models/unite.py" in err


def test_reference_rejects_a_model_it_cannot_build(bench, tmp_path: Path) -> None:
    code, _, err = bench("--preset", "demo", "--reference", str(checkout(tmp_path, STAND_IN)))
    assert code == 2
    assert "--reference with preset demo: model.image_size=16: the reference supports only 256" in err


def test_reference_times_one_micro_batch_only(bench, tmp_path: Path) -> None:
    code, _, err = bench("--accum", "2", "--reference", str(checkout(tmp_path, STAND_IN)))
    assert code == 2 and "--accum 2: with --reference only 1" in err


def test_reference_import_failure_names_the_missing_module(bench, tmp_path: Path) -> None:
    files = dict(STAND_IN, **{"models/unite.py": "import reference_only_dependency\n"})
    code, _, err = bench("--steps", "1", "--warmup", "0", "--reference", str(checkout(tmp_path, files)))
    assert code == 2
    assert "importing the reference failed (No module named 'reference_only_dependency')" in err


def test_reference_step_is_timed_beside_ours_with_the_ratio(bench, tmp_path: Path) -> None:
    code, out, err = bench("--steps", "3", "--warmup", "1", "--reference", str(checkout(tmp_path, STAND_IN)))
    assert code == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    reference = report["reference"]
    assert len(reference["step_times"]) == len(report["step_times"]) == 3
    # The stand-in's encoder: Linear(32 -> 128), the preset's latent width and encoder width.
    assert reference["trainable_params"] == 32 * 128 + 128
    ref_median, our_median = statistics.median(reference["step_times"]), statistics.median(report["step_times"])
    expected = ref_median / our_median
    # Step times are printed to 4 decimals (+-5e-5 s each) and the ratio to 3 (+-5e-4).
    rounding = expected * (5e-5 / ref_median + 5e-5 / our_median) + 5e-4
    assert abs(report["reference_over_unite"] - expected) <= rounding * 1.01


def test_demo_preset_is_the_demo_training_step() -> None:
    train = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]
    assert PRESETS["demo"]["model"] == train["model"]
    assert PRESETS["demo"]["batch"] == train["per_device_batch"] == train["global_batch"]
