"""Regressions from the instructor's review (items 2-4, 7-9, 12): each fast, in-process."""
from __future__ import annotations

import os
import random
import sys

import torch
import torch.nn as nn

from lora_edu.grading import battery, check
from lora_edu.grading.checks import EXERCISES, variant_for
from lora_edu.grading.integrity import CheckerSnapshot, result_tampering, source_flags, take_reference_instances
from lora_edu.grading.notebooks import solution_namespace
from lora_edu.grading.sandbox import remove_left_files

EX1 = EXERCISES["lora_linear"]


def test_optimizer_construction_is_not_a_checker_patch():  # item 1, in-process
    snap = CheckerSnapshot(EXERCISES)
    torch.optim.AdamW([nn.Parameter(torch.zeros(2))])
    assert snap.changes() == []


def test_patching_random_is_seen_and_changes_no_case_value(monkeypatch):  # item 2
    token = battery._VARIANT.set(12345)
    try:
        before = [battery.case_random(7).randint(0, 10**9) for _ in range(2)]
        snap = CheckerSnapshot(EXERCISES)
        monkeypatch.setattr(random.Random, "seed", lambda self, a=None, version=2: None)
        monkeypatch.setattr(random.Random, "randint", lambda self, a, b: a)
        assert battery.case_random(7).randint(0, 10**9) == before[0]
        assert any(c.startswith("random.Random.") for c in snap.changes())
    finally:
        battery._VARIANT.reset(token)


def test_frame_walking_and_sys_modules_are_flagged():  # items 3 and 4
    cells = ["try:\n    1/0\nexcept Exception as e:\n    f = e.__traceback__.tb_frame.f_back\n",
             "g = (x for x in ())\nprint(g.gi_frame)\n", "import sys\nm = sys.modules['lora' + '_edu']\n"]
    flags = " ".join(source_flags(cells, EX1))
    assert ".tb_frame" in flags and ".f_back" in flags and ".gi_frame" in flags and "sys.modules" in flags


def test_result_is_rebuilt_and_checked():  # item 3
    ns = solution_namespace("param_savings")
    sub = EXERCISES["param_savings"].collect(ns)
    r = check("param_savings", sub)
    assert result_tampering(r, EXERCISES["param_savings"]) == []
    r.cases.pop()
    assert result_tampering(r, EXERCISES["param_savings"])


def test_wrapping_the_reference_class_is_flagged():  # item 4: composition, not subclassing
    ref = sys.modules["lora" + "_edu"].LoRALinear

    class LoRALinear(nn.Module):
        def __init__(self, base, r, alpha):
            super().__init__()
            self.inner = ref(base, r, alpha)
            self.A, self.B, self.base, self.scale = self.inner.A, self.inner.B, self.inner.base, alpha / r

        def forward(self, x):
            return self.inner(x)

    take_reference_instances()
    check("lora_linear", LoRALinear)
    found = take_reference_instances()
    assert found and "LoRALinear" in found[0]
    ns = solution_namespace("lora_linear")
    check("lora_linear", ns["LoRALinear"])
    assert take_reference_instances() == []


def _variant_of(ns_edit, seeds=(11, 22, 33)):
    ns = solution_namespace("lora_linear")
    src_cls = ns["LoRALinear"]

    class Student(src_cls):  # the source's class, with the student's scale
        def __init__(self, base, r, alpha, **kw):
            super().__init__(base, r, alpha, **kw)
            self.scale = ns_edit(alpha, r)

    Student.__module__ = "__main__"
    return [check("lora_linear", Student, seed=s) for s in seeds]


def test_integer_division_scale_is_named_and_scored_the_same_on_every_variant():  # item 7
    results = _variant_of(lambda alpha, r: alpha // r)
    assert len({r.points for r in results}) == 1, [r.points for r in results]
    assert all("integer division" in str(r) for r in results)
    assert all(0 < r.points < r.possible for r in results)


def test_swapped_init_is_charged_once():  # item 8
    ns = solution_namespace("lora_linear")

    class Swapped(ns["LoRALinear"]):
        def __init__(self, base, r, alpha, **kw):
            super().__init__(base, r, alpha, **kw)
            with torch.no_grad():
                self.B.normal_()
                self.A.zero_()

    r = check("lora_linear", Swapped)
    failed = {c.case_id for c in r.failed}
    assert "init_A" in failed and "noop_init" not in failed


def test_variants_are_per_student():  # item 9
    assert variant_for("s", "lora_linear", "alice") != variant_for("s", "lora_linear", "bob")
    assert variant_for("s", "lora_linear") == variant_for("s", "lora_linear", "")


def test_left_files_of_the_sandbox_user_are_removed(tmp_path):  # item 12: only that user's, only recent ones
    mine = tmp_path / "left.bin"
    mine.write_bytes(b"x")
    sub = tmp_path / "dir"
    sub.mkdir()
    uid = os.getuid()
    assert remove_left_files(uid, since=mine.stat().st_ctime + 100, roots=(str(tmp_path),)) == []  # older than the run: kept
    assert remove_left_files(uid + 1, since=0, roots=(str(tmp_path),)) == []  # another user's: kept
    removed = remove_left_files(uid, since=mine.stat().st_ctime - 5, roots=(str(tmp_path),))
    assert not mine.exists() and not sub.exists()
    assert str(mine) in removed


def test_students_not_on_the_roster_are_left_out_of_lms_files():  # item 13
    import csv
    import io

    from lora_edu.grading.report import NOT_ON_ROSTER, format_canvas, format_moodle

    rows = [{"student": "ada", "email": "ada@x", "total": 5.0, "flags": "", "lora_linear": 5.0},
            {"student": "zed", "total": 5.0, "flags": NOT_ON_ROSTER, "lora_linear": 5.0}]
    ex = [("lora_linear", 42.0)]
    canvas = list(csv.reader(io.StringIO(format_canvas(rows, ex, "A").decode())))
    moodle = list(csv.reader(io.StringIO(format_moodle(rows, ex, "A").decode())))
    assert len(canvas) == 3 and not any("zed" in r for r in canvas)
    assert len(moodle) == 2 and not any("zed" in r for r in moodle)
