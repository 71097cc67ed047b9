"""What an instructor hands back and uploads: feedback files, a gradebook CSV, a class summary.

* :func:`feedback_markdown` — one Markdown file per submission: score, flags, every case
  with its points, what the code did, what was expected, the hint; cell errors; the
  notebook's output (capped).
* :func:`gradebook_rows` — one row per student: points per exercise, total, percent,
  flags; ``roster`` (a class list) is joined so that every student on it appears.
* :data:`FORMATS` — ``plain``, ``canvas`` (Canvas gradebook import) and ``moodle``
  (Moodle's "Import grades from CSV", mapped by e-mail address or username).
* :func:`summary_text` — mean, median, a distribution, the most-failed cases and the flags.
"""
from __future__ import annotations

import csv
import io
import os
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lora_edu.atomic import atomic_write_bytes

from .result import CheckResult, shorten


@dataclass
class Graded:
    """One graded submission, as the grader reports it."""

    file: str
    student: str
    exercise: str
    result: CheckResult | None
    possible: float  # the exercise's points, also when there is no result
    error: str = ""
    cheats: list[str] = field(default_factory=list)  # integrity flags: the score is set to 0
    notes: list[str] = field(default_factory=list)  # flags for review: the score is kept
    cell_errors: list[str] = field(default_factory=list)
    output: str = ""
    seconds: float = 0.0
    user: str = ""
    zero_cheats: bool = True

    @property
    def points(self) -> float:
        if self.result is None or (self.cheats and self.zero_cheats):
            return 0.0
        return self.result.points

    @property
    def flags(self) -> list[str]:
        return [f"INTEGRITY: {c}" for c in self.cheats] + [f"review: {n}" for n in self.notes]


# ----------------------------------------------------------------------------- feedback


def feedback_markdown(g: Graded) -> str:
    lines = [f"# Feedback: {g.exercise} — {g.student}", "",
             f"**Score: {g.points:g} / {g.possible:g} points** ({(g.points / g.possible if g.possible else 0):.0%})  ",
             f"Submission: `{Path(g.file).name}`", ""]
    if g.cheats:
        lines += ["## Integrity", "",
                  "The grader found the following; the score of this exercise is set to 0 until your instructor has looked at it:", ""]
        lines += [f"- {c}" for c in g.cheats] + [""]
    if g.notes:
        lines += ["## Notes for review", ""] + [f"- {n}" for n in g.notes] + [""]
    if g.error:
        lines += ["## The notebook could not be graded completely", "", f"{g.error}", ""]
    r = g.result
    if r is not None:
        best = r.best_hint()
        lines += ["## Cases", ""]
        if best is not None:
            lines += [f"**Start here:** {best.hint}", ""]
        lines += ["| | case | points |", "|---|---|---|"]
        for c in r.cases:
            mark = "✓" if c.passed else "✗"
            pts = "optional (not counted)" if c.optional else f"{c.earned:g} / {c.points:g}"
            lines.append(f"| {mark} | {_md(c.name)} | {pts} |")
        lines.append("")
        blocked = [c for c in r.cases if not c.passed and c.got.startswith("cannot be tested")]
        if blocked:
            lines += [f"{len(blocked)} case(s) could not be tested until the first failure below is fixed: "
                      + "; ".join(c.name for c in blocked), ""]
        for c in r.cases:
            if (c.passed and not c.got) or c in blocked:
                continue
            lines += [f"### {'✓' if c.passed else '✗'} {c.name}", ""]
            if c.got:
                lines.append(f"- **{'what your code did' if not c.passed else 'note'}:** {c.got}")
            if c.expected and not c.passed:
                lines.append(f"- **expected:** {c.expected}")
            if c.hint and not c.passed:
                lines.append(f"- **hint:** {c.hint}")
            lines.append("")
        lines += [f"These cases used values drawn at grading time ({r.variant} run); your notebook's self-check cell runs "
                  "the same cases on fixed values.", ""]
    if g.cell_errors:
        lines += ["## Cells that raised an error", "", "Numbers are those Jupyter shows after *Kernel → Restart & Run All*.", ""]
        lines += [f"- {_md(e)}" for e in g.cell_errors] + [""]
    if g.output.strip():
        text = "".join(ch if ch.isprintable() or ch in "\n\t" else "\ufffd" for ch in g.output).replace("```", "ʼʼʼ").rstrip()
        lines += ["## What the notebook printed (capped)", "", "```", text, "```", ""]
    return "\n".join(lines)


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


