"""One training loop for everything: pretraining, full fine-tuning and LoRA.

``train(model, task, TrainConfig(...))`` optimises the parameters of ``model`` that
have ``requires_grad=True`` on a :class:`lora_edu.lab.data.Task` with AdamW. Whether
that is full fine-tuning or LoRA is decided by the caller (freeze, inject, or
not); the loop does not know. It reports what the LoRA paper's comparisons are
about (Hu et al. 2021, §4.2 and Table 4): trainable vs total parameters, wall
time and peak accelerator memory, alongside a history of losses and metrics.

Options: device ``"auto"`` (CUDA, then Apple MPS, then CPU); bf16 autocast on
CUDA when the card supports it (fp16 + GradScaler on request; none on CPU);
gradient clipping; constant / linear / cosine learning rate with linear warmup;
``keep_best``: end with the weights (parameters and buffers) of the best evaluation;
LoRA+ (Hayou et al. 2024): the ``B`` factors learn ``loraplus_ratio`` times
faster than everything else. CPU runs with the same seed repeat bit for bit.
"""
from __future__ import annotations

import math
import numbers
import operator
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from lora_edu.core.inject import lora_B_parameters
from lora_edu.speed.fused import FusedLoRALinear, fuse, unfuse


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> the first available of CUDA, MPS, CPU; anything else -> ``torch.device(device)``."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {device!r} ({e}); use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but this torch has no usable CUDA GPU; use --device cpu or auto "
                         "(GPU users: install a CUDA build of torch, see the README)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r} asked for, but MPS is not available here; use --device cpu or auto")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"`` -> ``"bf16"`` on CUDA cards that support it, else ``"fp32"``. Autocast is CUDA-only here."""
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be auto|fp32|bf16|fp16, got {precision!r}")
    if device.type != "cuda":
        if precision in ("bf16", "fp16"):
            raise ValueError(f"precision={precision!r} needs a CUDA device (got {device}); use 'auto' or 'fp32'")
        return "fp32"
    if precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return precision


