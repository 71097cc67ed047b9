"""The machinery every exercise checker shares.

An :class:`Exercise` is a list of cases.  A case is a function of the student's
submission that returns (optionally a note) when the behaviour is right and raises
:class:`Fail` — with what the code did, what was expected and a hint — when it is
not (a ``Fail`` may carry partial ``credit``).  :func:`run_exercise` runs every case,
each under a time limit, with torch's RNG forked (the student's random stream is left
untouched), and turns *anything* the student's code does — an exception,
``sys.exit()``, an infinite loop — into a failed case.  A case is skipped only when
a case it ``requires`` failed *and* it cannot be judged without it (nothing can be
tested on a class that cannot be constructed); every other case runs on its own.

Values: every random shape, seed and value a case uses comes from
:func:`case_random` / the torch seed of its case, both derived from the *variant*
seed of the run.  Variant 0 is the public self-check; ``lora-edu grade`` and the
nbgrader grade cells draw the variant from an instructor secret at grade time, so a
notebook that hard-codes the self-check's answers fails the graded run.
"""
from __future__ import annotations

import contextvars
import linecache
import math
import os
import random
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .result import CaseResult, CheckResult
from .timelimit import CaseTimeout, time_limit

_GRADING_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


MISSING = _Missing()  # a name the notebook did not define


class Fail(Exception):
    """A case failed: ``got`` (what the student's code did), ``expected``, ``hint``.

    ``specific=2`` marks a hint that names the exact mistake (shown first to the
    student); ``credit`` in [0, 1) is the fraction of the points still earned.
    """

    def __init__(self, got: str, expected: str = "", hint: str = "", specific: int = 1, credit: float = 0.0):
        super().__init__(got)
        self.got, self.expected, self.hint = got, expected, hint
        self.specific, self.credit = specific, credit


class Named(Fail):
    """A :class:`Fail` whose hint names the exact mistake (``specific=2``)."""

    def __init__(self, got: str, expected: str = "", hint: str = "", credit: float = 0.0):
        super().__init__(got, expected, hint, specific=2, credit=credit)


_VARIANT: contextvars.ContextVar[int] = contextvars.ContextVar("lora_edu_grading_variant", default=0)


# A private copy of random.Random's methods, taken at import (before any student code): a notebook that
# patches random.Random (its seed, randint, ...) does not change the values the cases draw.
_CaseRandom = type("_CaseRandom", (random.Random,), {k: v for k, v in vars(random.Random).items()
                                                      if callable(v) and k not in ("__init_subclass__", "__new__", "__class__")})
_CaseRandom.__init__ = random.Random.__init__


def case_random(tag: int | str) -> random.Random:
    """A private ``random.Random`` for one fixture of one case, drawn from the run's variant seed."""
    variant = _VARIANT.get()
    return _CaseRandom(tag if variant == 0 else f"{variant}:{tag}")


# ----------------------------------------------------------------------------- reference objects in student answers

REFERENCE_SEEN: list[str] = []  # lora_edu reference classes found inside objects a student's answer built


def scan_for_reference(obj, what: str, names: tuple[str, ...]) -> None:
    """Record any instance of lora_edu's reference classes ``names`` inside ``obj`` (submodules, attributes, one container deep)."""
    seen: set[int] = set()
    stack = [(obj, what, 0)]
    while stack:
        o, path, depth = stack.pop()
        if id(o) in seen or depth > 4:
            continue
        seen.add(id(o))
        t = type(o)
        mod = getattr(t, "__module__", "") or ""
        if mod.startswith("lora_edu.") and not mod.startswith("lora_edu.grading") and t.__name__ in names:
            msg = f"{what} holds lora_edu's reference {t.__name__} ({mod}) at {path}: the answer wraps the reference implementation"
            if msg not in REFERENCE_SEEN:
                REFERENCE_SEEN.append(msg)
            continue
        try:
            attrs = dict(vars(o)) if hasattr(o, "__dict__") and not isinstance(o, type) else {}
        except TypeError:
            attrs = {}
        for key in ("_modules",):
            inner = attrs.pop(key, None)
            if isinstance(inner, dict):
                attrs.update({f"{k}": v for k, v in inner.items()})
        for k, v in attrs.items():
            if isinstance(v, (list, tuple, set)):
                for n, item in enumerate(list(v)[:64]):
                    stack.append((item, f"{path}.{k}[{n}]", depth + 1))
            elif isinstance(v, dict):
                for kk, item in list(v.items())[:64]:
                    stack.append((item, f"{path}.{k}[{kk!r}]", depth + 1))
            elif hasattr(v, "__dict__") and not isinstance(v, (type, torch.Tensor)) and not callable(getattr(v, "__func__", None)):
                stack.append((v, f"{path}.{k}", depth + 1))
            elif isinstance(v, torch.nn.Module):
                stack.append((v, f"{path}.{k}", depth + 1))


