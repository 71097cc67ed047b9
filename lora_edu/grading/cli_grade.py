"""Grade submitted exercise notebooks, each in its own isolated process: feedback, gradebook CSV, summary.

``lora-edu grade SUBMISSIONS... --out grades.csv [--format plain|canvas|moodle] [--roster class.csv]``

SUBMISSIONS are notebooks or folders of notebooks.  The student of a notebook is the
first folder below a folder given on the command line (``submissions/alice/…``, as
nbgrader lays them out), else the file name without the exercise's name
(``alice_01_lora_linear.ipynb`` → ``alice``).  Hidden cases are drawn from
``--secret-file`` (or ``LORA_EDU_GRADING_SECRET``; a fresh one per run when neither is set) and
the student's name, so each student's hidden inputs are their own.
Writes: the gradebook (``--out``, one row per student), and in the feedback folder
one Markdown file per submission plus ``submissions.csv`` (one row per notebook).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .checks import EXERCISES, SECRET_ENV, env_secret, variant_for
from .integrity import package_root, source_flags, tree_fingerprint
from .notebooks import STUB, code_cells, notebook_exercise
from .report import FORMATS, Graded, feedback_markdown, gradebook_rows, lms_rows, read_roster, submissions_csv, summary_text, write_safely
from .result import CheckResult
from .sandbox import Limits, plan_child, pristine_package, run_submission, subreaper


class GradingAborted(RuntimeError):
    """The installed grading code changed while a submission ran: no grade of this run can be trusted."""


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("submissions", nargs="+", metavar="SUBMISSION", help="notebooks, or folders searched for *.ipynb")
    parser.add_argument("--exercise", default=None, help="checker name (default: read from each notebook's metadata)")
    parser.add_argument("--out", default="grades.csv", help="gradebook CSV, one row per student (default: grades.csv)")
    parser.add_argument("--format", default="plain", type=_formats,
                        help="gradebook layout: plain (points per exercise), canvas or moodle import; several separated by "
                             "commas write --out in the first and <out>.<format>.csv for the others (default: plain)")
    parser.add_argument("--assignment", default="LoRA exercises", help="assignment column name for canvas/moodle")
    parser.add_argument("--roster", default=None, help="class list CSV with a 'student' column (others: name, id, sis_user_id, "
                                                       "sis_login_id, section, email, username, idnumber)")
    parser.add_argument("--feedback", default=None, help="folder for the feedback files (default: <out>_feedback next to --out)")
    parser.add_argument("--secret-file", default=None,
                        help=f"file holding the grading secret for the hidden cases (default: ${SECRET_ENV}, else a fresh one)")
    parser.add_argument("--secret", default=None, help="the secret itself (visible to other processes in /proc: prefer --secret-file)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per submission, all included (default: 300)")
    parser.add_argument("--case-timeout", type=float, default=10.0, help="seconds per checker case (default: 10)")
    parser.add_argument("--memory-mb", type=int, default=4096, help="address-space limit per submission in MB (default: 4096)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="submissions graded at once (default: 1; concurrent children share the unprivileged user)")
    parser.add_argument("--allow-root", action="store_true",
                        help="when run as root and submissions cannot run as the user nobody, run them as root instead of refusing "
                             "(only inside a throwaway container)")
    parser.add_argument("--keep-flagged-scores", action="store_true",
                        help="keep the score of a submission with an integrity flag (default: set it to 0 pending review)")


def find_submissions(paths: list[str]) -> tuple[list[tuple[Path, Path | None]], list[str]]:
    """(notebook, the folder it was found under) pairs, and warnings; symbolic links are never followed."""
    found: list[tuple[Path, Path | None]] = []
    warnings = []
    for p in map(Path, paths):
        if p.is_symlink():
            warnings.append(f"{p} is a symbolic link, skipped")
        elif p.is_dir():
            for dirpath, dirnames, filenames in os.walk(p, followlinks=False):
                dirnames[:] = sorted(d for d in dirnames if d != ".ipynb_checkpoints")
                for name in sorted(filenames):
                    q = Path(dirpath) / name
                    if not name.endswith(".ipynb"):
                        continue
                    if q.is_symlink():
                        warnings.append(f"{q} is a symbolic link, skipped")
                        continue
                    found.append((q, p))
        elif p.exists():
            found.append((p, None))
        else:
            warnings.append(f"{p} does not exist, skipped")
    return found, warnings


def _mentions(stem: str) -> set[str]:
    """Exercises a file name names (by exercise name or notebook stem)."""
    low = stem.lower()
    hits = set()
    for name, ex in EXERCISES.items():
        nb_stem = Path(ex.notebook).stem
        if name in low or nb_stem in low:
            hits.add(name)
    return hits


def student_of(path: Path, root: Path | None) -> str:
    if root is not None:
        rel = path.relative_to(root).parts
        if len(rel) >= 2:
            return rel[0]
    stem = path.stem
    for ex in EXERCISES.values():
        stem = stem.replace(Path(ex.notebook).stem, "").replace(ex.name, "")
    stem = stem.strip("_- .")
    return stem or path.stem


def possible_points(exercise: str) -> float:
    return float(sum(c.points for c in EXERCISES[exercise].cases if not c.optional))


def _prepare(path: Path, root: Path | None, content: bytes | None, read_error: str, forced: str | None) -> dict:
    """What the grader learns from a notebook without running it: exercise, student, flags from its source."""
    item = {"path": path, "student": student_of(path, root), "content": content, "error": read_error, "exercise": forced,
            "cheats": [], "notes": [], "cells": []}
    if content is None:
        return item
    try:
        nb = json.loads(content.decode("utf-8"))
        if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
            raise ValueError("no list of cells")
    except (ValueError, UnicodeDecodeError) as e:
        item["error"] = f"not a readable notebook ({type(e).__name__}: {str(e)[:120]})"
        return item
    meta = notebook_exercise(nb)
    named = _mentions(path.stem)
    ex = forced or meta
    if ex is None and len(named) == 1:
        ex = next(iter(named))
        item["notes"].append(f"no exercise in the notebook's metadata; graded as {ex} from its file name")
    if forced and meta and meta != forced:
        item["notes"].append(f"graded as {forced} (--exercise) but the notebook's metadata says {meta}")
    if meta and named and meta not in named:
        item["notes"].append(f"the file name names {', '.join(sorted(named))} but the notebook's metadata says {meta} (graded as {ex})")
    if ex not in EXERCISES:
        item["error"] = f"unknown exercise {ex!r}; pass --exercise (one of {sorted(EXERCISES)})"
        return item
    item["exercise"] = ex
    item["cells"] = code_cells(nb)
    item["cheats"] += source_flags(item["cells"], EXERCISES[ex])
    return item


def grade(found: list[tuple[Path, Path | None]], exercise: str | None, secret: str, limits: Limits, jobs: int = 1,
          zero_cheats: bool = True, log=None) -> list[Graded]:
    """Grade every notebook; raises :class:`GradingAborted` if the installed grading code changes meanwhile."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    items = []
    for path, root in found:  # every submission is read before any of them runs
        try:
            content, err = path.read_bytes(), ""
        except OSError as e:
            content, err = None, f"could not read: {e}"
        items.append(_prepare(path, root, content, err, exercise))
    installed = package_root() / "grading"  # the grading code on disk, for later runs
    with pristine_package() as pkg:  # the code this run grades with
        return _grade_all(items, secret, limits, jobs, zero_cheats, log, pkg, installed)


