"""Grade one submitted notebook in its own process: isolated, limited, killed as a whole tree.

The grader (``lora-edu grade``, :func:`run_submission`) never imports or executes
student code.  For each submission it

1. makes a private temporary folder holding only that notebook (under a random name)
   and a fresh copy of the ``lora_edu`` package that the child imports — so a notebook
   that edits "the grading code" edits a copy that is thrown away;
2. starts ``python -I`` there in **its own session**, with a clean environment, and —
   when the grader runs as root — as the unprivileged user ``nobody`` (no supplementary
   groups), so the submission cannot write the grader's files, the real package, the
   other notebooks or the grade file;
3. hands it its settings through a pipe on stdin (nothing on the command line or in
   the environment, which other processes can read in ``/proc``): the exercise, the
   hidden variant (the grading secret itself never leaves the grader), limits, and a
   fresh random key;
4. lets the child apply resource limits to itself before any student code runs
   (address space, file size, CPU seconds, processes, no core files);
5. reads the child's output through a pipe and keeps at most ``output_cap`` bytes
   (the rest is read and dropped, never written to disk);
6. accepts the result only as one frame on a pipe it created, authenticated with the
   key (HMAC-SHA256): text the notebook prints, files it writes, a second frame or a
   frame without the right MAC are not results;
7. when the child ends or runs out of time, kills the whole tree: every process of the
   child's session, every descendant, and — the grader being their "subreaper" while
   it grades — every orphan the child left behind that carries its mark, runs as
   ``nobody``, or stayed in its session.

Inside the child (:func:`child_main`): the checker is imported and a
:class:`~.integrity.CheckerSnapshot` taken before the notebook's code cells run in an
IPython shell (errors recorded, never stopping the run; the notebook's own self-check
and graded cells are skipped: the grader calls the checker itself on the objects the
exercise names); the snapshot is compared again after the cells and after the check.

What this does not do: a process that runs untrusted code can read its own memory, so
a determined student can extract the key and forge *their own* result; a grader not
running as root cannot drop privileges, so the child then has the instructor's rights (a root
grader that cannot run the child as ``nobody`` refuses, unless ``Limits.allow_root`` /
``lora-edu grade --allow-root`` says it runs in a throwaway container);
the network is not cut off.  A container per submission is the stronger option
(docs/instructors.md says how).
"""
from __future__ import annotations

import ctypes
import hashlib
import hmac
import json
import os
import secrets
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .checks import EXERCISES, check
from .integrity import CheckerSnapshot, answer_flags, package_root, result_tampering, take_reference_instances, tree_fingerprint
from .notebooks import GRADED_MARKER, SELF_CHECK_MARKER, code_cells
from .result import CheckResult

__all__ = ["FRAME", "Limits", "SubmissionRun", "run_submission", "pristine_package", "child_main", "kill_tree", "subreaper", "verify_frame"]

NOBODY = 65534
FRAME = struct.Struct(">Q")  # payload length, then 32 bytes of MAC, then the payload
MAX_RESULT_BYTES = 4 << 20
_PR_SET_CHILD_SUBREAPER = 36


@dataclass
class Limits:
    """Per-submission limits."""

    timeout: float = 300.0  # wall-clock seconds for the whole notebook and its check
    case_timeout: float = 10.0  # seconds per checker case
    memory_mb: int = 4096  # address space (RLIMIT_AS)
    file_mb: int = 64  # largest file the child may write (RLIMIT_FSIZE)
    nproc: int = 256  # processes and threads of the unprivileged user (RLIMIT_NPROC; only when dropped to nobody)
    output_cap: int = 32 * 1024  # bytes of the child's stdout/stderr kept
    drop_to: int | None = None  # uid to run as; None: nobody when the grader is root, else unchanged
    allow_root: bool = False  # a root grader that cannot drop to that user runs the submission as root instead of refusing

    def __post_init__(self) -> None:
        if not isinstance(self.allow_root, bool):
            raise TypeError(f"Limits.allow_root must be True or False, got {self.allow_root!r}")
        if self.drop_to is not None and (isinstance(self.drop_to, bool) or not isinstance(self.drop_to, int) or self.drop_to < 0):
            raise ValueError(f"Limits.drop_to must be a user id (int >= 0) or None, got {self.drop_to!r}")
        if self.drop_to == 0 and not self.allow_root:
            raise ValueError("Limits.drop_to=0 runs submissions as root; pass allow_root=True as well if that is really meant "
                             "(only inside a throwaway container)")


