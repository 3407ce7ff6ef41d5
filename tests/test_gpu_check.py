"""The prepared GPU check (``benchmarks/gpu_check.py``): its CPU dry-run, so it cannot rot before
a GPU is lent, and the real-size model it measures, checked against SD 1.5's published sizes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_measures_every_section(tmp_path):
    rc = _gpu_check().main(["--dry-run", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rc == 0 and report["failed"] == [] and report["dry_run"] is True
    assert report["environment"]["torch"] == torch.__version__
    train = report["train"]
    assert train["loss_finite"] and len(train["losses"]) == 2 and train["clips_per_s"] > 0
    assert 0 < train["parameters_trained_m"] < train["parameters_total_m"]
    sample = report["sample"]
    assert sample["seconds_per_sample"] > 0 and sample["cpu_offload"]["seconds_per_sample"] > 0
    depth = report["zoedepth"]
    assert depth["fp32_frames_per_s"] > 0 and depth["bf16_frames_per_s"] > 0
    assert depth["bf16_vs_fp32_relative_error"]["median"] < 0.05  # bf16 keeps ~3 significant digits
    # the sampler oracle, as in tests/test_sampling.py (fp32 on CPU: 3 %, SD's last-step noise)
    for name in ("sd15_epsilon", "sd15_v", "zero_snr_trailing_v"):
        assert report["oracle"][f"{name}_relative_error"] < 0.05, name
    # DreamSim needs torchvision, which the CPU lock cannot hold: the rehearsal says it skipped and
    # why (where the package does import, the section ran and measured)
    dreamsim = report["dreamsim"]
    if "skipped" in dreamsim:
        assert "dreamsim package is not importable" in dreamsim["skipped"]
    else:
        assert dreamsim["embeddings_finite"] and dreamsim["distance_identical_images"] < 1e-5


def test_a_failing_section_is_recorded_and_fails_the_run(tmp_path, monkeypatch):
    module = _gpu_check()

    def broken(device, dry):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(module, "check_zoedepth", broken)
    assert module.main(["--dry-run", "--out", str(tmp_path), "--only", "zoedepth", "oracle"]) == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["failed"] == ["zoedepth"] and "out of memory" in report["zoedepth"]["error"]
    assert report["oracle"]["sd15_epsilon_relative_error"] < 0.05  # the others still ran


def test_the_real_size_model_has_sd15s_published_sizes():
    """Built on the meta device (no memory): SD 1.5's UNet 859.52M parameters, its VAE 83.65M,
    CLIP ViT-L/14's text encoder 123.06M, AnimateDiff v1.5's motion modules 453.2M."""
    from mvcustom.models.components import sd15_architecture_components

    with torch.device("meta"):
        parts = sd15_architecture_components()

    def millions(named):
        return round(sum(p.numel() for _, p in named) / 1e6, 2)

    unet = list(parts.unet.named_parameters())
    assert millions(p for p in unet if ".motion_modules." not in p[0]) == 859.52
    assert millions(p for p in unet if ".motion_modules." in p[0]) == 453.21
    assert millions(parts.vae.named_parameters()) == 83.65
    assert millions(parts.text_encoder.named_parameters()) == 123.06
