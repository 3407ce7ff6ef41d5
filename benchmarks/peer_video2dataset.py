"""Peer benchmark: video2dataset 1.3.0 against the preprocessing job (decode only) on one core.

    python benchmarks/peer_video2dataset.py [--sizes 24,96] [--repeats 1] [--out DIR]
                                            [--v2d-venv .tmp/v2d-venv] [--core 0]

video2dataset is what users run on WebVid. Both tools turn the same generated clips (4 s,
320x180, 24 fps H.264, WebVid's on-disk layout, written by ``mvcustom.data.generator``) into
WebDataset tars of 128x128 clips at 8 fps, 32 frames (4 s at 8 fps):

* ``v2d``: video2dataset 1.3.0 in its own venv (``--v2d-venv``, made on first use and reused:
  ``pip install --no-deps video2dataset==1.3.0``, the local CPU ``torch==2.13.0``, then the
  modules it imports at run time under a constraints file pinning that torch). Its CSV gives
  local file paths in ``url`` (it takes no ``file://`` URLs); ``ResolutionSubsampler``
  (``video_size: 128``, ``resize_mode: scale,crop``: scale the short side to 128, centre crop)
  then ``FrameSubsampler`` (``frame_rate: 8``), ``encode_formats: {video: mp4}``, one process,
  one thread, the multiprocessing distributor, webdataset output. 1.3.0 cannot run this config
  as released; the two fixes applied (monkeypatches in this file's launcher, nothing else
  changed) are named in the output (``video2dataset.fixes``).
* ``ours``: ``python -m jobs.preprocess`` with ``preprocess_webvid_debug.yaml``, SfM and depth
  off, on an embedded Ray of 1 CPU; its summary's ``phases_s`` say where the fixed cost goes.
* ``ours_running_ray``: the same job as a driver of a Ray that is already running (a 1-CPU head
  started with ``ray start`` on the same core before the run, untimed and left to settle, killed
  after it): the fixed cost of a job submitted to a cluster, without Ray's own start and stop.
* ``floor``: a bare loop of the job's decoding (read, decode forward without the disposable
  H.264 pictures the clip does not keep, sample at 8 fps, centre crop and bicubic resize to 128
  in libavfilter, 32 frames; ``pipelines.video_sampling``), writing nothing: what the work costs
  with no framework. The seconds it spends inside the decoder are timed apart
  (``decode_s_per_clip``, with the pictures decoded and skipped): video2dataset's marginal over
  that (``marginal_speedup_bound_by_decode``) is the most a tool decoding this way could lead
  it by.

Every run is a fresh program on one core (``os.sched_setaffinity``: it and every process it
starts, ffmpeg's and Ray's included) timed from its start to its end, interleaved over tools and
the two ``--sizes`` (order reversed every other repeat; medians over ``--repeats``). From the two
sizes a and b: marginal s/clip = (T(b) - T(a)) / (b - a), fixed s = T(a) - a * marginal.

Clips written are counted in the output tars (a v2d sample with an ``.mp4``, one of ours with
its frames); the script exits 1 when any tool wrote fewer clips than it was given (video2dataset
itself exits 0 when every sample failed, and its ``*_stats.json`` do not count samples dropped by
an exception). v2d's stats, any traceback in its log, and its shards' start and end (seconds from
its program's start; ours' ``phases_s`` count from the job's start, after its imports, and
``first_commit_from_program_start_s`` from the program's) are reported. Targets (reported, not
asserted): marginal speed-up >= 5x; our fixed cost <= 10 s, both as the intercept of the two
sizes (every fixed cost, Ray's shutdown at the end included) and as the time before the first
clip (the program's start to its first committed shard); end to end >= 3x at the larger size
(the last two for both of our configurations). Prints one JSON document (progress goes to
stderr).

Rendering a clip takes ~10-15 s on 2 cores, so ``--unique-clips`` (24) are rendered and the
larger size lists replicas of them (a new videoid, the video a symlink: the same decoding work);
give ``--out DIR`` to keep them for the next run (reused while the clip spec is the same).
Our job runs the debug preset's ``samples_per_shard`` (4 clips a tar: more commits than
video2dataset's single tar, so not in our favour).
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
V2D_VERSION = "1.3.0"
TORCH_PIN = "torch==2.13.0"  # the CPU wheel on this machine's disk; any other spec pulls CUDA
# What video2dataset 1.3.0 imports at run time (``import video2dataset`` loads every worker,
# subsampler and the dataloader), with its own pins where they still install next to that torch.
V2D_DEPS = [
    "numpy<2",  # 1.3.0's pin
    "pyarrow<21",  # newer pyarrow needs numpy >= 2 at import (pip does not know it)
    "pandas",
    "fire>=0.4.0,<0.6.0",
    "requests>=2.27.1,<3",
    "ffmpeg-python",
    "yt_dlp",
    "fsspec",
    "webdataset",
    "braceexpand",
    "webvtt-py",
    "wandb",
    "tqdm",
    "pyyaml",
    "omegaconf",
    "einops",
    "scenedetect==0.6.2",  # 1.3.0's pin (it asks for scenedetect[opencv]: the GUI opencv)
    "opencv-python-headless",
    "transformers==4.37.1",  # 1.3.0's pin
    "torchdata==0.9.0",  # 1.3.0 pins 0.7.1 (torch 2.1.2); 0.9 is the last with datapipes
    "torchaudio",  # PyPI's wheel is a CUDA build: see _fix_torchaudio
    "decord",
    "langdetect",
]
V2D_FIXES = [
    {
        "name": "subsampler_encode_formats",
        "upstream": "iejMac/video2dataset#311 (FrameSubsampler broken in version 1.3.0), also #263",
        "error": "AttributeError: 'ResolutionSubsampler' object has no attribute 'encode_formats' "
        "(DownloadWorker.download_shard reads subsamplers['video'][0].encode_formats['video']; "
        "1.3.0's subsamplers set only encode_format): every shard fails",
        "how": "monkeypatch: ResolutionSubsampler.encode_formats and FrameSubsampler.encode_formats "
        "= property returning {'video': self.encode_format}",
    },
    {
        "name": "iterate_modalities_over_key_copy",
        "upstream": "fixed on master by #322 (FrameSubsampler no longer pops 'video'); not in 1.3.0",
        "error": "RuntimeError: dictionary keys changed during iteration (download_worker.py "
        "'for modality in subsampled_streams:' while FrameSubsampler pops and re-adds 'video'): "
        "every sample is dropped, logged only as 'Sample N failed to download'",
        "how": "monkeypatch: NoOpSubsampler.__call__ (the broadcast step whose output that loop "
        "iterates) hands on the streams as a dict subclass whose __iter__ iterates over a list "
        "of its keys",
    },
]
_V2D_FIX_ENV = "MVCUSTOM_V2D_FIXES"
CLIP_SPEC = {"height": 180, "width": 320, "fps": 24, "duration_s": 4.0, "motions": ["orbit", "arc"]}
TARGET = {"num_frames": 32, "size": 128, "fps": 8.0}


def _log(msg: str) -> None:
    print(f"[peer_video2dataset] {msg}", file=sys.stderr, flush=True)


def _norm(requirement: str) -> str:
    """A requirement's project name, normalised (``PyYAML`` = ``pyyaml``, ``yt_dlp`` = ``yt-dlp``)."""
    return re.split(r"[<>=\[ ]", requirement)[0].lower().replace("_", "-")


