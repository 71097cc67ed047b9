"""The autograder: solutions pass, stubs fail, known mistakes fail with the right message, nothing crashes."""
from __future__ import annotations

import functools
import math
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_edu.grading import CheckResult, check
from lora_edu.grading.checks import EXERCISES
from lora_edu.grading.notebooks import make_student_notebook, read_notebook, select, solution_namespace


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is faster, and much faster on a busy 2-core CI machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@functools.cache
def solution(name: str) -> dict:
    return solution_namespace(name)


def submission(name: str, **override):
    ns = {**solution(name), **override}
    return EXERCISES[name].collect(ns)


def case_of(result: CheckResult, case_id: str):
    ex = EXERCISES[result.exercise]
    idx = [c.id for c in ex.cases].index(case_id)
    return result.cases[idx]


# ----------------------------------------------------------------------------- solutions and stubs


@pytest.mark.parametrize("name", [n for n in EXERCISES if n != "inject_train"])
def test_solution_passes(name):
    r = check(name, submission(name))
    assert r.passed, str(r)
    assert r.score == 1.0 and "all passed" in str(r)


def test_solution_passes_inject_train():
    r = check("inject_train", submission("inject_train"))
    assert r.passed, str(r)


@pytest.mark.parametrize("name", list(EXERCISES))
@pytest.mark.parametrize("secret", ["term-1", "term-2"])
def test_solution_passes_the_hidden_variant(name, secret):
    """Shapes, seeds and values drawn from an instructor secret: the solutions pass them all."""
    r = check(name, submission(name), secret=secret)
    assert r.passed and r.variant == "hidden", str(r)


def _run_student_copy(name: str) -> dict:
    """Execute a generated student copy in-process (our own stubs: trusted), continuing past errors."""
    nb = make_student_notebook(read_notebook(select([name])[0]))
    ns: dict = {"__name__": "__main__"}
    for cell in nb["cells"]:
        if cell["cell_type"] != "code" or "# SELF-CHECK" in cell["source"]:
            continue
        if "train(" in cell["source"] and "def " not in cell["source"]:
            continue  # training cells: the stubbed functions make the check fail anyway; skip them for speed
        try:
            exec(compile(cell["source"], "<student>", "exec"), ns)
        except Exception:  # noqa: BLE001 - stubs raise NotImplementedError
            pass
    return ns


@pytest.mark.parametrize("name", list(EXERCISES))
def test_blank_stub_fails_without_crashing(name):
    ns = _run_student_copy(name)
    r = check(name, EXERCISES[name].collect(ns))
    assert not r.passed and r.score < 0.5, str(r)
    assert "NotImplementedError" in str(r) or "defines no" in str(r) or "cannot be tested" in str(r)


def test_student_copy_has_stubs_and_no_solutions():
    for path in select(None):
        nb = make_student_notebook(read_notebook(path))
        text = "".join(c["source"] for c in nb["cells"])
        assert "BEGIN SOLUTION" not in text and "END SOLUTION" not in text
        assert "raise NotImplementedError" in text
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb["cells"] if c["cell_type"] == "code")
        assert nb["metadata"]["lora_edu"]["exercise"] in EXERCISES
        assert any("check(" in c["source"] and "# SELF-CHECK" in c["source"] for c in nb["cells"])


def test_strip_solutions_keeps_indentation():
    from lora_edu.grading.notebooks import strip_solutions

    src = "def f(x):\n    ### BEGIN SOLUTION\n    return x + 1\n    ### END SOLUTION\n"
    out = strip_solutions(src)
    assert "return x + 1" not in out
    ns: dict = {}
    exec(out, ns)
    with pytest.raises(NotImplementedError):
        ns["f"](1)
    with pytest.raises(ValueError):
        strip_solutions("### BEGIN SOLUTION\nx = 1\n")


# ----------------------------------------------------------------------------- exercise 1: known mistakes


def Good():
    return solution("lora_linear")["LoRALinear"]


def mutant(**methods):
    return type("LoRALinear", (Good(),), methods)


def _fwd_alpha(self, x):  # E2: the article's W(x) + alpha * B(A(x))
    return self.base(x) + self.alpha * (x @ self.A.T @ self.B.T) if not self.merged else self.base(x)


def _merge_unscaled(self):  # E3: W.weight.data += B.weight @ A.weight
    with torch.no_grad():
        self.base.weight += self.B @ self.A
    self.merged = True


def _unmerge_unscaled(self):
    with torch.no_grad():
        self.base.weight -= self.B @ self.A
    self.merged = False


def _init_both_random(self, base, r, alpha, dropout=0.0):
    Good().__init__(self, base, r, alpha, dropout)
    with torch.no_grad():
        self.B.normal_()


