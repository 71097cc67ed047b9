"""One place where notebooks, the tour and scripts save their figures.

``save_figure(fig, "rank_vs_quality")`` writes ``<repo>/figures/rank_vs_quality.png``:

* the repo root is found by walking up from the current working directory (a
  Jupyter kernel runs in ``notebooks/``) to the first folder that holds both
  ``pyproject.toml`` and ``lora_edu/``; then from this file's location (an
  editable install); an explicit ``folder=`` always wins;
* the PNG bytes are stable: fixed dpi, no ``Software`` text chunk (the one
  piece of PNG metadata that changes with the matplotlib version), Agg
  rendering — so re-running a notebook does not dirty ``git status``;
* the write is atomic (temporary file in the same folder, then ``os.replace``),
  so an interrupted run never leaves a half-written figure behind.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

from lora_edu.atomic import atomic_write_bytes

__all__ = ["DPI", "find_repo_root", "figures_folder", "save_figure"]

DPI = 110  # one dpi for every committed figure


def _is_repo_root(path: Path) -> bool:
    return (path / "pyproject.toml").is_file() and (path / "lora_edu").is_dir()


def find_repo_root(start: str | os.PathLike[str] | None = None) -> Path | None:
    """The first folder at or above ``start`` (default: the cwd, then this file) holding pyproject.toml and lora_edu/."""
    starts = [Path(start)] if start is not None else [Path.cwd(), Path(__file__).resolve().parent]
    for s in starts:
        s = s.resolve()
        for candidate in (s, *s.parents):
            if _is_repo_root(candidate):
                return candidate
    return None


def figures_folder(folder: str | os.PathLike[str] | None = None) -> Path:
    """``folder`` if given, else ``<repo root>/figures``; created if missing."""
    if folder is None:
        root = find_repo_root()
        if root is None:
            raise FileNotFoundError(
                "could not find the lora_edu repository (a folder with pyproject.toml and lora_edu/) "
                "above the current directory; pass folder=... to save_figure"
            )
        path = root / "figures"
    else:
        path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_figure(fig, name: str, folder: str | os.PathLike[str] | None = None, *, dpi: int = DPI) -> Path:
    """Save matplotlib ``fig`` as ``<folder>/<name>.png`` with stable bytes, atomically; return the path.

    ``name`` is a file stem (``"phi_heatmap"``) or a ``.png`` file name; no folders.
    """
    stem = Path(name)
    if stem.name != name or name in ("", ".", ".."):
        raise ValueError(f"name must be a plain file name without folders, got {name!r}")
    if stem.suffix not in ("", ".png"):
        raise ValueError(f"save_figure writes PNG only, got {name!r}")
    path = figures_folder(folder) / (stem.stem + ".png")

    buffer = io.BytesIO()
    fig.savefig(
        buffer,
        format="png",
        dpi=dpi,
        metadata={"Software": None},  # the only non-deterministic PNG chunk
        facecolor="white",
        bbox_inches="tight",
    )
    atomic_write_bytes(path, buffer.getvalue())
    return path