@dataclass
class SubmissionRun:
    """What came back from grading one notebook in its own process."""

    result: dict | None  # CheckResult.to_dict(), or None when the child produced no valid result
    error: str  # "" when the child finished; else why there is no (complete) result
    cell_errors: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)  # integrity problems found by the child or by this process
    output: str = ""  # the child's stdout+stderr, capped
    output_bytes: int = 0  # how much it wrote in all
    seconds: float = 0.0
    returncode: int | None = None
    user: str = ""  # who the child ran as
    package_changed: bool = False  # the child's copy of lora_edu differed afterwards (it edited "the grading code")


# ----------------------------------------------------------------------------- the grader's side

_LIVE_ROOTS: set[int] = set()
_LIVE_LOCK = threading.Lock()


@contextmanager
def pristine_package():
    """A read-only copy of the ``lora_edu`` package taken once per grading run; yields its folder.

    Each submission gets its own copy of this copy, so neither a submission nor anyone
    editing the installed package meanwhile changes what later submissions are graded with.
    """
    tmp = Path(tempfile.mkdtemp(prefix="lora_edu_grading_code_"))
    try:
        pkg = tmp / "lora_edu"
        shutil.copytree(package_root(), pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), symlinks=True)
        _read_only(tmp)
        yield pkg
    finally:
        _remove_tree(tmp)


def run_submission(content: bytes, filename: str, exercise: str, variant: int, limits: Limits | None = None,
                   package: Path | None = None) -> SubmissionRun:
    """Grade one notebook (its bytes ``content``) in a fresh child process; never raises because of it.

    ``package`` is the ``lora_edu`` folder the child's private copy is made from (default: the installed one).
    """
    limits = limits or Limits()
    start = time.monotonic()
    uid, python, why_not, refusal = plan_child(limits)
    if refusal:
        return SubmissionRun(result=None, error=refusal, seconds=time.monotonic() - start, user="not run")
    tmp = Path(tempfile.mkdtemp(prefix="lora_edu_grade_"))
    try:
        run = _run_in(tmp, content, filename, exercise, variant, limits, uid, start, python, package or package_root())
    finally:
        _remove_tree(tmp)
    if why_not and uid is None:
        run.user += f" (could not run as nobody: {why_not})"
    return run


def _open_to_others(path: str, need_read: bool = True) -> bool:
    """Whether a user with no relation to the owners can reach ``path`` (every folder searchable, the file readable)."""
    p = Path(os.path.realpath(path))
    try:
        for d in [*reversed(p.parents)]:
            if not os.stat(d).st_mode & stat.S_IXOTH:
                return False
        mode = os.stat(p).st_mode
    except OSError:
        return False
    return bool(mode & stat.S_IROTH) if need_read else True


def plan_child(limits: Limits) -> tuple[int | None, str, str, str]:
    """(uid, python, why_not, refusal): the user a submission runs as (None: the grader's), the Python it runs with,
    why it cannot run as ``nobody`` ("" if it can), and why it is not run at all ("" unless a root grader would have to
    run it as root without ``limits.allow_root``)."""
    uid = limits.drop_to if limits.drop_to is not None else (NOBODY if os.geteuid() == 0 else None)
    if uid is not None and os.geteuid() != 0:
        uid = None
    python, why_not = child_interpreter(uid)
    if python is None:
        if os.geteuid() == 0 and not limits.allow_root:  # the submission would run with root's rights: refuse
            return uid, "", why_not, root_refusal(why_not)
        uid, python = None, sys.executable
    return uid, python, why_not, ""


def root_refusal(why_not: str) -> str:
    """Why a root grader does not run submissions, and what to do."""
    return (f"not run: the grader is root and cannot run submissions as nobody ({why_not}), so they would run with root's "
            "rights. Make the Python environment readable by others (e.g. chmod -R o+rX on the virtual environment), or grade "
            "inside a throwaway container with --allow-root")


