"""The ``lora-edu`` command line.

Each subcommand lives in the module that owns its concept; this file only wires
them together.  A subcommand module exposes two functions:

* ``configure_parser(parser)`` adds its arguments to an ``argparse`` sub-parser;
* ``run(args) -> int`` does the work and returns the process exit code.

Modules are imported when the parser is built (``lora-edu --help`` describes them all).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "tour": ("lora_edu.lab.tour", "the guided tour: count -> inject -> fine-tune -> merge -> check -> save"),
    "pretrain": ("lora_edu.lab.pretrain", "re-create the shipped pretrained checkpoints"),
    "exercises": ("lora_edu.grading.cli_exercises", "classroom exercises: write student copies"),
    "grade": ("lora_edu.grading.cli_grade", "grade a folder of submitted exercise notebooks"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-edu",
        description="LoRA from scratch: a guided tour, pretrained toy models, exercises and grading.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip().splitlines()[0])
        module.configure_parser(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand.  A bad input ends with one line on stderr saying what to do, and exit code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except (ValueError, TypeError, KeyError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        if os.environ.get("LORA_EDU_TRACEBACK"):  # for debugging the library itself: the full traceback
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"lora-edu {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
