"""Training batches from shards: a deterministic, resumable, per-rank stream.

Each rank reads a disjoint part of the data: with at least as many shards as ranks, rank ``r``
owns shards ``r, r + W, ...`` of each epoch's (seeded) shard order; with fewer shards, every rank
reads all of them and keeps samples ``i`` with ``i % W == r``. Within a rank, samples pass a
seeded shuffle buffer. The stream is a pure function of ``(seed, rank, world size)``, so a
resumed run skips the samples it already consumed (``step * micro_batches * batch_size``) and
continues exactly where the stopped run was (tested bit-exact).

Stage 2 learns one subject (``data.subject``; :func:`check_subject` refuses shards holding more
than one unless ``data.multiple_subjects``): the stream keeps only that subject's clips and every
rank streams all of them (a subject is a handful of clips; the ranks differ in shuffle, frames
and noise).

Per sample (DESIGN.md §3 schema, via :func:`mvcustom.data.reader.to_tensors`): choose
``num_frames`` frames (evenly spread over the clip, a random offset when the clip is longer),
resize to the configured size (intrinsics scaled exactly), and for stage 2 split the clip into
target frames and ``num_references`` reference frames (the subject's other views). The prompt
is the caption (stage 1) or ``prompt_template`` filled with the subject token and category.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from mvcustom.data.reader import _register_fsspec_schemes, expand_shards, to_tensors
from mvcustom.data.schema import UnsafeShardError, check_member_name


def subject_of(meta: dict) -> str:
    """A clip's subject: ``category/sequence`` (CO3D), else ``source/sequence`` (``photos/mug``)."""
    if meta.get("source") == "co3d":
        return f"{meta.get('category')}/{meta.get('sequence')}"
    return f"{meta.get('source')}/{meta.get('sequence')}"


def matches_subject(subject: str, wanted: str) -> bool:
    """``wanted`` names ``subject`` in full or by its sequence/folder name alone."""
    return subject == wanted or subject.rsplit("/", 1)[-1] == wanted


def manifest_rows(shards: list[str] | str, columns: list[str], missing_ok: bool = False) -> list[dict]:
    """The ``manifest.parquet`` rows (``columns`` plus ``shard``) of ``shards``' clips (every
    shard folder written by ``jobs.preprocess`` has one beside its tars; ``missing_ok``: a
    folder without one contributes no rows)."""
    import fsspec
    import pyarrow.parquet as pq

    by_folder: dict[str, set[str]] = {}
    for url in expand_shards(shards):
        folder, name = url.rsplit("/", 1)
        by_folder.setdefault(folder, set()).add(name)
    out: list[dict] = []
    for folder, names in sorted(by_folder.items()):
        try:
            with fsspec.open(f"{folder}/manifest.parquet", "rb") as f:
                rows = pq.read_table(f, columns=sorted({"shard", *columns})).to_pylist()
        except FileNotFoundError:
            if missing_ok:
                continue
            raise ValueError(
                f"no manifest.parquet beside the shards in {folder}: training reads it to know which "
                "subjects and clips the data holds (jobs.preprocess writes one into every output folder)"
            ) from None
        out += [r for r in rows if r["shard"] in names]
    return out


def subjects_in(shards: list[str] | str) -> dict[str, int]:
    """Clips per subject in ``shards``, from their manifests."""
    counts: dict[str, int] = {}
    for r in manifest_rows(shards, ["source", "source_id"]):
        sid = r["source_id"].rsplit("/", 1)[0] if r["source"] == "co3d" else r["source_id"]
        key = sid if r["source"] == "co3d" else f"{r['source']}/{sid}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def frames_needed(cfg) -> int:
    """Frames one training sample draws from a clip: the target frames, plus at stage 2 the
    reference views (the photos path's ``photos.min_photos`` must be at least this)."""
    return cfg.clip.num_frames + (cfg.data.num_references if cfg.stage == "customize" else 0)


