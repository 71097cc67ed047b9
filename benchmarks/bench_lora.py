#!/usr/bin/env python
"""LoRA training and inference speed: lora_edu vs PEFT vs the frozen-model floor, in one process.

    python benchmarks/bench_lora.py                  # GPT-2-small shape, CUDA (bf16 autocast, fused AdamW)
    python benchmarks/bench_lora.py --quick          # the performance-goals table in one run (see QUICK_MODES), then bench_mixed.py
    python benchmarks/bench_lora.py --size cpu       # a smaller decoder that finishes in minutes on a CPU
    python benchmarks/bench_lora.py --size tiny      # seconds; what tests/test_benchmarks.py runs

Every configuration of the first performance study is built fresh from the same seed, timed for
``--steps`` steps after ``--warmup`` (median; CUDA events on GPU, wall clock on
CPU), and its peak GPU memory recorded; one table with ratios to the floor (or to
the base model for inference) and to PEFT's matching configuration is printed
and written to ``benchmarks/results/<name>.{json,md}``.  See benchmarks/README.md.

lora_edu rows are built with ``lora_edu.add_lora`` and then, unless the row says
"plain LoRALinear", ``lora_edu.fuse(model, ...)`` (the fused layer, with its defaults
unless the row names an option).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lora_edu  # noqa: E402
from lora_edu.atomic import atomic_write_bytes  # noqa: E402  (results are written whole or not at all)
from lora_edu.lab.models import GPT, GPTConfig  # noqa: E402

try:  # PEFT is optional: its rows are skipped without it
    import peft  # noqa: E402
    from peft import LoraConfig, get_peft_model  # noqa: E402
except Exception:  # pragma: no cover - depends on the environment
    peft = None

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
QV = ["q_proj", "v_proj"]

# GPT-2-small shape: 12 layers, d 768, 12 heads, MLP 768→3072→768, vocab 50,304, batch 8×1024.
SIZES = {
    "gpt2": dict(n_layer=12, n_head=12, d_model=768, d_ff=3072, vocab_size=50304, seq=1024, batch=8, steps=20, warmup=5),
    "cpu": dict(n_layer=4, n_head=4, d_model=256, d_ff=1024, vocab_size=8192, seq=256, batch=4, steps=8, warmup=2),
    "tiny": dict(n_layer=2, n_head=2, d_model=32, d_ff=64, vocab_size=128, seq=32, batch=2, steps=2, warmup=1),
}


# ----------------------------------------------------------------------------- model + configurations
def build_model(size: dict, device: torch.device, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = GPTConfig(
        vocab_size=size["vocab_size"], block_size=size["seq"], n_layer=size["n_layer"], n_head=size["n_head"],
        d_model=size["d_model"], d_ff=size["d_ff"], dropout=0.0, bias=True,  # GPT-2 has biases
    )
    with torch.device(device):
        model = GPT(cfg)
    return model


def _randomise_B(params, seed: int = 1) -> None:
    """B = 0 at init would make every LoRA branch multiply zeros: never time on zeros (device METHOD.md)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_((torch.randn(p.shape, generator=g) * 0.01).to(p))


# The lora_edu layer as shipped: fuse(model) with its defaults (no weight cache, q/k/v share one input cast).
FUSED = dict(cache_weights=False, share_input_cast=True)
PLAIN = None  # no fuse(): the plain LoRALinear, the readable formula


def setup_lora_edu(model, targets, r, options=FUSED):
    """``add_lora``, B randomised, then ``lora_edu.fuse(model, **options)``; ``options=None`` (PLAIN): the plain LoRALinear."""
    lora_edu.add_lora(model, targets=targets, r=r, alpha=2 * r)
    _randomise_B([l.B for _, l in lora_edu.lora_layers(model)])
    if options is not None:
        lora_edu.fuse(model, **options)
    return lora_edu.lora_parameters(model)


def setup_peft(model, targets, r):
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.0, bias="none")
    pm = get_peft_model(model, cfg)  # injects in place: ``model`` itself now holds PEFT's layers
    _randomise_B([p for n, p in model.named_parameters() if "lora_B" in n])
    return pm, [p for p in model.parameters() if p.requires_grad]


