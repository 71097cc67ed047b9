"""The exercise sources work in a standard nbgrader course: generate_assignment, autograde, generate_feedback.

Runs the real ``nbgrader`` (the ``classroom`` extra, installed by ``./dev.sh test``) on a
correct and a wrong submission of exercise 4; the grade cell's hidden test returns the
points, which nbgrader records as partial credit.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbgrader.api as nbgrader_api  # the classroom extra; ./dev.sh test installs it, so this test never skips
import pytest

from lora_edu.cli import main
from lora_edu.grading.checks import EXERCISES

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def _nbgrader(course: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "LORA_EDU_GRADING_SECRET": "nbgrader-test",
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run([str(BIN / "nbgrader"), *args, "--force"], cwd=course, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _answer(release: dict, source: dict, edit=lambda s: s) -> dict:
    """The released notebook with the source's solutions typed into its answer cells."""
    by_id = {c["metadata"]["nbgrader"]["grade_id"]: c for c in source["cells"]}
    nb = json.loads(json.dumps(release))
    for c in nb["cells"]:
        meta = c["metadata"].get("nbgrader", {})
        if meta.get("solution"):
            text = "".join(by_id[meta["grade_id"]]["source"])
            c["source"] = edit("".join(line for line in text.splitlines(True) if line.strip() not in ("### BEGIN SOLUTION", "### END SOLUTION")))
    return nb


def test_source_metadata_is_what_nbgrader_needs():
    from lora_edu.grading.notebooks import nbgrader_cell_metadata, read_notebook, source_notebooks

    points = {n: sum(c.points for c in e.cases if not c.optional) for n, e in EXERCISES.items()}
    for path in source_notebooks():
        nb = read_notebook(path)
        assert nbgrader_cell_metadata(nb, points) == nb, f"{path.name}: nbgrader metadata is stale"
        graded = [c for c in nb["cells"] if c["metadata"]["nbgrader"]["grade"]]
        assert len(graded) == 1 and graded[0]["metadata"]["nbgrader"]["points"] == points[nb["metadata"]["lora_edu"]["exercise"]]
        text = "".join(graded[0]["source"])
        # no hidden tests: nbgrader stores a grade cell's checksum before removing them and warns on every submission
        assert "HIDDEN TESTS" not in text and "graded(" in text
        assert any(c["metadata"]["nbgrader"]["solution"] for c in nb["cells"])


@pytest.mark.slow
def test_nbgrader_generate_autograde_feedback(tmp_path):
    course = tmp_path / "course"
    course.mkdir()
    (course / "nbgrader_config.py").write_text('c = get_config()\nc.CourseDirectory.course_id = "lora"\n'
                                               "c.ExecutePreprocessor.timeout = 120\n")
    assert main(["exercises", "nbgrader-course", str(course), "param_savings"]) == 0
    _nbgrader(course, "generate_assignment", "param_savings")
    release = json.loads((course / "release" / "param_savings" / "04_param_savings.ipynb").read_text())
    text = json.dumps(release)
    assert "BEGIN SOLUTION" not in text and "HIDDEN TESTS" not in text and "96 * lora_params" not in text
    source = json.loads((course / "source" / "param_savings" / "04_param_savings.ipynb").read_text())
    wrong = lambda s: s.replace("r * (d_in + d_out)", "r * d_in * d_out")  # noqa: E731 - r·in·out: r full copies of W
    leak = lambda s: s + '\nimport os\nprint("SECRET=" + str(os.environ.get("LORA_EDU_GRADING_SECRET")))\n'  # noqa: E731
    frames = lambda s: s + "\ntry:\n    1 / 0\nexcept ZeroDivisionError as e:\n    _frame = e.__traceback__.tb_frame\n"  # noqa: E731
    handout = json.loads((REPO / "docs" / "student_handout" / "04_param_savings.ipynb").read_text())
    by_id = {c["metadata"]["nbgrader"]["grade_id"]: "".join(c["source"]) for c in source["cells"]}
    for k, c in enumerate(handout["cells"]):  # the answers typed into the make-student copy, which has no nbgrader metadata
        sol = by_id.get(f"param_savings_{k + 1:02d}", "")
        if "### BEGIN SOLUTION" in sol:
            c["source"] = "".join(x for x in sol.splitlines(True) if x.strip() not in ("### BEGIN SOLUTION", "### END SOLUTION"))
    class_ = {"alice": _answer(release, source), "bob": _answer(release, source, wrong), "mallory": _answer(release, source, leak),
              "ursula": _answer(release, source, frames), "peggy": handout}
    for student, nb in class_.items():
        folder = course / "submitted" / student / "param_savings"
        folder.mkdir(parents=True)
        (folder / "04_param_savings.ipynb").write_text(json.dumps(nb, indent=1))
    log = _nbgrader(course, "autograde", "param_savings")
    assert "checksum" not in log.stdout + log.stderr, "only a modified cell may warn about its checksum"
    with nbgrader_api.Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        scores = {s: (gb.find_submission("param_savings", s).score, gb.find_submission("param_savings", s).max_score) for s in class_}
    assert scores["alice"] == (10.0, 10.0)
    assert 0 < scores["bob"][0] < 10 and scores["bob"][1] == 10.0  # partial credit from the grade cell

    def output(student):
        nb = json.loads((course / "autograded" / student / "param_savings" / "04_param_savings.ipynb").read_text())
        return "".join("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", "")) for c in nb["cells"]
                       for o in c.get("outputs", []))

    assert "r full copies of W" in output("bob")
    # the secret is removed from the kernel's environment when lora_edu.grading is imported, before student cells
    assert "nbgrader-test" not in output("mallory") and "SECRET=None" in output("mallory")
    assert scores["mallory"] == (10.0, 10.0)
    # in-kernel integrity checks: walking to stack frames -> flagged and 0 pending review
    assert scores["ursula"][0] == 0 and "INTEGRITY" in output("ursula") and "stack frames" in output("ursula")
    # a make-student copy (no nbgrader metadata): nbgrader scores 0, and the feedback says why
    assert scores["peggy"][0] == 0 and "no nbgrader metadata" in output("peggy")
    _nbgrader(course, "generate_feedback", "param_savings")
    html = (course / "feedback" / "bob" / "param_savings" / "04_param_savings.html").read_text()
    assert "r full copies of W" in html
