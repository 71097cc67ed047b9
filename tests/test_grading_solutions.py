"""Every exercise's unmodified solution, graded through `lora-edu grade` (the sandboxed route): full marks, no flags.

Regression: a correct exercise 2 or 5 used to be flagged "changed the checker's objects:
torch.manual_seed" and scored 0, because constructing a torch optimizer imports
``torch._dynamo`` lazily, and that import replaces ``torch.manual_seed``.
"""
from __future__ import annotations

import csv

import pytest

from lora_edu.cli import main
from lora_edu.grading.checks import EXERCISES
from lora_edu.grading.notebooks import read_notebook, source_notebooks, write_notebook


@pytest.mark.slow
def test_all_five_solutions_get_full_marks_through_lora_edu_grade(tmp_path, capsys):
    subs = tmp_path / "subs"
    for path in source_notebooks():
        write_notebook(read_notebook(path), subs / "sol" / path.name)
    out = tmp_path / "grades.csv"
    code = main(["grade", str(subs), "--out", str(out), "--secret", "solutions-run", "--jobs", "2", "--timeout", "240",
                 "--case-timeout", "60"])
    assert code == 0
    details = list(csv.DictReader((tmp_path / "grades_feedback" / "submissions.csv").open(encoding="utf-8")))
    assert {d["exercise"] for d in details} == set(EXERCISES)
    for d in details:
        assert not d["flags"], (d["exercise"], d["flags"])
    (row,) = list(csv.DictReader(out.open(encoding="utf-8")))
    assert row["percent"] == "100.0", row
    assert not row["flags"], row["flags"]
