"""Classroom exercises: list them, and write student copies (solutions replaced by stubs).

``lora-edu exercises list`` · ``lora-edu exercises make-student DIR`` ·
``lora-edu exercises copy-solutions DIR`` (instructors: the sources with solutions).
"""
from __future__ import annotations

import argparse
import sys


def configure_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="exercises_command", metavar="ACTION")
    sub.add_parser("list", help="list the exercises and their checker names")
    for name, help_text in (("make-student", "write student copies (solutions stubbed, outputs cleared) into DIR"),
                            ("copy-solutions", "write the source notebooks, with solutions, into DIR (instructors)")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("dir", metavar="DIR")
        p.add_argument("names", nargs="*", metavar="EXERCISE", help="only these exercises (name or number; default: all)")
        p.add_argument("--force", action="store_true", help="overwrite existing files")


def run(args: argparse.Namespace) -> int:
    from .checks import EXERCISES
    from .notebooks import notebook_exercise, read_notebook, source_notebooks, write_copies

    action = getattr(args, "exercises_command", None)
    if action in (None, "list"):
        for path in source_notebooks():
            name = notebook_exercise(read_notebook(path))
            ex = EXERCISES.get(name)
            title = ex.title if ex else "?"
            print(f"{path.name:28s} {name or '?':16s} {title}")
        return 0
    try:
        written = write_copies(args.dir, args.names or None, solutions=(action == "copy-solutions"), overwrite=args.force)
    except (FileExistsError, ValueError) as e:
        print(f"lora-edu exercises: {e}", file=sys.stderr)
        return 1
    for p in written:
        print(p)
    kind = "solution" if action == "copy-solutions" else "student"
    print(f"wrote {len(written)} {kind} notebook(s) to {args.dir}", file=sys.stderr)
    return 0
