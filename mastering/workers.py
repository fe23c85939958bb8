"""Worker processes for the parallel stages (scan, conversion, rendering).

Workers belong to the run that started them:

* they die with it: the kernel sends them SIGKILL when their parent dies (``PR_SET_PDEATHSIG``),
  so a run killed with ``kill -9`` leaves no process behind holding its caller's stdout pipe
  (a script or a daemon waiting on that pipe would hang for minutes);
* they leave signals to the run: a terminal sends SIGINT, and systemd SIGTERM, to the whole
  process group; the run cancels cleanly (every worker would otherwise print a traceback, or
  die under the run and break its pool) and then kills its workers;
* when the run is cancelled or fails they are killed, not waited for: they only ever write
  into the run's work folder, which goes with them.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

PR_SET_PDEATHSIG = 1


class WorkerDied(RuntimeError):
    """A worker process ended without being asked to (the OOM killer, a codec crash)."""


def _die_with(parent: int) -> None:
    """Worker initializer: SIGKILL when the parent goes; SIGINT/SIGTERM are the parent's."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the death signal was armed
        os._exit(1)


@contextlib.contextmanager
def pool(workers: int) -> Iterator[ProcessPoolExecutor]:
    """A process pool whose workers die with this process and are terminated, not waited
    for, when the block is left by an exception (cancellation among them)."""
    executor = ProcessPoolExecutor(max_workers=workers, initializer=_die_with,
                                   initargs=(os.getpid(),))
    try:
        yield executor
    except BrokenProcessPool as exc:
        _terminate(executor)
        raise WorkerDied("a worker process died unexpectedly (out of memory, or a crash in "
                         "a decoder); nothing was written") from exc
    except BaseException:
        _terminate(executor)
        raise
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _terminate(executor: ProcessPoolExecutor) -> None:
    # ProcessPoolExecutor has no public way to stop running work; its process table is
    # the documented-by-use way (CPython keeps it across 3.8-3.13)
    for proc in list(getattr(executor, "_processes", {}).values()):
        with contextlib.suppress(OSError, AttributeError):
            proc.kill()
    # A worker killed while it was writing a result leaves half a message in the result
    # pipe: the pool's manager thread then waits for the rest for ever, and shutdown() with
    # it (seen when a run is cancelled while its workers start). This process holds the
    # pipe's other write end: closed, the manager reads end-of-file, takes the pool as
    # broken and ends.
    with contextlib.suppress(OSError, AttributeError):
        executor._result_queue._writer.close()
