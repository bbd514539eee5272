"""Child processes that end with their parent (Linux ``prctl(PR_SET_PDEATHSIG)``).

Killing ``dvc repro``, a KFP launcher or the deploy step with SIGKILL gives them no chance
to stop what they started: a training run, the S3 dev server or the smoke test's model server
would run on as an orphan. The kernel can send a signal when the parent dies; these helpers
ask for it, in the current process (:func:`set_parent_death_signal`) or in a child between
fork and exec (:func:`die_with_parent_preexec`). Elsewhere than Linux they do nothing.
"""

from __future__ import annotations

import ctypes
import functools
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

PR_SET_PDEATHSIG = 1
PR_GET_PDEATHSIG = 2


@functools.cache
def libc() -> Any:
    """The C library, for prctl; None off Linux or where it cannot be loaded."""
    if sys.platform != "linux":
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - a libc without dlopen(NULL)
        return None


def parent_death_signal() -> int:
    """The signal this process gets when its parent dies (0: none, or not Linux)."""
    lib = libc()
    if lib is None:
        return 0
    value = ctypes.c_int(0)
    lib.prctl(PR_GET_PDEATHSIG, ctypes.byref(value))
    return value.value


def set_parent_death_signal(signum: int) -> None:
    """Ask for ``signum`` when the parent (thread) dies; 0 cancels. No-op off Linux."""
    lib = libc()
    if lib is not None:
        lib.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signum))


def _preexec() -> None:
    libc().prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGTERM))


def die_with_parent_preexec() -> Callable[[], None] | None:
    """A ``preexec_fn`` for :class:`subprocess.Popen` giving the child SIGTERM when we die.

    None where it cannot work: off Linux, or off the main thread (the death signal follows
    the *thread* that forked, and a worker thread may end long before the process).
    """
    if libc() is None or threading.current_thread() is not threading.main_thread():
        return None
    return _preexec
