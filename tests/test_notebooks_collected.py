"""Every notebook in notebooks/ (and every exercise) is collected by the nbval run of ./dev.sh test."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def collected(folder: str, mode: str) -> set[str]:
    cmd = [sys.executable, "-m", "pytest", mode, "--nbval-current-env", "-p", "no:python", "-p", "no:cacheprovider",
           "--collect-only", "-q", folder]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300).stdout
    return {Path(line.split("::")[0]).name for line in out.splitlines() if "::" in line}


@pytest.mark.parametrize("folder, mode", [("notebooks", "--nbval"), ("course/exercises", "--nbval-lax")])
def test_every_notebook_is_collected(folder, mode):
    expected = {p.name for p in (ROOT / folder).glob("*.ipynb")}
    assert expected, f"no notebooks found in {folder}/"
    missing = expected - collected(folder, mode)
    assert not missing, f"nbval does not collect {sorted(missing)}: fix the notebook (valid JSON? cells?)"


def test_the_series_is_complete():
    names = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
    prefixes = {n[:2] for n in names}
    assert {f"{i:02d}" for i in range(1, 9)} <= prefixes, f"notebooks 01..08 expected, found {names}"