def _init_not_frozen(self, base, r, alpha, dropout=0.0):
    Good().__init__(self, base, r, alpha, dropout)
    base.requires_grad_(True)


def _fwd_no_bias(self, x):
    return x @ self.base.weight.T + self.scale * (x @ self.A.T @ self.B.T)


def _unmerge_noop(self):
    self.merged = False


def _fwd_ignores_merged(self, x):
    return self.base(x) + self.scale * (x @ self.A.T @ self.B.T)


def _init_a_in_r(self, base, r, alpha, dropout=0.0):
    Good().__init__(self, base, r, alpha, dropout)
    self.A = nn.Parameter(torch.empty(base.in_features, r))
    nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
    self.B = nn.Parameter(torch.zeros(r, base.out_features))


def _init_fan_in_trap(self, base, r, alpha, dropout=0.0):
    Good().__init__(self, base, r, alpha, dropout)
    A = torch.empty(base.in_features, r)
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # fan_in = r
    self.A = nn.Parameter(A.T.contiguous())


def _init_randn(self, base, r, alpha, dropout=0.0):
    Good().__init__(self, base, r, alpha, dropout)
    self.A = nn.Parameter(torch.randn(r, base.in_features))


def _init_zero_A(self, base, r, alpha, dropout=0.0):
    Good().__init__(self, base, r, alpha, dropout)
    with torch.no_grad():
        self.A.zero_()


def _init_scale_alpha_r(self, base, r, alpha, dropout=0.0):
    Good().__init__(self, base, r, alpha, dropout)
    self.scale = alpha * r


def _init_scale_one(self, base, r, alpha, dropout=0.0):
    Good().__init__(self, base, r, alpha, dropout)
    self.scale = 1.0


def _init_rslora(self, base, r, alpha, dropout=0.0):
    Good().__init__(self, base, r, alpha, dropout)
    self.scale = alpha / math.sqrt(r)


def _init_float32_factors(self, base, r, alpha, dropout=0.0):
    Good().__init__(self, base, r, alpha, dropout)
    self.A = nn.Parameter(self.A.detach().float())
    self.B = nn.Parameter(self.B.detach().float())


def _fwd_dropout_always(self, x):
    if self.merged:
        return self.base(x)
    return self.base(x) + self.scale * (F.dropout(x, self.dropout.p) @ self.A.T @ self.B.T)


def _fwd_dropout_output(self, x):
    if self.merged:
        return self.base(x)
    return self.dropout(self.base(x) + self.scale * (x @ self.A.T @ self.B.T))


def _merge_no_guard(self):
    with torch.no_grad():
        self.base.weight += self.scale * (self.B @ self.A)
    self.merged = True


def _fwd_column(self, x):  # ΔW·x, column-vector convention
    if self.merged:
        return self.base(x)
    return self.base(x) + self.scale * (self.B @ (self.A @ x))


def _fwd_detached(self, x):
    if self.merged:
        return self.base(x)
    return self.base(x) + self.scale * (x @ self.A.detach().T @ self.B.detach().T)


def _fwd_transposed_dW(self, x):
    if self.merged:
        return self.base(x)
    return self.base(x) + self.scale * (x @ self.B @ self.A)


# (name, class, failing case id, substring of that case's message)
MISTAKES = [
    ("E2 bare-alpha forward", lambda: mutant(forward=_fwd_alpha), "forward", "is the scale α/r?"),
    ("E3 unscaled merge", lambda: mutant(merge=_merge_unscaled, unmerge=_unmerge_unscaled), "merge", "without the scale α/r"),
    ("B and A both random", lambda: mutant(__init__=_init_both_random), "noop_init", "B is not zero"),
    ("base left trainable", lambda: mutant(__init__=_init_not_frozen), "frozen", "requires_grad=True"),
    ("missing base bias", lambda: mutant(forward=_fwd_no_bias), "bias", "misses the base layer's bias"),
    ("unmerge does not restore W", lambda: mutant(unmerge=_unmerge_noop), "unmerge", "unmerge() did not change W"),
    ("branch added after merge", lambda: mutant(forward=_fwd_ignores_merged), "merged_forward", "counted twice"),
    ("A shaped (in, r)", lambda: mutant(__init__=_init_a_in_r), "shapes", "has shape (in, r)"),
    ("Kaiming fan-in trap", lambda: mutant(__init__=_init_fan_in_trap), "init_A", "fan-in trap"),
    ("A = randn", lambda: mutant(__init__=_init_randn), "init_A", "√in times too large"),
    ("A and B both zero", lambda: mutant(__init__=_init_zero_A), "init_A", "never learns"),
    ("scale α·r", lambda: mutant(__init__=_init_scale_alpha_r), "forward", "multiplied by α·r"),
    ("no scale", lambda: mutant(__init__=_init_scale_one), "forward", "not scaled"),
    ("rsLoRA scale", lambda: mutant(__init__=_init_rslora), "forward", "rsLoRA scale α/√r"),
    ("dtype mismatch", lambda: mutant(__init__=_init_float32_factors), "float64", "dtype"),
    ("dropout also in eval", lambda: mutant(forward=_fwd_dropout_always), "dropout", "eval() mode"),
    ("dropout on the base output", lambda: mutant(forward=_fwd_dropout_output), "dropout", "touches the base output"),
    ("double merge adds ΔW twice", lambda: mutant(merge=_merge_no_guard), "double_merge", "W + 2·ΔW"),
    ("W·x column convention", lambda: mutant(forward=_fwd_column), "forward", "x @ A.T @ B.T"),
    ("ΔWᵀ applied", lambda: mutant(forward=_fwd_transposed_dW), "forward", "x @ A.T @ B.T"),
    ("detached factors", lambda: mutant(forward=_fwd_detached), "grads", "does not require grad"),
]


