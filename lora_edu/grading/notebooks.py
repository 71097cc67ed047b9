"""Exercise notebooks: find the instructor's sources, write student copies, nbgrader cell metadata.

The sources (with solutions) are instructor material and are **not** in the installed
package: they live in ``course/exercises/`` of a source checkout (or wherever
``LORA_EDU_COURSE_DIR`` / ``--source`` points).  A source marks each solution with
nbgrader's markers::

    def forward(self, x):
        ### BEGIN SOLUTION
        return self.base(x) + self.scale * (x @ self.A.T @ self.B.T)
        ### END SOLUTION

and the graded cell holds its hidden test between ``### BEGIN HIDDEN TESTS`` and
``### END HIDDEN TESTS``.  :func:`make_student_notebook` replaces every solution region
(markers included) with a stub at the same indentation that raises
``NotImplementedError`` (in Markdown cells: "YOUR ANSWER HERE"), removes hidden tests,
and clears outputs and execution counts — what ``nbgrader generate_assignment`` does.
"""
from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

from lora_edu.atomic import atomic_write_bytes

BEGIN = "### BEGIN SOLUTION"
END = "### END SOLUTION"
BEGIN_HIDDEN = "### BEGIN HIDDEN TESTS"
END_HIDDEN = "### END HIDDEN TESTS"
STUB = 'raise NotImplementedError("replace this line with your code")'
SELF_CHECK_MARKER = "# SELF-CHECK"  # the student's own check cell: the grader runs the checker itself instead
GRADED_MARKER = "# GRADED CELL"  # the nbgrader grade cell: hidden tests run here at grading time
COURSE_ENV = "LORA_EDU_COURSE_DIR"


class SourcesNotFound(FileNotFoundError):
    """The instructor's exercise sources are not available (an installed package has none)."""


def exercise_dir(source: str | os.PathLike | None = None) -> Path:
    """The folder of exercise sources: ``source``, else ``$LORA_EDU_COURSE_DIR/exercises``, else the checkout's."""
    if source:
        if Path(source).is_dir() and any(Path(source).glob("[0-9][0-9]_*.ipynb")):
            return Path(source)
        raise SourcesNotFound(f"{source} holds no exercise sources (NN_name.ipynb)")
    candidates = []
    if os.environ.get(COURSE_ENV):
        candidates.append(Path(os.environ[COURSE_ENV]) / "exercises")
    candidates.append(Path(__file__).resolve().parents[2] / "course" / "exercises")  # a source checkout
    for c in candidates:
        if c.is_dir() and any(c.glob("[0-9][0-9]_*.ipynb")):
            return c
    raise SourcesNotFound(
        "the exercise sources with solutions are instructor material and are not part of the installed package; "
        "use a source checkout of lora_edu (they are in course/exercises/), or point --source or "
        f"{COURSE_ENV} at a folder that has them. Students get their copies from docs/student_handout/ or from you.")


def source_notebooks(source: str | os.PathLike | None = None) -> list[Path]:
    return sorted(exercise_dir(source).glob("[0-9][0-9]_*.ipynb"))


def read_notebook(path: str | os.PathLike) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def notebook_exercise(nb: dict) -> str | None:
    meta = nb.get("metadata") if isinstance(nb, dict) else None
    meta = meta.get("lora_edu") if isinstance(meta, dict) else None
    ex = meta.get("exercise") if isinstance(meta, dict) else None
    return ex if isinstance(ex, str) else None


def cell_source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else str(src)


def code_cells(nb: dict) -> list[str]:
    """The sources of the code cells, in order (cell k is shown by Jupyter as ``In [k+1]`` after Restart & Run All)."""
    return [cell_source(c) for c in nb.get("cells", []) if isinstance(c, dict) and c.get("cell_type") == "code"]


def _strip_region(source: str, begin: str, end: str, replacement) -> str:
    out: list[str] = []
    inside = False
    for line in source.splitlines(keepends=True):
        stripped = line.strip()
        if stripped.startswith(begin):
            if inside:
                raise ValueError(f"nested {begin!r} in:\n{source}")
            inside = True
            indent = line[: len(line) - len(line.lstrip())]
            out.append(replacement(indent))
            continue
        if stripped.startswith(end):
            if not inside:
                raise ValueError(f"{end!r} without {begin!r} in:\n{source}")
            inside = False
            continue
        if not inside:
            out.append(line)
    if inside:
        raise ValueError(f"{begin!r} without {end!r} in:\n{source}")
    text = "".join(out)
    return text[:-1] if text.endswith("\n") and not source.endswith("\n") else text


