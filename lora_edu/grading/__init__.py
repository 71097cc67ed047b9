"""Classroom exercises with an autograder that explains what went wrong.

``from lora_edu.grading import check``; ``print(check("lora_linear", LoRALinear))``.
Exercise notebooks ship in ``lora_edu/exercises/``; ``lora-edu exercises make-student
DIR`` writes student copies and ``lora-edu grade ...`` grades submitted notebooks,
each in its own process (see docs/instructors.md).
"""
from .checks import EXERCISES, check
from .result import CaseResult, CheckResult

__all__ = ["EXERCISES", "CaseResult", "CheckResult", "check"]
