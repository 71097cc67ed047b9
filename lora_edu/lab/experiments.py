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

For statistics (notebooks 4-6, ``benchmarks/study_gpu.py``):

* :func:`fine_tune_replicas` — many (learning rate, seed) copies trained side by side with
  ``torch.func.vmap``; replica by replica the same as :func:`fine_tune` (tested).
* :func:`sweep_then_seeds` — a learning-rate grid on one seed, extended until its best value is
  interior, then more seeds at that learning rate.
* :func:`mean_se`, :func:`difference`, :func:`paired_difference`, :func:`verdict` — a claim is
  "reproduced" only beyond k (default two) standard errors, with an optional "marginal" band;
  :func:`fixed_eval_batches` / :func:`per_batch_losses` measure how stable an evaluation is;
  :func:`lora_scale_rule` names the three α regimes (fixed α, α = 2r, rsLoRA).

Learning rates are selected on the target task's *validation* split and reported on
the same split; with a handful of candidates the selection bias is small next to the
effects shown, and the notebooks say so.
"""
from __future__ import annotations

import contextlib
import copy
import math
import numbers
import operator
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lora_edu.core.counting import count_parameters
from lora_edu.core.inject import add_lora, freeze
from lora_edu.lab.train import TrainConfig, train

__all__ = [
    "adapted_copy", "fine_tune", "rank_sweep", "budget_split", "learn_forget", "format_table", "ATTENTION_TARGETS", "ALL_LINEAR_TARGETS",
    "fine_tune_replicas", "sweep_then_seeds", "fixed_eval_batches", "per_batch_losses", "mean_se", "lora_scale_rule",
    "difference", "paired_difference", "verdict",
]  # fmt: skip

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR_TARGETS = ATTENTION_TARGETS + ("up_proj", "down_proj")


def adapted_copy(base: nn.Module, method: str = "lora", r: int | None = None, alpha: float | None = None,
                 targets: Sequence[str] = ("q_proj", "v_proj"), rslora: bool = False, trainable_modules: Sequence[str] = (),
                 init_seed: int | None = None) -> nn.Module:
    """A copy of ``base`` ready to train: ``"lora"`` (rank-``r`` adapters on ``targets``, α defaulting to 2r, i.e.
    s = 2; ``init_seed`` seeds the draw of A), ``"full"`` (every parameter trainable) or ``"frozen"``."""
    model = copy.deepcopy(base)
    targets = [targets] if isinstance(targets, str) else list(targets)  # one name, as add_lora takes it
    if method == "lora":
        if r is None:
            raise ValueError("method='lora' needs r")
        if init_seed is not None:
            torch.manual_seed(init_seed)
        add_lora(model, targets, r=r, alpha=2.0 * r if alpha is None else alpha, rslora=rslora,
                 trainable_modules=trainable_modules)  # fmt: skip
    elif method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif method == "frozen":
        freeze(model)
    else:
        raise ValueError(f"method must be 'lora', 'full' or 'frozen', got {method!r}")
    return model


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
    targets = [targets] if isinstance(targets, str) else list(targets)
    model = adapted_copy(base, method, r, alpha, targets, rslora, trainable_modules, init_seed)
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




# -----------------------------------------------------------------------------
# many seeds and learning rates at once: replicas trained side by side


def fixed_eval_batches(task, n_batches: int | None = None, batch_size: int | None = None, split: str = "val") -> list[tuple]:
    """The fixed validation batches that ``task.evaluate(model, max_batches=n_batches)`` scores, as (x, y) pairs.

    Windows (LM) or images (ViT) in order, cut into batches of ``batch_size`` and ``n_batches`` of them
    spread evenly over the split (all of them when None) — the same selection as ``evaluate``.
    """
    from lora_edu.lab.data import _spread

    data = task.data[split]
    if task.kind == "lm":
        T, bs = task.block_size, batch_size or 64
        starts = list(range(0, len(data) - T - 1, T))
        groups = [starts[i : i + bs] for i in range(0, len(starts), bs)]
        groups = [groups[i] for i in _spread(len(groups), n_batches)]
        return [(torch.stack([data[i : i + T] for i in g]), torch.stack([data[i + 1 : i + T + 1] for i in g])) for g in groups]
    X, Y = data
    bs = batch_size or 512
    spans = [(i, min(i + bs, len(Y))) for i in range(0, len(Y), bs)]
    return [(X[a:b], Y[a:b]) for a, b in (spans[i] for i in _spread(len(spans), n_batches))]


def per_batch_losses(model: nn.Module, batches: Sequence[tuple]) -> torch.Tensor:
    """Mean cross-entropy of ``model`` on each batch (shape (n_batches,)): the raw material of an eval standard error."""
    out = []
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        for x, y in batches:
            logits = model(x.to(device)).float()
            out.append(nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.to(device).reshape(-1)).item())
    model.train(was_training)
    return torch.tensor(out, dtype=torch.float64)


def mean_se(values) -> tuple[float, float]:
    """(mean, standard error of the mean) of a sequence of numbers; s.e. = sample std (ddof=1) / √n (nan for n < 2)."""
    v = torch.as_tensor(list(values), dtype=torch.float64)
    if v.numel() < 2:
        return float(v.mean()), float("nan")
    return float(v.mean()), float(v.std(unbiased=True) / math.sqrt(v.numel()))


def lora_scale_rule(regime: str, r: int, alpha0: float = 2.0) -> tuple[float, bool]:
    """(alpha, rslora) of one α regime, all three agreeing at r = 1 (s = ``alpha0``):

    * ``"fixed"``: α = α₀ at every rank (Hu et al. 2021), so s = α₀/r shrinks with r;
    * ``"2r"``: α = α₀·r (α = 2r for α₀ = 2, Biderman et al. 2024), so s = α₀ at every rank;
    * ``"rslora"``: α = α₀ with s = α₀/√r (Kalajdzievski 2023).
    """
    if regime == "fixed":
        return alpha0, False
    if regime == "2r":
        return alpha0 * r, False
    if regime == "rslora":
        return alpha0, True
    raise ValueError(f"regime must be 'fixed', '2r' or 'rslora', got {regime!r}")


@dataclass
class Replicas:
    """K models trained side by side (one per (lr, seed) pair); everything indexed by replica k."""

    lrs: list[float]  # learning rate of replica k
    seeds: list[int]  # seed of replica k (A's init and the batch order)
    losses: dict[str, torch.Tensor]  # eval task name -> (K, n_batches) mean cross-entropy per eval batch
    batch_weights: dict[str, torch.Tensor]  # eval task name -> (n_batches,) share of the eval set in each batch
    accuracy: dict[str, torch.Tensor]  # image eval tasks: (K,) accuracy over the eval batches
    curve: list[tuple[int, torch.Tensor]]  # (step, (K,) mean eval loss on the training task) at each evaluation
    trainable: int  # trainable parameters of one replica
    total: int  # all parameters of one replica
    models: list[nn.Module] | None  # the trained replicas as ordinary modules (when asked for)
    wall_time_s: float

    def loss(self, task_name: str) -> torch.Tensor:
        """(K,) mean eval loss per replica over its eval set (what ``task.evaluate`` reports)."""
        return self.losses[task_name] @ self.batch_weights[task_name]

    def by_lr(self, values: torch.Tensor) -> dict[float, list[float]]:
        """lr -> the values of its seeds, in seed order."""
        out: dict[float, list[float]] = {}
        for k, lr in enumerate(self.lrs):
            out.setdefault(lr, []).append(float(values[k]))
        return out


def fine_tune_replicas(
    base: nn.Module,
    task,
    method: str = "lora",
    *,
    r: int | None = None,
    alpha: float | None = None,
    rslora: bool = False,
    targets: Sequence[str] = ("q_proj", "v_proj"),
    trainable_modules: Sequence[str] = (),
    lrs: Sequence[float] = (3e-3,),
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = 200,
    batch_size: int = 16,
    eval_tasks: Sequence = (),
    eval_batches: int | None = None,
    eval_batch_size: int | None = None,
    eval_every: int = 0,
    grad_clip: float | None = 1.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    device: str | torch.device = "cpu",
    keep_models: bool = False,
) -> Replicas:
    """Fine-tune len(lrs) × len(seeds) copies of ``base`` on ``task`` *at once* (``torch.func.vmap``).

    Replica (lr, seed) is exactly what :func:`fine_tune` with ``init_seed=seed, seed=seed, lr=lr`` trains —
    the same A initialisation, the same batches, AdamW with the same betas/eps, the same global-norm clipping
    *per replica*, a constant learning rate — but all replicas share one batched forward and backward pass,
    which on a CPU is several times faster than a loop over ``train``.  Adam is elementwise, so stacking the
    replicas' parameters and stepping them together changes nothing about any one of them
    (``tests/test_experiments.py`` compares with ``train``).  The replicas run in the base model's dtype with no
    autocast and, on CUDA, the math attention kernel: compare with ``train(precision="fp32")`` there (``train``
    defaults to bf16 autocast and the fused attention kernels on a GPU).

    ``eval_tasks`` (besides ``task`` itself) are scored at the end on their fixed validation batches
    (:func:`fixed_eval_batches`); ``eval_every > 0`` also records the training task's eval loss along the way.
    """
    import time

    from torch.func import functional_call, vmap

    from lora_edu.lab.train import resolve_device

    device = resolve_device(device)
    lrs, seeds = list(lrs), [operator.index(s) for s in seeds]  # numpy integers welcome
    if not lrs or not seeds:
        raise ValueError(f"fine_tune_replicas needs at least one learning rate and one seed, got lrs={lrs}, seeds={seeds}")
    if len(set(seeds)) != len(seeds) or len(set(lrs)) != len(lrs):
        raise ValueError(f"duplicate seeds or learning rates would be identical replicas (a fake zero spread): lrs={lrs}, seeds={seeds}")
    if not all(isinstance(lr, numbers.Real) and math.isfinite(lr) and lr > 0 for lr in lrs):
        raise ValueError(f"learning rates must be finite numbers > 0, got {lrs}")
    slots = [(float(lr), seed) for lr in lrs for seed in seeds]
    K = len(slots)
    replicas = []
    if method not in ("lora", "full"):
        raise ValueError(f"method must be 'lora' or 'full', got {method!r}")
    for lr, seed in slots:
        replicas.append(adapted_copy(base, method, r, alpha, targets, rslora, trainable_modules, init_seed=seed).to(device))
    proto = replicas[0]
    names = [n for n, p in proto.named_parameters() if p.requires_grad]
    stacked = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in replicas]).clone() for n in names}
    for p in stacked.values():
        p.requires_grad_(True)
    trainable = sum(p[0].numel() for p in stacked.values())
    total = sum(p.numel() for p in proto.parameters())
    proto.train()

    def logits_of(params, x):
        return functional_call(proto, params, (x,))

    def loss_of(params, x, y):
        logits = logits_of(params, x).float()
        return nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))

    batched_loss = vmap(loss_of)  # (K, B, ...) inputs -> (K,) losses
    lr_k = torch.tensor([lr for lr, _ in slots], dtype=torch.float32, device=device)
    gens = [torch.Generator().manual_seed(seed) for _, seed in slots]  # one per replica: replicas of one seed see the same batches
    m_state = {n: torch.zeros_like(p) for n, p in stacked.items()}
    v_state = {n: torch.zeros_like(p) for n, p in stacked.items()}
    b1, b2 = betas

    eval_sets = {t.name: (t, fixed_eval_batches(t, eval_batches, eval_batch_size)) for t in [task, *eval_tasks]}
    weights = {}
    for name, (_, batches) in eval_sets.items():
        sizes = torch.tensor([float(y.numel()) for _, y in batches], dtype=torch.float64)
        weights[name] = sizes / sizes.sum()

    def evaluate(which: Sequence[str]) -> tuple[dict, dict]:
        proto.eval()
        losses, acc = {}, {}
        with torch.no_grad():
            for name in which:
                t, batches = eval_sets[name]
                per, correct, count = [], torch.zeros(K, device=device), 0
                for x, y in batches:
                    x, y = x.to(device), y.to(device)
                    logits = vmap(logits_of, in_dims=(0, None))(stacked, x).float()  # (K, B, ..., V)
                    ce = nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.repeat(K, *([1] * (y.dim() - 1))).reshape(-1),
                                                     reduction="none").reshape(K, -1)  # fmt: skip
                    per.append(ce.mean(dim=1))
                    if t.kind == "image":
                        correct += (logits.argmax(-1) == y).sum(dim=1)
                        count += len(y)
                losses[name] = torch.stack(per, dim=1).double().cpu()
                if t.kind == "image":
                    acc[name] = (correct / count).double().cpu()
        proto.train()
        return losses, acc

    curve = []
    t0 = time.perf_counter()
    with contextlib.ExitStack() as quiet:
        quiet.enter_context(warnings.catch_warnings())  # vmap runs CPU flash attention replica by replica and says so on every call
        warnings.filterwarnings("ignore", message=".*batching rule.*")
        if device.type == "cuda":  # the fused CUDA attention kernels have no vmap rule for their backward ("LSE is not correctly aligned")
            quiet.enter_context(sdpa_kernel([SDPBackend.MATH]))
        if eval_every > 0:
            curve.append((0, evaluate([task.name])[0][task.name] @ weights[task.name]))
        for step in range(steps):
            xs, ys = zip(*(task.get_batch("train", batch_size, generator=g) for g in gens))
            x, y = torch.stack(xs).to(device), torch.stack(ys).to(device)  # (K, B, ...)
            loss = batched_loss(stacked, x, y).sum()  # replicas are independent: d(sum)/d(theta_k) = d(loss_k)/d(theta_k)
            grads = torch.autograd.grad(loss, list(stacked.values()))
            if grad_clip is not None:  # torch.nn.utils.clip_grad_norm_, once per replica
                norm = torch.sqrt(sum(g.pow(2).reshape(K, -1).sum(dim=1) for g in grads))
                coef = (grad_clip / (norm + 1e-6)).clamp(max=1.0)
                grads = [g * coef.view(K, *([1] * (g.dim() - 1))) for g in grads]
            t = step + 1
            with torch.no_grad():
                for (n, p), g in zip(stacked.items(), grads):  # torch.optim.AdamW, elementwise, lr per replica
                    shape = (K,) + (1,) * (p.dim() - 1)
                    if weight_decay:
                        p.mul_(1 - lr_k.view(shape) * weight_decay)
                    m_state[n].lerp_(g, 1 - b1)
                    v_state[n].mul_(b2).addcmul_(g, g, value=1 - b2)
                    denom = (v_state[n].sqrt() / math.sqrt(1 - b2**t)).add_(eps)
                    p.sub_(m_state[n] / denom * (lr_k / (1 - b1**t)).view(shape))
            if eval_every > 0 and (t % eval_every == 0 or t == steps):
                curve.append((t, evaluate([task.name])[0][task.name] @ weights[task.name]))
        losses, acc = evaluate(list(eval_sets))
    wall = time.perf_counter() - t0
    models = None
    if keep_models:
        models = []
        for k, model in enumerate(replicas):
            with torch.no_grad():
                params = dict(model.named_parameters())
                for n in names:
                    params[n].copy_(stacked[n][k])
            model.eval()
            models.append(model)
    return Replicas(lrs=[lr for lr, _ in slots], seeds=[s for _, s in slots], losses=losses, batch_weights=weights, accuracy=acc, curve=curve,
                    trainable=trainable, total=total, models=models, wall_time_s=wall)  # fmt: skip


def sweep_then_seeds(
    base: nn.Module,
    task,
    lrs: Sequence[float],
    seeds: Sequence[int] = (0, 1, 2),
    max_extend: int = 2,
    **replica_kw,
) -> dict:
    """Pick the learning rate on the first seed, extending the grid until the best is interior; then run the other seeds there.

    1. Train ``seeds[0]`` at every lr of the (geometric) grid ``lrs``, side by side.
    2. While the best lr (lowest eval loss on ``task``) is at an edge of the grid, add the next grid point beyond
       that edge (at most ``max_extend`` times) — a best value at the edge says only that the optimum lies further out.
    3. Train the remaining seeds at the chosen lr, side by side.

    Returns one record: ``lr``, ``lr_sweep`` (lr -> loss of seed 0), ``lr_sweep_all`` (lr -> {eval task: loss} of seed 0),
    ``interior`` (bool), ``seeds``, and for every
    eval task ``<name>_seeds`` (final loss per seed), ``<name>_batches`` ((seeds, batches) per-batch losses),
    ``<name>_weights`` (batch weights), ``<name>_acc_seeds`` for image tasks, ``trainable``, ``total``,
    ``curve`` (step, loss) of seed 0 at the chosen lr when ``eval_every`` is set, ``models`` when ``keep_models``.
    """
    lrs = sorted(float(lr) for lr in lrs)
    if len(lrs) < 3 or len(set(lrs)) != len(lrs):
        raise ValueError(f"a learning-rate grid needs >= 3 distinct values to bracket its best, got {lrs}")
    ratio = lrs[1] / lrs[0]
    first, rest = seeds[0], list(seeds[1:])
    runs: dict[float, tuple[Replicas, int]] = {}

    def run(grid):
        res = fine_tune_replicas(base, task, lrs=grid, seeds=(first,), **replica_kw)
        for k, lr in enumerate(res.lrs):
            runs[lr] = (res, k)

    run(lrs)
    for _ in range(max_extend):
        grid = sorted(runs)
        loss = {lr: float(runs[lr][0].loss(task.name)[runs[lr][1]]) for lr in grid}
        best = min(grid, key=lambda lr: loss[lr] if math.isfinite(loss[lr]) else math.inf)
        if best == grid[0]:
            run([grid[0] / ratio])
        elif best == grid[-1]:
            run([grid[-1] * ratio])
        else:
            break
    grid = sorted(runs)
    sweep = {lr: float(runs[lr][0].loss(task.name)[runs[lr][1]]) for lr in grid}
    best = min(grid, key=lambda lr: sweep[lr] if math.isfinite(sweep[lr]) else math.inf)
    res0, k0 = runs[best]
    parts = [(res0, [k0])]
    if rest:
        res1 = fine_tune_replicas(base, task, lrs=(best,), seeds=rest, **replica_kw)
        parts.append((res1, list(range(len(rest)))))
    rec = {"lr": best, "lr_sweep": sweep, "interior": grid[0] < best < grid[-1], "seeds": [first, *rest],
           "trainable": res0.trainable, "total": res0.total,
           "curve": [(step, float(v[k0])) for step, v in res0.curve],
           "lr_sweep_all": {lr: {name: float(res.loss(name)[k]) for name in res.losses} for lr, (res, k) in sorted(runs.items())}}  # fmt: skip
    for name in res0.losses:
        rec[f"{name}_batches"] = torch.cat([res.losses[name][ks] for res, ks in parts])
        rec[f"{name}_weights"] = res0.batch_weights[name]
        rec[f"{name}_seeds"] = (rec[f"{name}_batches"] @ res0.batch_weights[name]).tolist()
        if name in res0.accuracy:
            rec[f"{name}_acc_seeds"] = torch.cat([res.accuracy[name][ks] for res, ks in parts]).tolist()
    if replica_kw.get("keep_models"):
        rec["models"] = [m for res, ks in parts for m in (res.models[k] for k in ks)]
    return rec



def difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """mean(a) − mean(b) and its standard error √(se_a² + se_b²), treating the two sets of seeds as independent."""
    (ma, sa), (mb, sb) = mean_se(a), mean_se(b)
    return ma - mb, math.sqrt(sa**2 + sb**2)


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the per-seed differences a[k] − b[k].

    For runs that share seed k (the same draw of A and the same batches in the same order, as
    :func:`fine_tune_replicas` and :func:`fine_tune` give), the seed-to-seed variation both runs
    share cancels, which :func:`difference` cannot see; with n seeds the s.e. has n − 1 degrees of freedom.
    """
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        raise TypeError("paired_difference takes two sequences of per-seed values in the same seed order, not mappings "
                        "(pass list(d.values()) after checking both have the same keys in the same order)")
    a, b = list(a), list(b)
    if not a:
        raise ValueError("paired_difference needs at least one shared seed")
    if len(a) != len(b):
        raise ValueError(f"paired_difference needs one value per shared seed in both, got {len(a)} and {len(b)}")
    return mean_se([x - y for x, y in zip(a, b)])


def verdict(diff: float, se: float, k: float = 2.0, strong: float | None = None) -> str:
    """A claim "diff > 0" judged with its uncertainty: beyond k standard errors either way, or unresolved.

    With ``strong`` (e.g. 3, about what a one-sided t-test at 5 % needs with 3 seeds: 2.92), a
    difference beyond k but within ``strong`` standard errors is "marginal" ("marginal, against"
    when negative), and only beyond ``strong`` is it "reproduced" or "contradicted".
    """
    if se < 0:
        raise ValueError(f"the standard error must be >= 0, got {se!r}")
    if not k > 0 or (strong is not None and not strong >= k):
        raise ValueError(f"verdict needs k > 0 and strong >= k (or strong=None), got k={k!r}, strong={strong!r}")
    if math.isnan(diff):
        return "not resolved at this scale"
    z = abs(diff) / se if (se > 0 or math.isnan(se)) else (math.inf if diff != 0 else 0.0)
    if not z > k:  # a nan s.e. (fewer than 2 seeds) resolves nothing
        return "not resolved at this scale"
    if strong is not None and z <= strong:
        return "marginal" if diff > 0 else "marginal, against"
    return "reproduced" if diff > 0 else "contradicted"
