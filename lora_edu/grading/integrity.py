"""Integrity of a graded run: is the grading code unchanged, did the notebook write its own answers?

Three kinds of evidence, each cheap and each reported as a *flag* that an instructor reads:

* :func:`tree_fingerprint` — a SHA-256 over every file of the installed ``lora_edu``
  package (the checker, the reference implementation, the checkpoints).  ``lora-edu
  grade`` compares it before and after each submission and aborts if it changed.
* :class:`CheckerSnapshot` — the identity of every object the checker relies on (its
  functions and their code, the exercise batteries, ``builtins``, the torch functions
  the oracles call), taken before any student code runs and compared after it ran:
  a notebook that monkey-patches the checker is flagged and its score is not trusted.
* :func:`source_flags` / :func:`answer_flags` — answers imported or aliased from
  ``lora_edu`` or subclassing its reference classes, imports of the grading modules,
  and reads of the grader's internals (frames, the garbage collector, ``/proc``).

None of this makes a process that runs untrusted code safe: code in a process can
read and change anything in it.  See docs/instructors.md for what the grader does and
does not protect against.
"""
from __future__ import annotations

import ast
import builtins
import hashlib
import math
import os
import random
import sys
import types
from pathlib import Path

from . import battery
from .battery import Exercise
from .result import CheckResult

# ----------------------------------------------------------------------------- the package on disk


def tree_fingerprint(root: str | os.PathLike) -> str:
    """SHA-256 over the relative paths and bytes of every file under ``root`` (caches excluded)."""
    root = Path(root)
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            if name.endswith((".pyc", ".pyo")):
                continue
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            h.update(rel.encode() + b"\0")
            if p.is_symlink():
                h.update(b"link:" + os.readlink(p).encode() + b"\0")
                continue
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            h.update(b"\0")
    return h.hexdigest()


def package_root() -> Path:
    """The folder of the ``lora_edu`` package this module belongs to."""
    return Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- objects in memory

_IGNORED_BUILTINS = {"input", "raw_input", "_", "__", "___", "_ih", "_oh", "_dh", "In", "Out", "get_ipython", "exit", "quit", "display", "__IPYTHON__"}


def _watched_namespaces() -> list[tuple[str, dict]]:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    spaces: list[tuple[str, dict]] = [("builtins", vars(builtins)), ("math", vars(math)), ("random", vars(random)),
                                      ("random.Random", dict(vars(random.Random)))]
    np_random = sys.modules.get("numpy.random")
    if np_random is not None:
        spaces.append(("numpy.random", {k: v for k, v in vars(np_random).items() if not k.startswith("_")}))
    for name, mod in sorted(sys.modules.items()):
        if name.startswith("lora_edu.grading") and isinstance(mod, types.ModuleType):
            spaces.append((name, vars(mod)))
    for label, obj in (("torch", torch), ("torch.nn.functional", F), ("torch.linalg", torch.linalg), ("torch.nn.init", nn.init),
                       ("torch.random", torch.random)):
        spaces.append((label, {k: v for k, v in vars(obj).items() if not k.startswith("_")}))
    for label, cls in (("torch.Tensor", torch.Tensor), ("torch.nn.Module", nn.Module), ("torch.nn.Linear", nn.Linear),
                       ("torch.nn.Parameter", nn.Parameter)):
        # what attribute lookup finds, inherited from C base classes included (a patch adds an entry that shadows them)
        names = [k for k in dir(cls) if not k.startswith("_") or k in _DUNDERS]
        spaces.append((label, {k: _lookup(cls, k) for k in names}))
    return spaces


_DUNDERS = {"__call__", "__init__", "__add__", "__sub__", "__mul__", "__matmul__", "__truediv__", "__neg__", "__abs__", "__eq__",
            "__lt__", "__le__", "__gt__", "__ge__", "__getattr__", "__getattribute__", "__setattr__", "__float__", "__bool__"}


def _lookup(cls: type, name: str):
    for klass in cls.__mro__:
        if name in vars(klass):
            return vars(klass)[name]
    return None


def _function_state(fn) -> tuple:
    return (id(fn.__code__), hash(fn.__code__.co_code), id(fn.__defaults__), id(fn.__kwdefaults__), id(fn.__closure__))


def settle_lazy_imports() -> None:
    """Import now what torch imports lazily *and* uses to replace its own functions.

    Constructing any optimizer calls a ``torch._compile``-wrapped method, which imports
    ``torch._dynamo`` on first use; that import replaces ``torch.manual_seed`` by a
    wrapper.  Without this, a correct notebook that builds an optimizer looks as if it
    had patched the checker.  Also imports ``numpy.random``, watched by the snapshot.
    """
    import torch

    try:
        import torch._dynamo  # noqa: F401
    except Exception:  # noqa: BLE001 - a torch without dynamo has nothing to settle
        pass
    try:
        import torch.optim

        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)  # any other lazy work done on first construction
    except Exception:  # noqa: BLE001
        pass
    try:
        import numpy.random  # noqa: F401
    except ImportError:
        pass