def child_interpreter(uid: int | None) -> tuple[str | None, str]:
    """A Python that the child's user can run: this one, or the same version elsewhere on the system.

    The child imports the grader's site-packages (they must be readable by that user too).
    Returns (path, "") or (None, why not).
    """
    if uid is None:
        return sys.executable, ""
    sites = _site_dirs()
    if not all(_open_to_others(d) for d in sites):
        return None, f"the Python packages in {sites} are not readable by other users"
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [sys.executable, f"/usr/bin/python{ver}", f"/usr/local/bin/python{ver}", shutil.which(f"python{ver}") or ""]
    for c in candidates:
        if c and os.path.exists(c) and _open_to_others(c) and os.stat(os.path.realpath(c)).st_mode & stat.S_IXOTH:
            return c, ""
    return None, f"no Python {ver} interpreter is reachable by other users ({sys.executable} is not)"


def _site_dirs() -> list[str]:
    return [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and os.path.isdir(p)]


def _run_in(tmp: Path, content, filename, exercise, variant, limits: Limits, uid, start, python: str, source_pkg: Path) -> SubmissionRun:
    os.chmod(tmp, 0o711)  # the child may pass through, not list
    pkg_parent = tmp / "pkg"
    pkg = pkg_parent / "lora_edu"
    shutil.copytree(source_pkg, pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), symlinks=True)
    _read_only(pkg_parent)
    pkg_before = tree_fingerprint(pkg)
    work = tmp / secrets.token_hex(8)
    work.mkdir(mode=0o700)
    nb_path = work / (Path(filename).name or "submission.ipynb")
    nb_path.write_bytes(content)
    if uid is not None:
        os.chown(work, uid, uid)
        os.chown(nb_path, uid, uid)
    key = secrets.token_bytes(32)
    mark = secrets.token_hex(12)
    wall_start = time.time() - 1.0
    res_r, res_w = os.pipe()
    cfg_r, cfg_w = os.pipe()
    out_r, out_w = os.pipe()
    private_tmp = work / "tmp"  # the child's TMPDIR: inside its folder, removed with it
    private_tmp.mkdir(mode=0o700)
    if uid is not None:
        os.chown(private_tmp, uid, uid)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(work), "TMPDIR": str(private_tmp), "MPLBACKEND": "Agg",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
           "LORA_EDU_GRADING_MARK": mark}
    boot = ("import sys, site, json; d = json.loads(sys.argv[2]); [site.addsitedir(x) for x in d]; "
            "sys.path[:] = [sys.argv[1], *d, *(p for p in sys.path if p not in d)]; "
            "from lora_edu.grading.sandbox import child_main; child_main()")
    kwargs = {}
    if uid is not None:
        kwargs = {"user": uid, "group": uid, "extra_groups": []}
    try:
        with _LIVE_LOCK:  # registered before any tree kill can look: a sibling's kill never mistakes it for an orphan
            proc = subprocess.Popen([python, "-I", "-c", boot, str(pkg_parent), json.dumps(_site_dirs())], cwd=work, env=env,
                                    stdin=cfg_r, stdout=out_w, stderr=out_w, pass_fds=(res_w,), start_new_session=True, umask=0o077,
                                    **kwargs)
            _LIVE_ROOTS.add(proc.pid)
    except OSError as e:
        for fd in (res_r, res_w, cfg_r, cfg_w, out_r, out_w):
            os.close(fd)
        return SubmissionRun(None, f"could not start the grading process: {e}", seconds=time.monotonic() - start)
    for fd in (res_w, cfg_r, out_w):
        os.close(fd)
    config = {"key": key.hex(), "result_fd": res_w, "notebook": nb_path.name, "exercise": exercise, "variant": variant,
              "case_timeout": limits.case_timeout, "memory_mb": limits.memory_mb, "file_mb": limits.file_mb,
              "cpu_s": int(limits.timeout) + 5, "nproc": limits.nproc if uid is not None else None}
    try:
        os.write(cfg_w, json.dumps(config).encode())
    except OSError:
        pass
    finally:
        os.close(cfg_w)
    output = _Drain(out_r, limits.output_cap)
    frames = _Drain(res_r, MAX_RESULT_BYTES)
    error = ""
    try:
        returncode = proc.wait(timeout=limits.timeout)
    except subprocess.TimeoutExpired:
        returncode = None
        error = f"timed out after {limits.timeout:g} s (an infinite loop, or far too slow); the notebook was stopped"
    finally:
        kill_tree(proc.pid, mark, uid)
        with _LIVE_LOCK:
            _LIVE_ROOTS.discard(proc.pid)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass
        if uid is not None:
            remove_left_files(uid, wall_start)
    output.join(5)
    frames.join(5)
    run = SubmissionRun(None, error, output=output.text(), output_bytes=output.total, returncode=returncode,
                        user="nobody" if uid == NOBODY else (str(uid) if uid is not None else "the grader's user"))
    try:
        run.package_changed = tree_fingerprint(pkg) != pkg_before
    except OSError:
        run.package_changed = True
    if run.package_changed:
        run.flags.append("the notebook changed the grading code (its private copy of lora_edu; the installed package is checked separately)")
    if returncode is not None and returncode < 0 and not error:
        run.error = f"the grading process was killed by signal {-returncode} (memory, CPU or file-size limit?)"
    payload, frame_error = verify_frame(frames.data, key)
    if frame_error:
        run.flags.append(frame_error)
    if payload is None:
        if not run.error:
            run.error = frame_error or f"the grading process exited with code {returncode} without a result"
        run.seconds = time.monotonic() - start
        return run
    if error:  # a result written before a timeout kill is not trusted
        run.seconds = time.monotonic() - start
        return run
    run.result = payload.get("result")
    run.cell_errors = [str(e)[:400] for e in payload.get("cell_errors", [])][:50]
    run.flags += [str(f)[:400] for f in payload.get("flags", [])][:50]
    if payload.get("error"):
        run.error = str(payload["error"])[:1000]
    run.seconds = time.monotonic() - start
    return run