def strip_solutions(source: str, markdown: bool = False) -> str:
    """Replace each BEGIN/END SOLUTION region of ``source`` with a stub."""
    stub = (lambda ind: f"{ind}YOUR ANSWER HERE\n") if markdown else (lambda ind: f"{ind}# YOUR CODE HERE\n{ind}{STUB}\n")
    return _strip_region(source, BEGIN, END, stub)


def strip_hidden_tests(source: str) -> str:
    """Remove each BEGIN/END HIDDEN TESTS region (markers included)."""
    return _strip_region(source, BEGIN_HIDDEN, END_HIDDEN, lambda ind: "")


def has_solutions(nb: dict) -> bool:
    return any(BEGIN in cell_source(c) for c in nb.get("cells", []))


def make_student_notebook(nb: dict) -> dict:
    """A student copy of a source notebook: solutions stubbed, hidden tests removed, outputs cleared."""
    nb = copy.deepcopy(nb)
    for cell in nb.get("cells", []):
        src = cell_source(cell)
        if BEGIN in src or END in src:
            src = strip_solutions(src, markdown=cell.get("cell_type") == "markdown")
        if BEGIN_HIDDEN in src or END_HIDDEN in src:
            src = strip_hidden_tests(src)
        cell["source"] = src
        cell.get("metadata", {}).pop("nbgrader", None)
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
    meta = nb.setdefault("metadata", {}).setdefault("lora_edu", {})
    meta["student_copy"] = True
    return nb


# ----------------------------------------------------------------------------- nbgrader


def nbgrader_cell_metadata(nb: dict, points: dict[str, float]) -> dict:
    """The source notebook with nbgrader's metadata on every cell (schema 3).

    Solution cells (a ``### BEGIN SOLUTION`` region) are editable answer cells; the
    graded cell (``# GRADED CELL``) is a read-only grade cell worth the exercise's
    points (``points[exercise]``) whose hidden test prints the feedback and returns the
    points earned (nbgrader's partial credit); every other cell is read-only, so
    ``nbgrader autograde`` restores it from the release version.
    """
    nb = copy.deepcopy(nb)
    exercise = notebook_exercise(nb) or "exercise"
    n = 0
    for cell in nb.get("cells", []):
        src = cell_source(cell)
        n += 1
        grade_id = f"{exercise}_{n:02d}"
        if BEGIN in src:
            meta = {"grade": False, "grade_id": grade_id, "locked": False, "schema_version": 3, "solution": True}
            if cell.get("cell_type") == "markdown":
                meta.update(grade=True, points=0)
        elif cell.get("cell_type") == "code" and GRADED_MARKER in src:
            meta = {"grade": True, "grade_id": f"{exercise}_graded", "locked": True, "points": float(points[exercise]),
                    "schema_version": 3, "solution": False}
        else:
            meta = {"grade": False, "grade_id": grade_id, "locked": True, "schema_version": 3, "solution": False}
        cell.setdefault("metadata", {})["nbgrader"] = meta
    return nb


# ----------------------------------------------------------------------------- files


def write_notebook(nb: dict, path: str | os.PathLike) -> None:
    atomic_write_bytes(path, (json.dumps(nb, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))


def select(names: list[str] | None, source: str | os.PathLike | None = None) -> list[Path]:
    """Source notebooks whose exercise name or file stem matches ``names`` (all when empty)."""
    paths = source_notebooks(source)
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
                 overwrite: bool = False, source: str | os.PathLike | None = None) -> list[Path]:
    """Write student copies (or, with ``solutions=True``, the full sources) into ``out_dir``."""
    out_dir = Path(out_dir)
    written = []
    chosen = select(names, source)
    for src in chosen:
        dest = out_dir / src.name
        if dest.exists() and not overwrite:
            raise FileExistsError(f"{dest} exists; pass --force to overwrite")
    for src in chosen:
        nb = read_notebook(src)
        dest = out_dir / src.name
        write_notebook(nb if solutions else make_student_notebook(nb), dest)
        written.append(dest)
    return written


_MAGIC = re.compile(r"^\s*[%!]", re.M)


def solution_namespace(name: str, source: str | os.PathLike | None = None) -> dict:
    """Execute a *source* notebook's code cells (our own, trusted solutions) except the check cells.

    For tests and instructors: returns the notebook's global namespace.
    """
    path = select([name], source)[0]
    ns: dict = {"__name__": "__main__"}
    for cell in read_notebook(path)["cells"]:
        if cell.get("cell_type") != "code":
            continue
        src = cell_source(cell)
        if SELF_CHECK_MARKER in src or GRADED_MARKER in src:
            continue
        src = _MAGIC.sub("pass  # ", src)
        exec(compile(src, f"<{path.name}>", "exec"), ns)  # noqa: S102 - our own source notebooks
    return ns
