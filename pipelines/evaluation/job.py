"""The evaluation job: spec -> Ray Data batch generation (actor pool, pipeline loaded once per
actor, GPU fraction from config) -> scoring actors -> ``results.parquet``, the aggregate table,
an HTML report and one MLflow run.

Resumable: a sample whose ``result.json`` exists is not touched again; one that was generated but
not scored is only scored; failed ones are retried (their reasons stay in ``results.parquet``
until they succeed). A rerun with another model or other sampling/scoring settings into the same
output is refused (``_evaluation.json``); ``sample.json``/``result.json`` are written atomically
and a truncated one is redone. ``results.parquet`` holds exactly one row per planned sample
(``lost`` for one Ray Data never returned); the summary's ``complete`` is False, and the entry
point exits non-zero, unless every sample scored. Per-sample work lives in the package's other modules.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import fsspec

from mvcustom.configs.base import pin_local_path
from mvcustom.configs.common import init_ray, retry_args_allowed
from pipelines.evaluation.files import read_json, records, sample_dir, write_json
from pipelines.evaluation.generate import GenerateSamples, stt_radius_of
from pipelines.evaluation.report import write_report
from pipelines.evaluation.score import METRICS, TRUTH_METRICS, ScoreSamples, aggregate
from pipelines.evaluation.spec import SPEC_COLUMNS, load_spec

# settings that change what a sample or its scores are (the rest only change how fast)
_SCALING = ("actors", "num_gpus", "scorers", "actor_cpus", "scorer_cpus", "report_samples", "spec", "output")


def _file_identity(fs, path: str, cache: dict | None = None) -> str:
    """Local files: SHA-1 of the content (a re-export of the same weights keeps its identity),
    reused from ``cache`` while the file's size and mtime are unchanged (hashing gigabytes of
    weights at every evaluation start is what it saves); object stores: the backend's change key
    (S3: the ETag, a content hash)."""
    if "file" not in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return str(fs.ukey(path))
    st = os.stat(path)
    stat = [st.st_size, st.st_mtime_ns]
    hit = (cache or {}).get(path)
    if hit and hit[:2] == stat:
        return hit[2]
    h = hashlib.sha1()
    with fs.open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    if cache is not None:
        cache[path] = [*stat, h.hexdigest()]
    return h.hexdigest()


def model_identity(url: str | None, cache: dict | None = None) -> dict | None:
    """What identifies a model folder's content: every file's relative path and content identity
    (:func:`_file_identity`), except ``training_run.json`` (lineage: the MLflow run that wrote it,
    not the weights). ``None`` for a hub id or a missing path (the id is the identity then)."""
    from mvcustom.training.tracking import RUN_FILE

    if not url:
        return None
    fs, root = fsspec.core.url_to_fs(url)
    if not fs.exists(root):
        return None
    if not fs.isdir(root):
        return {"": _file_identity(fs, root, cache)}
    files = [p for p in sorted(fs.find(root)) if not p.endswith("/" + RUN_FILE)]
    return {p[len(root) :].lstrip("/"): _file_identity(fs, p, cache) for p in files}


def eval_fingerprint(cfg, cache: dict | None = None) -> dict:
    from mvcustom.configs.base import flatten, to_dict

    flat = flatten(to_dict(cfg))
    fp = {k: v for k, v in flat.items() if not k.startswith(("ray.", "mlflow.")) and k not in _SCALING}
    # the radius the samples are made at, however it was given: a null that resolves to 1 makes
    # what an explicit 1 makes, and outputs written when the default was a fixed -1 still resume
    # for a model without a training record
    fp["sampling.stt_radius"] = stt_radius_of(cfg)[0]
    fp["model_files"] = model_identity(cfg.model, cache)
    fp["depth_model_files"] = model_identity(cfg.depth_model, cache)
    return json.loads(json.dumps(fp, default=str))


def check_fingerprint(cfg) -> None:
    """Record what produced ``output`` (``_evaluation.json``) and refuse to reuse its samples for
    another model or other sampling/scoring settings (they would be mixed into one table)."""
    path = f"{cfg.output.rstrip('/')}/_evaluation.json"
    # local files' hashes by (size, mtime), kept beside the fingerprint (not part of it)
    cache_path = f"{cfg.output.rstrip('/')}/_file_hashes.json"
    cache = read_json(cache_path) or {}
    new = eval_fingerprint(cfg, cache)
    write_json(cache_path, cache)
    old = read_json(path)
    if old is None:
        write_json(path, new)
        return
    if old != new:
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise ValueError(
            f"evaluation output {cfg.output!r} holds samples made with other settings ({', '.join(diff)}): "
            "a rerun reuses finished samples, so they would be mixed. Evaluate into a new output, or restore "
            "the original model and settings to resume"
        )


def _check_row(row: dict, stored: dict, what: str) -> None:
    # where the shards and the ground truth live may move; what is generated and scored may not
    movable = ("shards", "ground_truth")
    changed = [c for c in SPEC_COLUMNS if c not in movable and c in stored and str(stored[c]) != str(row[c])]
    if changed:
        raise ValueError(
            f"sample {row['sample_id']}: its {what} was made for another spec row (changed: {', '.join(changed)}); "
            "a spec row under an existing sample id must not change. Evaluate into a new output or give it another name"
        )


def plan(cfg) -> dict:
    """What is left to do: rows to generate, generated rows to score, results already there."""
    rows = load_spec(cfg.spec, cfg.num_references)
    todo_generate, todo_score, done = [], [], []
    for row in rows:
        row["shards"] = pin_local_path(row["shards"], must_exist=True)
        d = sample_dir(cfg.output, row["sample_id"])
        result = read_json(f"{d}/result.json")
        if result is not None:
            _check_row(row, result, "result")
            done.append(result)
            continue
        meta = read_json(f"{d}/sample.json")
        if meta is not None and meta.get("status") == "generated":
            _check_row(row, meta, "generated sample")
            todo_score.append(meta)
        else:
            todo_generate.append(row)
    return {"rows": rows, "generate": todo_generate, "score": todo_score, "done": done}


def run_evaluate(cfg) -> dict:
    """Run (or resume) an evaluation; returns the summary."""
    import pandas as pd

    if not cfg.model or not cfg.output:
        raise ValueError("config keys 'model' and 'output' are required (set them in the YAML or with --set)")
    # Ray workers run in their own working directory: pin local relative paths
    cfg.model, cfg.spec = pin_local_path(cfg.model, True), pin_local_path(cfg.spec, True)
    cfg.depth_model, cfg.output = pin_local_path(cfg.depth_model, True), pin_local_path(cfg.output)
    stt_radius, stt_radius_source = stt_radius_of(cfg)
    print(f"[evaluate] STT radius {stt_radius} ({stt_radius_source})", flush=True)
    check_fingerprint(cfg)
    work = plan(cfg)
    t0 = time.time()
    new: list[dict] = []
    execution_error = None
    if work["generate"] or work["score"]:
        try:
            _execute(cfg, work, new)
        except Exception as e:  # Ray Data aborted: the samples it did not return are reported
            execution_error = f"{type(e).__name__}: {e}"[-4000:]
    seconds = time.time() - t0
    # reconcile: exactly one row per planned sample (a sample Ray Data never returned is "lost")
    have = {r["sample_id"] for r in work["done"] + new}
    lost = [
        {**r, "status": "lost", "failure_reason": execution_error or "no result returned"}
        for r in work["rows"]
        if r["sample_id"] not in have
    ]
    results = pd.DataFrame(work["done"] + new + lost)
    assert sorted(results["sample_id"]) == sorted(r["sample_id"] for r in work["rows"]), "results != plan"
    order = {r["sample_id"]: i for i, r in enumerate(work["rows"])}
    results = results.sort_values("sample_id", key=lambda s: s.map(order)).reset_index(drop=True)
    for col in ("failure_reason", "pose_failure_reason"):
        if col not in results:
            results[col] = None
    table = aggregate(results)
    out = cfg.output.rstrip("/")
    with fsspec.open(f"{out}/results.parquet", "wb") as f:
        results.to_parquet(f, index=False)
    with fsspec.open(f"{out}/aggregate.parquet", "wb") as f:
        table.to_parquet(f, index=False)
    with fsspec.open(f"{out}/aggregate.csv", "w") as f:
        table.to_csv(f, index=False)
    score_only = {m["sample_id"] for m in work["score"]}
    generated_now = [
        r for r in new if r["sample_id"] not in score_only and r["status"] != "generation_failed"
    ]
    summary = {
        "output": out,
        "samples": len(work["rows"]),
        "scored": int((results["status"] == "scored").sum()),
        "failed": int((results["status"] != "scored").sum()),
        "skipped_already_scored": len(work["done"]),
        "scored_only": len(work["score"]),
        "generated_now": len(generated_now),
        "lost": len(lost),
        "complete": bool((results["status"] == "scored").all()),
        "seconds": round(seconds, 2),
        # the radius samples without a variant ``radius`` use (per sample: results' stt_radius)
        "stt_radius": stt_radius,
        "stt_radius_source": stt_radius_source,
        "failure_reasons": {
            r["sample_id"]: r["failure_reason"]
            for r in results.to_dict("records")
            if isinstance(r.get("failure_reason"), str)
        },
    }
    summary["failures_by_reason"] = reasons_counted(results)
    if execution_error:
        summary["execution_error"] = execution_error
    if summary["generated_now"] and seconds > 0:
        summary["samples_per_min"] = round(60 * summary["generated_now"] / seconds, 3)
    scored = results[results["status"] == "scored"]
    for m in (
        *METRICS,
        *TRUTH_METRICS,
        "colmap_points",
        "covered_fraction",
        "score_seconds",
        "generate_seconds",
        "peak_gpu_memory_gib",
        "zoom_error",
    ):
        if m in scored and len(scored):
            vals = pd.to_numeric(scored[m], errors="coerce").dropna()
            if len(vals):
                summary[f"{m}_mean"] = float(vals.mean())
                summary[f"{m}_std"] = float(vals.std()) if len(vals) > 1 else 0.0
    for name in ("clip_model", "distance_model"):  # what the similarity figures were computed with
        if name in scored and len(scored):
            summary[name] = ", ".join(sorted(map(str, scored[name].dropna().unique())))
    summary["mlflow_run_id"] = _log_mlflow(cfg, summary, results, table)
    summary["report"] = write_report(out, results, table, summary["mlflow_run_id"])
    if summary["mlflow_run_id"]:  # the report folder (page + images), from any fsspec output
        import mlflow

        from mvcustom.training.tracking import log_artifact, tracking_uri

        client = mlflow.MlflowClient(tracking_uri(cfg.mlflow))
        log_artifact(client, summary["mlflow_run_id"], f"{out.rstrip('/')}/report", "report")
    return summary


def reasons_counted(results) -> list[dict]:
    """Failures once per reason, most frequent first: samples that did not score (by status and
    reason) and scored samples whose pose reconstruction failed (scored 0). Each entry has the
    ``what``, the ``reason``, the ``count`` and up to three example sample ids."""
    groups: dict[tuple[str, str], list[str]] = {}
    for r in results.to_dict("records"):
        if r["status"] != "scored":
            key = (str(r["status"]), str(r.get("failure_reason") or "no reason recorded"))
        elif r.get("pose_failed") is True:
            key = ("pose accuracy 0", str(r.get("pose_failure_reason") or "the reconstruction failed"))
        else:
            continue
        groups.setdefault(key, []).append(r["sample_id"])
    ranked = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    return [{"what": w, "reason": why, "count": len(ids), "examples": ids[:3]} for (w, why), ids in ranked]


def failure_lines(summary: dict) -> list[str]:
    """:func:`reasons_counted`'s entries as console lines: ``N x what: reason (e.g. ids)``."""
    return [
        f"{f['count']} x {f['what']}: {f['reason'][:300]} (e.g. {', '.join(f['examples'])})"
        for f in summary.get("failures_by_reason", [])
    ]


