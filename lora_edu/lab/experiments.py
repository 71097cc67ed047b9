"""Experiments as functions: rank sweep, budget split across weight types, learn vs forget.

Each returns *tidy records* — a list of flat dicts, one per trained model — that the
notebooks plot and :func:`format_table` prints.  Every method gets its own small
learning-rate sweep and reports its best learning rate, because comparing LoRA with
full fine-tuning at one shared learning rate says more about the learning rate than
about the method (Biderman et al. 2024, §3).

* :func:`rank_sweep` — LoRA paper Table 6 / §7: quality as a function of r, plus
  full fine-tuning.
* :func:`budget_split` — LoRA paper Table 5: a fixed number of trainable parameters
  spent on W_q, W_k, W_v, W_o alone or spread over several of them.
* :func:`learn_forget` — "LoRA Learns Less and Forgets Less" (Biderman et al. 2024):
  target-domain quality against source-domain quality after adaptation.

Learning rates are selected on the target task's *validation* split and reported on
the same split; with a handful of candidates the selection bias is small next to the
effects shown, and the notebooks say so.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from lora_edu.core.counting import count_parameters
from lora_edu.core.inject import add_lora, freeze
from lora_edu.lab.train import TrainConfig, train

__all__ = ["fine_tune", "rank_sweep", "budget_split", "learn_forget", "format_table", "ATTENTION_TARGETS", "ALL_LINEAR_TARGETS"]

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR_TARGETS = ATTENTION_TARGETS + ("up_proj", "down_proj")


def fine_tune(
    base: nn.Module,
    task,
    method: str = "lora",
    r: int | None = None,
    alpha: float | None = None,
    targets: Sequence[str] = ("q_proj", "v_proj"),
    rslora: bool = False,
    trainable_modules: Sequence[str] = (),
    init_seed: int | None = None,
    config: TrainConfig | None = None,
    **overrides,
) -> tuple[nn.Module, dict]:
    """Fine-tune a *copy* of ``base`` on ``task``; returns (model, record).

    ``method="lora"`` injects rank-``r`` adapters (α defaults to 2r, i.e. s = 2) into
    ``targets`` (plus fully trainable ``trainable_modules``, e.g. a head); ``method="full"``
    trains every parameter.  ``init_seed`` seeds the draw of A (otherwise the global RNG is
    used).  The base is never modified.
    """
    model = copy.deepcopy(base)
    if method == "lora":
        if r is None:
            raise ValueError("method='lora' needs r")
        if init_seed is not None:
            torch.manual_seed(init_seed)
        add_lora(model, list(targets), r=r, alpha=2.0 * r if alpha is None else alpha, rslora=rslora,
                 trainable_modules=trainable_modules)  # fmt: skip
    elif method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif method == "frozen":
        freeze(model)
    else:
        raise ValueError(f"method must be 'lora', 'full' or 'frozen', got {method!r}")
    config = config or TrainConfig()
    result = train(model, task, config, **overrides)
    counts = count_parameters(model)
    record = {
        "method": method,
        "r": r if method == "lora" else None,
        "targets": ",".join(targets) if method == "lora" else "all",
        "lr": result.config["lr"],
        "trainable": counts.trainable,
        "total": counts.total,
        f"{task.name}_loss": result.final["loss"],
        **{f"{task.name}_{k}": v for k, v in result.final.items() if k != "loss"},
        "wall_time_s": result.wall_time_s,
        "peak_memory_bytes": result.peak_memory_bytes,
        "history": result.history,
    }
    return model, record


def _best_of(
    base, task, lrs: Sequence[float], method: str, keep_model: bool = False, **kw
) -> tuple[nn.Module | None, dict]:
    """Train once per learning rate; keep the run with the lowest final validation loss."""
    best_model, best, tried = None, None, {}
    for lr in lrs:
        model, rec = fine_tune(base, task, method=method, lr=lr, **kw)
        loss = rec[f"{task.name}_loss"]
        tried[lr] = loss
        if best is None or (math.isfinite(loss) and loss < best[f"{task.name}_loss"]):
            best, best_model = rec, model
        else:
            del model
    best = {**best, "lr_sweep": tried}
    return (best_model if keep_model else None), best


def rank_sweep(
    base: nn.Module,
    task,
    ranks: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
    lrs: Sequence[float] = (1e-3, 3e-3, 1e-2),
    full_lrs: Sequence[float] | None = (3e-4, 1e-3, 3e-3),
    targets: Sequence[str] = ("q_proj", "v_proj"),
    keep_models: bool = False,
    **train_overrides,
) -> tuple[list[dict], dict]:
    """LoRA at each rank in ``ranks`` (plus full fine-tuning unless ``full_lrs`` is None).

    Returns ``(records, models)``; ``models`` maps ``r`` (and ``"full"``) to the best
    trained model when ``keep_models`` is true, else it is empty.
    """
    records, models = [], {}
    for r in ranks:
        model, rec = _best_of(base, task, lrs, "lora", keep_model=keep_models, r=r, targets=targets, **train_overrides)
        records.append(rec)
        if keep_models:
            models[r] = model
    if full_lrs:
        model, rec = _best_of(base, task, full_lrs, "full", keep_model=keep_models, **train_overrides)
        records.append(rec)
        if keep_models:
            models["full"] = model
    return records, models


def budget_split(
    base: nn.Module,
    task,
    splits: Sequence[tuple[Sequence[str], int]] = (
        (("q_proj",), 8),
        (("k_proj",), 8),
        (("v_proj",), 8),
        (("o_proj",), 8),
        (("q_proj", "k_proj"), 4),
        (("q_proj", "v_proj"), 4),
        (("q_proj", "k_proj", "v_proj", "o_proj"), 2),
    ),
    lrs: Sequence[float] = (3e-3, 1e-2),
    **train_overrides,
) -> list[dict]:
    """LoRA paper Table 5 at small scale: the same budget (types × r constant) spent differently.

    With square d×d projections every split trains the same number of parameters;
    the records carry ``trainable`` so that this is checked, not assumed.
    """
    records = []
    for targets, r in splits:
        _, rec = _best_of(base, task, lrs, "lora", r=r, targets=tuple(targets), **train_overrides)
        records.append(rec)
    return records


def learn_forget(
    base: nn.Module,
    source_task,
    target_task,
    ranks: Sequence[int] = (1, 4, 16, 64),
    lrs: Sequence[float] = (1e-3, 3e-3, 1e-2),
    full_lrs: Sequence[float] = (3e-4, 1e-3, 3e-3),
    targets: Sequence[str] = ALL_LINEAR_TARGETS,
    source_eval_batches: int | None = 20,
    **train_overrides,
) -> list[dict]:
    """Adapt to ``target_task``; measure how much was learned there and forgotten on ``source_task``.

    One record per method with ``target_loss`` and ``source_loss`` after training, and
    the base model's values (``method="base"``) for reference.
    """
    def source_loss(model):
        return source_task.evaluate(model, max_batches=source_eval_batches)["loss"]

    def target_loss(model):
        return target_task.evaluate(model, max_batches=train_overrides.get("eval_batches", 20))["loss"]

    records = [{"method": "base", "r": None, "trainable": 0, "lr": None,
                "target_loss": target_loss(base), "source_loss": source_loss(base)}]  # fmt: skip
    runs = [("lora", r, lrs) for r in ranks] + ([("full", None, full_lrs)] if full_lrs else [])
    for method, r, grid in runs:
        kw = dict(r=r, targets=targets) if method == "lora" else {}
        model, rec = _best_of(base, target_task, grid, method, keep_model=True, **kw, **train_overrides)
        records.append({
            "method": method, "r": r, "trainable": rec["trainable"], "lr": rec["lr"],
            "target_loss": target_loss(model), "source_loss": source_loss(model),
        })  # fmt: skip
    return records


def format_table(records: Sequence[dict], columns: Sequence[str], floatfmt: str = ".4g") -> str:
    """A plain-text table of ``columns`` from tidy records (missing values print as '-')."""
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return format(v, floatfmt)
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    rows = [list(columns)] + [[fmt(rec.get(c)) for c in columns] for rec in records]
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def best_by(records: Sequence[dict], key: str, method: str | None = None) -> dict:
    """The record with the lowest ``key`` (optionally among one method)."""
    pool = [r for r in records if method is None or r["method"] == method]
    return min(pool, key=lambda r: r[key])


