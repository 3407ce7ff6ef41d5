"""The one training loop, for both stages, against a :class:`TrainContext` (DESIGN.md §6.11).

Per optimizer step: the STT radius of the schedule, ``grad_accum`` micro-batches through the
DeepSpeed engine, then (rank 0) loss / lr / samples per second / data-wait fraction to MLflow.
Every ``sample_every`` steps all ranks sample a clip (ZeRO-3 gathers collectively) and rank 0
logs the grid; every ``checkpoint_every`` steps (and at the end) each rank writes its ZeRO shard
with ``engine.save_checkpoint``, lists its files in a rank manifest and reports the folder (Ray
Train merges the ranks' folders; a checkpoint counts once every rank's manifest and files are
there). A non-finite loss stops the run before anything after it is checkpointed or exported.

Determinism: the model is built from the seed on every rank; each micro-step's noise, timesteps
and stratified ray samples come from a seed of ``(seed, rank, step, micro)``; the data stream is a
pure function of ``(seed, rank, world)`` and is fast-forwarded on resume. So a stopped and resumed
run continues exactly as an uninterrupted one (tested).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time

import torch

from mvcustom.configs.base import to_dict
from mvcustom.models import build_model
from mvcustom.models.attention import radius_at
from mvcustom.models.objective import set_trainable
from mvcustom.models.schedule import build_scheduler
from mvcustom.training.context import TrainContext
from mvcustom.training.data import batch_stream
from mvcustom.training.engine import TrainStep, build_engine
from mvcustom.training.safe_load import harden_checkpoint_loading

CHECKPOINT_TAG = "zero"
MARKER = "mvcustom_checkpoint.json"
RANK_MANIFEST = "mvcustom_rank_{rank:05d}.json"


def write_rank_manifest(folder: str, rank: int) -> None:
    """Record the files (and sizes) this rank contributes to a checkpoint, written last into its
    folder: a checkpoint in storage is complete only when every rank's manifest is there and
    every file it lists has its size (:func:`mvcustom.training.launch.checkpoint_complete`).
    Ray Train copies each rank's folder separately, so rank 0's marker alone proves nothing
    about the other ranks' ZeRO shards."""
    files = {}
    for dirpath, _, names in os.walk(folder):
        for n in names:
            path = os.path.join(dirpath, n)
            rel = os.path.relpath(path, folder)
            if rel != MARKER and not rel.startswith("mvcustom_rank_"):
                files[rel] = os.path.getsize(path)
    with open(os.path.join(folder, RANK_MANIFEST.format(rank=rank)), "w") as f:
        json.dump({"rank": rank, "files": files}, f)


def _seed(seed: int, rank: int, step: int, micro: int) -> int:
    return (seed * 1_000_003 + rank * 7_919 + step * 131 + micro) % (2**63 - 1)


def optimizer_state_bytes(engine) -> int:
    """Bytes of optimizer state this rank holds (ZeRO partitions it: ~1/N of stage 0's)."""
    opt = engine.optimizer
    while hasattr(opt, "optimizer") and not isinstance(opt, torch.optim.Optimizer):
        opt = opt.optimizer
    total = 0
    for state in opt.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return total