def setup_floor(model):
    """Every weight frozen, yet backward runs through the whole network (the embedding output requires grad)."""
    lora_edu.freeze(model)
    model.tok_emb.register_forward_hook(lambda m, i, out: out.requires_grad_())
    return []


PLAIN_ROW = "ablation r=8 all: plain LoRALinear (no fuse)"
RECOMPUTE = dict(FUSED, recompute_input=True)
RECOMPUTE_ROW = "lora_edu r=8 all linear, recompute_input=True"
OP_COMPILE_ROW = "ablation r=8 all: fused, compile_op=True"
# --quick (the performance-goals table): each row and the modes it is measured in; "compile" is the whole model under torch.compile
E, G, C = "eager", "graph", "compile"
QUICK_MODES = {
    "frozen floor": {E, G, C},
    "PEFT r=8 all linear": {E, G, C},
    "lora_edu r=8 all linear": {E, G, C},  # under compile: the compiler traces the plain formula (fuse's default compile_op=False)
    OP_COMPILE_ROW: {C},  # the custom operator torch.ops.lora_edu.lora_linear (fuse(model, compile_op=True))
    RECOMPUTE_ROW: {E, G},  # the memory opt-in (eager only: under compile the compiler picks what to recompute)
    PLAIN_ROW: {E, G},
    "inference: base model": {E, G},
    "inference: lora_edu unmerged (r=8 all)": {E, G},
    "inference: lora_edu merged": {E, G},
    "inference: PEFT unmerged (r=8 all)": {E, G},
    "inference: PEFT merged": {E, G},
}
QUICK_ROWS = tuple(QUICK_MODES)
# --compile (compiled rows only)
COMPILE_ROWS = ("frozen floor", "PEFT r=8 all linear", "lora_edu r=8 all linear", OP_COMPILE_ROW, "inference: base model",
                "inference: lora_edu unmerged (r=8 all)", "inference: PEFT unmerged (r=8 all)")


def _lora(targets, r, options, merged=False):
    """A builder: lora_edu at rank r on ``targets``, with ``options`` (see :func:`setup_lora_edu`)."""

    def build(m):
        params = setup_lora_edu(m, targets, r, options)
        if merged:
            lora_edu.merge_lora(m)
            return []
        return params

    return build


def configurations(has_peft: bool, ablations: bool):
    """(name, kind, builder, fuse options, PEFT partner); fuse options None: plain LoRALinear, else fuse(model, **options)."""
    peft8 = "PEFT r=8 all linear"
    peft_unmerged = "inference: PEFT unmerged (r=8 all)"
    cached, unshared = dict(FUSED, cache_weights=True), dict(FUSED, share_input_cast=False)
    neither = dict(cache_weights=True, share_input_cast=False)
    T = []
    T.append(("full fine-tuning", "train", lambda m: list(m.parameters()), None, None))
    T.append(("frozen floor", "train", setup_floor, None, None))
    if has_peft:
        T.append(("PEFT r=8 q,v", "train", lambda m: setup_peft(m, QV, 8)[1], None, None))
        T.append((peft8, "train", lambda m: setup_peft(m, ALL_LINEAR, 8)[1], None, None))
        T.append(("PEFT r=64 all linear", "train", lambda m: setup_peft(m, ALL_LINEAR, 64)[1], None, None))
    T.append(("lora_edu r=8 q,v", "train", _lora(QV, 8, FUSED), FUSED, "PEFT r=8 q,v"))
    T.append(("lora_edu r=8 all linear", "train", _lora(ALL_LINEAR, 8, FUSED), FUSED, peft8))
    T.append(("lora_edu r=64 all linear", "train", _lora(ALL_LINEAR, 64, FUSED), FUSED, "PEFT r=64 all linear"))
    T.append((RECOMPUTE_ROW, "train", _lora(ALL_LINEAR, 8, RECOMPUTE), RECOMPUTE, peft8))
    if ablations:
        nop = dict(FUSED, compile_op=True)
        T.append((OP_COMPILE_ROW, "train", _lora(ALL_LINEAR, 8, nop), nop, peft8))
        T.append((PLAIN_ROW, "train", _lora(ALL_LINEAR, 8, PLAIN), PLAIN, peft8))
        T.append(("ablation r=8 all: fused, cache_weights=True", "train", _lora(ALL_LINEAR, 8, cached), cached, peft8))
        T.append(("ablation r=8 all: fused, share_input_cast=False", "train", _lora(ALL_LINEAR, 8, unshared), unshared, peft8))
        T.append(("ablation r=8 all: fused, cache_weights=True, share_input_cast=False", "train",
                  _lora(ALL_LINEAR, 8, neither), neither, peft8))
    T.append(("inference: base model", "infer", lambda m: [], None, None))
    T.append(("inference: lora_edu unmerged (r=8 all)", "infer", _lora(ALL_LINEAR, 8, FUSED), FUSED, peft_unmerged))
    T.append(("inference: lora_edu merged", "infer", _lora(ALL_LINEAR, 8, FUSED, merged=True), FUSED, "inference: PEFT merged"))
    if ablations:
        T.append(("ablation inference: lora_edu unmerged, plain LoRALinear (no fuse)", "infer",
                  _lora(ALL_LINEAR, 8, PLAIN), PLAIN, peft_unmerged))
        T.append(("ablation inference: lora_edu unmerged, fused, cache_weights=True", "infer",
                  _lora(ALL_LINEAR, 8, cached), cached, peft_unmerged))
        T.append(("ablation inference: lora_edu merged, fused, cache_weights=True", "infer",
                  _lora(ALL_LINEAR, 8, cached, merged=True), cached, "inference: PEFT merged"))
    if has_peft:
        T.append((peft_unmerged, "infer", lambda m: setup_peft(m, ALL_LINEAR, 8)[1], None, None))

        def peft_merged(m):
            pm, _ = setup_peft(m, ALL_LINEAR, 8)
            return pm.merge_and_unload()

        T.append(("inference: PEFT merged", "infer", peft_merged, None, None))
    return T