class CheckerSnapshot:
    """What the checker is made of, by identity; :meth:`changes` lists what differs now.

    Taken after the checker is imported and before any student code runs.  Names added
    since are ignored (importing a module adds attributes to its parent); names that
    changed or disappeared are reported.
    """

    def __init__(self, exercises: dict[str, Exercise]):
        self.exercises = exercises
        settle_lazy_imports()
        self._capture_now = self._capture  # bound now: patching the class later does not change what is compared
        self.state = self._capture_now()

    def _capture(self) -> dict[str, object]:
        state: dict[str, object] = {}
        for label, space in _watched_namespaces():
            for key, value in list(space.items()):
                if label == "builtins" and key in _IGNORED_BUILTINS:
                    continue
                state[f"{label}.{key}"] = id(value)
                if isinstance(value, types.FunctionType) and label.startswith("lora_edu"):
                    state[f"{label}.{key}()"] = _function_state(value)
                if isinstance(value, type) and label.startswith("lora_edu") and value.__module__.startswith("lora_edu"):
                    for attr, v in list(vars(value).items()):
                        state[f"{label}.{key}.{attr}"] = id(v)
        state["EXERCISES"] = tuple((k, id(v)) for k, v in self.exercises.items())
        for name, ex in self.exercises.items():
            state[f"EXERCISES[{name}]"] = (id(ex.cases), ex.symbols, ex.written, ex.reference_names, ex.allowed_grading_imports)
            for c in ex.cases:
                state[f"EXERCISES[{name}].{c.id}"] = (id(c), id(c.fn), _function_state(c.fn), c.points, c.requires, c.optional,
                                                      c.min_timeout, c.kind, c.name)
            state[f"EXERCISES[{name}].n"] = len(ex.cases)
        for name in sorted(sys.modules):
            if name.startswith("lora_edu.grading"):
                state[f"sys.modules[{name}]"] = id(sys.modules[name])
        return state

    def changes(self) -> list[str]:
        now = self._capture_now()
        return sorted(k for k, v in self.state.items() if now.get(k, _GONE) != v)


_GONE = object()


# ----------------------------------------------------------------------------- the notebook's source

GRADING_NAMES_STUDENTS_MAY_IMPORT = {"check", "graded", "CheckResult", "CaseResult"}
_INTROSPECTION = {
    "gc.get_objects": "walks the grader's objects (gc.get_objects)",
    "gc.get_referrers": "walks the grader's objects (gc.get_referrers)",
    "sys._getframe": "reads the grader's stack frames (sys._getframe)",
    "inspect.currentframe": "reads the grader's stack frames (inspect.currentframe)",
    "inspect.stack": "reads the grader's stack frames (inspect.stack)",
    "ctypes": "uses ctypes (raw memory access)",
    "/proc": "reads /proc (other processes, or the grader's own memory and file descriptors)",
    "os.kill": "sends signals to processes",
    "os.killpg": "sends signals to process groups",
    "os.setsid": "leaves the grader's process session",
    "os.fork": "forks a process",
    "os.write": "writes to raw file descriptors",
    "os.fdopen": "opens raw file descriptors",
    "os.symlink": "creates symbolic links",
    "shutil.rmtree": "deletes folders",
    "sys.modules": "looks modules up in sys.modules (reaches lora_edu's reference or grading code by name)",
}
# attributes that walk from an exception, generator or coroutine to the grader's stack frames
_FRAME_ATTRS = {"tb_frame", "tb_next", "f_back", "f_globals", "f_locals", "gi_frame", "cr_frame", "ag_frame", "f_builtins"}


def _parse(src: str) -> ast.Module | None:
    try:
        return ast.parse(src)
    except SyntaxError:
        lines = [ln for ln in src.splitlines() if not ln.lstrip().startswith(("%", "!"))]  # IPython magics
        try:
            return ast.parse("\n".join(lines))
        except SyntaxError:
            return None


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _is_reference(full: str, ex: Exercise) -> str | None:
    for ref in ex.reference_names:
        if "." in ref:
            if full == ref or full.startswith(ref + "."):
                return ref
        elif full.rsplit(".", 1)[-1] == ref and full != ref:
            return f"lora_edu's {ref}"
    return None


