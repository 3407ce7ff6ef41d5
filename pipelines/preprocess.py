"""The preprocessing job's Ray Data builder: raw CO3Dv2 / WebVid / photos -> WebDataset shards.

Shards are the unit of work, retry and resume. The driver lists the inputs deterministically,
assigns them to shards and skips completed ones; the rows (one per shard) then stream through
one of two layouts (``depth.placement``)::

    separate (depth on GPUs)                       fused (depth on CPUs; the default there)
    -> map  build_shard  CPU task per shard:       -> map_batches ShardWorker  actor pool, model
            load/decode, crop/resize, poses (CO3D          loaded once per actor: build, depth
            annotations or pycolmap SfM), encode;          and commit of each shard in one
            bad records become error rows                  process (the work of the three
    -> map_batches DepthStage  actor pool, model           stages on the left, nothing through
            once per actor, GPU if configured              the object store but a status row)
    -> map  write_shard  atomic tar + marker
    driver: collect markers -> manifest.parquet, errors.parquet; summary -> stdout + MLflow

Without a depth model there is one task per shard (build and write fuse: equal CPU requests).

Resources. Separate: depth actors take ``depth.num_cpus`` (0.5 by default) and
``depth.num_gpus``; build tasks take 1 CPU, or what the actors leave when that is less
(:func:`plan_cpus`), so an actor pool can never hold the CPUs the tasks feeding it need (the
deadlock STACK.md notes on 2 CPUs, and the one a 1-CPU run hit here). Fused: an autoscaling
pool that starts with as many workers as the cluster's CPUs hold and grows as nodes join
(:func:`fused_pool`); the shard rows come from the driver, so there are no read tasks to
starve. Why fused on CPUs: each stage of the separate layout is a worker
process of its own (importing torch), and every frame crosses the object store twice; on CPU
that costs more than the stages' overlap gains (``benchmarks/preprocess.py``, README).
Failure semantics (nothing lost, nothing silent): a bad record is an error row; an environmental
fault retries its shard (Ray task/actor retries on :class:`pipelines.errors.TransientError`); a
shard lost with its worker or node is retried; ``ray.max_errored_blocks`` (0) lets no failed
shard pass silently. Any planned shard without a marker at the end makes the run incomplete:
the summary names it and the entry point exits non-zero; a rerun resumes it.
"""

from __future__ import annotations

import json
import math
import pickle
import time
from collections import Counter
from dataclasses import dataclass, field

from mvcustom.configs.common import init_ray, retry_args_allowed
from mvcustom.configs.preprocess import PreprocessConfig
from mvcustom.data.schema import ClipSample, encode_sample
from pipelines import shards as shardlib
from pipelines.depth import add_depth, load_estimator
from pipelines.errors import ShardFailedError, TransientError, as_error_row, is_transient
from pipelines.sources import get_source


@dataclass
class Listing:
    items: list  # the source's items (Co3dItem, WebVidItem, PhotoItem), deterministic order
    errors: list[dict] = field(default_factory=list)


def list_items(cfg: PreprocessConfig) -> Listing:
    items, errors = get_source(cfg.source).list(cfg)
    return Listing(items, errors)


def needs_depth_model(cfg: PreprocessConfig) -> bool:
    return cfg.estimate_depth and get_source(cfg.source).depth_estimate(cfg) is not None


def process_item(item, cfg: PreprocessConfig) -> ClipSample:
    """One input record -> one clip sample (raises with a reason on bad input)."""
    return get_source(cfg.source).build(item, cfg)


def _stage_of(exc: BaseException) -> str:
    return getattr(exc, "stage", "load")


@dataclass
class BuiltShard:
    """One shard's encoded samples and its manifest and error rows, before depth and commit."""

    shard: int
    samples: list[dict]
    manifest: list[dict]
    errors: list[dict]
    build_s: float