def check_clip_lengths(cfg) -> None:
    """Refuse shards holding clips too short for one sample (before any worker starts; shards
    without a manifest are checked per sample as they are read)."""
    need = frames_needed(cfg)
    rows = manifest_rows(cfg.shards, ["key", "num_frames"], missing_ok=True)
    short = [r for r in rows if r["num_frames"] < need]
    if short:
        listed = ", ".join(f"{r['key']} ({r['num_frames']})" for r in short[:5])
        more = f" and {len(short) - 5} more" if len(short) > 5 else ""
        refs = f" + data.num_references={cfg.data.num_references}" if cfg.stage == "customize" else ""
        raise ValueError(
            f"{len(short)} clip(s) in the shards have fewer than the {need} frames a sample draws "
            f"(clip.num_frames={cfg.clip.num_frames}{refs}): {listed}{more}. Preprocess more frames "
            "per clip (photos: photos.min_photos >= that; CO3D/WebVid: clip.num_frames) or lower "
            "clip.num_frames / data.num_references"
        )


def check_subject(cfg) -> list[str]:
    """Stage 2's subject(s) in ``cfg.shards``, refusing what is not one named subject (unless
    ``data.multiple_subjects``). Returns the subjects the run will learn."""
    found = subjects_in(cfg.shards)
    wanted = cfg.data.subject
    chosen = sorted(s for s in found if wanted is None or matches_subject(s, wanted))
    listed = ", ".join(f"{s} ({n} clips)" for s, n in sorted(found.items())[:20])
    if not chosen:
        raise ValueError(f"data.subject={wanted!r} is not in the shards, which hold: {listed}")
    if len(chosen) > 1 and not cfg.data.multiple_subjects:
        raise ValueError(
            f"stage 2 learns one subject (one token), but the shards hold {len(chosen)}: {listed}. "
            "Name one with --set data.subject=<category/sequence>, preprocess only it "
            "(co3d.categories + co3d.sequences), or set data.multiple_subjects=true to train one token on all"
        )
    return chosen


def rank_shards(shards: list[str], epoch: int, seed: int, rank: int, world: int) -> tuple[list[str], bool]:
    """This rank's shards for an epoch and whether it must also split by sample index."""
    order = list(shards)
    random.Random(f"{seed}-{epoch}").shuffle(order)
    if len(order) >= world:
        return order[rank::world], False
    return order, True


class BadSamples:
    """Counts corrupt samples skipped by one rank and fails the run past ``limit`` (the
    ``handler`` of WebDataset's tar reading, and the guard around decoding). A storage fault
    (:func:`mvcustom.data.storage.is_transient`) is never skipped: it propagates, the step fails
    and Ray Train restarts from the last checkpoint, so no data is skipped for a flaky network."""

    def __init__(self, limit: int, rank: int, stats: dict | None = None):
        self.limit, self.rank = limit, rank
        self.stats = stats if stats is not None else {}
        self.stats.setdefault("bad_samples", 0)

    def __call__(self, exn: BaseException) -> bool:
        from mvcustom.data.storage import is_transient

        if is_transient(exn) or isinstance(exn, UnsafeShardError):
            raise exn  # a storage fault retries the step; an unsafe shard is refused, not skipped
        self.stats["bad_samples"] += 1
        n = self.stats["bad_samples"]
        if n > self.limit:
            raise RuntimeError(
                f"rank {self.rank}: {n} corrupt training samples, more than data.max_bad_samples={self.limit}; "
                f"the last: {type(exn).__name__}: {exn}. Re-run preprocessing for the shards named above, "
                "or raise data.max_bad_samples"
            ) from exn
        print(
            f"[rank {self.rank}] skipped a corrupt sample ({n}/{self.limit}): {type(exn).__name__}: {exn}",
            flush=True,
        )
        return True  # WebDataset: continue with the next sample


