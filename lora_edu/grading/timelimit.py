"""A time limit for one call inside the current process.

:func:`time_limit` bounds one case of a check, so that ``while True: pass`` in a
student's ``forward`` becomes a failed case instead of a frozen notebook.  On POSIX
in the main thread it uses ``SIGALRM`` (re-fired every 0.25 s, so code that swallows
the first exception with ``except Exception`` is interrupted again); elsewhere a
watchdog thread raises :class:`CaseTimeout` asynchronously in the calling thread.
Either way Python can only interrupt between bytecodes: one enormous C call runs to
its end first, and a loop that catches ``BaseException`` forever cannot be stopped
from inside the process.  The per-submission process of ``lora-edu grade`` (see
:mod:`.sandbox`), killed as a whole process tree, is the backstop.
"""
from __future__ import annotations

import ctypes
import signal
import threading
import time
from contextlib import contextmanager

__all__ = ["CaseTimeout", "time_limit"]


class CaseTimeout(BaseException):
    """Raised inside student code when a case runs past its time limit.

    A ``BaseException`` so that ``except Exception`` in student code does not swallow it.
    """


@contextmanager
def time_limit(seconds: float | None):
    """Raise :class:`CaseTimeout` in the calling thread if the block runs longer than ``seconds``."""
    if not seconds or seconds <= 0:
        yield
        return
    use_signal = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if use_signal:
        try:
            old_handler = signal.getsignal(signal.SIGALRM)
            old_timer = signal.getitimer(signal.ITIMER_REAL)
        except (ValueError, OSError):  # pragma: no cover - exotic embedding
            use_signal = False
    if not use_signal:
        with _thread_time_limit(seconds):
            yield
        return
    if old_timer[0] > 0:  # someone else's alarm is pending: don't clobber it, use the thread fallback
        with _thread_time_limit(seconds):
            yield
        return

    state = {"active": True}

    def _handler(signum, frame):
        if state["active"]:
            raise CaseTimeout(f"timed out after {seconds:g} s")

    signal.signal(signal.SIGALRM, _handler)
    signal.setitimer(signal.ITIMER_REAL, seconds, 0.25)
    try:
        yield
    finally:
        while True:  # a late alarm may interrupt the clean-up itself: retry until it is done
            try:
                state["active"] = False
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, old_handler)
                break
            except CaseTimeout:
                continue


def _async_raise(thread_id: int, exc_type) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exc_type))


@contextmanager
def _thread_time_limit(seconds: float):
    target = threading.get_ident()
    done = threading.Event()
    lock = threading.Lock()

    def watchdog():
        deadline = time.monotonic() + seconds
        while not done.wait(max(0.0, deadline - time.monotonic())):
            with lock:
                if done.is_set():
                    return
                _async_raise(target, CaseTimeout)
            deadline = time.monotonic() + 0.25  # fire again if the first one was swallowed

    t = threading.Thread(target=watchdog, daemon=True, name="lora_edu-grading-watchdog")
    t.start()
    try:
        yield
    finally:
        while True:
            try:
                with lock:
                    done.set()
                    # clear a CaseTimeout queued just before `done` was set (NULL clears)
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(target), None)
                break
            except CaseTimeout:
                continue
        try:
            t.join()
        except CaseTimeout:  # pragma: no cover - raised just before the lock was taken
            pass
