#!/usr/bin/env python
"""DistributedDataParallel training of the GPT with LoRA vs full fine-tuning.

    torchrun --nproc_per_node=1 benchmarks/ddp_lora.py --out-dir /tmp/ddp
    torchrun --nproc_per_node=2 benchmarks/ddp_lora.py --out-dir /tmp/ddp
    python benchmarks/ddp_lora.py --report /tmp/ddp --md benchmarks/results/ddp_h100x2.md

Each rank trains on its own batch (``--batch`` × ``--seq`` tokens per GPU: weak
scaling), bf16 autocast, fused AdamW.  A counting DDP communication hook
(:mod:`lora_edu.speed.distributed`) sums the bytes of every gradient bucket all-reduced;
with LoRA only the adapters' gradients travel.  After the timed steps every rank's
gradients are gathered and compared (they must be identical).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from lora_edu.atomic import atomic_write_bytes  # noqa: E402  (results are written whole or not at all)
from lora_edu.speed.distributed import init_from_env, max_grad_difference_across_ranks, trainable_bytes, wrap_ddp  # noqa: E402

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def run_mode(mode, size, device, steps, warmup, rank, world):
    from bench_lora import build_model, setup_lora_edu  # same model as the single-GPU benchmark

    model = build_model(size, device, seed=0)  # identical weights on every rank
    if mode == "lora":
        setup_lora_edu(model, ALL_LINEAR, 8)
    ddp, counter = wrap_ddp(model, device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=device.type == "cuda")
    g = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
    idx = torch.randint(0, size["vocab_size"], (size["batch"], size["seq"]), generator=g).to(device)
    tgt = torch.randint(0, size["vocab_size"], (size["batch"], size["seq"]), generator=g).to(device)
    amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(final=False):
        with amp:
            logits = ddp(idx)
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), tgt.view(-1))
        loss.backward()
        if final:
            return
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
        counter.end_step()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            step()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        else:
            import time

            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        counter.end_step()
    step(final=True)  # gradients of one more step, left in place to compare across ranks
    counter.end_step()
    diff = max_grad_difference_across_ranks(model)
    per_step = counter.history[warmup:]
    res = dict(
        mode=mode, world=world, ms=statistics.median(times), ms_all=times,
        bytes_per_step=per_step[0], bytes_constant=len(set(per_step)) == 1,
        trainable_bytes=trainable_bytes(model), trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        max_grad_diff_across_ranks=diff, tokens_per_step=size["batch"] * size["seq"] * world,
        peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    )
    ddp = model = opt = None  # free before the next mode (rebinding, not del: the closure above still names them)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return res


def report(in_dir: Path, md: Path | None) -> str:
    runs = []
    for f in sorted(in_dir.glob("ddp_world*.json")):
        runs.append(json.loads(f.read_text()))
    if not runs:
        raise SystemExit(f"no ddp_world*.json in {in_dir}")
    meta = runs[0]["meta"]
    lines = [
        f"# LoRA with DistributedDataParallel: {meta['device_name']} × up to {max(r['meta']['world'] for r in runs)}",
        "",
        f"{meta['date']} · torch {meta['torch']} · NCCL/gloo via torchrun · bf16 autocast, fused AdamW · "
        f"{meta['batch']}×{meta['seq']} tokens per GPU per step (weak scaling) · median of {meta['steps']} steps",
        "",
        f"Model: {meta['model']}",
        "",
        "| mode | GPUs | step (ms) | tokens/s | scaling vs 1 GPU | bytes all-reduced per step | = trainable grad bytes "
        "| max grad diff across ranks |",
        "|---|---|---|---|---|---|---|---|",
    ]
    one = {}
    rows = [r for run in runs for r in run["results"]]
    for r in sorted(rows, key=lambda r: (r["mode"], r["world"])):
        tps = r["tokens_per_step"] / (r["ms"] / 1e3)
        if r["world"] == 1:
            one[r["mode"]] = tps
        scale = tps / one[r["mode"]] if r["mode"] in one else None
        nbytes = r["bytes_per_step"]
        lines.append(
            f"| {'LoRA r=8 all linear' if r['mode'] == 'lora' else 'full fine-tuning'} | {r['world']} | {r['ms']:.2f} | "
            f"{tps:,.0f} | {'–' if scale is None else f'{scale:.2f}×'} | {nbytes:,} ({nbytes / 2**20:.1f} MiB) | "
            f"{'yes' if nbytes == r['trainable_bytes'] else 'NO'} | {r['max_grad_diff_across_ranks']:.1e} |"
        )
    by = {(r["mode"], r["world"]): r for r in rows}
    if ("lora", 2) in by and ("full", 2) in by:
        ratio = by[("full", 2)]["bytes_per_step"] / by[("lora", 2)]["bytes_per_step"]
        lines += ["", f"Full fine-tuning all-reduces {ratio:.0f}× the bytes of LoRA per step."]
    text = "\n".join(lines) + "\n"
    if md:
        md.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(md, (text).encode())
        atomic_write_bytes((md.with_suffix(".json")), (json.dumps(runs, indent=1)).encode())
    return text


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default=None, help="bench_lora size preset (default gpt2 on CUDA, tiny on CPU)")
    ap.add_argument("--modes", default="lora,full")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--report", default=None, help="merge ddp_world*.json from this folder into --md")
    ap.add_argument("--md", default=None)
    args = ap.parse_args(argv)
    if args.report:
        print(report(Path(args.report), Path(args.md) if args.md else None))
        return
    from bench_lora import SIZES

    rank, world, device = init_from_env()
    size = dict(SIZES[args.size or ("gpt2" if device.type == "cuda" else "tiny")])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    results = [run_mode(m, size, device, args.steps, args.warmup, rank, world) for m in args.modes.split(",")]
    if rank == 0:
        meta = dict(
            date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), torch=torch.__version__,
            device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU", world=world,
            batch=size["batch"], seq=size["seq"], steps=args.steps,
            model=(f"GPT {size['n_layer']} layers, d_model {size['d_model']}, MLP {size['d_ff']}, "
                   f"vocab {size['vocab_size']:,} (benchmarks/bench_lora.py)"),
        )
        for r in results:
            print(f"[world {world}] {r['mode']}: {r['ms']:.2f} ms/step, {r['bytes_per_step']:,} B all-reduced "
                  f"(trainable grads {r['trainable_bytes']:,} B), "
                  f"max grad diff across ranks {r['max_grad_diff_across_ranks']:.1e}", flush=True)
        if args.out_dir:
            Path(args.out_dir).mkdir(parents=True, exist_ok=True)
            payload = json.dumps(dict(meta=meta, results=results), indent=1).encode()
            atomic_write_bytes(Path(args.out_dir) / f"ddp_world{world}.json", payload)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
