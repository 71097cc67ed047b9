"""`lora-edu exercises` and `lora-edu grade`: student copies, instructor-only sources, batch grading in isolated processes."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from lora_edu.cli import main
from lora_edu.grading.notebooks import read_notebook, select, write_notebook

REPO = Path(__file__).resolve().parents[1]


def test_exercises_list(capsys):
    assert main(["exercises", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("lora_linear", "inject_train", "merge_precision", "param_savings", "delta_analysis"):
        assert name in out


def test_make_student_and_copy_solutions(tmp_path):
    assert main(["exercises", "make-student", str(tmp_path / "s")]) == 0
    files = sorted(p.name for p in (tmp_path / "s").glob("*.ipynb"))
    assert len(files) == 5
    for f in files:
        nb = read_notebook(tmp_path / "s" / f)
        text = json.dumps(nb)
        assert "BEGIN SOLUTION" not in text and "HIDDEN TESTS" not in text
        # the grade cell is visible (no hidden tests: nbgrader's checksum of a cell with hidden tests never matches) and
        # does nothing outside grading
        assert text.count("graded(") == 1
        assert nb["metadata"]["lora_edu"]["student_copy"]
    assert main(["exercises", "make-student", str(tmp_path / "s")]) == 1  # refuses to overwrite
    assert main(["exercises", "make-student", str(tmp_path / "s"), "lora_linear", "--force"]) == 0
    assert main(["exercises", "copy-solutions", str(tmp_path / "sol"), "04"]) == 0
    assert "BEGIN SOLUTION" in (tmp_path / "sol" / "04_param_savings.ipynb").read_text()
    assert main(["exercises", "copy-solutions", str(tmp_path / "x"), "--source", str(tmp_path / "nothing")]) == 1


def test_solutions_are_not_in_the_package():
    """The wheel carries no notebook, and the package folder holds none: solutions stay in course/exercises/."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    data = config["tool"]["setuptools"]["package-data"]["lora_edu"]
    assert not any("ipynb" in pattern or "exercises" in pattern for pattern in data)
    assert not list((REPO / "lora_edu").rglob("*.ipynb"))
    assert len(list((REPO / "course" / "exercises").glob("[0-9][0-9]_*.ipynb"))) == 5


def test_copy_solutions_outside_a_checkout_says_where_they_are(tmp_path):
    """An installed package (here: the package folder alone, without the checkout around it) has no solutions to copy."""
    import shutil

    shutil.copytree(REPO / "lora_edu", tmp_path / "site" / "lora_edu", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k not in ("LORA_EDU_COURSE_DIR", "PYTHONPATH")}
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from lora_edu.cli import main; "
            "sys.exit(main(['exercises', 'copy-solutions', sys.argv[2]]))")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "site"), str(tmp_path / "out")], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "not part of the installed package" in r.stderr and "course/exercises/" in r.stderr
    assert not (tmp_path / "out").exists()


def _variant(folder, name, edit):
    nb = read_notebook(select(["lora_linear"])[0])
    edit(nb)
    write_notebook(nb, folder / name)


def _replace(old, new):
    def edit(nb):
        hits = 0
        for c in nb["cells"]:
            src = "".join(c["source"]) if isinstance(c["source"], list) else c["source"]
            if old in src:
                c["source"] = src.replace(old, new)
                hits += 1
        assert hits

    return edit


