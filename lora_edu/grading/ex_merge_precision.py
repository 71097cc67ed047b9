"""Exercise 3 checker: merge equivalence, measured, and why bfloat16 breaks it.

The student writes ``merge_error(layer, x)`` — the relative error
max|y_merged − y_unmerged| / max|y_unmerged| of a ``lora_edu.LoRALinear``, leaving
the layer unmerged — and ``bf16_spacing(w)``, the gap between adjacent bfloat16
numbers at |w| (2^(⌊log₂|w|⌋ − 7): bfloat16 keeps 8 significant bits).  The checker
computes both quantities itself and compares; it also range-checks the errors the
notebook measured (float32 ~1e-7, bfloat16 ~1e-3..1e-2) and the multiple-choice
explanation.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .battery import Exercise, Fail, Named, answer, as_float, call, case_random, fmt, get_attr, variant_seed

EXERCISE = Exercise(
    name="merge_precision",
    title="Merge equivalence, float32 vs bfloat16",
    notebook="03_merge_precision.ipynb",
    symbols=("merge_error", "bf16_spacing", "err_fp32", "err_bf16", "why_bf16"),
    written=("merge_error", "bf16_spacing"),
    reference_names=("check_merge_equivalence", "lora_edu.core.equivalence"),
)
case = EXERCISE.case

WHY_BF16 = "b"
_NONFINITE_HINT = "look for a division by zero: divide by max|y_unmerged|, which is not zero"


def _float(v, what) -> float:
    return as_float(v, what, nonfinite_hint=_NONFINITE_HINT)


def make_layer(dtype: torch.dtype, seed: int, d_in: int = 48, d_out: int = 40, r: int = 4, alpha: float = 7.0):
    """A lora_edu.LoRALinear with a trained-looking (nonzero) B, and an input batch."""
    from lora_edu import LoRALinear

    if variant_seed():  # graded run: shapes and values drawn from the grading secret
        rng = case_random(f"layer{seed}")
        d_in, d_out, r, alpha = rng.randint(32, 64), rng.randint(24, 56), rng.randint(2, 8), round(rng.uniform(3.0, 12.0), 2)
    g = torch.Generator().manual_seed((seed + 7919 * variant_seed()) % 2**63)
    base = nn.Linear(d_in, d_out, bias=True)
    with torch.no_grad():
        base.weight.copy_(torch.randn(d_out, d_in, generator=g) * 0.02)
        base.bias.copy_(torch.randn(d_out, generator=g) * 0.02)
    base = base.to(dtype)
    layer = LoRALinear(base, r=r, alpha=alpha)
    with torch.no_grad():
        layer.A.copy_(torch.randn(layer.A.shape, generator=g) / math.sqrt(d_in))
        layer.B.copy_(torch.randn(layer.B.shape, generator=g) * 1e-3)
    x = torch.randn(16, d_in, generator=g).to(dtype)
    return layer, x


def reference_error(layer, x) -> float:
    with torch.no_grad():
        y0 = layer(x).double()
        layer.merge()
        y1 = layer(x).double()
        layer.unmerge()
    return ((y1 - y0).abs().max() / y0.abs().max()).item()


def _student_error(sub, dtype, seed):
    fn = answer(sub, "merge_error")
    if not callable(fn):
        raise Fail("`merge_error` is not a function", expected="def merge_error(layer, x): ...")
    layer, x = make_layer(dtype, seed)
    ref_layer, ref_x = make_layer(dtype, seed)
    want = reference_error(ref_layer, ref_x)
    got = _float(call(f"merge_error(layer, x) on a {dtype} layer", fn, layer, x), f"merge_error(...) on {dtype}")
    return layer, got, want


def _compare_error(got, want, dtype):
    if want == 0:
        ok = got == 0
    else:
        ok = abs(got - want) <= 0.05 * want + 1e-15
    if ok:
        return
    hint = "relative error = max|y_merged − y_unmerged| / max|y_unmerged|: run layer(x) before merge(), then merge(), run it again, then unmerge()"
    if got == 0 and want > 0:
        raise Named(f"merge_error returned exactly 0 on a {dtype} layer", expected=f"≈ {fmt(want)}",
                   hint="did you compute both outputs after merging (or both before)? Save y_unmerged = layer(x) before calling merge()")
    if dtype == torch.bfloat16 and 0 < got < 1e-5:
        raise Fail(f"merge_error returned {fmt(got)} on a bfloat16 layer: float32-sized", expected=f"≈ {fmt(want)}",
                   hint="measure the layer as given; converting it (or x) to float32 hides the bfloat16 rounding you are asked to see")
    raise Fail(f"merge_error returned {fmt(got)} on a {dtype} layer", expected=f"≈ {fmt(want)} (within 5 %)", hint=hint)


@case("merge_error on a float64 layer: ~1e-16", "merge_error")
def err64(sub):
    layer, got, want = _student_error(sub, torch.float64, 1)
    if got > 1e-12:
        raise Fail(f"merge_error returned {fmt(got)} on a float64 layer", expected=f"≈ {fmt(want)} (< 1e-12)",
                   hint="in float64 merged and unmerged agree to ~1e-16: if yours doesn't, the error is in how you measure it")
    return f"{fmt(got)}"


@case("merge_error on a float32 layer matches the definition (~1e-7)", "merge_error")
def err32(sub):
    layer, got, want = _student_error(sub, torch.float32, 2)
    if not (abs(got - want) <= 0.05 * want + 1e-9):
        _compare_error(got, want, torch.float32)
    return f"{fmt(got)}"


@case("merge_error on a bfloat16 layer matches the definition (~1e-3..1e-2)", "merge_error", points=2)
def err16(sub):
    layer, got, want = _student_error(sub, torch.bfloat16, 3)
    _compare_error(got, want, torch.bfloat16)
    return f"{fmt(got)}"


@case("merge_error leaves the layer unmerged, as it found it", "merge_error")
def leaves_unmerged(sub):
    fn = answer(sub, "merge_error")
    layer, x = make_layer(torch.float32, 4)
    W0 = layer.base.weight.detach().clone()
    call("merge_error(layer, x)", fn, layer, x)
    if get_attr(layer, "merged", "the layer"):
        raise Fail("after merge_error(layer, x) the layer is still merged", expected="layer.merged == False",
                   hint="call layer.unmerge() after measuring the merged output")
    err = (layer.base.weight.detach() - W0).abs().max().item()
    if err > 1e-6:
        raise Fail(f"merge_error changed the base weight by up to {fmt(err)}", expected="W restored after merge(); unmerge()")


@case("bf16_spacing(w): the gap between adjacent bfloat16 numbers at |w|", "spacing", points=2)
def spacing(sub):
    fn = answer(sub, "bf16_spacing")
    if not callable(fn):
        raise Fail("`bf16_spacing` is not a function", expected="def bf16_spacing(w): ...")
    rng = case_random(7)
    drawn = [round(rng.choice([-1, 1]) * 2.0 ** rng.uniform(-12, 9), 6) for _ in range(3)]
    for w in (0.02, 1.0, 3.0, 1e-3, -0.5, 200.0, 0.7, *drawn):
        got = _float(call(f"bf16_spacing({w})", fn, w), f"bf16_spacing({w})")
        e = math.floor(math.log2(abs(w)))
        want = 2.0 ** (e - 7)
        if got == want or abs(got - want) <= 1e-6 * want:
            continue
        txt = f"bf16_spacing({w}) returned {fmt(got)}"
        exp = f"2^(⌊log₂|w|⌋ − 7) = {fmt(want)}"
        for bits, name in ((10, "float16 (10 stored fraction bits)"), (23, "float32 (23 bits)")):
            if abs(got - 2.0 ** (e - bits)) <= 1e-6 * 2.0 ** (e - bits):
                raise Named(txt + f": the spacing of {name}", expected=exp,
                           hint="bfloat16 stores 7 fraction bits (8 significant bits): torch.finfo(torch.bfloat16).eps = 2⁻⁷")
        if abs(got - 2.0**-7) <= 1e-9 and w != 1.0 and e != 0:
            raise Fail(txt + ": the spacing at 1.0 (eps) for every w", expected=exp,
                       hint="the spacing grows with the binade: eps × 2^⌊log₂|w|⌋")
        if abs(got - 2 * want) <= 1e-6 * want or abs(got - want / 2) <= 1e-6 * want:
            raise Fail(txt + f": {'twice' if got > want else 'half'} the spacing", expected=exp,
                       hint="bfloat16: 8 significant bits, so the gap at 2^e is 2^(e−7); half of it is the largest update that rounds away")
        if got < 0:
            raise Fail(txt + ": negative", expected=exp, hint="spacing is a distance: use |w|")
        raise Fail(txt, expected=exp, hint="bfloat16 keeps 8 significant bits: eps = 2⁻⁷ at 1.0, scaled by 2^⌊log₂|w|⌋")


@case("your measured errors: float32 ~1e-7, bfloat16 ≥ 100× larger", "measured")
def measured(sub):
    e32 = _float(answer(sub, "err_fp32"), "err_fp32")
    e16 = _float(answer(sub, "err_bf16"), "err_bf16")
    if not (1e-10 <= e32 <= 1e-5):
        raise Fail(f"err_fp32 = {fmt(e32)}", expected="between 1e-10 and 1e-5 (float32 rounding)",
                   hint="measure merge_error on the float32 layer of the notebook")
    if not (1e-4 <= e16 <= 1e-1):
        raise Fail(f"err_bf16 = {fmt(e16)}", expected="between 1e-4 and 1e-1 (bfloat16 rounding)",
                   hint="measure merge_error on the bfloat16 copy of the layer")
    if e16 < 100 * e32:
        raise Fail(f"err_bf16 / err_fp32 = {fmt(e16 / e32)}", expected="≥ 100")
    return f"fp32 {fmt(e32)}, bf16 {fmt(e16)}"


@case("why merged ≠ unmerged in bfloat16 (multiple choice)", "explain")
def why(sub):
    ans = answer(sub, "why_bf16")
    if not isinstance(ans, str):
        raise Fail(f"why_bf16 is {type(ans).__name__}", expected='one letter, e.g. "a"')
    a = ans.strip().strip("()").lower()
    if a == WHY_BF16:
        return None
    explain = {
        "a": "merging is exact arithmetic; the code is the same in every dtype, only the rounding differs",
        "c": "bfloat16 has as many exponent bits as float32 (8); it has fewer *fraction* bits (7 vs 23)",
        "d": "the base weight W is what gets rounded: W + ΔW must be stored in W's dtype",
    }
    raise Fail(f'you answered "{ans}"', expected="the answer that explains the size of the error",
               hint=explain.get(a, "compare ΔW's entries with bf16_spacing(|W|): what happens to an update smaller than half a gap?"))
