"""Shards as the unit of work, retry and idempotency (DESIGN.md §6.10, video2dataset's writer).

* **Deterministic assignment**: the job lists its inputs in a deterministic order; input ``i``
  goes to shard ``i // samples_per_shard``. Rerunning the same config gives the same shards.
* **Atomic commit**: a shard's tar is written to a temporary name and renamed, then its *marker*
  ``{split}-{index:06d}.json`` (the manifest and error rows of that shard) is written the same
  way. A shard is complete iff its marker exists; a tar without a marker is rewritten on resume.
  On object stores, a rename is a server-side copy: the final object appears whole or not at all.
* **Fixed plan**: the first run stores which item ids each shard holds (``_plan-{split}.parquet``); a
  rerun whose listing assigns other items to the shards (CSV rows or categories added, removed
  or reordered) is refused before it writes anything, since resume by position would silently
  duplicate or drop clips. Write a changed listing to a new output.
* **One run at a time**: ``_lock.json`` is created exclusively (``O_EXCL`` locally, S3's
  ``If-None-Match: *`` through s3fs), renewed while the run lives and removed when it ends; a
  second run on the same output is refused. A lock whose owner died (same host, process gone)
  or stopped renewing it for ``lock_ttl_s`` is taken over.
* **Collection**: ``manifest.parquet`` and ``errors.parquet`` are rebuilt from all markers at the
  end of every run, so they are identical however many runs (or kills) it took.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
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


def atomic_write(fs, path: str, data: bytes) -> None:
    """Write to a temporary name, then rename: readers see the whole file or none of it."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


def tar_bytes(samples: Iterable[dict]) -> bytes:
    """A WebDataset tar of encoded sample dicts: per sample, members ``{__key__}.{field}``
    sorted by field, read-only, as ``webdataset.TarWriter`` lays them out. Written with the
    standard library: importing ``webdataset`` imports torch (``webdataset.pytorch``), 1.2-2 s
    in every shard worker of a job that runs no model."""
    buf = io.BytesIO()
    now = time.time()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for s in samples:
            if "__key__" not in s:
                raise ValueError(f"sample without a __key__ (fields {sorted(s)})")
            key = s["__key__"]
            for field in sorted(k for k in s if not k.startswith("_")):
                data = s[field]
                if not isinstance(data, (bytes, bytearray, memoryview)):
                    raise ValueError(
                        f"sample {key}: field {field} is {type(data).__name__}, not encoded bytes"
                    )
                info = tarfile.TarInfo(f"{key}.{field}")
                info.size, info.mtime, info.mode = len(data), now, 0o444
                tar.addfile(info, io.BytesIO(data))
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
        atomic_write(fs, f"{root}/{name}.tar", tar_bytes(samples))
    elif fs.exists(f"{root}/{name}.tar"):
        # an earlier attempt of this shard wrote a tar and died before its marker; this attempt
        # has no samples (its inputs turned out bad), so that tar must not outlive it
        fs.rm(f"{root}/{name}.tar")
    marker = {"shard": f"{name}.tar" if samples else None, "samples": manifest_rows, "errors": error_rows}
    atomic_write(fs, f"{root}/{name}.json", json.dumps(marker, ensure_ascii=False).encode("utf8"))
    return marker


def completed_shards(output: str, split: str) -> set[int]:
    """Indices of shards whose marker exists (complete shards)."""
    fs, root = fsspec.core.url_to_fs(output)
    # object-store filesystems cache listings per process: a marker written since the last
    # listing (by a worker, or by this process) would be missing from a cached one
    fs.invalidate_cache(root)
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
    fs.invalidate_cache(root)
    if not fs.exists(root):
        return 0
    tmps = [p for p in fs.ls(root, detail=False) if ".tmp-" in p.rsplit("/", 1)[-1]]
    for p in tmps:
        fs.rm(p)
    return len(tmps)


def collect(output: str, split: str, extra_errors: list[dict] = ()) -> tuple[pa.Table, pa.Table, set[int]]:
    """Rebuild ``manifest.parquet`` and ``errors.parquet`` from every marker (plus listing errors).
    Returns both tables and the indices of the complete shards they were built from (one listing)."""
    fs, root = fsspec.core.url_to_fs(output)
    manifest, errors = [], list(extra_errors)
    done = completed_shards(output, split)
    for idx in sorted(done):
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
        atomic_write(fs, f"{root}/{name}", buf.getvalue())
    return mt, et, done


def check_job_fingerprint(output: str, fingerprint: dict) -> None:
    """Record what produced ``output`` (``_job.json``) and refuse to resume it with other settings.

    Resume is per shard, so shards written under one config and shards written under another
    would silently mix (different frame counts, sizes, sampling). ``fingerprint`` holds every
    setting that changes the content of the shards.
    """
    fs, root = fsspec.core.url_to_fs(output)
    path = f"{root}/_job.json"
    fs.invalidate_cache(root)
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
    atomic_write(fs, path, json.dumps(fingerprint, sort_keys=True).encode("utf8"))