def sample_stream(
    shards: list[str] | str,
    seed: int,
    rank: int,
    world: int,
    shuffle_buffer: int = 64,
    max_bad_samples: int = 16,
    stats: dict | None = None,
    subject: str | None = None,
) -> Iterator[dict]:
    """Endless stream of decoded samples for one rank (see the module docstring). Corrupt
    samples and unreadable shard tails are skipped and counted in ``stats["bad_samples"]``, at
    most ``max_bad_samples`` per rank (:class:`BadSamples`). ``subject``: keep only that
    subject's clips (:func:`matches_subject`)."""
    import webdataset as wds

    _register_fsspec_schemes()
    urls = expand_shards(shards)
    bad = BadSamples(max_bad_samples, rank, stats)
    epoch = 0
    while True:
        mine, by_index = rank_shards(urls, epoch, seed, rank, world)
        if subject is not None:
            # one subject is a handful of clips, often in one shard: every rank streams all of
            # them (the ranks still differ in shuffle, frames and noise), or most ranks get none
            mine, by_index = rank_shards(urls, epoch, seed, 0, 1)
        rng = random.Random(f"{seed}-{rank}-{epoch}")
        buffer: list[dict] = []
        ds = wds.WebDataset(
            mine,
            shardshuffle=False,
            nodesplitter=None,
            workersplitter=None,
            empty_check=False,
            select_files=check_member_name,
            handler=bad,
        )
        yielded = False
        for i, raw in enumerate(ds):
            if by_index and i % world != rank:
                continue
            if subject is not None and not _is_subject(raw, subject):
                continue
            buffer.append(raw)
            if len(buffer) >= max(shuffle_buffer, 1):
                sample = _decode(buffer.pop(rng.randrange(len(buffer))), bad)
                if sample is not None:
                    yielded = True
                    yield sample
        rng.shuffle(buffer)
        for raw in buffer:
            sample = _decode(raw, bad)
            if sample is not None:
                yielded = True
                yield sample
        if not yielded:
            raise ValueError(
                f"rank {rank} of {world} got no samples from {len(urls)} shards in epoch {epoch}"
            )
        epoch += 1


def _is_subject(raw: dict, subject: str) -> bool:
    import json

    try:
        meta = json.loads(raw["json"])
    except (KeyError, ValueError):
        return True  # decoding reports the broken sample
    return matches_subject(subject_of(meta), subject)


def _decode(raw: dict, bad: BadSamples) -> dict | None:
    try:
        return to_tensors(raw)
    except Exception as e:  # a corrupt member (npy, JPEG, JSON): skipped and counted, or fatal
        err = RuntimeError(f"sample {raw.get('__key__')} of {raw.get('__url__')}: {type(e).__name__}: {e}")
        err.__cause__ = e
        bad(err)
        return None


