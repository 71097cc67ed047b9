"""lora_edu.lab.pretrain: the shipped checkpoints load and reproduce their recorded losses; the command runs end to end."""
import json
import math
import os

import pytest
import torch

from lora_edu.lab import data
from lora_edu.lab.models import GPT, ViT, ViTConfig
from lora_edu.lab.pretrain import CHECKPOINT_DIR, RECIPES, available_checkpoints, checkpoint_info, load_pretrained

SHIPPED = available_checkpoints()


def tasks_for(meta):
    if meta["model"] == "gpt":
        return data.lm_tasks(block_size=meta["config"]["block_size"])
    return data.image_tasks(seed=meta["seed"])


def test_all_recipes_are_shipped():
    assert set(SHIPPED) == set(RECIPES), f"run `lora-edu pretrain`; have {SHIPPED}"


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_checkpoint_reproduces_recorded_losses(name):
    meta = checkpoint_info(name)
    model = load_pretrained(name)
    assert not model.training and isinstance(model, GPT if meta["model"] == "gpt" else ViT)
    assert sum(p.numel() for p in model.parameters()) == meta["num_params"]
    source, target = tasks_for(meta)
    if meta["model"] == "gpt":
        corpus = data.corpus_info()
        if corpus["source"]["sha256"] != meta["task"]["corpus"]["source"]["sha256"]:
            pytest.skip(f"this Python's stdlib text differs from the one the checkpoint was made on ({meta['python']})")
    got = source.evaluate(model, "val")
    assert got["loss"] == pytest.approx(meta["final"]["source_val"]["loss"], abs=2e-3)
    tgt = target.evaluate(model, "val")
    assert tgt["loss"] == pytest.approx(meta["final"]["target_val"]["loss"], abs=2e-3)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_checkpoint_quality_and_domain_shift(name):
    meta = checkpoint_info(name)
    f = meta["final"]
    if meta["model"] == "gpt":
        assert f["source_val"]["loss"] < 2.3  # chance is ln(97) = 4.57 nats/char
        assert f["target_val"]["loss"] > f["source_val"]["loss"] + 0.3  # a real shift to adapt across
    else:
        assert f["source_val"]["acc"] > 0.9  # 6 classes, chance 1/6
        assert f["target_val"]["acc"] < 0.5
    for key in ("config", "recipe", "seed", "torch", "wall_time_s", "date", "sha256", "history"):
        assert key in meta
    size = os.path.getsize(os.path.join(CHECKPOINT_DIR, name + ".safetensors"))
    assert size == meta["file_bytes"] and size < (1_000_000 if "tiny" in name else 5_500_000)


def test_unknown_checkpoint_names_the_available_ones(tmp_path):
    with pytest.raises(FileNotFoundError, match="available"):
        load_pretrained("gpt-huge")
    with pytest.raises(FileNotFoundError, match="none"):
        load_pretrained("gpt-tiny", checkpoint_dir=str(tmp_path))


def test_pretrain_command_end_to_end(tmp_path, capsys):
    from lora_edu.cli import main

    out = str(tmp_path / "ckpt")
    assert main(["pretrain", "gpt-tiny", "vit-tiny", "--steps", "3", "--out-dir", out, "--quiet", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "gpt-tiny" in printed and "vit-tiny" in printed and "target val" in printed
    assert sorted(os.listdir(out)) == ["gpt-tiny.json", "gpt-tiny.safetensors", "vit-tiny.json", "vit-tiny.safetensors"]
    meta = json.load(open(os.path.join(out, "gpt-tiny.json")))
    assert meta["recipe"]["steps"] == 3 and len(meta["history"]) == 2
    model = load_pretrained("gpt-tiny", checkpoint_dir=out)
    source, _ = data.lm_tasks(block_size=model.config.block_size)
    assert source.evaluate(model, "val")["loss"] == pytest.approx(meta["final"]["source_val"]["loss"], abs=1e-5)
    assert math.isfinite(meta["final"]["target_val"]["loss"])
    assert main(["pretrain", "--list", "--out-dir", out]) == 0
    assert "present" in capsys.readouterr().out
    assert main(["pretrain", "nope", "--out-dir", out]) == 2


def test_save_checkpoint_is_atomic_and_overwrites(tmp_path):
    from lora_edu.lab.pretrain import save_checkpoint

    model = ViT(ViTConfig(n_layer=1, d_model=16, d_ff=16))
    meta = {"model": "vit", "config": model.config.to_dict()}
    save_checkpoint(model, dict(meta), "m", str(tmp_path))
    with torch.no_grad():
        model.head.weight.add_(1.0)
    save_checkpoint(model, dict(meta), "m", str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["m.json", "m.safetensors"]  # no temp files left behind
    loaded = load_pretrained("m", checkpoint_dir=str(tmp_path))
    torch.testing.assert_close(loaded.head.weight, model.head.weight)
