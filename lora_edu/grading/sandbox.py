"""Running untrusted student code with a time limit.

Two levels:

* :func:`time_limit` bounds one call *inside* the current process (used by ``check``
  for each case, so that ``while True: pass`` in a student's ``forward`` becomes a
  failed case instead of a frozen notebook).  On POSIX in the main thread it uses
  ``SIGALRM`` (re-fired every 0.25 s, so code that swallows the first exception with
  ``except Exception`` is interrupted again); elsewhere a watchdog thread raises
  :class:`CaseTimeout` asynchronously in the calling thread.  Either way Python
  can only interrupt between bytecodes: one enormous C call (a 10⁵×10⁵ matmul) runs
  to its end first.  A loop that catches ``BaseException`` forever cannot be stopped
  from inside the process; the subprocess limit below is the backstop.

* :func:`run_notebook_subprocess` grades a submitted notebook in a **separate
  process** (``python -m lora_edu.grading.sandbox``) in its own session and working
  directory, kills its whole process group when the time limit passes, and reads the
  result back from a JSON file that only that child was told about.  The grader's
  process never imports or executes student code.

Inside the child, :func:`grade_notebook` executes the code cells in an in-process
IPython shell (no kernel process to leak), skips the notebook's own self-check cells
(marked ``# SELF-CHECK``), then calls the checker itself on the objects the
exercise names (e.g. the class ``LoRALinear``) — so a notebook that simply deletes
its failing ``assert`` does not change its grade.

Limits (say so to students and colleagues): the child runs with the grader's user
rights, so a hostile notebook could still forge *its own* result or touch files the
user can write.  Submissions are copied before any of them runs and each writes
only into its own temporary directory, so one cannot change another's input or
result; for hostile settings run the grader inside a container or VM.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CaseTimeout", "time_limit", "SubmissionRun", "run_notebook_subprocess", "grade_notebook"]

SELF_CHECK_MARKER = "# SELF-CHECK"


class CaseTimeout(BaseException):
    """Raised inside student code when a case runs past its time limit.

    A ``BaseException`` so that ``except Exception`` in student code does not swallow it.
    """


# ----------------------------------------------------------------------------- in-process


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


# ----------------------------------------------------------------------------- subprocess


@dataclass
class SubmissionRun:
    """What came back from grading one notebook in its own process."""

    file: str
    result: dict | None  # CheckResult.to_dict(), or None when the child produced none
    error: str  # "" when the child finished; else why there is no (complete) result
    cell_errors: list[str]
    seconds: float
    returncode: int | None


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        if os.name == "posix":
            os.killpg(proc.pid, signal.SIGKILL)
        else:  # pragma: no cover
            proc.kill()
    except (ProcessLookupError, PermissionError, OSError):
        pass


def run_notebook_subprocess(
    notebook: str | os.PathLike,
    exercise: str | None,
    timeout: float = 120.0,
    case_timeout: float = 10.0,
    python: str | None = None,
    content: bytes | None = None,
) -> SubmissionRun:
    """Grade ``notebook`` in a fresh child process, killed (with its children) after ``timeout`` s.

    The notebook (or ``content``, its bytes read earlier) is copied into a private temporary directory, which is the child's
    working directory, and the child writes its JSON result there.  Nothing the child
    does can raise in this process: every failure becomes ``SubmissionRun.error``.
    """
    notebook = Path(notebook)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lora_edu_grade_") as tmp:
        tmp = Path(tmp)
        work = tmp / "work"
        work.mkdir()
        try:
            local = work / notebook.name
            local.write_bytes(notebook.read_bytes() if content is None else content)
        except OSError as e:
            return SubmissionRun(str(notebook), None, f"could not read the submission: {e}", [], 0.0, None)
        result_path = tmp / "result.json"  # outside the child's working directory
        log_path = tmp / "log.txt"
        cmd = [python or sys.executable, "-m", "lora_edu.grading.sandbox", str(local), "--result", str(result_path),
               "--case-timeout", str(case_timeout)]
        if exercise:
            cmd += ["--exercise", exercise]
        env = dict(os.environ)
        env["MPLBACKEND"] = "Agg"
        env.setdefault("OMP_NUM_THREADS", "1")
        env["PYTHONPATH"] = os.pathsep.join([_package_root()] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        returncode = None
        error = ""
        with open(log_path, "wb") as log:
            try:
                proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=(os.name == "posix"))
            except OSError as e:
                return SubmissionRun(str(notebook), None, f"could not start the grading process: {e}", [], 0.0, None)
            try:
                returncode = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                error = f"timed out after {timeout:g} s (an infinite loop, or far too slow); the notebook was stopped"
            finally:
                _kill_group(proc)  # also reaps anything the notebook spawned in its session
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:  # pragma: no cover
                    pass
        result, cell_errors = None, []
        try:
            payload = json.loads(result_path.read_text(encoding="utf-8"))
            result = payload.get("result")
            cell_errors = [str(e) for e in payload.get("cell_errors", [])][:50]
            if result is not None:
                _validate_result(result)
            if payload.get("error") and not error:
                error = str(payload["error"])
        except FileNotFoundError:
            if not error:
                error = f"the grading process exited with code {returncode} without a result" + _log_tail(log_path)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            result = None
            error = error or f"the result file was unreadable or malformed ({type(e).__name__}: {e})"
        if error and result is not None and "timed out" in error:
            result = None  # a partial result written before the kill is not trusted
    return SubmissionRun(str(notebook), result, error, cell_errors, time.monotonic() - start, returncode)


def _log_tail(path: Path, n: int = 400) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return ""
    return f": …{text[-n:]}" if text else ""


def _validate_result(result: dict) -> None:
    from .result import CheckResult

    r = CheckResult.from_dict(result)
    if not r.cases or not all(isinstance(c.points, (int, float)) and c.points >= 0 for c in r.cases):
        raise ValueError("no cases, or negative points")


def _package_root() -> str:
    return str(Path(__file__).resolve().parents[2])


# ----------------------------------------------------------------------------- inside the child


def _code_cells(nb_json: dict) -> list[str]:
    cells = []
    for cell in nb_json.get("cells", []):
        if cell.get("cell_type") != "code":
            continue
        src = cell.get("source", "")
        cells.append("".join(src) if isinstance(src, list) else str(src))
    return cells


def grade_notebook(path: str | os.PathLike, exercise: str | None = None, case_timeout: float = 10.0) -> dict:
    """Execute a notebook's code cells here and check the objects it defines.

    Meant to run in a throw-away process (see :func:`run_notebook_subprocess`).
    Returns ``{"result": CheckResult.to_dict() | None, "cell_errors": [...], "error": str}``.
    """
    from .checks import EXERCISES, check  # imported before any student code runs

    with open(path, encoding="utf-8") as f:
        nb_json = json.load(f)
    if exercise is None:
        exercise = (nb_json.get("metadata", {}).get("lora_edu") or {}).get("exercise")
    if exercise not in EXERCISES:
        return {"result": None, "cell_errors": [], "error": f"unknown exercise {exercise!r}; pass --exercise (one of {sorted(EXERCISES)})"}
    spec = EXERCISES[exercise]

    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.user_ns["__name__"] = "__main__"
    cell_errors: list[str] = []
    for i, src in enumerate(_code_cells(nb_json)):
        if SELF_CHECK_MARKER in src:
            continue
        try:
            res = shell.run_cell(src, store_history=False, silent=False)
        except BaseException as e:  # noqa: BLE001 - SystemExit etc. from student code
            cell_errors.append(f"cell {i}: {type(e).__name__}: {e}")
            continue
        err = res.error_before_exec or res.error_in_exec
        if err is not None:
            cell_errors.append(f"cell {i}: {type(err).__name__}: {str(err)[:300]}")
    submission = spec.collect(shell.user_ns)
    result = check(exercise, submission, timeout=case_timeout)
    return {"result": result.to_dict(), "cell_errors": cell_errors, "error": ""}


def _main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="grade one notebook (run by `lora-edu grade`, in its own process)")
    p.add_argument("notebook")
    p.add_argument("--result", required=True)
    p.add_argument("--exercise", default=None)
    p.add_argument("--case-timeout", type=float, default=10.0)
    a = p.parse_args(argv)
    result_path = a.result
    # open the result file before student code runs, so changing directory or deleting it later doesn't matter
    out = open(result_path, "w", encoding="utf-8")
    try:
        payload = grade_notebook(a.notebook, a.exercise, a.case_timeout)
    except BaseException as e:  # noqa: BLE001
        payload = {"result": None, "cell_errors": [], "error": f"grading failed: {type(e).__name__}: {e}"}
    out.write(json.dumps(payload))
    out.close()
    return 0


if __name__ == "__main__":
    sys.exit(_main())
