"""Classroom exercises with an autograder that explains what went wrong.

``from lora_edu.grading import check``; ``print(check("lora_linear", LoRALinear))``.
The exercise sources (with solutions) are instructor material: they live in
``course/exercises/`` of a source checkout, not in the installed package.
``lora-edu exercises make-student DIR`` writes student copies; ``lora-edu grade ...``
grades submitted notebooks, each in its own process; the sources also carry
nbgrader's cell metadata (see docs/instructors.md).
"""
from .checks import EXERCISES, arm_kernel_snapshot, check, graded
from .result import CaseResult, CheckResult

arm_kernel_snapshot()  # under nbgrader autograde: before any student cell runs

__all__ = ["EXERCISES", "CaseResult", "CheckResult", "check", "graded"]
