"""Exercise 4 checker: parameter savings of LoRA, computed from the shapes of real architectures.

Oracles are the formulas themselves: an adapted Linear(in, out) trains r·(in + out)
parameters (A: r×in, B: out×r).  GPT-3 175B (Brown et al. 2020): 96 layers,
d_model 12288; LoRA r = 4 on W_q and W_v gives 18,874,368 (Hu et al. 2021 report
18.87M, "10,000×" fewer than 175B).  LLaMA-7B (Touvron et al. 2023): 32 layers,
d 4096, SwiGLU hidden 11008, vocab 32000, untied head; 6,738,415,616 parameters.
"""
from __future__ import annotations

import math

from .battery import Exercise, Fail, Named, answer, call, case_random, fmt

EXERCISE = Exercise(
    name="param_savings",
    title="Parameter savings for a real architecture",
    notebook="04_param_savings.ipynb",
    symbols=("lora_params", "gpt3_lora_params", "gpt3_reduction", "llama7b_total_params", "llama7b_lora_params",
             "llama7b_trainable_percent", "llama7b_adapter_mb"),
    written=("lora_params",),
    reference_names=("lora_edu.lab.architectures.lora_params", "count_parameters"),
    allowed_grading_imports=("lora_edu.grading", "lora_edu.lab.architectures"),
)
case = EXERCISE.case

GPT3 = dict(n_layer=96, d=12288, total=175e9)
GPT3_LORA = 2 * 96 * 4 * (12288 + 12288)  # r=4 on W_q, W_v: 18,874,368
LLAMA = dict(n_layer=32, d=4096, ff=11008, vocab=32000)
LLAMA_TOTAL = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096) + 2 * 32000 * 4096 + 4096  # 6,738,415,616
LLAMA_LORA = 32 * 8 * (4 * (4096 + 4096) + 2 * (4096 + 11008) + (11008 + 4096))  # r=8 on all 7 matrices: 19,988,480


def _number(sub, name) -> float:
    v = answer(sub, name)
    try:
        f = float(v)
    except (TypeError, ValueError, OverflowError):
        raise Fail(f"`{name}` is {type(v).__name__} {v!r:.60}, not a number") from None
    if not math.isfinite(f):
        raise Fail(f"`{name}` is {f}")
    return f


def _carried(sub, name) -> float | None:
    """The student's own earlier answer, for judging a later step with the error carried forward."""
    try:
        v = _number(sub, name)
    except Fail:
        return None
    return v if v > 0 else None


def _oracle(shapes, r):
    return r * sum(i + o for o, i in shapes)


@case("lora_params(shapes, r) = r·Σ(in + out) on random shapes", "formula", points=2)
def formula(sub):
    fn = answer(sub, "lora_params")
    if not callable(fn):
        raise Fail("`lora_params` is not a function", expected="def lora_params(shapes, r): ...")
    rng = case_random(4)
    for _ in range(6):
        shapes = [(rng.randint(3, 900), rng.randint(3, 900)) for _ in range(rng.randint(1, 5))]
        r = rng.randint(2, 16)
        got = call(f"lora_params({shapes}, r={r})", fn, list(shapes), r)
        want = _oracle(shapes, r)
        try:
            ok = int(got) == want and float(got) == want
        except (TypeError, ValueError, OverflowError):
            raise Fail(f"lora_params returned {type(got).__name__} {got!r:.60}", expected=f"the integer {want}") from None
        if ok:
            continue
        g = float(got)
        txt = f"lora_params({shapes}, r={r}) returned {got!r}"
        if g == r * sum(i * o for o, i in shapes):
            raise Named(txt + ": r·in·out per matrix, i.e. r full copies of W", expected=str(want),
                       hint="A is (r, in) and B is (out, r): r·in + out·r = r·(in + out) per adapted matrix, never in·out")
        if g == sum(i + o for o, i in shapes):
            raise Fail(txt + ": Σ(in + out) without the factor r", expected=str(want), hint="each of the r rank-one pieces has in + out numbers")
        if g == r * sum(i for o, i in shapes) or g == r * sum(o for o, i in shapes):
            raise Fail(txt + ": only A (r·in) or only B (out·r) is counted", expected=str(want), hint="count both factors: r·in + out·r")
        if g == r * r * sum(i + o for o, i in shapes):
            raise Fail(txt + ": r²·(in + out)", expected=str(want), hint="r appears once: r·(in + out)")
        if len(shapes) > 1 and g == _oracle(shapes[:1], r):
            raise Fail(txt + ": only the first matrix is counted", expected=str(want), hint="sum over every (out, in) in shapes")
        if len(shapes) > 1 and g == _oracle([(i, o) for o, i in shapes][:1], r):
            raise Fail(txt + ": only the first matrix is counted", expected=str(want), hint="sum over every (out, in) in shapes")
        raise Fail(txt, expected=f"r·Σ(in + out) = {want}")


