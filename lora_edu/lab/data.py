"""Offline data with a real domain shift: source tasks to pretrain on, target tasks to adapt to.

Nothing here touches the network. Three families, all behind one small interface
(:class:`Task`) that :func:`lora_edu.lab.train.train` uses:

(a) **Language modelling, English prose -> Python code** (:func:`lm_tasks`).
    SOURCE: the English prose of the Python Language Reference, which ships with
    every CPython as ``pydoc_data.topics`` (the text ``help("assert")`` prints);
    indented code examples and heading underlines are removed, leaving ~250 KB of
    paragraphs. TARGET: Python source code, the first 16 KB of each of 20 fixed
    standard-library modules (``_TARGET_MODULES``), ~250 KB. Both are read from the
    running interpreter's standard library, so the exact bytes depend on the Python
    version (see :func:`corpus_info` for sizes and SHA-256 fingerprints). Fallbacks,
    used only if ``pydoc_data`` is missing (some stripped-down installs): the
    docstrings of the target modules' *other* stdlib neighbours, then ``this``.
    Tokenization is character-level with a FIXED 97-symbol vocabulary
    (:class:`CharTokenizer`), so checkpoints stay valid on every machine.

(b) **Image classification, upright shapes -> rotated, inverted shapes**
    (:func:`image_tasks`). Procedurally generated 16x16 RGB images of 6 classes
    (horizontal stripes, vertical stripes, square, disk, cross, ring), made by
    this file from a seed. SOURCE: near-upright shapes, bright on dark. TARGET:
    the same classes rotated by ~45 degrees and drawn dark on bright. Labels keep
    their meaning, so the pretrained head stays useful while its features do not.

(c) **Teacher-student regression with a planted low-rank update**
    (:func:`planted_regression`). y = (W0 + dW*) x + noise, x ~ N(0, I), with
    rank(dW*) = k* exactly. A student initialised at W0 (the "pretrained" weight)
    and given a rank-r update can reach the noise floor iff r >= k*
    (Eckart-Young): the rank sweep of the LoRA paper (§7, Table 6) with a known
    answer, :meth:`RegressionTask.min_excess`.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import math
import os
import re
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# the shared interface


class Task:
    """A dataset plus its objective. Subclasses set ``name``, ``kind`` and ``metric``.

    * ``get_batch(split, batch_size, generator, device) -> (x, y)``: a random batch;
      ``split`` is ``"train"`` or ``"val"``; ``generator`` is a CPU ``torch.Generator``
      (the task's own seeded one if ``None``).
    * ``loss(model, batch) -> Tensor``: the mean training loss (a scalar, float32 or wider).
    * ``evaluate(model, split="val", batch_size=..., max_batches=None) -> dict``:
      deterministic metrics over a fixed pass of the split, e.g. ``{"loss", "ppl"}``.
    * ``make_model(preset="tiny") -> nn.Module``: a fresh model that fits this task.
    """

    name: str = "task"
    kind: str = "task"  # "lm" | "image" | "regression"
    metric: str = "loss"  # the headline metric in evaluate()'s dict besides "loss"
    seed: int = 0

    def get_batch(self, split: str, batch_size: int, generator: torch.Generator | None = None, device="cpu"):
        raise NotImplementedError

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, split: str = "val", batch_size: int = 256, max_batches: int | None = None) -> dict:
        raise NotImplementedError

    def make_model(self, preset: str = "tiny") -> nn.Module:
        raise NotImplementedError

    def _generator(self, generator: torch.Generator | None) -> torch.Generator:
        if generator is not None:
            return generator
        if not hasattr(self, "_default_gen"):
            self._default_gen = torch.Generator().manual_seed(self.seed)
        return self._default_gen

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def _check_split(split: str) -> None:
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")


class _eval_mode:
    """Context manager: model.eval() + no_grad inside, the previous train/eval mode restored after."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.no_grad = torch.no_grad()
        self.no_grad.__enter__()
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)
        self.no_grad.__exit__(*exc)


def _spread(n_items: int, max_items: int | None) -> list[int]:
    """Indices of at most ``max_items`` items spread evenly over ``range(n_items)``."""
    if max_items is None or max_items >= n_items:
        return list(range(n_items))
    return sorted({int(i * n_items / max_items) for i in range(max_items)})