def _grade_all(items, secret, limits, jobs, zero_cheats, log, pkg: Path, installed: Path) -> list[Graded]:
    fingerprints = {pkg: tree_fingerprint(pkg), installed: tree_fingerprint(installed)}

    def one(item) -> Graded:
        ex = item["exercise"]
        possible = possible_points(ex) if ex in EXERCISES else 0.0
        g = Graded(str(item["path"]), item["student"], ex or "?", None, possible, error=item["error"], cheats=list(item["cheats"]),
                   notes=list(item["notes"]), zero_cheats=zero_cheats)
        if item["error"]:
            log(f"{item['path']}: {item['error']}")
            return g
        run = run_submission(item["content"], item["path"].name, ex, variant_for(secret, ex, item["student"]), limits, package=pkg)
        for folder, before in fingerprints.items():
            if tree_fingerprint(folder) != before:
                raise GradingAborted(f"the grading code ({folder}) changed while {item['path']} was graded: stop, reinstall "
                                     "lora_edu, and grade again (inside a container, or as root so that submissions run as nobody)")
        g.result = CheckResult.from_dict(run.result) if run.result else None
        g.error, g.cell_errors, g.output, g.seconds, g.user = run.error, run.cell_errors, run.output, run.seconds, run.user
        g.cheats += run.flags
        if g.result is not None and g.result.passed and (
                any("NotImplementedError" in e for e in run.cell_errors) or any(STUB in c for c in item["cells"])):
            g.notes.append("full marks although the notebook still raises NotImplementedError: were the answers written here?")
        if run.output_bytes > limits.output_cap:
            g.notes.append(f"the notebook printed {run.output_bytes:,} bytes (only the first {limits.output_cap:,} were kept)")
        log(f"{item['path']}: {g.points:g}/{g.possible:g}" + (f"  ({g.error})" if g.error else "") + ("  [FLAGGED]" if g.cheats else ""))
        return g

    with subreaper(), ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        graded = list(pool.map(one, items))  # in submission order
    return graded


