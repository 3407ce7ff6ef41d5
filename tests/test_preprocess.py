"""The preprocessing job end to end on the generated datasets (embedded local Ray)."""

from __future__ import annotations

import gzip
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from mvcustom.configs import PreprocessConfig, from_dict
from mvcustom.configs.base import ConfigError
from mvcustom.data.schema import decode_sample
from pipelines.preprocess import run_preprocess
from pipelines.shards import preflight_output


def _cfg(source, inp, out, *overrides):
    return from_dict(
        PreprocessConfig,
        {
            "preset": "debug",
            "source": source,
            "input": str(inp),
            "output": str(out),
            "mlflow": {"enabled": False},
        },
        "test",
        list(overrides),
    )


def _read_back(out):
    samples = []
    for tar in sorted(out.glob("*.tar")):
        samples += [decode_sample(s) for s in wds.WebDataset(str(tar), shardshuffle=False)]
    return samples


def test_co3d_shards_and_resume(sample_data, tmp_path, ray_local):
    out = tmp_path / "shards"
    cfg = _cfg("co3d", sample_data / "co3d", out, "samples_per_shard=3")
    s1 = run_preprocess(cfg)
    assert s1["clips_written"] == 4 and s1["errors"] == 0 and s1["shards_total"] == 2
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "train-000001.tar"]
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    samples = _read_back(out)
    assert sorted(s.key for s in samples) == sorted(r["key"] for r in manifest)
    for s in samples:
        assert s.frames.shape == (8, 64, 64, 3) and s.depth.shape == (8, 64, 64) and s.mask is not None
        assert s.meta["pose_source"] == "co3d" and s.caption.startswith("a photo of a ")
    # Ray Data reads the same shards
    rows = ray_local.data.read_webdataset(str(out), file_extensions=["tar"]).take_all()
    assert len(rows) == 4 and "frame_000.jpg" in rows[0]
    # rerun: every shard is complete, nothing is redone, the manifest is identical
    before = (out / "manifest.parquet").read_bytes()
    s2 = run_preprocess(cfg)
    assert s2["shards_skipped_complete"] == 2 and s2["shards_written"] == 0
    assert pq.read_table(out / "manifest.parquet").equals(pq.read_table(out / "manifest.parquet"))
    assert pq.read_table(out / "manifest.parquet").to_pylist() == manifest
    assert (out / "manifest.parquet").read_bytes() == before
    # resuming with settings that change the content is refused, naming them
    with pytest.raises(ValueError, match=r"different settings \(clip.height\)"):
        run_preprocess(_cfg("co3d", sample_data / "co3d", out, "samples_per_shard=3", "clip.height=32"))


def test_co3d_bad_records_are_recorded_and_good_ones_kept(sample_data, tmp_path, ray_local):
    root = tmp_path / "co3d"
    shutil.copytree(sample_data / "co3d", root)
    frames = json.loads(gzip.decompress((root / "car" / "frame_annotations.jgz").read_bytes()))
    seqs = sorted({f["sequence_name"] for f in frames})
    # car seq 0: one image missing; car seq 1: one depth map corrupt
    first = [f for f in frames if f["sequence_name"] == seqs[0]][2]
    (root / first["image"]["path"]).unlink()
    second = [f for f in frames if f["sequence_name"] == seqs[1]][5]
    (root / second["depth"]["path"]).write_bytes(b"garbage")
    # teddybear: malformed annotation file
    (root / "teddybear" / "frame_annotations.jgz").write_bytes(gzip.compress(b"[{]"))
    # a new category whose only sequence is too short
    cat = root / "hydrant"
    cat.mkdir()
    short = [dict(f, sequence_name="1_2_3") for f in frames[:3]]
    (cat / "frame_annotations.jgz").write_bytes(gzip.compress(json.dumps(short).encode()))
    (cat / "sequence_annotations.jgz").write_bytes(
        gzip.compress(json.dumps([{"sequence_name": "1_2_3", "category": "hydrant"}]).encode())
    )
    out = tmp_path / "out"
    summary = run_preprocess(_cfg("co3d", root, out))
    errors = {r["id"]: r for r in pq.read_table(out / "errors.parquet").to_pylist()}
    assert set(errors) == {f"car/{seqs[0]}/0000", f"car/{seqs[1]}/0000", "teddybear", "hydrant/1_2_3"}
    assert "file not found" in errors[f"car/{seqs[0]}/0000"]["reason"]
    assert "not a readable 16-bit depth PNG" in errors[f"car/{seqs[1]}/0000"]["reason"]
    assert (
        errors["teddybear"]["stage"] == "annotations"
        and "gzip-compressed JSON" in errors["teddybear"]["reason"]
    )
    assert "fewer than clip.num_frames=8" in errors["hydrant/1_2_3"]["reason"]
    assert summary["clips_written"] == 0 and summary["errors"] == 4


