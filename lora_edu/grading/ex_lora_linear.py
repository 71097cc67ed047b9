"""Exercise 1 checker: the student's ``LoRALinear`` class.

Interface (the same as :class:`lora_edu.LoRALinear`): ``LoRALinear(base, r, alpha)``
with ``A`` (r, in), ``B`` (out, r), forward ``x Wᵀ + b + (α/r)·x Aᵀ Bᵀ``, ``merge()``
and ``unmerge()`` acting on ``base.weight`` (on a float16/bfloat16 base, ΔW computed in
float32 and W + ΔW rounded once).  An optional ``dropout=`` argument is tested when
the constructor accepts it, and never counted.

Points follow how badly a mistake breaks LoRA: A and B that are not trainable
parameters (the layer learns nothing), a wrong forward and a non-frozen base weigh
most; conventions such as a (batch, seq, in) input or a second ``merge()`` weigh
least.  Cases after ``forward`` judge their own concern with the student's own scale
(error carried forward): a scale mistake costs the forward and merge-consistency
cases, not every case that calls forward.

The oracle is the closed-form formula in float64, evaluated on the student's *own*
A and B (Hu et al. 2021, §4.1) — never another implementation.  Each mismatch is
diagnosed: the student's update is fitted as c × the expected one, and c is matched
against the usual mistakes (α instead of α/r, no scale, α·r, α/√r, ...).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .battery import MISSING, Exercise, Fail, Named, as_tensor, call, case_random, fit_multiple, fmt, get_attr, near, rel_err, scan_for_reference

EXERCISE = Exercise(
    name="lora_linear",
    title="Implement a LoRA linear layer",
    notebook="01_lora_linear.ipynb",
    symbols=("LoRALinear",),
    written=("LoRALinear",),
    reference_names=("LoRALinear", "LoRALayer", "FusedLoRALinear", "lora_edu.core.layers", "lora_edu.speed.fused"),
)
case = EXERCISE.case

TOL32 = 2e-5  # relative error allowed for float32 computations (matmul rounding ~1e-7·√in)
TOL64 = 1e-10

E2_HINT = ("your update is r times too large: is the scale α/r? The source article's forward "
           "`W(x) + alpha * B(A(x))` makes this mistake (E2): with α=32, r=4 the update is 4× too large, and "
           "changing r silently changes the step size. Use self.scale = alpha / r and multiply the branch by it.")
E3_HINT = ("merge must add exactly what forward adds: W ← W + (α/r)·B @ A. The source article's "
           "`W.weight.data += B.weight @ A.weight` forgets the scale (mistake E3), so the merged model differs "
           "from the unmerged one whenever α/r ≠ 1.")
REFERENCE_CLASSES = ("LoRALinear", "LoRALayer", "FusedLoRALinear")
SHAPE_HINT = ("the interface (lora_edu.LoRALinear, PEFT, loralib) stores A as (r, in_features) and B as "
              "(out_features, r), so ΔW = B @ A has W's shape (out, in). Tutorials that store A as (in, r) compute "
              "x @ A @ B instead; careful: kaiming_uniform_ on an (in, r) tensor uses fan_in = r, an init √(in/r) "
              "times too large. (The source article's 'A is d×r, B is r×d' gives an r×r product: mistake E1.)")


# ----------------------------------------------------------------------------- fixtures


def configs(n: int, seed: int, square: bool = False) -> list[tuple[int, int, int, float]]:
    """Random (in, out, r, α) with non-integer α and α/r, α/r > 2 (so α // r, an integer ≥ 2, differs from α/r and from 1)."""
    rng = case_random(seed)
    out = []
    while len(out) < n:
        i = rng.randint(5, 40)
        o = i if square else rng.randint(5, 40)
        if not square and o == i:
            continue
        r = rng.randint(2, min(6, i, o))
        alpha = round(rng.uniform(2.1, 3.6) * r, 3)
        s = alpha / r
        if abs(s - 1) < 0.2 or abs(alpha - round(alpha)) < 0.05 or abs(s - round(s)) < 0.05:
            continue
        if not _distinct(_mistake_factors(r, alpha)):  # every usual mistake must give a different multiple
            continue
        out.append((i, o, r, alpha))
    return out


def _mistake_factors(r: int, alpha: float) -> list[float]:
    """What a student may multiply the branch by instead of α/r (see :func:`diagnose_update`)."""
    s = alpha / r
    return [s, alpha, 1.0, alpha * r, alpha / math.sqrt(r), r / alpha, 2 * s, alpha / r**2, s * s, float(alpha // r)]


def _distinct(values: list[float], rel: float = 0.06) -> bool:
    return all(abs(a - b) > rel * max(abs(a), abs(b)) for k, a in enumerate(values) for b in values[k + 1:])


def make_base(i: int, o: int, bias: bool = True, dtype=torch.float32) -> nn.Linear:
    base = nn.Linear(i, o, bias=bias, dtype=dtype)
    with torch.no_grad():
        base.weight.uniform_(-1 / math.sqrt(i), 1 / math.sqrt(i))
        if bias:
            base.bias.uniform_(-0.5, 0.5)
    return base


class Built:
    """A student layer around a base we made, with the originals kept for comparisons."""

    def __init__(self, cls, i, o, r, alpha, bias=True, dtype=torch.float32, **kw):
        self.i, self.o, self.r, self.alpha, self.s = i, o, r, alpha, alpha / r
        self.base = make_base(i, o, bias, dtype)
        self.W0 = self.base.weight.detach().to(torch.float64).clone()
        self.b0 = self.base.bias.detach().to(torch.float64).clone() if bias else torch.zeros(o, dtype=torch.float64)
        self.dtype = dtype
        extra = "".join(f", {k}={v!r}" for k, v in kw.items())
        self.desc = f"LoRALinear(nn.Linear({i}, {o}, bias={bias}), r={r}, alpha={alpha}{extra})"
        self.layer = call(self.desc, cls, self.base, r, alpha, **kw)
        scan_for_reference(self.layer, "your layer", REFERENCE_CLASSES)
        if not isinstance(self.layer, nn.Module):
            raise Fail(f"{self.desc} returned {type(self.layer).__name__}, not an nn.Module",
                       hint="subclass nn.Module and call super().__init__() first in __init__")

    # the student's factors, validated
    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        A = get_attr(self.layer, "A", "your layer",
                     hint="store the down-projection as self.A = nn.Parameter(...) of shape (r, in_features)")
        B = get_attr(self.layer, "B", "your layer",
                     hint="store the up-projection as self.B = nn.Parameter(...) of shape (out_features, r)")
        for name, T, want, swapped in (("A", A, (self.r, self.i), (self.i, self.r)), ("B", B, (self.o, self.r), (self.r, self.o))):
            if not isinstance(T, torch.Tensor):
                raise Fail(f"layer.{name} is {type(T).__name__}, not a tensor", expected=f"an nn.Parameter of shape {want}")
            got = tuple(T.shape)
            if got != want:
                if got == swapped:
                    which = "(in, r)" if name == "A" else "(r, out)"
                    raise Fail(f"layer.{name} has shape {which} = {got}", expected=f"{name} of shape {want}", hint=SHAPE_HINT)
                raise Fail(f"layer.{name} has shape {got} for in={self.i}, out={self.o}, r={self.r}",
                           expected=f"{name} of shape {want}", hint=SHAPE_HINT)
        return A, B

    def weight(self) -> torch.Tensor:
        """The weight the layer computes with: layer.base.weight if it has one, else the base we passed."""
        inner = getattr(self.layer, "base", None)
        lin = inner if isinstance(inner, nn.Linear) else self.base
        return as_tensor(lin.weight, "base.weight")

    def randomize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Give A and B random values (B ≠ 0), so the LoRA branch is visible; return them in float64."""
        A, B = self.factors()
        with torch.no_grad():
            call("writing into layer.A", A.copy_, torch.empty(A.shape).uniform_(-1, 1) / math.sqrt(self.i))
            call("writing into layer.B", B.copy_, torch.randn(B.shape) * 0.5)
        return A.detach().double(), B.detach().double()

    def x(self, *lead: int) -> torch.Tensor:
        return torch.randn(*lead, self.i, dtype=self.dtype)

    def forward(self, x: torch.Tensor, what: str = "layer(x)") -> torch.Tensor:
        y = call(what, self.layer, x)
        scan_for_reference(self.layer, "your layer", REFERENCE_CLASSES)  # a reference built lazily in forward
        return as_tensor(y, what, shape=tuple(x.shape[:-1]) + (self.o,), dtype=x.dtype)

    def base_out(self, x) -> torch.Tensor:
        return x.double() @ self.W0.T + self.b0

    def branch(self, x, A, B) -> torch.Tensor:
        """The unscaled LoRA branch x Aᵀ Bᵀ in float64."""
        return x.double() @ A.T @ B.T

    def tol(self) -> float:
        return TOL64 if self.dtype == torch.float64 else TOL32


def _cls(sub):
    if sub is MISSING:
        raise Fail("your notebook defines no `LoRALinear`", hint="define `class LoRALinear(nn.Module):` in the exercise cell")
    return sub


def diagnose_update(c: float, res: float, b: Built, what: str = "your LoRA update") -> tuple[str, str, int]:
    """Name the mistake when the student's update is c × the expected (α/r)-scaled one: (what, hint, specificity)."""
    got, hint = _diagnose(c, res, b, what)
    return got, hint, (1 if hint in _GENERIC_HINTS else 2)


_GENERIC_HINTS = ("compute the branch as (alpha / r) * (x @ A.T @ B.T), using self.A and self.B themselves", "the scale is exactly α/r")


def _diagnose(c: float, res: float, b: Built, what: str) -> tuple[str, str]:
    s, r, alpha = b.s, b.r, b.alpha
    if res > 1e-3 or not math.isfinite(c):
        return (f"{what} is not a multiple of (α/r)·x Aᵀ Bᵀ (relative residual {fmt(res)})", _GENERIC_HINTS[0])
    k = c * s  # the factor the student actually multiplied by
    if abs(c) < 1e-6:
        return (f"{what} is zero: the LoRA branch is not added", "forward must return base(x) + (α/r)·x Aᵀ Bᵀ")
    if near(k, alpha):
        return (f"{what} is {fmt(c)}× the expected one: you multiplied by α = {alpha} instead of α/r = {fmt(s)}", E2_HINT)
    if alpha // r >= 1 and near(k, float(alpha // r), 0.005):
        return (f"{what} is {fmt(c)}× the expected one: you multiplied by α // r = {alpha // r:g} instead of α/r = {fmt(s)} "
                "(α // r: integer division)",
                "`//` is floor division: alpha // r rounds the scale down (7.5 // 2 == 3.0). Use self.scale = alpha / r")
    if near(k, 1.0):
        return (f"{what} is {fmt(c)}× the expected one: it is not scaled at all",
                "multiply the branch by the scale α/r (self.scale = alpha / r)")
    if near(k, alpha * r):
        return (f"{what} is {fmt(c)}× (= r²) the expected one: you multiplied by α·r", "the scale is α/r: divide by r, don't multiply")
    if near(k, s * s):
        return (f"{what} is {fmt(c)}× (= α/r) the expected one: the scale α/r is applied twice",
                "multiply by α/r exactly once: if self.scale already holds alpha / r, don't multiply by it again "
                "(and don't fold it into A or B as well)")
    if near(k, alpha / math.sqrt(r)):
        return (f"{what} is √r = {fmt(c)}× the expected one: you used the rsLoRA scale α/√r",
                "this interface uses the paper's scale α/r (rsLoRA's α/√r is an option of lora_edu.LoRALinear, not the default)")
    if near(k, r / alpha):
        return (f"{what} is scaled by r/α instead of α/r", "the scale is alpha / r (α on top)")
    if near(c, 2.0):
        return (f"{what} is added twice", "add the branch once: base(x) + scale * lora(x)")
    if near(k, alpha / r**2):
        return (f"{what} is scaled by α/r² (r times too small)", "divide by r once: scale = alpha / r")
    return (f"{what} is {fmt(c)}× the expected (α/r)·x Aᵀ Bᵀ (α/r = {fmt(s)})", _GENERIC_HINTS[1])


def check_forward(b: Built, x: torch.Tensor, A, B, what="layer(x)", own_scale: bool = False) -> str | None:
    """Compare ``layer(x)`` with the formula; with ``own_scale`` a forward that is right up to its scale passes.

    ``own_scale`` carries an error forward: cases after the forward case judge their own
    concern (bias, batching, dtype) and leave a wrong scale to the forward case.
    """
    y = b.forward(x, what)
    base = b.base_out(x)
    branch = b.branch(x, A, B)
    expected = base + b.s * branch
    err = rel_err(y, expected)
    if err <= b.tol():
        return None
    if own_scale:
        c, res = fit_multiple(y - base, b.s * branch)
        if math.isfinite(c) and abs(c) > 1e-6 and res <= 10 * b.tol() and rel_err(y, base + c * b.s * branch) <= b.tol():
            return f"judged with your own scale ({fmt(c * b.s)} instead of α/r = {fmt(b.s)}: counted in the forward case)"
    exp_txt = f"x Wᵀ + b + (α/r)·x Aᵀ Bᵀ with α/r = {fmt(b.s)} (relative error ≤ {b.tol():g})"
    got_prefix = f"{b.desc}: {what} is off by relative error {fmt(err)}; "
    # the base part
    if b.b0.abs().max() > 0 and rel_err(y, expected - b.b0) <= b.tol():
        raise Named(got_prefix + "y − (x Wᵀ + b + (α/r)·x Aᵀ Bᵀ) equals −b: your output misses the base layer's bias b",
                   exp_txt, "compute the frozen part with self.base(x) (which adds the bias), not with x @ W.T alone")
    if b.i == b.o and rel_err(y, x.double() @ b.W0 + b.b0 + b.s * branch) <= b.tol():
        raise Named(got_prefix + "your base part computes x @ W instead of x @ W.T", exp_txt,
                   "nn.Linear stores W as (out, in) and computes x @ W.T + b; use self.base(x)")
    d = y - base
    if b.i == b.o:  # square layers let two convention mistakes run without a shape error
        dW = B @ A
        if x.dim() == 2 and x.shape[0] == b.i and rel_err(d, b.s * (dW @ x.double())) <= b.tol():
            raise Named(got_prefix + "your branch computes ΔW·x, treating x as a matrix of column vectors", exp_txt,
                       "PyTorch layers see x as a batch of row vectors (…, in): the branch is x @ A.T @ B.T "
                       "(like nn.Linear's x @ W.T). ΔW·x only ran because this layer is square and batch = in_features")
        if rel_err(d, b.s * (x.double() @ dW)) <= b.tol():
            raise Named(got_prefix + "your branch applies ΔWᵀ: x @ B @ A (or x @ (B @ A)) instead of x @ A.T @ B.T", exp_txt,
                       "with A (r, in) and B (out, r), the row-vector branch is x @ A.T @ B.T = x @ (B @ A).T")
    c, res = fit_multiple(d, branch * b.s)
    if res <= 1e-3:
        got, hint, specific = diagnose_update(c, res, b)
        raise Fail(got_prefix + got, exp_txt, hint, specific=specific)
    # perhaps the base part is wrong but the branch is right
    c2, res2 = fit_multiple(y - b.s * branch, base)
    if res2 <= 1e-3 and not near(c2, 1.0, 1e-3):
        raise Fail(got_prefix + f"your base part is {fmt(c2)}× x Wᵀ + b", exp_txt, "call the frozen layer unchanged: self.base(x)")
    raise Fail(got_prefix + "it matches neither the formula nor a known mistake", exp_txt,
               "forward(x) = self.base(x) + (alpha / r) * (x @ self.A.T @ self.B.T)")


# ----------------------------------------------------------------------------- cases


@case("LoRALinear is a class derived from nn.Module", "interface")
def is_class(sub):
    cls = _cls(sub)
    if isinstance(cls, nn.Module):
        raise Fail("you passed an instance (an object built from your class) to check()",
                   expected="the class itself", hint='call check("lora_linear", LoRALinear), without parentheses after LoRALinear')
    if not isinstance(cls, type):
        raise Fail(f"LoRALinear is {type(cls).__name__}, not a class", hint="define `class LoRALinear(nn.Module): ...`")
    if not issubclass(cls, nn.Module):
        raise Fail("LoRALinear does not subclass nn.Module", expected="class LoRALinear(nn.Module)",
                   hint="without nn.Module, optimizers, .parameters(), .to() and state_dict() cannot see A and B")


@case("LoRALinear(base, r, alpha) builds a layer (several shapes, non-integer α)", "interface", requires=("is_class",))
def construct(cls):
    for cfg in configs(3, 11):
        Built(cls, *cfg)


@case("A has shape (r, in) and B has shape (out, r)", "interface", points=2, requires=("construct",))
def shapes(cls):
    for cfg in configs(3, 12):
        Built(cls, *cfg).factors()


@case("A and B are nn.Parameters registered on the layer (else the layer learns nothing)", "interface", points=6, requires=("construct",))
def parameters(cls):
    b = Built(cls, *configs(1, 13)[0])
    A, B = b.factors()
    params = {id(p): n for n, p in call("layer.named_parameters()", lambda: list(b.layer.named_parameters()))}
    for name, T in (("A", A), ("B", B)):
        if not isinstance(T, nn.Parameter):
            raise Named(f"layer.{name} is a plain tensor, not an nn.Parameter: no optimizer sees it, so the layer never learns",
                       hint=f"wrap it: self.{name} = nn.Parameter(...); otherwise layer.parameters() does not list it and no optimizer trains it")
        if id(T) not in params:
            raise Fail(f"layer.{name} is not among layer.parameters()",
                       hint=f"assign it as an attribute of the module in __init__ (self.{name} = nn.Parameter(...)) after super().__init__()")
        if not T.requires_grad:
            raise Fail(f"layer.{name} has requires_grad=False", hint="A and B are the trainable part of LoRA: leave requires_grad=True")


@case("at init the layer equals the base layer (B = 0, so ΔW = 0)", "init", points=3, requires=("construct",))
def noop_init(cls):
    for cfg in configs(2, 14):
        b = Built(cls, *cfg)
        A, B = b.factors()
        x = b.x(6)
        y = b.forward(x)
        err = rel_err(y, b.base_out(x))
        if err > b.tol():
            Bmax = B.detach().abs().max().item()
            Amax = A.detach().abs().max().item()
            if Bmax > 0 and Amax > 0:
                raise Named(f"at init your output differs from the base layer's (relative error {fmt(err)}): "
                           f"B is not zero (max |B| = {fmt(Bmax)}) and A is random, so ΔW = (α/r)·B A ≠ 0 before any training",
                           expected="layer(x) == base(x) at init",
                           hint="LoRA must start as a no-op: initialise B to zeros (nn.init.zeros_) and A randomly; "
                                "with both random, fine-tuning starts from a corrupted copy of the pretrained model")
            raise Fail(f"at init your output differs from the base layer's (relative error {fmt(err)}) although ΔW = 0",
                       expected="layer(x) == base(x) at init", hint="the frozen part must be exactly self.base(x)")
        if B.detach().abs().max().item() != 0 and A.detach().abs().max().item() != 0:
            raise Fail("B is not zero at init", expected="B = 0, A random (Hu et al. §4.1)",
                       hint="initialise B with nn.init.zeros_; A carries the randomness")
    # A = 0 with B random is a no-op too (ΔW = B·0 = 0): which factor starts at zero is judged by the init_A case only


@case("A is random at init, within the Kaiming-uniform(a=√5) bound 1/√in", "init", points=2, requires=("construct",))
def init_A(cls):
    i, o, r = 96, 24, 4  # in ≫ r so that the fan-in trap is visible: 1/√in = 0.102 vs 1/√r = 0.5
    b = Built(cls, i, o, r, 6.5)
    A, B = b.factors()
    A = A.detach().double()
    amax = A.abs().max().item()
    bound = 1 / math.sqrt(i)
    if amax == 0:
        if B.detach().abs().max().item() > 0:
            raise Fail("A is all zeros and B is random: that is the embedding convention, reversed",
                       expected="A Kaiming-uniform, B = 0 (PEFT/loralib nn.Linear default)",
                       hint="swap the two: nn.init.kaiming_uniform_(self.A, a=math.sqrt(5)); nn.init.zeros_(self.B)")
        raise Fail("A and B are both all zeros: every gradient of A and B is then zero and LoRA never learns",
                   expected="A random (Kaiming-uniform), B = 0",
                   hint="∂L/∂B ∝ (x Aᵀ) and ∂L/∂A ∝ B: with both zero nothing moves. Use nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))")
    if A.std().item() < 1e-3 * bound:
        raise Fail(f"A is nearly constant (std {fmt(A.std().item())})", hint="initialise A randomly: nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))")
    if amax > bound * 1.001:
        if amax <= 1 / math.sqrt(r) * 1.001 and amax > 0.5 / math.sqrt(r):
            raise Named(f"A's entries reach {fmt(amax)} ≈ 1/√r = {fmt(1 / math.sqrt(r))}, beyond 1/√in = {fmt(bound)}: "
                       "Kaiming init was computed on an (in, r)-shaped tensor, whose fan_in is r (the fan-in trap)",
                       expected=f"|A| ≤ 1/√in = {fmt(bound)} for in={i}",
                       hint="create A with shape (r, in) and call nn.init.kaiming_uniform_(self.A, a=math.sqrt(5)) on it: fan_in is then in")
        if A.std().item() > 0.5:
            raise Fail(f"A's entries reach {fmt(amax)} (std {fmt(A.std().item())}): about √in times too large (torch.randn has std 1)",
                       expected=f"|A| ≤ 1/√in = {fmt(bound)}", hint="use nn.init.kaiming_uniform_(self.A, a=math.sqrt(5)), bound 1/√in")
        raise Fail(f"A's entries reach {fmt(amax)}", expected=f"|A| ≤ 1/√in = {fmt(bound)} (Kaiming-uniform with a=√5)",
                   hint="use nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))")


@case("the base weight and bias are frozen; only A and B train: r·(in+out) parameters", "training", points=3, requires=("construct",))
def frozen(cls):
    for cfg in configs(2, 15):
        b = Built(cls, *cfg)
        inner = getattr(b.layer, "base", None)
        lin = inner if isinstance(inner, nn.Linear) else b.base
        if lin.weight.requires_grad:
            raise Named("the wrapped layer's weight still has requires_grad=True: an optimizer over layer.parameters() "
                       "would train W too (full fine-tuning in disguise)",
                       expected="base.weight.requires_grad == False", hint="freeze the base in __init__: base.requires_grad_(False)")
        if lin.bias is not None and lin.bias.requires_grad:
            raise Fail("the wrapped layer's bias still has requires_grad=True", expected="the bias frozen too",
                       hint="base.requires_grad_(False) freezes weight and bias together")
        trainable = sum(p.numel() for p in b.layer.parameters() if p.requires_grad)
        want = b.r * (b.i + b.o)
        if trainable != want:
            raise Fail(f"{b.desc} has {trainable} trainable parameters", expected=f"r·(in + out) = {want}",
                       hint="only A (r·in) and B (out·r) may have requires_grad=True; don't copy W into a new trainable parameter")


@case("forward = x Wᵀ + b + (α/r)·x Aᵀ Bᵀ on random shapes, non-integer α/r", "forward", points=5, requires=("construct",))
def forward(cls):
    for cfg in configs(4, 16):
        b = Built(cls, *cfg)
        A, B = b.randomize()
        check_forward(b, b.x(7), A, B)


@case("the base layer's bias is added (and a base without bias works)", "forward", points=2, requires=("construct",))
def bias(cls):
    notes = set()
    for with_bias in (True, False):
        for cfg in configs(2, 17 + with_bias):
            b = Built(cls, *cfg, bias=with_bias)
            A, B = b.randomize()
            notes.add(check_forward(b, b.x(5), A, B, own_scale=True))
    return _note(notes)


def _note(notes: set) -> str | None:
    notes.discard(None)
    return "judged with your own scale (a scale mistake is counted in the forward case)" if notes else None


@case("works on (batch, seq, in) inputs, as inside a transformer", "forward", requires=("construct",))
def batched(cls):
    b = Built(cls, *configs(1, 19)[0])
    A, B = b.randomize()
    try:
        return check_forward(b, b.x(3, 4), A, B, what="layer(x) with x of shape (3, 4, in)", own_scale=True)
    except Fail as f:
        f.hint = (f.hint + "; " if f.hint else "") + ("use x @ A.T (matmul broadcasts over leading dimensions) "
                                                      "rather than torch.mm, A @ x.T or .t(), which need 2-D inputs")
        raise


@case("row-vector convention x Wᵀ on square layers (batch = in)", "forward", requires=("construct",))
def row_vectors(cls):
    notes = set()
    for i, _, r, alpha in configs(2, 20, square=True):
        b = Built(cls, i, i, r, alpha)
        A, B = b.randomize()
        notes.add(check_forward(b, b.x(i), A, B, own_scale=True))
    return _note(notes)


@case("a float64 base: A, B and the output follow the base's dtype", "dtype", requires=("construct",))
def float64(cls):
    b = Built(cls, *configs(1, 21)[0], dtype=torch.float64)
    A, B = b.factors()
    for name, T in (("A", A), ("B", B)):
        if T.dtype != torch.float64:
            raise Fail(f"on a float64 base layer.{name} has dtype {T.dtype}", expected="float64, like base.weight",
                       hint="create A and B with dtype=base.weight.dtype (and device=base.weight.device)")
    A, B = b.randomize()
    return check_forward(b, b.x(5), A, B, own_scale=True)


@case("gradients reach A and B and equal those of the formula", "training", points=3, requires=("construct",))
def grads(cls):
    b = Built(cls, *configs(1, 22)[0])
    A_t, B_t = b.factors()
    A, B = b.randomize()
    x = b.x(6)
    g = torch.randn(6, b.o)
    y = call("layer(x)", b.layer, x)
    as_tensor(y, "layer(x)", shape=(6, b.o))
    if not y.requires_grad:
        raise Fail("layer(x) does not require grad: no gradient can reach A or B",
                   hint="compute the branch from self.A and self.B directly (no .data, .detach(), .item() or torch.no_grad() in forward)")
    call("(layer(x) * g).sum().backward()", lambda: (y * g).sum().backward())
    # error carried forward: with a forward that is right up to its scale k, the gradients must be those of k·x Aᵀ Bᵀ
    scale = b.s
    y_got = y.detach().double()
    c, res = fit_multiple(y_got - b.base_out(x), b.s * b.branch(x, A, B))
    if math.isfinite(c) and abs(c) > 1e-6 and res <= 1e-4 and not near(c, 1.0, 1e-4):
        scale = c * b.s
    A64 = A.clone().requires_grad_(True)
    B64 = B.clone().requires_grad_(True)
    y64 = b.base_out(x) + scale * (x.double() @ A64.T @ B64.T)
    (y64 * g.double()).sum().backward()
    for name, T, ref in (("A", A_t, A64.grad), ("B", B_t, B64.grad)):
        if T.grad is None:
            raise Named(f"after backward() layer.{name}.grad is None: {name} does not learn",
                       hint="the branch must be built from self.A and self.B with autograd (no .data / .detach() / torch.no_grad())")
        got = as_tensor(T.grad, f"layer.{name}.grad")
        err = rel_err(got, ref)
        if err > TOL32 * 10:
            c, res = fit_multiple(got, ref)
            msg, hint, specific = diagnose_update(c, res, b, what=f"the gradient of {name}")
            raise Fail(f"layer.{name}.grad is off by relative error {fmt(err)}: {msg}", expected="the gradient of the formula", hint=hint,
                       specific=specific)
    if scale != b.s:
        return "judged with your own scale (counted in the forward case)"


def _merged_setup(cls, cfg):
    b = Built(cls, *cfg)
    A, B = b.randomize()
    x = b.x(6)
    y_before = b.forward(x, "layer(x) before merge()")
    return b, A, B, x, y_before


def forward_factor(b: Built, x: torch.Tensor, y: torch.Tensor, A, B) -> float | None:
    """c when the student's forward is x Wᵀ + b + c·(α/r)·x Aᵀ Bᵀ (c ≠ 1: a scale mistake), else None."""
    c, res = fit_multiple(y - b.base_out(x), b.s * b.branch(x, A, B))
    return c if math.isfinite(c) and abs(c) > 1e-6 and res <= 1e-4 and not near(c, 1.0, 1e-4) else None


@case("merge() folds (α/r)·B @ A into base.weight, leaving A and B as they were", "merge", points=3, requires=("construct",))
def merge(cls):
    notes = set()
    for cfg in configs(2, 23):
        b, A, B, x, y_before = _merged_setup(cls, cfg)
        own = forward_factor(b, x, y_before, A, B)
        call("layer.merge()", b.layer.merge)
        _factors_unchanged(b, A, B)
        W = b.weight()
        dW = b.s * (B @ A)
        if rel_err(W, b.W0 + dW) <= TOL32:
            continue
        if own is not None and rel_err(W, b.W0 + own * dW) <= TOL32:  # error carried forward: the forward's own scale
            notes.add("judged with your own scale, the one your forward uses (a scale mistake is counted in the forward case)")
            continue
        change = W - b.W0
        if change.abs().max().item() == 0:
            raise Fail("merge() did not change base.weight", expected="W ← W + (α/r)·B @ A, in place",
                       hint="with torch.no_grad(): self.base.weight += self.scale * (self.B @ self.A)")
        if tuple(change.shape) == (b.o, b.i):
            c, res = fit_multiple(change, dW)
            if res <= 1e-3 and near(c * b.s, 1.0):
                raise Named(f"merge() added B @ A without the scale α/r = {fmt(b.s)}: W changed by {fmt(c)}× the expected ΔW",
                            expected="W ← W + (α/r)·B @ A", hint=E3_HINT)
            if res <= 1e-3:
                got, hint, specific = diagnose_update(c, res, b, what="the change merge() made to W")
                raise Fail(got, expected="W ← W + (α/r)·B @ A", hint=hint, specific=specific)
        raise Fail(f"after merge() W differs from W + (α/r)·B @ A by relative error {fmt(rel_err(W, b.W0 + dW))}",
                   expected="W ← W + (α/r)·B @ A", hint="merge adds the same ΔW = (α/r)·B @ A that forward applies, in W's (out, in) layout")
    return notes.pop() if notes else None


def _factors_unchanged(b: Built, A: torch.Tensor, B: torch.Tensor) -> None:
    """merge() must read A and B, never write them (they are what unmerge() and training need)."""
    A_now, B_now = b.factors()
    for name, before, now in (("B", B, B_now), ("A", A, A_now)):
        now = as_tensor(now, f"layer.{name} after merge()")
        if now.shape != before.shape or rel_err(now, before) > TOL32:
            c, res = fit_multiple(now, before) if now.shape == before.shape else (math.nan, math.inf)
            how = f" (it is now {fmt(c)}× what it was: the scale was folded into {name})" if res <= 1e-3 and math.isfinite(c) else ""
            raise Named(f"merge() changed layer.{name}{how}", expected=f"{name} unchanged by merge(); only base.weight changes",
                        hint=f"compute ΔW into a new tensor: delta = self.scale * (self.B @ self.A); never scale {name} in place "
                             "(`self.B *= self.scale` or `self.B.data.mul_(...)`): unmerge() and further training then use a wrong factor")


@case("merge() on a float16 and a bfloat16 base: ΔW computed in float32, W + ΔW rounded once", "merge", points=2, requires=("construct",))
def merge_low_precision(cls):
    for k, dtype in enumerate((torch.float16, torch.bfloat16)):
        cfg = configs(1, 29 + k)[0]
        probe = Built(cls, *cfg)  # the scale the student's forward uses for this layer, measured in float32
        A_p, B_p = probe.randomize()
        x_p = probe.x(6)
        own = forward_factor(probe, x_p, probe.forward(x_p), A_p, B_p) or 1.0
        b = Built(cls, *cfg, dtype=dtype)
        A_t, B_t = b.factors()
        for name, T in (("A", A_t), ("B", B_t)):
            if T.dtype not in (dtype, torch.float32):  # float32 factors on a low-precision base are fine too (lora_edu's choice)
                raise Fail(f"on a {dtype} base layer.{name} has dtype {T.dtype}", expected=f"{dtype}, like base.weight (or float32)",
                           hint="create A and B with dtype=base.weight.dtype")
        with torch.no_grad():
            call("writing into layer.A", A_t.copy_, (torch.empty(A_t.shape).uniform_(-1, 1) / math.sqrt(b.i)).to(A_t.dtype))
            call("writing into layer.B", B_t.copy_, (torch.randn(B_t.shape) * 0.5).to(B_t.dtype))
        A, B = A_t.detach().double(), B_t.detach().double()
        W0 = b.W0
        call("layer.merge()", b.layer.merge)
        W = b.weight()
        eps = torch.finfo(dtype).eps

        def rounded_once(factor: float):
            """W0 + factor·(α/r)·B @ A computed exactly and rounded into W's dtype once, and how far W is from it in spacings."""
            ref = (W0 + factor * b.s * (B @ A)).to(dtype).double()
            spacing = eps * torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(torch.finfo(dtype).tiny))))
            return ref, (W - ref).abs() / spacing

        if W.shape != W0.shape:
            raise Fail(f"after merge() base.weight has shape {tuple(W.shape)}", expected=f"{tuple(W0.shape)}")
        factor = 1.0
        ref, ulps = rounded_once(factor)
        if own != 1.0 and (ulps > 0.5).double().mean().item() > 0.02:
            factor = own  # error carried forward: the scale the student's forward uses
            ref, ulps = rounded_once(factor)
        off = (ulps > 0.5).double().mean().item()
        if ulps.max().item() <= 1.0 and off <= 0.02:
            continue
        c, res = fit_multiple(W - W0, factor * b.s * (B @ A))
        name = {torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
        if math.isfinite(c) and near(c, 1.0, 0.05) and res <= 100 * eps:
            raise Named(f"on a {name} base your merge() is right up to rounding (W changed by {fmt(c)}× ΔW, residual {fmt(res)}, "
                        f"the size of {name}'s rounding), but {off:.0%} of the merged weights are off by up to {ulps.max().item():.1f} "
                        f"spacings: precision loss, ΔW was computed or rounded in {name} before the addition",
                        expected=f"W ← round_{name}(W + ΔW) with ΔW = (α/r)·B @ A computed in float32",
                        hint="in merge(): delta = self.scale * (self.B.float() @ self.A.float()); then "
                             "W.copy_((W.float() + delta).to(W.dtype)) — one rounding into W's dtype instead of three")
        if math.isfinite(c) and res <= 0.05:
            got, hint, specific = diagnose_update(c, res, b, what=f"on a {name} base the change merge() made to W")
            raise Fail(got, expected="W ← W + (α/r)·B @ A", hint=hint, specific=specific)
        raise Fail(f"on a {name} base merge() changed W by a relative error of {fmt(rel_err(W, ref))} from W + (α/r)·B @ A",
                   expected="W ← W + (α/r)·B @ A, rounded once into W's dtype")


@case("after merge() the output is unchanged (the branch is not added a second time)", "merge", points=2, requires=("construct",))
def merged_forward(cls):
    for cfg in configs(2, 24):
        b, A, B, x, y_before = _merged_setup(cls, cfg)
        call("layer.merge()", b.layer.merge)
        y = b.forward(x, "layer(x) after merge()")
        err = rel_err(y, y_before)
        if err <= TOL32 * 5:
            continue
        branch = b.s * b.branch(x, A, B)
        c, res = fit_multiple(y - b.base_out(x), branch)
        if res <= 1e-3 and near(c, 2.0):
            raise Named("after merge() your output changed by (α/r)·x Aᵀ Bᵀ: ΔW is counted twice, once inside W and once by the branch",
                       expected="merged output == unmerged output",
                       hint="remember that you merged (self.merged = True in merge()) and skip the LoRA branch in forward while merged")
        if res <= 1e-3 and near(c, 1 + 1 / b.s):
            raise Fail("after merge() your output is base + B A x + the branch: an unscaled ΔW was merged AND the branch is still added",
                       expected="merged output == unmerged output", hint=E3_HINT + " And skip the branch while merged.")
        if res <= 1e-3 and near(c * b.s, 1.0):
            raise Fail(f"the merged model differs from the unmerged one (relative error {fmt(err)}): the merged update is "
                       f"{fmt(c)}× the branch, as if B @ A were merged without the scale α/r", expected="merged output == unmerged output", hint=E3_HINT)
        raise Fail(f"the merged model differs from the unmerged one by relative error {fmt(err)}",
                   expected="merged output == unmerged output (up to float32 rounding)",
                   hint="merge adds ΔW = (α/r)·B @ A to W and forward then skips the branch")


@case("unmerge() restores W (up to float32 rounding)", "merge", points=2, requires=("construct",))
def unmerge(cls):
    for cfg in configs(2, 25):
        b, A, B, x, _ = _merged_setup(cls, cfg)
        call("layer.merge()", b.layer.merge)
        W_merged = b.weight()
        call("layer.unmerge()", b.layer.unmerge)
        W = b.weight()
        err = rel_err(W, b.W0)
        if err <= TOL32:
            continue
        if rel_err(W, W_merged) <= TOL32 and rel_err(W_merged, b.W0) > TOL32:
            got = "unmerge() did not change W: ΔW is still inside it"
        else:
            got = f"after merge() then unmerge(), W differs from the original W by relative error {fmt(err)}"
            c, res = fit_multiple(W - b.W0, b.s * (B @ A))
            if res <= 1e-3 and math.isfinite(c):
                got += f" (W_original + {fmt(c)}·ΔW)"
        raise Fail(got, expected="W restored: W ← W − (α/r)·B @ A undoes the merge",
                   hint="unmerge must subtract exactly what merge added, with the same scale α/r and the same B @ A")


@case("after unmerge() the LoRA branch is used again", "merge", requires=("construct",))
def unmerged_forward(cls):
    b, A, B, x, y_before = _merged_setup(cls, configs(1, 26)[0])
    call("layer.merge()", b.layer.merge)
    call("layer.unmerge()", b.layer.unmerge)
    y = b.forward(x, "layer(x) after merge(); unmerge()")
    err = rel_err(y, y_before)
    if err <= TOL32 * 5:
        return
    if rel_err(y, b.base_out(x)) <= TOL32 * 5:
        raise Fail("after unmerge() your output equals the base layer's: the branch is no longer added",
                   expected="the same output as before merge()", hint="reset your flag in unmerge() (self.merged = False)")
    raise Fail(f"after merge(); unmerge() the output changed by relative error {fmt(err)}", expected="the same output as before merge()")


@case("a second merge() does not add ΔW twice", "merge", requires=("construct",))
def double_merge(cls):
    b, A, B, x, y_before = _merged_setup(cls, configs(1, 27)[0])
    call("layer.merge()", b.layer.merge)
    W1 = b.weight()
    try:
        b.layer.merge()
    except (KeyboardInterrupt,):
        raise
    except Exception:  # noqa: BLE001 - refusing to merge twice is the behaviour of lora_edu.LoRALinear
        return "the second merge() raised: good"
    W2 = b.weight()
    if rel_err(W2, W1) <= TOL32:
        return "the second merge() left W alone: good"
    c, res = fit_multiple(W2 - b.W0, b.s * (B @ A))
    got = "a second merge() changed W again" + (f": W is now W + {fmt(c)}·ΔW" if res < 1e-3 else "")
    raise Fail(got, expected="the second merge() raises (RuntimeError) or does nothing",
               hint="keep a flag: in merge(), if self.merged: raise RuntimeError('already merged'); loralib merges on every eval(), so this happens")


@case("dropout (optional argument, not counted): only in training mode, only on the LoRA branch", "dropout", requires=("construct",),
      optional=True)
def dropout(cls):
    i, o, r, alpha = configs(1, 28)[0]
    base_probe = make_base(i, o)
    try:
        cls(base_probe, r, alpha, dropout=0.5)
    except TypeError as e:
        if "dropout" in str(e) or "argument" in str(e):
            return "skipped: your constructor has no `dropout` argument (optional)"
        raise
    b = Built(cls, i, o, r, alpha, dropout=0.5)
    A, B = b.randomize()
    x = b.x(64)
    call("layer.eval()", b.layer.eval)
    y1 = b.forward(x, "layer(x) in eval mode")
    y2 = b.forward(x, "layer(x) in eval mode")
    own = forward_factor(b, x, y1, A, B) or 1.0  # a scale mistake is the forward case's, not this one's
    if rel_err(y1, y2) > 0 or rel_err(y1, b.base_out(x) + own * b.s * b.branch(x, A, B)) > TOL32:
        raise Fail("in eval() mode your output is random or differs from the formula without dropout",
                   expected="no dropout in eval mode: y = x Wᵀ + b + (α/r)·x Aᵀ Bᵀ",
                   hint="use an nn.Dropout module (switched off by .eval()), or F.dropout(x, p, training=self.training); F.dropout's default is training=True")
    call("layer.train()", b.layer.train)
    ya = b.forward(x, "layer(x) in train mode")
    yb = b.forward(x, "layer(x) in train mode")
    if rel_err(ya, yb) == 0:
        raise Fail("with dropout=0.5, two training-mode calls gave identical outputs: dropout does nothing",
                   expected="dropout on the input of the LoRA branch in training mode",
                   hint="self.dropout = nn.Dropout(dropout); branch = self.dropout(x) @ A.T @ B.T")
    with torch.no_grad():
        b.factors()[1].zero_()
    y0 = b.forward(x, "layer(x) in train mode with B = 0")
    if rel_err(y0, b.base_out(x)) > TOL32:
        raise Fail("in training mode with B = 0 your output differs from the base layer's: dropout touches the base output",
                   expected="dropout only on the LoRA branch's input: base(x) + (α/r)·dropout(x) Aᵀ Bᵀ",
                   hint="apply dropout to x inside the branch, never to base(x) or to the sum")