def variant_seed() -> int:
    """The variant of the running check: 0 for the public self-check, else drawn from the grading secret."""
    return _VARIANT.get()


@dataclass
class Case:
    id: str
    name: str
    kind: str
    fn: Callable[[Any], str | None]
    points: float = 1.0
    requires: tuple[str, ...] = ()  # only what the case cannot be judged without
    min_timeout: float | None = None  # cases that train or evaluate a model get at least this long
    optional: bool = False  # reported, never counted


@dataclass
class Exercise:
    """One exercise: its notebook, the names the grader collects from it, and its cases."""

    name: str
    title: str
    notebook: str  # file name in course/exercises/ (instructor material, not in the package)
    symbols: tuple[str, ...]  # what the notebook must define; one name -> that object, several -> a dict
    cases: list[Case] = field(default_factory=list)

    # the names a submission must write itself: not imported or aliased from lora_edu, not subclassing its classes
    written: tuple[str, ...] = ()
    # names of lora_edu that answer the exercise: importing them in a notebook is flagged
    reference_names: tuple[str, ...] = ()
    # lora_edu modules the provided cells import (everything else from lora_edu.grading is flagged)
    allowed_grading_imports: tuple[str, ...] = ("lora_edu.grading",)

    def case(self, name: str, kind: str, points: float = 1.0, requires: tuple[str, ...] = (), min_timeout: float | None = None,
             optional: bool = False):
        def register(fn):
            self.cases.append(Case(fn.__name__, name, kind, fn, points, tuple(requires), min_timeout, optional))
            return fn

        return register

    def collect(self, namespace: dict) -> Any:
        """What ``check`` receives, built from a notebook's global namespace."""
        if len(self.symbols) == 1:
            return namespace.get(self.symbols[0], MISSING)
        return {s: namespace[s] for s in self.symbols if s in namespace}


def run_exercise(ex: Exercise, submission: Any, timeout: float | None = 10.0, seed: int = 0) -> CheckResult:
    """Run every case of ``ex``; ``seed`` is the variant (0: the public self-check)."""
    status: dict[str, bool] = {}
    record: tuple = ()  # immutable, rebound after each case: what the result is rebuilt from at the end
    cases = tuple(ex.cases)
    token = _VARIANT.set(int(seed))
    try:
        for i, case in enumerate(cases):
            blocked = [r for r in case.requires if not status.get(r, False)]
            if blocked:
                first = next(c for c in cases if c.id == blocked[0])
                status[case.id] = False
                outcome = CaseResult(case.name, case.kind, case.points, False, got=f"cannot be tested: it needs “{first.name}” to pass first",
                                     hint="fix the first failure above, then run the check again", optional=case.optional, specific=0,
                                     case_id=case.id)
            else:
                outcome = _run_case(case, submission, timeout, (seed * 1000 + i) % (2**63))
                status[case.id] = outcome.passed
            record = (*record, tuple(getattr(outcome, f) for f in _FIELDS))
    finally:
        _VARIANT.reset(token)
    # rebuilt from the private record, with each case's name, kind, points and id taken from the battery itself
    out = []
    for case, rec in zip(cases, record):
        d = dict(zip(_FIELDS, rec))
        d.update(name=case.name, kind=case.kind, points=case.points, optional=case.optional, case_id=case.id)
        out.append(CaseResult(**d))
    return CheckResult(ex.name, cases=out, variant="self-check" if seed == 0 else "hidden")


_FIELDS = tuple(CaseResult.__dataclass_fields__)


