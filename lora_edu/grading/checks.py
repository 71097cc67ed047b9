"""``check(exercise, submission)``: the one entry point students call.

Each exercise lives in its own module (``ex_*.py``) as an :class:`~.battery.Exercise`
with its cases; this module gathers them into :data:`EXERCISES`.
"""
from __future__ import annotations

from typing import Any

from . import ex_delta_analysis, ex_inject_train, ex_lora_linear, ex_merge_precision, ex_param_savings
from .battery import Exercise, run_exercise
from .result import CheckResult

EXERCISES: dict[str, Exercise] = {
    m.EXERCISE.name: m.EXERCISE
    for m in (ex_lora_linear, ex_inject_train, ex_merge_precision, ex_param_savings, ex_delta_analysis)
}


def check(exercise: str, submission: Any, *, timeout: float | None = 10.0, seed: int = 0) -> CheckResult:
    """Run the battery of cases of ``exercise`` on ``submission`` and return a :class:`CheckResult`.

    ``submission`` is what the exercise asks for: for ``"lora_linear"`` the class
    itself (``check("lora_linear", LoRALinear)``); for the others a dict of the
    names the notebook's last cell lists.  ``timeout`` bounds each case (seconds).
    Never raises because of the submission: every problem becomes a failed case.
    """
    if exercise not in EXERCISES:
        raise ValueError(f"unknown exercise {exercise!r}; choose from {sorted(EXERCISES)}")
    return run_exercise(EXERCISES[exercise], submission, timeout=timeout, seed=seed)
