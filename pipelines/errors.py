"""Which failures are the input's and which are the environment's.

A job that meets a bad record keeps going and stores an error row; a job that meets a storage
timeout, throttling, expired credentials or memory pressure must *not* store an error row (the
record is fine and would be lost from every later run, since committed shards are never redone):
the work unit fails, Ray retries it (``retry_exceptions=[TransientError]``), and if the fault
persists the unit ends as failed and the job exits non-zero naming it (rerun = resume).

* :class:`RecordError` -- a property of the input (corrupt, missing, too short, bad annotation);
  becomes an error row with its ``stage``.
* :class:`TransientError` -- raised in place of an environmental error met while handling a
  record; never stored, always retried by Ray.
* :func:`is_transient` -- the classification, applied by every catch-all that turns decoder
  exceptions into :class:`RecordError`.
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


class RecordError(Exception):
    """A bad input record; ``stage`` says where it failed (read, decode, sfm, csv...)."""

    def __init__(self, stage: str, message: str):
        super().__init__(message)
        self.stage = stage


class TransientError(Exception):
    """An environmental fault met while handling a record (the cause is chained): retry the unit."""


class ShardFailedError(Exception):
    """A work unit whose environmental fault outlasted its retries (``ray.task_retries``): not
    retried again in this run; the job ends non-zero naming it, and a rerun resumes it."""


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
        if isinstance(exc, TransientError | MemoryError | TimeoutError | ConnectionError | PermissionError):
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


# errors that describe a record's content; anything else (a bug, an environmental fault) fails
# the work unit instead of being stored as that record's error row
INPUT_ERRORS = (RecordError, ValueError, FileNotFoundError, EOFError)


def as_error_row(exc: BaseException) -> bool:
    """Whether a failure while building one record becomes that record's error row."""
    return isinstance(exc, INPUT_ERRORS) and not is_transient(exc)