# ----------------------------------------------------------------------------- gradebook


def read_roster(path: str | os.PathLike) -> list[dict]:
    """A class list: a CSV with a ``student`` column (the id the grader derives from file or folder names)."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [{(k or "").strip().lower(): (v or "").strip() for k, v in row.items()} for row in csv.DictReader(f)]
    if rows and "student" not in rows[0]:
        raise ValueError(f"{path}: the roster needs a 'student' column (found {sorted(rows[0])})")
    return rows


def gradebook_rows(graded: list[Graded], exercises: list[tuple[str, float]], roster: list[dict] | None = None) -> list[dict]:
    """One dict per student: ``student``, roster fields, ``<exercise>`` points, ``total``, ``possible``, ``percent``, ``flags``."""
    by_student: dict[str, dict[str, Graded]] = {}
    dup_notes: dict[str, list[str]] = {}
    for g in graded:
        seen = by_student.setdefault(g.student, {})
        if g.exercise in seen:
            keep = max(seen[g.exercise], g, key=lambda x: x.points)
            dup_notes.setdefault(g.student, []).append(
                f"review: two submissions for {g.exercise} ({Path(seen[g.exercise].file).name}, {Path(g.file).name}); kept the higher")
            seen[g.exercise] = keep
        else:
            seen[g.exercise] = g
    possible = sum(p for _, p in exercises)
    order = [r["student"] for r in roster] if roster else []
    order += sorted(s for s in by_student if s not in order)
    info = {r["student"]: r for r in roster or []}
    rows = []
    for s in order:
        subs = by_student.get(s, {})
        row = {"student": s, **{k: v for k, v in info.get(s, {}).items() if k != "student"}}
        total = 0.0
        flags = list(dup_notes.get(s, []))
        for name, _ in exercises:
            g = subs.get(name)
            row[name] = round(g.points, 2) if g else 0
            total += g.points if g else 0
            if g:
                flags += [f"{name}: {f}" for f in g.flags]
                if g.error and not any(g.error in f for f in g.flags):
                    flags.append(f"{name}: {g.error}")
        if not subs:
            flags.append("no submission")
        if roster is not None and s not in info:
            flags.append(NOT_ON_ROSTER)
        row.update(total=round(total, 2), possible=possible, percent=round(100 * total / possible, 1) if possible else 0.0,
                   flags=" | ".join(dict.fromkeys(flags)))
        rows.append(row)
    return rows


def _csv_bytes(header: list[str], rows: list[list]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue().encode("utf-8")


def format_plain(rows: list[dict], exercises: list[tuple[str, float]], assignment: str) -> bytes:
    extra = [k for k in (rows[0] if rows else {}) if k not in {"student", "total", "possible", "percent", "flags"}
             and k not in dict(exercises)]
    header = ["student", *extra, *[f"{n} ({p:g})" for n, p in exercises], "total", "possible", "percent", "flags"]
    return _csv_bytes(header, [[r["student"], *[r.get(k, "") for k in extra], *[r[n] for n, _ in exercises],
                                r["total"], r["possible"], r["percent"], r["flags"]] for r in rows])


NOT_ON_ROSTER = "review: not on the roster"


def lms_rows(rows: list[dict]) -> list[dict]:
    """The rows an LMS file may carry: students not on the roster are left out (an LMS import cannot match them)."""
    return [r for r in rows if NOT_ON_ROSTER not in r["flags"]]


def format_canvas(rows: list[dict], exercises: list[tuple[str, float]], assignment: str) -> bytes:
    """Canvas "Import" of the gradebook: Student, ID, SIS User ID, SIS Login ID, Section, then the assignment column.

    A column whose name matches no existing assignment becomes a new assignment; the
    second row gives its points possible.  Students are matched by ID / SIS ids, so
    give the roster columns ``id``, ``sis_user_id`` or ``sis_login_id``.
    """
    possible = sum(p for _, p in exercises)
    header = ["Student", "ID", "SIS User ID", "SIS Login ID", "Section", assignment]
    body = [["Points Possible", "", "", "", "", f"{possible:g}"]]
    for r in lms_rows(rows):
        body.append([r.get("name") or r["student"], r.get("id", ""), r.get("sis_user_id", ""), r.get("sis_login_id") or r["student"],
                     r.get("section", ""), f"{r['total']:g}"])
    return _csv_bytes(header, body)


def format_moodle(rows: list[dict], exercises: list[tuple[str, float]], assignment: str) -> bytes:
    """Moodle "Import grades from CSV": map "Email address" (or "Username") to the user, the assignment and feedback columns."""
    header = ["Email address", "Username", "ID number", assignment, f"{assignment} feedback"]
    body = []
    for r in lms_rows(rows):
        per = "; ".join(f"{n} {r[n]:g}/{p:g}" for n, p in exercises)
        body.append([r.get("email", ""), r.get("username") or r["student"], r.get("idnumber", ""), f"{r['total']:g}",
                     per + (f" — {r['flags']}" if r["flags"] else "")])
    return _csv_bytes(header, body)


FORMATS = {"plain": format_plain, "canvas": format_canvas, "moodle": format_moodle}


def submissions_csv(graded: list[Graded]) -> bytes:
    header = ["file", "student", "exercise", "points", "possible", "score", "points_before_flags", "failed_cases", "flags", "error",
              "cell_errors", "seconds", "ran_as"]
    rows = []
    for g in graded:
        r = g.result
        rows.append([g.file, g.student, g.exercise, round(g.points, 4), g.possible, round(g.points / g.possible, 4) if g.possible else 0,
                     round(r.points, 4) if r is not None else 0,
                     "; ".join(c.name for c in r.failed) if r is not None else "", " | ".join(g.flags), g.error, " | ".join(g.cell_errors)[:2000],
                     f"{g.seconds:.1f}", g.user])
    return _csv_bytes(header, rows)


def write_safely(path: str | os.PathLike, data: bytes, inside: str | os.PathLike | None = None) -> Path:
    """Atomic write that follows no link: the target (a link is replaced, not followed) and, below ``inside``, no folder."""
    path = Path(path)
    if inside is not None:
        p = Path(inside)
        for part in ("",) + path.parent.relative_to(p).parts:
            p = p / part if part else p
            if p.is_symlink():
                raise OSError(f"refusing to write {path}: {p} is a symbolic link")
    return atomic_write_bytes(path, data)


# ----------------------------------------------------------------------------- terminal summary


def summary_text(graded: list[Graded], rows: list[dict], exercises: list[tuple[str, float]]) -> str:
    names = [n for n, _ in exercises]
    width = max([7] + [len(r["student"]) for r in rows])
    out = [f"{'student':<{width}}  " + "  ".join(f"{n[:14]:>14}" for n in names) + f"  {'total':>9}  {'%':>6}  flags"]
    for r in rows:
        out.append(f"{r['student']:<{width}}  " + "  ".join(f"{r[n]:>14g}" for n in names)
                   + f"  {r['total']:>9g}  {r['percent']:>6.1f}  {shorten(r['flags'], 90) if r['flags'] else ''}")
    pct = [r["percent"] for r in rows]
    if pct:
        out += ["", f"class of {len(rows)}: mean {statistics.mean(pct):.1f} %, median {statistics.median(pct):.1f} %, "
                    f"min {min(pct):.1f} %, max {max(pct):.1f} %", "distribution (percent of the possible points):"]
        bins = Counter(min(int(p // 20), 4) for p in pct)
        for b in range(5):
            lo, hi = 20 * b, 20 * b + 20
            out.append(f"  {lo:>3}–{hi:<3} {'#' * bins.get(b, 0)} {bins.get(b, 0)}")
    failed = Counter()
    for g in graded:
        if g.result is not None:
            for c in g.result.failed:
                failed[(g.exercise, c.name)] += 1
    if failed:
        out += ["most-failed cases:"]
        out += [f"  {n} × {ex}: {shorten(name, 100)}" for (ex, name), n in failed.most_common(5)]
    flagged = [g for g in graded if g.cheats]
    if flagged:
        out += [f"integrity flags on {len(flagged)} submission(s) (score set to 0, see the feedback files):"]
        out += [f"  {g.student} / {g.exercise}: {shorten(g.cheats[0], 110)}" for g in flagged]
    return "\n".join(out)
