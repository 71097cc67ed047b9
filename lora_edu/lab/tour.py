"""The guided tour: count → inject → fine-tune → compare → merge → check → save, on built-in data.

``lora-edu tour`` takes the shipped pretrained character-level GPT (English prose,
see :mod:`lora_edu.lab.pretrain`), adapts it to Python source code with LoRA, compares
with the base model and with full fine-tuning, merges the adapter, measures merge
equivalence, saves the adapter and reports its size against the full model's.
Every number it prints is measured in this run.  Defaults finish in a few minutes on
a 2-core CPU; ``--device cuda`` trains with bf16 autocast on a GPU.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import safetensors.torch
import torch

from lora_edu.adapters import save_adapter
from lora_edu.atomic import atomic_write_bytes
from lora_edu.core.config import AdapterConfig, scale_of
from lora_edu.core.counting import count_parameters
from lora_edu.core.equivalence import check_merge_equivalence
from lora_edu.core.inject import add_lora, find_targets, lora_layers
from lora_edu.lab import data
from lora_edu.lab.analysis import energy_rank, singular_values
from lora_edu.lab.experiments import format_table
from lora_edu.lab.pretrain import load_pretrained
from lora_edu.lab.train import TrainConfig, resolve_device, train
from lora_edu.speed.fused import fuse


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="gpt-tiny", help="shipped pretrained checkpoint to adapt (default: gpt-tiny)")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU) | cpu | cuda | cuda:N | mps")
    p.add_argument("--precision", default="auto", help="auto (bf16 autocast on CUDA, fp32 elsewhere) | fp32 | bf16 | fp16")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps for LoRA and for full fine-tuning (default: 300)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--r", type=int, default=8, help="LoRA rank (default: 8)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha; the scale is s = alpha/r (default: 16)")
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj", help="comma-separated layer names to adapt")
    p.add_argument("--lora-lr", type=float, default=1e-2)
    p.add_argument("--full-lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="lora_edu_tour_out", help="folder for the adapter, figures and summary (default: ./lora_edu_tour_out)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _say(title: str) -> None:
    print(f"\n== {title}", flush=True)


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.3f} MB"


def _check_args(args: argparse.Namespace) -> list[str]:
    """Validate every argument before anything is written; returns the target names."""
    for name in ("steps", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("lora_lr", "full_lr"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    AdapterConfig(r=args.r, alpha=args.alpha)  # raises with the reason for a bad --r / --alpha
    targets = [t for t in args.targets.split(",") if t]
    if not targets:
        raise ValueError("--targets is empty; name the layers to adapt, e.g. q_proj,v_proj")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    return targets


def run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    targets = _check_args(args)
    device = resolve_device(args.device)
    base = load_pretrained(args.model, device="cpu")
    find_targets(base, targets)  # an unknown layer name fails here, before anything is written
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    _say(f"0. Data and pretrained base (device: {device})")
    source, target = data.lm_tasks(seed=args.seed)
    print(f"base model '{args.model}' was pretrained on {source.name!r} (English prose); we adapt it to {target.name!r} (Python source)")
    evals = dict(max_batches=20)

    def quality(model) -> dict:
        model.to(device)
        return {"target_loss": target.evaluate(model, **evals)["loss"], "source_loss": source.evaluate(model, **evals)["loss"]}

    before = quality(base)
    print(f"base: target loss {before['target_loss']:.4f} nats/char, source loss {before['source_loss']:.4f}")

    _say("1. Count parameters and inject LoRA")
    lora_model = add_lora(copy.deepcopy(base), targets, r=args.r, alpha=args.alpha)
    if device.type == "cuda":
        fuse(lora_model)  # the same formula with fewer passes over the activations (lora_edu.speed.fused)
    counts = count_parameters(lora_model)
    print(counts)
    full_total = count_parameters(base).total

    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, device=str(device), precision=args.precision,
                      seed=args.seed, progress=not args.quiet, eval_every=max(1, args.steps // 5), eval_batches=10,
                      schedule="cosine", warmup_steps=min(20, args.steps // 10))  # fmt: skip

    _say(f"2. LoRA fine-tuning: r={args.r}, alpha={args.alpha:g}, s={scale_of(args.alpha, args.r):g}, lr={args.lora_lr:g}")
    lora_res = train(lora_model, target, cfg, lr=args.lora_lr, desc="LoRA")
    after_lora = quality(lora_model)

    _say(f"3. Full fine-tuning for comparison: lr={args.full_lr:g}")
    full_model = copy.deepcopy(base)
    full_res = train(full_model, target, cfg, lr=args.full_lr, desc="full FT")
    after_full = quality(full_model)

    _say("4. Merge and check equivalence")
    x, _ = target.get_batch("val", 8, generator=torch.Generator().manual_seed(1), device=device)
    report = check_merge_equivalence(lora_model, x)
    print(report)
    report_low = check_merge_equivalence(copy.deepcopy(lora_model).to(torch.bfloat16), x)  # same model, bf16 weights
    print(report_low)
    spectra = {}
    for name, layer in lora_layers(lora_model):
        spectra[name] = singular_values(layer.delta_weight().detach())

    _say("5. Save the adapter; compare sizes on disk")
    adapter_path = save_adapter(lora_model, out / "adapter.safetensors")
    full_state = {k: v.detach().cpu().contiguous() for k, v in full_model.state_dict().items()}
    full_path = atomic_write_bytes(out / "full_model.safetensors", safetensors.torch.save(full_state))
    adapter_bytes, full_bytes = os.path.getsize(adapter_path), os.path.getsize(full_path)
    print(f"adapter {_mb(adapter_bytes)} vs full fine-tuned model {_mb(full_bytes)}: {full_bytes / adapter_bytes:.1f}× smaller")

    _say("6. Summary")

    def row(name, res, q, trainable, total):
        return {
            "model": name,
            "trainable": trainable,
            "trainable %": 100.0 * trainable / total,
            "wall s": None if res is None else res.wall_time_s,
            "peak MB": None if res is None or res.peak_memory_bytes is None else res.peak_memory_bytes / 1e6,
            "target loss": q["target_loss"],
            "source loss": q["source_loss"],
        }

    rows = [
        row("base (pretrained)", None, before, 0, full_total),
        row(f"LoRA r={args.r}", lora_res, after_lora, counts.trainable, counts.total),
        row("full fine-tuning", full_res, after_full, full_total, full_total),
    ]
    print(format_table(rows, list(rows[0])))
    verdict = "PASSED" if report.passed else "FAILED"
    print(f"merge error ({str(report.dtype)[6:]}): max {report.max_abs_error:.3g}, relative {report.rel_error:.3g} -> {verdict}")
    print(f"merge error (bfloat16 copy): relative {report_low.rel_error:.3g}, ΔW entries erased by rounding {100 * report_low.erased_fraction:.2f}%")
    print(f"adapter on disk: {_mb(adapter_bytes)}; full model: {_mb(full_bytes)}")
    peak_note = "peak memory is CUDA max_memory_allocated" if device.type == "cuda" else "peak memory is reported on CUDA only"
    print(f"device: {device}, precision: {lora_res.precision}; {peak_note}")

    figs = _figures(out, lora_res, full_res, spectra, args)
    summary = {
        "device": str(device),
        "precision": lora_res.precision,
        "torch": torch.__version__,
        "args": vars(args) | {"_run": None},
        "rows": rows,
        "merge": {"dtype": str(report.dtype), "max_abs_error": report.max_abs_error, "rel_error": report.rel_error,
                  "passed": report.passed, "bf16_rel_error": report_low.rel_error,
                  "bf16_erased_fraction": report_low.erased_fraction},  # fmt: skip
        "adapter_bytes": adapter_bytes,
        "full_model_bytes": full_bytes,
        "delta_W_energy_rank": {k: energy_rank(v) for k, v in spectra.items()},
        "total_wall_s": time.perf_counter() - t_start,
        "figures": [str(f) for f in figs],
    }
    atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=2, default=str).encode())
    print(f"\nwrote {out}/: adapter.safetensors, full_model.safetensors, summary.json, " + ", ".join(Path(f).name for f in figs))
    print(f"tour finished in {summary['total_wall_s']:.1f} s")
    ok = report.passed and after_lora["target_loss"] < before["target_loss"]
    if not ok:
        print("WARNING: the tour's checks did not all pass (see above)")
    return 0 if ok else 1


def _figures(out: Path, lora_res, full_res, spectra, args) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lora_edu.lab.figures import save_figure

    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for res, label in ((lora_res, f"LoRA r={args.r}"), (full_res, "full fine-tuning")):
        steps = [h["step"] for h in res.history]
        ax.plot(steps, [h["val_loss"] for h in res.history], marker="o", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("target val loss (nats/char)")
    ax.set_title("Adapting prose-GPT to Python code")
    ax.legend()
    paths.append(save_figure(fig, "tour_loss_curves", folder=out))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, s in spectra.items():
        k = min(len(s), args.r)  # rank(ΔW) ≤ r: the remaining singular values are rounding noise
        ax.semilogy(range(1, k + 1), s[:k].tolist(), marker=".", label=name)
    ax.set_xlabel("index i")
    ax.set_ylabel("singular value σᵢ of ΔW")
    ax.set_title(f"Spectrum of the learned ΔW (rank ≤ r = {args.r})")
    ax.legend(fontsize=6)
    paths.append(save_figure(fig, "tour_delta_W_spectra", folder=out))
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:  # python -m lora_edu.lab.tour
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    configure_parser(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
