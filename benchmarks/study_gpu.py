#!/usr/bin/env python
"""The rank-vs-quality and learn-vs-forget studies of notebooks 4 and 6 at GPU scale.

    python benchmarks/study_gpu.py --budget-s 385   # one GPU (H200: 6 minutes); writes benchmarks/results/study_gpu/
    python benchmarks/study_gpu.py --tiny     # seconds on a CPU; what tests/test_study_gpu.py runs

1. **Pretrain** a GPT of ~10 M parameters (``lora_edu.lab.models.GPT``, 6 layers, d = 384, context 128) from
   scratch on the English prose corpus (``lora_edu.lab.data.lm_tasks``: the source domain, ~234 K characters),
   cosine schedule, weight decay 0.1, keeping the weights of the evaluation with the lowest prose validation loss
   (``TrainConfig(keep_best=True)``): a model this size memorises so small a corpus within a few dozen epochs, and
   an over-fitted base would make "forgetting" meaningless (adapting to code then *lowers* its prose loss — what
   a first run of this script without early stopping measured: prose 1.83 → 1.37 nats/char).
2. **Adapt** it to Python code (the target domain) with LoRA on W_q, W_v of every layer at r in {1, 4, 16, 64}
   under three α regimes that agree at r = 1 (s = 2): fixed α = 2 (Hu et al. 2021: s = 2/r), α = 2r
   (Biderman et al. 2024: s = 2) and rsLoRA (Kalajdzievski 2023: s = 2/√r); and with full fine-tuning.
   Every configuration: a learning-rate grid of >= 3 values on seed 0, extended until its best value is interior
   (``lora_edu.lab.experiments.sweep_then_seeds``), then seeds 1 and 2 at that learning rate — all replicas of a
   grid trained side by side with ``torch.func.vmap`` (``fine_tune_replicas``), AdamW, constant learning rate.
3. **Evaluate** every run on the *whole* validation split of both domains (target: code, source: prose), so the
   same runs give notebook 4's rank-vs-quality curve (target loss) and notebook 6's learn-vs-forget plane
   (the α = 2r arm, Biderman et al.'s regime, against full fine-tuning).

Results go to ``benchmarks/results/study_gpu/study_gpu.{json,md}`` (``--tiny``: ``study_gpu_tiny.*``), written
atomically, with the card name, torch version and the whole configuration.  A wall-clock budget (``--budget-s``,
default 320 s) skips every configuration after the first that, at the mean time per configuration so far, would
end past the budget, and lists them in the file; nothing is silently dropped.  The committed run used 385 s and
skipped nothing.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lora_edu.atomic import atomic_write_bytes  # noqa: E402  (results are written whole or not at all)
from lora_edu.lab import data  # noqa: E402
from lora_edu.lab.experiments import fixed_eval_batches, lora_scale_rule, mean_se, per_batch_losses, sweep_then_seeds  # noqa: E402
from lora_edu.lab.models import GPT, GPTConfig  # noqa: E402
from lora_edu.lab.train import TrainConfig, resolve_device, train  # noqa: E402

SIZES = {
    # ~10.7 M parameters; pretraining about a minute and the 11 adaptation configurations about 4 minutes on one H200 (estimated;
    # the --budget-s guard skips, and records, whatever would not fit)
    "gpu": dict(model=dict(n_layer=6, n_head=6, d_model=384, d_ff=1536, block_size=128),
                pretrain=dict(steps=1000, batch_size=64, lr=1e-3, warmup_steps=100, weight_decay=0.1, eval_every=50),
                adapt=dict(steps=300, batch_size=32), ranks=(1, 4, 16, 64)),
    # seconds on a CPU: the same code path, for the test
    "tiny": dict(model=dict(n_layer=1, n_head=2, d_model=32, d_ff=64, block_size=16),
                 pretrain=dict(steps=30, batch_size=16, lr=3e-3, warmup_steps=5, eval_every=10),
                 adapt=dict(steps=8, batch_size=4), ranks=(1, 4)),
}  # fmt: skip
TARGETS = ("q_proj", "v_proj")
REGIMES = ("fixed", "2r", "rslora")
LORA_LRS = (1e-3, 3e-3, 1e-2)  # the grid every LoRA configuration starts from (extended if its best is at an edge)
FULL_LRS = (1e-4, 3e-4, 1e-3)
SEEDS = (0, 1, 2)


def card_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def summarise(rec: dict, target: str, source: str) -> dict:
    """Drop tensors and models; add mean and s.e. over seeds for both domains."""
    out = {k: v for k, v in rec.items() if not isinstance(v, torch.Tensor) and k not in ("models",)}
    out["lr_sweep"] = {f"{lr:g}": v for lr, v in rec["lr_sweep"].items()}
    out["lr_sweep_all"] = {f"{lr:g}": v for lr, v in rec["lr_sweep_all"].items()}
    for name in (target, source):
        out[f"{name}_mean"], out[f"{name}_se"] = mean_se(rec[f"{name}_seeds"])
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny model for seconds on a CPU (the test)")
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu (default: auto)")
    ap.add_argument("--budget-s", type=float, default=320.0, help="skip configurations once this many seconds have passed")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results" / "study_gpu"))
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    size = "tiny" if args.tiny else "gpu"
    cfg = SIZES[size]
    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # models this small: a second thread only adds synchronisation
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # adaptation runs in fp32 with TF32 matmuls
        torch.backends.cudnn.allow_tf32 = True
    t_start = time.perf_counter()

    def log(msg):
        if not args.quiet:
            print(f"[{time.perf_counter() - t_start:6.1f} s] {msg}", flush=True)

    source, target = data.lm_tasks(seed=0, block_size=cfg["model"]["block_size"])
    torch.manual_seed(0)
    base = GPT(GPTConfig(vocab_size=source.vocab_size, **cfg["model"])).to(device)
    n_params = sum(p.numel() for p in base.parameters())
    log(f"pretraining a {n_params / 1e6:.2f} M-parameter GPT on prose ({cfg['pretrain']['steps']} steps) on {card_name(device)}")
    pre = train(base, source, TrainConfig(schedule="cosine", eval_batches=None, keep_best=True, progress=False, device=str(device),
                                          seed=0, **cfg["pretrain"]))  # fmt: skip
    log(f"pretraining kept step {pre.best_step} of {cfg['pretrain']['steps']} (lowest prose validation loss {pre.final['loss']:.4f})")
    base.eval()
    for p in base.parameters():
        p.requires_grad_(False)
    base_eval = {}
    for task in (target, source):
        per = per_batch_losses(base, [(x.to(device), y.to(device)) for x, y in fixed_eval_batches(task)])
        base_eval[task.name] = {"loss": task.evaluate(base)["loss"], "batches": len(per), "batch_se": mean_se(per)[1]}
    log(f"pretrained: prose {base_eval['prose']['loss']:.4f}, code {base_eval['code']['loss']:.4f} nats/char ({pre.wall_time_s:.0f} s)")

    kw = dict(steps=cfg["adapt"]["steps"], batch_size=cfg["adapt"]["batch_size"], eval_tasks=(source,), device=device)
    configs = [("full", None, None)] + [(regime, r, None) for r in cfg["ranks"] for regime in REGIMES if not (r == 1 and regime != "2r")]
    records, skipped = [], []
    for regime, r, _ in configs:
        label = "full fine-tuning" if regime == "full" else f"LoRA r={r} ({'all regimes agree at r = 1' if r == 1 else regime})"
        elapsed = time.perf_counter() - t_start
        per_config = (elapsed - pre.wall_time_s) / max(1, len(records)) if records else 0.0
        if records and elapsed + per_config > args.budget_s:
            skipped.append(label)
            log(f"skipped (budget): {label}")
            continue
        t0 = time.perf_counter()
        if regime == "full":
            rec = sweep_then_seeds(base, target, FULL_LRS, SEEDS, method="full", **kw)
            rec.update(method="full", regime="full", r=None, alpha=None, rslora=False, scale=None)
        else:
            alpha, rslora = lora_scale_rule(regime, r)
            rec = sweep_then_seeds(base, target, LORA_LRS, SEEDS, method="lora", r=r, alpha=alpha, rslora=rslora, targets=TARGETS, **kw)
            scale = alpha / (math.sqrt(r) if rslora else r)
            rec.update(method="lora", regime=regime if r > 1 else "all", r=r, alpha=alpha, rslora=rslora, scale=scale)
        rec["wall_s"] = time.perf_counter() - t0
        records.append(summarise(rec, target.name, source.name))
        s = records[-1]
        log(f"{label}: lr {s['lr']:g} (interior: {s['interior']}), code {s['code_mean']:.4f} ± {s['code_se']:.4f}, "
            f"prose {s['prose_mean']:.4f} ± {s['prose_se']:.4f} ({s['wall_s']:.0f} s)")

    result = {
        "study": "rank vs quality (three α regimes) and learn vs forget, GPT prose -> code",
        "size": size,
        "device": str(device),
        "card": card_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "config": {"model": cfg["model"], "params": n_params, "pretrain": cfg["pretrain"], "adapt": cfg["adapt"], "ranks": list(cfg["ranks"]),
                   "targets": list(TARGETS), "regimes": {"fixed": "alpha = 2, s = 2/r", "2r": "alpha = 2r, s = 2", "rslora": "alpha = 2, s = 2/sqrt(r)"},
                   "lora_lrs": list(LORA_LRS), "full_lrs": list(FULL_LRS), "seeds": list(SEEDS), "optimizer": "AdamW (0.9, 0.999), constant lr, clip 1.0",
                   "eval": "whole validation split of each domain", "budget_s": args.budget_s},  # fmt: skip
        "pretrain": {"wall_s": pre.wall_time_s, "final_train_loss": pre.final_train_loss, "best_step": pre.best_step,
                     "val_curve": [(h["step"], h["val_loss"]) for h in pre.history]},
        "base": base_eval,
        "records": records,
        "skipped": skipped,
        "wall_s": time.perf_counter() - t_start,
    }
    lines = [f"# GPU-scale study ({size}): {result['card']}, torch {result['torch']}, {result['date_utc']} UTC", "",
             f"GPT {n_params / 1e6:.2f} M params pretrained on prose (early-stopped at step {pre.best_step}); base loss code {base_eval['code']['loss']:.4f}, "
             f"prose {base_eval['prose']['loss']:.4f} nats/char. Mean ± s.e. over seeds {list(SEEDS)}; whole validation splits.", "",
             "| method | regime | r | s | lr (interior) | code loss | prose loss | trainable |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in records:
        scale = "-" if s["scale"] is None else f"{s['scale']:.3g}"
        lines.append(f"| {s['method']} | {s['regime']} | {s['r'] or '-'} | {scale} | {s['lr']:g} ({'yes' if s['interior'] else 'no'}) | "
                     f"{s['code_mean']:.4f} ± {s['code_se']:.4f} | {s['prose_mean']:.4f} ± {s['prose_se']:.4f} | {s['trainable']:,} |")  # fmt: skip
    if skipped:
        lines += ["", "Skipped (time budget): " + ", ".join(skipped)]
    lines.append(f"\nTotal wall time {result['wall_s']:.0f} s.")
    out = Path(args.out_dir)
    stem = "study_gpu_tiny" if args.tiny else "study_gpu"
    atomic_write_bytes(out / f"{stem}.json", json.dumps(result, indent=1).encode())
    atomic_write_bytes(out / f"{stem}.md", ("\n".join(lines) + "\n").encode())
    log(f"wrote {out / stem}.json and .md")
    return result


if __name__ == "__main__":
    main()
