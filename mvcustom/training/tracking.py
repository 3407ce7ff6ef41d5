"""MLflow for training: the driver opens the run, rank 0 logs into it by id.

One run per training job: the full resolved config as params, tags ``mvcustom.stage`` and, for
stage 2, ``mvcustom.parent_run_id`` (the stage-1 run that produced ``init_from``, read from the
export's ``training_run.json``) plus MLflow's own ``mlflow.parentRunId`` so the UI nests it.
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


def start_run(cfg) -> str | None:
    """Create the job's run (driver side); returns its id, or ``None`` when tracking is off."""
    if not cfg.mlflow.enabled:
        return None
    import mlflow

    client = mlflow.MlflowClient(tracking_uri(cfg.mlflow))
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(cfg.mlflow.experiment)
    tags = {"mvcustom.stage": cfg.stage, "mvcustom.job": "train"}
    parent = parent_run_id(cfg.init_from)
    if parent:
        tags["mvcustom.parent_run_id"] = parent
        tags["mlflow.parentRunId"] = parent
    run = client.create_run(exp_id, run_name=cfg.mlflow.run_name, tags=tags)
    log_config_params(client, run.info.run_id, cfg)
    return run.info.run_id


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

    mlflow.MlflowClient(tracking_uri(cfg.mlflow)).set_terminated(run_id, status)


class Tracker:
    """Rank 0's handle on the job's run (metrics, image grids, artifact folders)."""

    def __init__(self, uri: str, run_id: str):
        import mlflow

        self.client = mlflow.MlflowClient(uri)
        self.run_id = run_id

    def log_metrics(self, metrics: dict, step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()]
        )

    def log_image(self, image, name: str) -> None:
        self.client.log_image(self.run_id, image, name)

    def log_artifacts(self, local_dir: str, name: str) -> None:
        with open(os.path.join(local_dir, RUN_FILE), "w") as f:
            json.dump({"run_id": self.run_id}, f)
        self.client.log_artifacts(self.run_id, local_dir, name)

    def record_in_export(self, export: str) -> None:
        """Write ``training_run.json`` into the export so stage 2 can tag its parent."""
        import fsspec

        with fsspec.open(export.rstrip("/") + "/" + RUN_FILE, "w") as f:
            json.dump({"run_id": self.run_id}, f)
