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

from mvcustom.data.storage import is_transient

__all__ = ["RecordError", "ShardFailedError", "TransientError", "as_error_row", "is_transient"]


class RecordError(Exception):
    """A bad input record; ``stage`` says where it failed (read, decode, sfm, csv...)."""

    def __init__(self, stage: str, message: str):
        super().__init__(message)
        self.stage = stage


class TransientError(Exception):
    """An environmental fault met while handling a record (the cause is chained): retry the unit."""

    transient = True  # what mvcustom.data.storage.is_transient looks for


class ShardFailedError(Exception):
    """A work unit whose environmental fault outlasted its retries (``ray.task_retries``): not
    retried again in this run; the job ends non-zero naming it, and a rerun resumes it."""


# errors that describe a record's content; anything else (a bug, an environmental fault) fails
# the work unit instead of being stored as that record's error row
INPUT_ERRORS = (RecordError, ValueError, FileNotFoundError, EOFError)


def as_error_row(exc: BaseException) -> bool:
    """Whether a failure while building one record becomes that record's error row."""
    return isinstance(exc, INPUT_ERRORS) and not is_transient(exc)