def test_webvid_shards_with_depth_and_sfm(sample_data, tmp_path, tiny_zoedepth, ray_local):
    out = tmp_path / "webvid"
    cfg = _cfg(
        "webvid",
        sample_data / "webvid",
        out,
        f"depth.model={tiny_zoedepth}",
        "webvid.target_fps=null",
        "clip.num_frames=12",
        "clip.height=64",
        "clip.width=96",
        "samples_per_shard=1",
    )
    summary = run_preprocess(cfg)
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    errors = pq.read_table(out / "errors.parquet").to_pylist()
    assert len(manifest) + len(errors) == 2  # nothing lost: every row is a clip or an error
    assert summary["clips_written"] >= 1
    for s in _read_back(out):
        assert s.depth.shape == (12, 64, 96) and s.depth.dtype == np.float16 and (s.depth > 0).all()
        assert s.meta["depth_source"] == "zoedepth" and s.meta["pose_source"] == "pycolmap_sfm"
        motion = s.meta["camera_motion"]  # arc: rotates; truck: translates without rotating
        assert motion["max_rotation_deg"] > 5 or motion["path_length"] > 0.1, motion
        assert "Café" in s.caption or "truck" in s.caption
    for e in errors:
        assert e["stage"] == "sfm"


def test_unwritable_output_is_refused_up_front(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match=r"output .*a_file/shards.* is not writable.*--set output="):
        preflight_output(str(blocker / "shards"))
    with pytest.raises(PermissionError, match="not writable"):
        run_preprocess(_cfg("co3d", tmp_path, blocker / "shards"))


