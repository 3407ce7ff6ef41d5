"""Shards as the unit of work, retry and idempotency (DESIGN.md §6.10, video2dataset's writer).

* **Deterministic assignment**: the job lists its inputs in a deterministic order; input ``i``
  goes to shard ``i // samples_per_shard``. Rerunning the same config gives the same shards.
* **Atomic commit**: a shard's tar is written to a temporary name and renamed, then its *marker*
  ``{split}-{index:06d}.json`` (the manifest and error rows of that shard) is written the same
  way. A shard is complete iff its marker exists; a tar without a marker is rewritten on resume.
  On object stores, a rename is a server-side copy: the final object appears whole or not at all.
* **Collection**: ``manifest.parquet`` and ``errors.parquet`` are rebuilt from all markers at the
  end of every run, so they are identical however many runs (or kills) it took.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterable

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST_COLUMNS = ("key", "shard", "source", "source_id", "num_frames")
ERROR_COLUMNS = ("id", "stage", "reason")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}"


def assign_shards(num_items: int, samples_per_shard: int) -> list[range]:
    """Contiguous ranges of item positions, one per shard."""
    return [range(s, min(s + samples_per_shard, num_items)) for s in range(0, num_items, samples_per_shard)]


def preflight_output(url: str) -> None:
    """Refuse an unwritable output location up front, naming it and the fix."""
    try:
        fs, root = fsspec.core.url_to_fs(url)
        fs.makedirs(root, exist_ok=True)
        probe = f"{root}/.write-probe-{uuid.uuid4().hex}"
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
    except Exception as e:  # every backend raises its own type
        raise PermissionError(
            f"output {url!r} is not writable ({type(e).__name__}: {e}); choose a folder/bucket you can write "
            "to (config key 'output' or --set output=...) or fix its permissions/credentials"
        ) from None


def _atomic_write(fs, path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


def tar_bytes(samples: Iterable[dict]) -> bytes:
    """A WebDataset tar (members ``{__key__}.{field}``) of encoded sample dicts."""
    import webdataset as wds

    buf = io.BytesIO()
    with wds.TarWriter(buf) as w:
        for s in samples:
            w.write(s)
    return buf.getvalue()


def commit_shard(
    output: str,
    split: str,
    index: int,
    samples: list[dict],
    manifest_rows: list[dict],
    error_rows: list[dict],
) -> dict:
    """Write one shard's tar (if it has samples) and then its marker; returns the marker."""
    fs, root = fsspec.core.url_to_fs(output)
    fs.makedirs(root, exist_ok=True)
    name = shard_name(split, index)
    if samples:
        _atomic_write(fs, f"{root}/{name}.tar", tar_bytes(samples))
    marker = {"shard": f"{name}.tar" if samples else None, "samples": manifest_rows, "errors": error_rows}
    _atomic_write(fs, f"{root}/{name}.json", json.dumps(marker, ensure_ascii=False).encode("utf8"))
    return marker


def completed_shards(output: str, split: str) -> set[int]:
    """Indices of shards whose marker exists (complete shards)."""
    fs, root = fsspec.core.url_to_fs(output)
    if not fs.exists(root):
        return set()
    done = set()
    prefix = f"{split}-"
    for p in fs.ls(root, detail=False):
        base = p.rstrip("/").rsplit("/", 1)[-1]
        if base.startswith(prefix) and base.endswith(".json") and base[len(prefix) : -5].isdigit():
            done.add(int(base[len(prefix) : -5]))
    return done


def clean_temporaries(output: str) -> int:
    """Remove ``*.tmp-*`` files a killed run left behind; returns how many."""
    fs, root = fsspec.core.url_to_fs(output)
    if not fs.exists(root):
        return 0
    tmps = [p for p in fs.ls(root, detail=False) if ".tmp-" in p.rsplit("/", 1)[-1]]
    for p in tmps:
        fs.rm(p)
    return len(tmps)


def collect(output: str, split: str, extra_errors: list[dict] = ()) -> tuple[pa.Table, pa.Table]:
    """Rebuild ``manifest.parquet`` and ``errors.parquet`` from every marker (plus listing errors)."""
    fs, root = fsspec.core.url_to_fs(output)
    manifest, errors = [], list(extra_errors)
    for idx in sorted(completed_shards(output, split)):
        with fs.open(f"{root}/{shard_name(split, idx)}.json", "rb") as f:
            marker = json.loads(f.read().decode("utf8"))
        manifest += marker["samples"]
        errors += marker["errors"]
    manifest.sort(key=lambda r: (r["shard"], r["key"]))
    errors.sort(key=lambda r: (r["stage"], r["id"]))
    mt = pa.Table.from_pylist(
        manifest,
        schema=pa.schema([(c, pa.int64() if c == "num_frames" else pa.string()) for c in MANIFEST_COLUMNS]),
    )
    et = pa.Table.from_pylist(errors, schema=pa.schema([(c, pa.string()) for c in ERROR_COLUMNS]))
    for name, table in (("manifest.parquet", mt), ("errors.parquet", et)):
        buf = io.BytesIO()
        pq.write_table(table, buf)
        _atomic_write(fs, f"{root}/{name}", buf.getvalue())
    return mt, et


def check_job_fingerprint(output: str, fingerprint: dict) -> None:
    """Record what produced ``output`` (``_job.json``) and refuse to resume it with other settings.

    Resume is per shard, so shards written under one config and shards written under another
    would silently mix (different frame counts, sizes, sampling). ``fingerprint`` holds every
    setting that changes the content of the shards.
    """
    fs, root = fsspec.core.url_to_fs(output)
    path = f"{root}/_job.json"
    if fs.exists(path):
        with fs.open(path, "rb") as f:
            old = json.loads(f.read().decode("utf8"))
        if old != fingerprint:
            diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
            raise ValueError(
                f"output {output!r} holds shards made with different settings ({', '.join(diff)}); "
                "rerun with the original settings to resume, or write to a new output"
            )
        return
    fs.makedirs(root, exist_ok=True)
    _atomic_write(fs, path, json.dumps(fingerprint, sort_keys=True).encode("utf8"))
