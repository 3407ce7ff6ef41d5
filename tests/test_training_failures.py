"""Failure semantics of training (issue 15): torn checkpoints, changed settings on resume,
divergence, corrupt shards, and MLflow outages and restarts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mvcustom.training.launch import check_resume, checkpoint_complete, latest_checkpoint
from mvcustom.training.loop import MARKER, RANK_MANIFEST
from tests.test_training import debug_config


# ---------------------------------------------------------------------------- checkpoints
def _fake_checkpoint(root: Path, name: str, step: int, world: int = 2) -> Path:
    d = root / "train" / name
    (d / "zero").mkdir(parents=True)
    for r in range(world):
        f = d / "zero" / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
        f.write_bytes(b"x" * (100 + r))
        (d / RANK_MANIFEST.format(rank=r)).write_text(
            json.dumps({"rank": r, "files": {f"zero/{f.name}": 100 + r}})
        )
    (d / MARKER).write_text(json.dumps({"step": step, "world_size": world, "config": {}}))
    return d


def test_a_checkpoint_counts_only_when_every_rank_arrived(tmp_path):
    import fsspec

    fs = fsspec.filesystem("file")
    older = _fake_checkpoint(tmp_path, "checkpoint_a", 2)
    newer = _fake_checkpoint(tmp_path, "checkpoint_b", 4)
    assert latest_checkpoint(str(tmp_path)) == str(newer)
    (newer / "zero" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()  # torn: rank 1's shard lost
    marker, why = checkpoint_complete(fs, str(newer))
    assert marker is None and "rank 1" in why
    assert latest_checkpoint(str(tmp_path)) == str(older)
    (older / "zero" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x" * 3)  # half-copied
    assert latest_checkpoint(str(tmp_path)) is None
    (older / "zero" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x" * 100)
    assert latest_checkpoint(str(tmp_path)) == str(older)
    for torn in ("", '{"rank": 1, "fi'):  # a rank manifest caught mid-copy (CI saw an empty one)
        (older / RANK_MANIFEST.format(rank=1)).write_text(torn)
        marker, why = checkpoint_complete(fs, str(older))
        assert marker is None and "rank 1's manifest" in why and "incomplete" in why
        assert latest_checkpoint(str(tmp_path)) is None
    (older / RANK_MANIFEST.format(rank=1)).unlink()
    assert "never arrived" in checkpoint_complete(fs, str(older))[1]


def test_resume_refuses_changed_run_settings_unless_allowed(train_shards, tmp_path):
    from mvcustom.configs.base import to_dict

    cfg = debug_config(train_shards, tmp_path, max_steps=4)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / MARKER).write_text(json.dumps({"step": 2, "world_size": 2, "config": to_dict(cfg)}, default=list))
    check_resume(cfg, str(ckpt))  # same settings: fine
    for key, value in (
        ("max_steps", 6),
        ("batch_size", 2),
        ("scaling.num_workers", 1),
        ("optim.grad_accum", 2),
    ):
        changed = debug_config(train_shards, tmp_path, **{"max_steps": 4, key: value})
        with pytest.raises(ValueError, match=f"{key}: .* -> .*resume_allow=\\[{key}\\]"):
            check_resume(changed, str(ckpt))
        check_resume(
            debug_config(train_shards, tmp_path, **{"max_steps": 4, key: value, "resume_allow": [key]}),
            str(ckpt),
        )
    with pytest.raises(ValueError, match="not resume keys"):
        debug_config(train_shards, tmp_path, resume_allow=["optim.lr"])


# ---------------------------------------------------------------------------- divergence
def test_a_non_finite_loss_stops_training_before_any_checkpoint_or_export(train_shards, tmp_path):
    from mvcustom.training.launch import run_local

    cfg = debug_config(
        train_shards,
        tmp_path / "run",
        max_steps=6,
        checkpoint_every=1,
        sample_every=100,
        **{"optim.lr": 1e30},
    )
    with pytest.raises(
        FloatingPointError, match=r"non-finite loss \((nan|inf)\) at step (\d+).*optim.lr"
    ) as e:
        run_local(cfg)
    bad_step = int(str(e.value).split(" at step ")[1].split(":")[0])
    steps = sorted(int(p.name.split("_")[1]) for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert steps == list(range(1, bad_step)), steps  # every step before it, none from it on
    assert not (tmp_path / "run" / "export").exists()


# ---------------------------------------------------------------------------- corrupt shards
def _corrupt_copy(train_shards: str, dest: Path) -> Path:
    """The shards with one sample's intrinsics garbled and another shard cut in half."""
    import webdataset as wds

    dest.mkdir()
    tars = sorted(Path(train_shards).glob("*.tar"))
    for t in tars:
        shutil.copy(t, dest / t.name)
    first = list(wds.WebDataset(str(tars[0]), shardshuffle=False))
    with wds.TarWriter(str(dest / tars[0].name)) as w:
        for i, s in enumerate(first):
            s = {k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"}
            if i == 0:
                s["intrinsics.npy"] = b"not an array"
            w.write(s)
    last = dest / tars[-1].name
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    return dest


def test_corrupt_training_samples_are_skipped_counted_and_bounded(train_shards, tmp_path):
    import pyarrow.parquet as pq

    from mvcustom.training.data import sample_stream

    shards = str(_corrupt_copy(train_shards, tmp_path / "shards"))
    n_clean = pq.read_table(Path(train_shards) / "manifest.parquet").num_rows
    stats: dict = {}
    stream = sample_stream(shards, 0, 0, 1, shuffle_buffer=1, max_bad_samples=10, stats=stats)
    good = [next(stream) for _ in range(n_clean)]  # more than one epoch of what is left
    assert all(s["frames"].ndim == 4 for s in good)
    assert stats["bad_samples"] >= 2  # the garbled sample and the cut shard, each counted
    with pytest.raises(RuntimeError, match="more than data.max_bad_samples=0"):
        for _ in sample_stream(shards, 0, 0, 1, shuffle_buffer=1, max_bad_samples=0):
            pass


# ---------------------------------------------------------------------------- MLflow
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """A real ``mlflow server`` on loopback that can be stopped and started again."""

    def __init__(self, tmp: Path):
        self.tmp, self.port, self.proc = tmp, _free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        self.log = open(self.tmp / "server.log", "a")
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.tmp / 'mlflow.db'}",
             "--default-artifact-root", (self.tmp / "artifacts").as_uri()],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.tmp,
        )  # fmt: skip
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            assert self.proc.poll() is None and time.time() < deadline, (self.tmp / "server.log").read_text()[
                -3000:
            ]
            time.sleep(0.3)

    def stop(self) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # an outage, not a shutdown
            self.proc.wait()
            self.log.close()
            self.proc = None


