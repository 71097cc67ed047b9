"""What a check returns: one :class:`CaseResult` per case, gathered in a :class:`CheckResult`.

``str(result)`` is the feedback a student reads: every case with ✓ / ✗, and for the
first failure of each *kind* (interface, init, forward, merge, ...) what was expected,
what the student's code did, and a hint that points at the concept.
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

    @property
    def earned(self) -> float:
        return self.points if self.passed else 0.0

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

    @property
    def points(self) -> float:
        return sum(c.earned for c in self.cases)

    @property
    def possible(self) -> float:
        return sum(c.points for c in self.cases)

    @property
    def score(self) -> float:
        """Points earned / points possible, in [0, 1]."""
        return self.points / self.possible if self.possible else 0.0

    @property
    def passed(self) -> bool:
        return bool(self.cases) and all(c.passed for c in self.cases)

    @property
    def failed(self) -> list[CaseResult]:
        return [c for c in self.cases if not c.passed]

    def __bool__(self) -> bool:  # `assert check(...)` reads naturally
        return self.passed

    def to_dict(self) -> dict:
        return {
            "exercise": self.exercise,
            "passed": self.passed,
            "score": self.score,
            "points": self.points,
            "possible": self.possible,
            "cases": [asdict(c) for c in self.cases],
        }

    @classmethod
    def from_dict(cls, d: dict) -> CheckResult:
        cases = [CaseResult(**{k: c[k] for k in CaseResult.__dataclass_fields__ if k in c}) for c in d["cases"]]
        return cls(exercise=str(d["exercise"]), cases=cases)

    def __str__(self) -> str:
        n_ok = sum(c.passed for c in self.cases)
        head = (
            f"{self.exercise}: {n_ok}/{len(self.cases)} cases passed, "
            f"score {self.points:g}/{self.possible:g} = {self.score:.0%}"
        )
        lines = [head + ("  -- all passed, well done!" if self.passed else "")]
        explained: set[str] = set()
        for c in self.cases:
            if c.passed:
                lines.append(f"  ✓ {c.name}" + (f"  ({c.got})" if c.got else ""))
                continue
            lines.append(f"  ✗ {c.name}")
            if c.kind in explained:
                lines.append(f"      {_shorten(c.got)}")
                continue
            explained.add(c.kind)
            lines.append(f"      what your code did: {c.got}")
            if c.expected:
                lines.append(f"      expected: {c.expected}")
            if c.hint:
                lines.append(f"      hint: {c.hint}")
        return "\n".join(lines)

    __repr__ = __str__


def _shorten(text: str, n: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"