SHARED_TMP = ("/tmp", "/dev/shm", "/var/tmp")


def remove_left_files(uid: int, since: float, roots: tuple[str, ...] = SHARED_TMP) -> list[str]:
    """Remove what the sandbox user ``uid`` left in the shared temporary folders since ``since`` (only its own entries).

    Only called when the child ran as an unprivileged user of its own (``nobody``): every
    entry owned by that user and changed after the submission started goes, nothing else.
    """
    removed = []
    for root in roots:
        try:
            entries = list(os.scandir(root))
        except OSError:
            continue
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if st.st_uid != uid or max(st.st_ctime, st.st_mtime) < since:
                continue
            try:
                if e.is_dir(follow_symlinks=False):
                    _remove_tree(Path(e.path))
                else:
                    os.unlink(e.path)
                removed.append(e.path)
            except OSError:
                pass
    return removed


def verify_frame(data: bytes, key: bytes) -> tuple[dict | None, str]:
    """The one authenticated frame on the result pipe, or (None, why not)."""
    if not data:
        return None, ""
    if len(data) < FRAME.size + 32:
        return None, "something other than the grader wrote to the result channel (a short frame)"
    (n,) = FRAME.unpack(data[: FRAME.size])
    mac = data[FRAME.size: FRAME.size + 32]
    body = data[FRAME.size + 32: FRAME.size + 32 + n]
    extra = data[FRAME.size + 32 + n:]
    if len(body) != n or not hmac.compare_digest(mac, hmac.new(key, body, hashlib.sha256).digest()):
        return None, "a forged result: the frame on the result channel does not carry the grader's key"
    if extra:
        return None, "the result channel carried more than one result (the notebook wrote to it)"
    try:
        payload = json.loads(body.decode("utf-8"))
        if not isinstance(payload, dict):
            raise ValueError("not an object")
        if payload.get("result") is not None:
            _validate_result(payload["result"])
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as e:
        return None, f"the result was malformed ({type(e).__name__}: {str(e)[:200]})"
    return payload, ""


def _validate_result(result: dict) -> None:
    r = CheckResult.from_dict(result)
    if not r.cases or not all(isinstance(c.points, (int, float)) and c.points >= 0 for c in r.cases):
        raise ValueError("no cases, or negative points")


