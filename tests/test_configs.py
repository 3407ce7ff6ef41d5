"""The one config loader: every shipped YAML loads; mistakes name the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mvcustom.configs import (
    JOB_CONFIGS,
    ConfigError,
    PreprocessConfig,
    SampleDataConfig,
    TrainConfig,
    dump_config,
    flatten,
    from_dict,
    load_config,
    to_dict,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "jobs" / "configs"


def _config_class(path: Path):
    for job, cls in sorted(JOB_CONFIGS.items(), key=lambda kv: -len(kv[0])):
        if path.stem.startswith(job):
            return cls
    raise AssertionError(f"{path.name}: no job config class matches its name")


def test_every_shipped_yaml_loads():
    files = sorted(CONFIG_DIR.glob("*.yaml"))
    assert len(files) >= 8
    for path in files:
        cfg = load_config(_config_class(path), path)
        # dump -> load is the identity
        again = from_dict(type(cfg), yaml.safe_load(dump_config(cfg)), "dump")
        assert again == cfg, path.name


def test_paper_configs_differ_from_ours_only_by_the_camera_encoder():
    from mvcustom.configs import TrainConfig
    from mvcustom.configs.base import flatten, to_dict

    for stage in ("backbone", "customize"):
        ours = flatten(to_dict(load_config(TrainConfig, CONFIG_DIR / f"train_{stage}_sd15.yaml")))
        paper = flatten(to_dict(load_config(TrainConfig, CONFIG_DIR / f"train_{stage}_sd15_paper.yaml")))
        assert {k for k in ours if ours[k] != paper[k]} == {"model.camera_encoder"}
        assert ours["model.camera_encoder"] and not paper["model.camera_encoder"]


def test_at_scale_evaluation_scores_consistency_and_identity_with_dreamsim():
    """The paper's metric for multi-view consistency and identity is DreamSim: the at-scale
    evaluation config asks for it explicitly (with the weights folder the user provides), so a
    GPU run is never silently scored by the labelled CLIP fallback."""
    from mvcustom.configs import EvaluateConfig

    path = CONFIG_DIR / "evaluate_sd15.yaml"
    declared = yaml.safe_load(path.read_text())["metric_models"]
    assert declared.get("distance") == "dreamsim", declared
    assert declared.get("dreamsim"), "the YAML must name the DreamSim weights folder the user fills"
    cfg = load_config(EvaluateConfig, path)
    assert cfg.metric_models.distance == "dreamsim" and cfg.metric_models.dreamsim_type == "ensemble"
    # clearing the weights is refused at load, not turned into the CLIP fallback
    with pytest.raises(ConfigError, match="needs metric_models.dreamsim"):
        load_config(EvaluateConfig, path, ["metric_models.dreamsim=null"])


def test_every_job_has_a_debug_preset():
    for cls in JOB_CONFIGS.values():
        assert "debug" in cls.PRESETS
        assert isinstance(cls.debug(), cls)


def test_unknown_key_names_key_and_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("preset: debug\noptim:\n  lr: 1.0e-4\n  learning_rate: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'optim\.learning_rate'"):
        load_config(TrainConfig, p)
    p.write_text("sauce: webvid\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'sauce'"):
        load_config(PreprocessConfig, p)


def test_wrong_types_and_values_are_named(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text("clip:\n  num_frames: sixteen\n")
    with pytest.raises(ConfigError, match=r"t\.yaml: clip\.num_frames: expected an integer"):
        load_config(PreprocessConfig, p)
    p.write_text("source: youtube\n")
    with pytest.raises(ConfigError, match=r"t\.yaml: source: 'youtube' is not one of"):
        load_config(PreprocessConfig, p)
    p.write_text("clip:\n  height: 100\n")  # contradiction caught by __post_init__
    with pytest.raises(ConfigError, match=r"t\.yaml: clip: clip\.height/width must be multiples of 8"):
        load_config(PreprocessConfig, p)
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"t\.yaml: top level must be a mapping"):
        load_config(PreprocessConfig, p)
    p.write_text("clip: [unclosed\n")
    with pytest.raises(ConfigError, match=r"t\.yaml: not valid YAML"):
        load_config(PreprocessConfig, p)
    with pytest.raises(ConfigError, match=r"missing\.yaml: config file not found"):
        load_config(PreprocessConfig, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="preset 'huge' is not one of"):
        from_dict(TrainConfig, {"preset": "huge"}, "x.yaml")


def test_overrides(tmp_path):
    p = CONFIG_DIR / "preprocess_co3d_debug.yaml"
    cfg = load_config(
        PreprocessConfig,
        p,
        ["clip.num_frames=4", "co3d.categories=[car, chair]", "ray.address=auto", "co3d.captions_file=null"],
    )
    assert cfg.clip.num_frames == 4 and cfg.co3d.categories == ["car", "chair"] and cfg.ray.address == "auto"
    assert cfg.clip.height == 64  # the rest of the debug preset is kept
    with pytest.raises(ConfigError, match=r"unknown key 'clip\.frames'"):
        load_config(PreprocessConfig, p, ["clip.frames=4"])
    with pytest.raises(ConfigError, match="must look like key.path=value"):
        load_config(PreprocessConfig, p, ["clip.num_frames"])
    with pytest.raises(ConfigError, match=r"clip\.num_frames must be >= 2"):
        load_config(PreprocessConfig, p, ["clip.num_frames=1"])


def test_contradictions_are_refused():
    with pytest.raises(ConfigError, match="stt_radius_schedule must start at step 0"):
        from_dict(TrainConfig, {"model": {"stt_radius_schedule": [[5, 0]]}}, "x")
    with pytest.raises(ConfigError, match="model.pretrained is required"):
        from_dict(TrainConfig, {"model": {"size": "sd15"}}, "x")
    with pytest.raises(ConfigError, match="unknown category 'dragon'"):
        from_dict(SampleDataConfig, {"co3d": {"categories": ["dragon"]}}, "x")


def test_flatten_for_mlflow():
    flat = flatten(to_dict(TrainConfig.debug()))
    assert flat["optim.lr"] == 1e-4 and flat["clip.num_frames"] == 4 and "deepspeed.zero_stage" in flat


def test_credentials_in_urls_never_reach_logs_or_mlflow_params():
    """Configs hold no secrets by design; one pasted into a URL is masked wherever the config is
    printed or logged, and left intact for the job itself (issue 7, security)."""
    from mvcustom.configs import TrainConfig, dump_config, load_config
    from mvcustom.configs.base import mlflow_params

    cfg = load_config(
        TrainConfig,
        "jobs/configs/train_backbone_debug.yaml",
        ["mlflow.tracking_uri=postgresql://mlf:s3cret@db:5432/mlflow", "output=az://runs/x?sig=abc123&sv=1"],
    )
    text = dump_config(cfg)
    assert "postgresql://mlf:***@db:5432/mlflow" in text and "az://runs/x?sig=***&sv=1" in text
    params = mlflow_params(cfg)
    assert params["mlflow.tracking_uri"] == "postgresql://mlf:***@db:5432/mlflow"
    assert not any("s3cret" in v or "abc123" in v for v in params.values()) and "s3cret" not in text
    assert cfg.mlflow.tracking_uri == "postgresql://mlf:s3cret@db:5432/mlflow"  # the job still connects
    assert mlflow_params(load_config(TrainConfig, "jobs/configs/train_backbone_debug.yaml"))["output"] == (
        ".demo/runs/backbone"
    )  # nothing else changes


def test_shipped_evaluation_specs_load():
    from pipelines.evaluation.spec import EvalSpec

    files = sorted((CONFIG_DIR / "specs").glob("*.yaml"))
    assert files
    for path in files:
        spec = load_config(EvalSpec, path)
        rows = spec.rows(default_references=5)
        assert len(rows) == len(spec.subjects) * len(spec.prompts) * len(spec.trajectories) * len(
            spec.seeds
        ) * len(spec.variants)


_EMBEDDED_ENV_CHECK = """
import json, os, sys
import ray
from mvcustom.configs.common import EMBEDDED_WORKER_ENV, RayConfig, init_ray

