"""Classroom exercises: list them, write student copies, and (instructors) the sources and an nbgrader course.

``lora-edu exercises list`` · ``lora-edu exercises make-student DIR`` ·
``lora-edu exercises copy-solutions DIR`` · ``lora-edu exercises nbgrader-course DIR``.
The sources with solutions are instructor material: they are in ``course/exercises/`` of
a source checkout and not in the installed package, so every action but ``list`` needs
a checkout (or ``--source``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .checks import EXERCISES
from .notebooks import SourcesNotFound, notebook_exercise, read_notebook, select, write_copies, write_notebook


def configure_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="exercises_command", metavar="ACTION")
    sub.add_parser("list", help="list the exercises, their checker names and points")
    for name, help_text in (("make-student", "write student copies (solutions stubbed, hidden tests removed, outputs cleared) into DIR"),
                            ("copy-solutions", "write the source notebooks, with solutions, into DIR (instructors; needs a source checkout)"),
                            ("nbgrader-course", "lay the sources out as an nbgrader course in DIR: source/<exercise>/<notebook>")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("dir", metavar="DIR")
        p.add_argument("names", nargs="*", metavar="EXERCISE", help="only these exercises (name or number; default: all)")
        p.add_argument("--force", action="store_true", help="overwrite existing files")
        p.add_argument("--source", default=None, help="folder of the exercise sources (default: course/exercises/ of the checkout)")


def run(args: argparse.Namespace) -> int:
    action = getattr(args, "exercises_command", None)
    if action in (None, "list"):
        for name, ex in EXERCISES.items():
            points = sum(c.points for c in ex.cases if not c.optional)
            print(f"{ex.notebook:28s} {name:16s} {points:>4g} pts  {ex.title}")
        return 0
    try:
        if action == "nbgrader-course":
            written = _nbgrader_course(Path(args.dir), args.names or None, args.force, args.source)
        else:
            written = write_copies(args.dir, args.names or None, solutions=(action == "copy-solutions"), overwrite=args.force,
                                   source=args.source)
    except SourcesNotFound as e:
        print(f"lora-edu exercises {action}: {e}", file=sys.stderr)
        return 1
    except (FileExistsError, ValueError) as e:
        print(f"lora-edu exercises: {e}", file=sys.stderr)
        return 1
    for p in written:
        print(p)
    kind = {"copy-solutions": "solution", "make-student": "student", "nbgrader-course": "nbgrader source"}[action]
    print(f"wrote {len(written)} {kind} notebook(s) to {args.dir}", file=sys.stderr)
    return 0


def _nbgrader_course(course: Path, names, force: bool, source) -> list[Path]:
    """source/<exercise>/<notebook>.ipynb for each exercise: nbgrader's assignment name is the checker name."""
    written = []
    chosen = select(names, source)
    for src in chosen:
        nb = read_notebook(src)
        dest = course / "source" / notebook_exercise(nb) / src.name
        if dest.exists() and not force:
            raise FileExistsError(f"{dest} exists; pass --force to overwrite")
        write_notebook(nb, dest)
        written.append(dest)
    return written