class _Drain(threading.Thread):
    """Read a pipe to its end, keeping at most ``cap`` bytes (the rest is counted and dropped)."""

    def __init__(self, fd: int, cap: int):
        super().__init__(daemon=True)
        self.fd, self.cap, self.total = fd, cap, 0
        self.chunks: list[bytes] = []
        self.kept = 0
        self.start()

    def run(self) -> None:
        try:
            while True:
                b = os.read(self.fd, 65536)
                if not b:
                    break
                self.total += len(b)
                if self.kept < self.cap:
                    b = b[: self.cap - self.kept]
                    self.chunks.append(b)
                    self.kept += len(b)
        except OSError:
            pass
        finally:
            os.close(self.fd)

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks) if self.total <= self.cap else b"".join(self.chunks) + b"\0TRUNCATED"

    def text(self) -> str:
        s = b"".join(self.chunks).decode("utf-8", errors="replace")
        if self.total > self.cap:
            s += f"\n… [output cut: {self.total:,} bytes written, the first {self.cap:,} kept]"
        return s


def _read_only(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for f in filenames:
            os.chmod(Path(dirpath) / f, 0o644)
        os.chmod(dirpath, 0o755)


def _remove_tree(path: Path) -> None:
    def onerror(func, p, exc):  # a read-only folder or a file the child made read-only
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, stat.S_IRWXU)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=onerror)


# ----------------------------------------------------------------------------- killing a whole tree