def build_samples(shard: int, items: list, cfg: PreprocessConfig) -> BuiltShard:
    """Build every sample of one shard. A record that is bad (:func:`pipelines.errors.as_error_row`)
    becomes an error row and never takes its shard down; an environmental fault (timeout,
    throttling, credentials, memory) raises :class:`TransientError` so Ray retries the shard
    instead of storing a good record as bad; anything else is a bug and fails the shard."""
    t0 = time.perf_counter()
    samples, manifest, errors = [], [], []
    for item in items:
        try:
            clip = process_item(item, cfg)
            samples.append(encode_sample(clip, cfg.jpeg_quality))
            manifest.append(
                {
                    "key": clip.key,
                    "shard": f"{shardlib.shard_name(cfg.split, shard)}.tar",
                    "source": cfg.source,
                    "source_id": item.id,
                    "num_frames": int(clip.frames.shape[0]),
                }
            )
        except Exception as e:
            if is_transient(e):  # the record may be fine: fail the shard, Ray retries it
                raise TransientError(f"shard {shard}, item {item.id}: {type(e).__name__}: {e}") from e
            if not as_error_row(e):  # a bug, not the input's fault: fail loudly
                raise
            reason = str(e) if hasattr(e, "stage") else f"{type(e).__name__}: {e}"
            errors.append({"id": item.id, "stage": _stage_of(e), "reason": reason})
    return BuiltShard(shard, samples, manifest, errors, time.perf_counter() - t0)


def commit(built: BuiltShard, cfg: PreprocessConfig) -> dict:
    """Commit the shard (tar, then marker); returns a small status row. A storage fault while
    writing raises :class:`TransientError` (Ray retries the shard; the commit is idempotent)."""
    try:
        shardlib.commit_shard(cfg.output, cfg.split, built.shard, built.samples, built.manifest, built.errors)
    except Exception as e:
        if is_transient(e):
            raise TransientError(f"committing shard {built.shard}: {type(e).__name__}: {e}") from e
        raise
    return {
        "shard": built.shard,
        "samples": len(built.samples),
        "errors": len(built.errors),
        "build_s": float(built.build_s),
        "done_at": time.time(),
        "node": _node_id(),
    }


def _node_id() -> str:
    """The Ray node this runs on (``local`` outside Ray): the summary counts shards per node."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


def build_shard(row: dict, cfg: PreprocessConfig) -> dict:
    """Ray Data ``map`` UDF of the separate layout: :func:`build_samples` as a row."""
    b = build_samples(int(row["shard"]), pickle.loads(row["items"]), cfg)
    return {
        "shard": b.shard,
        "samples": pickle.dumps(b.samples),
        "manifest": json.dumps(b.manifest),
        "errors": json.dumps(b.errors),
        "build_s": b.build_s,
    }


def write_shard(row: dict, cfg: PreprocessConfig) -> dict:
    """Ray Data ``map`` UDF of the separate layout: :func:`commit` a built (and depth-added) row."""
    built = BuiltShard(
        int(row["shard"]),
        pickle.loads(row["samples"]),
        json.loads(row["manifest"]),
        json.loads(row["errors"]),
        float(row["build_s"]),
    )
    return commit(built, cfg)


def depth_mode(cfg: PreprocessConfig) -> str:
    """``both`` keeps CO3D's depth beside the estimate; ``replace`` writes the estimate as depth."""
    return get_source(cfg.source).depth_estimate(cfg) or "replace"


class ShardWorker:
    """The whole per-shard job in one process: build -> depth -> commit, the depth model loaded
    once. A Ray Data actor-pool UDF in the fused layout (``depth.placement``; one shard row per
    batch), and the loop of :func:`preprocess_inline`.

    Args:
        cfg: the job's config.
        set_threads: give torch ``floor(depth.num_cpus)`` threads (an actor's share of its node);
            ``False`` leaves the calling process's setting alone.
    """

    def __init__(self, cfg: PreprocessConfig, set_threads: bool = True):
        self.cfg = cfg
        self.transient_failures: dict[int, int] = {}
        self.estimator = load_estimator(cfg.depth, set_threads) if needs_depth_model(cfg) else None

    def process(self, shard: int, items: list) -> dict:
        built = build_samples(shard, items, self.cfg)
        if self.estimator is not None:
            mode = depth_mode(self.cfg)
            built.samples = [add_depth(s, self.estimator, mode) for s in built.samples]
        return commit(built, self.cfg)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        rows = []
        for s, i in zip(batch["shard"], batch["items"], strict=True):
            shard = int(s)
            try:
                rows.append(self.process(shard, pickle.loads(i)))
            except TransientError as e:
                # Ray retries this task on this actor (actor_task_retry_on_errors) and its task
                # retries are unlimited so that a dead node cannot use them up; the bound on a
                # fault that persists is counted here, per shard
                n = self.transient_failures[shard] = self.transient_failures.get(shard, 0) + 1
                if n > self.cfg.ray.task_retries:
                    raise ShardFailedError(f"shard {shard}: {n} attempts failed, the last with: {e}") from e
                raise
        return {k: np.array([r[k] for r in rows]) for k in rows[0]}