def run(args: argparse.Namespace) -> int:
    if args.exercise is not None and args.exercise not in EXERCISES:
        print(f"lora-edu grade: unknown exercise {args.exercise!r}; choose from {sorted(EXERCISES)}", file=sys.stderr)
        return 2
    found, warnings = find_submissions(args.submissions)
    for w in warnings:
        print(f"lora-edu grade: {w}", file=sys.stderr)
    if not found:
        print("lora-edu grade: no notebooks found", file=sys.stderr)
        return 1
    roster = read_roster(args.roster) if args.roster else None
    secret = args.secret or (Path(args.secret_file).read_text(encoding="utf-8").strip() if args.secret_file else "") \
        or env_secret() or ""
    if not secret:
        secret = secrets.token_hex(16)
        print(f"lora-edu grade: hidden cases drawn from a fresh secret; to reproduce this run, save it to a file and pass "
              f"--secret-file FILE (the secret: {secret})", file=sys.stderr)
    limits = Limits(timeout=args.timeout, case_timeout=args.case_timeout, memory_mb=args.memory_mb, allow_root=args.allow_root)
    refusal = plan_child(limits)[3]  # the rule each submission's run applies, checked once before any runs
    if refusal:
        print(f"lora-edu grade: {refusal}", file=sys.stderr)
        return 2
    try:
        graded = grade(found, args.exercise, secret, limits, args.jobs, zero_cheats=not args.keep_flagged_scores)
    except GradingAborted as e:
        print(f"\nlora-edu grade: ABORTED, nothing written: {e}\n", file=sys.stderr)
        return 3
    # everything is written after the last submission ended, without following links
    out = Path(args.out)
    feedback = Path(args.feedback) if args.feedback else out.with_name(out.stem + "_feedback")
    if feedback.is_symlink():
        raise OSError(f"refusing to write into {feedback}: it is a symbolic link")
    feedback.mkdir(parents=True, exist_ok=True)
    for g in graded:
        name = f"{_safe(g.student)}/{_safe(Path(g.file).stem)}.md"
        write_safely(feedback / name, feedback_markdown(g).encode("utf-8"), inside=feedback)
    write_safely(feedback / "submissions.csv", submissions_csv(graded), inside=feedback)
    names = [n for n in EXERCISES if any(g.exercise == n for g in graded)]
    exercises = [(n, possible_points(n)) for n in names]
    rows = gradebook_rows(graded, exercises, roster)
    written = []
    for k, fmt in enumerate(args.format):
        target = out if k == 0 else out.with_name(f"{out.stem}.{fmt}.csv")
        write_safely(target, FORMATS[fmt](rows, exercises, args.assignment))
        written.append(f"{target} ({fmt})")
    print(summary_text(graded, rows, exercises))
    left_out = [r["student"] for r in rows if r not in lms_rows(rows)]
    if left_out and any(f in ("canvas", "moodle") for f in args.format):
        print(f"\nnot on the roster, left out of the LMS file(s) (in the plain gradebook, flagged): {', '.join(left_out)}")
    print(f"\ngraded {len(graded)} submission(s) of {len(rows)} student(s) -> {', '.join(written)}; feedback in {feedback}/",
          file=sys.stderr)
    return 0


def _formats(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in FORMATS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"unknown format {bad or text!r}; choose from {sorted(FORMATS)}")
    return list(dict.fromkeys(names))


def _safe(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "student"
    return s[:80]
