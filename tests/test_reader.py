"""Training-side reader over preprocessed shards: tensors, worker splitting, fsspec URLs."""

from __future__ import annotations

import fsspec
import pytest
import torch

from mvcustom.configs import PreprocessConfig, from_dict
from mvcustom.data.reader import expand_shards, make_clip_dataset
from pipelines.preprocess import run_preprocess


@pytest.fixture(scope="module")
def co3d_shards(sample_data, tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("co3d_shards")
    cfg = from_dict(
        PreprocessConfig,
        {
            "preset": "debug",
            "source": "co3d",
            "input": str(sample_data / "co3d"),
            "output": str(out),
            "samples_per_shard": 1,
            "co3d": {"clips_per_sequence": 2},
            "mlflow": {"enabled": False},
        },
        "test",
    )
    assert run_preprocess(cfg)["clips_written"] == 8
    return out


def test_samples_are_training_tensors(co3d_shards):
    samples = list(make_clip_dataset(str(co3d_shards), shuffle_buffer=0))
    assert len(samples) == 8
    s = samples[0]
    assert s["frames"].shape == (8, 3, 64, 64) and s["frames"].dtype == torch.float32
    assert -1.0 <= s["frames"].min() and s["frames"].max() <= 1.0
    assert s["intrinsics"].shape == (8, 3, 3) and s["extrinsics"].shape == (8, 4, 4)
    assert s["depth"].shape == (8, 64, 64) and s["mask"].max() <= 1.0
    assert torch.allclose(s["extrinsics"][0], torch.eye(4), atol=1e-5)


def test_workers_split_shards_without_overlap(co3d_shards):
    ds = make_clip_dataset(str(co3d_shards), shuffle_buffer=4, seed=3)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    keys = [s["key"] for s in loader]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 8
    # seeded: the same order twice
    again = [
        s["key"]
        for s in torch.utils.data.DataLoader(
            make_clip_dataset(str(co3d_shards), shuffle_buffer=4, seed=3), batch_size=None, num_workers=2
        )
    ]
    assert again == keys


def test_fsspec_urls(co3d_shards):
    fs = fsspec.filesystem("memory")
    for p in sorted(co3d_shards.glob("*.tar")):
        fs.pipe(f"/mvc-reader/{p.name}", p.read_bytes())
    urls = expand_shards("memory://mvc-reader/*.tar")
    assert len(urls) == 8 and urls[0].startswith("memory://")
    assert len(list(make_clip_dataset(urls, shuffle_buffer=0))) == 8
    with pytest.raises(FileNotFoundError, match="no shards match"):
        expand_shards("memory://nothing-here/*.tar")


@pytest.mark.parametrize("evil", ["../escape.txt", "/etc/abs.txt", "dir/../../up.txt"])
def test_unsafe_member_names_refuse_the_shard(co3d_shards, tmp_path, evil):
    """A shard is untrusted input: a member with an absolute or '..' path is refused with an
    error naming it, by both the reader and the training stream (issue 7, security)."""
    import io
    import tarfile

    from mvcustom.training.data import sample_stream

    good = sorted(co3d_shards.glob("*.tar"))[0]
    bad = tmp_path / "bad-000000.tar"
    with tarfile.open(good) as src, tarfile.open(bad, "w") as dst:
        for m in src.getmembers():
            dst.addfile(m, src.extractfile(m))
        info = tarfile.TarInfo(evil)
        info.size = 2
        dst.addfile(info, io.BytesIO(b"hi"))
    with tarfile.open(bad) as t:
        assert evil in t.getnames()  # tarfile keeps the name as stored
    with pytest.raises(ValueError, match="absolute or '..' path"):
        list(make_clip_dataset(str(bad), shuffle_buffer=0))
    with pytest.raises(ValueError, match="absolute or '..' path"):
        next(sample_stream(str(bad), seed=0, rank=0, world=1, shuffle_buffer=1))
    # the same shard without the extra member reads fine
    assert len(list(make_clip_dataset(str(good), shuffle_buffer=0))) == 1
