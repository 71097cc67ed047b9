"""``check(exercise, submission)``: the one entry point students call; ``graded(...)`` for grade cells.

Each exercise lives in its own module (``ex_*.py``) as an :class:`~.battery.Exercise`
with its cases; this module gathers them into :data:`EXERCISES`.

Two variants of every battery:

* the **self-check** (``check(...)``, variant 0): the same shapes and values every
  time, so a student sees reproducible feedback;
* the **hidden** variant (``check(..., secret=...)``, ``graded(...)``, ``lora-edu grade``):
  shapes, seeds and values drawn from an instructor secret at grade time, so a
  notebook that hard-codes the self-check's answers fails it.
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from . import ex_delta_analysis, ex_inject_train, ex_lora_linear, ex_merge_precision, ex_param_savings
from .battery import Exercise, run_exercise
from .result import CheckResult

EXERCISES: dict[str, Exercise] = {
    m.EXERCISE.name: m.EXERCISE
    for m in (ex_lora_linear, ex_inject_train, ex_merge_precision, ex_param_savings, ex_delta_analysis)
}

SECRET_ENV = "LORA_EDU_GRADING_SECRET"
_SECRET_BOX: list[str] = []


def env_secret() -> str | None:
    """The grading secret from ``$LORA_EDU_GRADING_SECRET``, removed from ``os.environ`` as soon as it is read.

    Called when this module is imported, so in an nbgrader kernel the variable is gone
    from ``os.environ`` before the first student cell runs (the locked import cell comes
    first).  The process's initial environment block (``/proc/self/environ``) still holds
    it: reading ``/proc`` is flagged; docs/instructors.md says what this does not protect.
    """
    s = os.environ.pop(SECRET_ENV, None)
    if s:
        _SECRET_BOX[:] = [s]
    return _SECRET_BOX[0] if _SECRET_BOX else None


env_secret()


def variant_for(secret: str | bytes, exercise: str, student: str = "") -> int:
    """The hidden variant of ``exercise`` for a grading secret (and a student): a positive 62-bit integer.

    With ``student`` the variant is the student's own, so the feedback one student reads
    (shapes, values) does not reveal the hidden inputs of the rest of the class.
    """
    key = secret.encode() if isinstance(secret, str) else bytes(secret)
    msg = exercise.encode() + (b"\0" + student.encode() if student else b"")
    digest = hmac.new(key, msg, hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") % (2**62 - 1) + 1


def check(exercise: str, submission: Any, *, timeout: float | None = 10.0, seed: int = 0,
          secret: str | bytes | None = None) -> CheckResult:
    """Run the battery of cases of ``exercise`` on ``submission`` and return a :class:`CheckResult`.

    ``submission`` is what the exercise asks for: for ``"lora_linear"`` the class
    itself (``check("lora_linear", LoRALinear)``); for the others a dict of the
    names the notebook's check cell lists.  ``timeout`` bounds each case (seconds).
    ``secret`` runs the hidden variant drawn from it (``seed`` picks a variant directly).
    Never raises because of the submission: every problem becomes a failed case.
    """
    if exercise not in EXERCISES:
        raise ValueError(f"unknown exercise {exercise!r}; choose from {sorted(EXERCISES)}")
    if secret is not None:
        seed = variant_for(secret, exercise)
    return run_exercise(EXERCISES[exercise], submission, timeout=timeout, seed=seed)


_KERNEL_SNAPSHOT: list = []  # the checker as it was when lora_edu.grading was imported under nbgrader autograde


def arm_kernel_snapshot() -> None:
    """Under ``nbgrader autograde`` take the checker snapshot now: the grading package was just imported, before any student cell."""
    if os.environ.get("NBGRADER_EXECUTION") == "autograde" and not _KERNEL_SNAPSHOT:
        from .integrity import CheckerSnapshot

        _KERNEL_SNAPSHOT.append(CheckerSnapshot(EXERCISES))


def _grading_now() -> bool:
    return os.environ.get("NBGRADER_EXECUTION") == "autograde" or bool(_SECRET_BOX) or bool(os.environ.get(SECRET_ENV))


def _nbgrader_student() -> str:
    """nbgrader autograde runs a notebook in autograded/<student>/<assignment>/: the student's id, else ""."""
    cwd = Path.cwd()
    return cwd.parent.name if cwd.parent.parent.name == "autograded" else ""