# -----------------------------------------------------------------------------
# (a) character-level language modelling: English prose -> Python source


class CharTokenizer:
    """A fixed character vocabulary: "\\n" (id 0), printable ASCII 32..126 (ids 1..95), <unk> (id 96).

    Fixed, not learned from the corpus, so a checkpoint's token ids mean the same on
    every machine and Python version. Tabs become 4 spaces; any other character
    (non-ASCII letters, control codes) maps to <unk>, decoded as U+FFFD.
    """

    chars = "\n" + "".join(chr(i) for i in range(32, 127))
    unk_id = len(chars)  # 96
    vocab_size = len(chars) + 1  # 97

    def __init__(self):
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    def encode(self, text: str) -> list[int]:
        text = text.replace("\t", "    ")
        return [self.stoi.get(c, self.unk_id) for c in text]

    def decode(self, ids) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return "".join(self.chars[i] if 0 <= i < self.unk_id else "\ufffd" for i in ids)


# fixed, sorted list of pure-Python stdlib modules present in CPython 3.10 .. 3.13
_TARGET_MODULES = (
    "argparse", "calendar", "configparser", "contextlib", "csv", "dataclasses", "difflib", "enum",
    "fractions", "functools", "gettext", "heapq", "ipaddress", "pprint", "selectors", "shlex",
    "statistics", "string", "textwrap", "tokenize",
)  # fmt: skip
# fallback prose source: docstrings of modules that are NOT in the target corpus
_FALLBACK_DOC_MODULES = (
    "abc", "base64", "bisect", "codecs", "collections/__init__", "copy", "datetime", "decimal",
    "email/message", "fnmatch", "glob", "inspect", "json/__init__", "logging/__init__", "os",
    "pathlib", "pickle", "random", "shutil", "socket", "subprocess", "tarfile", "threading",
    "typing", "unittest/case", "urllib/parse", "uuid", "zipfile",
)  # fmt: skip
_PER_FILE_CHARS = 16_000  # at most this many characters from each target module


def _stdlib_dir() -> str:
    return os.path.dirname(os.__file__)


def _read_stdlib(module: str) -> str | None:
    path = os.path.join(_stdlib_dir(), *module.split("/")) + ".py"
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return None


def _head_lines(text: str, max_chars: int) -> str:
    """The longest prefix of whole lines of ``text`` with at most ``max_chars`` characters."""
    if len(text) <= max_chars:
        return text
    cut = text.rfind("\n", 0, max_chars)
    return text[: cut + 1 if cut > 0 else max_chars]


def _prose_from_topics() -> list[str] | None:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return None
    docs = []
    for key in sorted(topics):
        keep = [
            line.rstrip()
            for line in topics[key].splitlines()
            if not line.startswith((" ", "\t")) and not re.fullmatch(r"[*=\-~^]+", line.strip() or "x")
        ]
        docs.append(re.sub(r"\n{3,}", "\n\n", "\n".join(keep)).strip() + "\n\n")
    return docs


def _prose_from_docstrings() -> list[str]:
    docs = []
    for mod in _FALLBACK_DOC_MODULES:
        src = _read_stdlib(mod)
        if src is None:
            continue
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    docs.append(doc.strip() + "\n\n")
    import codecs
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen of Python
        import this
    docs.append(codecs.decode(this.s, "rot13") + "\n\n")
    return docs


@functools.cache
def _documents(which: str) -> tuple[tuple[str, ...], str]:
    """(documents, origin) for the "source" (prose) or "target" (code) corpus."""
    if which == "source":
        docs = _prose_from_topics()
        if docs:
            return tuple(docs), "pydoc_data.topics (Python Language Reference prose)"
        return tuple(_prose_from_docstrings()), "stdlib docstrings (fallback: pydoc_data missing)"
    if which == "target":
        docs = []
        for mod in _TARGET_MODULES:
            src = _read_stdlib(mod)
            if src is not None:
                docs.append(_head_lines(src, _PER_FILE_CHARS) + "\n")
        if not docs:  # no .py sources (a frozen/zipped stdlib): fall back to this very package
            here = os.path.dirname(os.path.abspath(__file__))
            for fn in sorted(os.listdir(here)):
                if fn.endswith(".py"):
                    with open(os.path.join(here, fn), encoding="utf-8") as f:
                        docs.append(_head_lines(f.read(), _PER_FILE_CHARS) + "\n")
            return tuple(docs), "lora_edu's own source (fallback: no stdlib .py files)"
        return tuple(docs), f"Python {sys.version_info[0]}.{sys.version_info[1]} stdlib source ({len(docs)} modules)"
    raise ValueError(f"which must be 'source' or 'target', got {which!r}")


