"""The benchmark scripts run end to end at a tiny size on CPU, so they cannot rot."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_bench_lora_tiny_cpu(tmp_path):
    import bench_lora

    res = bench_lora.main(["--size", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--no-peft", "--no-ablations",
                           "--out-dir", str(tmp_path), "--name", "tiny"])
    names = [r["name"] for r in res["rows"]]
    for expected in ("full fine-tuning", "frozen floor", "lora_edu r=8 q,v", "lora_edu r=8 all linear",
                     "lora_edu r=64 all linear", "inference: base model", "inference: lora_edu unmerged (r=8 all)",
                     "inference: lora_edu merged"):
        assert expected in names
    assert all(r["ms"] > 0 for r in res["rows"])
    assert res["check"]["fast_vs_general_rel"] < 1e-5
    data = json.loads((tmp_path / "tiny.json").read_text())
    assert data["meta"]["torch"] == res["meta"]["torch"]
    md = (tmp_path / "tiny.md").read_text()
    assert "frozen floor" in md and "× floor" in md


def test_ddp_report_renders(tmp_path):
    import ddp_lora

    run = dict(meta=dict(date="d", torch="t", device_name="GPU", world=1, batch=1, seq=2, steps=3, model="m"),
               results=[dict(mode=m, world=1, ms=10.0, tokens_per_step=2, bytes_per_step=b, trainable_bytes=b,
                             max_grad_diff_across_ranks=0.0) for m, b in (("lora", 8), ("full", 800))])
    (tmp_path / "ddp_world1.json").write_text(json.dumps(run))
    text = ddp_lora.report(tmp_path, tmp_path / "out.md")
    assert "LoRA r=8 all linear" in text and (tmp_path / "out.md").exists()


def test_bench_lora_quick_tiny_cpu_with_mixed(tmp_path):
    """--quick (issue 15's rows: recompute_input, inference; compile pass skipped here) and bench_mixed.py into the same folder."""
    import bench_lora

    res = bench_lora.main(["--quick", "--no-compile", "--size", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0",
                           "--no-peft", "--out-dir", str(tmp_path), "--name", "tinyq"])
    names = [r["name"] for r in res["rows"]]
    assert bench_lora.RECOMPUTE_ROW in names and "inference: lora_edu merged" in names
    assert bench_lora.OP_COMPILE_ROW not in names  # a compile-only row, and the compile pass was skipped
    mixed = {r["name"]: r for r in res["mixed"]["rows"]}
    assert {"base model", "lora_edu: one adapter, unmerged", "lora_edu: adapter_batch, k = 16"} <= set(mixed)
    assert res["mixed"]["meta"]["exactness"] < 1e-5
    assert (tmp_path / "tinyq.md").exists() and (tmp_path / "mixed_cpu.md").exists()
    assert "adapter_batch, k = 4" in (tmp_path / "tinyq.md").read_text()