def _sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {p.returncode}):\n{(p.stdout + p.stderr)[-3000:]}")
    return p


# --- video2dataset side ------------------------------------------------------------------------


def _apply_v2d_fixes() -> None:
    """The two fixes 1.3.0 needs for this config (V2D_FIXES), and nothing else. Runs in the
    launcher and in every process video2dataset spawns (they re-import this file as
    ``__mp_main__``; the environment variable says so)."""
    from video2dataset.subsamplers import FrameSubsampler, NoOpSubsampler, ResolutionSubsampler

    for cls in (ResolutionSubsampler, FrameSubsampler):  # fix 1
        cls.encode_formats = property(lambda self: {"video": self.encode_format})

    class KeyCopyIterDict(dict):
        def __iter__(self):
            return iter(list(dict.keys(self)))

    noop_call = NoOpSubsampler.__call__

    def call(self, streams, metadata):  # fix 2
        return noop_call(self, KeyCopyIterDict(streams), metadata)

    NoOpSubsampler.__call__ = call


def _v2d_child(spec_json: str) -> None:
    """The launcher, run by the v2d venv's Python: apply the fixes, then run video2dataset."""
    spec = json.loads(spec_json)
    _apply_v2d_fixes()
    from video2dataset import video2dataset

    video2dataset(**spec)


