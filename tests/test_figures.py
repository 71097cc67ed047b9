"""save_figure: stable bytes, atomic writes, and the repo's figures/ folder found from any working directory."""
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from lora_edu.lab.figures import find_repo_root, save_figure  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _figure():
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([1, 2, 4, 8], [0.9, 0.5, 0.3, 0.28], marker="o", label="loss")
    ax.set_xscale("log", base=2)
    ax.set_title("rank vs loss")
    ax.legend()
    return fig


def test_saving_twice_gives_identical_bytes(tmp_path):
    fig = _figure()
    p1 = save_figure(fig, "stable", folder=tmp_path)
    b1 = p1.read_bytes()
    p2 = save_figure(fig, "stable.png", folder=tmp_path)
    assert p1 == p2 == tmp_path / "stable.png"
    assert p2.read_bytes() == b1
    fig2 = _figure()  # a fresh, identical figure too
    assert save_figure(fig2, "stable", folder=tmp_path).read_bytes() == b1
    plt.close(fig), plt.close(fig2)
    assert b1.startswith(b"\x89PNG") and b"Matplotlib" not in b1  # no version-dependent Software chunk
    assert sorted(os.listdir(tmp_path)) == ["stable.png"]  # no temp files left behind


def test_repo_root_found_from_subfolder(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO / "tests")  # a notebook kernel runs in a subfolder
    assert find_repo_root() == REPO
    assert find_repo_root(REPO / "lora_edu") == REPO
    assert find_repo_root(tmp_path) is None


def test_bad_names_rejected(tmp_path):
    fig = _figure()
    for bad in ("sub/fig", "../fig", "fig.pdf", ""):
        with pytest.raises(ValueError):
            save_figure(fig, bad, folder=tmp_path)
    plt.close(fig)


def test_failed_save_leaves_nothing(tmp_path):
    class Broken:
        def savefig(self, *a, **k):
            raise RuntimeError("boom")

    (tmp_path / "keep.png").write_bytes(b"old")
    with pytest.raises(RuntimeError):
        save_figure(Broken(), "keep", folder=tmp_path)
    assert (tmp_path / "keep.png").read_bytes() == b"old"  # the previous figure survives
    assert sorted(os.listdir(tmp_path)) == ["keep.png"]


def test_default_folder_is_repo_figures(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "lora_edu").mkdir()
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")
    fig = _figure()
    assert save_figure(fig, "from_notebook") == tmp_path / "figures" / "from_notebook.png"
    plt.close(fig)