def _notebook_here(exercise: str) -> dict | None:
    """The notebook being graded, read from the kernel's folder (nbgrader writes it there before running it)."""
    for p in sorted(Path.cwd().glob("*.ipynb")):
        try:
            nb = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        meta = nb.get("metadata", {}).get("lora_edu", {}) if isinstance(nb, dict) else {}
        if isinstance(meta, dict) and meta.get("exercise") == exercise:
            return nb
    return None


def _kernel_evidence(exercise: str) -> tuple[list[str], list[str], dict]:
    """(integrity flags, notes, the notebook's namespace) from the running IPython kernel, as far as it can tell."""
    from .integrity import answer_flags, source_flags
    from .notebooks import GRADED_MARKER, code_cells

    spec = EXERCISES[exercise]
    flags: list[str] = []
    notes: list[str] = []
    ns: dict = {}
    cells: list[str] = []
    try:
        from IPython import get_ipython

        ip = get_ipython()
    except ImportError:  # pragma: no cover
        ip = None
    if ip is not None:
        ns = ip.user_ns
        cells += [c for c in list(getattr(ip.history_manager, "input_hist_raw", []) or []) if c and GRADED_MARKER not in c]
    nb = _notebook_here(exercise)
    if nb is not None:
        cells += [c for c in code_cells(nb) if GRADED_MARKER not in c and c not in cells]
        if not any(isinstance(c, dict) and "nbgrader" in c.get("metadata", {}) for c in nb.get("cells", [])):
            notes.append("this notebook carries no nbgrader metadata (a make-student / handout copy?): nbgrader cannot record "
                         "its points and scores it 0. Students must work in nbgrader's release/ copy; grade this one with "
                         "`lora-edu grade`, or copy the answers into the release copy")
    flags += source_flags(cells, spec)
    if ns:
        flags += answer_flags(ns, spec)
    return flags, notes, ns


def graded(exercise: str, submission: Any, *, timeout: float | None = 10.0) -> float | None:
    """The body of an nbgrader grade cell: run the hidden variant, print the feedback, return the points.

    Runs only while grading — under ``nbgrader autograde`` or with a secret in
    ``$LORA_EDU_GRADING_SECRET`` (read once, then removed from the environment); in a
    student's own Run All it prints a line and returns None.  The variant is drawn from
    the secret and the student's id (nbgrader's ``autograded/<student>/`` folder).
    Integrity checks that can run in the kernel: the source flags (on the cells the
    kernel ran and the notebook file), the answer flags, and the checker snapshot taken
    when ``lora_edu.grading`` was imported; any flag scores 0 pending review.
    nbgrader gives a grade cell the number it displays as partial credit, and zero when
    the cell writes to stderr, so everything written to stderr meanwhile goes to stdout.
    """
    if not _grading_now():
        print("This cell runs the hidden cases when your notebook is graded; use the self-check above to test your code.")
        return None
    secret = env_secret() or _fresh_secret()
    with contextlib.redirect_stderr(sys.stdout), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flags, notes, _ = _kernel_evidence(exercise)
        snap = _KERNEL_SNAPSHOT[0] if _KERNEL_SNAPSHOT else None
        before = snap.changes() if snap is not None else []
        seed = variant_for(secret, exercise, _nbgrader_student())
        result = check(exercise, submission, timeout=timeout, seed=seed)
        after = [c for c in snap.changes() if c not in before] if snap is not None else []
        if before:
            flags.append(f"the notebook changed the checker's objects before the check ran: {', '.join(before[:6])}")
        if after:
            flags.append(f"the notebook's code changed the checker's objects while the check ran: {', '.join(after[:6])}")
        from .integrity import result_tampering, take_reference_instances

        flags += take_reference_instances() + result_tampering(result, EXERCISES[exercise])
        print(result)
        for n in notes:
            print(f"NOTE: {n}")
        if flags:
            print(f"INTEGRITY (scored 0 pending the instructor's review; {result.points:g} points before flags):")
            for f in flags:
                print(f"  - {f}")
            return 0.0
    return round(result.points, 4)


def _fresh_secret() -> str:
    import secrets

    return secrets.token_hex(16)