def peak_memory_mib(device: torch.device) -> float:
    """Peak accelerator memory (CUDA) or peak resident set of this process (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def init_distributed(ctx: TrainContext) -> None:
    """Join (or, in a plain single process, create) the process group DeepSpeed uses."""
    import deepspeed

    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        os.environ.setdefault("RANK", str(ctx.rank))
        os.environ.setdefault("WORLD_SIZE", str(ctx.world_size))
        os.environ.setdefault("LOCAL_RANK", str(ctx.local_rank))
    deepspeed.init_distributed(dist_backend="nccl" if ctx.device.type == "cuda" else "gloo")


def _localize(path: str, held: list) -> str:
    """A local folder for a checkpoint that may live in object storage."""
    if "://" not in path:
        return path
    import fsspec

    fs, remote = fsspec.core.url_to_fs(path)
    tmp = tempfile.TemporaryDirectory(prefix="mvcustom-resume-")
    held.append(tmp)
    fs.get(remote.rstrip("/") + "/", tmp.name, recursive=True)
    return tmp.name


TRAINING_RECORD = "mvcustom_training.json"


def radius_schedule(cfg) -> list[tuple[int, int]]:
    """The STT radius schedule this run follows: stage 1 expands progressively
    (``model.stt_radius_schedule``); stage 2 customizes the expanded model at one radius, the
    one inference uses (``model.stage2_stt_radius``, else the stage-1 export's final radius,
    else the schedule's last)."""
    if cfg.stage != "customize":
        return [tuple(e) for e in cfg.model.stt_radius_schedule]
    radius = cfg.model.stage2_stt_radius
    if radius is None and cfg.init_from:
        import fsspec

        try:
            with fsspec.open(f"{cfg.init_from.rstrip('/')}/{TRAINING_RECORD}") as f:
                radius = json.load(f).get("final_stt_radius")
        except FileNotFoundError:
            radius = None
    if radius is None:
        radius = cfg.model.stt_radius_schedule[-1][1]
    return [(0, int(radius))]


def _build(cfg):
    """The model of ``cfg``, built from the seed (the same weights on every rank and at export)."""
    torch.manual_seed(cfg.seed)
    customize = cfg.stage == "customize"
    words = [cfg.data.subject_init_word] if cfg.data.subject_init_word else None
    return build_model(
        cfg.model,
        init_from=cfg.init_from,
        subject_tokens=[cfg.subject_token] if customize else None,
        subject_init_words=words if customize else None,
    )


def train_loop(cfg, ctx: TrainContext, tracker=None) -> dict:
    """Train ``cfg`` (a :class:`mvcustom.configs.train.TrainConfig`) on this rank.

    ``tracker``: an object with ``log_metrics(dict, step)``, ``log_image(array, name)`` and
    ``log_artifacts(local_dir, name)``, used on rank 0 only (``None``: no tracking).
    Returns the last step's figures (and ``export`` on rank 0).
    """
    init_distributed(ctx)
    customize = cfg.stage == "customize"
    model = _build(cfg)
    params = set_trainable(model, cfg.stage)
    engine = build_engine(
        TrainStep(model, cfg.stage, build_scheduler(model.scheduler_config), cfg.loss),
        params,
        cfg,
        ctx.device,
    )
    harden_checkpoint_loading(engine)  # resume reads checkpoints with weights_only=True
    held: list = []
    start = 0
    resume = ctx.latest_checkpoint()
    if resume:
        local = _localize(resume, held)
        _, client = engine.load_checkpoint(local, tag=CHECKPOINT_TAG)
        start = int(client["step"])
        print(f"[rank {ctx.rank}] resumed from {resume} at step {start}", flush=True)
    accum = cfg.optim.grad_accum
    data_stats = {"bad_samples": 0}
    last_checkpoint = start
    batches = batch_stream(
        cfg.shards,
        cfg.stage,
        cfg.batch_size,
        cfg.clip.num_frames,
        cfg.clip.height,
        cfg.clip.width,
        cfg.seed,
        ctx.rank,
        ctx.world_size,
        skip_batches=start * accum,
        shuffle_buffer=cfg.data.shuffle_buffer,
        num_references=cfg.data.num_references if customize else 0,
        subject_token=cfg.subject_token,
        prompt_template=cfg.data.prompt_template_customize if customize else cfg.data.prompt_template,
        min_rotation_deg=cfg.data.min_rotation_deg,
        max_bad_samples=cfg.data.max_bad_samples,
        stats=data_stats,
        subject=cfg.data.subject if customize else None,
        caption_dropout=cfg.data.caption_dropout,
        frame_selection=cfg.data.frame_selection,
    )
    figures: dict = {}
    state_mib: float | None = None  # optimizer state exists (and stays this size) after step 1
    history: list[float] = []  # mean loss per step (all ranks)
    sample_batch = None
    schedule = radius_schedule(cfg)
    if ctx.is_main:
        print(f"[rank 0] {cfg.stage}: STT radius schedule {schedule} (step, radius; -1 = full)", flush=True)
    t_start, t_printed = time.perf_counter(), float("-inf")
    for step in range(start, cfg.max_steps):
        radius = radius_at(schedule, step)
        t_step = time.perf_counter()
        wait = 0.0
        losses: list[float] = []
        for micro in range(accum):
            t0 = time.perf_counter()
            batch = _to_device(next(batches), ctx.device)
            wait += time.perf_counter() - t0
            sample_batch = sample_batch or batch
            seed = _seed(cfg.seed, ctx.rank, step, micro)
            torch.manual_seed(seed)  # anything drawing from the global RNG (stratified rays)
            generator = torch.Generator(device=ctx.device).manual_seed(seed)
            loss, parts = engine(batch, radius, generator)
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
        elapsed = time.perf_counter() - t_step
        mean_loss = torch.tensor(sum(losses) / len(losses), dtype=torch.float64)
        torch.distributed.all_reduce(mean_loss)
        step_loss = float(mean_loss) / ctx.world_size
        if not math.isfinite(step_loss):
            # every rank sees the same all-reduced loss, so all stop here together; returning
            # (not raising) keeps Ray Train from restarting into the same divergence, and the
            # launcher fails the job with this message. Nothing after it is checkpointed/exported.
            error = (
                f"non-finite loss ({step_loss}) at step {step + 1}: training stopped; the last checkpoint "
                f"is step {last_checkpoint} and nothing after it was checkpointed or exported. Lower "
                f"optim.lr (now {cfg.optim.lr:g}) or check the data, then resubmit (it resumes from step "
                f"{last_checkpoint})"
            )
            print(f"[rank {ctx.rank}] {error}", flush=True)
            ctx.report({"step": step + 1, "nonfinite_loss_step": step + 1, "error": error})
            for h in held:
                h.cleanup()
            return {
                "step": step + 1,
                "nonfinite_loss_step": step + 1,
                "error": error,
                "history": history,
                "export": None,
            }
        history.append(step_loss)
        if state_mib is None:
            state_mib = optimizer_state_bytes(engine) / 2**20
        figures = {
            "step": step + 1,
            "loss": step_loss,
            "lr": float(engine.get_lr()[0]),
            "stt_radius": radius,
            "samples_per_s": ctx.world_size * cfg.batch_size * accum / elapsed,
            "data_wait_fraction": wait / elapsed,
            "optimizer_state_mib": state_mib,
            "peak_memory_mib": peak_memory_mib(ctx.device),
            "data_bad_samples": data_stats["bad_samples"],
            **{f"rank0_{k}": v for k, v in parts.items() if k != "loss"},
        }
        if tracker is not None and ctx.is_main:
            tracker.log_metrics({k: v for k, v in figures.items() if k != "step"}, step + 1)
        last = step + 1 == cfg.max_steps
        now = time.perf_counter()
        if ctx.is_main and (step == start or last or now - t_printed >= cfg.progress_every_s):
            print(
                f"[rank 0] {progress_line(step + 1 - start, step + 1, cfg.max_steps, step_loss, now - t_start)}",
                flush=True,
            )
            t_printed = now
        if (step + 1) % cfg.sample_every == 0 or last:
            grid = sample_grid(model, sample_batch, cfg, radius)
            if tracker is not None and ctx.is_main:
                tracker.log_image(grid, f"samples/step_{step + 1:08d}.png")
        if (step + 1) % cfg.checkpoint_every == 0 or last:
            with tempfile.TemporaryDirectory(prefix="mvcustom-ckpt-") as d:
                engine.save_checkpoint(d, tag=CHECKPOINT_TAG, client_state={"step": step + 1})
                write_rank_manifest(d, ctx.rank)
                if ctx.is_main:
                    marker = {
                        "step": step + 1,
                        "stage": cfg.stage,
                        "world_size": ctx.world_size,
                        "config": to_dict(cfg),
                    }
                    with open(os.path.join(d, MARKER), "w") as f:
                        json.dump(marker, f, default=list)
                ctx.report(figures, d)
            last_checkpoint = step + 1
    flush = getattr(tracker, "flush", None) if ctx.is_main else None
    if flush is not None and not flush(force=True):
        print(
            f"[rank 0] MLflow still unreachable: {len(tracker.pending)} metric points not logged", flush=True
        )
    export = export_model(engine, model, params, cfg, ctx)
    if export and tracker is not None:
        tracker.log_artifacts(export, "export")
        tracker.record_in_export(cfg.output.rstrip("/") + "/export")
    for h in held:
        h.cleanup()
    return {
        **figures,
        "history": history,
        "export": cfg.output.rstrip("/") + "/export" if ctx.is_main else None,
    }


def progress_line(done: int, step: int, max_steps: int, loss: float, seconds: float) -> str:
    """``step 120/1000 (12%)  loss 0.1234  0.85 steps/s  ETA 17m16s``: ``done`` steps took
    ``seconds`` in this process (a resumed run's rate counts only its own steps)."""
    rate = done / seconds if seconds > 0 else float("nan")
    left = (max_steps - step) / rate if rate > 0 else float("nan")
    if not math.isfinite(left):
        eta = "?"
    elif left >= 3600:
        eta = f"{int(left // 3600)}h{int(left % 3600 // 60):02d}m"
    else:
        eta = f"{int(left // 60)}m{int(left % 60):02d}s"
    return f"step {step}/{max_steps} ({100 * step // max_steps}%)  loss {loss:.4f}  {rate:.2f} steps/s  ETA {eta}"


@torch.no_grad()
def sample_grid(model, batch: dict, cfg, radius: int):
    """A few-step DDIM sample of the first clip of ``batch`` (its prompt and cameras) above the
    real frames, as a uint8 grid. Runs on every rank (ZeRO-3 gathers weights collectively)."""
    from mvcustom.inference.sampler import ddim_sample, video_grid
    from mvcustom.models import ClipCameras, References

    was_training = model.training
    model.eval()
    frames = batch["frames"][:1]
    B, Fr, _, H, W = frames.shape
    text = model.encode_prompt(batch["caption"][:1])
    cams = (
        ClipCameras(batch["extrinsics"][:1].float(), batch["intrinsics"][:1].float(), (H, W))
        if "extrinsics" in batch
        else None
    )
    refs = None
    if "reference_frames" in batch and cfg.stage == "customize":
        ref_cams = ClipCameras(
            batch["reference_extrinsics"][:1].float(), batch["reference_intrinsics"][:1].float(), (H, W)
        )
        refs = References(model.encode_frames(batch["reference_frames"][:1]), ref_cams)
        refs.features = model.reference_features(refs, text, radius)
    scale = model.vae_scale
    generator = torch.Generator(device=frames.device).manual_seed(cfg.seed)
    latents = ddim_sample(
        lambda x, t: model(x, t, text, cams, refs, radius=radius).sample,
        build_scheduler(model.scheduler_config),
        (1, Fr, model.unet.config.in_channels, H // scale, W // scale),
        cfg.sample_steps,
        generator=generator,
        device=frames.device,
        dtype=model.dtype,
    )
    video = model.decode_latents(latents.to(model.dtype))
    model.train(was_training)
    return video_grid(torch.cat([frames.float(), video.float()], 0))


def export_model(engine, model, params: dict, cfg, ctx: TrainContext) -> str | None:
    """Write the final weights as a ``from_pretrained`` folder at ``<output>/export`` (rank 0).

    The frozen weights come from a fresh fp32 build from the same source (they never change);
    the trained ones are the optimizer's full fp32 master copies, gathered from the ZeRO shards
    (``deepspeed.utils.safe_get_full_fp32_param``, collective under ZeRO-3). Returns the local
    folder that was written (rank 0) or ``None``.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    full = {}
    for name, p in params.items():
        value = safe_get_full_fp32_param(p)  # every rank takes part
        if value is None:
            # ZeRO stage 0 in fp32 keeps no separate master copy: the parameter is the weight
            if hasattr(p, "ds_id") or p.dtype != torch.float32:
                raise RuntimeError(f"DeepSpeed holds no fp32 master copy of trained parameter {name}")
            value = p
        full[name] = value.detach().float().cpu()
    if not ctx.is_main:
        torch.distributed.barrier()
        return None
    fresh = _build(cfg)
    state = fresh.state_dict()
    missing = set(full) - set(state)
    if missing:
        raise RuntimeError(f"trained parameters not in the exported model: {sorted(missing)[:5]}")
    state.update(full)
    fresh.load_state_dict(state)
    target = cfg.output.rstrip("/") + "/export"
    local = tempfile.mkdtemp(prefix="mvcustom-export-")
    fresh.save_pretrained(local)
    # what stage 2 needs to know of this training: the radius the model was trained up to
    record = {
        "stage": cfg.stage,
        "steps": cfg.max_steps,
        "final_stt_radius": radius_at(radius_schedule(cfg), cfg.max_steps - 1),
    }
    with open(os.path.join(local, TRAINING_RECORD), "w") as f:
        json.dump(record, f)
    if target != local:
        fresh.save_pretrained(target)
        import fsspec

        with fsspec.open(f"{target}/{TRAINING_RECORD}", "w") as f:
            json.dump(record, f)
    torch.distributed.barrier()
    return local
