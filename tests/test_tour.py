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


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "0"], "--steps must be at least 1"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--r", "0"], "r must be a positive int"),
        (["--alpha", "-1"], "alpha must be > 0"),
        (["--targets", "nope"], "target 'nope' matches no module"),
        (["--model", "nope"], "no checkpoint 'nope'"),
    ],
)
def test_tour_bad_input_is_one_line_and_creates_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "never"
    rc = cli.main(["tour", "--out", str(out), "--quiet", "--device", "cpu", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("lora-edu tour: error: ") and message in err and "\n" not in err
    assert not out.exists()


def test_pretrain_never_writes_into_the_package_by_default(tmp_path, capsys, monkeypatch):
    from lora_edu.lab import pretrain

    shipped = {p: p.stat().st_mtime_ns for p in __import__("pathlib").Path(pretrain.CHECKPOINT_DIR).iterdir()}
    rc = cli.main(["pretrain", "gpt-tiny", "--steps", "0"])
    assert rc == 2 and "--steps must be at least 1" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    parser = cli.build_parser()
    assert parser.parse_args(["pretrain"]).out_dir == "checkpoints"  # relative to the working folder, not the package
    assert shipped == {p: p.stat().st_mtime_ns for p in __import__("pathlib").Path(pretrain.CHECKPOINT_DIR).iterdir()}


def test_unusable_device_is_a_clear_error(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the error path is for machines without it")
    out = tmp_path / "never"
    assert cli.main(["tour", "--device", "cuda", "--out", str(out)]) == 2
    assert "no usable CUDA GPU" in capsys.readouterr().err and not out.exists()
    assert cli.main(["tour", "--device", "tpu", "--out", str(out)]) == 2
    assert "unknown device 'tpu'" in capsys.readouterr().err and not out.exists()