def _proc_table() -> dict[int, tuple[int, int, int]]:
    """pid -> (ppid, session id, real uid), from /proc."""
    table = {}
    try:
        pids = [int(d) for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return table
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                st = f.read().decode(errors="replace")
            fields = st[st.rindex(")") + 2:].split()
            ppid, sid = int(fields[1]), int(fields[3])
            uid = os.stat(f"/proc/{pid}").st_uid
        except (OSError, ValueError, IndexError):
            continue
        table[pid] = (ppid, sid, uid)
    return table


def _mark_of(pid: int) -> str | None:
    """The submission mark in a process's environment (None: none, or unreadable)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for item in f.read().split(b"\0"):
                if item.startswith(b"LORA_EDU_GRADING_MARK="):
                    return item.split(b"=", 1)[1].decode(errors="replace")
    except OSError:
        pass
    return None


def _set_subreaper(on: bool) -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1 if on else 0, 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover
            pass


class subreaper:
    """While grading, orphans of the children are re-parented to this process, so :func:`kill_tree` finds them."""

    def __enter__(self):
        _set_subreaper(True)
        return self

    def __exit__(self, *exc):
        _set_subreaper(False)
        return False


def kill_tree(root: int, mark: str, uid: int | None) -> None:
    """SIGKILL ``root`` and everything it started: descendants, its session, and orphans it left behind."""
    me = os.getpid()
    sid = root  # start_new_session: the child's session id is its pid
    if os.name != "posix":  # pragma: no cover
        return
    for _ in range(50):
        with _LIVE_LOCK:  # no sibling starts while we decide and kill
            doomed = _doomed(root, sid, me, mark, uid, _LIVE_ROOTS - {root})
            if doomed is None:  # no /proc: fall back to the session's process group
                try:
                    os.killpg(root, signal.SIGKILL)
                except OSError:
                    pass
                return
            for pid in doomed:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        if not doomed:
            return
        for pid in doomed:
            if pid != root:
                try:
                    os.waitpid(pid, os.WNOHANG)
                except (ChildProcessError, OSError):
                    pass
        time.sleep(0.02)


def _doomed(root: int, sid: int, me: int, mark: str, uid: int | None, others: set[int]) -> list[int] | None:
    table = _proc_table()
    if not table:
        return None
    doomed = []
    for pid, (ppid, psid, puid) in table.items():
        if pid == me:
            continue
        chain, p = [], pid
        while p in table and p not in chain and p not in (0, 1, me):
            chain.append(p)
            p = table[p][0]
        if root in chain or psid == sid:
            doomed.append(pid)
        elif any(o in chain for o in others) or p != me or pid in others:
            continue
        else:  # an orphan re-parented to us (subreaper): ours if it carries our mark, or no mark and runs as the child's user
            m = _mark_of(pid)
            if m == mark or (m is None and uid is not None and puid == uid):
                doomed.append(pid)
    return doomed


# ----------------------------------------------------------------------------- inside the child


def _apply_limits(cfg: dict) -> None:
    import resource

    def lim(which, value):
        try:
            soft, hard = resource.getrlimit(which)
            value = value if hard == resource.RLIM_INFINITY else min(value, hard)
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):
            pass

    lim(resource.RLIMIT_AS, int(cfg["memory_mb"]) << 20)
    lim(resource.RLIMIT_FSIZE, int(cfg["file_mb"]) << 20)
    lim(resource.RLIMIT_CPU, int(cfg["cpu_s"]))
    lim(resource.RLIMIT_CORE, 0)
    if cfg.get("nproc"):
        lim(resource.RLIMIT_NPROC, int(cfg["nproc"]))


def child_main() -> None:
    """Run by ``python -I -c`` in the submission's folder: read settings from stdin, grade, write one signed frame."""
    cfg = json.loads(sys.stdin.buffer.read().decode())
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    _apply_limits(cfg)
    key = bytes.fromhex(cfg.pop("key"))
    fd = int(cfg["result_fd"])

    def send(payload: dict) -> None:
        body = json.dumps(payload, default=str).encode("utf-8")
        frame = FRAME.pack(len(body)) + hmac.new(key, body, hashlib.sha256).digest() + body
        view = memoryview(frame)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.close(fd)

    try:
        payload = grade_in_this_process(cfg["notebook"], cfg["exercise"], int(cfg["variant"]), float(cfg["case_timeout"]))
    except BaseException as e:  # noqa: BLE001 - the student's code may raise anything, even SystemExit
        payload = {"result": None, "cell_errors": [], "flags": [], "error": f"grading failed: {type(e).__name__}: {e}"}
    try:
        send(payload)
    finally:
        sys.stdout.flush()
        os._exit(0)  # no atexit handlers, no finalizers of the student's objects


def grade_in_this_process(notebook: str, exercise: str, variant: int, case_timeout: float) -> dict:
    """Execute a notebook's code cells here and check the objects it defines (in a throw-away process only)."""
    spec = EXERCISES[exercise]
    snapshot = CheckerSnapshot(EXERCISES)  # before any student code
    with open(notebook, encoding="utf-8") as f:
        nb = json.load(f)

    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance(colors="nocolor")
    shell.user_ns["__name__"] = "__main__"
    cell_errors: list[str] = []
    for k, src in enumerate(code_cells(nb), start=1):
        shell.execution_count = k  # the In [k] Jupyter shows after Restart & Run All
        if SELF_CHECK_MARKER in src or GRADED_MARKER in src:
            continue
        try:
            res = shell.run_cell(src, store_history=True, silent=False)
        except BaseException as e:  # noqa: BLE001 - SystemExit etc. from student code
            cell_errors.append(f"In [{k}]: {type(e).__name__}: {str(e)[:300]}")
            continue
        err = res.error_before_exec or res.error_in_exec
        if err is not None:
            cell_errors.append(f"In [{k}]: {type(err).__name__}: {str(err)[:300]}")
    flags = answer_flags(shell.user_ns, spec)
    changed = snapshot.changes()
    submission = spec.collect(shell.user_ns)
    result = check(exercise, submission, timeout=case_timeout, seed=variant)
    changed_later = [c for c in snapshot.changes() if c not in changed]
    flags += take_reference_instances() + result_tampering(result, spec)
    if changed:
        flags.append(f"the notebook changed the checker's objects before the check ran: {', '.join(changed[:6])}"
                     + (" …" if len(changed) > 6 else ""))
    if changed_later:
        flags.append(f"the notebook's code changed the checker's objects while the check ran: {', '.join(changed_later[:6])}"
                     + (" …" if len(changed_later) > 6 else ""))
    return {"result": result.to_dict(), "cell_errors": cell_errors, "flags": flags, "error": "",
            "checker_changed": bool(changed or changed_later)}