def _append_cell(code):
    def edit(nb):
        nb["cells"].insert(3, {"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [], "source": code})

    return edit


def test_grade_folder_good_wrong_crashing_endless_hungry(tmp_path):
    subs = tmp_path / "subs"
    subs.mkdir()
    out = tmp_path / "grades.csv"
    _variant(subs, "a_good.ipynb", lambda nb: None)
    _variant(subs, "b_wrong.ipynb", _replace("return y + self.scale * (", "return y + self.alpha * ("))  # E2
    _variant(subs, "c_crash.ipynb", _replace("class LoRALinear(nn.Module):", "raise SystemExit(1)\nclass LoRALinear(nn.Module):"))
    _variant(subs, "d_endless.ipynb", _append_cell("while True:\n    pass\n"))
    _variant(subs, "e_hungry.ipynb", _append_cell("blocks = []\nwhile True:\n    blocks.append(bytearray(100 << 20))\n"))
    _variant(subs, "f_writer.ipynb", _append_cell("with open('big.bin', 'wb') as f:\n    f.write(bytes(200 << 20))\n"))

    code = main(["grade", str(subs), "--out", str(out), "--timeout", "25", "--case-timeout", "2", "--jobs", "2",
                 "--memory-mb", "2048", "--secret", "t"])
    assert code == 0
    rows = {r["student"]: r for r in csv.DictReader(out.open())}
    assert set(rows) == {"a_good", "b_wrong", "c_crash", "d_endless", "e_hungry", "f_writer"}
    assert rows["a_good"]["percent"] == "100.0" and not rows["a_good"]["flags"]
    details = {Path(r["file"]).stem: r for r in csv.DictReader((tmp_path / "grades_feedback" / "submissions.csv").open())}
    wrong = details["b_wrong"]
    assert 0 < float(wrong["score"]) < 1 and "forward = x" in wrong["failed_cases"]
    crash = details["c_crash"]
    assert float(crash["score"]) < 0.2 and "In [2]: SystemExit" in crash["cell_errors"]
    endless = details["d_endless"]
    assert float(endless["score"]) == 0 and "timed out" in endless["error"]
    # the memory limit stops the allocation loop (a MemoryError in that cell); the rest of the notebook is graded
    assert "MemoryError" in details["e_hungry"]["cell_errors"] and float(details["e_hungry"]["score"]) == 1.0
    # the file-size limit stops the 200 MB write (the child may die of SIGXFSZ or see the error)
    assert "File" in details["f_writer"]["cell_errors"] or "signal" in details["f_writer"]["error"] or float(details["f_writer"]["score"]) < 1
    feedback = (tmp_path / "grades_feedback" / "b_wrong" / "b_wrong.md").read_text()
    assert "is the scale α/r?" in feedback


def test_gradebook_is_written_without_following_links(tmp_path):
    from lora_edu.grading.report import write_safely

    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    link = tmp_path / "grades.csv"
    link.symlink_to(victim)
    write_safely(link, b"student,total\n")
    assert victim.read_text() == "keep" and not link.is_symlink() and link.read_bytes() == b"student,total\n"
    (tmp_path / "fb").mkdir()
    (tmp_path / "fb" / "alice").symlink_to(tmp_path)
    with pytest.raises(OSError, match="symbolic link"):
        write_safely(tmp_path / "fb" / "alice" / "x.md", b"x", inside=tmp_path / "fb")


@pytest.mark.parametrize("argv,code", [(["grade", "/nonexistent/dir", "--out", "x.csv"], 1),
                                       (["grade", ".", "--exercise", "nope"], 2)])
def test_grade_bad_arguments(argv, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == code


def test_committed_student_handout_is_current(tmp_path):
    """docs/student_handout/ is what `lora-edu exercises make-student` writes today (regenerate it if this fails)."""
    assert main(["exercises", "make-student", str(tmp_path)]) == 0
    committed = REPO / "docs" / "student_handout"
    fresh = sorted(p.name for p in tmp_path.glob("*.ipynb"))
    assert fresh == sorted(p.name for p in committed.glob("*.ipynb"))
    for name in fresh:
        assert (tmp_path / name).read_bytes() == (committed / name).read_bytes(), (
            f"{name} is stale: run `lora-edu exercises make-student docs/student_handout --force`"
        )


def test_every_handout_says_how_to_work_check_and_submit():
    for path in sorted((REPO / "docs" / "student_handout").glob("*.ipynb")):
        nb = read_notebook(path)
        text = "\n".join("".join(c["source"]) for c in nb["cells"])
        for needle in ("YOUR CODE HERE", "Self-check", "Restart & Run All", "Submit", path.name):
            assert needle in text, (path.name, needle)
        code = [("".join(c["source"])) for c in nb["cells"] if c["cell_type"] == "code"]
        bare = [line for src in code for line in src.splitlines() if line.strip().startswith("assert ") and "," not in line]
        assert not bare, f"{path.name}: asserts without a message: {bare}"
        # only the last check cell may stop Run All: every other check prints ✓ / ✗
        asserts = [k for k, src in enumerate(code) if "\nassert " in "\n" + src]
        assert all("# SELF-CHECK" in code[k] for k in asserts), path.name


def test_file_name_and_metadata_that_disagree_are_flagged(tmp_path):
    from lora_edu.grading.cli_grade import _prepare, student_of

    nb = read_notebook(select(["param_savings"])[0])
    content = json.dumps(nb).encode()
    item = _prepare(tmp_path / "alice_01_lora_linear.ipynb", None, content, "", None)
    assert item["exercise"] == "param_savings" and item["student"] == "alice"
    assert any("names lora_linear but the notebook's metadata says param_savings" in n for n in item["notes"])
    assert _prepare(tmp_path / "alice_04_param_savings.ipynb", None, content, "", None)["notes"] == []
    assert student_of(tmp_path / "subs" / "bob" / "x" / "01_lora_linear.ipynb", tmp_path / "subs") == "bob"
    broken = _prepare(tmp_path / "carol.ipynb", None, b"{not json", "", None)
    assert "not a readable notebook" in broken["error"]


def test_grading_aborts_when_the_grading_code_changes(tmp_path, monkeypatch, capsys):
    """A changed checksum of the grading code between two submissions stops the run, loudly, and writes nothing."""
    from lora_edu.grading import cli_grade

    subs = tmp_path / "subs"
    for who in ("alice", "bob"):
        write_notebook(read_notebook(select(["param_savings"])[0]), subs / who / "04_param_savings.ipynb")
    calls = {"n": 0}
    real = cli_grade.tree_fingerprint

    def fingerprint(folder):
        calls["n"] += 1
        return real(folder) + ("changed" if calls["n"] > 2 else "")  # unchanged at the start, changed after the first submission

    monkeypatch.setattr(cli_grade, "tree_fingerprint", fingerprint)
    out = tmp_path / "grades.csv"
    assert main(["grade", str(subs), "--out", str(out), "--secret", "s"]) == 3
    assert "ABORTED" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "grades_feedback").exists()


def test_root_grader_refuses_to_run_submissions_as_root(tmp_path, monkeypatch, capsys):
    """A root grader that cannot drop to nobody refuses (CLI and library) unless told it is inside a throwaway container."""
    from lora_edu.grading import sandbox

    monkeypatch.setattr(sandbox.os, "geteuid", lambda: 0)
    monkeypatch.setattr(sandbox, "child_interpreter", lambda uid: (None, "the Python packages are not readable by other users"))
    nb = tmp_path / "alice" / "01_lora_linear.ipynb"
    nb.parent.mkdir()
    main(["exercises", "make-student", str(tmp_path / "s"), "lora_linear"])
    nb.write_bytes((tmp_path / "s" / "01_lora_linear.ipynb").read_bytes())
    assert main(["grade", str(nb), "--out", str(tmp_path / "g.csv")]) == 2
    err = capsys.readouterr().err
    assert "cannot run submissions as nobody" in err and "--allow-root" in err and not (tmp_path / "g.csv").exists()
    run = sandbox.run_submission(nb.read_bytes(), nb.name, "lora_linear", 0)
    assert run.result is None and run.error.startswith("not run: the grader is root") and run.user == "not run"
    assert main(["grade", str(nb), "--out", str(tmp_path / "g.csv"), "--allow-root"]) == 0  # told: runs it, as the grader's user
    assert (tmp_path / "g.csv").exists()


def test_limits_refuse_root_by_accident():
    from lora_edu.grading.sandbox import Limits

    with pytest.raises(TypeError, match="allow_root must be True or False"):
        Limits(allow_root="false")
    with pytest.raises(ValueError, match="drop_to=0 runs submissions as root"):
        Limits(drop_to=0)
    assert Limits(drop_to=0, allow_root=True).drop_to == 0 and Limits().allow_root is False
