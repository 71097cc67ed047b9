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
import os
import secrets
import sys
import warnings
from typing import Any

from . import ex_delta_analysis, ex_inject_train, ex_lora_linear, ex_merge_precision, ex_param_savings
from .battery import Exercise, run_exercise
from .result import CheckResult

EXERCISES: dict[str, Exercise] = {
    m.EXERCISE.name: m.EXERCISE
    for m in (ex_lora_linear, ex_inject_train, ex_merge_precision, ex_param_savings, ex_delta_analysis)
}

SECRET_ENV = "LORA_EDU_GRADING_SECRET"


def variant_for(secret: str | bytes, exercise: str) -> int:
    """The hidden variant of ``exercise`` for a grading secret: a positive 62-bit integer."""
    key = secret.encode() if isinstance(secret, str) else bytes(secret)
    digest = hmac.new(key, exercise.encode(), hashlib.sha256).digest()
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


def graded(exercise: str, submission: Any, *, timeout: float | None = 10.0) -> float:
    """The body of an nbgrader grade cell: run the hidden variant, print the feedback, return the points.

    The secret comes from the environment variable ``LORA_EDU_GRADING_SECRET`` of the
    process that runs ``nbgrader autograde`` (a fresh random one when unset).  nbgrader
    gives a grade cell the number it displays as partial credit, and zero when the cell
    writes to stderr, so everything the student's code or the checker writes to stderr
    while it runs is sent to stdout instead.
    """
    secret = os.environ.get(SECRET_ENV) or secrets.token_hex(16)
    with contextlib.redirect_stderr(sys.stdout), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = check(exercise, submission, timeout=timeout, secret=secret)
        print(result)
    return round(result.points, 4)
