"""Re-create the shipped pretrained checkpoints: a tiny and a wide GPT on English prose, a tiny ViT on upright shapes.

LoRA adapts a *pretrained* model (Hu et al. 2021, §4): the ΔW-vs-W analysis of §7
means nothing on a random base. ``lora-edu pretrain`` trains each model of
``RECIPES`` on its SOURCE task (:mod:`lora_edu.lab.data`) with a fixed recipe and
writes ``<out-dir>/<name>.safetensors`` (float32 weights; ``./checkpoints`` by default, the
package's own ``lora_edu/lab/checkpoints/`` only with ``--out-dir package``) next to
``<name>.json`` (model config, recipe, seed, final source *and* target losses,
corpus fingerprints, versions, wall time, date). :func:`load_pretrained` loads them.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import sys
import time

import torch
import torch.nn as nn

from lora_edu.atomic import atomic_write_bytes
from lora_edu.lab import data
from lora_edu.lab.models import GPT, GPTConfig, ViT, ViTConfig
from lora_edu.lab.train import TrainConfig, resolve_device, train

CHECKPOINT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints")

# name -> what to build, what to train it on, and how. Timings are for a 2-core laptop-class CPU.
RECIPES: dict[str, dict] = {
    "gpt-tiny": dict(
        model="gpt", preset="tiny", task="lm", seed=0,
        train=dict(steps=3000, batch_size=32, lr=3e-3, schedule="cosine", warmup_steps=100,
                   min_lr_ratio=0.1, grad_clip=1.0, eval_every=500, eval_batches=20),
    ),
    "gpt-wide": dict(
        model="gpt", preset="wide", task="lm", seed=0,
        train=dict(steps=1500, batch_size=32, lr=2e-3, schedule="cosine", warmup_steps=100,
                   min_lr_ratio=0.1, grad_clip=1.0, eval_every=250, eval_batches=20),
    ),
    "vit-tiny": dict(
        model="vit", preset="tiny", task="image", seed=0,
        train=dict(steps=2000, batch_size=64, lr=3e-3, schedule="cosine", warmup_steps=100,
                   min_lr_ratio=0.1, grad_clip=1.0, eval_every=500, eval_batches=None),
    ),
}  # fmt: skip


def _tasks(recipe: dict, block_size: int = 64):
    """(source, target) tasks of a recipe."""
    if recipe["task"] == "lm":
        return data.lm_tasks(seed=recipe["seed"], block_size=block_size)
    if recipe["task"] == "image":
        return data.image_tasks(seed=recipe["seed"])
    raise ValueError(f"unknown task {recipe['task']!r}")


def save_checkpoint(model: nn.Module, meta: dict, name: str, out_dir: str = CHECKPOINT_DIR) -> tuple[str, str]:
    """Write ``<name>.safetensors`` and ``<name>.json`` atomically; return their paths.

    Adds ``file_bytes`` and ``sha256`` (of the .safetensors file) to ``meta`` in place.
    """
    import safetensors.torch

    st_path = os.path.join(out_dir, name + ".safetensors")
    json_path = os.path.join(out_dir, name + ".json")
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    blob = safetensors.torch.save(state, metadata={"name": name})
    atomic_write_bytes(st_path, blob)
    meta.update(file_bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest())
    atomic_write_bytes(json_path, (json.dumps(meta, indent=2) + "\n").encode())
    return st_path, json_path


def pretrain(name: str, out_dir: str = CHECKPOINT_DIR, steps: int | None = None, device: str = "auto", progress: bool = True) -> dict:
    """Train recipe ``name`` from scratch, write its checkpoint to ``out_dir``, return its metadata.

    ``steps`` overrides the recipe's step count (for quick tests; the metadata records it).
    """
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r}; choose from {sorted(RECIPES)}")
    recipe = RECIPES[name]
    cfg = (GPTConfig if recipe["model"] == "gpt" else ViTConfig).preset(recipe["preset"])
    source, target = _tasks(recipe, block_size=getattr(cfg, "block_size", 64))
    torch.manual_seed(recipe["seed"])  # model initialisation
    model = GPT(cfg) if recipe["model"] == "gpt" else ViT(cfg)
    tc = TrainConfig(**{**recipe["train"], "seed": recipe["seed"], "device": device, "progress": progress,
                        "desc": f"pretrain {name}"})  # fmt: skip
    if steps is not None:
        tc.steps, tc.warmup_steps = steps, min(tc.warmup_steps, max(0, steps // 10))
        tc.eval_every = min(tc.eval_every, steps)
    result = train(model, source, tc)

    final = {  # full validation splits; a fixed 20-batch sample of the training split
        "source_train": source.evaluate(model, "train", max_batches=20),
        "source_val": source.evaluate(model, "val"),
        "target_val": target.evaluate(model, "val"),
    }
    meta = {
        "name": name,
        "model": recipe["model"],
        "config": cfg.to_dict(),
        "num_params": sum(p.numel() for p in model.parameters()),
        "task": {"kind": recipe["task"], "source": source.name, "target": target.name,
                 **({"corpus": data.corpus_info()} if recipe["task"] == "lm" else {})},  # fmt: skip
        "seed": recipe["seed"],
        "recipe": {**tc.to_dict(), "progress": None, "desc": None},
        "final": final,
        "history": result.history,
        "wall_time_s": round(result.wall_time_s, 2),
        "device": result.device,
        "precision": result.precision,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    save_checkpoint(model, meta, name, out_dir)
    return meta


def available_checkpoints(checkpoint_dir: str | None = None) -> list[str]:
    """Names that have both ``<name>.safetensors`` and ``<name>.json`` in the folder."""
    folder = checkpoint_dir or CHECKPOINT_DIR
    if not os.path.isdir(folder):
        return []
    files = set(os.listdir(folder))
    return sorted(f[: -len(".json")] for f in files if f.endswith(".json") and f[: -len(".json")] + ".safetensors" in files)


def checkpoint_info(name: str, checkpoint_dir: str | None = None) -> dict:
    """The JSON metadata of a checkpoint (config, recipe, final losses, ...)."""
    folder = checkpoint_dir or CHECKPOINT_DIR
    if name not in available_checkpoints(folder):
        have = available_checkpoints(folder)
        raise FileNotFoundError(
            f"no checkpoint {name!r} in {folder}; available: {have or 'none'}"
            + ("" if have else " (run `lora-edu pretrain` to create them)")
        )
    with open(os.path.join(folder, name + ".json")) as f:
        return json.load(f)


def load_pretrained(name: str, device: str | torch.device = "cpu", checkpoint_dir: str | None = None) -> nn.Module:
    """A shipped pretrained model ("gpt-tiny", "gpt-wide", "vit-tiny") on ``device``, in eval mode.

    ``device`` may be "auto". The matching tasks: ``lora_edu.lab.data.lm_tasks(block_size=model.config.block_size)``
    for the GPTs, ``lora_edu.lab.data.image_tasks()`` for the ViT.
    """
    from safetensors.torch import load_file

    meta = checkpoint_info(name, checkpoint_dir)
    model = GPT(GPTConfig(**meta["config"])) if meta["model"] == "gpt" else ViT(ViTConfig(**meta["config"]))
    state = load_file(os.path.join(checkpoint_dir or CHECKPOINT_DIR, name + ".safetensors"))
    model.load_state_dict(state, strict=True)
    return model.to(resolve_device(device)).eval()


# -----------------------------------------------------------------------------
# the `lora-edu pretrain` subcommand


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"recipes to run (default: all of {', '.join(RECIPES)})")
    parser.add_argument("--out-dir", default="checkpoints",
                        help="where to write <name>.safetensors/.json (default: ./checkpoints). The shipped checkpoints "
                             "are replaced only with --out-dir package")
    parser.add_argument("--steps", type=int, default=None, help="override every recipe's step count (quick checks; not the shipped recipe)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (default: auto)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice; 1 is faster on a busy machine)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--list", action="store_true", help="list recipes and existing checkpoints, then exit")


def _fmt_final(meta: dict) -> str:
    f = meta["final"]
    key = "ppl" if "ppl" in f["source_val"] else "acc"
    return (
        f"source train {f['source_train']['loss']:.4f} | source val {f['source_val']['loss']:.4f} "
        f"({key} {f['source_val'][key]:.3f}) | target val {f['target_val']['loss']:.4f} ({key} {f['target_val'][key]:.3f})"
    )


def run(args: argparse.Namespace) -> int:
    if args.out_dir == "package":  # explicit opt-in: overwrite the checkpoints shipped inside the package
        args.out_dir = CHECKPOINT_DIR
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    if args.list:
        have, shipped = set(available_checkpoints(args.out_dir)), set(available_checkpoints(CHECKPOINT_DIR))
        for name, r in RECIPES.items():
            status = ("present" if name in have else "missing") + f" in {args.out_dir}"
            status += "; shipped with the package" if name in shipped else ""
            print(f"{name:10s} {r['model']}/{r['preset']} on {r['task']}, {r['train']['steps']} steps  [{status}]")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.names or list(RECIPES)
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        print(f"unknown recipe(s) {unknown}; choose from {list(RECIPES)}", file=sys.stderr)
        return 2
    resolve_device(args.device)  # an unusable device fails here, before anything is trained or written
    for name in names:
        t0 = time.perf_counter()
        meta = pretrain(name, out_dir=args.out_dir, steps=args.steps, device=args.device, progress=not args.quiet)
        print(f"{name}: {meta['num_params']:,} params, {meta['recipe']['steps']} steps on {meta['device']} "
              f"in {time.perf_counter() - t0:.1f} s -> {os.path.join(args.out_dir, name)}.safetensors "
              f"({meta['file_bytes'] / 1e6:.2f} MB)")  # fmt: skip
        print("  " + _fmt_final(meta))
    return 0