@case("GPT-3 175B, r = 4 on W_q and W_v: the paper's 18.87M trainable parameters", "gpt3", points=2)
def gpt3(sub):
    got = _number(sub, "gpt3_lora_params")
    if got == GPT3_LORA:
        return f"{int(got):,}"
    L, d, r = 96, 12288, 4
    known = {
        L * r * 2 * d: "only one matrix per layer: the paper adapts both W_q and W_v",
        2 * L * r * d: "only one factor (A or B) per matrix: count r·(in + out)",
        4 * L * r * 2 * d: "twice the answer: all four attention matrices, or r = 8? The paper's 18.87M is r = 4 on W_q and W_v only",
        2 * r * 2 * d: "a single layer: multiply by the 96 layers",
        2 * L * d * d: "the full W_q and W_v (d² each): that is what LoRA avoids training",
    }
    raise Fail(f"gpt3_lora_params = {got:,.0f}" + (f": {known[got]}" if got in known else ""),
               expected=f"2 matrices × 96 layers × r·(12288 + 12288) = {GPT3_LORA:,}",
               hint="GPT-3 175B: 96 layers, d_model = 12288, W_q and W_v are (12288, 12288)")


@case("GPT-3: reduction factor 175B / trainable ≈ 9,300× (the paper's '10,000×')", "gpt3")
def gpt3_reduction(sub):
    got = _number(sub, "gpt3_reduction")
    want = GPT3["total"] / GPT3_LORA
    if abs(got - want) <= 0.01 * want:
        return f"{got:,.0f}×"
    own = _carried(sub, "gpt3_lora_params")
    if own and abs(got - GPT3["total"] / own) <= 0.01 * GPT3["total"] / own:
        return f"{got:,.0f}×: right for your gpt3_lora_params (error carried forward: that mistake is counted once, above)"
    if abs(got - 1 / want) <= 0.01 / want:
        raise Fail(f"gpt3_reduction = {fmt(got)}: that is trainable / total", expected=f"total / trainable ≈ {want:,.0f}",
                   hint="the reduction factor is how many times fewer parameters train: 175e9 / gpt3_lora_params")
    raise Fail(f"gpt3_reduction = {fmt(got)}", expected=f"175e9 / {GPT3_LORA:,} ≈ {want:,.0f}")


@case("LLaMA-7B total parameters from its shapes: 6,738,415,616", "llama")
def llama_total(sub):
    got = _number(sub, "llama7b_total_params")
    if got == LLAMA_TOTAL:
        return f"{int(got):,}"
    d, ff, L, V = 4096, 11008, 32, 32000
    known = {
        LLAMA_TOTAL - V * d: "the LM head is missing, or counted as tied: LLaMA's lm_head is a separate (32000, 4096) matrix",
        LLAMA_TOTAL - L * d * ff: "the MLP has only two matrices here: LLaMA's SwiGLU MLP has gate_proj, up_proj and down_proj",
        LLAMA_TOTAL - 2 * L * d - d: "the RMSNorm weights (2 per layer + 1 final, 4096 each) are missing",
        LLAMA_TOTAL - 2 * V * d: "the embedding and the head are missing",
    }
    raise Fail(f"llama7b_total_params = {got:,.0f}" + (f": {known[got]}" if got in known else ""),
               expected=f"{LLAMA_TOTAL:,} (32 × (4·d² + 3·d·11008 + 2·d) + 2·32000·d + d, d = 4096)",
               hint="per layer: q, k, v, o are (4096, 4096); gate, up are (11008, 4096); down is (4096, 11008); two RMSNorms")


