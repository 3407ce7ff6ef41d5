"""Reading inputs through fsspec, with retries of the storage's transient faults.

Every reader of a dataset record goes through :func:`read_bytes`: a timeout, a reset
connection, throttling or an expired credential (:func:`is_transient`) is retried with
exponential backoff and jitter (tenacity), so one flaky request neither fails a shard nor marks
a good record as bad. A fault that outlasts the attempts propagates as itself; the jobs then
fail the work unit (Ray retries it) instead of storing an error row (``pipelines.errors``).
"""

from __future__ import annotations

import errno

# errnos that say "the system, not the file": I/O errors, timeouts, resets, no memory/space.
_TRANSIENT_ERRNOS = {
    errno.EIO,
    errno.EAGAIN,
    errno.EBUSY,
    errno.EINTR,
    errno.ENOMEM,
    errno.ENOSPC,
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
    errno.ENETDOWN,
    errno.ENETUNREACH,
    errno.EHOSTUNREACH,
    errno.EPIPE,
    errno.ESTALE,
}
# client libraries of the object stores fsspec reaches: their own exceptions are about the
# connection or the credentials, never about the content of a record
_TRANSIENT_MODULES = (
    "botocore",
    "aiobotocore",
    "aiohttp",
    "urllib3",
    "requests",
    "google.auth",
    "google.api_core",
)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is the environment's fault (retry) rather than the record's (error row).

    Transient: timeouts, connection errors, ``MemoryError``, ``PermissionError`` (expired or
    missing credentials look like this through s3fs/gcsfs), ``OSError`` with an I/O, network,
    memory or space errno, and the object-store clients' own exceptions. Not transient: a
    missing file (``FileNotFoundError``), corrupt content (decoders' errors, ``ValueError``).
    """
    seen = set()
    while exc is not None and id(exc) not in seen:  # look through wrappers (PyAV, fsspec, Ray)
        seen.add(id(exc))
        if getattr(exc, "transient", False) or isinstance(
            exc, MemoryError | TimeoutError | ConnectionError | PermissionError
        ):
            return True
        if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError | IsADirectoryError):
            if exc.errno in _TRANSIENT_ERRNOS:
                return True
        if type(exc).__module__.startswith(_TRANSIENT_MODULES):
            return True
        # the explicit cause, else the exception being handled (unless `raise ... from None`
        # said the wrapper stands on its own)
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return False


def read_bytes(url: str, attempts: int = 4, max_wait_s: float = 4.0) -> bytes:
    """The whole file at ``url`` (any fsspec URL). Transient faults are retried up to
    ``attempts`` times in all (waits 0.2 s, 0.4 s, ... with jitter, at most ``max_wait_s``);
    ``FileNotFoundError`` and content errors are not retried."""
    import fsspec
    from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

    for attempt in Retrying(
        retry=retry_if_exception(is_transient),
        stop=stop_after_attempt(attempts),
        wait=wait_exponential_jitter(multiplier=0.2, max=max_wait_s),
        reraise=True,
    ):
        with attempt, fsspec.open(url, "rb") as f:
            return f.read()
    raise AssertionError("unreachable: tenacity re-raises the last error")