@pytest.mark.slow
def test_mlflow_outage_and_restarts_log_each_step_once(train_shards, tmp_path):
    """A real MLflow server is killed at step 3 and back at step 8: training goes on, every step
    is in the run once, the gap is recorded. Then the job dies after step 6 with its checkpoint
    at step 4 and resumes: steps 5-6 are not logged twice."""
    import mlflow

    from mvcustom.training.context import LocalContext
    from mvcustom.training.loop import train_loop
    from mvcustom.training.tracking import Tracker, start_run

    server = _Server(tmp_path)
    server.start()
    try:
        cfg = debug_config(
            train_shards, tmp_path / "run", max_steps=10, checkpoint_every=100, sample_every=100,
            **{"mlflow.enabled": True, "mlflow.tracking_uri": server.uri},
        )  # fmt: skip
        run_id = start_run(cfg)

        class OutageTracker(Tracker):
            def log_metrics(self, metrics, step):
                if step == 3:
                    server.stop()
                if step == 8:
                    server.start()
                super().log_metrics(metrics, step)

        tracker = OutageTracker(server.uri, run_id, retry_every_s=0)
        out = train_loop(cfg, LocalContext(cfg.output), tracker)
        assert out["step"] == 10 and out["export"]
        client = mlflow.MlflowClient(server.uri)
        steps = [m.step for m in client.get_metric_history(run_id, "loss")]
        assert sorted(steps) == list(range(1, 11)), steps
        gaps = json.loads(client.get_run(run_id).data.tags["mvcustom.tracking_gaps"])
        assert gaps[0]["from_step"] == 3 and gaps[0]["to_step"] == 7 and gaps[0]["points_dropped"] == 0

        # killed after step 6, resumed from the step-4 checkpoint: each step still once
        cfg2 = debug_config(
            train_shards, tmp_path / "run2", max_steps=8, checkpoint_every=4, sample_every=100,
            **{"mlflow.enabled": True, "mlflow.tracking_uri": server.uri},
        )  # fmt: skip
        run2 = start_run(cfg2)

        class Dies(Exception):
            pass

        class DyingTracker(Tracker):
            def log_metrics(self, metrics, step):
                super().log_metrics(metrics, step)
                if step == 6:
                    raise Dies

        ctx = LocalContext(cfg2.output)
        with pytest.raises(Dies):
            train_loop(cfg2, ctx, DyingTracker(server.uri, run2))
        assert ctx.latest_checkpoint().endswith("step_00000004")
        train_loop(
            cfg2, LocalContext(cfg2.output, resume_from=ctx.latest_checkpoint()), Tracker(server.uri, run2)
        )
        steps = [m.step for m in client.get_metric_history(run2, "loss")]
        assert sorted(steps) == list(range(1, 9)), steps
    finally:
        server.stop()


def test_progress_line_reports_step_loss_rate_and_eta():
    from mvcustom.training.loop import progress_line

    assert progress_line(120, 120, 1000, 0.12345, 141.2) == (
        "step 120/1000 (12%)  loss 0.1235  0.85 steps/s  ETA 17m15s"
    )
    # a resumed run's rate counts its own steps only: 2 steps in 4 s, 3996 left
    assert progress_line(2, 6, 4002, 1.0, 4.0).endswith("0.50 steps/s  ETA 2h13m")
    assert progress_line(1, 4, 4, 1.0, 0.0).endswith("ETA ?")