@case("LLaMA-7B, r = 8 on all seven Linear layers of each block", "llama", points=2)
def llama_lora(sub):
    got = _number(sub, "llama7b_lora_params")
    if got == LLAMA_LORA:
        return f"{int(got):,}"
    L, r, d, ff = 32, 8, 4096, 11008
    attn = L * r * 4 * 2 * d
    known = {
        attn: "attention only (q, k, v, o): the question adapts the MLP's gate, up and down too",
        L * r * 2 * 2 * d: "W_q and W_v only: the question adapts all seven matrices",
        attn + L * r * 3 * 2 * d: "the MLP matrices counted as (4096, 4096): their hidden width is 11008",
        attn + L * r * 2 * (d + ff): "two MLP matrices: LLaMA's SwiGLU MLP has three (gate, up, down)",
    }
    raise Fail(f"llama7b_lora_params = {got:,.0f}" + (f": {known[got]}" if got in known else ""),
               expected=f"32 × 8 × (4·(4096+4096) + 3·(4096+11008)) = {LLAMA_LORA:,}",
               hint="use your lora_params() with the seven (out, in) shapes of one block, times 32 layers")


@case("LLaMA-7B: trainable share in percent (≈ 0.30 %)", "llama")
def llama_percent(sub):
    got = _number(sub, "llama7b_trainable_percent")
    want = 100 * LLAMA_LORA / LLAMA_TOTAL
    if abs(got - want) <= 0.01 * want:
        return f"{got:.3f} %"
    own_lora, own_total = _carried(sub, "llama7b_lora_params"), _carried(sub, "llama7b_total_params")
    if own_lora and own_total:
        own = 100 * own_lora / own_total
        if abs(got - own) <= 0.01 * own:
            return f"{got:.3f} %: right for your own counts (error carried forward: counted once, above)"
    if abs(got - want / 100) <= 0.01 * want / 100:
        raise Fail(f"llama7b_trainable_percent = {fmt(got)}: a fraction, not a percentage", expected=f"{want:.3f}", hint="multiply by 100")
    raise Fail(f"llama7b_trainable_percent = {fmt(got)}", expected=f"100 × {LLAMA_LORA:,} / {LLAMA_TOTAL:,} = {want:.3f}")


@case("LLaMA-7B adapter file size in fp16, in MB (10⁶ bytes)", "llama")
def llama_mb(sub):
    got = _number(sub, "llama7b_adapter_mb")
    want = LLAMA_LORA * 2 / 1e6
    if abs(got - want) <= 0.01 * want:
        return f"{got:.1f} MB"
    own_lora = _carried(sub, "llama7b_lora_params")
    if own_lora and abs(got - own_lora * 2 / 1e6) <= 0.01 * own_lora * 2 / 1e6:
        return f"{got:.1f} MB: right for your llama7b_lora_params (error carried forward: counted once, above)"
    for factor, why in ((2, "4 bytes per parameter (fp32): fp16 is 2 bytes"), (0.5, "1 byte per parameter: fp16 is 2 bytes"),
                        (1e6 / 2**20, "MiB (2²⁰ bytes): the question asks for MB = 10⁶ bytes")):
        if abs(got - want * factor) <= 0.01 * want * factor:
            raise Fail(f"llama7b_adapter_mb = {fmt(got)}: {why}", expected=f"{want:.2f}")
    raise Fail(f"llama7b_adapter_mb = {fmt(got)}", expected=f"{LLAMA_LORA:,} × 2 bytes / 10⁶ = {want:.2f} MB")
