"""`lora-edu exercises` and `lora-edu grade`: student copies, and batch grading in subprocesses."""
from __future__ import annotations

import csv
import json

import pytest

from lora_edu.cli import main
from lora_edu.grading.notebooks import read_notebook, select, write_notebook


def test_exercises_list(capsys):
    assert main(["exercises", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("lora_linear", "inject_train", "merge_precision", "param_savings", "delta_analysis"):
        assert name in out


def test_make_student_and_copy_solutions(tmp_path):
    assert main(["exercises", "make-student", str(tmp_path / "s")]) == 0
    files = sorted(p.name for p in (tmp_path / "s").glob("*.ipynb"))
    assert len(files) >= 5
    for f in files:
        nb = read_notebook(tmp_path / "s" / f)
        assert "BEGIN SOLUTION" not in json.dumps(nb) and nb["metadata"]["lora_edu"]["student_copy"]
    assert main(["exercises", "make-student", str(tmp_path / "s")]) == 1  # refuses to overwrite
    assert main(["exercises", "make-student", str(tmp_path / "s"), "lora_linear", "--force"]) == 0
    assert main(["exercises", "copy-solutions", str(tmp_path / "sol"), "04"]) == 0
    assert "BEGIN SOLUTION" in (tmp_path / "sol" / "04_param_savings.ipynb").read_text()


def _variant(tmp_path, name, edit):
    nb = read_notebook(select(["lora_linear"])[0])
    edit(nb)
    write_notebook(nb, tmp_path / name)


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
        nb["cells"].insert(2, {"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [], "source": code})

    return edit


def test_grade_folder_good_wrong_crashing_endless_malicious(tmp_path):
    subs = tmp_path / "subs"
    subs.mkdir()
    out = tmp_path / "grades.csv"
    _variant(subs, "a_good.ipynb", lambda nb: None)
    _variant(subs, "b_wrong.ipynb", _replace("return y + self.scale * (", "return y + self.alpha * ("))  # E2
    _variant(subs, "c_crash.ipynb", _replace("class LoRALinear(nn.Module):", "raise SystemExit(1)\nclass LoRALinear(nn.Module):"))
    _variant(subs, "d_endless.ipynb", _append_cell("while True:\n    pass\n"))
    # tries to sabotage the others and the grade file, then exits the interpreter
    evil = (f"import glob, os\nfor p in glob.glob({str(subs)!r} + '/*.ipynb'):\n    open(p, 'w').write('garbage')\n"
            f"open({str(out)!r}, 'w').write('a_good.ipynb,0\\n')\nos._exit(0)\n")
    _variant(subs, "e_malicious.ipynb", _append_cell(evil))

    code = main(["grade", str(subs), "--out", str(out), "--timeout", "25", "--case-timeout", "2", "--jobs", "5"])
    assert code == 0
    rows = {r["file"].rsplit("/", 1)[-1]: r for r in csv.DictReader(out.open())}
    assert set(rows) == {"a_good.ipynb", "b_wrong.ipynb", "c_crash.ipynb", "d_endless.ipynb", "e_malicious.ipynb"}
    assert float(rows["a_good.ipynb"]["score"]) == 1.0 and rows["a_good.ipynb"]["passed"] == "True"
    wrong = rows["b_wrong.ipynb"]
    assert 0 < float(wrong["score"]) < 1 and "forward = x" in wrong["failed_cases"]
    crash = rows["c_crash.ipynb"]
    assert float(crash["score"]) < 0.2 and "SystemExit" in crash["cell_errors"]
    endless = rows["d_endless.ipynb"]
    assert float(endless["score"]) == 0 and "timed out" in endless["error"]
    evil_row = rows["e_malicious.ipynb"]
    assert float(evil_row["score"]) == 0 and evil_row["error"]


@pytest.mark.parametrize("argv,code", [(["grade", "/nonexistent/dir", "--out", "x.csv"], 1),
                                       (["grade", ".", "--exercise", "nope"], 2)])
def test_grade_bad_arguments(argv, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == code


def test_committed_student_handout_is_current(tmp_path):
    """docs/student_handout/ is what `lora-edu exercises make-student` writes today (regenerate it if this fails)."""
    from pathlib import Path

    from lora_edu import cli

    assert cli.main(["exercises", "make-student", str(tmp_path)]) == 0
    committed = Path(__file__).resolve().parents[1] / "docs" / "student_handout"
    fresh = sorted(p.name for p in tmp_path.glob("*.ipynb"))
    assert fresh == sorted(p.name for p in committed.glob("*.ipynb"))
    for name in fresh:
        assert (tmp_path / name).read_bytes() == (committed / name).read_bytes(), (
            f"{name} is stale: run `lora-edu exercises make-student docs/student_handout --force`"
        )
