"""The tie between a training worker and the API server that started it: it dies with the server.

A worker the server starts must not outlive it (after a `kill -9` of the server its workers kept
claiming jobs and promoting results). Two mechanisms, because each alone has a gap:

- `prctl(PR_SET_PDEATHSIG, SIGTERM)` (Linux): the kernel signals the worker the moment its parent
  dies. But it fires when the parent *thread* that forked the worker exits, not the process
  (prctl(2)), and it is lost if the parent died before the call.
- A pipe: the server keeps the write end (close-on-exec, so no other child holds it) and the
  worker inherits the read end and blocks reading it. The read returns end-of-file once every
  write end is closed, which the kernel does when the server process dies, however it dies, also
  before the worker got here, and on any OS.

Either way the worker gets SIGTERM, the same signal as a normal shutdown: it hands its job back to
the queue and exits. A worker started by hand (`python -m service.worker`, no `--parent-fd`) is
not tied to anything.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def tie_to_parent(read_fd: int) -> None:
    """Get SIGTERM when the server that holds the other end of `read_fd` is gone."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    thread = threading.Thread(target=_watch, args=(read_fd,), name="parent-watch", daemon=True)
    thread.start()


def _watch(read_fd: int) -> None:
    try:
        while os.read(read_fd, 1):  # the server never writes; b"" means it is gone
            pass
    except OSError:
        pass
    log.warning("the server that started this worker is gone; stopping")
    os.kill(os.getpid(), signal.SIGTERM)
