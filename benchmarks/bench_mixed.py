#!/usr/bin/env python
"""Many adapters in one batch: ``lora_edu.adapter_batch`` with k = 1, 4, 16 adapters vs one adapter unmerged.

    python benchmarks/bench_mixed.py                      # GPT-2-small shape, CUDA, bf16 autocast, eager + CUDA graph
    python benchmarks/bench_mixed.py --size tiny --no-write   # seconds on a CPU (tests/test_benchmarks.py)

Inference (``no_grad``) of the GPT of ``bench_lora.py`` carrying 16 adapters (r = 8 on all six
linears, B random), fused (``lora_edu.fuse``).  For each batch shape (rows × tokens):

* base model (no LoRA layers at all);
* one adapter, unmerged — the reference cost: every row uses adapter t0;
* ``adapter_batch`` with k = 1, 4, 16 distinct adapters, rows assigned round-robin;
* PEFT 0.21 with the same 16 adapters: one adapter, and ``adapter_names=`` with k = 4, 16 (eager only:
  PEFT indexes rows with Python lists, a host copy that a CUDA graph cannot capture).

Median of ``--steps`` forwards after ``--warmup`` (CUDA events), eager and CUDA-graph replay.  An exactness
check runs every row of the k = 16 batch alone (``set_adapter``) and reports the largest relative
difference of the logits (bf16 on the GPU: both sides round differently; float32 on the CPU).
Results: ``<out-dir>/<name>.{json,md}`` (default name ``mixed_<card>`` or ``mixed_cpu``).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import bench_lora as bl  # noqa: E402  (model sizes, timing, autocast: the same as the main benchmark)

import lora_edu  # noqa: E402
from lora_edu.atomic import atomic_write_bytes  # noqa: E402

K_MAX = 16
KS = (1, 4, 16)
# (rows, tokens per row) per size: a prefill-like batch with as many tokens as bench_lora's 8 × 1,024, and a decode-like one
SHAPES = {"gpt2": ((16, 512), (64, 1)), "cpu": ((16, 64), (32, 1)), "tiny": ((16, 8),)}


def _names(k: int, rows: int) -> list[str]:
    return [f"t{i % k}" for i in range(rows)]


def build_lora(size, device, k_max=K_MAX):
    model = bl.build_model(size, device)
    for i in range(k_max):
        lora_edu.add_lora(model, bl.ALL_LINEAR, r=8, alpha=16, adapter=f"t{i}")
    bl._randomise_B([layer.lora_B[n] for _, layer in lora_edu.lora_layers(model) for n in layer.adapters])
    lora_edu.set_adapter(model, "t0")
    return lora_edu.fuse(model).eval()


def build_peft(size, device, k_max=K_MAX):
    model = bl.build_model(size, device)
    cfg = bl.LoraConfig(r=8, lora_alpha=16, target_modules=bl.ALL_LINEAR, lora_dropout=0.0, bias="none")
    pm = bl.get_peft_model(model, cfg, adapter_name="t0")
    for i in range(1, k_max):
        pm.add_adapter(f"t{i}", cfg)
    bl._randomise_B([p for n, p in model.named_parameters() if "lora_B" in n])
    pm.set_adapter("t0")
    return pm.eval()


def _time(fn, steps, warmup, device, graphs: bool) -> float:
    if not graphs:
        return statistics.median(bl.timed(fn, steps, warmup, device))
    return statistics.median(bl.timed(bl.capture_graph(fn, fn).replay, steps, warmup, device))


def measure_shape(size, device, precision, rows, seq, steps, warmup, graphs, has_peft) -> list[dict]:
    g = torch.Generator().manual_seed(7)
    idx = torch.randint(0, size["vocab_size"], (rows, seq), generator=g).to(device)
    out = []

    def run(name, fn, ctx=None, eager_only=False):
        res = dict(name=name, rows=rows, seq=seq)
        for mode in ("eager", "graph"):
            if mode == "graph" and (not graphs or eager_only):
                res["ms_graph"] = None
                continue
            with torch.no_grad(), bl.autocast_ctx(device, precision), (ctx() if ctx else _null()):
                res["ms" if mode == "eager" else "ms_graph"] = _time(fn, steps, warmup, device, mode == "graph")
        out.append(res)
        print(f"  {rows}×{seq} {name:<44} {res['ms']:8.3f} ms  graph {bl._f(res['ms_graph'], '.3f')} ms", flush=True)

    models = {"base": bl.build_model(size, device).eval()}
    run("base model", lambda: models["base"](idx))
    models["lora"] = build_lora(size, device)
    models.pop("base")
    run("lora_edu: one adapter, unmerged", lambda: models["lora"](idx))
    for k in KS:
        run(f"lora_edu: adapter_batch, k = {k}", lambda: models["lora"](idx),
            ctx=lambda k=k: lora_edu.adapter_batch(models["lora"], _names(k, rows)))
    models.clear()  # free each model before the next is built
    gc.collect()
    if has_peft:
        models["peft"] = build_peft(size, device)
        run("PEFT: one adapter, unmerged", lambda: models["peft"](idx))
        for k in (4, 16):
            run(f"PEFT: adapter_names=, k = {k}", lambda k=k: models["peft"](idx, adapter_names=_names(k, rows)), eager_only=True)
        models.clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def exactness(size, device, precision, rows, seq) -> float:
    """Largest relative difference (over rows) between the k = 16 mixed batch and each row run alone."""
    model = build_lora(size, device)
    idx = torch.randint(0, size["vocab_size"], (rows, seq), generator=torch.Generator().manual_seed(8)).to(device)
    names = _names(min(K_MAX, rows), rows)
    worst = 0.0
    with torch.no_grad(), bl.autocast_ctx(device, precision):
        with lora_edu.adapter_batch(model, names):
            mixed = model(idx).float()
        for i, n in enumerate(names):
            lora_edu.set_adapter(model, n)
            alone = model(idx[i:i + 1]).float()[0]
            worst = max(worst, ((mixed[i] - alone).norm() / alone.norm()).item())
    del model
    gc.collect()
    return worst


def add_ratios(rows: list[dict]) -> None:
    by = {(r["rows"], r["seq"], r["name"]): r for r in rows}
    for r in rows:
        key = (r["rows"], r["seq"])
        single = by.get(key + ("PEFT: one adapter, unmerged" if r["name"].startswith("PEFT") else "lora_edu: one adapter, unmerged",))
        base = by.get(key + ("base model",))
        for suffix in ("", "_graph"):
            ms = r.get("ms" + suffix)
            r["x_single" + suffix] = ms / single["ms" + suffix] if (ms and single and single.get("ms" + suffix)) else None
            r["x_base" + suffix] = ms / base["ms" + suffix] if (ms and base and base.get("ms" + suffix)) else None


def goals(rows: list[dict], shape) -> list[tuple]:
    g = []
    for r in rows:
        if (r["rows"], r["seq"]) == tuple(shape) and r["name"].startswith("lora_edu: adapter_batch"):
            for suffix, mode in (("", "eager"), ("_graph", "CUDA graph")):
                v = r.get("x_single" + suffix)
                if v is not None:
                    g.append((f"{r['name'][10:]} / one adapter unmerged ({mode}, {r['rows']}×{r['seq']})", v, "≤ 1.20", v <= 1.20))
    return g


def render(meta, rows, goal_rows) -> str:
    out = [f"# Many adapters in one batch: {meta['size_name']} on {meta['device_name']}", "",
           f"{meta['date']} · torch {meta['torch']} · peft {meta['peft'] or 'not installed'} · {meta['precision']} · "
           f"inference (no_grad), median of {meta['steps']} forwards after {meta['warmup']} warm-up ({meta['timer']}) · "
           f"16 adapters r = 8 on all six linears, lora_edu fused", "",
           f"Model: {meta['model']}", ""]
    for shape in dict.fromkeys((r["rows"], r["seq"]) for r in rows):
        out += [f"**Batch {shape[0]} rows × {shape[1]} tokens**", "",
                "| configuration | eager (ms) | × one adapter | × base | CUDA graph (ms) | × one adapter | × base |",
                "|---|---|---|---|---|---|---|"]
        for r in rows:
            if (r["rows"], r["seq"]) == shape:
                out.append(f"| {r['name']} | {r['ms']:.3f} | {bl._f(r['x_single'], '.3f')} | {bl._f(r['x_base'], '.3f')} | "
                           f"{bl._f(r['ms_graph'], '.3f')} | {bl._f(r['x_single_graph'], '.3f')} | {bl._f(r['x_base_graph'], '.3f')} |")
        out.append("")
    out.append("'× one adapter': ÷ the same library's one-adapter unmerged forward (PEFT rows ÷ PEFT's). "
               "Rows are assigned to adapters round-robin (row i uses t{i mod k}).")
    out.append("")
    if goal_rows:
        out += ["| goal | measured | target | met |", "|---|---|---|---|"]
        out += [f"| {a} | {b:.3f} | {c} | {'yes' if d else 'no'} |" for a, b, c, d in goal_rows]
        out.append("")
    out.append(f"Exactness (k = 16 batch vs each row alone with set_adapter, largest relative difference of a row's logits, "
               f"{meta['precision']}): {meta['exactness']:.2e}")
    return "\n".join(out) + "\n"


def main(argv=None, out_dir: Path | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(bl.SIZES), default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--precision", choices=["bf16", "fp32"], default=None)
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--out-dir", default=str(HERE / "results"))
    ap.add_argument("--name", default=None)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    size_name = args.size or ("gpt2" if device.type == "cuda" else "cpu")
    size = dict(bl.SIZES[size_name])
    shapes = SHAPES[size_name]
    size["seq"] = max(size["seq"], max(t for _, t in shapes))
    steps = args.steps or size["steps"]
    warmup = args.warmup if args.warmup is not None else size["warmup"]
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    has_peft = bl.peft is not None and not args.no_peft
    graphs = device.type == "cuda" and not args.no_graphs
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    probe = bl.build_model(size, torch.device("meta"))
    meta = dict(date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), device_name=device_name,
                torch=torch.__version__, peft=getattr(bl.peft, "__version__", None) if has_peft else None,
                size_name=size_name, precision=precision, steps=steps, warmup=warmup,
                timer="CUDA events" if device.type == "cuda" else "wall clock",
                model=f"GPT decoder, {size['n_layer']} layers, d_model {size['d_model']}, MLP {size['d_ff']}, vocabulary "
                      f"{size['vocab_size']:,}, {sum(p.numel() for p in probe.parameters()) / 1e6:.1f} M parameters")
    del probe
    print(f"# mixed-adapter batches: {meta['model']} on {device_name}", flush=True)
    rows = []
    for r, t in shapes:
        rows += measure_shape(size, device, precision, r, t, steps, warmup, graphs, has_peft)
    add_ratios(rows)
    meta["exactness"] = exactness(size, device, precision, *shapes[0])
    goal_rows = goals(rows, shapes[0])
    text = render(meta, rows, goal_rows)
    print(text)
    result = dict(meta=meta, rows=rows, goals=[dict(goal=a, measured=b, target=c, met=d) for a, b, c, d in goal_rows])
    if not args.no_write:
        out = Path(out_dir or args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        card = device_name.lower().replace("nvidia", "").strip().split()[0]
        stem = args.name or ("mixed_cpu" if device.type == "cpu" else "mixed_" + card)
        atomic_write_bytes(out / f"{stem}.json", json.dumps(result, indent=1).encode())
        atomic_write_bytes(out / f"{stem}.md", text.encode())
        print(f"# wrote {out / stem}.json and .md")
    return result


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    main()