def select_frames(num_available: int, num: int, rng: random.Random) -> list[int]:
    """``num`` frame indices spread evenly over a random window of the clip."""
    if num_available < num:
        raise ValueError(f"clip has {num_available} frames, {num} needed (lower clip.num_frames)")
    stride = max(1, num_available // num)
    span = stride * (num - 1) + 1
    start = rng.randrange(num_available - span + 1)
    return [start + i * stride for i in range(num)]


def select_anchored_frames(num_available: int, num: int, rng: random.Random) -> list[int]:
    """Frame 0, then ``num - 1`` other frames of the clip drawn at random, in random order."""
    if num_available < num:
        raise ValueError(f"clip has {num_available} frames, {num} needed (lower clip.num_frames)")
    return [0, *rng.sample(range(1, num_available), num - 1)]


def resize_sample(sample: dict, height: int, width: int) -> dict:
    """Resize frames/masks/depth to ``height x width`` (no crop: shards already have the aspect)
    and scale the intrinsics exactly (corner-origin pixels: ``K' = diag(sx, sy, 1) K``)."""
    frames = sample["frames"]
    H, W = frames.shape[-2:]
    if (H, W) == (height, width):
        return sample
    out = dict(sample)
    out["frames"] = F.interpolate(
        frames, size=(height, width), mode="bilinear", antialias=True, align_corners=False
    )
    for key in ("mask", "depth"):
        if key in sample:
            out[key] = F.interpolate(sample[key][:, None], size=(height, width), mode="nearest")[:, 0]
    if "intrinsics" in sample:
        scale = torch.tensor([width / W, height / H, 1.0], dtype=sample["intrinsics"].dtype)
        out["intrinsics"] = sample["intrinsics"] * scale[:, None]
    return out


def _take(sample: dict, idx: list[int]) -> dict:
    keys = ("frames", "intrinsics", "extrinsics", "mask", "depth")
    return {k: sample[k][idx] for k in keys if k in sample}


def make_example(
    sample: dict,
    stage: str,
    num_frames: int,
    height: int,
    width: int,
    rng: random.Random,
    num_references: int = 0,
    subject_token: str = "",
    prompt_template: str = "{caption}",
    caption_dropout: float = 0.0,
    frame_selection: str = "window",
) -> dict:
    """One training example (unbatched) from one decoded shard sample (stage 1's frames chosen
    by ``frame_selection``: :func:`select_frames` or :func:`select_anchored_frames`); with probability
    ``caption_dropout`` its prompt is the empty one (classifier-free guidance's unconditional
    branch)."""
    sample = resize_sample(sample, height, width)
    meta = sample.get("meta", {})
    n = sample["frames"].shape[0]
    if stage == "customize":
        if "extrinsics" not in sample:
            raise ValueError(f"sample {sample.get('key')}: stage customize needs posed clips")
        idx = select_frames(n, num_frames + num_references, rng)
        rng.shuffle(idx)
        refs, targets = sorted(idx[:num_references]), sorted(idx[num_references:])
        ex = _take(sample, targets)
        ref = _take(sample, refs)
        ex.update(
            {
                f"reference_{k}": v
                for k, v in ref.items()
                if k in ("frames", "intrinsics", "extrinsics", "mask")
            }
        )
    elif frame_selection == "anchored_random":
        ex = _take(sample, select_anchored_frames(n, num_frames, rng))
    elif frame_selection == "window":
        ex = _take(sample, select_frames(n, num_frames, rng))
    else:
        raise ValueError(f"frame_selection must be window or anchored_random, got {frame_selection!r}")
    category = meta.get("category") or ""
    ex["caption"] = prompt_template.format(
        caption=sample.get("caption", ""), token=subject_token, category=category
    ).strip()
    if caption_dropout > 0 and rng.random() < caption_dropout:
        ex["caption"] = ""
    ex["key"] = sample.get("key", "")
    return ex


def collate(examples: list[dict]) -> dict:
    """Stack a micro-batch. Camera and mask entries are kept only when every example has them."""
    out: dict = {"caption": [e["caption"] for e in examples], "key": [e["key"] for e in examples]}
    for k in examples[0]:
        if k in ("caption", "key"):
            continue
        if all(k in e for e in examples):
            out[k] = torch.stack([e[k] for e in examples])
    return out


def batch_stream(
    shards: list[str] | str,
    stage: str,
    batch_size: int,
    num_frames: int,
    height: int,
    width: int,
    seed: int,
    rank: int,
    world: int,
    skip_batches: int = 0,
    shuffle_buffer: int = 64,
    num_references: int = 0,
    subject_token: str = "",
    prompt_template: str = "{caption}",
    min_rotation_deg: float = 0.0,
    max_bad_samples: int = 16,
    stats: dict | None = None,
    subject: str | None = None,
    caption_dropout: float = 0.0,
    frame_selection: str = "window",
) -> Iterator[dict]:
    """Endless micro-batches for one rank; ``skip_batches`` fast-forwards a resumed run.

    ``min_rotation_deg`` drops clips whose recorded camera motion (``json.camera_motion``, from
    preprocessing) rotates less (static shots teach no viewpoint change, DESIGN.md §1).
    """
    rng = random.Random(f"frames-{seed}-{rank}")
    batch: list[dict] = []
    produced = 0
    for sample in sample_stream(shards, seed, rank, world, shuffle_buffer, max_bad_samples, stats, subject):
        motion = (sample.get("meta") or {}).get("camera_motion") or {}
        if min_rotation_deg > 0 and motion.get("max_rotation_deg", float("inf")) < min_rotation_deg:
            continue
        ex = make_example(
            sample,
            stage,
            num_frames,
            height,
            width,
            rng,
            num_references,
            subject_token,
            prompt_template,
            caption_dropout,
            frame_selection,
        )
        batch.append(ex)
        if len(batch) == batch_size:
            if produced >= skip_batches:
                yield collate(batch)
            produced += 1
            batch = []
