#!/usr/bin/env python
"""Memory and speed of the LoRA variants on one GPU: LoRA on an fp32/bf16 base vs QLoRA on NF4, DoRA vs LoRA.

    python benchmarks/variants_gpu.py                       # CUDA, a ~55M-parameter GPT; < 3 min on one H200
    python benchmarks/variants_gpu.py --tiny --device cpu   # seconds; what tests/test_benchmarks.py runs

Model: ``lora_edu.lab.models.GPT`` (6 blocks, d = 768, d_ff = 3072, vocab 8192, T = 512: ≈ 55M
parameters), random token batches (the numbers are about memory and time, not quality).  Every
linear layer inside the blocks (q, k, v, o, up, down) gets an adapter of rank r = 16, α = 32.

Rows (each built fresh, on the device, then measured):

* ``LoRA, fp32 base``  — lora_edu.add_lora on float32 weights, the readable LoRALinear;
* ``LoRA, bf16 base``  — the same on bfloat16 weights (adapters float32: the library's dtype policy);
* ``LoRA, bf16 base, fused`` — the same after ``lora_edu.fuse`` (the speed path);
* ``QLoRA, NF4 base``  — lora_edu.variants.add_qlora: the block linears in NF4 (double quantisation,
  compute dtype bf16), embeddings and head in bf16, adapters float32;
* ``DoRA, bf16 base``  — lora_edu.variants.add_dora on bfloat16 weights.

Measured per row: bytes held by parameters and buffers (``Tensor.nbytes``); on CUDA the peak of
``torch.cuda.max_memory_allocated`` over the timed steps (reset after building the model);
median wall time of one AdamW step (forward, backward, optimizer) over ``--steps`` steps after
``--warmup`` (CUDA synchronised around each step); the last loss.  bf16 autocast on CUDA, none on CPU.
Results go to ``benchmarks/results/variants_gpu_<name>.json`` and ``.md``, written atomically.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lora_edu  # noqa: E402
from lora_edu.atomic import atomic_write_bytes  # noqa: E402
from lora_edu.lab.models import GPT, GPTConfig  # noqa: E402
from lora_edu.variants import add_dora, add_qlora, dora_parameters  # noqa: E402

SIZES = {
    "gpu": dict(n_layer=6, n_head=12, d_model=768, d_ff=3072, vocab_size=8192, block_size=512, batch=8, r=16, alpha=32),
    "tiny": dict(n_layer=2, n_head=2, d_model=64, d_ff=128, vocab_size=97, block_size=32, batch=2, r=4, alpha=8),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
ROWS = ("LoRA, fp32 base", "LoRA, bf16 base", "LoRA, bf16 base, fused", "QLoRA, NF4 base", "DoRA, bf16 base")


def low_precision(device: torch.device, cpu_bf16: bool) -> bool:
    """bf16 weights and autocast: always on CUDA; on CPU only when asked (slow there, but the same code path)."""
    return device.type == "cuda" or cpu_bf16


def build(row: str, size: dict, device: torch.device, cpu_bf16: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = {k: v for k, v in size.items() if k not in ("batch", "r", "alpha")}
    model = GPT(GPTConfig(**cfg)).to(device)
    bf16 = torch.bfloat16 if low_precision(device, cpu_bf16) else torch.float32
    r, alpha = size["r"], size["alpha"]
    if row == "LoRA, fp32 base":
        lora_edu.add_lora(model, TARGETS, r=r, alpha=alpha)
    elif row.startswith("LoRA, bf16 base"):
        lora_edu.add_lora(model.to(bf16), TARGETS, r=r, alpha=alpha)
        if row.endswith("fused"):
            lora_edu.fuse(model)
    elif row == "QLoRA, NF4 base":
        add_qlora(model.to(bf16), TARGETS, r=r, alpha=alpha, compute_dtype=bf16)
    elif row == "DoRA, bf16 base":
        add_dora(model.to(bf16), TARGETS, r=r, alpha=alpha)
    else:
        raise ValueError(row)
    return model


def stored_bytes(model: torch.nn.Module) -> int:
    return sum(t.nbytes for k, t in model.state_dict(keep_vars=True).items() if isinstance(t, torch.Tensor) and "_extra_state" not in k)


def measure(row: str, size: dict, device: torch.device, steps: int, warmup: int, cpu_bf16: bool = False) -> dict:
    model = build(row, size, device, cpu_bf16)
    params = dora_parameters(model)  # A, B (and DoRA's m) of the active adapter
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator(device="cpu").manual_seed(0)
    T, V, Bsz = size["block_size"], size["vocab_size"], size["batch"]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if low_precision(device, cpu_bf16) else nullcontext()
    weights = stored_bytes(model)

    def step() -> float:
        idx = torch.randint(0, V, (Bsz, T + 1), generator=gen).to(device)
        with autocast:
            logits = model(idx[:, :-1])
            loss = F.cross_entropy(logits.float().reshape(-1, V), idx[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times, loss = [], float("nan")
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        loss = step()  # .item() synchronises
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    out = {"name": row, "weights_MiB": weights / 2**20, "peak_MiB": None if peak is None else peak / 2**20,
           "ms_per_step": 1e3 * statistics.median(times), "ms_min": 1e3 * min(times), "loss": loss,
           "trainable": sum(p.numel() for p in params), "total_params_and_buffers": weights}
    return out


def measure_fresh(row: str, size: dict, device: torch.device, steps: int, warmup: int, cpu_bf16: bool) -> dict:
    """:func:`measure`, then free the row's model and optimizer before the next row is built."""
    out = measure(row, size, device, steps, warmup, cpu_bf16)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def render(res: dict) -> str:
    m = res["meta"]
    lines = [f"# LoRA variants on {m['device_name']} ({m['size']}: {m['model_params']:,} parameters, batch {m['batch']} × {m['seq']})",
             "", f"torch {m['torch']}, {m['date']}, {m['steps']} timed steps after {m['warmup']} warm-up; "
             + ("bf16 weights and autocast." if m["bf16"] else "float32 throughout: the 'bf16' rows hold float32 weights here."), "",
             "| row | trainable | weights MiB | peak MiB | ms/step (median) | × LoRA bf16 |", "|---|---|---|---|---|---|"]
    ref = next(r for r in res["rows"] if r["name"] == "LoRA, bf16 base")["ms_per_step"]
    for r in res["rows"]:
        peak = "–" if r["peak_MiB"] is None else f"{r['peak_MiB']:.0f}"
        lines.append(f"| {r['name']} | {r['trainable']:,} | {r['weights_MiB']:.1f} | {peak} | {r['ms_per_step']:.2f} | "
                     f"{r['ms_per_step'] / ref:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="cuda | cpu | auto (cuda when available)")
    p.add_argument("--tiny", action="store_true", help="a tiny model: runs in seconds on CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default 20, tiny 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per row (default 5, tiny 1)")
    p.add_argument("--cpu-bf16", action="store_true", help="on CPU, use bf16 weights and autocast as on CUDA (default: float32 on CPU)")
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--name", default=None, help="file stem suffix (default: the device type, or 'tiny')")
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else "cpu" if args.device == "auto" else args.device)
    size_name = "tiny" if args.tiny else "gpu"
    size = SIZES[size_name]
    steps = args.steps if args.steps is not None else (2 if args.tiny else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    rows = [measure_fresh(row, size, device, steps, warmup, args.cpu_bf16) for row in ROWS]
    probe = GPT(GPTConfig(**{k: v for k, v in size.items() if k not in ("batch", "r", "alpha")}))
    meta = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "size": size_name,
            "model_params": sum(q.numel() for q in probe.parameters()), "batch": size["batch"], "seq": size["block_size"],
            "r": size["r"], "alpha": size["alpha"], "bf16": low_precision(device, args.cpu_bf16), "targets": TARGETS, "steps": steps, "warmup": warmup,
            "command": "python benchmarks/variants_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    res = {"meta": meta, "rows": rows}
    name = args.name or ("tiny" if args.tiny else device.type)
    out = Path(args.out_dir)
    atomic_write_bytes(out / f"variants_gpu_{name}.json", (json.dumps(res, indent=2) + "\n").encode())
    atomic_write_bytes(out / f"variants_gpu_{name}.md", render(res).encode())
    print(render(res))
    return res


if __name__ == "__main__":
    main()