def plan_table(ids_by_shard: list[list[str]]) -> pa.Table:
    """One row per planned item: its shard, its position in the listing and its id."""
    shard, pos, ids = [], [], []
    for i, shard_ids in enumerate(ids_by_shard):
        for j in shard_ids:
            shard.append(i)
            pos.append(len(pos))
            ids.append(j)
    return pa.table(
        {
            "shard": pa.array(shard, pa.int32()),
            "position": pa.array(pos, pa.int64()),
            "id": pa.array(ids, pa.string()),
        }
    )


def check_plan(output: str, split: str, ids_by_shard: list[list[str]]) -> None:
    """Store the shard plan at the first run (``_plan-{split}.parquet``); refuse a rerun
    whose listing would put other items into the shards."""
    fs, root = fsspec.core.url_to_fs(output)
    path = f"{root}/_plan-{split}.parquet"
    fs.invalidate_cache(root)
    new = plan_table(ids_by_shard)
    if not fs.exists(path):
        buf = io.BytesIO()
        pq.write_table(new, buf)
        atomic_write(fs, path, buf.getvalue())
        return
    with fs.open(path, "rb") as f:
        old = pq.read_table(f)
    if old.equals(new):
        return
    old_rows, new_rows = old.to_pylist(), new.to_pylist()
    first = next(
        (k for k, (a, b) in enumerate(zip(old_rows, new_rows, strict=False)) if a != b),
        min(len(old_rows), len(new_rows)),
    )
    was = old_rows[first] if first < len(old_rows) else None
    now = new_rows[first] if first < len(new_rows) else None
    raise ValueError(
        f"output {output!r} was planned from another listing of the input: it had {len(old_rows)} items in "
        f"{len(set(old.column('shard').to_pylist()))} shards, this run lists {len(new_rows)}; the first difference "
        f"is at listing position {first} (was {was and (was['id'], was['shard'])}, now {now and (now['id'], now['shard'])}). "
        "Resuming would put items into other shards (duplicates and gaps). Restore the original input "
        "to resume, or write the new listing to a new output"
    )


class OutputLock:
    """Exclusive use of one output folder by one run (see the module docstring).

    Args:
        output: the output folder (fsspec URL).
        ttl_s: a lock not renewed for this long is stale (its owner is gone); renewed every
            ``ttl_s / 4`` by a daemon thread while the run lives.
    """

    def __init__(self, output: str, ttl_s: float = 120.0):
        import os
        import socket

        self.output, self.ttl_s = output, ttl_s
        self.fs, root = fsspec.core.url_to_fs(output)
        self.path = f"{root}/_lock.json"
        self.owner = {"id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
        self._stop = None
        self._thread = None

    def _record(self) -> bytes:
        import time

        return json.dumps({**self.owner, "renewed_at": time.time()}).encode("utf8")

    def _read(self) -> dict | None:
        try:
            with self.fs.open(self.path, "rb") as f:
                return json.loads(f.read().decode("utf8"))
        except FileNotFoundError:
            return None
        except ValueError:  # a half-written lock (its writer died mid-write): stale
            return {}

    def _stale(self, held: dict) -> str | None:
        import os
        import socket
        import time

        if not held:
            return "unreadable"
        if held.get("host") == socket.gethostname():
            try:
                os.kill(int(held["pid"]), 0)
            except ProcessLookupError:
                return f"process {held['pid']} is gone"
            except PermissionError:
                pass
        age = time.time() - float(held.get("renewed_at", 0))
        return f"not renewed for {age:.0f} s" if age > self.ttl_s else None

    def _create(self) -> bool:
        try:
            with self.fs.open(self.path, "xb") as f:
                f.write(self._record())
            return True
        except FileExistsError:
            return False

    def acquire(self) -> OutputLock:
        import threading

        self.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
        self.fs.invalidate_cache(self.path.rsplit("/", 1)[0])
        if not self._create():
            held = self._read()
            why = self._stale(held) if held is not None else "released"
            if why is None:
                raise RuntimeError(
                    f"output {self.output!r} is in use by another run (pid {held.get('pid')} on "
                    f"{held.get('host')}; lock {self.path}). Wait for it to finish, or write to another output; "
                    f"if that run is dead, its lock expires {self.ttl_s:.0f} s after its last renewal"
                )
            print(f"[lock] taking over the lock on {self.output} ({why})", flush=True)
            try:
                self.fs.rm(self.path)
            except FileNotFoundError:
                pass
            if not self._create():
                raise RuntimeError(f"output {self.output!r}: another run took the lock at the same moment")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, daemon=True, name="output-lock")
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                with self.fs.open(self.path, "wb") as f:
                    f.write(self._record())
            except Exception as e:  # the next renewal tries again; the run itself goes on
                print(f"[lock] could not renew {self.path}: {type(e).__name__}: {e}", flush=True)

    def release(self) -> None:
        if self._stop is None:
            return
        self._stop.set()
        self._thread.join()
        self._stop = None
        held = self._read()
        if held and held.get("id") == self.owner["id"]:
            self.fs.rm(self.path)

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
