"""A whole class graded by `lora-edu grade`: fair scores, every cheat flagged or scored as the stub it is, nothing damaged.

The class: one correct student, four realistic mistakes, one incomplete notebook, and
five cheats (import the reference, patch the checker, patch the grading source, touch
the other submissions and escape the kill, forge the result and the grade file).  The
test writes the class table to ``$LORA_EDU_CLASS_TABLE`` when that is set.
"""
from __future__ import annotations

import csv
import os
import subprocess
import time
from pathlib import Path

import pytest

from lora_edu.cli import main
from lora_edu.grading.notebooks import cell_source, make_student_notebook, read_notebook, select, strip_solutions, write_notebook

REPO = Path(__file__).resolve().parents[1]
ROOT = os.geteuid() == 0  # the grader then runs every submission as `nobody`


def _source(name: str) -> dict:
    return read_notebook(select([name])[0])


def _edit(nb: dict, old: str, new: str) -> dict:
    hits = 0
    for c in nb["cells"]:
        src = cell_source(c)
        if old in src:
            c["source"] = src.replace(old, new)
            hits += 1
    assert hits, old
    return nb


def _replace_class(nb: dict, code: str) -> dict:
    for c in nb["cells"]:
        if cell_source(c).startswith("class LoRALinear"):
            c["source"] = code
            return nb
    raise AssertionError("no class cell")