@pytest.mark.parametrize("label,make,case_id,needle", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_lora_linear_mistake_is_named(label, make, case_id, needle):
    r = check("lora_linear", make())
    c = case_of(r, case_id)
    assert not c.passed, f"{label}: case {case_id} passed\n{r}"
    assert r.passed == c.optional  # a mistake in the optional case costs nothing; any other fails the check
    assert needle in c.message, f"{label}: {c.message!r}"
    text = str(r)
    assert c.name in text


def test_e2_message_says_r_times_too_large():
    c = case_of(check("lora_linear", mutant(forward=_fwd_alpha)), "forward")
    assert "r times too large" in c.hint and "E2" in c.hint


def test_e3_message_names_the_article():
    c = case_of(check("lora_linear", mutant(merge=_merge_unscaled, unmerge=_unmerge_unscaled)), "merge")
    assert "E3" in c.hint


# ----------------------------------------------------------------------------- exercise 1: hostile code


class Crashes(nn.Module):
    def __init__(self, base, r, alpha):
        super().__init__()
        raise ZeroDivisionError("boom")


def _fwd_loop(self, x):
    while True:
        pass


def _fwd_nan(self, x):
    return self.base(x) * float("nan")


def _fwd_tuple(self, x):
    return (self.base(x),)


def _fwd_exit(self, x):
    sys.exit(3)


def _fwd_recursion(self, x):
    return self(x)


def _init_lora_A_names(self, base, r, alpha, dropout=0.0):  # E4: lora_A / lora_B names
    nn.Module.__init__(self)
    self.base = base.requires_grad_(False)
    self.lora_A = nn.Parameter(torch.zeros(r, base.in_features))
    self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))


@pytest.mark.parametrize("sub,needle", [
    (Crashes, "ZeroDivisionError"),
    (None, "not a class"),
    (42, "not a class"),
    (object, "does not subclass nn.Module"),
    ("missing", "defines no `LoRALinear`"),
])
def test_bad_submissions_fail_cleanly(sub, needle):
    from lora_edu.grading.battery import MISSING

    r = check("lora_linear", MISSING if sub == "missing" else sub, timeout=2)
    assert not r.passed and needle in str(r)


@pytest.mark.parametrize("method,case_id,needle", [
    (_fwd_loop, "forward", "timed out"),
    (_fwd_nan, "forward", "NaN"),
    (_fwd_tuple, "forward", "not a torch.Tensor"),
    (_fwd_exit, "forward", "SystemExit"),
    (_fwd_recursion, "forward", "recursion"),
])
def test_hostile_forward_becomes_failed_case(method, case_id, needle):
    r = check("lora_linear", mutant(forward=method), timeout=0.5)
    c = case_of(r, case_id)
    assert not c.passed and needle in c.message, c.message


def test_missing_attributes_named():
    r = check("lora_linear", mutant(__init__=_init_lora_A_names), timeout=2)
    assert "has no attribute `A`" in case_of(r, "shapes").message


def test_instance_instead_of_class():
    r = check("lora_linear", Good()(nn.Linear(4, 3), 2, 3.0))
    assert "instance" in str(r)


def test_check_leaves_student_rng_alone():
    torch.manual_seed(123)
    a = torch.rand(3)
    torch.manual_seed(123)
    check("lora_linear", Good())
    assert torch.equal(torch.rand(3), a)


