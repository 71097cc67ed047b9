"""Grade submitted exercise notebooks, each in its own time-limited process, into a CSV.

``lora-edu grade SUBMISSIONS... [--exercise NAME] --out grades.csv``: SUBMISSIONS are
notebooks or folders of notebooks.  Every notebook runs in a separate subprocess
(never in this one) with ``--timeout`` seconds; a crash, an infinite loop or garbage
output costs that submission its score and nothing else.  One CSV row per
submission: file, exercise, score, points, possible, failed cases, error.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

FIELDS = ["file", "exercise", "score", "points", "possible", "passed", "failed_cases", "error", "cell_errors", "seconds"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("submissions", nargs="+", metavar="SUBMISSION", help="notebooks, or folders searched for *.ipynb")
    parser.add_argument("--exercise", default=None, help="checker name (default: read from each notebook's metadata)")
    parser.add_argument("--out", default="grades.csv", help="CSV file to write (default: grades.csv)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per submission, all included (default: 300)")
    parser.add_argument("--case-timeout", type=float, default=10.0, help="seconds per checker case (default: 10)")
    parser.add_argument("--jobs", type=int, default=1, help="submissions graded at once, each in its own process (default: 1)")


def find_submissions(paths: list[str]) -> list[Path]:
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(q for q in p.rglob("*.ipynb") if ".ipynb_checkpoints" not in q.parts)
        elif p.exists():
            found.append(p)
        else:
            print(f"lora-edu grade: {p} does not exist, skipped", file=sys.stderr)
    return found


def grade(paths: list[Path], exercise: str | None, timeout: float, case_timeout: float, jobs: int = 1) -> list[dict]:
    from concurrent.futures import ThreadPoolExecutor

    from .sandbox import run_notebook_subprocess

    # read every submission into memory before any of them runs: one cannot rewrite another's notebook
    copies = []
    for p in paths:
        try:
            copies.append((p, p.read_bytes(), ""))
        except OSError as e:
            copies.append((p, None, f"could not read: {e}"))

    def one(item):
        original, content, err = item
        if content is None:
            return _row(str(original), exercise, None, err, [], 0.0)
        run = run_notebook_subprocess(original, exercise, timeout=timeout, case_timeout=case_timeout, content=content)
        row = _row(str(original), exercise, run.result, run.error, run.cell_errors, run.seconds)
        print(f"{original}: score {row['score']}" + (f"  ({run.error})" if run.error else ""), file=sys.stderr)
        return row

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        rows = list(pool.map(one, copies))  # in submission order
    return rows


def _row(file, exercise, result, error, cell_errors, seconds) -> dict:
    if result is None:
        return {"file": file, "exercise": exercise or "", "score": 0.0, "points": 0, "possible": "", "passed": False,
                "failed_cases": "", "error": error or "no result", "cell_errors": " | ".join(cell_errors)[:2000], "seconds": f"{seconds:.1f}"}
    from .result import CheckResult

    r = CheckResult.from_dict(result)
    return {"file": file, "exercise": r.exercise, "score": round(r.score, 4), "points": r.points, "possible": r.possible,
            "passed": r.passed, "failed_cases": "; ".join(c.name for c in r.failed), "error": error,
            "cell_errors": " | ".join(cell_errors)[:2000], "seconds": f"{seconds:.1f}"}


def write_csv(rows: list[dict], out: str | os.PathLike) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, out)


def run(args: argparse.Namespace) -> int:
    from .checks import EXERCISES

    if args.exercise is not None and args.exercise not in EXERCISES:
        print(f"lora-edu grade: unknown exercise {args.exercise!r}; choose from {sorted(EXERCISES)}", file=sys.stderr)
        return 2
    paths = find_submissions(args.submissions)
    if not paths:
        print("lora-edu grade: no notebooks found", file=sys.stderr)
        return 1
    rows = grade(paths, args.exercise, args.timeout, args.case_timeout, args.jobs)
    write_csv(rows, args.out)  # written last: nothing a submission did before can survive in it
    print(f"graded {len(rows)} submission(s) -> {args.out}", file=sys.stderr)
    return 0
