"""Exercise 2 checker: inject LoRA into a small transformer by name, freeze, count, train.

The student writes ``inject_lora(model, targets, r, alpha)`` (wrap every
``nn.Linear`` whose own name is in ``targets`` with :class:`lora_edu.LoRALinear`,
freeze everything else, return the replaced names) and ``count_trainable(model)``
(→ ``(trainable, total)``), then fine-tunes :func:`base_model` on
:func:`target_task` and hands in ``trained_model``.

Stated quality: on the target task's validation windows (:data:`EVAL_BATCHES`
batches, fixed), the fine-tuned model's loss must be at least
:data:`QUALITY_DROP` nats/char below the frozen base model's, with only the LoRA
factors changed.  The checker measures both losses itself.

The base is the shipped ``gpt-tiny`` checkpoint (pretrained on English prose; the
target is Python code) when it exists; otherwise a seeded random-init GPT of the
same shape, so the exercise still runs (say so in class: LoRA then adapts a model
that knows nothing, which is not what the paper studies).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn

from .battery import Exercise, Fail, Named, answer, call, case_random, fmt, variant_seed

EXERCISE = Exercise(
    name="inject_train",
    title="Inject LoRA into a transformer, freeze, count, train",
    notebook="02_inject_train.ipynb",
    symbols=("inject_lora", "count_trainable", "trained_model"),
    written=("inject_lora", "count_trainable"),
    reference_names=("add_lora", "freeze", "count_parameters", "lora_parameters", "lora_edu.core.inject", "lora_edu.core.counting"),
    allowed_grading_imports=("lora_edu.grading", "lora_edu.grading.ex_inject_train"),
)
case = EXERCISE.case

BLOCK_SIZE = 32  # shorter windows than pretraining (64): faster on a laptop CPU
QUALITY_DROP = 0.3  # nats/char the target val loss must fall below the base model's
EVAL_BATCHES = 6
EVAL_BATCH_SIZE = 32


def base_model() -> nn.Module:
    """The model to adapt: the pretrained ``gpt-tiny`` if shipped, else a seeded random-init tiny GPT."""
    try:
        from lora_edu.lab.pretrain import load_pretrained

        return load_pretrained("gpt-tiny")
    except (FileNotFoundError, ImportError, OSError, KeyError, RuntimeError):
        from lora_edu.lab.models import GPT, GPTConfig

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return GPT(GPTConfig.preset("tiny")).eval()


@functools.lru_cache(maxsize=1)
def target_task():
    """The provided task: next-character prediction on Python source code (lora_edu.lab.data.lm_tasks' target)."""
    from lora_edu.lab import data

    return data.lm_tasks(seed=0, block_size=BLOCK_SIZE)[1]


def evaluate(model, task=None) -> float:
    task = task or target_task()
    return task.evaluate(model, split="val", batch_size=EVAL_BATCH_SIZE, max_batches=EVAL_BATCHES)["loss"]


@functools.lru_cache(maxsize=1)
def _base_loss() -> float:
    return evaluate(base_model())


def _is_lora(m: nn.Module) -> bool:
    return isinstance(getattr(m, "A", None), torch.Tensor) and isinstance(getattr(m, "B", None), torch.Tensor)


def _fresh():
    from lora_edu.lab.models import GPT, GPTConfig

    rng = case_random("fresh")
    n_layer, d_model = (2, 32) if not variant_seed() else (rng.randint(2, 3), rng.choice([16, 24, 32]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1 + variant_seed() % 100000)
        return GPT(GPTConfig.preset("tiny", n_layer=n_layer, d_model=d_model, d_ff=2 * d_model, block_size=16))


TARGET_SETS = (["q_proj", "v_proj"], ["o_proj"], ["k_proj", "up_proj", "down_proj"])


def target_sets() -> list[list[str]]:
    """The public target sets, plus (graded runs) one drawn from the grading secret."""
    sets = [list(t) for t in TARGET_SETS]
    if variant_seed():
        rng = case_random("targets")
        sets.append(sorted(rng.sample(["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"], rng.randint(1, 4))))
    return sets


def _inject(sub, targets, r=4, alpha=6.0):
    if variant_seed():
        rng = case_random(f"inject{targets}")
        r, alpha = rng.randint(2, 6), round(rng.uniform(2.0, 12.0), 2)
    fn = answer(sub, "inject_lora", fn=True)
    model = _fresh()
    before = {n: m for n, m in model.named_modules()}
    ret = call(f"inject_lora(model, {targets}, r={r}, alpha={alpha})", fn, model, list(targets), r, alpha)
    if isinstance(ret, nn.Module) and ret is not model:
        model = ret  # returning a new model is allowed
    return model, before, ret


@case("inject_lora wraps exactly the targeted Linear layers, in every block", "inject", points=2)
def inject(sub):
    for targets in target_sets():
        model, before, ret = _inject(sub, targets)
        want = sorted(n for n, m in before.items() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets)
        got = sorted(n for n, m in model.named_modules() if _is_lora(m))
        if got != want:
            missing = sorted(set(want) - set(got))
            extra = sorted(set(got) - set(want))
            msg = f"inject_lora(model, {targets}) wrapped {len(got)} layers"
            specific = 1
            if missing and not extra and all(".0." in n for n in got) and got:
                specific = 2
                msg += f": only the first block (missing {missing[:3]})"
                hint = "loop over model.named_modules() and replace every match, not just the first"
            elif missing:
                msg += f"; missing {missing[:3]}"
                hint = "match on the last component of the module name: name.rsplit('.', 1)[-1] in targets"
            else:
                msg += f"; not targets: {extra[:3]}"
                hint = "match whole names (name.rsplit('.', 1)[-1] in targets), not substrings"
            raise Fail(msg, expected=f"{len(want)} layers: {want[:4]}{' …' if len(want) > 4 else ''}", hint=hint, specific=specific)
        for n in want:
            old, new = before[n], model.get_submodule(n)
            W = getattr(getattr(new, "base", None), "weight", None)
            if not isinstance(W, torch.Tensor) or W.shape != old.weight.shape or not torch.equal(W, old.weight):
                raise Fail(f"{n} does not wrap the original layer (its .base.weight is not the pretrained W)",
                           hint="wrap the existing module: LoRALinear(module, r, alpha); don't create a new nn.Linear")
        if isinstance(ret, (list, tuple)) and sorted(map(str, ret)) != want:
            raise Fail(f"inject_lora returned {list(ret)[:4]}", expected=f"the replaced names {want[:4]}")


@case("after inject_lora only A and B are trainable (everything else frozen)", "freeze", points=2, requires=("inject",))
def freeze(sub):
    model, _, _ = _inject(sub, ["q_proj", "v_proj"])
    lora_ids = {id(p) for m in model.modules() if _is_lora(m) for p in (m.A, m.B)}
    trainable_other = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in lora_ids]
    frozen_lora = [n for n, p in model.named_parameters() if not p.requires_grad and id(p) in lora_ids]
    if trainable_other:
        raise Named(f"{len(trainable_other)} parameter tensors outside the LoRA factors still train, e.g. {trainable_other[:3]}",
                   expected="only the A and B of the injected layers have requires_grad=True",
                   hint="freeze the whole model first (model.requires_grad_(False)), then inject: the new A and B stay trainable")
    if frozen_lora:
        raise Fail(f"the LoRA factors are frozen too: {frozen_lora[:3]}", expected="A and B trainable",
                   hint="freeze before injecting, not after (or re-enable A and B)")


@case("the injected model computes the same outputs as before (B = 0)", "freeze", requires=("inject",))
def noop(sub):
    model = _fresh()
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        y0 = model(x)
    fn = answer(sub, "inject_lora", fn=True)
    ret = call("inject_lora(model, ['q_proj', 'v_proj'], r=4, alpha=6.0)", fn, model, ["q_proj", "v_proj"], 4, 6.0)
    model = ret if isinstance(ret, nn.Module) else model
    with torch.no_grad():
        y1 = call("model(x) after injection", model, x)
    if not isinstance(y1, torch.Tensor) or y1.shape != y0.shape:
        raise Fail("the injected model's output has another shape", expected=str(tuple(y0.shape)))
    err = (y1 - y0).abs().max().item()
    if not math.isfinite(err) or err > 1e-5:
        raise Fail(f"after injection the logits changed by up to {fmt(err)}", expected="identical outputs at init",
                   hint="don't re-initialise anything: LoRALinear starts with B = 0, so the injected model equals the base")


@case("count_trainable(model) returns (trainable, total) — and r·(in + out) per adapted layer", "count", points=2)
def count(sub):
    fn = answer(sub, "count_trainable", fn=True)
    for targets in ([], ["q_proj", "v_proj"], ["up_proj"]):
        model = _fresh()
        if targets:
            from lora_edu import add_lora

            add_lora(model, targets, r=4, alpha=8)
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        got = call("count_trainable(model)", fn, model)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise Fail(f"count_trainable returned {type(got).__name__} {got!r:.60}", expected="a pair (trainable, total)")
        try:
            t, n = int(got[0]), int(got[1])
        except (TypeError, ValueError, OverflowError):
            raise Fail(f"count_trainable returned {got!r:.60}", expected="two integers") from None
        what = f"count_trainable on a tiny GPT with LoRA on {targets or 'nothing'} returned ({t}, {n})"
        if (t, n) == (trainable, total):
            continue
        if (t, n) == (total, trainable):
            raise Fail(what + ": swapped", expected=f"({trainable}, {total})", hint="return (trainable, total), in that order")
        if n == trainable and t == trainable:
            raise Fail(what + ": the total leaves out the frozen parameters", expected=f"({trainable}, {total})",
                       hint="total counts every parameter, frozen or not")
        if t == total:
            raise Fail(what + ": every parameter counted as trainable", expected=f"({trainable}, {total})",
                       hint="count only p.numel() for p with p.requires_grad")
        raise Fail(what, expected=f"({trainable}, {total})",
                   hint="sum(p.numel() for p in model.parameters() if p.requires_grad), and the same without the condition")


@case(f"trained_model: only the LoRA factors changed, and the target loss fell by ≥ {QUALITY_DROP} nats/char "
      "(proportional credit below that)", "train", points=4, min_timeout=120)
def trained(sub):
    model = answer(sub, "trained_model")
    if not isinstance(model, nn.Module):
        raise Fail(f"trained_model is {type(model).__name__}", expected="the fine-tuned nn.Module")
    loras = [(n, m) for n, m in model.named_modules() if _is_lora(m)]
    if not loras:
        raise Fail("trained_model has no LoRA layers", hint="inject_lora(model, ['q_proj', 'v_proj'], ...) before training")
    base = base_model()
    ref = dict(base.named_parameters())
    changed = []
    for n, p in model.named_parameters():
        key = n.replace(".base.", ".")
        if key in ref and ref[key].shape == p.shape:
            merged = any(n.startswith(ln + ".") and getattr(m, "merged", False) for ln, m in loras)
            if not merged and not torch.equal(p.detach().cpu(), ref[key].detach()):
                changed.append(n)
    if changed:
        raise Fail(f"{len(changed)} frozen tensors changed during training, e.g. {changed[:3]}",
                   expected="only A and B change under LoRA", hint="check requires_grad before building the optimizer")
    task = target_task()
    before = _base_loss()
    after = call("evaluating trained_model", evaluate, model, task)
    drop = before - after
    if not math.isfinite(after) or drop < QUALITY_DROP:
        credit = max(0.0, drop / QUALITY_DROP) if math.isfinite(after) else 0.0
        raise Fail(f"target val loss {fmt(after)} vs {fmt(before)} for the base model: a drop of {fmt(drop)} nats/char "
                   f"({credit:.0%} of the stated drop, so {credit:.0%} of this case's points)",
                   expected=f"a drop ≥ {QUALITY_DROP}",
                   hint="train longer or with a larger learning rate (Adam, lr ≈ 1e-2 for LoRA), and check the loss goes down",
                   credit=min(credit, 0.99))
    return f"val loss {before:.3f} → {after:.3f} nats/char"