@functools.cache
def corpus_splits(which: str, max_chars: int = 250_000, val_fraction: float = 0.1) -> tuple[str, str]:
    """(train_text, val_text) of the "source" or "target" corpus.

    Each document (a reference topic, or a module) is split by lines: its first
    ``1 - val_fraction`` goes to train and the rest to val, so both splits cover the
    same topics. Documents are taken in a fixed order until ``max_chars`` is reached.
    """
    docs, _ = _documents(which)
    train, val, total = [], [], 0
    for doc in docs:
        doc = _head_lines(doc, max_chars - total)
        if not doc:
            break
        lines = doc.splitlines(keepends=True)
        n_val = max(1, round(len(lines) * val_fraction)) if len(lines) > 1 else 0
        train.append("".join(lines[: len(lines) - n_val]))
        val.append("".join(lines[len(lines) - n_val :]))
        total += len(doc)
        if total >= max_chars:
            break
    return "".join(train), "".join(val)


def corpus_info(max_chars: int = 250_000, val_fraction: float = 0.1) -> dict:
    """Origin, sizes (characters) and SHA-256 of both corpora on this interpreter."""
    info = {"python": sys.version.split()[0]}
    for which in ("source", "target"):
        train, val = corpus_splits(which, max_chars, val_fraction)
        info[which] = {
            "origin": _documents(which)[1],
            "train_chars": len(train),
            "val_chars": len(val),
            "sha256": hashlib.sha256((train + "\0" + val).encode()).hexdigest(),
        }
    return info


class LMTask(Task):
    """Next-character prediction on one corpus; batches are random windows of ``block_size``."""

    kind, metric = "lm", "ppl"

    def __init__(self, name: str, train_text: str, val_text: str, block_size: int = 64, seed: int = 0, origin: str = ""):
        self.name, self.block_size, self.seed, self.origin = name, block_size, seed, origin
        self.tokenizer = CharTokenizer()
        self.data = {
            "train": torch.tensor(self.tokenizer.encode(train_text), dtype=torch.long),
            "val": torch.tensor(self.tokenizer.encode(val_text), dtype=torch.long),
        }
        self.vocab_size = self.tokenizer.vocab_size

    def get_batch(self, split, batch_size, generator=None, device="cpu"):
        _check_split(split)
        data, T = self.data[split], self.block_size
        ix = torch.randint(len(data) - T - 1, (batch_size,), generator=self._generator(generator))
        x = torch.stack([data[i : i + T] for i in ix.tolist()])  # (B, T)
        y = torch.stack([data[i + 1 : i + T + 1] for i in ix.tolist()])  # (B, T), x shifted by one
        return x.to(device), y.to(device)

    def loss(self, model, batch):
        x, y = batch
        logits = model(x)  # (B, T, V)
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))

    def evaluate(self, model, split="val", batch_size=64, max_batches=None):
        """Mean cross-entropy (nats/char) and perplexity over non-overlapping windows of the split.

        With ``max_batches`` only that many batches of windows, spread evenly over the split.
        """
        _check_split(split)
        device, _ = _model_device_dtype(model)
        data, T = self.data[split], self.block_size
        starts = list(range(0, len(data) - T - 1, T))
        batches = [starts[i : i + batch_size] for i in range(0, len(starts), batch_size)]
        batches = [batches[i] for i in _spread(len(batches), max_batches)]
        total, count = 0.0, 0
        with _eval_mode(model):
            for b in batches:
                x = torch.stack([data[i : i + T] for i in b]).to(device)
                y = torch.stack([data[i + 1 : i + T + 1] for i in b]).to(device)
                logits = model(x)
                total += F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum").item()
                count += y.numel()
        loss = total / count
        return {"loss": loss, "ppl": math.exp(loss)}

    def make_model(self, preset="tiny"):
        from lora_edu.lab.models import GPT, GPTConfig

        return GPT(GPTConfig.preset(preset, vocab_size=self.vocab_size, block_size=self.block_size))


