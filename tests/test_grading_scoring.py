"""Fair scoring and sharper diagnoses: severity weights, independent cases, error carried forward, proportional and
optional credit, the most specific hint first, hidden variants that defeat hard-coded answers."""
from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn as nn

from lora_edu.grading import check
from lora_edu.grading.checks import EXERCISES, variant_for
from lora_edu.grading.notebooks import solution_namespace


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@functools.cache
def Good():
    return solution_namespace("lora_linear")["LoRALinear"]


def mutant(**methods):
    return type("LoRALinear", (Good(),), methods)


def case(result, case_id):
    return next(c for c in result.cases if c.case_id == case_id)


def _init_with(scale_of):
    def __init__(self, base, r, alpha, dropout=0.0):
        Good().__init__(self, base, r, alpha, dropout)
        self.scale = scale_of(alpha, r)

    return __init__


def _merge_with(update):
    def merge(self):
        if self.merged:
            raise RuntimeError("already merged")
        with torch.no_grad():
            update(self)
        self.merged = True

    return merge


# ----------------------------------------------------------------------------- independent cases, error carried forward


def test_scale_alpha_r_costs_the_forward_case_not_every_case_after_it():
    r = check("lora_linear", mutant(__init__=_init_with(lambda a, r: a * r)))
    assert "multiplied by α·r" in case(r, "forward").got
    for later in ("bias", "batched", "row_vectors", "float64", "grads", "merge", "merge_low_precision", "merged_forward", "unmerge"):
        assert case(r, later).passed, (later, case(r, later).message)
    assert "own scale" in case(r, "bias").got
    assert not any("cannot be tested" in c.got for c in r.cases)
    assert r.points == r.possible - 5  # one mistake, charged once: the forward case


def test_weights_follow_severity():
    """A B that never learns costs more than a merge that forgets the scale (each is one realistic mistake)."""
    def plain_B(self, base, r, alpha, dropout=0.0):
        Good().__init__(self, base, r, alpha, dropout)
        B = self.B.detach().clone()
        del self.B
        self.B = B

    unscaled = mutant(merge=_merge_with(lambda s: s.base.weight.add_(s.B @ s.A)),
                      unmerge=lambda s: (s.base.weight.data.sub_(s.B @ s.A), setattr(s, "merged", False)))
    lost_B = check("lora_linear", mutant(__init__=plain_B))
    lost_merge = check("lora_linear", unscaled)
    assert "never learns" in case(lost_B, "parameters").got
    assert lost_B.points < lost_merge.points < lost_B.possible


# ----------------------------------------------------------------------------- sharper diagnoses


def test_merge_applying_the_scale_twice_is_named():
    r = check("lora_linear", mutant(merge=_merge_with(lambda s: s.base.weight.add_(s.scale * s.scale * (s.B @ s.A)))))
    c = case(r, "merge")
    assert not c.passed and "applied twice" in c.got and c.specific == 2
    assert "the scale is exactly α/r" not in c.message


def test_merge_that_mutates_B_is_named():
    def merge(self):
        with torch.no_grad():
            self.B.mul_(self.scale)  # folds the scale into B
            self.base.weight.add_(self.B @ self.A)
        self.merged = True

    c = case(check("lora_linear", mutant(merge=merge)), "merge")
    assert not c.passed and "merge() changed layer.B" in c.got and "folded into B" in c.got


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
def test_low_precision_merge_without_upcast_is_precision_loss(dtype_name):
    c = case(check("lora_linear", mutant(merge=_merge_with(lambda s: s.base.weight.add_(s.scale * (s.B @ s.A))))),
             "merge_low_precision")
    assert not c.passed and "precision loss" in c.got and "the scale is exactly" not in c.message
    assert "float16" in c.got  # the first low-precision base that fails is named
    assert dtype_name in ("float16", "bfloat16")


def test_most_specific_hint_is_shown_first():
    r = check("lora_linear", mutant(__init__=_init_with(lambda a, r: a)))  # the article's E2, via the scale
    best = r.best_hint()
    assert best is not None and best.specific == 2 and "r times too large" in best.hint
    assert str(r).splitlines()[1].startswith("  most likely problem: your update is r times too large")


# ----------------------------------------------------------------------------- optional, proportional, carried forward