def autocast_context(device: torch.device, precision: str):
    """The autocast context for a resolved ``precision`` (a no-op for fp32)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    return nullcontext()


@dataclass
class TrainConfig:
    steps: int = 200  # optimizer steps
    batch_size: int = 32
    lr: float = 3e-3  # peak learning rate (of every parameter except LoRA B under LoRA+)
    weight_decay: float = 0.0  # AdamW decoupled weight decay, on every trainable parameter
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = 1.0  # max global grad norm; None = no clipping
    schedule: str = "constant"  # "constant" | "linear" | "cosine" (decay to min_lr_ratio * lr)
    warmup_steps: int = 0  # linear warmup from 0 to lr over this many steps
    min_lr_ratio: float = 0.1  # floor of the linear/cosine decay, as a fraction of lr
    loraplus_ratio: float | None = None  # LoRA+ lambda: lr(B) = lambda * lr; None = same lr (plain LoRA)
    eval_every: int = 100  # evaluate every this many steps (and always at the end); 0 = only at the end
    eval_at_start: bool = True  # also evaluate before the first step (the "before" quality)
    eval_batches: int | None = 20  # batches per evaluation (None = the whole split)
    eval_split: str = "val"
    keep_best: bool = False  # end with the weights (parameters and buffers) of the evaluation with the lowest loss
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:1" | "mps"
    precision: str = "auto"  # "auto" (bf16 on capable CUDA, fp32 elsewhere) | "fp32" | "bf16" | "fp16"
    seed: int = 0  # seeds torch (dropout) and the batch sampler
    progress: bool = True  # tqdm progress bar
    desc: str = "train"  # progress bar label
    fused: bool = True  # train LoRA layers through lora_edu.fuse (the same formula with fewer passes; lora_edu.speed.fused)

    def __post_init__(self) -> None:
        """Refuse settings that would train silently wrong (ascend, produce nan, or do nothing)."""

        def integer(name: str, low: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not hasattr(value, "__index__") or operator.index(value) < low:
                raise ValueError(f"TrainConfig.{name} must be an integer >= {low}, got {value!r}")
            setattr(self, name, operator.index(value))  # numpy integers become Python ints

        def real(name: str, low: float, allow_none: bool = False, strict: bool = True) -> None:
            value = getattr(self, name)
            if value is None and allow_none:
                return
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or (value <= low if strict else value < low):
                bound = f"> {low}" if strict else f">= {low}"
                raise ValueError(f"TrainConfig.{name} must be a finite number {bound}" + (" or None" if allow_none else "") + f", got {value!r}")
            setattr(self, name, float(value))

        for name, low in (("steps", 0), ("batch_size", 1), ("warmup_steps", 0), ("eval_every", 0), ("seed", 0)):
            integer(name, low)
        if self.eval_batches is not None:
            integer("eval_batches", 1)
        real("lr", 0.0)
        real("weight_decay", 0.0, strict=False)
        real("min_lr_ratio", 0.0, strict=False)
        real("grad_clip", 0.0, allow_none=True)
        real("loraplus_ratio", 0.0, allow_none=True)
        for name in ("eval_at_start", "keep_best", "progress", "fused"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"TrainConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.schedule not in ("constant", "linear", "cosine"):
            raise ValueError(f"TrainConfig.schedule must be 'constant', 'linear' or 'cosine', got {self.schedule!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    history: list[dict]  # one dict per evaluation: step, lr, train_loss, val_loss, val_<metric>, ...
    final: dict  # the last evaluation's metrics, e.g. {"loss": 1.9, "ppl": 6.7}
    final_train_loss: float  # mean training loss over the last eval interval
    steps: int
    wall_time_s: float  # time spent in the loop, evaluations included
    train_time_s: float  # the same without evaluations
    peak_memory_bytes: int | None  # CUDA max_memory_allocated during the run; None on CPU/MPS
    trainable_params: int
    total_params: int
    device: str
    precision: str
    config: dict = field(default_factory=dict)
    best_step: int | None = None  # keep_best: the step whose weights the model ends with (``final`` is its evaluation;
    # ``final_train_loss`` stays the mean over the last interval actually trained)

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / max(1, self.total_params)

    def to_dict(self) -> dict:
        return asdict(self)


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of the peak lr at (0-based) ``step``: linear warmup, then the schedule."""
    if config.warmup_steps > 0 and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if config.schedule == "linear":
        decay = 1.0 - progress
    elif config.schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"schedule must be constant|linear|cosine, got {config.schedule!r}")
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * decay


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only; under LoRA+ the ``lora_B`` ones get lr * ratio."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model has no trainable parameters (everything has requires_grad=False)")
    if config.loraplus_ratio is None:
        groups = [{"params": [p for _, p in named], "lr": config.lr, "name": "all"}]
    else:
        B = lora_B_parameters(model)  # asked of the LoRA layers, not guessed from parameter names
        if not B:
            raise ValueError("loraplus_ratio is set but the model has no trainable LoRA B factors")
        ids = {id(p) for p in B}
        rest = [p for _, p in named if id(p) not in ids]
        groups = [{"params": rest, "lr": config.lr, "name": "default"}] if rest else []
        groups.append({"params": B, "lr": config.lr * config.loraplus_ratio, "name": "lora_B"})
    for g in groups:
        g["peak_lr"] = g["lr"]
    return torch.optim.AdamW(groups, betas=config.betas, weight_decay=config.weight_decay)


def train(model: nn.Module, task, config: TrainConfig | None = None, **overrides) -> TrainResult:
    """Train ``model`` in place on ``task``; return a :class:`TrainResult`.

    ``train(model, task, steps=100, lr=1e-3)`` is shorthand for ``TrainConfig(steps=100, lr=1e-3)``.
    The model is moved to the resolved device and left there.  With ``fused=True`` (default)
    its ``LoRALinear`` layers train through the fused forward and are plain again afterwards.
    """
    config = TrainConfig(**{**asdict(config or TrainConfig()), **overrides})
    fuse_here = config.fused and not any(isinstance(m, FusedLoRALinear) for m in model.modules())
    if fuse_here:
        fuse(model)
    try:
        return _train_loop(model, task, config)
    finally:
        if fuse_here:
            unfuse(model)