def _add_cell(nb: dict, code: str, at: int = 3) -> dict:
    nb["cells"].insert(at, {"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [], "source": code})
    return nb


def _incomplete() -> dict:
    """A student copy in which only ``__init__`` is written: forward, merge and unmerge are still the stubs."""
    src = _source("lora_linear")
    nb = make_student_notebook(src)
    solved = next(cell_source(c) for c in src["cells"] if cell_source(c).startswith("class LoRALinear"))
    head, _, rest = solved.partition("    def forward")
    return _replace_class(nb, head + "    def forward" + strip_solutions(rest))


def _class(subs: Path, out: Path, victim: Path, escapee: str) -> dict[str, list[tuple[str, dict]]]:
    ex1 = lambda: _source("lora_linear")  # noqa: E731
    stub = lambda: make_student_notebook(_source("lora_linear"))  # noqa: E731
    wrong_llama = _edit(_source("param_savings"), "+ 2 * V * d + d  # + embeddings, head, final norm", "+ V * d + d  # head forgotten")
    grading_file = REPO / "lora_edu" / "grading" / "ex_lora_linear.py"
    patch_checker = (  # written so that no source flag sees it: only the checker snapshot can
        "checks = __import__('lora_edu' + '.grad' + 'ing.che' + 'cks', fromlist=['x'])\n"
        "for ex in checks.EXERCISES.values():\n"
        "    for case in ex.cases:\n"
        "        case.fn = lambda sub: None  # every case passes\n")
    patch_source = (
        "import lora_edu.grading.battery as battery, lora_edu.grading.ex_lora_linear as ex\n"
        f"for path in (battery.__file__, ex.__file__, {str(grading_file)!r}):\n"
        "    try:\n"
        "        with open(path, 'a') as f:\n"
        "            f.write('\\nEXERCISE.cases.clear()\\n')\n"
        "    except OSError as e:\n"
        "        print('could not patch', path, e)\n")
    touch_others = (
        "import glob, os, subprocess, sys\n"
        f"for p in glob.glob({str(subs)!r} + '/*/*.ipynb'):\n"
        "    try:\n"
        "        open(p, 'w').write('garbage')\n"
        "    except OSError as e:\n"
        "        print('cannot touch', p, type(e).__name__)\n"
        "try:\n"
        "    print(open(f'/proc/{os.getppid()}/cmdline').read())\n"
        "except OSError as e:\n"
        "    print('no /proc', e)\n"
        f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)', {escapee!r}], start_new_session=True)\n")
    forge = (
        "import os, sys, struct\n"
        "fake = b'{\"result\": {\"exercise\": \"lora_linear\", \"cases\": [{\"name\": \"x\", \"kind\": \"x\", \"points\": 42, \"passed\": true}]}}'\n"
        "for fd in range(3, 40):\n"
        "    try:\n"
        "        os.write(fd, struct.pack('>Q', len(fake)) + bytes(32) + fake)\n"
        "    except OSError:\n"
        "        pass\n"
        f"for target in ({str(out)!r}, {str(out) + '.tmp'!r}):\n"
        "    try:\n"
        f"        os.symlink({str(victim)!r}, target)\n"
        "    except OSError as e:\n"
        "        print('no symlink', e)\n"
        "    try:\n"
        "        open(target, 'w').write('student,lora_linear (42),total\\nkim,42,42\\n')\n"
        "    except OSError as e:\n"
        "        print('no write', e)\n"
        "for _ in range(60):\n"
        "    sys.stdout.write('kim,42,42,100.0\\n' * 50000)  # 50 MB of fake grades on stdout\n"
        "os._exit(0)\n")
    return {
        "ada": [("01_lora_linear", ex1()), ("04_param_savings", _source("param_savings"))],
        "ben": [("01_lora_linear", _edit(ex1(), "return y + self.scale * (", "return y + self.alpha * ("))],  # the article's E2
        "cy": [("01_lora_linear", _edit(_edit(ex1(), "delta = self.scale * (self.B.to(dtype) @ self.A.to(dtype))  # (out, r)",
                                               "delta = self.B.to(dtype) @ self.A.to(dtype)  # (out, r)"),
                                         "delta = self.scale * (self.B.to(dtype) @ self.A.to(dtype))\n",
                                         "delta = self.B.to(dtype) @ self.A.to(dtype)\n"))],  # the article's E3
        "dee": [("01_lora_linear", _edit(ex1(), "self.B = nn.Parameter(torch.zeros(base.out_features, r, dtype=W.dtype, device=W.device))",
                                         "self.B = torch.zeros(base.out_features, r, dtype=W.dtype, device=W.device)")),
                ("04_param_savings", wrong_llama)],
        "eve": [("01_lora_linear", _edit(ex1(), "self.scale = alpha / r", "self.scale = alpha * r"))],
        "fay": [("01_lora_linear", _incomplete())],  # __init__ only
        "gus": [("01_lora_linear", _replace_class(stub(), "from lora_edu import LoRALinear"))],
        "hal": [("01_lora_linear", _add_cell(stub(), patch_checker))],
        "ivy": [("01_lora_linear", _add_cell(stub(), patch_source))],
        "jay": [("01_lora_linear", _add_cell(stub(), touch_others))],
        "kim": [("01_lora_linear", _add_cell(stub(), forge))],
    }


def _pids_with(marker: str) -> list[int]:
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{d}/cmdline").read_bytes():
                    found.append(int(d))
            except OSError:
                pass
    return found


@pytest.mark.slow
def test_class_run(tmp_path):
    subs, out = tmp_path / "submissions", tmp_path / "grades.csv"
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    escapee = f"lora_edu_escapee_{os.getpid()}_{time.time_ns()}"
    klass = _class(subs, out, victim, escapee)
    for student, notebooks in klass.items():
        for stem, nb in notebooks:
            write_notebook(nb, subs / student / f"{stem}.ipynb")
    originals = {p: p.read_bytes() for p in subs.rglob("*.ipynb")}
    grading_dir = REPO / "lora_edu" / "grading"
    grading_code = {p: p.read_bytes() for p in grading_dir.glob("*.py")}
    roster = tmp_path / "roster.csv"
    roster.write_text("student,name,email,sis_login_id\n" + "".join(f"{s},{s.title()} Doe,{s}@uni.example,{s}01\n" for s in klass)
                      + "zoe,Zoe Doe,zoe@uni.example,zoe01\n")
    t0 = time.monotonic()
    code = main(["grade", str(subs), "--out", str(out), "--roster", str(roster), "--secret", "class-run", "--jobs", "2",
                 "--format", "plain,canvas,moodle",
                 "--timeout", "120", "--case-timeout", "5"])
    seconds = time.monotonic() - t0
    assert code == 0

    # ---- nothing damaged: other submissions, the grading code, the victim of the link, no process left behind
    assert victim.read_text() == "precious\n"
    assert {p: p.read_bytes() for p in grading_dir.glob("*.py")} == grading_code
    if ROOT:  # as root the grader drops every submission to `nobody`, which cannot reach the instructor's files
        assert {p: p.read_bytes() for p in subs.rglob("*.ipynb")} == originals
    time.sleep(0.2)
    assert _pids_with(escapee) == [], "a process started by a submission outlived its grading"

    # ---- the gradebook
    assert not out.is_symlink()
    rows = {r["student"]: r for r in csv.DictReader(out.open(encoding="utf-8"))}
    assert set(rows) == set(klass) | {"zoe"}
    pts = {s: float(r["lora_linear (42)"]) for s, r in rows.items()}
    flags = {s: r["flags"] for s, r in rows.items()}
    full = 42.0
    assert pts["ada"] == full and float(rows["ada"]["param_savings (10)"]) == 10 and rows["ada"]["percent"] == "100.0"
    assert not flags["ada"] and not flags["ben"] and not flags["cy"] and not flags["dee"] and not flags["eve"]
    # four mistakes: partial credit, ordered by how badly each breaks LoRA
    for s in ("ben", "cy", "dee", "eve"):
        assert 0.6 * full < pts[s] < full, (s, pts[s])
    assert pts["dee"] < pts["cy"], "B that never learns must cost more than an unscaled merge"
    assert float(rows["dee"]["param_savings (10)"]) >= 8, "a wrong LLaMA total costs its own case, not the steps after it"
    # incomplete: low, not zero, no flag
    assert 0 < pts["fay"] < 0.5 * full and "INTEGRITY" not in flags["fay"]
    # the cheats: flagged and zero, or the stub they are
    stub_pts = max(pts["fay"], 2.0)
    for s, why in (("gus", "lora_edu.core.layers"), ("hal", "checker's objects"), ("ivy", "grading code"), ("jay", "/proc"),
                   ("kim", "result")):
        assert pts[s] <= stub_pts, (s, pts[s])
        assert "INTEGRITY" in flags[s] and why in flags[s], (s, flags[s])
    assert pts["gus"] == 0 and pts["hal"] == 0 and pts["kim"] == 0
    assert "changed the checker's objects" in flags["hal"] and "In [" not in flags["hal"]  # caught at run time only
    assert rows["zoe"]["total"] == "0.0" and "no submission" in rows["zoe"]["flags"]

    # ---- per-submission feedback
    fb = tmp_path / "grades_feedback"
    ben = (fb / "ben" / "01_lora_linear.md").read_text(encoding="utf-8")
    assert "is the scale α/r?" in ben and "| ✗ |" in ben and "expected" in ben
    eve = (fb / "eve" / "01_lora_linear.md").read_text(encoding="utf-8")
    assert "α·r" in eve
    cy = (fb / "cy" / "01_lora_linear.md").read_text(encoding="utf-8")
    assert "without the scale α/r" in cy
    jay = (fb / "jay" / "01_lora_linear.md").read_text(encoding="utf-8")
    assert "\x00" not in jay and "\x1b" not in jay  # what a notebook prints reaches the feedback as plain text
    kim = (fb / "kim" / "01_lora_linear.md").read_text(encoding="utf-8")
    assert "output cut" in kim and len(kim) < 100_000
    details = list(csv.DictReader((fb / "submissions.csv").open(encoding="utf-8")))
    assert len(details) == sum(len(v) for v in klass.values())
    if ROOT:
        assert {d["ran_as"] for d in details} == {"nobody"}

    # ---- LMS presets, written by the same run
    canvas = list(csv.reader((tmp_path / "grades.canvas.csv").open(encoding="utf-8")))
    assert canvas[0] == ["Student", "ID", "SIS User ID", "SIS Login ID", "Section", "LoRA exercises"]
    assert canvas[1][0] == "Points Possible" and canvas[1][-1] == "52"
    assert ["Ada Doe", "", "", "ada01", "", "52"] in canvas and len(canvas) == 2 + len(rows)
    moodle = list(csv.DictReader((tmp_path / "grades.moodle.csv").open(encoding="utf-8")))
    assert {m["Email address"] for m in moodle} == {f"{s}@uni.example" for s in rows}
    assert next(m for m in moodle if m["Username"] == "ada")["LoRA exercises"] == "52"

    raw = {(d["student"], d["exercise"]): d["points_before_flags"] for d in details}
    table = (f"class run: {len(originals)} notebooks graded in {seconds:.0f} s\n"
             + "\n".join(f"{s:4s} {r['lora_linear (42)']:>5} (unflagged {raw.get((s, 'lora_linear'), '-'):>5}) "
                         f"{r['param_savings (10)']:>5} {r['total']:>6} {r['percent']:>6}  {r['flags']}" for s, r in rows.items()))
    print(table)
    if os.environ.get("LORA_EDU_CLASS_TABLE"):
        Path(os.environ["LORA_EDU_CLASS_TABLE"]).write_text(table + "\n", encoding="utf-8")


def test_escapee_marker_helper_finds_a_process():
    """The leftover-process check above can fail: it sees a process that carries the marker."""
    marker = f"lora_edu_marker_{time.time_ns()}"
    p = subprocess.Popen(["python3", "-c", "import time; time.sleep(30)", marker])
    try:
        time.sleep(0.2)
        assert _pids_with(marker) == [p.pid]
    finally:
        p.kill()
        p.wait()
