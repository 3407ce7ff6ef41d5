"""MLflow for every job: one module (issue 17): the tracking URI, runs, params, artifacts from
any fsspec URL, lineage, and training's fault-tolerant :class:`Tracker`.

* :func:`open_run`: the job's run (experiment created on first use), the full resolved config as
  params (redacted), tags; every job opens its run through it (preprocess and sample data via
  :func:`log_job`, training via :func:`start_run`, evaluation in ``pipelines.evaluation.job``).
* :func:`log_artifact`: a file or folder at any fsspec URL (remote ones are copied locally
  first, so an ``s3://`` output logs what a local one does).
* Training: the driver opens the run, rank 0 logs into it by id (:class:`Tracker`). Tags
  ``mvcustom.stage`` and, for stage 2, ``mvcustom.parent_run_id`` (the stage-1 run that produced
  ``init_from``, read from the export's ``training_run.json``) plus MLflow's own
  ``mlflow.parentRunId`` so the UI nests it.

**Lineage** (data -> model -> evaluation): a preprocessing run records its id in its output
folder (``_run.json``, :func:`record_data_run`); training tags ``mvcustom.data_uris`` and
``mvcustom.data_run_ids`` from the shard folders it reads; the export carries
``training_run.json``; the evaluation tags ``mvcustom.model_uri`` / ``mvcustom.model_run_id`` and
the data of its subjects (:func:`lineage_tags`). The export is logged once, by its training run;
later runs refer to it by URI and run id.
"""

from __future__ import annotations

import json
import os

from mvcustom.configs.base import mlflow_params

RUN_FILE = "training_run.json"


def tracking_uri(mlflow_cfg) -> str:
    """Config, else ``$MLFLOW_TRACKING_URI``, else a sqlite store in the working directory
    (MLflow 3 refuses a plain ``./mlruns`` file store without an opt-in)."""
    from pathlib import Path

    return (
        mlflow_cfg.tracking_uri
        or os.environ.get("MLFLOW_TRACKING_URI")
        or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    )


def parent_run_id(init_from: str | None) -> str | None:
    """The MLflow run id recorded in a stage-1 export (``None`` if absent)."""
    if not init_from:
        return None
    import fsspec

    fs, path = fsspec.core.url_to_fs(init_from.rstrip("/") + "/" + RUN_FILE)
    if not fs.exists(path):
        return None
    with fs.open(path) as f:
        return json.load(f).get("run_id")


DATA_RUN_FILE = "_run.json"


def record_data_run(output: str, run_id: str | None) -> None:
    """Write the preprocessing run's id into its output folder (``_run.json``)."""
    if not run_id:
        return
    import fsspec

    with fsspec.open(output.rstrip("/") + "/" + DATA_RUN_FILE, "w") as f:
        json.dump({"run_id": run_id, "job": "preprocess"}, f)


def data_runs(shards: list[str] | str) -> tuple[list[str], list[str]]:
    """``(folders, run ids)`` of the shard folders behind ``shards`` (ids where recorded)."""
    import fsspec

    from mvcustom.data.reader import expand_shards

    folders = set()
    for spec in [shards] if isinstance(shards, str) else shards:
        try:
            folders |= {u.rsplit("/", 1)[0] for u in expand_shards(spec)}
        except FileNotFoundError:  # lineage never fails a job: the URI is recorded as given
            folders.add(spec.rstrip("/"))
    folders = sorted(folders)
    ids = []
    for folder in folders:
        fs, path = fsspec.core.url_to_fs(f"{folder}/{DATA_RUN_FILE}")
        if fs.exists(path):
            with fs.open(path) as f:
                ids.append(json.load(f)["run_id"])
    return folders, ids


def lineage_tags(shards: list[str] | str | None = None, model: str | None = None) -> dict[str, str]:
    """Tags linking a run to its inputs: the data (shard folders and the runs that wrote them)
    and the model (its URI and the training run recorded in it). Values are comma-joined."""
    tags = {}
    if shards:
        folders, ids = data_runs(shards)
        tags["mvcustom.data_uris"] = ",".join(folders)
        if ids:
            tags["mvcustom.data_run_ids"] = ",".join(sorted(set(ids)))
    if model:
        tags["mvcustom.model_uri"] = model
        run = parent_run_id(model)
        if run:
            tags["mvcustom.model_run_id"] = run
    return {k: v[:5000] for k, v in tags.items()}  # MLflow's tag value limit