# ----------------------------------------------------------------------------- timing
def timed(fn, steps: int, warmup: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for s, e in ev:
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) for s, e in ev]
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def capture_graph(warm, body) -> torch.cuda.CUDAGraph:
    """PyTorch's whole-network capture recipe: warm up with ``warm`` on a side stream, then capture ``body``."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            warm()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph


def autocast_ctx(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _prepare(builder, size, device) -> tuple[nn.Module, list]:
    """A fresh model with the configuration applied (lora_edu rows: add_lora, then fuse unless plain): (model, params)."""
    model = build_model(size, device)
    out = builder(model)
    if isinstance(out, nn.Module):  # PEFT merge_and_unload returns the plain model
        return out, []
    return model, out


def _measure(kind, builder, size, device, precision, steps, warmup, data, graphs, compile_) -> dict:
    """Everything of one configuration lives in this frame, so that it is all freed when it returns."""
    model, params = _prepare(builder, size, device)
    idx, tgt = data
    opt = None
    if compile_:
        torch._dynamo.reset()  # a fresh model each row: never hit the recompile limit (and silently fall back to eager)
    fwd = torch.compile(model) if compile_ else model
    if kind == "train":
        model.train()
        if params:
            kw = dict(fused=True, capturable=True) if graphs else dict(fused=device.type == "cuda")
            opt = torch.optim.AdamW(params, lr=1e-4, **kw)

        def body():
            with autocast_ctx(device, precision):
                logits = fwd(idx)
                loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), tgt.view(-1))
            loss.backward()
            if opt is not None:
                opt.step()

        def fn():
            body()
            if opt is not None:
                opt.zero_grad(set_to_none=True)
    else:
        model.eval()

        def body():
            with torch.no_grad(), autocast_ctx(device, precision):
                fwd(idx)

        fn = body

    n_trainable = sum(p.numel() for p in params)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    if graphs:
        graph = capture_graph(fn, body)
        times = timed(graph.replay, steps, warmup, device)
    else:
        times = timed(fn, steps, max(warmup, 2) if compile_ else warmup, device)  # compiling happens in warm-up
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if (device.type == "cuda" and not graphs) else None
    return dict(ms=statistics.median(times), ms_min=min(times), ms_all=times, peak_gib=peak, trainable=n_trainable)


def run_one(name, kind, builder, options, size, device, precision, steps, warmup, data, graphs=False, compile_=False):
    """Build the configuration fresh and time it.

    ``graphs``: capture the whole step in a CUDA graph and time its replays; ``compile_``: the
    model under ``torch.compile`` (default mode).  ``options``: None runs the plain LoRALinear,
    a dict runs ``lora_edu.fuse(model, **options)``.
    """
    r = _measure(kind, builder, size, device, precision, steps, warmup, data, graphs, compile_)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return dict(name=name, kind=kind, **r, fused=options)


# ----------------------------------------------------------------------------- check + profile
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def equivalence_check(size, device, precision, data) -> dict:
    """Same weights, same A and B: the fused layer, the plain LoRALinear and PEFT give the same logits.

    (Keys keep the names of earlier results: "fast" is the fused layer, "general" the plain one.)
    """
    idx = data[0][:2]
    m1 = build_model(size, device)
    setup_lora_edu(m1, ALL_LINEAR, 8, PLAIN)
    res = {}
    with torch.no_grad(), autocast_ctx(device, precision):
        y_plain = m1(idx).float()
        lora_edu.fuse(m1)
        y_fused = m1(idx).float()
        lora_edu.fuse(m1, cache_weights=True)
        y_cached = m1(idx).float()
    res["fast_vs_general_rel"] = _rel(y_fused, y_plain)
    res["fast_cache_weights_vs_general_rel"] = _rel(y_cached, y_plain)
    if peft is not None:
        m2 = build_model(size, device)
        setup_peft(m2, ALL_LINEAR, 8)
        sd = {}
        for name, layer in lora_edu.lora_layers(m1):
            sd[f"{name}.lora_A.default.weight"] = layer.A.detach()
            sd[f"{name}.lora_B.default.weight"] = layer.B.detach()
        missing = [k for k in sd if k not in dict(m2.named_parameters())]
        assert not missing, missing[:3]
        with torch.no_grad():
            for k, p in m2.named_parameters():
                if k in sd:
                    p.copy_(sd[k])
            with autocast_ctx(device, precision):
                y_peft = m2(idx).float()
        res["fast_vs_peft_rel"] = _rel(y_fused, y_peft)
        del m2
    del m1
    gc.collect()
    return res


def _kernel_times(builder, size, device, precision, data, n: int = 3) -> dict:
    """{kernel: (CUDA ms per step, calls per step)} of one training step."""
    from torch.profiler import ProfilerActivity, profile

    model, params = _prepare(builder, size, device)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True) if params else None
    idx, tgt = data

    def fn():
        with autocast_ctx(device, precision):
            logits = model(idx)
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), tgt.view(-1))
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    k = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None)
        if t is None:
            t = e.cuda_time_total
        if t > 0:
            k[e.key] = (k.get(e.key, (0, 0))[0] + t / n / 1e3, k.get(e.key, (0, 0))[1] + e.count // n)
    return k


def profile_pair(size, device, precision, data, out_dir: Path) -> str:
    """Per-kernel CUDA time of one training step: frozen floor vs lora_edu r=8 all linear (fused)."""
    tables = {}
    for label, builder in (("floor", setup_floor), ("lora_r8_all", _lora(ALL_LINEAR, 8, FUSED))):
        tables[label] = _kernel_times(builder, size, device, precision, data)
        gc.collect()
        torch.cuda.empty_cache()
    lines = ["| kernel | floor ms/step | lora ms/step | Δ ms | calls floor → lora |", "|---|---|---|---|---|"]
    keys = set(tables["floor"]) | set(tables["lora_r8_all"])
    rows = []
    for key in keys:
        a, ca = tables["floor"].get(key, (0.0, 0))
        b, cb = tables["lora_r8_all"].get(key, (0.0, 0))
        rows.append((b - a, key, a, b, ca, cb))
    rows.sort(key=lambda r: -abs(r[0]))
    tot_a = sum(v[0] for v in tables["floor"].values())
    tot_b = sum(v[0] for v in tables["lora_r8_all"].values())
    for d, key, a, b, ca, cb in rows[:25]:
        lines.append(f"| `{key[:90]}` | {a:.3f} | {b:.3f} | {d:+.3f} | {ca} → {cb} |")
    lines.append(f"| **sum of kernel time** | {tot_a:.2f} | {tot_b:.2f} | {tot_b - tot_a:+.2f} | |")
    text = "\n".join(lines)
    atomic_write_bytes((out_dir / "profile_floor_vs_lora.md"), (text + "\n").encode())
    return text


# ----------------------------------------------------------------------------- report
MODES = (("", "eager"), ("_graph", "CUDA graph"), ("_compile", "torch.compile"))


def add_ratios(rows: list[dict], partners: dict) -> None:
    by = {r["name"]: r for r in rows}
    floor = by.get("frozen floor")
    base = by.get("inference: base model")
    for r in rows:
        ref = floor if r["kind"] == "train" else base
        p = by.get(partners.get(r["name"]) or "")
        for suffix, _ in MODES:
            ms = r.get("ms" + suffix)
            ok = ms is not None
            r["ratio_ref" + suffix] = ms / ref["ms" + suffix] if (ok and ref and ref.get("ms" + suffix)) else None
            r["ratio_peft" + suffix] = ms / p["ms" + suffix] if (ok and p and p.get("ms" + suffix)) else None
        for suffix in ("", "_compile"):
            peak, fpeak = r.get("peak_gib" + suffix), floor and floor.get("peak_gib" + suffix)
            r["mem_ratio_floor" + suffix] = peak / fpeak if (r["kind"] == "train" and peak and fpeak) else None


# Performance targets: (row, column suffix, what, target text, test); ratios are to the frozen floor / base model of the same mode.
GOALS = (
    ("lora_edu r=8 all linear", "_compile", "r=8 all-linear step / floor (torch.compile)", "≤ 1.10", lambda v: v <= 1.10),
    ("lora_edu r=8 all linear", "_graph", "r=8 all-linear step / floor (CUDA graph)", "≤ 1.08", lambda v: v <= 1.08),
    ("lora_edu r=8 all linear", "", "r=8 all-linear step / floor (eager)", "≤ 1.30", lambda v: v <= 1.30),
    ("inference: lora_edu unmerged (r=8 all)", "", "unmerged inference / base (eager)", "≤ 1.30", lambda v: v <= 1.30),
    ("inference: lora_edu unmerged (r=8 all)", "_graph", "unmerged inference / base (CUDA graph)", "≤ 1.05", lambda v: v <= 1.05),
    ("inference: lora_edu merged", "", "merged inference / base (eager)", "≤ 1.00", lambda v: v <= 1.00),
    ("inference: lora_edu merged", "_graph", "merged inference / base (CUDA graph)", "≤ 1.00", lambda v: v <= 1.00),
)


def goals(rows: list[dict]) -> list[tuple[str, float | None, str, bool | None]]:
    by = {r["name"]: r for r in rows}
    g = []
    for name, suffix, label, target, test in GOALS:
        r = by.get(name)
        if r and r.get("ms" + suffix) is not None and r.get("ratio_ref" + suffix) is not None:
            v = r["ratio_ref" + suffix]
            g.append((label, v, target, bool(test(v))))
    lo, rc = by.get("lora_edu r=8 all linear"), by.get(RECOMPUTE_ROW)
    for suffix, mode in (("", "eager"), ("_compile", "torch.compile")):
        if lo and lo.get("mem_ratio_floor" + suffix) is not None:
            v = lo["mem_ratio_floor" + suffix]
            g.append((f"r=8 all-linear peak memory / floor, default fuse() ({mode})", v, "≤ 1.10", v <= 1.10))
    if rc and rc.get("mem_ratio_floor") is not None:  # the opt-in: its memory and its time, no target of its own
        g.append(("r=8 all-linear peak memory / floor, recompute_input=True (eager)", rc["mem_ratio_floor"], "opt-in: measured", None))
        for suffix, mode in (("", "eager"), ("_graph", "CUDA graph")):
            if rc.get("ratio_ref" + suffix) is not None:
                g.append((f"recompute_input=True step / floor ({mode})", rc["ratio_ref" + suffix], "opt-in: measured", None))
    return g


def _f(v, fmt):
    return "–" if v is None else format(v, fmt)


def _describe(options) -> str:
    if options is None:
        return "plain"
    return "fuse(" + ", ".join(f"{k}={v}" for k, v in options.items()) + ")"


def render(meta: dict, rows: list[dict], goal_rows, check: dict) -> str:
    title = f"# LoRA benchmark: {meta['size_name']} on {meta['device_name']}"
    out = [title + (" (torch.compile)" if meta.get("compiled") else ""), ""]
    out.append(
        f"{meta['date']} · torch {meta['torch']} · peft {meta['peft'] or 'not installed'} · "
        f"{meta['precision']} · batch {meta['batch']}×{meta['seq']} tokens · median of {meta['steps']} steps "
        f"after {meta['warmup']} warm-up ({meta['timer']})"
    )
    out.append("")
    out.append(f"Model: {meta['model']}")
    out.append("")
    graphs = any(r.get("ms_graph") is not None for r in rows)
    compiled = any(r.get("ms_compile") is not None for r in rows)
    head = "| configuration | step (ms) | peak memory (GiB) | × floor / base | × PEFT | memory × floor |"
    sep = "|---|---|---|---|---|---|"
    if graphs:
        head += " CUDA graph (ms) | graph × floor / base | graph × PEFT |"
        sep += "---|---|---|"
    if compiled:
        head += " compiled (ms) | compiled × floor / base | compiled × PEFT | compiled peak (GiB) |"
        sep += "---|---|---|---|"
    out += [head + " trainable params | lora_edu layer |", sep + "---|---|"]
    for r in rows:
        line = (
            f"| {r['name']} | {_f(r['ms'], '.2f')} | {_f(r['peak_gib'], '.2f')} | {_f(r['ratio_ref'], '.3f')} | "
            f"{_f(r['ratio_peft'], '.3f')} | {_f(r['mem_ratio_floor'], '.3f')} |"
        )
        if graphs:
            line += (f" {_f(r.get('ms_graph'), '.2f')} | {_f(r.get('ratio_ref_graph'), '.3f')} |"
                     f" {_f(r.get('ratio_peft_graph'), '.3f')} |")
        if compiled:
            line += (f" {_f(r.get('ms_compile'), '.2f')} | {_f(r.get('ratio_ref_compile'), '.3f')} |"
                     f" {_f(r.get('ratio_peft_compile'), '.3f')} | {_f(r.get('peak_gib_compile'), '.2f')} |")
        layer = _describe(r.get("fused")) if r["name"].startswith(("lora_edu", "ablation", "inference: lora_edu")) else "–"
        out.append(line + f" {_f(r['trainable'], ',')} | {layer} |")
    out.append("")
    out.append(
        "Training rows are ratioed to the frozen floor, inference rows to the base model. "
        "'step' is eager PyTorch (Python dispatch and kernel launches included)"
        + ("; 'CUDA graph' replays the same step captured in one graph (launch overhead removed: GPU time)" if graphs else "")
        + ("; 'compiled' is the whole model under torch.compile (default mode), where the compiler traces the fused layer's plain "
           "formula (fuse's default compile_op=False) and the compile_op=True row calls the custom operator "
           "torch.ops.lora_edu.lora_linear instead." if compiled else ".")
        + " 'lora_edu layer': plain = LoRALinear as constructed, fuse(...) = lora_edu.fuse(model, ...)."
    )
    out.append("")
    if goal_rows:
        out.append("| goal | measured | target | met |")
        out.append("|---|---|---|---|")
        for name, v, target, ok in goal_rows:
            out.append(f"| {name} | {_f(v, '.3f')} | {target} | {'–' if ok is None else ('yes' if ok else 'no')} |")
        out.append("")
    if check:
        values = ", ".join(f"{k} = {v:.2e}" for k, v in check.items())
        out.append("Equivalence check (same weights and adapters, logits, relative Frobenius error; fast = fused, "
                   "general = plain LoRALinear): " + values)
        out.append("")
    return "\n".join(out)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default=None, help="gpt2 (default on CUDA), cpu (default on CPU), tiny")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--no-peft", action="store_true", help="skip PEFT rows even if peft is installed")
    ap.add_argument("--no-ablations", action="store_true", help="skip the ablation rows (plain LoRALinear, fuse() options)")
    ap.add_argument("--no-graphs", action="store_true", help="CUDA: skip the CUDA-graph replay timings")
    ap.add_argument("--compile", action="store_true", help="only the key rows, each model under torch.compile (default mode)")
    ap.add_argument("--with-compile", action="store_true",
                    help="add a torch.compile pass (a 'compiled' column, with its peak memory) to every row")
    ap.add_argument("--quick", action="store_true",
                    help="the performance-goals table: the rows of QUICK_MODES in their modes (eager, CUDA graph, torch.compile), "
                         "with bench_mixed.py (run between the CUDA-graph and the compile pass) into the same --out-dir; "
                         "results stem gets '_quick'; <stem>.partial.json holds the rows measured so far")
    ap.add_argument("--no-compile", action="store_true", help="--quick without its torch.compile pass")
    ap.add_argument("--no-mixed", action="store_true", help="--quick without the mixed-adapter benchmark (bench_mixed.py)")
    ap.add_argument("--profile", action="store_true", help="CUDA only: per-kernel time of floor vs lora_edu r=8 all linear")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--name", default=None, help="file stem of the results (default: gpu_<card> or cpu)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    if args.quick and args.compile:
        ap.error("--quick already has a torch.compile column; --compile is the compiled-only table")

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    size_name = args.size or ("gpt2" if device.type == "cuda" else "cpu")
    size = dict(SIZES[size_name])
    steps = args.steps or size["steps"]
    warmup = args.warmup if args.warmup is not None else size["warmup"]
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    has_peft = peft is not None and not args.no_peft
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"

    g = torch.Generator().manual_seed(123)
    idx = torch.randint(0, size["vocab_size"], (size["batch"], size["seq"]), generator=g).to(device)
    tgt = torch.randint(0, size["vocab_size"], (size["batch"], size["seq"]), generator=g).to(device)
    data = (idx, tgt)

    probe = build_model(size, torch.device("meta"))
    meta = dict(
        date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        device_name=device_name, device=str(device), torch=torch.__version__,
        cuda=torch.version.cuda, peft=getattr(peft, "__version__", None) if has_peft else None,
        python=platform.python_version(), size_name=size_name, precision=precision,
        batch=size["batch"], seq=size["seq"], steps=steps, warmup=warmup,
        timer="CUDA events" if device.type == "cuda" else "wall clock", compiled=bool(args.compile),
        with_compile=bool(args.with_compile or args.quick), quick=bool(args.quick),
        model=(
            f"GPT decoder, {size['n_layer']} layers, d_model {size['d_model']}, {size['n_head']} heads, "
            f"MLP {size['d_model']}→{size['d_ff']}→{size['d_model']}, vocabulary {size['vocab_size']:,}, biases, "
            f"{sum(p.numel() for p in probe.parameters()) / 1e6:.1f} M parameters (lora_edu.lab.models.GPT), "
            "fp32 weights, AdamW" + (" (fused)" if device.type == "cuda" else "")
        ),
    )
    del probe
    print(f"# {meta['model']}\n# {device_name}, torch {meta['torch']}, peft {meta['peft']}, {precision}", flush=True)

    out_dir = Path(args.out_dir)
    card = device_name.lower().replace("nvidia", "").strip().split()[0]
    stem = args.name or (("cpu" if device.type == "cpu" else "gpu_" + card) + ("_quick" if args.quick else ""))

    def checkpoint():  # rows so far, after every measurement: a run cut short by a time limit still leaves its numbers
        if not args.no_write:
            out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(out_dir / f"{stem}.partial.json", json.dumps(dict(meta=meta, rows=rows), indent=1).encode())

    check = equivalence_check(size, device, precision, data)
    print("# equivalence:", check, flush=True)

    rows, partners = [], {}
    graphs = device.type == "cuda" and not args.no_graphs
    with_compile = (args.with_compile or args.quick) and not args.no_compile
    configs = configurations(has_peft, not args.no_ablations or args.quick)
    if args.quick:
        configs = [c for c in configs if c[0] in QUICK_ROWS]
    if args.compile:
        configs = [c for c in configs if c[0] in COMPILE_ROWS]
        graphs = with_compile = False

    def modes(name):  # which passes measure this row
        if args.compile:
            return {E}  # the compiled-only table: its "eager" pass runs compiled
        m = QUICK_MODES[name] if args.quick else ({C} if name == OP_COMPILE_ROW else {E, G, C})
        return {x for x in m if (x != G or graphs) and (x != C or with_compile)}

    configs = [c for c in configs if modes(c[0])]
    for name, kind, builder, options, partner in configs:  # eager pass: times and clean peak memory
        partners[name] = partner
        if E not in modes(name):
            rows.append(dict(name=name, kind=kind, ms=None, ms_min=None, ms_all=[], peak_gib=None, trainable=None, fused=options))
            continue
        r = run_one(name, kind, builder, options, size, device, precision, steps, warmup, data, compile_=args.compile)
        rows.append(r)
        print(f"  {name:<50} {r['ms']:9.2f} ms  peak {_f(r['peak_gib'], '.2f')} GiB", flush=True)
        checkpoint()
    # second pass, after every eager row, so that no graph pool can inflate an eager peak
    for r, (name, kind, builder, options, partner) in zip(rows, configs):
        if G in modes(name):
            rg = run_one(name, kind, builder, options, size, device, precision, steps, warmup, data, graphs=True)
            r["ms_graph"], r["ms_graph_all"] = rg["ms"], rg["ms_all"]
            print(f"  {name:<50} {r['ms_graph']:9.2f} ms  (CUDA graph)", flush=True)
            checkpoint()
    mixed = None
    if args.quick and not args.no_mixed:  # many adapters in one batch (the last performance goal), before the long compile pass
        import bench_mixed

        margs = ["--size", size_name, "--device", str(device), "--out-dir", str(out_dir)] + (["--no-peft"] if not has_peft else [])
        margs += (["--steps", str(args.steps)] if args.steps else []) + (["--warmup", str(args.warmup)] if args.warmup is not None else [])
        mixed = bench_mixed.main(margs + (["--no-write"] if args.no_write else []) + (["--no-graphs"] if not graphs else []))
    # third pass: each configuration built fresh and compiled (compilation happens in the warm-up)
    for r, (name, kind, builder, options, partner) in zip(rows, configs):
        if C in modes(name):
            rc = run_one(name, kind, builder, options, size, device, precision, steps, warmup, data, compile_=True)
            r["ms_compile"], r["ms_compile_all"], r["peak_gib_compile"] = rc["ms"], rc["ms_all"], rc["peak_gib"]
            r["trainable"] = rc["trainable"] if r["trainable"] is None else r["trainable"]
            print(f"  {name:<50} {r['ms_compile']:9.2f} ms  (torch.compile)", flush=True)
            checkpoint()
    add_ratios(rows, partners)
    goal_rows = goals(rows) if device.type == "cuda" else [gr for gr in goals(rows) if "memory" not in gr[0]]
    if mixed is not None:
        goal_rows = goal_rows + [(m["goal"], m["measured"], m["target"], m["met"]) for m in mixed["goals"]]
    text = render(meta, rows, goal_rows, check)
    if mixed is not None:
        text += "\n## Many adapters in one batch (bench_mixed.py)\n\n" + bench_mixed.render(mixed["meta"], mixed["rows"], []).split("\n", 2)[2]
    if args.profile and device.type == "cuda":
        out_dir.mkdir(parents=True, exist_ok=True)
        prof = profile_pair(size, device, precision, data, out_dir)
        text += "\n## Where the time goes: CUDA kernels per training step, floor vs lora_edu r=8 all linear\n\n" + prof + "\n"
    print()
    print(text)
    goal_dicts = [dict(goal=a, measured=b, target=c, met=d) for a, b, c, d in goal_rows]
    result = dict(meta=meta, rows=rows, goals=goal_dicts, check=check, mixed=mixed)
    if not args.no_write:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes((out_dir / f"{stem}.json"), (json.dumps(result, indent=1)).encode())
        atomic_write_bytes((out_dir / f"{stem}.md"), (text + "\n").encode())
        (out_dir / f"{stem}.partial.json").unlink(missing_ok=True)
        print(f"# wrote {out_dir / stem}.json and .md")
    return result


if __name__ == "__main__":
    main()