def _run_case(case: Case, submission: Any, timeout: float | None, seed: int) -> CaseResult:
    def done(passed, got="", expected="", hint="", specific=1, credit=-1.0):
        return CaseResult(case.name, case.kind, case.points, passed, str(got), str(expected), str(hint),
                          credit=credit, optional=case.optional, specific=specific, case_id=case.id)

    if timeout and case.min_timeout:
        timeout = max(timeout, case.min_timeout)
    default_dtype = torch.get_default_dtype()
    grad_enabled = torch.is_grad_enabled()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                with time_limit(timeout):
                    note = case.fn(submission)
            finally:
                torch.set_default_dtype(default_dtype)  # undo what student code may have changed
                torch.set_grad_enabled(grad_enabled)
        return done(True, note or "")
    except Fail as f:
        return done(False, f.got, f.expected, f.hint, specific=f.specific, credit=f.credit)
    except CaseTimeout:
        return done(False, f"your code did not finish within {timeout:g} s (timed out)",
                    hint="is there an infinite loop (a `while` whose condition never changes, or a method that calls itself)?")
    except KeyboardInterrupt:
        raise
    except RecursionError as e:
        return done(False, describe_exception(e), hint="infinite recursion: does a method call itself, e.g. self(x) or self.forward(x) inside forward?")
    except BaseException as e:  # noqa: BLE001 - student code may raise anything, even SystemExit
        return done(False, describe_exception(e), hint=hint_for_exception(e), specific=0 if not isinstance(e, NotImplementedError) else 1)


# ----------------------------------------------------------------------------- calling student code


def call(what: str, fn: Callable, *args, **kwargs):
    """Call student code; turn an exception into a :class:`Fail` that says which call raised."""
    try:
        return fn(*args, **kwargs)
    except (Fail, CaseTimeout, KeyboardInterrupt):
        raise
    except RecursionError as e:
        raise Fail(f"{what} raised {describe_exception(e)}",
                   hint="infinite recursion: does a method call itself, e.g. self(x) or self.forward(x) inside forward?") from None
    except BaseException as e:  # noqa: BLE001
        raise Fail(f"{what} raised {describe_exception(e)}", hint=hint_for_exception(e),
                   specific=1 if isinstance(e, NotImplementedError) else 0) from None


def get_attr(obj, name: str, what: str, hint: str = ""):
    """``getattr`` on student objects: a missing attribute or a raising property becomes a Fail."""
    try:
        return getattr(obj, name)
    except AttributeError:
        raise Fail(f"{what} has no attribute `{name}`", hint=hint) from None
    except (CaseTimeout, KeyboardInterrupt):
        raise
    except BaseException as e:  # noqa: BLE001
        raise Fail(f"reading `{name}` of {what} raised {describe_exception(e)}", hint=hint_for_exception(e)) from None