def open_run(mlflow_cfg, cfg, tags: dict | None = None) -> str | None:
    """Create a run for job config ``cfg`` in ``mlflow_cfg``'s experiment, with the config as
    params and ``tags``; ``None`` when tracking is off."""
    if not mlflow_cfg.enabled:
        return None
    import mlflow

    client = mlflow.MlflowClient(tracking_uri(mlflow_cfg))
    exp = client.get_experiment_by_name(mlflow_cfg.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(mlflow_cfg.experiment)
    run = client.create_run(exp_id, run_name=mlflow_cfg.run_name, tags=tags or {})
    log_config_params(client, run.info.run_id, cfg)
    return run.info.run_id


def start_run(cfg, extra_tags: dict | None = None) -> str | None:
    """Create the training job's run (driver side); returns its id, or ``None`` when off."""
    if not cfg.mlflow.enabled:
        return None
    tags = {
        "mvcustom.stage": cfg.stage,
        "mvcustom.job": "train",
        **lineage_tags(cfg.shards),
        **(extra_tags or {}),
    }
    parent = parent_run_id(cfg.init_from)
    if parent:
        tags["mvcustom.parent_run_id"] = parent
        tags["mlflow.parentRunId"] = parent
    return open_run(cfg.mlflow, cfg, tags)


def log_job(
    cfg, mlflow_cfg, summary: dict, artifacts: dict[str, str] | None = None, job: str | None = None
) -> str | None:
    """One finished job's run: the config as params, the numeric summary figures as metrics,
    the summary as JSON and ``artifacts`` (name -> file or folder, any fsspec URL). Returns the
    run id (``None`` when tracking is off)."""
    run_id = open_run(
        mlflow_cfg, cfg, {"mvcustom.job": job or type(cfg).__name__.removesuffix("Config").lower()}
    )
    if run_id is None:
        return None
    import time

    import mlflow

    client = mlflow.MlflowClient(tracking_uri(mlflow_cfg))
    now = int(time.time() * 1000)
    metrics = [
        mlflow.entities.Metric(k, float(v), now, 0)
        for k, v in summary.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    ]
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i : i + 1000])
    client.log_dict(run_id, summary, "summary.json")
    for name, url in (artifacts or {}).items():
        if url:
            log_artifact(client, run_id, url, name)
    client.set_terminated(run_id)
    return run_id


def log_artifact(client, run_id: str, url: str, artifact_path: str | None) -> None:
    """Log the file or folder at ``url`` (any fsspec URL) as an artifact of ``run_id``. MLflow
    logs local paths: a remote one is copied to a temporary folder first. A missing path is
    skipped."""
    import tempfile

    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        return
    folder = fs.isdir(path)
    if "://" not in url:
        (client.log_artifacts if folder else client.log_artifact)(run_id, path, artifact_path)
        return
    with tempfile.TemporaryDirectory(prefix="mvcustom-artifact-") as d:
        local = os.path.join(d, path.rstrip("/").rsplit("/", 1)[-1])
        fs.get(path.rstrip("/") + ("/" if folder else ""), local, recursive=folder)
        (client.log_artifacts if folder else client.log_artifact)(run_id, local, artifact_path)


def log_config_params(client, run_id: str, cfg) -> None:
    """The config as params of ``run_id`` (redacted; in batches of 100, MLflow's limit)."""
    import mlflow

    items = list(mlflow_params(cfg).items())
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=[mlflow.entities.Param(k, v) for k, v in items[i : i + 100]])


def end_run(cfg, run_id: str | None, status: str = "FINISHED") -> None:
    if run_id is None:
        return
    import mlflow

    try:
        mlflow.MlflowClient(tracking_uri(cfg.mlflow)).set_terminated(run_id, status)
    except Exception as e:  # the job's outcome stands; the run stays RUNNING in the UI
        print(f"[mlflow] could not mark run {run_id} {status}: {type(e).__name__}: {e}", flush=True)


