"""Training (issue 5): config -> DeepSpeed JSON, the per-rank data stream, the loop locally
(resume, overfit, export) and under Ray Train with 2 CPU workers (ZeRO-2, ZeRO-3, a killed
worker, MLflow)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from mvcustom.configs.base import from_dict
from mvcustom.configs.train import TrainConfig
from mvcustom.geometry.camera import Cameras
from mvcustom.training.data import (
    batch_stream,
    make_example,
    rank_shards,
    resize_sample,
    sample_stream,
    select_frames,
)
from mvcustom.training.engine import deepspeed_config, lr_lambda


def debug_config(shards: str, output: Path, **over) -> TrainConfig:
    data = {"preset": "debug", "shards": [shards], "output": str(output), "mlflow": {"enabled": False}}
    for key, value in over.items():
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return from_dict(TrainConfig, data, "test")


# ---------------------------------------------------------------------------- pure parts
def test_deepspeed_config_is_derived_from_the_typed_config():
    cfg = from_dict(
        TrainConfig,
        {
            "batch_size": 3,
            "optim": {"grad_accum": 4, "grad_clip": 0.5},
            "deepspeed": {
                "zero_stage": 3,
                "offload_optimizer": True,
                "raw_override": {"zero_optimization": {"reduce_bucket_size": 1000}},
            },
        },
        "t",
    )
    ds = deepspeed_config(cfg, torch.device("cpu"))
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1000  # merged, not replacing the section
    assert "stage3_max_reuse_distance" not in ds["zero_optimization"]  # DeepSpeed's default
    debug = from_dict(TrainConfig, {"preset": "debug", "deepspeed": {"zero_stage": 3}}, "t")
    assert deepspeed_config(debug, torch.device("cpu"))["zero_optimization"]["stage3_max_reuse_distance"] == 0
    assert ds["bf16"]["enabled"] is False  # auto on CPU
    gpu = deepspeed_config(cfg, torch.device("cuda", 0))
    assert gpu["bf16"]["enabled"] is True and gpu["data_types"] == {"buffer_dtype": "bf16"}
    assert "data_types" not in ds  # fp32: buffers untouched
    bad = from_dict(TrainConfig, {"deepspeed": {"zero_stage": 0, "offload_optimizer": True}}, "t")
    with pytest.raises(ValueError, match="offload_optimizer needs zero_stage"):
        deepspeed_config(bad, torch.device("cpu"))


def test_lr_schedule():
    f = lr_lambda(warmup=4, total=14, schedule="cosine")
    assert [round(f(s), 3) for s in (0, 3)] == [0.25, 1.0]
    assert f(4) == pytest.approx(1.0) and f(9) == pytest.approx(0.5) and f(14) == pytest.approx(0.0)
    assert lr_lambda(2, 10, "constant")(7) == 1.0


def test_rank_shards_partition_each_epoch():
    shards = [f"s{i}" for i in range(5)]
    parts = [rank_shards(shards, 3, 7, r, 2)[0] for r in range(2)]
    assert sorted(parts[0] + parts[1]) == shards and not set(parts[0]) & set(parts[1])
    assert rank_shards(shards, 3, 7, 0, 2) == rank_shards(shards, 3, 7, 0, 2)
    assert rank_shards(shards, 4, 7, 0, 2)[0] != parts[0] or rank_shards(shards, 5, 7, 0, 2)[0] != parts[0]
    few, by_index = rank_shards(shards[:1], 0, 7, 1, 2)
    assert few == shards[:1] and by_index


def _keys(stream, n):
    return [next(stream)["key"] for _ in range(n)]


def test_sample_streams_are_disjoint_deterministic_and_cover_the_data(train_shards):
    from mvcustom.data.reader import expand_shards

    total = sum(
        1
        for _ in __import__("webdataset").WebDataset(
            expand_shards(train_shards), shardshuffle=False, empty_check=False
        )
    )
    for world in (1, 2):
        per_rank = [_keys(sample_stream(train_shards, 3, r, world, 4), total // world) for r in range(world)]
        flat = [k for keys in per_rank for k in keys]
        assert len(set(flat)) == len(flat)  # no overlap between ranks within an epoch
        assert per_rank[0] == _keys(sample_stream(train_shards, 3, 0, world, 4), total // world)
    # one rank alone sees everything each epoch
    assert len(set(_keys(sample_stream(train_shards, 3, 0, 1, 4), total))) == total


def test_batch_stream_fast_forward_continues_exactly(train_shards):
    kw = dict(stage="backbone", batch_size=1, num_frames=4, height=64, width=64, seed=1, rank=0, world=1)
    full = batch_stream(train_shards, **kw)
    first = [next(full) for _ in range(5)]
    resumed = batch_stream(train_shards, skip_batches=3, **kw)
    for expected in first[3:]:
        got = next(resumed)
        assert got["key"] == expected["key"] and torch.equal(got["frames"], expected["frames"])


def test_caption_dropout_trains_the_unconditional_prompt(train_shards):
    """Classifier-free guidance samples with the empty prompt: training must see it. The share of
    dropped captions follows ``data.caption_dropout``, the stream stays resumable, and the config
    default is SD's 10 %."""
    from mvcustom.configs.train import TrainConfig, TrainDataConfig

    assert TrainConfig().data.caption_dropout == 0.1
    with pytest.raises(ValueError, match="caption_dropout"):
        TrainDataConfig(caption_dropout=1.0)
    kw = dict(stage="backbone", batch_size=2, num_frames=2, height=64, width=64, seed=5, rank=0, world=1)
    n = 100
    for p in (0.0, 0.3):
        stream = batch_stream(train_shards, caption_dropout=p, **kw)
        captions = [c for _ in range(n // 2) for c in next(stream)["caption"]]
        empty = sum(c == "" for c in captions)
        assert empty == 0 if p == 0 else 15 <= empty <= 45, (p, empty)
    full = batch_stream(train_shards, caption_dropout=0.3, **kw)
    first = [next(full)["caption"] for _ in range(12)]
    resumed = batch_stream(train_shards, caption_dropout=0.3, skip_batches=7, **kw)
    assert [next(resumed)["caption"] for _ in range(5)] == first[7:]


def test_select_frames():
    rng = random.Random(0)
    idx = select_frames(8, 4, rng)
    assert len(idx) == 4 and idx == sorted(idx) and idx[-1] < 8 and len(set(idx)) == 4
    with pytest.raises(ValueError, match="lower clip.num_frames"):
        select_frames(3, 4, rng)


def test_resize_sample_scales_intrinsics_exactly():
    K = torch.tensor([[[50.0, 0, 31.0], [0, 55.0, 33.0], [0, 0, 1]]])
    w2c = torch.eye(4)[None]
    point = torch.tensor([[0.2, -0.1, 2.0]])
    sample = {
        "frames": torch.zeros(1, 3, 64, 64),
        "intrinsics": K,
        "extrinsics": w2c,
        "mask": torch.ones(1, 64, 64),
    }
    small = resize_sample(sample, 32, 48)
    assert small["frames"].shape == (1, 3, 32, 48) and small["mask"].shape == (1, 32, 48)
    uv, _ = Cameras(w2c, K, (64, 64)).project(point)
    uv2, _ = Cameras(w2c, small["intrinsics"], (32, 48)).project(point)
    assert torch.allclose(uv2, uv * torch.tensor([48 / 64, 32 / 64]), atol=1e-5)


def test_customize_examples_split_references_from_targets(train_shards):
    sample = next(sample_stream(train_shards, 0, 0, 1, 1))
    ex = make_example(
        sample, "customize", 4, 64, 64, random.Random(0), 2, "<sks>", "a photo of {token} {category}"
    )
    assert ex["frames"].shape[0] == 4 and ex["reference_frames"].shape[0] == 2
    assert ex["caption"] == f"a photo of <sks> {sample['meta']['category']}"
    views = torch.cat([ex["extrinsics"], ex["reference_extrinsics"]])
    assert len({tuple(v.flatten().tolist()) for v in views}) == 6  # six distinct frames


def test_stage2_learns_one_named_subject(train_shards, tmp_path):
    from mvcustom.training.data import check_subject, subject_of, subjects_in

    found = subjects_in(train_shards)
    assert len(found) >= 2 and all(s.count("/") == 1 for s in found)  # category/sequence
    cfg = debug_config(train_shards, tmp_path, stage="customize")
    with pytest.raises(
        ValueError, match=r"learns one subject .* hold \d+: .*data.subject=.*multiple_subjects"
    ):
        check_subject(cfg)  # two subjects and no switch: refused
    one = sorted(found)[0]
    for name in (one, one.split("/")[1]):  # in full or by its sequence name
        assert check_subject(
            debug_config(train_shards, tmp_path, stage="customize", **{"data.subject": name})
        ) == [one]
    with pytest.raises(ValueError, match="not in the shards"):
        check_subject(debug_config(train_shards, tmp_path, stage="customize", **{"data.subject": "no/such"}))
    both = debug_config(train_shards, tmp_path, stage="customize", **{"data.multiple_subjects": True})
    assert check_subject(both) == sorted(found)
    # the stream keeps only that subject, and with a subject every rank gets all of its clips
    for rank in (0, 1):
        stream = sample_stream(train_shards, 0, rank, 2, 1, subject=one)
        assert {subject_of(next(stream)["meta"]) for _ in range(4)} == {one}


@pytest.mark.slow
def test_stage2_trains_at_the_radius_inference_uses(train_shards, tmp_path):
    """Stage 1 expands the STT radius on its schedule; stage 2 customizes the expanded model at
    the stage-1 export's final radius (what inference uses), read through the per-step reports."""
    import json

    from mvcustom.training.launch import run_local

    over = {"max_steps": 4, "checkpoint_every": 1, "sample_every": 100}
    s1 = run_local(debug_config(train_shards, tmp_path / "s1", **over))  # schedule [[0, 0], [2, -1]]
    assert [r["stt_radius"] for r in s1["reports"]] == [0, 0, -1, -1]
    record = json.loads((tmp_path / "s1" / "export" / "mvcustom_training.json").read_text())
    assert record == {"stage": "backbone", "steps": 4, "final_stt_radius": -1}
    stage2 = {**over, "stage": "customize", "init_from": str(tmp_path / "s1" / "export")}
    s2 = run_local(debug_config(train_shards, tmp_path / "s2", **stage2))
    assert [r["stt_radius"] for r in s2["reports"]] == [-1, -1, -1, -1]
    pinned = run_local(
        debug_config(
            train_shards, tmp_path / "s3", **{**stage2, "max_steps": 2, "model.stage2_stt_radius": 1}
        )
    )
    assert [r["stt_radius"] for r in pinned["reports"]] == [1, 1]


# ---------------------------------------------------------------------------- the loop, one process
class _StopAfter(Exception):
    pass


def _stopping_context(output: str, stop_step: int):
    from mvcustom.training.context import LocalContext

    class Ctx(LocalContext):
        def report(self, metrics, checkpoint_dir=None):
            super().report(metrics, checkpoint_dir)
            if checkpoint_dir and metrics["step"] == stop_step:
                raise _StopAfter  # the job dies right after its checkpoint

    return Ctx(output)


def _exported_state(folder: str) -> dict:
    from mvcustom.models import MVCustomModel

    return MVCustomModel.from_pretrained(folder).state_dict()


def test_stop_and_resume_matches_an_uninterrupted_run(train_shards, tmp_path):
    from mvcustom.training.context import LocalContext
    from mvcustom.training.loop import train_loop

    over = {
        "max_steps": 4,
        "checkpoint_every": 2,
        "sample_every": 100,
        "optim.schedule": "cosine",
        "optim.warmup_steps": 1,
    }
    straight = debug_config(train_shards, tmp_path / "a", **over)
    full = train_loop(straight, LocalContext(straight.output))

    stopped = debug_config(train_shards, tmp_path / "b", **over)
    ctx = _stopping_context(stopped.output, 2)
    with pytest.raises(_StopAfter):
        train_loop(stopped, ctx)
    resumed = train_loop(stopped, LocalContext(stopped.output, resume_from=ctx.latest_checkpoint()))
    assert resumed["history"] == full["history"][2:]
    a, b = _exported_state(full["export"]), _exported_state(resumed["export"])
    trained = [k for k in a if ".motion_modules." in k or k.startswith("camera_")]
    assert trained and all(torch.equal(a[k], b[k]) for k in a)  # bit-exact


def test_tiny_overfit_loss_falls(train_shards, tmp_path):
    """Stage 1 on one shard: the motion modules alone memorise it (seeded, so deterministic)."""
    from mvcustom.training.launch import run_local

    cfg = debug_config(
        train_shards,
        tmp_path / "overfit",
        max_steps=40,
        checkpoint_every=1000,
        sample_every=1000,
        **{"optim.lr": 3e-3, "data.shuffle_buffer": 1},
    )
    cfg.shards = [sorted(Path(train_shards).glob("*.tar"))[0].as_posix()]
    h = run_local(cfg)["history"]
    first, last = sum(h[:5]) / 5, sum(h[-5:]) / 5
    assert last < 0.8 * first, [round(v, 3) for v in h]  # measured: 1.10 -> 0.78


# ---------------------------------------------------------------------------- Ray Train, 2 workers
def _mlflow_run(uri: str, run_id: str):
    import mlflow

    client = mlflow.MlflowClient(uri)
    return client, client.get_run(run_id)


@pytest.mark.slow
def test_ray_zero3_customize_from_a_stage1_run_with_mlflow(train_shards, tmp_path, ray_local):
    """Stage 1 in-process (the demo test covers it under Ray with ZeRO-2), then stage 2 as the
    job: 2 Ray Train workers, ZeRO-3, MLflow run tagged with its stage-1 parent, resubmission."""
    from jobs.train import main
    from mvcustom.models import MVCustomModel
    from mvcustom.training.launch import run_local

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    s1 = run_local(
        debug_config(
            train_shards,
            tmp_path / "stage1",
            max_steps=2,
            **{"mlflow.enabled": True, "mlflow.tracking_uri": uri},
        ),
        track=True,
    )
    client, run1 = _mlflow_run(uri, s1["mlflow_run_id"])
    assert run1.data.params["stage"] == "backbone"
    assert {"loss", "lr", "samples_per_s", "data_wait_fraction"} <= set(run1.data.metrics)
    assert len(client.get_metric_history(run1.info.run_id, "loss")) == 2
    assert {"samples", "export"} <= {a.path for a in client.list_artifacts(run1.info.run_id)}

    argv = ["--config", "jobs/configs/train_customize_debug.yaml"]
    for setting in (
        f"output={tmp_path / 'stage2'}",
        f"init_from={tmp_path / 'stage1' / 'export'}",
        "deepspeed.zero_stage=3",
        "data.subject_init_word=teddy",
        f"shards=[{train_shards}]",
        f"mlflow.tracking_uri={uri}",
        "scaling.num_workers=2",
    ):
        argv += ["--set", setting]
    from mvcustom.training.data import subjects_in

    subject = sorted(subjects_in(train_shards))[-1]
    argv += ["--set", f"data.subject={subject}"]
    s2 = main(argv)
    assert s2["subject"] == [subject]
    assert s2["step"] == 4 and s2["resumed_from"] is None
    client, run2 = _mlflow_run(uri, s2["mlflow_run_id"])
    assert run2.data.tags["mvcustom.parent_run_id"] == s1["mlflow_run_id"]
    assert run2.data.tags["mvcustom.subject"] == subject
    assert run2.data.params["deepspeed.zero_stage"] == "3" and run2.data.params["stage"] == "customize"
    assert {"rank0_loss_fg_opacity", "rank0_loss_bg_alpha", "loss"} <= set(run2.data.metrics)
    assert len(client.get_metric_history(run2.info.run_id, "loss")) == 4
    assert {"samples", "export"} <= {a.path for a in client.list_artifacts(run2.info.run_id)}
    custom = MVCustomModel.from_pretrained(str(tmp_path / "stage2" / "export"))
    assert custom.config.subject_tokens == ["<sks>"]
    base = MVCustomModel.from_pretrained(str(tmp_path / "stage1" / "export"))
    a, b = base.state_dict(), custom.state_dict()
    moved = [k for k in b if k.startswith("pose_blocks.") and not torch.equal(a[k], b[k])]
    assert moved  # stage 2 trained its FeatureNeRFs (ZeRO-3 shards gathered for the export)
    assert torch.equal(a["unet.conv_in.weight"], b["unet.conv_in.weight"])  # and nothing frozen moved

    # resubmitting the finished job resumes from its last checkpoint: nothing left to do
    again = main(argv)
    assert again["resumed_from"] and again["resumed_from"].endswith(s2["checkpoint"].rsplit("/", 1)[1])
    assert again["step"] == 4

    # a torn newest checkpoint (rank 1's optimizer shard never reached storage) does not count:
    # the resubmission, asked for 2 more steps, resumes from the step-2 checkpoint and finishes
    from mvcustom.training.launch import latest_checkpoint

    newest = Path(latest_checkpoint(str(tmp_path / "stage2")))
    (shard,) = newest.glob("zero/*rank_1*optim_states.pt")
    shard.unlink()
    with pytest.raises(ValueError, match=r"max_steps: 4 -> 6.*resume_allow=\[max_steps\]"):
        main([*argv, "--set", "max_steps=6"])
    more = main([*argv, "--set", "max_steps=6", "--set", "resume_allow=[max_steps]"])
    assert more["resumed_from"] and Path(more["resumed_from"]) != newest and more["step"] == 6
    steps = [m.step for m in client.get_metric_history(more["mlflow_run_id"], "loss")]
    assert sorted(steps) == [3, 4, 5, 6], steps  # a new run for the resubmission: steps after step 2


@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_training_steps_and_resumes(train_shards, tmp_path, stage):
    """The GPU precision (bf16, what ``precision: auto`` picks on CUDA) trains on CPU too: DeepSpeed
    casts only parameters unless told, and the motion modules' fp32 position buffer then broke
    the first bf16 Linear. Its checkpoints resume through the weights-only loader."""
    from mvcustom.training.launch import run_local

    over = {"deepspeed.zero_stage": stage, "deepspeed.precision": "bf16", "checkpoint_every": 1}
    first = run_local(debug_config(train_shards, tmp_path / "a", max_steps=2, sample_every=100, **over))
    assert first["step"] == 2 and torch.isfinite(torch.tensor(first["loss"]))
    resume = str(tmp_path / "a" / "checkpoints" / "step_00000002")
    again = run_local(
        debug_config(train_shards, tmp_path / "b", max_steps=3, sample_every=100, **over), resume_from=resume
    )
    assert again["step"] == 3 and torch.isfinite(torch.tensor(again["loss"]))


def test_zero_stage0_exports_its_trained_weights(train_shards, tmp_path):
    """Stage 0 in fp32 keeps no separate master copy; the export takes the weights themselves."""
    from mvcustom.models import MVCustomModel
    from mvcustom.training.launch import run_local

    cfg = debug_config(train_shards, tmp_path / "z0", max_steps=2, **{"deepspeed.zero_stage": 0})
    out = run_local(cfg)
    exported = MVCustomModel.from_pretrained(out["export"]).state_dict()
    fresh = MVCustomModel.tiny(seed=0).state_dict()
    key = "unet.down_blocks.0.motion_modules.0.proj_in.weight"
    assert not torch.equal(exported[key], fresh[key])  # trained
    assert torch.equal(exported["unet.conv_in.weight"], fresh["unet.conv_in.weight"])  # frozen


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_checkpoint_loading_is_weights_only(tmp_path):
    """A checkpoint that would run code when unpickled is refused, and the code never runs; a
    DeepSpeed engine other than the torch one is refused up front (issue 7, security). Real
    ZeRO checkpoints load through this path in the resume tests."""
    import pickle

    from mvcustom.training.safe_load import harden_checkpoint_loading, weights_only_load

    marker = tmp_path / "pwned"
    torch.save({"module": {"w": torch.ones(2)}, "extra": _Evil(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError, match="weights_only|Unsupported global"):
        weights_only_load(str(tmp_path / "evil.pt"))
    assert not marker.exists()
    torch.save({"module": {"w": torch.ones(2)}, "step": 3}, tmp_path / "ok.pt")
    assert weights_only_load(str(tmp_path / "ok.pt"))["step"] == 3

    class Engine:
        checkpoint_engine = object()

    with pytest.raises(ValueError, match="weights_only=True"):
        harden_checkpoint_loading(Engine())


def test_latest_checkpoint_skips_a_marker_still_being_written(tmp_path):
    """Ray copies a reported checkpoint folder into storage file by file: a marker seen empty or
    half-written is not a complete checkpoint (the two-node drill once read one mid-copy)."""
    from mvcustom.training.launch import latest_checkpoint
    from mvcustom.training.loop import MARKER

    root = tmp_path / "train"
    for name, text in (("checkpoint_a", '{"step": 2}'), ("checkpoint_b", ""), ("checkpoint_c", '{"st')):
        (root / name).mkdir(parents=True)
        (root / name / MARKER).write_text(text)
    assert latest_checkpoint(str(tmp_path)) == str(root / "checkpoint_a")