def describe_exception(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    if len(msg) > 300:
        msg = msg[:299] + "…"
    where = _student_frame(e)
    return f"{type(e).__name__}: {msg}" + (f" ({where})" if where else "")


def _student_frame(e: BaseException) -> str:
    """The innermost traceback frame outside lora_edu.grading and torch: the student's line."""
    found = ""
    for fs in traceback.extract_tb(e.__traceback__):
        f = os.path.abspath(fs.filename) if not fs.filename.startswith("<") else fs.filename
        if f.startswith(_GRADING_DIR) or f.startswith(_TORCH_DIR):
            continue
        line = (fs.line or linecache.getline(fs.filename, fs.lineno) or "").strip()
        found = f"in {fs.name}(), line {fs.lineno}" + (f": `{line}`" if line else "")
    return found


def hint_for_exception(e: BaseException) -> str:
    msg = str(e)
    low = msg.lower()
    if isinstance(e, NotImplementedError):
        return "this part is still the stub: replace `raise NotImplementedError` with your code"
    if isinstance(e, SystemExit):
        return "your code called sys.exit()/exit(): never do that inside a layer or function"
    if "shapes cannot be multiplied" in low or "size mismatch" in low or "must match the size" in low or "mat1 and mat2" in low \
            or "dimension" in low and "mismatch" in low or "inconsistent tensor size" in low:
        return ("a shape mismatch: nn.Linear stores W as (out, in) and sees x as a batch of row vectors (…, in), "
                "so the base part is x @ W.T + b and the LoRA branch is x @ A.T @ B.T with A (r, in), B (out, r)")
    if "dtype" in low or "scalar type" in low or ("float" in low and "double" in low):
        return ("a dtype mismatch: create A and B with the base layer's dtype and device, "
                "e.g. torch.empty(r, in_features, dtype=base.weight.dtype, device=base.weight.device)")
    if isinstance(e, AttributeError):
        return "an attribute your code reads does not exist: check the names (self.A, self.B, self.base, self.scale, ...) and that __init__ sets them"
    if isinstance(e, TypeError) and ("argument" in low or "positional" in low):
        return "check the signature: the interface is LoRALinear(base, r, alpha) and the methods take the arguments shown in the notebook"
    if "leaf variable" in low or "in-place" in low or "inplace" in low:
        return "in-place changes to parameters must happen under `with torch.no_grad():`"
    return "read the error message and the line it points to"


# ----------------------------------------------------------------------------- tensors


def as_tensor(value, what: str, shape: tuple[int, ...] | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Validate a tensor the student's code produced; return it detached in float64."""
    if not isinstance(value, torch.Tensor):
        raise Fail(f"{what} is {_type_name(value)}, not a torch.Tensor",
                   hint="return the tensor itself (not a tuple, list, numpy array or number)")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise Fail(f"{what} has shape {tuple(value.shape)}", expected=f"shape {tuple(shape)}")
    if dtype is not None and value.dtype != dtype:
        raise Fail(f"{what} has dtype {value.dtype}", expected=f"dtype {dtype}",
                   hint="keep the dtype of the input and of the base layer (don't hard-code float32 or call .float())")
    v = value.detach()
    if v.is_complex():
        raise Fail(f"{what} is complex ({v.dtype})")
    v = v.to("cpu", torch.float64)
    if not torch.isfinite(v).all():
        bad = (~torch.isfinite(v)).sum().item()
        raise Fail(f"{what} contains {bad} NaN/inf value(s)",
                   hint="look for a division by zero (e.g. alpha / 0), a log of a negative number, or uninitialised memory (torch.empty without an init)")
    return v


def _type_name(v) -> str:
    if v is None:
        return "None"
    return f"a {type(v).__name__}"


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref| (absolute when ref is all zero)."""
    d = (got - ref).abs().max().item() if got.numel() else 0.0
    scale = ref.abs().max().item() if ref.numel() else 0.0
    return d / scale if scale > 0 else d


def fit_multiple(d: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """Least-squares c with d ≈ c·ref, and the relative residual ‖d − c·ref‖/‖d‖ (0 when exact)."""
    rr = (ref * ref).sum().item()
    if rr == 0:
        return math.nan, math.inf
    c = (d * ref).sum().item() / rr
    nd = d.norm().item()
    res = (d - c * ref).norm().item()
    return c, (res / nd if nd > 0 else (0.0 if res == 0 else math.inf))


def near(a: float, b: float, tol: float = 0.02) -> bool:
    return math.isfinite(a) and abs(a - b) <= tol * max(abs(b), 1e-12)


def fmt(x: float) -> str:
    return f"{x:.4g}"


# ----------------------------------------------------------------- notebook answers
def answer(sub, name: str, fn: bool = False):
    """``sub[name]`` from the dict of answers a notebook's check cell passes; a clear ``Fail`` otherwise."""
    if not isinstance(sub, dict):
        raise Fail(f"check() received {type(sub).__name__}", expected="a dict of your answers, as in the notebook's last cell")
    if name not in sub:
        raise Fail(f"your notebook defines no `{name}`", hint=f"define `{name}` in the exercise cell (and list it in the check cell)")
    v = sub[name]
    if fn and not callable(v):
        raise Fail(f"`{name}` is not a function", expected=f"def {name}(...): ...")
    return v


def as_float(v, what: str, nonfinite_hint: str = "") -> float:
    """A student's scalar (number or one-element tensor) as a finite float; a clear ``Fail`` otherwise."""
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise Fail(f"{what} is a tensor of shape {tuple(v.shape)}", expected="one number", hint="reduce with .max() and convert with .item()")
        v = v.item()
    try:
        f = float(v)
    except (TypeError, ValueError, OverflowError):
        raise Fail(f"{what} is {type(v).__name__}, not a number") from None
    if not math.isfinite(f):
        raise Fail(f"{what} is {f}", hint=nonfinite_hint)
    return f