def test_optional_dropout_is_really_optional():
    def no_dropout(self, base, r, alpha):
        Good().__init__(self, base, r, alpha)

    r = check("lora_linear", mutant(__init__=no_dropout))
    c = case(r, "dropout")
    assert c.optional and c.passed and "skipped" in c.got
    assert r.passed and r.points == r.possible == check("lora_linear", Good()).possible


def test_training_gets_proportional_credit():
    import lora_edu
    from lora_edu.grading import ex_inject_train as ex
    from lora_edu.lab.train import train

    model = ex.base_model()
    lora_edu.add_lora(model, ["q_proj", "v_proj"], r=8, alpha=16)  # only the training case is looked at here
    train(model, ex.target_task(), steps=2, batch_size=16, lr=2e-3, progress=False, eval_every=0, eval_at_start=False, seed=0)
    drop = ex.evaluate(ex.base_model()) - ex.evaluate(model)
    assert drop < ex.QUALITY_DROP
    r = check("inject_train", {"inject_lora": None, "count_trainable": None, "trained_model": model})
    c = case(r, "trained")
    assert not c.passed and math.isclose(c.credit, max(0.0, drop) / ex.QUALITY_DROP, rel_tol=1e-3, abs_tol=1e-3)
    assert math.isclose(c.earned, c.points * c.credit) and "of the stated drop" in c.got


def test_param_savings_carries_an_error_forward():
    ns = solution_namespace("param_savings")
    sub = {k: ns[k] for k in EXERCISES["param_savings"].symbols}
    wrong_total = sub["llama7b_total_params"] - 32000 * 4096  # the head forgotten
    sub = {**sub, "llama7b_total_params": wrong_total, "llama7b_trainable_percent": 100 * sub["llama7b_lora_params"] / wrong_total}
    r = check("param_savings", sub)
    assert not case(r, "llama_total").passed and "LM head" in case(r, "llama_total").got
    assert case(r, "llama_percent").passed and "carried forward" in case(r, "llama_percent").got


# ----------------------------------------------------------------------------- hidden variants


def test_hidden_variant_draws_other_values_and_defeats_hard_coding():
    assert variant_for("s1", "lora_linear") != variant_for("s2", "lora_linear") != 0
    ns = solution_namespace("param_savings")
    self_check_shapes = {}

    def recording(shapes, r):  # answers the self-check's questions from a table, as a student who hard-codes would
        key = (tuple(map(tuple, shapes)), r)
        if key in self_check_shapes:
            return self_check_shapes[key]
        return 0

    public = check("param_savings", {k: ns[k] for k in EXERCISES["param_savings"].symbols})
    assert public.passed

    def spy(shapes, r):
        self_check_shapes[(tuple(map(tuple, shapes)), r)] = ns["lora_params"](shapes, r)
        return ns["lora_params"](shapes, r)

    check("param_savings", {**{k: ns[k] for k in EXERCISES["param_savings"].symbols}, "lora_params": spy})
    sub = {**{k: ns[k] for k in EXERCISES["param_savings"].symbols}, "lora_params": recording}
    assert case(check("param_savings", sub), "formula").passed  # the public self-check is fooled...
    hidden = check("param_savings", sub, secret="instructor")
    assert hidden.variant == "hidden" and not case(hidden, "formula").passed  # ...the graded run is not
    assert check("param_savings", {k: ns[k] for k in EXERCISES["param_savings"].symbols}, secret="instructor").passed


def test_hidden_lora_linear_passes_the_solution_on_drawn_shapes():
    r = check("lora_linear", Good(), secret="another secret")
    assert r.passed and r.variant == "hidden"


def test_graded_returns_points_and_writes_nothing_to_stderr(capsys, monkeypatch):
    from lora_edu.grading import graded

    monkeypatch.setenv("LORA_EDU_GRADING_SECRET", "x")

    class Noisy(nn.Module):
        def __init__(self, base, r, alpha):
            import sys
            import warnings

            super().__init__()
            print("to stderr", file=sys.stderr)
            warnings.warn("a warning", stacklevel=1)
            raise ValueError("nope")

    pts = graded("lora_linear", Noisy)
    out = capsys.readouterr()
    assert out.err == "" and "to stderr" in out.out and isinstance(pts, float) and 0 <= pts < 5
