"""benchmarks/study_gpu.py at its --tiny size on the CPU: the whole pipeline, the file it writes, its honesty fields."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_study_gpu_tiny_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("study_gpu", ROOT / "benchmarks" / "study_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    result = mod.main(["--tiny", "--device", "cpu", "--quiet", "--out-dir", str(tmp_path)])
    saved = json.loads((tmp_path / "study_gpu_tiny.json").read_text())
    assert saved["card"] == result["card"] and saved["torch"] and saved["config"]["seeds"] == [0, 1, 2]
    regimes = {(s["regime"], s["r"]) for s in saved["records"]} | {(x, None) for x in saved["skipped"]}
    assert ("full", None) in regimes and ("all", 1) in regimes and {("fixed", 4), ("2r", 4), ("rslora", 4)} <= regimes
    for s in saved["records"]:
        assert len(s["code_seeds"]) == 3 and len(s["prose_seeds"]) == 3 and len(s["lr_sweep"]) >= 3
        assert s["code_se"] >= 0 and s["lr_sweep"][f"{s['lr']:g}"] == min(s["lr_sweep"].values())
    assert "| method | regime |" in (tmp_path / "study_gpu_tiny.md").read_text()