class Tracker:
    """Rank 0's handle on the job's run (metrics, image grids, artifact folders).

    * **Each step once**: a restarted worker group re-runs the steps after its checkpoint; they
      were logged before the failure (with the same values: the loop is deterministic), so
      steps up to the highest one already in the run's ``loss`` history are not logged again.
    * **An MLflow outage never stops training**: MLflow's own client retries are kept short
      (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``/``_TIMEOUT``, unless set), a failed write is kept in a
      buffer (at most ``max_buffered`` points; older ones are dropped and counted) and retried
      every ``retry_every_s``; when the server is back, the buffered points go in with their
      own steps and timestamps and the run gets a ``mvcustom.tracking_gaps`` tag (steps, seconds,
      points dropped, the error).
    """

    def __init__(self, uri: str, run_id: str, retry_every_s: float = 10.0, max_buffered: int = 100_000):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        import mlflow

        self.client = mlflow.MlflowClient(uri)
        self.run_id = run_id
        self.retry_every_s, self.max_buffered = retry_every_s, max_buffered
        self.pending: list = []  # mlflow Metric entities not yet written
        self.gaps: list[dict] = []  # outages seen by this process
        self._gap: dict | None = None
        self._next_try = 0.0
        self._logged_up_to: int | None = None

    def _already_logged(self) -> int:
        if self._logged_up_to is None:
            try:
                history = self.client.get_metric_history(self.run_id, "loss")
                self._logged_up_to = max((m.step for m in history), default=0)
            except Exception as e:  # the server is down right now: assume nothing was logged
                print(
                    f"[mlflow] cannot read the run's history ({type(e).__name__}); steps may repeat",
                    flush=True,
                )
                self._logged_up_to = 0
        return self._logged_up_to

    def log_metrics(self, metrics: dict, step: int) -> None:
        import time

        from mlflow.entities import Metric

        if step <= self._already_logged():
            return  # logged before a restart from an earlier checkpoint
        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if len(self.pending) > self.max_buffered:
            drop = len(self.pending) - self.max_buffered
            self.pending = self.pending[drop:]
            if self._gap is not None:
                self._gap["points_dropped"] += drop
        self.flush(step)

    def flush(self, step: int | None = None, force: bool = False) -> bool:
        """Write the buffered points; ``False`` (and they stay buffered) if MLflow is down."""
        import time

        if not self.pending:
            return True
        if not force and time.time() < self._next_try:
            return False
        try:
            for i in range(0, len(self.pending), 1000):  # MLflow's batch limit
                self.client.log_batch(self.run_id, metrics=self.pending[i : i + 1000])
        except Exception as e:
            self._next_try = time.time() + self.retry_every_s
            if self._gap is None:
                first = min(m.step for m in self.pending)
                self._gap = {
                    "from_step": first,
                    "since": time.time(),
                    "points_dropped": 0,
                    "error": f"{type(e).__name__}: {e}"[:300],
                }
                print(
                    f"[mlflow] tracking unavailable from step {first} ({self._gap['error']}); buffering, training goes on",
                    flush=True,
                )
            self._gap["to_step"] = step if step is not None else self._gap.get("to_step")
            return False
        self.pending = []
        if self._gap is not None:
            gap = {**self._gap, "seconds": round(time.time() - self._gap.pop("since"), 1)}
            self.gaps.append(gap)
            self._gap = None
            print(
                f"[mlflow] tracking back; buffered steps {gap['from_step']}..{gap.get('to_step')} written",
                flush=True,
            )
            try:
                self.client.set_tag(self.run_id, "mvcustom.tracking_gaps", json.dumps(self.gaps))
            except Exception:
                pass  # recorded on the next gap's close or left in the console
        return True

    def log_image(self, image, name: str) -> None:
        try:
            self.client.log_image(self.run_id, image, name)
        except Exception as e:  # a sample grid is not worth stopping training for
            print(f"[mlflow] sample grid {name} not logged: {type(e).__name__}: {e}", flush=True)

    def log_artifacts(self, local_dir: str, name: str) -> None:
        with open(os.path.join(local_dir, RUN_FILE), "w") as f:
            json.dump({"run_id": self.run_id}, f)
        self.flush(force=True)
        try:
            self.client.log_artifacts(self.run_id, local_dir, name)
        except Exception as e:  # the export is in <output>/export either way
            print(f"[mlflow] artifacts {name} not logged: {type(e).__name__}: {e}", flush=True)

    def record_in_export(self, export: str) -> None:
        """Write ``training_run.json`` into the export so stage 2 can tag its parent."""
        import fsspec

        with fsspec.open(export.rstrip("/") + "/" + RUN_FILE, "w") as f:
            json.dump({"run_id": self.run_id}, f)