@ray.remote
def env():
    return {k: os.environ.get(k) for k in [*EMBEDDED_WORKER_ENV, "RAY_ADDRESS"]}

out = {}
for ray_train in (False, True):
    os.environ.pop("RAY_ADDRESS", None)
    init_ray(RayConfig(num_cpus=1), log_to_driver=False, ray_train=ray_train)
    out[str(ray_train)] = {"worker": ray.get(env.remote()), "gcs": ray.get_runtime_context().gcs_address}
    ray.shutdown()
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_embedded_ray_workers_get_the_worker_env_and_ray_train_gets_its_cluster_address():
    """Workers of an embedded Ray inherit EMBEDDED_WORKER_ENV from the driver (no runtime_env,
    which would cost a worker start); with ``ray_train`` they also know their own cluster's
    address (Ray Train's cleaner looks it up; with two local Rays "auto" is ambiguous)."""
    import json
    import os
    import subprocess
    import sys

    from mvcustom.configs.common import EMBEDDED_WORKER_ENV

    env = {k: v for k, v in os.environ.items() if k not in EMBEDDED_WORKER_ENV and k != "RAY_ADDRESS"}
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run(
        [sys.executable, "-c", _EMBEDDED_ENV_CHECK],
        cwd=root,
        env={**env, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and lines, p.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT ") :])
    for case in out.values():
        assert {k: case["worker"][k] for k in EMBEDDED_WORKER_ENV} == EMBEDDED_WORKER_ENV
    assert out["False"]["worker"]["RAY_ADDRESS"] is None
    assert out["True"]["worker"]["RAY_ADDRESS"] == out["True"]["gcs"]
