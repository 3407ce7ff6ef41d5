"""A local filesystem whose storage misbehaves, for the failure-semantics drills.

``flaky:///abs/path`` is the local file ``/abs/path``. Faults, set through environment variables
(which reach Ray workers through the runtime env):

* ``FLAKY_STATE``: a folder; the *first* open of each file for reading raises ``TimeoutError``
  (the folder records which files were opened once, across processes), later opens work.
* ``FLAKY_ALWAYS``: opens of paths containing this text always raise ``TimeoutError`` (a fault
  that persists).

Ray workers register the protocol through ``worker_process_setup_hook="tests.flaky_fs.register"``.
"""

from __future__ import annotations

import hashlib
import os

import fsspec
from fsspec.implementations.local import LocalFileSystem


class FlakyFileSystem(LocalFileSystem):
    protocol = "flaky"

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        if path.startswith("flaky://"):
            path = path[len("flaky://") :]
        return super()._strip_protocol(path)

    def _open(self, path, mode="rb", **kwargs):
        path = self._strip_protocol(path)
        if "r" in mode and not os.path.isdir(path):
            always = os.environ.get("FLAKY_ALWAYS")
            if always and always in path:
                raise TimeoutError(f"simulated storage timeout (persistent) reading {path}")
            state = os.environ.get("FLAKY_STATE")
            if state and os.path.exists(path):
                mark = os.path.join(state, hashlib.sha1(path.encode()).hexdigest())
                try:
                    fd = os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    pass  # opened once before: this open works
                else:
                    os.close(fd)
                    raise TimeoutError(f"simulated storage timeout (first open) reading {path}")
        return super()._open(path, mode=mode, **kwargs)


def register() -> None:
    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
