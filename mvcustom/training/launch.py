"""Starting a training job: Ray Train's ``TorchTrainer`` (clusters, the demo) or one local process.

:func:`run_training` (what ``python -m jobs.train`` calls) opens the MLflow run, finds the latest
checkpoint of an earlier run of the same job (so resubmitting a stopped job resumes it), and
runs :func:`mvcustom.training.loop.train_loop` on ``scaling.num_workers`` Ray Train workers with
a ``FailureConfig`` (a dead worker restarts the group from the last reported checkpoint).
Checkpoints live in ``<output>/train/checkpoint_*`` (any fsspec URL Ray's storage accepts); the
final weights in ``<output>/export``. A resubmission resumes from the newest checkpoint that every
rank's files reached (:func:`checkpoint_complete`), and refuses changed run-defining settings
(:func:`check_resume`). A non-finite loss fails the job (``FloatingPointError``) with nothing
checkpointed or exported after it.
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


def checkpoint_complete(fs, folder: str) -> tuple[dict | None, str]:
    """``(marker, "")`` when ``folder`` holds a whole checkpoint, else ``(None, why not)``.

    Whole: rank 0's marker parses, and for each of its ``world_size`` ranks the rank manifest
    is there and every file it lists exists with the listed size (Ray Train copies each rank's
    folder into storage on its own; a job killed mid-copy leaves some ranks' ZeRO shards out).
    A marker without ``world_size`` (written before rank manifests existed) counts as whole.
    """
    from mvcustom.training.loop import RANK_MANIFEST

    try:
        with fs.open(f"{folder}/{MARKER}") as f:
            marker = json.load(f)
        step = int(marker["step"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None, "no complete marker (still being copied, or torn)"
    if "world_size" not in marker:
        return marker, ""
    sizes = {p[len(folder) :].lstrip("/"): d.get("size") for p, d in fs.find(folder, detail=True).items()}
    for rank in range(int(marker["world_size"])):
        name = RANK_MANIFEST.format(rank=rank)
        if name not in sizes:
            return None, f"step {step}: rank {rank}'s files never arrived ({name} missing)"
        try:  # listed but still being copied (empty or cut short) is not whole yet
            with fs.open(f"{folder}/{name}") as f:
                listed = dict(json.load(f)["files"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return (
                None,
                f"step {step}: rank {rank}'s manifest {name} is incomplete (still being copied, or torn)",
            )
        for rel, size in listed.items():
            if sizes.get(rel) != size:
                return None, f"step {step}: rank {rank}'s {rel} is missing or incomplete"
    return marker, ""


def latest_checkpoint(output: str) -> str | None:
    """The newest complete checkpoint of ``<output>/train`` (by recorded step), or ``None``;
    incomplete ones are skipped with a line saying why (:func:`checkpoint_complete`)."""
    import fsspec

    root = _storage(output).rstrip("/") + f"/{RUN_NAME}"
    fs, base = fsspec.core.url_to_fs(root)
    fs.invalidate_cache(base)
    if not fs.exists(base):
        return None
    best: tuple[int, str] | None = None
    for marker_path in fs.glob(f"{base}/checkpoint_*/{MARKER}"):
        folder = marker_path.rsplit("/", 1)[0]
        marker, why = checkpoint_complete(fs, folder)
        if marker is None:
            print(f"[train] skipping checkpoint {folder}: {why}", flush=True)
            continue
        step = int(marker["step"])
        if best is None or step > best[0]:
            best = (step, folder)
    if best is None:
        return None
    proto = root.split("://", 1)[0] + "://" if "://" in root else ""
    return proto + best[1] if proto and not best[1].startswith(proto) else best[1]


def check_resume(cfg, checkpoint: str) -> None:
    """Refuse to resume ``checkpoint`` with settings that would silently change the run (the
    data stream is fast-forwarded by step x accumulation x batch per rank and world size):
    every key of ``TrainConfig.RESUME_KEYS`` must match the checkpoint's, unless listed in
    ``cfg.resume_allow``."""
    import fsspec

    from mvcustom.configs.base import flatten

    with fsspec.open(f"{checkpoint.rstrip('/')}/{MARKER}") as f:
        saved = flatten(json.load(f).get("config") or {})
    now = flatten(to_dict(cfg))
    changed = [
        k for k in cfg.RESUME_KEYS if k in saved and k not in cfg.resume_allow and saved[k] != now.get(k)
    ]
    if changed:
        what = "; ".join(f"{k}: {saved[k]!r} -> {now.get(k)!r}" for k in changed)
        raise ValueError(
            f"cannot resume {checkpoint} with changed settings ({what}). Restore them, write to a new output, "
            f"or allow the change explicitly: --set resume_allow=[{','.join(changed)}]"
        )


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
    if resume:
        check_resume(cfg, resume)
    from mvcustom.training.data import check_clip_lengths

    check_clip_lengths(cfg)
    subjects = None
    if cfg.stage == "customize":
        from mvcustom.training.data import check_subject

        subjects = check_subject(cfg)
        print(f"[train] stage 2 learns {cfg.subject_token} = {', '.join(subjects)}", flush=True)
    run_id = start_run(cfg, {"mvcustom.subject": ", ".join(subjects)} if subjects else None)
    init_ray(cfg.ray, ray_train=True)
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
    metrics = dict(result.metrics or {})
    if metrics.get("nonfinite_loss_step"):
        end_run(cfg, run_id, "FAILED")
        raise FloatingPointError(
            metrics.get("error") or f"non-finite loss at step {metrics['nonfinite_loss_step']}"
        )
    end_run(cfg, run_id)
    return {
        "subject": subjects,
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
    if out.get("nonfinite_loss_step"):
        end_run(cfg, run_id, "FAILED")
        raise FloatingPointError(out["error"])
    end_run(cfg, run_id)
    return {**out, "reports": ctx.reports, "mlflow_run_id": run_id}