def _train_loop(model: nn.Module, task, config: TrainConfig) -> TrainResult:
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    torch.manual_seed(config.seed)  # dropout, and anything else drawing from the global RNG
    gen = torch.Generator().manual_seed(config.seed)  # the batch sampler (CPU)
    model.to(device)
    optimizer = make_optimizer(model, config)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    params = [p for g in optimizer.param_groups for p in g["params"]]
    trainable = sum(p.numel() for p in params)
    total = sum(p.numel() for p in model.parameters())

    def evaluate() -> dict:
        with autocast_context(device, precision):
            return task.evaluate(model, split=config.eval_split, max_batches=config.eval_batches)

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    history: list[dict] = []
    eval_time, t0 = 0.0, time.perf_counter()
    pfx = config.eval_split
    best: dict = {}  # keep_best: {"loss", "entry", "state"} of the best evaluation so far
    kept = [*params, *model.buffers()]  # what an evaluation's result depends on that training changes

    def remember_if_best(entry: dict) -> None:
        if not config.keep_best:
            return
        loss = entry.get(f"{pfx}_loss")
        if not isinstance(loss, numbers.Real):
            raise ValueError(f"keep_best needs the task's evaluate() to return a numeric 'loss', got {loss!r} "
                             f"(metrics: {sorted(k[len(pfx) + 1:] for k in entry if k.startswith(pfx + '_'))})")
        if math.isfinite(loss) and (not best or loss < best["loss"]):
            best.update(loss=loss, entry=entry, state=[t.detach().clone() for t in kept])

    if config.eval_at_start:
        te = time.perf_counter()
        history.append({"step": 0, "lr": config.lr * lr_factor(0, config), "train_loss": None,
                        **{f"{pfx}_{k}": v for k, v in evaluate().items()}})  # fmt: skip
        remember_if_best(history[-1])
        eval_time += time.perf_counter() - te

    model.train()
    running, n_running = 0.0, 0
    bar = tqdm(range(config.steps), desc=config.desc, disable=not config.progress, leave=False, dynamic_ncols=True)
    for step in bar:
        factor = lr_factor(step, config)
        for g in optimizer.param_groups:
            g["lr"] = g["peak_lr"] * factor
        batch = task.get_batch("train", config.batch_size, generator=gen, device=device)
        with autocast_context(device, precision):
            loss = task.loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        running += loss.item()
        n_running += 1
        if config.progress:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        last = step + 1 == config.steps
        if last or (config.eval_every > 0 and (step + 1) % config.eval_every == 0):
            te = time.perf_counter()
            metrics = evaluate()
            model.train()
            eval_time += time.perf_counter() - te
            history.append({"step": step + 1, "lr": config.lr * factor, "train_loss": running / n_running,
                            **{f"{pfx}_{k}": v for k, v in metrics.items()}})  # fmt: skip
            remember_if_best(history[-1])
            if not last:
                running, n_running = 0.0, 0
    bar.close()
    if not history:  # steps=0 and no evaluation at start: evaluate once so that `final` is defined
        history.append({"step": 0, "lr": config.lr * lr_factor(0, config), "train_loss": None,
                        **{f"{pfx}_{k}": v for k, v in evaluate().items()}})  # fmt: skip
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    chosen = history[-1]
    if best:  # keep_best: put the best evaluation's weights back; it is the result
        with torch.no_grad():
            for t, saved in zip(kept, best["state"]):
                t.copy_(saved)
        chosen = best["entry"]
    elif config.keep_best:
        warnings.warn("keep_best: no evaluation had a finite loss; the model keeps its last weights", stacklevel=3)
    final_metrics = {k[len(pfx) + 1 :]: v for k, v in chosen.items() if k.startswith(pfx + "_")}
    return TrainResult(
        history=history,
        final=final_metrics,
        final_train_loss=running / n_running if n_running else float("nan"),
        steps=config.steps,
        wall_time_s=wall,
        train_time_s=wall - eval_time,
        peak_memory_bytes=peak,
        trainable_params=trainable,
        total_params=total,
        device=str(device),
        precision=precision,
        config=config.to_dict(),
        best_step=chosen["step"] if best else None,
    )