def steady_rate(done: list[tuple[float, int]]) -> float | None:
    """Clips/s between the first and the last shard commit: throughput without start-up cost."""
    if len(done) < 3:
        return None
    done = sorted(done)
    span = done[-1][0] - done[0][0]
    return sum(n for _, n in done[1:]) / span if span > 0 else None


def plan_cpus(cfg: PreprocessConfig, cluster_cpus: float) -> tuple[float, float]:
    """CPUs per build task and per write task of the separate layout, leaving the depth actors
    their share.

    The actor pool holds ``actors * num_cpus`` for the whole run; a build task that asks for
    more than what is left could never be scheduled and the job would hang (seen with one CPU
    and a 0.5-CPU actor). The ``free`` CPUs left are split evenly over ``ceil(free)`` build
    tasks, so as many builders run as there are cores to feed them (1.5 free -> two 0.75 tasks,
    not one 1-CPU task that leaves a core idle), and a pool that leaves nothing is refused.
    """
    if not needs_depth_model(cfg) or cfg.depth.fused:
        return 1.0, 1.0
    reserved = (cfg.depth.actors or 1) * cfg.depth.cpus_per_actor
    free = cluster_cpus - reserved
    if free <= 0:
        raise ValueError(
            f"depth.actors x depth.num_cpus = {reserved:g} CPUs leaves nothing of the cluster's {cluster_cpus:g} "
            "for the tasks that feed the actors; lower depth.num_cpus or depth.actors"
        )
    return free / math.ceil(free), min(0.25, free)


def fused_workers(cfg: PreprocessConfig, cluster_cpus: float) -> int:
    """Shard workers the cluster's CPUs hold now at ``depth.num_cpus`` each (``depth.actors``
    when set). The input rows are already in the object store: there are no read tasks for
    the pool to starve."""
    if cfg.depth.actors is not None:
        return cfg.depth.actors
    return max(1, math.floor(cluster_cpus / cfg.depth.cpus_per_actor + 1e-9))


def fused_pool(cfg: PreprocessConfig, cluster_cpus: float, shards: int) -> dict:
    """``ActorPoolStrategy`` arguments of the fused layout: a fixed ``depth.actors``, or an
    autoscaling pool that starts with what the cluster holds now and may grow to
    ``depth.max_actors`` (default: one per shard) as nodes join; never more than ``shards``."""
    if cfg.depth.actors is not None:
        return {"size": cfg.depth.actors}
    start = min(fused_workers(cfg, cluster_cpus), shards)
    top = max(start, min(cfg.depth.max_actors or shards, shards))
    return {"min_size": start, "max_size": top, "initial_size": start}


