"""Starting a training job: Ray Train's ``TorchTrainer`` (clusters, the demo) or one local process.

:func:`run_training` (what ``python -m jobs.train`` calls) opens the MLflow run, finds the latest
checkpoint of an earlier run of the same job (so resubmitting a stopped job resumes it), and
runs :func:`mvcustom.training.loop.train_loop` on ``scaling.num_workers`` Ray Train workers with
a ``FailureConfig`` (a dead worker restarts the group from the last reported checkpoint).
Checkpoints live in ``<output>/train/checkpoint_*`` (any fsspec URL Ray's storage accepts); the
final weights in ``<output>/export``.
"""

from __future__ import annotations

import json
import os

from mvcustom.configs.base import from_dict, pin_local_path, to_dict
from mvcustom.configs.common import init_ray
from mvcustom.training.loop import MARKER

RUN_NAME = "train"


def _storage(output: str) -> str:
    return output if "://" in output else os.path.abspath(output)


def latest_checkpoint(output: str) -> str | None:
    """The newest complete checkpoint of ``<output>/train`` (by recorded step), or ``None``."""
    import fsspec

    root = _storage(output).rstrip("/") + f"/{RUN_NAME}"
    fs, base = fsspec.core.url_to_fs(root)
    if not fs.exists(base):
        return None
    best: tuple[int, str] | None = None
    for marker in fs.glob(f"{base}/checkpoint_*/{MARKER}"):
        try:
            with fs.open(marker) as f:
                step = int(json.load(f)["step"])
        except (ValueError, KeyError, TypeError):
            continue  # a marker still being copied into storage (or torn by a crash): not complete
        folder = marker.rsplit("/", 1)[0]
        if best is None or step > best[0]:
            best = (step, folder)
    if best is None:
        return None
    proto = root.split("://", 1)[0] + "://" if "://" in root else ""
    return proto + best[1] if proto and not best[1].startswith(proto) else best[1]


def resolve_paths(cfg):
    """A copy of ``cfg`` whose local paths are absolute; the shards must exist (checked here,
    on the driver, so a typo fails at once instead of in every worker restart)."""
    from mvcustom.data.reader import expand_shards

    data = to_dict(cfg)
    data["shards"] = [pin_local_path(s) for s in cfg.shards]
    data["output"] = pin_local_path(cfg.output)
    data["init_from"] = pin_local_path(cfg.init_from, must_exist=True)
    data["model"]["pretrained"] = pin_local_path(cfg.model.pretrained, must_exist=True)
    data["model"]["motion_adapter"] = pin_local_path(cfg.model.motion_adapter, must_exist=True)
    data["deepspeed"]["config_file"] = pin_local_path(cfg.deepspeed.config_file)
    resolved = from_dict(type(cfg), data, "resolved config")
    expand_shards(resolved.shards)
    return resolved


def _worker(config: dict) -> None:
    """``train_loop_per_worker``: rebuild the typed config, run the loop under Ray Train."""
    from mvcustom.configs.train import TrainConfig
    from mvcustom.training.context import RayContext
    from mvcustom.training.loop import train_loop
    from mvcustom.training.tracking import Tracker

    cfg = from_dict(TrainConfig, config["config"], "train_loop_config")
    ctx = RayContext(config.get("resume_from"), use_gpu=cfg.scaling.use_gpu)
    tracker = (
        Tracker(config["tracking_uri"], config["run_id"]) if config.get("run_id") and ctx.is_main else None
    )
    train_loop(cfg, ctx, tracker)


def run_training(cfg) -> dict:
    """Run a training job on Ray (embedded local Ray unless ``ray.address`` is set)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from mvcustom.training.tracking import end_run, start_run, tracking_uri

    if not cfg.output:
        raise ValueError("output must name the run folder (checkpoints and the export go there)")
    if not cfg.shards:
        raise ValueError("shards must list the training shards (URLs, folders or globs)")
    cfg = resolve_paths(cfg)
    resume = latest_checkpoint(cfg.output)
    run_id = start_run(cfg)
    init_ray(cfg.ray)
    sc = cfg.scaling
    resources = {"CPU": sc.cpus_per_worker}
    if sc.use_gpu:
        resources["GPU"] = sc.gpus_per_worker
    trainer = TorchTrainer(
        _worker,
        train_loop_config={
            "config": to_dict(cfg),
            "resume_from": resume,
            "run_id": run_id,
            "tracking_uri": tracking_uri(cfg.mlflow),
        },
        scaling_config=ScalingConfig(
            num_workers=sc.num_workers,
            use_gpu=sc.use_gpu,
            resources_per_worker=resources,
            placement_strategy=sc.placement_strategy,
        ),
        torch_config=TorchConfig(backend="nccl" if sc.use_gpu else "gloo"),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=_storage(cfg.output),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
    )
    try:
        result = trainer.fit()
    except BaseException:
        end_run(cfg, run_id, "FAILED")
        raise
    end_run(cfg, run_id)
    metrics = dict(result.metrics or {})
    return {
        "resumed_from": resume,
        "mlflow_run_id": run_id,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "export": cfg.output.rstrip("/") + "/export",
        **{k: v for k, v in metrics.items() if isinstance(v, int | float)},
    }


def run_local(cfg, resume_from: str | None = None, track: bool = False) -> dict:
    """The same loop in this process (one rank, no Ray): tests and debugging."""
    from mvcustom.training.context import LocalContext
    from mvcustom.training.loop import train_loop
    from mvcustom.training.tracking import Tracker, end_run, start_run, tracking_uri

    run_id = start_run(cfg) if track else None
    ctx = LocalContext(cfg.output, resume_from, use_gpu=cfg.scaling.use_gpu)
    tracker = Tracker(tracking_uri(cfg.mlflow), run_id) if run_id else None
    out = train_loop(cfg, ctx, tracker)
    end_run(cfg, run_id)
    return {**out, "reports": ctx.reports, "mlflow_run_id": run_id}