def test_webvid_bad_records_through_the_job(sample_data, tmp_path, ray_local):
    import csv

    root = tmp_path / "webvid"
    shutil.copytree(sample_data / "webvid", root)
    with open(root / "results_2M_train.csv", newline="", encoding="utf8") as f:
        rows = list(csv.DictReader(f))
    good = rows[0]
    src = root / "videos" / good["page_dir"] / f"{good['videoid']}.mp4"
    data = src.read_bytes()
    bad = {
        "1000000001": None,  # missing file
        "1000000002": data[: len(data) // 4],  # truncated
        "1000000003": b"",  # zero-length
    }
    for vid, content in bad.items():
        if content is not None:
            (root / "videos" / good["page_dir"] / f"{vid}.mp4").write_bytes(content)
        rows.append(dict(good, videoid=vid))
    rows.append(dict(good, videoid="1000000004", page_dir=""))  # missing field
    with open(root / "results_2M_train.csv", "w", newline="", encoding="utf8") as f:
        w = csv.DictWriter(f, fieldnames=list(good))
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "out"
    # the debug videos have 12 frames: 8 fit, 13 do not
    summary = run_preprocess(
        _cfg(
            "webvid",
            root,
            out,
            "estimate_poses=false",
            "estimate_depth=false",
            "webvid.target_fps=null",
            "clip.num_frames=8",
        )
    )
    errors = {r["id"]: r for r in pq.read_table(out / "errors.parquet").to_pylist()}
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert sorted(r["source_id"] for r in manifest) == sorted(r["videoid"] for r in rows[:2])
    assert errors["1000000001"]["stage"] == "read" and "video not found" in errors["1000000001"]["reason"]
    assert errors["1000000002"]["stage"] == "decode"
    assert (
        errors["1000000003"]["stage"] == "decode"
        and "corrupt or unsupported video" in errors["1000000003"]["reason"]
    )
    assert errors["results_2M_train.csv:7"]["stage"] == "csv"  # the 6th row; line 1 is the header
    assert summary["inputs"] == len(rows) == summary["clips_written"] + summary["errors"]
    # too short for the clip: every video becomes an error record, none is lost
    short = run_preprocess(
        _cfg(
            "webvid",
            root,
            tmp_path / "short",
            "estimate_poses=false",
            "estimate_depth=false",
            "webvid.target_fps=null",
            "clip.num_frames=13",
        )
    )
    assert short["clips_written"] == 0 and short["errors"] == len(rows)


def test_cpu_plan_never_starves_the_feeding_tasks():
    from pipelines.preprocess import plan_cpus

    co3d = _cfg("co3d", "in", "out")
    assert plan_cpus(co3d, 2.0) == (1.0, 1.0)  # no actors: build and write fuse
    sep = ("depth.placement=separate",)
    web = _cfg("webvid", "in", "out", *sep, "depth.num_cpus=0.5", "depth.actors=1")
    assert plan_cpus(web, 2.0) == (0.75, 0.25)  # two builders share the 1.5 CPUs the actor leaves
    assert plan_cpus(web, 1.0) == (0.5, 0.25)  # 1 CPU: the build task must fit beside the actor
    assert plan_cpus(web, 16.0) == (15.5 / 16, 0.25)
    assert plan_cpus(_cfg("webvid", "in", "out", *sep), 1.0) == (0.5, 0.25)  # default: one 0.5-CPU actor
    with pytest.raises(ValueError, match="leaves nothing of the cluster's 1 for the tasks"):
        plan_cpus(_cfg("webvid", "in", "out", *sep, "depth.num_cpus=1.0"), 1.0)


def test_depth_placement_and_fused_pool_size():
    from pipelines.preprocess import fused_pool, fused_workers, plan_cpus

    cpu = _cfg("webvid", "in", "out")  # auto on CPU: fused, one 1-CPU worker per core
    assert cpu.depth.fused and cpu.depth.cpus_per_actor == 1.0
    assert [fused_workers(cpu, c) for c in (1.0, 2.0, 2.5, 16.0)] == [1, 2, 2, 16]
    assert plan_cpus(cpu, 1.0) == (1.0, 1.0)  # no separate build tasks to plan for
    two = _cfg("webvid", "in", "out", "depth.num_cpus=2")
    assert fused_workers(two, 16.0) == 8 and fused_workers(two, 1.0) == 1
    assert fused_workers(_cfg("webvid", "in", "out", "depth.actors=3"), 16.0) == 3
    # the pool autoscales from what the cluster holds now up to one worker per shard (or
    # depth.max_actors), so nodes that join mid-run get workers; depth.actors fixes it
    assert fused_pool(cpu, 2.0, 12) == {"min_size": 2, "max_size": 12, "initial_size": 2}
    assert fused_pool(cpu, 16.0, 3) == {"min_size": 3, "max_size": 3, "initial_size": 3}
    capped = _cfg("webvid", "in", "out", "depth.max_actors=4")
    assert fused_pool(capped, 2.0, 12) == {"min_size": 2, "max_size": 4, "initial_size": 2}
    assert fused_pool(capped, 8.0, 12)["max_size"] == 8  # never below what the cluster holds
    assert fused_pool(_cfg("webvid", "in", "out", "depth.actors=3"), 2.0, 12) == {"size": 3}
    gpu = _cfg("webvid", "in", "out", "depth.num_gpus=0.25")  # auto on GPUs: separate
    assert not gpu.depth.fused and gpu.depth.cpus_per_actor == 0.5
    assert _cfg("webvid", "in", "out", "depth.num_gpus=1", "depth.placement=fused").depth.fused
    with pytest.raises(ConfigError, match="depth.placement"):
        _cfg("webvid", "in", "out", "depth.placement=inline")


def test_fused_and_separate_layouts_write_the_same_shards(sample_data, tmp_path, tiny_zoedepth, ray_local):
    """The two layouts run the same per-record work: same manifest, same samples byte for byte."""
    common = ("co3d.depth=both", f"depth.model={tiny_zoedepth}", "samples_per_shard=1")
    outs = {}
    for placement in ("fused", "separate"):
        out = outs[placement] = tmp_path / placement
        s = run_preprocess(_cfg("co3d", sample_data / "co3d", out, *common, f"depth.placement={placement}"))
        assert s["clips_written"] == 4 and s["shards_written"] == 4 and s["errors"] == 0
    fused, separate = (pq.read_table(outs[p] / "manifest.parquet") for p in ("fused", "separate"))
    assert fused.equals(separate)

    def members(out):
        return [
            {k: v for k, v in s.items() if k not in ("__url__", "__local_path__")}
            for tar in sorted(out.glob("*.tar"))
            for s in wds.WebDataset(str(tar), shardshuffle=False)
        ]

    assert members(outs["fused"]) == members(outs["separate"])
    for s in _read_back(outs["fused"]):  # co3d.depth=both: the estimate beside CO3D's depth
        assert s.depth is not None and s.depth_est is not None and s.depth_est.shape == s.depth.shape
        assert s.meta["depth_source"] == "co3d" and s.meta["depth_est_source"] == "zoedepth"


@pytest.mark.slow
def test_a_killed_shard_worker_is_replaced_and_nothing_is_lost(
    sample_data, tmp_path, tiny_zoedepth, ray_local
):
    """SIGKILL one fused shard worker mid-run: Ray restarts the actor, retries its shards, and the
    output holds every clip exactly once (shards are idempotent: tar renamed, then marker)."""
    import threading
    import time

    import psutil

    out = tmp_path / "killed"
    cfg = _cfg(
        "co3d",
        sample_data / "co3d",
        out,
        "co3d.depth=zoedepth",
        f"depth.model={tiny_zoedepth}",
        "co3d.clips_per_sequence=3",
        "samples_per_shard=1",
    )
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(run_preprocess(cfg)))
    job.start()
    killed, done_at_kill = [], 0
    while job.is_alive() and not killed:
        done_at_kill = len(list(out.glob("train-*.json")))
        if done_at_kill:  # at least one shard committed: the pool is at work
            for p in psutil.process_iter(["cmdline"]):
                if "ShardWorker" in " ".join(p.info["cmdline"] or []):
                    p.kill()
                    killed.append(p.pid)
                    break
        time.sleep(0.01)
    job.join(timeout=600)
    assert killed, "no shard worker was found to kill"
    assert done_at_kill < 12, "the kill must land before the end"
    assert result["clips_written"] == 12 and result["errors"] == 0 and result["shards_failed"] == []
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert len(manifest) == len({r["key"] for r in manifest}) == 12
    assert sorted(s.key for s in _read_back(out)) == sorted(r["key"] for r in manifest)
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]  # no partial files