def source_flags(cells: list[str], ex: Exercise) -> list[str]:
    """Flags from the code cells' source: reference answers used, grading modules imported, grader internals read."""
    flags: list[str] = []
    aliases: dict[str, str] = {}  # local name -> dotted lora_edu name

    def add(msg: str) -> None:
        if msg not in flags:
            flags.append(msg)

    for k, src in enumerate(cells, start=1):
        where = f"In [{k}]"
        tree = _parse(src)
        if tree is None:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == "lora_edu":
                        aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else "lora_edu"
                        _check_module(a.name, ex, where, add)
                    if a.name in ("ctypes", "gc"):
                        add(f"{where}: imports {a.name} ({_INTROSPECTION.get('ctypes' if a.name == 'ctypes' else 'gc.get_objects')})")
            elif isinstance(node, ast.ImportFrom) and node.module:
                if node.module.split(".")[0] == "lora_edu":
                    _check_module(node.module, ex, where, add, names=[a.name for a in node.names])
                    for a in node.names:
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            elif isinstance(node, ast.Attribute):
                d = _dotted(node)
                if d:
                    head, _, rest = d.partition(".")
                    full = f"{aliases[head]}.{rest}" if head in aliases and rest else None
                    if full:
                        ref = _is_reference(full, ex)
                        if ref:
                            add(f"{where}: uses {full} ({ref} answers this exercise)")
                        if full.startswith("lora_edu.grading.") and not _grading_allowed(full, ex):
                            add(f"{where}: reaches into the grading code ({full})")
                    for pattern, why in _INTROSPECTION.items():
                        if "." in pattern and (d == pattern or d.endswith("." + pattern)):
                            add(f"{where}: {why}")
                if node.attr in _FRAME_ATTRS:
                    add(f"{where}: reads the grader's stack frames (.{node.attr})")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                v = node.value
                if "lora_edu.grading." in v or "lora_edu/grading" in v or any("." in r and r in v for r in ex.reference_names):
                    add(f"{where}: names a grading or reference module in a string ({v[:60]!r})")
                if "/proc" in v:
                    add(f"{where}: {_INTROSPECTION['/proc']}")
                if v in _FRAME_ATTRS:
                    add(f"{where}: reads the grader's stack frames ({v!r} in a string)")
    for name, full in aliases.items():  # `from lora_edu import LoRALinear` counts even when only bound
        ref = _is_reference(full, ex)
        if ref:
            add(f"imports {full} as `{name}` ({ref} answers this exercise)")
    return flags


def _grading_allowed(module: str, ex: Exercise) -> bool:
    return any(module == m or module.startswith(m + ".") and m != "lora_edu.grading" for m in ex.allowed_grading_imports)


def _check_module(module: str, ex: Exercise, where: str, add, names: list[str] | None = None) -> None:
    if module.startswith("lora_edu.grading"):
        if module == "lora_edu.grading":
            bad = [n for n in names or [] if n not in GRADING_NAMES_STUDENTS_MAY_IMPORT]
            if bad:
                add(f"{where}: imports grading internals {bad} from lora_edu.grading")
        elif not _grading_allowed(module, ex):
            add(f"{where}: imports the grading module {module}")
    ref = _is_reference(module, ex)
    if ref:
        add(f"{where}: imports {module} ({ref} answers this exercise)")


# ----------------------------------------------------------------------------- the notebook's answers


def answer_flags(namespace: dict, ex: Exercise) -> list[str]:
    """Answers the notebook must write itself but did not: imported, aliased, or subclassing lora_edu's classes."""
    flags = []
    for name in ex.written:
        if name not in namespace:
            continue
        obj = namespace[name]
        module = getattr(obj, "__module__", None) if isinstance(obj, (type, types.FunctionType)) else type(obj).__module__
        if not isinstance(obj, (type, types.FunctionType)):
            flags.append(f"`{name}` is not a function or class written in the notebook ({type(obj).__module__}.{type(obj).__name__})")
            continue
        if module != "__main__":
            flags.append(f"`{name}` is not defined in the notebook: it comes from {module}")
            continue
        if isinstance(obj, type):
            for base in obj.__mro__[1:]:
                if (base.__module__ or "").startswith("lora_edu"):
                    flags.append(f"`{name}` subclasses {base.__module__}.{base.__qualname__}, the reference implementation")
                    break
        else:
            filename = obj.__code__.co_filename
            if not (filename.startswith(("<ipython-input", "<cell")) or "/ipykernel_" in filename):
                flags.append(f"`{name}` was not compiled from a notebook cell (its code comes from {filename})")
    return flags


def take_reference_instances() -> list[str]:
    """Flags for lora_edu reference classes found inside objects the student's answer built during the check (then cleared)."""
    found = list(battery.REFERENCE_SEEN)
    battery.REFERENCE_SEEN.clear()
    return found


def result_tampering(result: CheckResult, ex: Exercise) -> list[str]:
    """A flag when the check's result does not list the battery's cases, in order, with their points."""
    want = [(c.id, c.points, c.optional) for c in ex.cases]
    got = [(c.case_id, c.points, c.optional) for c in result.cases]
    if got != want:
        return ["the check's result does not list the exercise's cases (it was changed after the checker built it)"]
    return []