def content_fingerprint(cfg: PreprocessConfig) -> dict:
    """The settings that decide what the shards contain (not how fast they are made)."""
    from mvcustom.configs.base import flatten, to_dict

    flat = flatten(to_dict(cfg))
    scaling = (
        "ray.",
        "mlflow.",
        "depth.actors",
        "depth.placement",
        "depth.num_gpus",
        "depth.num_cpus",
        "depth.batch_size",
        "sfm.num_threads",
        "lock_ttl_s",
    )
    return {k: v for k, v in flat.items() if not k.startswith(scaling) and k != "output"}


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def run_preprocess(cfg: PreprocessConfig) -> dict:
    """Run the job; returns the summary (also printed by the entry point and logged to MLflow).

    The summary's ``shards_failed`` lists every planned shard that has no marker when the run
    ends (``complete`` is False then; the entry point exits non-zero): a shard whose fault
    outlasted its retries, or every shard left when Ray Data aborted (``execution_error``).
    """
    if not cfg.input or not cfg.output:
        raise ValueError("config keys 'input' and 'output' are required (set them in the YAML or with --set)")
    t0 = time.time()
    shardlib.preflight_output(cfg.output)
    with shardlib.OutputLock(cfg.output, cfg.lock_ttl_s):
        shardlib.check_job_fingerprint(cfg.output, content_fingerprint(cfg))
        t_list = time.time()
        listing = list_items(cfg)
        phases = {"setup_s": t_list - t0, "listing_s": time.time() - t_list}
        specs = shardlib.assign_shards(len(listing.items), cfg.samples_per_shard)
        shardlib.check_plan(cfg.output, cfg.split, [[listing.items[j].id for j in r] for r in specs])
        done = shardlib.completed_shards(cfg.output, cfg.split)
        todo = [i for i in range(len(specs)) if i not in done]
        shardlib.clean_temporaries(cfg.output)
        results: list[dict] = []
        execution_error = None
        if todo:
            try:
                _execute(cfg, listing, specs, todo, results, phases)
            except Exception as e:  # Ray Data aborted: report what is missing, then fail the job
                execution_error = f"{type(e).__name__}: {e}"[-4000:]
        manifest, errors, complete = shardlib.collect(cfg.output, cfg.split, listing.errors)
        missing = [i for i in todo if i not in complete]
    seconds = time.time() - t0
    if results:  # where a run's time goes: its fixed cost is everything before the first commit
        commits = sorted(r["done_at"] for r in results)
        phases["first_commit_s"] = commits[0] - t0
        phases["last_commit_s"] = commits[-1] - t0
    reasons: dict[str, dict] = {}
    for r in errors.to_pylist():
        entry = reasons.setdefault(r["stage"], {"count": 0, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < 3:
            entry["examples"].append(f"{r['id']}: {r['reason'][:200]}")
    summary = {
        "source": cfg.source,
        "output": cfg.output,
        "complete": not missing,
        "inputs": len(listing.items) + len(listing.errors),
        "clips_written": manifest.num_rows,
        "errors": errors.num_rows,
        "shards_total": len(specs),
        "shards_skipped_complete": len(specs) - len(todo),
        "shards_written": len(results),
        "shards_failed": [shardlib.shard_name(cfg.split, i) for i in missing],
        "shards_failed_count": len(missing),
        "items_not_processed": sum(len(specs[i]) for i in missing),
        "started_at": t0,  # epoch seconds: with phases_s, where a whole program's time went
        "seconds": round(seconds, 2),
        "clips_per_s": round(sum(r["samples"] for r in results) / seconds, 3) if results else 0.0,
        "steady_clips_per_s": _round(steady_rate([(r["done_at"], r["samples"]) for r in results])),
        "shards_by_node": dict(Counter(str(r["node"]) for r in results)),
        "failure_reasons": reasons,
        "phases_s": {k: round(v, 2) for k, v in phases.items()},
    }
    if execution_error:
        summary["execution_error"] = execution_error
    return summary


def _execute(
    cfg: PreprocessConfig, listing: Listing, specs: list[range], todo: list[int], results: list, phases: dict
) -> None:
    """Build the Ray Data program over the shards in ``todo`` and run it, appending each shard's
    status row to ``results`` as it commits (so a run that aborts still reports what it did)."""
    import ray

    t = time.time()
    init_ray(cfg.ray)
    phases["ray_init_s"] = time.time() - t
    ctx = ray.data.DataContext.get_current()
    # 0 by default: a record-level failure is already an error row, so a failed block is a real
    # fault, and a budget > 0 would let Ray Data drop its shards and finish "successfully"
    ctx.max_errored_blocks = cfg.ray.max_errored_blocks
    ctx.op_resource_reservation_enabled = cfg.ray.reserve_operator_resources
    ctx.actor_task_retry_on_errors = [TransientError]
    rows = [{"shard": i, "items": pickle.dumps([listing.items[j] for j in specs[i]])} for i in todo]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    cluster_cpus = ray.cluster_resources().get("CPU", 1.0)
    # tasks: rerun when their worker or node died, or on a transient fault (bounded by Ray)
    retries = {"max_retries": cfg.ray.task_retries, "retry_exceptions": [TransientError]}
    # actors: restarted at most ray.actor_restarts times (a shard that kills its worker every
    # time ends as a failure, not a loop); their tasks are retried without limit by default
    # (ray.actor_task_retries = -1), since Ray core spends a retry per failed push to a dead
    # node's actor before the GCS declares the node dead (a bound of 3 lost shards that way)
    actor_ft = {"max_restarts": cfg.ray.actor_restarts, "max_task_retries": cfg.ray.actor_task_retries}
    with retry_args_allowed():  # Ray 2.60 has no named parameter for retries yet
        d = cfg.depth
        if needs_depth_model(cfg) and d.fused:
            # One stage: every shard is built, given depth and committed by one actor, which loaded
            # the model once. Two shards in flight per actor: the next is queued while one runs
            # (with one, each actor idled ~0.15 s per shard until the executor's 10 Hz loop saw the
            # completion; ~10% on 1-s shards), and at most one waits at the end.
            ds = ds.map_batches(
                ShardWorker,
                fn_constructor_kwargs={"cfg": cfg},
                batch_size=1,
                compute=ray.data.ActorPoolStrategy(
                    **fused_pool(cfg, cluster_cpus, len(rows)), max_tasks_in_flight_per_actor=2
                ),
                num_cpus=d.cpus_per_actor,
                num_gpus=d.num_gpus,
                **actor_ft,
            )
        else:
            build_cpus, write_cpus = plan_cpus(cfg, cluster_cpus)
            # max_retries also keeps Ray Data from fusing the build into the depth actors when
            # their CPU requests happen to be equal (it did on 1 CPU: every build then ran
            # serially inside one actor).
            ds = ds.map(build_shard, fn_kwargs={"cfg": cfg}, num_cpus=build_cpus, **retries)
            if needs_depth_model(cfg):
                from pipelines.depth import DepthStage

                ds = ds.map_batches(
                    DepthStage,
                    fn_constructor_kwargs={"cfg": d, "mode": depth_mode(cfg)},
                    batch_size=1,
                    compute=ray.data.ActorPoolStrategy(size=d.actors or 1),
                    num_cpus=d.cpus_per_actor,
                    num_gpus=d.num_gpus,
                    **actor_ft,
                )
            # Without a depth stage the writer asks for what the builder asks for, so Ray Data
            # fuses the two into one task (no second worker pool, no payload through the object
            # store).
            ds = ds.map(write_shard, fn_kwargs={"cfg": cfg}, num_cpus=write_cpus, **retries)
    for r in ds.iter_rows():
        results.append(r)


def failure_report(summary: dict, rerun: str) -> str:
    """What did not finish and how to finish it (printed by the entry point before it exits 1)."""
    lines = [
        f"preprocessing INCOMPLETE: {summary['shards_failed_count']} of {summary['shards_total']} shards "
        f"({summary['items_not_processed']} inputs) have no committed marker:",
        "  "
        + ", ".join(summary["shards_failed"][:20])
        + (" ..." if summary["shards_failed_count"] > 20 else ""),
    ]
    if summary.get("execution_error"):
        lines.append(f"  Ray Data stopped with: {summary['execution_error'][-1500:]}")
    lines.append(f"  Rerun the same command to resume (committed shards are skipped): {rerun}")
    return "\n".join(lines)


def preprocess_inline(cfg: PreprocessConfig) -> dict:
    """The job's own per-shard work (:class:`ShardWorker`: build, depth, write) in this process,
    without Ray: the benchmark's baseline, and a quick way for tests to make shards. Same outputs
    as :func:`run_preprocess` (shards, markers, manifest, errors); no resume, no parallelism."""
    listing = list_items(cfg)
    worker = ShardWorker(cfg, set_threads=False)
    n, done = 0, []
    for idx, rng in enumerate(shardlib.assign_shards(len(listing.items), cfg.samples_per_shard)):
        status = worker.process(idx, [listing.items[j] for j in rng])
        n += status["samples"]
        done.append((status["done_at"], status["samples"]))
    shardlib.collect(cfg.output, cfg.split, listing.errors)
    return {"clips_written": n, "commits": done, "errors": len(listing.errors)}