def _fix_torchaudio(py: str) -> str | None:
    """PyPI's torchaudio for Linux is a CUDA build whose extension needs libtorch_cuda, absent
    from the CPU torch. video2dataset only imports torchaudio (its dataloader's audio decoder),
    so the extension's libraries are removed and torchaudio imports as built without them.
    Returns what was done, or None when torchaudio imported as installed."""
    p = subprocess.run([py, "-c", "import torchaudio"], capture_output=True, text=True)
    if p.returncode == 0:
        return None
    error = (p.stderr.strip().splitlines() or ["?"])[-1]
    site = _sh([py, "-c", "import os, sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    libs = sorted(glob.glob(f"{site}/torchaudio/lib/*.so"))
    for lib in libs:
        os.remove(lib)
    _sh([py, "-c", "import torchaudio"])
    names = ", ".join(os.path.basename(p) for p in libs)
    return (
        f"torchaudio: PyPI's wheel is a CUDA build ({error}); removed its extension libraries "
        f"({names}) so that it imports without them "
        "(video2dataset's download path never calls torchaudio)"
    )


def ensure_v2d_venv(venv: Path) -> dict:
    """Make (or reuse) the video2dataset venv; returns its python and what is in it."""
    py = str(venv / "bin" / "python")
    marker = venv / ".mvcustom-ready.json"
    want = {"video2dataset": V2D_VERSION, "torch": TORCH_PIN, "deps": V2D_DEPS}
    if marker.exists():
        done = json.loads(marker.read_text())
        if done.get("spec") == want and os.path.exists(py):
            _log(f"reusing the video2dataset venv {venv}")
            return {"python": py, **done}
    _log(f"making the video2dataset venv {venv} (a few minutes)")
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    _sh([sys.executable, "-m", "venv", str(venv)])
    constraints = venv / "constraints.txt"
    constraints.write_text(TORCH_PIN + "\n")
    pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _sh([*pip, TORCH_PIN])
    _sh([*pip, "--no-deps", f"video2dataset=={V2D_VERSION}"])
    _sh([*pip, "-c", str(constraints), *V2D_DEPS])
    adjustments = [a for a in [_fix_torchaudio(py)] if a]
    check = (
        "import video2dataset; from video2dataset import video2dataset; "
        "import video2dataset.workers.download_worker, video2dataset.workers.subset_worker"
    )
    _sh([py, "-c", check])
    freeze = _sh([py, "-m", "pip", "freeze", "--disable-pip-version-check"]).stdout.split()
    done = {
        "spec": want,
        "env_adjustments": adjustments,
        "packages": dict(line.split("==", 1) for line in freeze if "==" in line),
    }
    marker.write_text(json.dumps(done, indent=1))
    return {"python": py, **done}


def ensure_ffmpeg() -> str:
    """video2dataset shells out to ffmpeg; install Debian's when it is missing."""
    if shutil.which("ffmpeg") is None:
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        _log("installing ffmpeg (apt-get)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = [*sudo, "apt-get", "install", "-y", "-q", "ffmpeg"]
        if subprocess.run(install, env=env, stdout=sys.stderr).returncode != 0:  # stdout: the JSON only
            subprocess.run([*sudo, "apt-get", "update", "-q"], env=env, stdout=sys.stderr, check=True)
            subprocess.run(install, env=env, stdout=sys.stderr, check=True)
    return _sh(["ffmpeg", "-version"]).stdout.splitlines()[0]


def v2d_config() -> dict:
    return {
        "subsampling": {
            "ResolutionSubsampler": {"args": {"video_size": TARGET["size"], "resize_mode": "scale,crop"}},
            "FrameSubsampler": {"args": {"frame_rate": int(TARGET["fps"])}},
        },
        "reading": {  # 1.3.0's default.yaml (yt_args are not used for local files)
            "yt_args": {
                "download_size": 360,
                "download_audio_rate": 44100,
                "yt_metadata_args": {
                    "writesubtitles": "all",
                    "subtitleslangs": ["en"],
                    "writeautomaticsub": True,
                    "get_info": True,
                },
            },
            "timeout": 60,
            "sampler": None,
        },
        "storage": {"number_sample_per_shard": 1000, "oom_shard_count": 5, "captions_are_subtitles": False},
        "distribution": {
            "processes_count": 1,
            "thread_count": 1,
            "subjob_size": 1000,
            "distributor": "multiprocessing",
        },
    }


# --- inputs ------------------------------------------------------------------------------------


def make_clips(data: Path, n: int, unique: int) -> tuple[list[dict], Path, float]:
    """Generate (or reuse) ``min(n, unique)`` clips and list ``n``: beyond the generated ones,
    rows are replicas (a new videoid, its video a symlink to a generated clip; decoding costs
    the same, and rendering costs ~10 s a clip). Returns the CSV rows, the ``videos`` folder
    they live in and the generation time."""
    from mvcustom.configs import SampleDataConfig, from_dict
    from mvcustom.data.generator import generate_sample_data
    from mvcustom.data.generator.webvid_writer import replicate_webvid

    spec = {"num_videos": min(n, unique), **CLIP_SPEC}
    index = data / "ground_truth" / "index.json"
    have = json.loads(index.read_text())["config"]["webvid"] if index.exists() else {}
    t = time.perf_counter()
    if any(have.get(k) != v for k, v in spec.items()):  # --out DIR reuses its clips
        _log(f"generating {spec['num_videos']} clips in {data}")
        shutil.rmtree(data, ignore_errors=True)
        cfg = from_dict(SampleDataConfig, {"write_co3d": False, "webvid": spec}, "peer_video2dataset")
        generate_sample_data(str(data), cfg)
    gen_s = time.perf_counter() - t
    listed = data / f"webvid-{n}"
    shutil.rmtree(listed, ignore_errors=True)
    rows = replicate_webvid(str(data / "webvid"), str(listed), n)
    return rows, listed / "videos", gen_s


def make_inputs(root: Path, videos: Path, rows: list[dict], n: int) -> dict:
    """The first ``n`` clips as a WebVid root for ours (CSV + ``videos`` linked to the generated
    ones) and as a CSV of local paths for video2dataset."""
    base = root / "inputs" / str(n)
    shutil.rmtree(base, ignore_errors=True)
    (base / "webvid").mkdir(parents=True)
    os.symlink(videos, base / "webvid" / "videos")
    with open(base / "webvid" / "results_2M_train.csv", "w", newline="", encoding="utf8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows[:n])
    paths = [str(videos / r["page_dir"] / f"{r['videoid']}.mp4") for r in rows[:n]]
    with open(base / "v2d.csv", "w", newline="", encoding="utf8") as f:
        w = csv.writer(f)
        w.writerow(["url", "caption", "videoid", "page_dir", "duration"])
        for r, p in zip(rows[:n], paths, strict=True):
            w.writerow([p, r["name"], r["videoid"], r["page_dir"], r["duration"]])
    return {"webvid": str(base / "webvid"), "v2d_csv": str(base / "v2d.csv"), "paths": paths}


# --- runs ----------------------------------------------------------------------------------------


def _timed(
    cmd: list[str], run_dir: Path, core: int, env: dict | None = None
) -> tuple[float, int, str, float]:
    """Run ``cmd`` pinned to ``core`` (it and all it starts); wall seconds, exit code, its log and
    the epoch time it was started at."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    env.pop("PYTHONPATH", None)
    log = run_dir / "log.txt"
    with open(log, "w") as f:
        started, t0 = time.time(), time.perf_counter()
        p = subprocess.run(
            cmd,
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
            preexec_fn=lambda: os.sched_setaffinity(0, {core}),
        )
        wall = time.perf_counter() - t0
    return wall, p.returncode, log.read_text(errors="replace"), started


def _samples(folder: Path) -> tuple[list[Path], dict]:
    """``{(tar, key): {field: bytes}}`` over every tar below ``folder`` (WebDataset grouping: a
    member's key is its name up to the first dot of its base name)."""
    tars = sorted(Path(p) for p in glob.glob(str(folder / "**" / "*.tar"), recursive=True))
    out: dict = {}
    for t in tars:
        with tarfile.open(t) as tf:
            for m in tf:
                if m.isfile():
                    d, base = os.path.split(m.name)
                    key, _, field = base.partition(".")
                    out.setdefault((t, f"{d}/{key}"), {})[field] = m.size
    return tars, out


def _describe(tars: list[Path], samples: dict, is_clip) -> dict:
    """Clips (samples for which ``is_clip(fields)``), the fields of the first one (digits as
    ``#``: ``frame_#.jpg: 32``), and bytes per clip: its members' payload, and the tars' size."""
    clips = {k: v for k, v in samples.items() if is_clip(v)}
    first = next(iter(clips.values()), {})
    payload = sum(sum(v.values()) for v in clips.values())
    on_disk = sum(t.stat().st_size for t in tars)
    return {
        "tars": len(tars),
        "samples_in_tars": len(samples),
        "clips_written": len(clips),
        "fields_per_sample": dict(Counter(re.sub(r"\d{3,}", "#", f) for f in sorted(first))),
        "bytes_per_sample": round(payload / len(clips)) if clips else None,
        "tar_bytes_per_sample": round(on_disk / len(clips)) if clips else None,
    }


def _probe_mp4(data: bytes) -> dict:
    import av

    with av.open(io.BytesIO(data)) as c:
        s = c.streams.video[0]
        n = sum(1 for _ in c.decode(video=0))
        return {"frames": n, "height": s.height, "width": s.width, "fps": float(s.average_rate or 0)}


def run_v2d(v2d: dict, inputs: dict, out: Path, core: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    (out / "tmp").mkdir()
    spec = {
        "url_list": inputs["v2d_csv"],
        "output_folder": str(out / "dataset"),
        "output_format": "webdataset",
        "input_format": "csv",
        "url_col": "url",
        "caption_col": "caption",
        "save_additional_columns": ["videoid", "page_dir", "duration"],
        "encode_formats": {"video": "mp4"},
        "stage": "download",
        "enable_wandb": False,
        "tmp_dir": str(out / "tmp"),
        "config": v2d_config(),
    }
    cmd = [v2d["python"], str(Path(__file__).resolve()), "--v2d-child", json.dumps(spec)]
    wall, rc, log, started = _timed(cmd, out, core, {_V2D_FIX_ENV: "1", "WANDB_MODE": "disabled"})
    tars, samples = _samples(out / "dataset")
    r = {"wall_s": wall, "exit_code": rc, **_describe(tars, samples, lambda v: "mp4" in v)}
    stats: Counter = Counter()
    status: Counter = Counter()
    shards = [json.loads(Path(p).read_text()) for p in glob.glob(str(out / "dataset" / "*_stats.json"))]
    for s in shards:
        stats.update({k: s[k] for k in ("count", "successes", "failed_to_download", "failed_to_subsample")})
        status.update(s.get("status_dict", {}))
    r["v2d_stats"] = {"shards": len(shards), **dict(stats), "status": dict(status)}
    if shards:  # as our phases_s: seconds from the program's start (the rest is fixed cost)
        r["phases_s"] = {
            "first_shard_start_s": round(min(s["start_time"] for s in shards) - started, 2),
            "last_shard_end_s": round(max(s["end_time"] for s in shards) - started, 2),
            "shard_work_s": round(sum(s["duration"] for s in shards), 2),
        }
    tb = log.count("Traceback (most recent call last)")
    r["tracebacks_in_log"] = tb
    if tb:
        i = log.index("Traceback (most recent call last)")
        r["first_traceback"] = log[i : i + 2500]
    if r["clips_written"]:
        key = next(k for k, v in samples.items() if "mp4" in v)
        with tarfile.open(key[0]) as tf:
            name = next(m for m in tf.getnames() if m.endswith(f"{key[1].lstrip('/')}.mp4"))
            r["first_clip"] = _probe_mp4(tf.extractfile(name).read())
    if rc != 0:
        r["log_tail"] = log[-3000:]
    return r


def _last_json(text: str) -> dict | None:
    lines = text.splitlines()
    starts = [i for i, ln in enumerate(lines) if ln == "{"]
    for i in reversed(starts):
        try:
            return json.loads("\n".join(lines[i:]))
        except json.JSONDecodeError:
            try:
                return json.JSONDecoder().raw_decode("\n".join(lines[i:]))[0]
            except json.JSONDecodeError:
                continue
    return None


def our_command(webvid: str, output: str, address: str | None = None) -> list[str]:
    """The job on an embedded Ray of 1 CPU, or as a driver of the running Ray at ``address``."""
    sets = {
        "input": webvid,
        "output": output,
        "estimate_poses": "false",
        "estimate_depth": "false",
        "clip.num_frames": TARGET["num_frames"],
        "clip.height": TARGET["size"],
        "clip.width": TARGET["size"],
        "webvid.target_fps": TARGET["fps"],
        "mlflow.enabled": "false",
        **({"ray.address": address} if address else {"ray.num_cpus": 1}),
    }
    cmd = [sys.executable, "-m", "jobs.preprocess", "--config", "jobs/configs/preprocess_webvid_debug.yaml"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    return cmd


class RunningRay:
    """A Ray head of 1 CPU on ``core`` (``ray start --head --block``, its own temp dir, auth
    token and free ports), started before a timed run and left to settle: what a job submitted
    to a running cluster finds. Killed with every process it started after the run."""

    def __init__(self, core: int) -> None:
        import secrets

        self.temp = tempfile.mkdtemp(prefix="peer-ray-", dir="/tmp")  # short: unix socket paths
        token = Path(self.temp) / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        # usage stats off as on the clusters infra/ starts (`ray start --disable-usage-stats`,
        # the image's RAY_USAGE_STATS_ENABLED=0): a job submitted there inherits it from the node
        self.env = {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token),
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        port = _free_port()
        self.address = f"127.0.0.1:{port}"
        ports = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port")
        ports += (
            "runtime-env-agent-port",
            "node-manager-port",
            "object-manager-port",
            "ray-client-server-port",
        )
        cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}"]
        cmd += ["--num-cpus=1", "--include-dashboard=false", "--node-ip-address=127.0.0.1"]
        cmd += [f"--temp-dir={self.temp}", "--disable-usage-stats", *(f"--{f}={_free_port()}" for f in ports)]
        self.log = Path(self.temp) / "ray_start.log"
        env = {**os.environ, "OMP_NUM_THREADS": "1", **self.env}
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(
                cmd,
                stdout=f,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=lambda: os.sched_setaffinity(0, {core}),
            )
        deadline = time.time() + 120
        while "This command will now block" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"ray start failed: {self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.2)
        self.settle_s = self._settle()

    def _processes(self) -> list:
        import psutil

        try:
            return [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def _cpu(self) -> float:
        import psutil

        total = 0.0
        for p in self._processes():
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def _settle(self, timeout: float = 60.0) -> float:
        """Wait until the node's processes use under 5% of the core (their start-up is done)."""
        t0 = time.time()
        last = self._cpu()
        while time.time() - t0 < timeout:
            time.sleep(1.0)
            now = self._cpu()
            if now - last < 0.05:
                break
            last = now
        return round(time.time() - t0, 1)

    def stop(self) -> None:
        """SIGTERM to ``ray start --block``: Ray's own handler stops every process it started."""
        import psutil

        procs = self._processes()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        finally:
            _, alive = psutil.wait_procs(procs, timeout=15)
            shutil.rmtree(self.temp, ignore_errors=True)
        if alive:  # they would take CPU from the runs timed after this one
            raise RuntimeError(f"processes of the stopped Ray head still run: {[p.pid for p in alive]}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ours(inputs: dict, out: Path, core: int, running_ray: bool = False) -> dict:
    """Our job on an embedded Ray, or (``running_ray``) as a driver of a Ray started before."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cluster = RunningRay(core) if running_ray else None
    try:
        address = cluster.address if cluster else None
        cmd = our_command(inputs["webvid"], str(out / "shards"), address)
        wall, rc, log, started = _timed(cmd, out, core, cluster.env if cluster else None)
    finally:
        if cluster:
            cluster.stop()
    tars, samples = _samples(out / "shards")
    r = {"wall_s": wall, "exit_code": rc, **_describe(tars, samples, lambda v: "frame_000.jpg" in v)}
    summary = _last_json(log) or {}
    r["job"] = {k: summary.get(k) for k in ("complete", "clips_written", "errors", "shards_total", "seconds")}
    r["phases_s"] = summary.get("phases_s")
    if r["phases_s"] and summary.get("started_at"):  # the job's clock starts after its imports
        first = summary["started_at"] + r["phases_s"]["first_commit_s"] - started
        r["phases_s"] = {"first_commit_from_program_start_s": round(first, 2), **r["phases_s"]}
    if summary.get("failure_reasons"):
        r["failure_reasons"] = summary["failure_reasons"]
    if r["clips_written"]:
        from PIL import Image

        key = next(k for k, v in samples.items() if "frame_000.jpg" in v)
        frames = [f for f in samples[key] if f.startswith("frame_")]
        with tarfile.open(key[0]) as tf:
            name = next(m for m in tf.getnames() if m.endswith(f"{key[1].lstrip('/')}.frame_000.jpg"))
            w, h = Image.open(io.BytesIO(tf.extractfile(name).read())).size
        r["first_clip"] = {"frames": len(frames), "height": h, "width": w, "fps": TARGET["fps"]}
    if cluster:
        r["cluster_settle_s"] = cluster.settle_s
    if rc != 0 or not summary:
        r["log_tail"] = log[-3000:]
    return r


def _floor_child(spec_json: str) -> None:
    """Decode, sample at ``fps``, centre crop and resize ``num_frames`` frames of every video
    with the job's own decoding (``SampledVideo``: disposable pictures the clip does not keep
    are not decoded) and libavfilter crop and resize on the YUV frame (``_CropResize``);
    nothing else of the job."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from pipelines.video_sampling import SampledVideo
    from pipelines.webvid_records import _CropResize

    spec = json.loads(spec_json)
    size, num = spec["size"], spec["num_frames"]
    done, decode_s, sent, skipped = 0, 0.0, 0, 0
    for path in spec["paths"]:
        with open(path, "rb") as f:
            data = io.BytesIO(f.read())
        frames, resize = [], None
        with SampledVideo(data) as video:
            decoded = video.frames(num, spec["fps"])
            while True:  # libavcodec's share timed apart: the floor under this way of decoding
                t = time.perf_counter()
                item = next(decoded, None)
                decode_s += time.perf_counter() - t
                if item is None:
                    break
                resize = resize or _CropResize(item[1], video.time_base, size, size)
                frames.append(resize(item[1]))
            if video.planned:
                sent += video.planned["sent"]
                skipped += video.planned["skipped"]
        clip = np.stack(frames)
        done += clip.shape == (num, size, size, 3)
    result = {"clips": done, "decode_s": decode_s, "pictures_decoded": sent, "pictures_skipped": skipped}
    print("RESULT " + json.dumps(result), flush=True)


def run_floor(inputs: dict, out: Path, core: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    spec = {"paths": inputs["paths"], **TARGET}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--floor-child", json.dumps(spec)]
    wall, rc, log, _ = _timed(cmd, out, core)
    lines = [ln for ln in log.splitlines() if ln.startswith("RESULT ")]
    res = json.loads(lines[-1][7:]) if lines else {}
    r = {
        "wall_s": wall,
        "exit_code": rc,
        "clips_written": res.get("clips", 0),
        "decode_s": res.get("decode_s"),
        "pictures_decoded": res.get("pictures_decoded"),
        "pictures_skipped": res.get("pictures_skipped"),
    }
    if rc != 0 or not lines:
        r["log_tail"] = log[-3000:]
    return r


# --- summary -------------------------------------------------------------------------------------


TOOLS = ("v2d", "ours", "ours_running_ray", "floor")


def _line(t: dict[int, float], a: int, b: int) -> tuple[float, float]:
    marginal = (t[b] - t[a]) / (b - a)
    return marginal, t[a] - a * marginal


def summarise(runs: list[dict], sizes: list[int]) -> dict:
    a, b = sizes
    tools: dict = {}
    for tool in TOOLS:
        by_size = {}
        for n in sizes:
            rs = [r for r in runs if r["tool"] == tool and r["size"] == n]
            row = {
                "wall_s": round(statistics.median(r["wall_s"] for r in rs), 2),
                "wall_s_runs": [round(r["wall_s"], 2) for r in rs],
                "clips_given": n,
                "clips_written": min(r["clips_written"] for r in rs),
            }
            for k in ("samples_in_tars", "fields_per_sample", "bytes_per_sample", "tar_bytes_per_sample"):
                if k in rs[0]:
                    row[k] = rs[0][k]
            if "first_clip" in rs[0]:
                row["first_clip"] = rs[0]["first_clip"]
            if tool == "v2d":
                row["v2d_stats"] = rs[0]["v2d_stats"]
                row["tracebacks_in_log"] = sum(r["tracebacks_in_log"] for r in rs)
                if "first_traceback" in rs[0]:
                    row["first_traceback"] = rs[0]["first_traceback"]
            phases = [r["phases_s"] for r in rs if r.get("phases_s")]
            if phases:
                row["phases_s"] = {
                    k: round(statistics.median(p.get(k, 0.0) for p in phases), 2) for k in phases[0]
                }
            if tool.startswith("ours"):
                row["job"] = rs[0]["job"]
            if tool == "floor":  # the decoder's own seconds a clip: the floor under decoding this way
                row["decode_s_per_clip"] = round(statistics.median(r["decode_s"] / n for r in rs), 4)
                for k in ("pictures_decoded", "pictures_skipped"):
                    row[f"{k}_per_clip"] = round(rs[0][k] / n, 1) if rs[0].get(k) is not None else None
            by_size[str(n)] = row
        marginal, fixed = _line({n: by_size[str(n)]["wall_s"] for n in sizes}, a, b)
        tools[tool] = {
            "by_size": by_size,
            "marginal_s_per_clip": round(marginal, 4),
            "fixed_s": round(fixed, 2),
        }
    v, o, c, f = (tools[t] for t in TOOLS)
    decode = f["by_size"][str(b)]["decode_s_per_clip"]

    def ratio(x, y):
        return round(x / y, 2) if y > 0 else None

    ratios = {
        "marginal_speedup_ours_vs_v2d": ratio(v["marginal_s_per_clip"], o["marginal_s_per_clip"]),
        "end_to_end_speedup_ours_vs_v2d": {
            str(n): ratio(v["by_size"][str(n)]["wall_s"], o["by_size"][str(n)]["wall_s"]) for n in sizes
        },
        "marginal_ours_vs_floor": ratio(o["marginal_s_per_clip"], f["marginal_s_per_clip"]),
        "marginal_v2d_vs_floor": ratio(v["marginal_s_per_clip"], f["marginal_s_per_clip"]),
        # what no tool decoding as we do can pass: v2d's marginal over that decoding alone
        "marginal_speedup_bound_by_decode": ratio(v["marginal_s_per_clip"], decode),
        "marginal_speedup_ours_running_ray_vs_v2d": ratio(v["marginal_s_per_clip"], c["marginal_s_per_clip"]),
        "end_to_end_speedup_ours_running_ray_vs_v2d": {
            str(n): ratio(v["by_size"][str(n)]["wall_s"], c["by_size"][str(n)]["wall_s"]) for n in sizes
        },
    }
    m = ratios["marginal_speedup_ours_vs_v2d"]
    targets = {
        "marginal_speedup_ours_vs_v2d": {"target": ">= 5", "value": m, "met": m is not None and m >= 5},
    }
    for tool, key in (("ours", ""), ("ours_running_ray", "_running_ray")):
        fixed = tools[tool]["fixed_s"]
        e2e = ratios[f"end_to_end_speedup_ours{key}_vs_v2d"][str(b)]
        targets[f"ours{key}_fixed_s"] = {"target": "<= 10", "value": fixed, "met": fixed <= 10}
        # the "fixed cost before the first clip": the program's start to its first
        # committed shard (4 clips), at the smaller size
        first = tools[tool]["by_size"][str(a)]["phases_s"]["first_commit_from_program_start_s"]
        targets[f"ours{key}_first_clip_s"] = {"target": "<= 10", "value": first, "met": first <= 10}
        targets[f"end_to_end_speedup{key}_at_{b}"] = {
            "target": ">= 3",
            "value": e2e,
            "met": e2e is not None and e2e >= 3,
        }
    return {"tools": tools, "ratios": ratios, "targets": targets}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="24,96", help="two clip counts (fixed and marginal cost apart)")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved repeats (medians reported)")
    ap.add_argument("--out", default=None, help="scratch folder (default: a temporary one); reuses its clips")
    ap.add_argument(
        "--v2d-venv", default=str(ROOT / ".tmp" / "v2d-venv"), help="video2dataset's venv (made once)"
    )
    ap.add_argument(
        "--unique-clips", type=int, default=24, help="clips rendered; larger sizes repeat them (symlinks)"
    )
    ap.add_argument("--core", type=int, default=0, help="the one core every run is pinned to")
    ap.add_argument("--v2d-child", help=argparse.SUPPRESS)
    ap.add_argument("--floor-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.v2d_child:
        _v2d_child(args.v2d_child)
        return
    if args.floor_child:
        _floor_child(args.floor_child)
        return

    sizes = sorted(int(s) for s in args.sizes.split(","))
    if len(sizes) != 2 or sizes[0] == sizes[1] or sizes[0] < 1:
        ap.error("--sizes takes two different positive clip counts, e.g. 24,96")
    ffmpeg = ensure_ffmpeg()
    v2d = ensure_v2d_venv(Path(args.v2d_venv).resolve())
    root = Path(args.out or tempfile.mkdtemp(prefix="bench-peer-v2d-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    rows, videos, gen_s = make_clips(root / "data", sizes[-1], args.unique_clips)
    inputs = {n: make_inputs(root, videos, rows, n) for n in sizes}

    runners = {
        "v2d": lambda n, d: run_v2d(v2d, inputs[n], d, args.core),
        "ours": lambda n, d: run_ours(inputs[n], d, args.core),
        "ours_running_ray": lambda n, d: run_ours(inputs[n], d, args.core, running_ray=True),
        "floor": lambda n, d: run_floor(inputs[n], d, args.core),
    }
    runs: list[dict] = []
    for rep in range(args.repeats):  # interleaved, order reversed every other repeat (drift)
        order = [(n, t) for n in sizes for t in runners]
        for n, tool in order if rep % 2 == 0 else order[::-1]:
            _log(f"repeat {rep + 1}/{args.repeats}: {tool} on {n} clips")
            r = {"tool": tool, "size": n, "repeat": rep, **runners[tool](n, root / "runs" / f"{tool}-{n}")}
            _log(f"  {r['wall_s']:.1f} s, {r['clips_written']}/{n} clips, exit {r['exit_code']}")
            runs.append(r)

    asked = [f"video2dataset=={V2D_VERSION}", TORCH_PIN, *V2D_DEPS]
    result = {
        "benchmark": "peer_video2dataset",
        "machine_cpus": os.cpu_count(),
        "pinned_core": args.core,
        "sizes": sizes,
        "repeats": args.repeats,
        "clips": {
            "generator": {"num_videos": min(sizes[-1], args.unique_clips), **CLIP_SPEC},
            "listed": sizes[-1],
            "generation_s": round(gen_s, 1),
        },
        "target_clip": TARGET,
        "video2dataset": {
            "version": V2D_VERSION,
            "venv": args.v2d_venv,
            "python": _sh([v2d["python"], "-c", "import sys; print(sys.version.split()[0])"]).stdout.strip(),
            "ffmpeg": ffmpeg,
            "fixes": V2D_FIXES,
            "env_adjustments": v2d["env_adjustments"],
            "packages": {  # what was asked for, as installed
                k: v for k, v in sorted(v2d["packages"].items()) if _norm(k) in {_norm(d) for d in asked}
            },
            "config": v2d_config(),
        },
        "ours": {"command": our_command("<root>/webvid", "<out>")[1:]},
        "ours_running_ray": {
            "command": our_command("<root>/webvid", "<out>", "<head>")[1:],
            "ray": "a head of 1 CPU started on the same core before the run (untimed, left to settle "
            "below 5% CPU), killed after it: a driver on a running cluster; `ray job submit` adds "
            "its job supervisor (an actor) to this",
        },
        "floor": "the job's decoding (disposable pictures not kept are skipped) + libavfilter centre "
        "crop and bicubic resize, nothing written",
        **summarise(runs, sizes),
        "runs": [
            {
                k: v
                for k, v in r.items()
                if k in ("tool", "size", "repeat", "wall_s", "exit_code", "clips_written")
            }
            for r in runs
        ],
    }
    short = [
        f"{r['tool']}@{r['size']}" for r in runs if r["clips_written"] < r["size"] or r["exit_code"] != 0
    ]
    result["all_clips_written"] = not short
    if short:
        result["incomplete_runs"] = short
        result["incomplete_logs"] = {
            f"{r['tool']}@{r['size']}": r.get("log_tail") or r.get("first_traceback")
            for r in runs
            if f"{r['tool']}@{r['size']}" in short
        }
    print(json.dumps(result, indent=1))
    if not args.out:
        shutil.rmtree(root, ignore_errors=True)
    if short:
        sys.exit(1)


if __name__ == "__main__":
    main()
elif __name__ == "__mp_main__" and os.environ.get(_V2D_FIX_ENV) == "1":
    _apply_v2d_fixes()  # a process video2dataset spawned (its pool worker, its logger)
