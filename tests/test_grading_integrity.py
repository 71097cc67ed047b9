"""The integrity pieces one by one: checker snapshot, source and answer flags, the signed result frame, the tree kill."""
from __future__ import annotations

import functools
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import lora_edu
from lora_edu.grading import battery
from lora_edu.grading.checks import EXERCISES
from lora_edu.grading.integrity import CheckerSnapshot, answer_flags, source_flags, tree_fingerprint
from lora_edu.grading.notebooks import code_cells, make_student_notebook, read_notebook, source_notebooks
from lora_edu.grading.sandbox import FRAME, kill_tree, subreaper, verify_frame

# ----------------------------------------------------------------------------- the checker in memory


def test_snapshot_is_quiet_when_nothing_changes():
    snap = CheckerSnapshot(EXERCISES)
    torch.manual_seed(0)
    torch.randn(3) @ torch.randn(3)
    import torch.distributions as _distributions  # noqa: F401 - importing adds attributes, it changes none
    assert snap.changes() == []


@pytest.mark.parametrize("patch", ["case_fn", "case_list", "module_function", "torch_function", "builtin", "tensor_method", "code"])
def test_snapshot_sees_every_kind_of_patch(patch, monkeypatch):
    snap = CheckerSnapshot(EXERCISES)
    ex = EXERCISES["lora_linear"]
    if patch == "case_fn":
        monkeypatch.setattr(ex.cases[0], "fn", lambda sub: None)
    elif patch == "case_list":
        monkeypatch.setattr(ex, "cases", [])
    elif patch == "module_function":
        monkeypatch.setattr(battery, "rel_err", lambda a, b: 0.0)
    elif patch == "torch_function":
        monkeypatch.setattr(torch, "allclose", lambda *a, **k: True)
    elif patch == "builtin":
        import builtins

        monkeypatch.setattr(builtins, "divmod", lambda *a: (0, 0))
    elif patch == "tensor_method":
        monkeypatch.setattr(torch.Tensor, "abs", lambda self: self * 0)
    elif patch == "code":
        monkeypatch.setattr(battery.rel_err, "__code__", (lambda a, b: 0.0).__code__)
    assert snap.changes(), patch


# ----------------------------------------------------------------------------- the notebook's source and answers


def test_no_flags_on_the_provided_notebooks():
    """The provided cells (sources and handouts) raise no flag: a flag always points at something the student added."""
    for path in source_notebooks():
        nb = read_notebook(path)
        ex = EXERCISES[nb["metadata"]["lora_edu"]["exercise"]]
        assert source_flags(code_cells(nb), ex) == [], path.name
        assert source_flags(code_cells(make_student_notebook(nb)), ex) == [], path.name


@pytest.mark.parametrize("exercise,code,needle", [
    ("lora_linear", "from lora_edu import LoRALinear", "answers this exercise"),
    ("lora_linear", "import lora_edu as L\nclass LoRALinear(L.LoRALinear):\n    pass", "lora_edu.LoRALinear"),
    ("lora_linear", "from lora_edu.core.layers import LoRALinear as X", "lora_edu.core.layers"),
    ("lora_linear", "import lora_edu.grading.battery", "grading module"),
    ("lora_linear", "from lora_edu.grading import EXERCISES", "grading internals"),
    ("lora_linear", "import importlib\nimportlib.import_module('lora_edu.grading.checks')", "in a string"),
    ("lora_linear", "import gc\nx = gc.get_objects()", "gc"),
    ("lora_linear", "import sys\nf = sys._getframe(1)", "stack frames"),
    ("lora_linear", "open('/proc/1/cmdline').read()", "/proc"),
    ("inject_train", "import lora_edu\ndef inject_lora(m, t, r, a):\n    return lora_edu.add_lora(m, t, r=r, alpha=a)", "add_lora"),
    ("delta_analysis", "from lora_edu.lab.analysis import subspace_similarity", "lora_edu.lab.analysis"),
    ("merge_precision", "from lora_edu import check_merge_equivalence", "check_merge_equivalence"),
])
def test_source_flags(exercise, code, needle):
    flags = source_flags(["import torch", code], EXERCISES[exercise])
    assert flags and any(needle in f for f in flags), flags
    assert all(f.startswith("In [2]") or f.startswith("imports ") for f in flags)


def test_answer_flags():
    ex = EXERCISES["lora_linear"]
    assert answer_flags({"LoRALinear": lora_edu.LoRALinear}, ex) == ["`LoRALinear` is not defined in the notebook: it comes from lora_edu.core.layers"]
    sub = type("LoRALinear", (lora_edu.LoRALinear,), {"__module__": "__main__"})
    assert "subclasses lora_edu.core.layers.LoRALinear" in answer_flags({"LoRALinear": sub}, ex)[0]
    inj = EXERCISES["inject_train"]
    flags = answer_flags({"inject_lora": functools.partial(lora_edu.add_lora, r=4), "count_trainable": len}, inj)
    assert len(flags) == 2 and "not a function or class written in the notebook" in flags[0]


def test_tree_fingerprint_sees_one_byte(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.py").write_text("x = 1\n")
    before = tree_fingerprint(tmp_path)
    (tmp_path / "a" / "x.py").write_text("x = 2\n")
    assert tree_fingerprint(tmp_path) != before


# ----------------------------------------------------------------------------- the result channel


def _frame(key: bytes, payload: dict) -> bytes:
    body = json.dumps(payload).encode()
    return FRAME.pack(len(body)) + hmac.new(key, body, hashlib.sha256).digest() + body


def test_result_frame_needs_the_key_and_is_alone():
    key = os.urandom(32)
    good = {"result": None, "cell_errors": [], "flags": [], "error": ""}
    assert verify_frame(_frame(key, good), key) == (good, "")
    payload, why = verify_frame(_frame(os.urandom(32), good), key)
    assert payload is None and "forged" in why
    payload, why = verify_frame(_frame(key, good) + _frame(key, good), key)
    assert payload is None and "more than one" in why
    assert verify_frame(b"kim,42", key)[0] is None


# ----------------------------------------------------------------------------- the tree kill


def test_kill_tree_kills_a_grandchild_that_left_the_session():
    mark = f"m{time.time_ns()}"
    code = ("import os, subprocess, sys, time\n"
            "subprocess.Popen([sys.executable, '-c', 'import os, time; os.setsid(); time.sleep(60)'], env={**os.environ})\n"
            "time.sleep(60)\n")
    with subreaper():
        child = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "LORA_EDU_GRADING_MARK": mark}, start_new_session=True)
        time.sleep(1.0)

        def marked():
            found = []
            for d in os.listdir("/proc"):
                if d.isdigit():
                    try:
                        with open(f"/proc/{d}/environ", "rb") as f:
                            if f"LORA_EDU_GRADING_MARK={mark}".encode() in f.read():
                                found.append(int(d))
                    except OSError:
                        pass
            return found

        assert len(marked()) == 2
        kill_tree(child.pid, mark, None)
        child.wait(timeout=10)
        time.sleep(0.2)
        assert marked() == []