def _execute(cfg, work: dict, new: list) -> None:
    """Generate and score with Ray Data; each returned record is appended to ``new`` as it
    arrives (an aborted run keeps what it finished)."""
    import ray

    from mvcustom.configs import to_dict

    init_ray(cfg.ray, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.max_errored_blocks = cfg.ray.max_errored_blocks
    ctx.op_resource_reservation_enabled = cfg.ray.reserve_operator_resources
    config = to_dict(cfg)

    def actor_stage(ds, cls, size: int, num_cpus: float, num_gpus: float = 0):
        # one sample per call; a sample that kills its actor every time ends as a failure after
        # ray.actor_restarts restarts, not a loop; tasks of a restarted actor are retried
        with retry_args_allowed():  # Ray 2.60 has no named parameter for restarts yet
            return ds.map_batches(
                cls,
                fn_constructor_kwargs={"config": config},
                batch_size=1,
                compute=ray.data.ActorPoolStrategy(size=size),
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                max_restarts=cfg.ray.actor_restarts,
                max_task_retries=cfg.ray.actor_task_retries,
            )

    def records_of(rows: list[dict]):
        # rows travel as JSON: Ray Data would turn a column mixing None and text into floats
        return ray.data.from_items([{"record": json.dumps(r)} for r in rows], override_num_blocks=len(rows))

    parts = []
    if work["generate"]:
        parts.append(
            actor_stage(
                records_of(work["generate"]), GenerateSamples, cfg.actors, cfg.actor_cpus, cfg.num_gpus
            )
        )
    if work["score"]:
        parts.append(records_of(work["score"]))
    ds = parts[0] if len(parts) == 1 else parts[0].union(parts[1])
    ds = actor_stage(ds, ScoreSamples, cfg.scorers, cfg.scorer_cpus)
    for batch in ds.iter_batches(batch_size=1, batch_format="numpy"):
        new += records({"record": list(batch["record"])})


def _log_mlflow(cfg, summary: dict, results, table) -> str | None:
    """Params, figures (overall and per variant), the tables, image grids and trajectory plots."""
    if not cfg.mlflow.enabled:
        return None
    import mlflow

    from mvcustom.training.tracking import lineage_tags, log_artifact, open_run, tracking_uri

    shards = sorted({str(s) for s in results["shards"]}) if "shards" in results else []
    tags = {"mvcustom.job": "evaluate", **lineage_tags(shards or None, cfg.model)}
    tags.update({f"mvcustom.{k}": summary[k] for k in ("clip_model", "distance_model") if k in summary})
    rid = open_run(cfg.mlflow, cfg, tags)
    client = mlflow.MlflowClient(tracking_uri(cfg.mlflow))
    # the STT radius used is a setting: a param beside the config's (whose null means "recorded")
    client.log_batch(
        rid,
        params=[
            mlflow.entities.Param("stt_radius_used", str(summary["stt_radius"])),
            mlflow.entities.Param("stt_radius_source", summary["stt_radius_source"]),
        ],
    )
    metrics = {
        k: float(v)
        for k, v in summary.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and k != "stt_radius"
    }
    for r in table.to_dict("records") if len(table) else []:
        if r["level"] == "all":
            for k, v in r.items():
                if k.endswith(("_mean", "_std")) and v == v:
                    metrics[f"{r['variant']}/{k}"] = float(v)
    client.log_batch(
        rid, metrics=[mlflow.entities.Metric(k, v, int(time.time() * 1000), 0) for k, v in metrics.items()]
    )
    client.log_table(rid, data=results.astype(str), artifact_file="results_table.json")
    if len(table):
        client.log_table(rid, data=table, artifact_file="aggregate_table.json")
    client.log_dict(rid, summary, "summary.json")
    out = cfg.output.rstrip("/")
    log_artifact(client, rid, f"{out}/results.parquet", None)
    log_artifact(client, rid, f"{out}/aggregate.csv", None)
    shown = results[results["status"] == "scored"].head(cfg.report_samples)
    for sid in shown["sample_id"]:
        d = sample_dir(out, sid)
        for name in ("grid", "trajectory", "truth_grid"):  # truth_grid: subjects with ground truth
            log_artifact(client, rid, f"{d}/{name}.png", f"samples/{sid}")
    client.set_terminated(rid)
    return rid
