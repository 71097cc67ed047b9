"""Exercise notebooks: find the shipped sources and write student copies.

A source notebook marks each solution with nbgrader-compatible markers::

    def forward(self, x):
        ### BEGIN SOLUTION
        return self.base(x) + self.scale * (x @ self.A.T @ self.B.T)
        ### END SOLUTION

:func:`make_student_notebook` replaces every such region (markers included) with a
stub at the same indentation that raises ``NotImplementedError`` (in Markdown cells:
"YOUR ANSWER HERE"), and clears outputs and execution counts.
"""
from __future__ import annotations

import copy
import json
import os
import re
from importlib import resources
from pathlib import Path

BEGIN = "### BEGIN SOLUTION"
END = "### END SOLUTION"
STUB = 'raise NotImplementedError("replace this line with your code")'


def exercise_dir() -> Path:
    """The folder holding the shipped source notebooks (package data)."""
    return Path(str(resources.files("lora_edu") / "exercises"))


def source_notebooks() -> list[Path]:
    return sorted(exercise_dir().glob("[0-9][0-9]_*.ipynb"))


def read_notebook(path: str | os.PathLike) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def notebook_exercise(nb: dict) -> str | None:
    return (nb.get("metadata", {}).get("lora_edu") or {}).get("exercise")


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else str(src)


def strip_solutions(source: str, markdown: bool = False) -> str:
    """Replace each BEGIN/END SOLUTION region of ``source`` with a stub."""
    out: list[str] = []
    inside = False
    for line in source.splitlines(keepends=True):
        stripped = line.strip()
        if stripped.startswith(BEGIN):
            if inside:
                raise ValueError(f"nested {BEGIN!r} in:\n{source}")
            inside = True
            indent = line[: len(line) - len(line.lstrip())]
            if markdown:
                out.append(f"{indent}YOUR ANSWER HERE\n")
            else:
                out.append(f"{indent}# YOUR CODE HERE\n{indent}{STUB}\n")
            continue
        if stripped.startswith(END):
            if not inside:
                raise ValueError(f"{END!r} without {BEGIN!r} in:\n{source}")
            inside = False
            continue
        if not inside:
            out.append(line)
    if inside:
        raise ValueError(f"{BEGIN!r} without {END!r} in:\n{source}")
    text = "".join(out)
    return text[:-1] if text.endswith("\n") and not source.endswith("\n") else text


def has_solutions(nb: dict) -> bool:
    return any(BEGIN in _source(c) for c in nb.get("cells", []))


def make_student_notebook(nb: dict) -> dict:
    """A student copy of a source notebook: solutions stubbed, outputs cleared."""
    nb = copy.deepcopy(nb)
    for cell in nb.get("cells", []):
        src = _source(cell)
        if BEGIN in src or END in src:
            src = strip_solutions(src, markdown=cell.get("cell_type") == "markdown")
        cell["source"] = src
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
    meta = nb.setdefault("metadata", {}).setdefault("lora_edu", {})
    meta["student_copy"] = True
    return nb


def write_notebook(nb: dict, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def select(names: list[str] | None) -> list[Path]:
    """Source notebooks whose exercise name or file stem matches ``names`` (all when empty)."""
    paths = source_notebooks()
    if not names:
        return paths
    chosen = []
    for want in names:
        hits = [p for p in paths if want in (p.stem, p.name, notebook_exercise(read_notebook(p)), p.stem[:2])]
        if not hits:
            raise ValueError(f"no exercise {want!r}; available: {[p.stem for p in paths]}")
        chosen += [h for h in hits if h not in chosen]
    return chosen


def write_copies(out_dir: str | os.PathLike, names: list[str] | None = None, solutions: bool = False,
                 overwrite: bool = False) -> list[Path]:
    """Write student copies (or, with ``solutions=True``, the full sources) into ``out_dir``."""
    out_dir = Path(out_dir)
    written = []
    for src in select(names):
        dest = out_dir / src.name
        if dest.exists() and not overwrite:
            raise FileExistsError(f"{dest} exists; pass --force to overwrite")
        nb = read_notebook(src)
        write_notebook(nb if solutions else make_student_notebook(nb), dest)
        written.append(dest)
    return written


_MAGIC = re.compile(r"^\s*[%!]", re.M)


def solution_namespace(name: str) -> dict:
    """Execute a *source* notebook's code cells (our own, trusted solutions) except the self-check.

    For tests and instructors: returns the notebook's global namespace.
    """
    from .sandbox import SELF_CHECK_MARKER

    path = select([name])[0]
    ns: dict = {"__name__": "__main__"}
    for cell in read_notebook(path)["cells"]:
        if cell.get("cell_type") != "code":
            continue
        src = _source(cell)
        if SELF_CHECK_MARKER in src:
            continue
        src = _MAGIC.sub("pass  # ", src)
        exec(compile(src, f"<{path.name}>", "exec"), ns)  # noqa: S102 - our own source notebooks
    return ns
