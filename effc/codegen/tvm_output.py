"""TVM's C++ log lines during a compile, kept off the user's terminal and sent to effc's log.

TVM prints warnings straight to file descriptor 2 ("BlockBuilder destroyed with remaining blocks!" after a failed
import, "Unknown pragma pragma_scope", fuse_ops notes): Python's ``sys.stderr`` redirection cannot catch them.
:func:`tvm_output_to_log` points descriptor 2 at a temporary file for the duration of a TVM call and logs what
was written at DEBUG level (``effc --debug`` / ``logging`` show it); effc's own errors carry everything the user
needs.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
import tempfile
import traceback
from collections.abc import Iterator

__all__ = ["tvm_output_to_log"]

logger = logging.getLogger("effc.tvm")


def _clear_frames(exc: BaseException | None, seen: set[int] | None = None) -> None:
    """Drop the local variables of the finished frames of ``exc`` and of its causes / contexts."""
    seen = set() if seen is None else seen
    if exc is None or id(exc) in seen:
        return
    seen.add(id(exc))
    if exc.__traceback__ is not None:
        traceback.clear_frames(exc.__traceback__)
    _clear_frames(exc.__cause__, seen)
    _clear_frames(exc.__context__, seen)


@contextlib.contextmanager
def tvm_output_to_log() -> Iterator[None]:
    """Capture what native code writes to descriptor 2 inside the block; log it at DEBUG.

    On an exception the garbage collector runs inside the block, so objects the failed call left behind (a
    BlockBuilder with open blocks) are destroyed while their warnings are still captured.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException as exc:
            _clear_frames(exc)
            gc.collect()
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            for line in sink.read().decode(errors="replace").splitlines():
                if line.strip():
                    logger.debug("%s", line)
