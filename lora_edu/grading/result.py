"""What a check returns: one :class:`CaseResult` per case, gathered in a :class:`CheckResult`.

``str(result)`` is the feedback a student reads: every case with ✓ / ✗ and its points,
the most specific hint among all failures first, and for the first failure of each
*kind* (interface, init, forward, merge, ...) what was expected, what the student's
code did, and a hint that points at the concept.

Scoring: a case is worth ``points``; it earns ``points × credit`` (``credit`` is 1 for
a pass, 0 for a fail, and in between where the quantity is continuous, e.g. how much
the loss fell).  An ``optional`` case is reported but never counts: not doing it, or
doing it wrong, costs nothing.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class CaseResult:
    """The outcome of one case of a check."""

    name: str  # what the case verifies, e.g. "forward = x Wᵀ + b + (α/r)·x Aᵀ Bᵀ"
    kind: str  # a family of cases: the first failure of each kind is explained in full
    points: float
    passed: bool
    got: str = ""  # what the student's code did (failures), or a note (passes)
    expected: str = ""
    hint: str = ""
    credit: float = -1.0  # fraction of the points earned; -1 means "1 if passed else 0"
    optional: bool = False  # reported, never counted
    specific: int = 1  # how precisely the hint names the mistake: 0 generic, 1 usual, 2 a named mistake
    case_id: str = ""

    def __post_init__(self) -> None:
        if self.credit < 0:
            self.credit = 1.0 if self.passed else 0.0
        self.credit = min(1.0, max(0.0, float(self.credit)))

    @property
    def counted(self) -> float:
        """Points this case adds to the possible total (0 for an optional case)."""
        return 0.0 if self.optional else float(self.points)

    @property
    def earned(self) -> float:
        return self.counted * self.credit

    @property
    def message(self) -> str:
        """One paragraph: what happened, what was expected, and the hint."""
        parts = [self.got]
        if self.expected:
            parts.append(f"expected: {self.expected}")
        if self.hint:
            parts.append(f"hint: {self.hint}")
        return " | ".join(p for p in parts if p)


@dataclass
class CheckResult:
    """All cases of one ``check(exercise, submission)`` call."""

    exercise: str
    cases: list[CaseResult] = field(default_factory=list)
    variant: str = "self-check"  # "self-check" (public cases) or "hidden" (values drawn from a grading secret)

    @property
    def points(self) -> float:
        return round(sum(c.earned for c in self.cases), 6)

    @property
    def possible(self) -> float:
        return sum(c.counted for c in self.cases)

    @property
    def score(self) -> float:
        """Points earned / points possible, in [0, 1]."""
        return self.points / self.possible if self.possible else 0.0

    @property
    def passed(self) -> bool:
        return bool(self.cases) and all(c.passed for c in self.cases if not c.optional)

    @property
    def failed(self) -> list[CaseResult]:
        return [c for c in self.cases if not c.passed and not c.optional]

    def best_hint(self) -> CaseResult | None:
        """The failed case whose hint names the mistake most precisely (the first among equals)."""
        failed = [c for c in self.cases if not c.passed and c.hint and not c.optional]
        if not failed:
            return None
        return max(failed, key=lambda c: (c.specific, c.points))  # max() keeps the first of equals

    def __bool__(self) -> bool:  # `assert check(...)` reads naturally
        return self.passed

    def to_dict(self) -> dict:
        return {
            "exercise": self.exercise,
            "variant": self.variant,
            "passed": self.passed,
            "score": self.score,
            "points": self.points,
            "possible": self.possible,
            "cases": [asdict(c) for c in self.cases],
        }

    @classmethod
    def from_dict(cls, d: dict) -> CheckResult:
        cases = [CaseResult(**{k: c[k] for k in CaseResult.__dataclass_fields__ if k in c}) for c in d["cases"]]
        return cls(exercise=str(d["exercise"]), cases=cases, variant=str(d.get("variant", "self-check")))

    def __str__(self) -> str:
        n_ok = sum(c.passed for c in self.cases if not c.optional)
        n = sum(not c.optional for c in self.cases)
        head = f"{self.exercise}: {n_ok}/{n} cases passed, score {self.points:g}/{self.possible:g} = {self.score:.0%}"
        lines = [head + ("  -- all passed, well done!" if self.passed else "")]
        best = self.best_hint()
        if best is not None:
            lines.append(f"  most likely problem: {best.hint}")
        explained: set[str] = set()
        for c in self.cases:
            pts = "optional" if c.optional else f"{c.earned:g}/{c.points:g}"
            if c.passed:
                lines.append(f"  ✓ [{pts}] {c.name}" + (f"  ({c.got})" if c.got else ""))
                continue
            lines.append(f"  ✗ [{pts}] {c.name}")
            if c.kind in explained:
                lines.append(f"      {shorten(c.got)}")
                continue
            explained.add(c.kind)
            lines.append(f"      what your code did: {c.got}")
            if c.expected:
                lines.append(f"      expected: {c.expected}")
            if c.hint:
                lines.append(f"      hint: {c.hint}")
        return "\n".join(lines)

    __repr__ = __str__


def shorten(text: str, n: int = 160) -> str:
    """One line of at most ``n`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"
