"""The main job runs end to end (at a tiny size) and writes what it says it writes."""
import json

import pytest

from lora_edu import cli
from lora_edu.lab.pretrain import available_checkpoints


@pytest.mark.skipif("gpt-tiny" not in available_checkpoints(), reason="needs the shipped gpt-tiny checkpoint")
def test_tour_tiny(tmp_path, capsys):
    out = tmp_path / "tour"
    rc = cli.main(["tour", "--steps", "4", "--out", str(out), "--quiet", "--device", "cpu"])
    text = capsys.readouterr().out
    assert rc == 0, text
    for step in ("1. Count parameters", "2. LoRA fine-tuning", "3. Full fine-tuning", "4. Merge", "5. Save", "6. Summary"):
        assert step in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["merge"]["passed"] is True
    assert summary["adapter_bytes"] < summary["full_model_bytes"] / 5
    assert {r["model"] for r in summary["rows"]} == {"base (pretrained)", "LoRA r=8", "full fine-tuning"}
    for name in ("adapter.safetensors", "full_model.safetensors", "tour_loss_curves.png", "tour_delta_W_spectra.png"):
        assert (out / name).stat().st_size > 0


def test_cli_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    for sub in ("tour", "pretrain"):
        assert sub in text
