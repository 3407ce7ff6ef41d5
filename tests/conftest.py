"""Test environment: project-local scratch folders, offline hub, local MLflow; shared sample data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_SCRATCH = Path(os.environ.get("TMP_ROOT", ROOT / ".tmp"))
for _name, _sub in (
    ("TMPDIR", "tmp"),
    ("RAY_TMPDIR", "ray"),
    ("TORCH_EXTENSIONS_DIR", "torch_extensions"),
    ("HF_HOME", "hf"),
):
    (_SCRATCH / _sub).mkdir(parents=True, exist_ok=True)
    os.environ[_name] = str(_SCRATCH / _sub)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_SCRATCH / 'mlflow.db'}"
import tempfile  # noqa: E402  (after TMPDIR is set, so tempfile uses it)

tempfile.tempdir = None


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory) -> Path:
    """The debug sample datasets (CO3Dv2 + WebVid + ground truth), generated once per session."""
    from mvcustom.configs import SampleDataConfig
    from mvcustom.data.generator import generate_sample_data

    out = tmp_path_factory.mktemp("sample_data")
    generate_sample_data(str(out), SampleDataConfig.debug())
    return out


@pytest.fixture(scope="session")
def ray_local():
    """One embedded local Ray for the session (2 CPUs, like every machine here)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_zoedepth(tmp_path_factory) -> str:
    """A tiny random ZoeDepth saved as a from_pretrained folder."""
    from mvcustom.models.zoedepth import save_tiny_zoedepth

    return save_tiny_zoedepth(str(tmp_path_factory.mktemp("tiny-zoedepth")))


@pytest.fixture(scope="session")
def train_shards(sample_data, tmp_path_factory) -> str:
    """CO3D shards of the debug sample data (8 frames, 64x64, dataset depth), made without Ray."""
    from mvcustom.configs import PreprocessConfig, from_dict
    from pipelines.preprocess import preprocess_inline

    out = tmp_path_factory.mktemp("train_shards")
    cfg = from_dict(
        PreprocessConfig,
        {
            "preset": "debug",
            "source": "co3d",
            "input": str(sample_data / "co3d"),
            "output": str(out),
            "samples_per_shard": 2,
            "co3d": {"depth": "dataset"},
        },
        "test",
    )
    result = preprocess_inline(cfg)
    assert result["clips_written"] >= 4
    return str(out)
