"""Config parts shared by several jobs."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from mvcustom.configs.base import check


@dataclass
class MlflowConfig:
    """Where runs are tracked.

    Attributes:
        tracking_uri: MLflow tracking URI; ``None`` uses ``$MLFLOW_TRACKING_URI`` or, failing that,
            ``sqlite:///<cwd>/mlflow.db`` (a plain ``./mlruns`` file store is in maintenance mode
            in MLflow 3).
        experiment: experiment name.
        run_name: optional run name (default: MLflow's generated name).
        enabled: set false to run without tracking (tests of pure data paths).
    """

    tracking_uri: str | None = None
    experiment: str = "mvcustom"
    run_name: str | None = None
    enabled: bool = True


@dataclass
class RayConfig:
    """How the job connects to Ray.

    Attributes:
        address: ``None`` starts an embedded local Ray (``ray.init()``); ``"auto"`` joins the
            cluster this process runs on (``ray job submit``); or ``ray://host:port``.
        num_cpus: CPUs for an embedded local Ray (``None``: all of the machine's).
        max_errored_blocks: Ray Data's budget of failed blocks before the job aborts. 0 (the
            default): a record-level failure is already an error row, so a failed block is a
            real fault, and a budget lets Ray Data drop the block's work while the job reports
            success. Raise it only to let a run go on past failures that a rerun will redo
            (the job still exits non-zero naming every unit left undone).
        reserve_operator_resources: Ray Data's per-operator resource reservation (its default
            keeps half the CPUs for other operators; on 2 CPUs that ran one build task at a time,
            measured 5.8 vs 13.7 clips/s). Off by default here: our jobs size their stages so
            none can starve another (see ``pipelines.preprocess.plan_cpus``).
        task_retries: reruns of a task whose worker or node died, or that met a transient
            fault (storage timeout, throttling; ``pipelines.errors``); work units are idempotent.
            For actor pools it bounds the transient-fault attempts per shard.
        actor_restarts: restarts of an actor-pool worker that died (Ray's ``max_restarts``);
            finite, so an input that kills its worker every time ends as a failure, not a loop.
        actor_task_retries: Ray's ``max_task_retries`` for actor-pool tasks; -1 (unlimited, Ray
            Data's default) because Ray core spends one retry per failed push to a dead node's
            actor before the node is declared dead: a bound of 3 lost shards in the node drill.
        dashboard: start the dashboard of an embedded local Ray (off by default: nothing
            listens that the job does not need). A cluster's dashboard is the cluster's business
            (``ray start --dashboard-host``, KubeRay's head Service).
        dashboard_host: where that dashboard listens; ``127.0.0.1`` unless you mean to expose it
            (then put it behind auth: docs/operations.md §5).
        worker_soft_limit: idle worker processes an embedded local Ray keeps alive (``None``:
            Ray's default, the CPU count). With Ray's default a small machine kills idle workers
            after a second and starts new ones that import torch again: 11 worker starts instead
            of 3 for 256 CO3D clips with ZoeDepth on 1 CPU, 0.34x -> 0.68x the plain loop
            (``benchmarks/preprocess.py --profile``). On a cluster, set
            ``RAY_num_workers_soft_limit`` on the nodes instead.
    """

    address: str | None = None
    num_cpus: int | None = None
    max_errored_blocks: int = 0
    reserve_operator_resources: bool = False
    task_retries: int = 3
    actor_restarts: int = 3
    actor_task_retries: int = -1
    dashboard: bool = False
    dashboard_host: str = "127.0.0.1"
    worker_soft_limit: int | None = 8

    def __post_init__(self) -> None:
        check(
            self.num_cpus is None or self.num_cpus > 0, f"ray.num_cpus must be positive, got {self.num_cpus}"
        )
        check(self.max_errored_blocks >= 0, "ray.max_errored_blocks must be >= 0")
        check(self.task_retries >= 0, "ray.task_retries must be >= 0")
        check(self.actor_restarts >= 0, "ray.actor_restarts must be >= 0")
        check(self.actor_task_retries >= -1, "ray.actor_task_retries must be >= -1 (-1: unlimited)")
        check(
            self.worker_soft_limit is None or self.worker_soft_limit >= 1,
            "ray.worker_soft_limit must be >= 1 (or null for Ray's default)",
        )


def init_ray(cfg: RayConfig, log_to_driver: bool = True, ray_train: bool = False) -> None:
    """Connect to Ray the way every job does: join ``cfg.address`` (a cluster: ``auto`` under
    ``ray job submit``) or start an embedded local Ray with ``cfg.num_cpus`` and the dashboard
    only if asked for, bound to ``cfg.dashboard_host``. A no-op when Ray is already up (tests,
    the demo's later stages).

    An embedded Ray's workers inherit :data:`EMBEDDED_WORKER_ENV` from this process's
    environment (set here where unset), not through a ``runtime_env``: a job-level runtime_env
    makes the raylet start a new worker for the first task instead of the one it prestarted
    (measured: +1.1 s before the first clip of a 1-CPU preprocessing job). ``ray_train``
    (jobs that run Ray Train, and whoever starts the Ray that one will join) installs
    :func:`setup_embedded_worker` in every worker, which only a runtime_env can do."""
    import ray

    if ray.is_initialized():
        return
    if cfg.address is not None:
        ray.init(address=cfg.address, log_to_driver=log_to_driver)
        return
    for k, v in EMBEDDED_WORKER_ENV.items():
        os.environ.setdefault(k, v)
    system = {} if cfg.worker_soft_limit is None else {"num_workers_soft_limit": cfg.worker_soft_limit}
    ray.init(
        num_cpus=cfg.num_cpus,
        include_dashboard=cfg.dashboard,
        dashboard_host=cfg.dashboard_host,
        log_to_driver=log_to_driver,
        runtime_env=RAY_TRAIN_RUNTIME_ENV if ray_train else None,
        _system_config=system,
    )


#: Environment of an embedded Ray's workers: their output reaches this console, so what is
#: noise there goes. Ray Train's print patch logs each print a second time when stdout is
#: wrapped (every rank-0 progress line came twice); the Hugging Face libraries' per-file
#: progress bars and their info lines are not progress of the job.
EMBEDDED_WORKER_ENV = {
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
}

#: The runtime_env of an embedded Ray that Ray Train will run on: :func:`setup_embedded_worker`
#: in every worker.
RAY_TRAIN_RUNTIME_ENV = {"worker_process_setup_hook": "mvcustom.configs.common.setup_embedded_worker"}


def setup_embedded_worker() -> None:
    """Worker setup of an embedded Ray, with or without a dashboard.

    Ray's own lookups from inside a worker (Ray Train's placement-group cleaner asks the state
    API for its actors) find "their" cluster as ``address="auto"`` does; with a second local
    Ray on the machine (a test session's, a ``ray start`` cluster) that raises ``Found multiple
    active Ray instances`` and kills the cleaner's thread with a traceback. So each worker is
    told the address of the Ray it belongs to (``RAY_ADDRESS``), as the driver knows it.

    Without a dashboard there is no state API: the cleaner then logs a warning every second
    (dozens of lines per training run). What it guards against, a controller that dies and
    leaves its placement group behind, cannot outlive an embedded Ray, which ends with its
    driver; so its warnings are dropped (errors still show; with a dashboard it has none).
    DeepSpeed calls a torch collective that torch deprecates; that warning is DeepSpeed's to
    fix."""
    import logging
    import warnings

    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(
        logging.ERROR
    )
    warnings.filterwarnings(
        "ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning
    )


@dataclass
class ClipConfig:
    """Frames per sample and their stored size (crop to aspect, then resize).

    Attributes:
        num_frames: frames per clip (N in the shard schema).
        height, width: stored frame size in pixels (multiples of 8 for the VAE).
    """

    num_frames: int = 16
    height: int = 256
    width: int = 256

    def __post_init__(self) -> None:
        check(self.num_frames >= 2, f"clip.num_frames must be >= 2, got {self.num_frames}")
        check(
            self.height % 8 == 0 and self.width % 8 == 0,
            f"clip.height/width must be multiples of 8, got {self.height}x{self.width}",
        )
        check(self.height > 0 and self.width > 0, "clip.height/width must be positive")


@contextlib.contextmanager
def retry_args_allowed():
    """Ray Data 2.60 deprecates remote arguments passed through ``map``/``map_batches``'
    ``**ray_remote_args`` (removal planned for Ray 2.64) but has no named parameter yet for the
    ones our failure semantics rest on (``max_retries``, ``retry_exceptions``, ``max_restarts``,
    ``max_task_retries``). Within this block that one deprecation warning is not shown; every
    other warning is. Revisit when Ray adds the named parameters."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        yield