def test_time_limit_interrupts_and_cleans_up():
    import signal
    import time

    from lora_edu.grading.timelimit import CaseTimeout, time_limit

    t = time.monotonic()
    with pytest.raises(CaseTimeout):
        with time_limit(0.2):
            while True:
                try:
                    while True:
                        pass
                except Exception:  # swallowing Exception does not stop it
                    pass
    assert time.monotonic() - t < 2
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0
    with time_limit(1.0):
        pass
    time.sleep(0.3)  # nothing fires afterwards


# ----------------------------------------------------------------------------- exercises 2-5: known mistakes


def test_param_savings_mistakes():
    r = check("param_savings", submission("param_savings", lora_params=lambda shapes, r: r * sum(o * i for o, i in shapes),
                                          gpt3_lora_params=4 * 96 * 4 * 2 * 12288))
    assert "r full copies of W" in case_of(r, "formula").message
    assert "all four attention matrices" in case_of(r, "gpt3").message and "twice the answer" in case_of(r, "gpt3").message
    r = check("param_savings", submission("param_savings", llama7b_lora_params=32 * 8 * 4 * 2 * 4096, llama7b_adapter_mb=79.95392))
    assert "attention only" in case_of(r, "llama_lora").message
    assert "fp32" in case_of(r, "llama_mb").message


def test_merge_precision_mistakes():
    def zero_error(layer, x):
        layer.merge()
        y = layer(x)
        out = ((layer(x) - y).abs().max() / y.abs().max()).item()
        layer.unmerge()
        return out

    r = check("merge_precision", submission("merge_precision", merge_error=zero_error,
                                            bf16_spacing=lambda w: 2.0 ** (math.floor(math.log2(abs(w))) - 10), why_bf16="c"))
    assert "exactly 0" in case_of(r, "err16").message
    assert "float16" in case_of(r, "spacing").message
    assert "exponent bits" in case_of(r, "why").message

    def stays_merged(layer, x):
        y0 = layer(x).double()
        layer.merge()
        return ((layer(x).double() - y0).abs().max() / y0.abs().max()).item()

    r = check("merge_precision", submission("merge_precision", merge_error=stays_merged))
    assert "still merged" in case_of(r, "leaves_unmerged").message


def test_delta_analysis_mistakes():
    def energy_sigma(s, t=0.9):
        e = s.double().cumsum(0)
        return int((e >= t * e[-1]).nonzero()[0]) + 1

    def phi_max(A1, A2, i, j):
        U1 = torch.linalg.svd(A1.double(), full_matrices=False).Vh.T
        U2 = torch.linalg.svd(A2.double(), full_matrices=False).Vh.T
        return ((U1[:, :i].T @ U2[:, :j]) ** 2).sum().item() / max(i, j)

    r = check("delta_analysis", submission("delta_analysis", energy_rank=energy_sigma, subspace_similarity=phi_max,
                                           singular_values=lambda M: torch.linalg.svdvals(M).flip(0)))
    assert "not σ²" in case_of(r, "energy").message
    assert "max(i, j)" in case_of(r, "similarity").message
    assert "ascending" in case_of(r, "spectrum").message

    def off_by_one(s, t=0.9):
        e = (s.double() ** 2).cumsum(0)
        return int((e >= t * e[-1]).nonzero()[0])

    assert "0-based" in case_of(check("delta_analysis", submission("delta_analysis", energy_rank=off_by_one)), "energy").message


def test_inject_train_mistakes():
    from lora_edu import LoRALinear

    def inject_no_freeze(model, targets, r, alpha):
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets]
        for n in names:
            parent, _, child = n.rpartition(".")
            p = model.get_submodule(parent)
            base = getattr(p, child)
            layer = LoRALinear(base, r, alpha)
            base.requires_grad_(True)
            setattr(p, child, layer)
        return sorted(names)

    def inject_first_block(model, targets, r, alpha):
        model.requires_grad_(False)
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets and ".0." in n]
        for n in names:
            parent, _, child = n.rpartition(".")
            p = model.get_submodule(parent)
            setattr(p, child, LoRALinear(getattr(p, child), r, alpha))
        return sorted(names)

    sub = {"inject_lora": inject_no_freeze, "count_trainable": lambda m: (sum(p.numel() for p in m.parameters()),) * 2,
           "trained_model": "not a model"}
    r = check("inject_train", sub)
    assert "still train" in case_of(r, "freeze").message
    assert "every parameter counted as trainable" in case_of(r, "count").message
    assert "trained_model is str" in case_of(r, "trained").message
    r = check("inject_train", {**sub, "inject_lora": inject_first_block})
    assert "only the first block" in case_of(r, "inject").message