def lm_tasks(seed: int = 0, block_size: int = 64, max_chars: int = 250_000, val_fraction: float = 0.1) -> tuple[LMTask, LMTask]:
    """(source, target): English prose ("prose") and Python source code ("code").

    ~250 KB of characters each (90% train / 10% val); see the module docstring for origin.
    ``seed`` seeds the tasks' default batch generators; the text itself does not depend on it.
    """
    tasks = []
    for which, name in (("source", "prose"), ("target", "code")):
        train, val = corpus_splits(which, max_chars, val_fraction)
        tasks.append(LMTask(name, train, val, block_size=block_size, seed=seed, origin=_documents(which)[1]))
    return tasks[0], tasks[1]


# -----------------------------------------------------------------------------
# (b) procedural shapes for the ViT

SHAPE_CLASSES = ("hstripes", "vstripes", "square", "disk", "cross", "ring")


@dataclass
class ShapesDomain:
    """How a domain draws its shapes (one per task)."""

    rotation_deg: float = 0.0  # mean rotation of every shape
    rotation_jitter_deg: float = 10.0  # uniform jitter around it
    invert: bool = False  # False: bright shape on dark ground; True: dark shape on bright ground
    noise_std: float = 0.05  # additive Gaussian pixel noise


def make_shapes(n: int, domain: ShapesDomain, image_size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (n, 3, H, W) in [0, 1] and their labels (n,), balanced over SHAPE_CLASSES.

    Every image: a random class; a random centre (+-0.3), size (0.4..0.7), stripe
    frequency (1.2..2.2 cycles per unit), phase and rotation; random foreground and
    background colours on opposite sides of 0.5 in brightness; Gaussian noise.
    Coordinates run over [-1, 1]. Deterministic given ``seed``.
    """
    g = torch.Generator().manual_seed(seed)
    U = lambda lo, hi: lo + (hi - lo) * torch.rand(n, 1, 1, generator=g)  # noqa: E731
    y = torch.randperm(n, generator=g) % len(SHAPE_CLASSES)  # balanced labels
    coords = (torch.arange(image_size) + 0.5) / image_size * 2 - 1
    Y, X = torch.meshgrid(coords, coords, indexing="ij")  # (H, W) each
    cx, cy, s = U(-0.3, 0.3), U(-0.3, 0.3), U(0.4, 0.7)
    theta = torch.deg2rad(domain.rotation_deg + U(-domain.rotation_jitter_deg, domain.rotation_jitter_deg))
    freq, phase = U(1.2, 2.2), U(0, 2 * math.pi)
    u = torch.cos(theta) * (X - cx) + torch.sin(theta) * (Y - cy)  # (n, H, W) shape-frame coordinates
    v = -torch.sin(theta) * (X - cx) + torch.cos(theta) * (Y - cy)
    rad = torch.sqrt(u**2 + v**2)
    masks = torch.stack(
        [
            torch.sin(2 * math.pi * freq * v + phase) > 0,  # hstripes
            torch.sin(2 * math.pi * freq * u + phase) > 0,  # vstripes
            torch.maximum(u.abs(), v.abs()) < s,  # square
            rad < s,  # disk
            ((u.abs() < s / 3) & (v.abs() < s)) | ((v.abs() < s / 3) & (u.abs() < s)),  # cross
            (rad < s) & (rad > 0.55 * s),  # ring
        ]
    )  # (classes, n, H, W)
    mask = masks[y, torch.arange(n)].float().unsqueeze(1)  # (n, 1, H, W)
    bright = 0.6 + 0.4 * torch.rand(n, 3, 1, 1, generator=g)
    dark = 0.35 * torch.rand(n, 3, 1, 1, generator=g)
    fg, bg = (dark, bright) if domain.invert else (bright, dark)
    images = mask * fg + (1 - mask) * bg + domain.noise_std * torch.randn(n, 3, image_size, image_size, generator=g)
    return images.clamp(0, 1), y


class ImageTask(Task):
    """Classification of fixed, pre-generated images; ``loss`` is cross-entropy, ``metric`` accuracy."""

    kind, metric = "image", "acc"

    def __init__(self, name: str, domain: ShapesDomain, image_size: int = 16, n_train: int = 8192, n_val: int = 1024, seed: int = 0):
        self.name, self.domain, self.image_size, self.seed = name, domain, image_size, seed
        self.num_classes = len(SHAPE_CLASSES)
        self.data = {
            "train": make_shapes(n_train, domain, image_size, seed=2 * seed),
            "val": make_shapes(n_val, domain, image_size, seed=2 * seed + 1),
        }

    def get_batch(self, split, batch_size, generator=None, device="cpu"):
        _check_split(split)
        x, y = self.data[split]
        ix = torch.randint(len(y), (batch_size,), generator=self._generator(generator))
        return x[ix].to(device), y[ix].to(device)

    def loss(self, model, batch):
        x, y = batch
        _, dtype = _model_device_dtype(model)
        return F.cross_entropy(model(x.to(dtype)).float(), y)

    def evaluate(self, model, split="val", batch_size=512, max_batches=None):
        _check_split(split)
        device, dtype = _model_device_dtype(model)
        X, Y = self.data[split]
        batches = [(i, min(i + batch_size, len(Y))) for i in range(0, len(Y), batch_size)]
        batches = [batches[i] for i in _spread(len(batches), max_batches)]
        total, correct, count = 0.0, 0, 0
        with _eval_mode(model):
            for a, b in batches:
                x, y = X[a:b].to(device, dtype), Y[a:b].to(device)
                logits = model(x).float()
                total += F.cross_entropy(logits, y, reduction="sum").item()
                correct += (logits.argmax(-1) == y).sum().item()
                count += len(y)
        return {"loss": total / count, "acc": correct / count}

    def make_model(self, preset="tiny"):
        from lora_edu.lab.models import ViT, ViTConfig

        return ViT(ViTConfig.preset(preset, image_size=self.image_size, num_classes=self.num_classes))


def image_tasks(seed: int = 0, image_size: int = 16, n_train: int = 8192, n_val: int = 1024) -> tuple[ImageTask, ImageTask]:
    """(source, target) shape classification: "shapes" (upright, bright on dark) and
    "shapes-rot45-inv" (rotated ~45 degrees, dark on bright). Same 6 labels in both.

    Generated by :func:`make_shapes` (this file) from ``seed``: 8192 train and 1024
    val images of 3x16x16 each (~27 MB of float32 per task).
    """
    src = ImageTask("shapes", ShapesDomain(), image_size, n_train, n_val, seed=seed)
    tgt = ImageTask("shapes-rot45-inv", ShapesDomain(rotation_deg=45.0, invert=True), image_size, n_train, n_val, seed=seed + 1000)
    return src, tgt


# -----------------------------------------------------------------------------
# (c) teacher-student regression with a planted rank-k* update


class LinearStudent(nn.Module):
    """y = W x: one bias-free linear layer named ``W`` (so ``add_lora(model, targets=["W"])``)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.W = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.W(x)  # (B, d_in) -> (B, d_out)


def effective_weight(model: nn.Module, d_in: int) -> torch.Tensor:
    """The (d_out, d_in) matrix that a bias-free linear ``model`` applies, read off as model(I)^T.

    Works for a plain linear layer, an unmerged LoRA layer (W0 + s B A) or any composition.
    """
    device, dtype = _model_device_dtype(model)
    with _eval_mode(model), torch.autocast(device.type, enabled=False):  # full precision, even inside autocast
        return model(torch.eye(d_in, device=device, dtype=dtype)).T  # (d_in, d_out) -> (d_out, d_in)


class RegressionTask(Task):
    """y = (W0 + delta_W_star) x + noise_std * eps with x, eps ~ N(0, I); loss = mean squared error.

    ``W0`` (d_out, d_in): the "pretrained" teacher, N(0, 1/d_in) entries.
    ``delta_W_star = U diag(sigma) V^T`` with orthonormal U (d_out, k*), V (d_in, k*)
    and ``sigma`` = ``singular_values`` (default linspace(1, 0.5, k*)): rank exactly k*.

    Train batches are fresh samples from ``generator`` (infinite data); the val
    split is a fixed set of ``n_val`` samples. ``evaluate`` also reports the
    population excess loss E||(W - W*) x||^2 / d_out = ||W - W*||_F^2 / d_out, which
    has its minimum over rank-r updates at :meth:`min_excess` (Eckart-Young).
    """

    kind, metric = "regression", "excess"

    def __init__(self, d_in=64, d_out=64, k_star=4, seed=0, noise_std=0.0, singular_values=None, n_val=2048):
        if not 1 <= k_star <= min(d_in, d_out):
            raise ValueError(f"k_star must be in [1, min(d_in, d_out)] = [1, {min(d_in, d_out)}], got {k_star}")
        self.name = f"planted-rank{k_star}"
        self.d_in, self.d_out, self.k_star, self.seed, self.noise_std = d_in, d_out, k_star, seed, noise_std
        g = torch.Generator().manual_seed(seed)
        self.W0 = torch.randn(d_out, d_in, generator=g, dtype=torch.float64) / math.sqrt(d_in)
        U, _ = torch.linalg.qr(torch.randn(d_out, k_star, generator=g, dtype=torch.float64))  # (d_out, k*)
        V, _ = torch.linalg.qr(torch.randn(d_in, k_star, generator=g, dtype=torch.float64))  # (d_in, k*)
        sigma = torch.linspace(1.0, 0.5, k_star, dtype=torch.float64) if singular_values is None else torch.as_tensor(singular_values, dtype=torch.float64)
        assert sigma.shape == (k_star,) and (sigma > 0).all(), "need k_star positive singular values"
        self.sigma = sigma.sort(descending=True).values
        self.delta_W_star = U @ torch.diag(self.sigma) @ V.T  # (d_out, d_in), rank k*
        self.W_star = self.W0 + self.delta_W_star
        x = torch.randn(n_val, d_in, generator=g, dtype=torch.float64)
        self.val = (x, x @ self.W_star.T + noise_std * torch.randn(n_val, d_out, generator=g, dtype=torch.float64))

    def get_batch(self, split, batch_size, generator=None, device="cpu"):
        _check_split(split)
        if split == "val":
            ix = torch.randint(len(self.val[0]), (batch_size,), generator=self._generator(generator))
            return self.val[0][ix].float().to(device), self.val[1][ix].float().to(device)
        g = self._generator(generator)
        x = torch.randn(batch_size, self.d_in, generator=g)  # (B, d_in)
        y = x @ self.W_star.float().T + self.noise_std * torch.randn(batch_size, self.d_out, generator=g)  # (B, d_out)
        return x.to(device), y.to(device)

    def loss(self, model, batch):
        x, y = batch
        _, dtype = _model_device_dtype(model)
        return F.mse_loss(model(x.to(dtype)).float(), y.float())

    def evaluate(self, model, split="val", batch_size=2048, max_batches=None):
        _check_split(split)
        device, dtype = _model_device_dtype(model)
        W = effective_weight(model, self.d_in).double().cpu()
        delta_err = W - self.W_star
        out = {
            "excess": (delta_err.pow(2).sum() / self.d_out).item(),  # population loss minus noise floor
            "delta_rel_err": (delta_err.norm() / self.delta_W_star.norm()).item(),  # ||dW - dW*|| / ||dW*||
        }
        if split == "val":
            x, y = self.val
            with _eval_mode(model), torch.autocast(device.type, enabled=False):
                pred = torch.cat([model(x[i : i + batch_size].to(device, dtype)).double().cpu() for i in range(0, len(x), batch_size)])
            out["loss"] = F.mse_loss(pred, y).item()
        else:  # the population loss of the training distribution
            out["loss"] = out["excess"] + self.noise_std**2
        return {"loss": out["loss"], **{k: v for k, v in out.items() if k != "loss"}}

    def min_excess(self, r: int) -> float:
        """Smallest population excess loss of W0 + (any rank-r update): sum_{i>r} sigma_i^2 / d_out."""
        return (self.sigma[r:].pow(2).sum() / self.d_out).item()

    def make_model(self, preset="tiny", dtype=torch.float32):
        """A student initialised at the teacher W0 (``preset`` is ignored)."""
        model = LinearStudent(self.d_in, self.d_out).to(dtype)
        with torch.no_grad():
            model.W.weight.copy_(self.W0)
        return model


def planted_regression(d_in: int = 64, d_out: int = 64, k_star: int = 4, seed: int = 0, noise_std: float = 0.0, singular_values=None) -> RegressionTask:
    """A :class:`RegressionTask` with rank(delta_W_star) = ``k_star``; see its docstring."""
    return RegressionTask(d_in, d_out, k_star, seed=seed, noise_std=noise_std, singular_values=singular_values)
