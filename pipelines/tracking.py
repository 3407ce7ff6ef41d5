"""MLflow logging for the Ray jobs (driver side only)."""

from __future__ import annotations

from pathlib import Path

from mvcustom.configs.base import mlflow_params
from mvcustom.configs.common import MlflowConfig
from mvcustom.training.tracking import tracking_uri


def log_job(
    cfg, mlflow_cfg: MlflowConfig, summary: dict, artifacts: dict[str, str] | None = None
) -> str | None:
    """One MLflow run: the full resolved config as params, numeric summary figures as metrics,
    the summary as JSON and the given local files/folders as artifacts. Returns the run id."""
    if not mlflow_cfg.enabled:
        return None
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(mlflow_cfg))
    mlflow.set_experiment(mlflow_cfg.experiment)
    with mlflow.start_run(run_name=mlflow_cfg.run_name) as run:
        mlflow.log_params(mlflow_params(cfg))
        mlflow.log_metrics(
            {
                k: float(v)
                for k, v in summary.items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            }
        )
        mlflow.log_dict(summary, "summary.json")
        for name, path in (artifacts or {}).items():
            if path and Path(path).is_dir():
                mlflow.log_artifacts(path, artifact_path=name)
            elif path and Path(path).exists():
                mlflow.log_artifact(path, artifact_path=name)
        return run.info.run_id
