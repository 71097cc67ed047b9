"""lora_edu <-> Hugging Face PEFT, checked against the real PEFT (the ``interop`` extra).

Oracle tests in the spirit of minGPT's Hugging Face comparison: the same base model,
the same adapter, two libraries — outputs must agree to float32 rounding (1e-5).
Each comparison prints ``MAXDIFF <case> <value>`` (run ``pytest -s`` to see them).
Transformers models (GPT-2's Conv1D, LLaMA, ViT) are in ``tests/test_hf_models.py``.
"""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.nn as nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

import lora_edu  # noqa: E402
from lora_edu import AdapterFileError  # noqa: E402
from lora_edu.adapters.peft import read_peft_config, to_peft_state_dict  # noqa: E402
from lora_edu.lab.models import GPT, GPTConfig  # noqa: E402

pytestmark = [pytest.mark.interop, pytest.mark.filterwarnings("ignore::UserWarning")]

TOL = 1e-5  # float32


class Toy(nn.Module):
    """Embedding -> Linear -> tanh -> Linear head: one layer of each kind LoRA supports, plus a head."""

    def __init__(self, vocab=11, dim=16, hidden=24, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, ids):
        return self.head(torch.tanh(self.proj(self.emb(ids))))  # (B, T) -> (B, T, classes)


def toy():
    torch.manual_seed(0)
    return Toy(), torch.randint(0, 11, (3, 5)), ["emb", "proj"]


def tiny_gpt():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=23, block_size=8, n_layer=2, n_head=2, d_model=32, d_ff=64))
    return model, torch.randint(0, 23, (2, 8)), ["tok_emb", "q_proj", "v_proj"]


MODELS = {"toy": toy, "gpt": tiny_gpt}


def randomize_adapters(model, seed=1, std=0.3):
    """Give A and B random values (B = 0 at init would make every comparison trivially pass)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_edu.lora_layers(model):
            for p in (layer.A, layer.B):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def max_diff(a, b) -> float:
    a = a.logits if hasattr(a, "logits") else a
    b = b.logits if hasattr(b, "logits") else b
    return (a.detach() - b.detach()).abs().max().item()


def report(case: str, value: float) -> None:
    print(f"MAXDIFF {case} {value:.3e}")


# ------------------------------------------------------------------------------ lora_edu -> PEFT


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha_over_r", "rslora"])
@pytest.mark.parametrize("which", ["toy", "gpt"])
def test_lora_edu_adapter_loads_in_peft_with_same_outputs(tmp_path, which, rslora):
    base, x, targets = MODELS[which]()
    model = lora_edu.add_lora(copy.deepcopy(base), targets, r=4, alpha=6, rslora=rslora)
    randomize_adapters(model)
    lora_edu.save_adapter(model, tmp_path / "a", format="peft")

    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
    model.eval()
    with torch.no_grad():
        d = max_diff(model(x), peft_model(x))
        moved = max_diff(model(x), base(x))
    report(f"lora_edu->peft {which} rslora={rslora}", d)
    assert moved > 1e-2, "the adapter must change the output, or the comparison proves nothing"
    assert d <= TOL
    assert peft_model.peft_config["default"].use_rslora is rslora


def test_saved_files_have_peft_layout(tmp_path):
    base, _, _ = toy()
    model = lora_edu.add_lora(base, ["emb", "proj"], r=2, alpha=4, trainable_modules=["head"])
    lora_edu.save_adapter(model, tmp_path / "a", format="peft")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 2 and cfg["lora_alpha"] == 4 and cfg["use_rslora"] is False
    assert cfg["target_modules"] == ["emb", "proj"] and cfg["modules_to_save"] == ["head"] and cfg["bias"] == "none"
    tensors, _ = to_peft_state_dict(model)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "base_model.model.emb.lora_embedding_A": (2, 11),  # (r, num_embeddings)
        "base_model.model.emb.lora_embedding_B": (16, 2),  # (dim, r)
        "base_model.model.proj.lora_A.weight": (2, 16),  # (r, in)
        "base_model.model.proj.lora_B.weight": (24, 2),  # (out, r)
        "base_model.model.head.weight": (3, 24),
        "base_model.model.head.bias": (3,),
    }
    # PEFT itself accepts the config
    assert LoraConfig.from_pretrained(str(tmp_path / "a")).target_modules == {"emb", "proj"}


def test_target_modules_fall_back_to_full_paths(tmp_path):
    """Only layer 0 adapted: the short name 'q_proj' would make PEFT adapt layer 1 too."""
    base, x, _ = tiny_gpt()
    model = lora_edu.add_lora(copy.deepcopy(base), ["blocks.0.attn.q_proj"], r=2, alpha=2)
    randomize_adapters(model)
    _, cfg = to_peft_state_dict(model)
    assert cfg["target_modules"] == ["blocks.0.attn.q_proj"]
    lora_edu.save_adapter(model, tmp_path / "a", format="peft")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
    with torch.no_grad():
        assert max_diff(model.eval()(x), peft_model(x)) <= TOL


# ------------------------------------------------------------------------------ PEFT -> lora_edu


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha_over_r", "rslora"])
@pytest.mark.parametrize("which", ["toy", "gpt"])
def test_peft_adapter_loads_in_lora_edu_with_same_outputs(tmp_path, which, rslora):
    base, x, targets = MODELS[which]()
    torch.manual_seed(2)
    cfg = LoraConfig(r=4, lora_alpha=6, target_modules=targets, use_rslora=rslora, init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(base), cfg).eval()
    peft_model.save_pretrained(tmp_path / "p")

    plain = lora_edu.load_adapter(copy.deepcopy(base), tmp_path / "p").eval()  # inject from the config
    prepared = lora_edu.add_lora(copy.deepcopy(base), targets, r=4, alpha=6, rslora=rslora)  # matching layers
    lora_edu.load_adapter(prepared, tmp_path / "p")
    with torch.no_grad():
        d_plain, d_prep = max_diff(peft_model(x), plain(x)), max_diff(peft_model(x), prepared.eval()(x))
        assert max_diff(peft_model(x), base(x)) > 1e-2
    report(f"peft(random)->lora_edu {which} rslora={rslora} plain", d_plain)
    report(f"peft(random)->lora_edu {which} rslora={rslora} prepared", d_prep)
    assert d_plain <= TOL and d_prep <= TOL
    assert all(l.adapters["default"].rslora is rslora for _, l in lora_edu.lora_layers(plain))
    trainable = {n for n, p in plain.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def _train_peft(peft_model, x, steps=5):
    opt = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for _ in range(steps):
        logits = peft_model(x)
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1) % logits.shape[-1])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return peft_model.eval()


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha_over_r", "rslora"])
def test_trained_peft_adapter_loads_in_lora_edu(tmp_path, rslora):
    base, x, targets = tiny_gpt()
    torch.manual_seed(3)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=targets, use_rslora=rslora, lora_dropout=0.1)
    peft_model = _train_peft(get_peft_model(copy.deepcopy(base), cfg), x)
    peft_model.save_pretrained(tmp_path / "p")
    model = lora_edu.load_adapter(copy.deepcopy(base), tmp_path / "p").eval()
    with torch.no_grad():
        d = max_diff(peft_model(x), model(x))
        assert max_diff(peft_model(x), base(x)) > 1e-3  # training moved B away from 0
    report(f"peft(trained)->lora_edu gpt rslora={rslora}", d)
    assert d <= TOL
    assert {l.adapters["default"].dropout for _, l in lora_edu.lora_layers(model) if isinstance(l, lora_edu.LoRALinear)} == {0.1}


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha_over_r", "rslora"])
def test_merged_weights_match_peft_merge_and_unload(tmp_path, rslora):
    base, x, targets = tiny_gpt()
    torch.manual_seed(4)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_rslora=rslora, init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(base), cfg)
    peft_model.save_pretrained(tmp_path / "p")
    model = lora_edu.load_adapter(copy.deepcopy(base), tmp_path / "p")
    merged_peft = peft_model.merge_and_unload().state_dict()
    merged_ours = lora_edu.unload_lora(model, merge=True).state_dict()
    assert merged_peft.keys() == merged_ours.keys()
    d = max(max_diff(merged_peft[k], merged_ours[k]) for k in merged_peft)
    report(f"merged weights gpt rslora={rslora}", d)
    assert d <= TOL
    assert max(max_diff(merged_ours[k], base.state_dict()[k]) for k in merged_ours) > 1e-2


def test_rank_and_alpha_patterns_round_trip(tmp_path):
    """PEFT with per-module r/α -> lora_edu -> PEFT format -> PEFT again: one function throughout."""
    base, x, targets = tiny_gpt()
    torch.manual_seed(5)
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
        rank_pattern={"blocks.1.attn.v_proj": 2, "tok_emb": 3}, alpha_pattern={"q_proj": 5},
    )
    peft_model = get_peft_model(copy.deepcopy(base), cfg).eval()
    peft_model.save_pretrained(tmp_path / "p")
    model = lora_edu.load_adapter(copy.deepcopy(base), tmp_path / "p").eval()
    layers = dict(lora_edu.lora_layers(model))
    assert layers["blocks.1.attn.v_proj"].r == 2 and layers["blocks.0.attn.v_proj"].r == 4 and layers["tok_emb"].r == 3
    assert layers["blocks.0.attn.q_proj"].alpha == 5 and layers["blocks.0.attn.v_proj"].alpha == 8
    lora_edu.save_adapter(model, tmp_path / "back", format="peft")
    again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "back").eval()
    with torch.no_grad():
        d1, d2 = max_diff(peft_model(x), model(x)), max_diff(peft_model(x), again(x))
    report("rank/alpha pattern peft->lora_edu", d1)
    report("rank/alpha pattern lora_edu->peft", d2)
    assert d1 <= TOL and d2 <= TOL


def test_modules_to_save_both_ways(tmp_path):
    base, x, _ = toy()
    model = lora_edu.add_lora(copy.deepcopy(base), ["proj"], r=2, alpha=4, trainable_modules=["head"])
    randomize_adapters(model)
    with torch.no_grad():
        model.head.weight.mul_(-2.0)  # a "trained" head
    lora_edu.save_adapter(model, tmp_path / "a", format="peft")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
    with torch.no_grad():
        d = max_diff(model.eval()(x), peft_model(x))
    assert d <= TOL
    # and back: PEFT's saved head lands in lora_edu, trainable, and is saved again with the adapter
    peft_model.save_pretrained(tmp_path / "p")
    back = lora_edu.load_adapter(copy.deepcopy(base), tmp_path / "p")
    assert back.head.weight.requires_grad and lora_edu.core.inject.trainable_modules_of(back, "default") == ["head"]
    with torch.no_grad():
        assert max_diff(back.eval()(x), peft_model(x)) <= TOL


def test_in_memory_adapter_name_infix_is_accepted(tmp_path):
    """A PeftModel's own state_dict keys carry the adapter name (…lora_A.default.weight); files don't."""
    import safetensors.torch

    base, x, targets = toy()
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "p")
    in_memory = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert any(".lora_A.default.weight" in k for k in in_memory)
    safetensors.torch.save_file(in_memory, tmp_path / "p" / "adapter_model.safetensors")
    model = lora_edu.load_adapter(copy.deepcopy(base), tmp_path / "p").eval()
    with torch.no_grad():
        assert max_diff(model(x), peft_model.eval()(x)) <= TOL


def test_load_under_another_name_and_switch(tmp_path):
    base, x, targets = toy()
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "p")
    model = lora_edu.add_lora(copy.deepcopy(base), targets, r=3, alpha=3)  # an unrelated adapter "default"
    lora_edu.load_adapter(model, tmp_path / "p", adapter="task")
    assert lora_edu.adapter_names(model) == ["default", "task"] and lora_edu.active_adapter(model) == "task"
    with torch.no_grad():
        assert max_diff(model.eval()(x), peft_model.eval()(x)) <= TOL


# ------------------------------------------------------------------------------ refusals


def _peft_folder(tmp_path, base, **cfg):
    cfg = {"r": 2, "lora_alpha": 4, "target_modules": ["proj"], "init_lora_weights": False, **cfg}
    get_peft_model(copy.deepcopy(base), LoraConfig(**cfg)).save_pretrained(tmp_path / "p")
    return tmp_path / "p"


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def _assert_untouched(model, before):
    assert not list(lora_edu.lora_layers(model)), "a failed load must not inject layers"
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize(
    "case, match",
    [
        ("dora_embedding", r"DoRA on embeddings is not implemented"),
        ("bias", r"bias='all' means the adapter also trained bias vectors"),
        ("peft_type", r"peft_type is 'LOHA'; lora_edu reads LoRA adapters only"),
        ("unknown_field", r"unrecognised setting\(s\) \['use_new_magic'\]"),
        ("wrong_shapes", r"needs A \(2, 16\) and B \(24, 2\)"),
        ("rank_pattern_mismatch", r"with r=5 this Linear .*Different model size, or wrong rank\?"),
        ("truncated", r"cannot read the tensors \(corrupt or truncated file\?\)"),
        ("missing_factor", r"'proj' has no B factor"),
        ("nan", r"contains NaN or inf values"),
        ("conv2d", r"'conv' is a Conv2d, a layer type lora_edu cannot put LoRA on"),
        ("not_targeted", r"which target_modules=\['head'\] does not select"),
        ("wrong_model", r"the model has no module 'proj'"),
        ("no_config", r"is a folder without adapter_config.json"),
    ],
)
def test_refuses_what_it_cannot_represent(tmp_path, case, match):
    base, _, _ = toy()
    model = copy.deepcopy(base)
    if case == "dora_embedding":  # DoRA on linear layers loads (tests/test_variants_interop.py); on embeddings it is refused
        folder = _peft_folder(tmp_path, base, use_dora=True, target_modules=["emb"])
    elif case == "conv2d":
        class WithConv(Toy):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(1, 2, 3)

        model = WithConv()
        folder = _peft_folder(tmp_path, model, target_modules=["proj", "conv"])
    elif case == "wrong_shapes":
        folder = _peft_folder(tmp_path, Toy(dim=20))
    elif case == "wrong_model":
        folder = _peft_folder(tmp_path, base)
        model = nn.Sequential(nn.Linear(16, 24))
    else:
        folder = _peft_folder(tmp_path, base)
    weights = folder / "adapter_model.safetensors"
    if case == "bias":
        _edit_config(folder, bias="all")
    elif case == "peft_type":
        _edit_config(folder, peft_type="LOHA")
    elif case == "unknown_field":
        _edit_config(folder, use_new_magic=True)
    elif case == "rank_pattern_mismatch":
        _edit_config(folder, rank_pattern={"proj": 5})
    elif case == "truncated":
        weights.write_bytes(weights.read_bytes()[:-40])
    elif case in ("missing_factor", "nan"):
        import safetensors.torch

        t = safetensors.torch.load_file(weights)
        if case == "missing_factor":
            del t["base_model.model.proj.lora_B.weight"]
        else:
            t["base_model.model.proj.lora_A.weight"][0, 0] = float("nan")
        safetensors.torch.save_file(t, weights)
    elif case == "not_targeted":
        _edit_config(folder, target_modules=["head"])
    elif case == "no_config":
        (folder / "adapter_config.json").unlink()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterFileError, match=match):
        lora_edu.load_adapter(model, folder)
    _assert_untouched(model, before)


def test_refuses_on_a_model_whose_adapter_has_another_scale(tmp_path):
    base, _, targets = toy()
    folder = _peft_folder(tmp_path, base, target_modules=targets, use_rslora=True)
    model = lora_edu.add_lora(copy.deepcopy(base), targets, r=2, alpha=4)  # α/r, not α/√r
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterFileError, match=r"scale alpha/r in the model but r=2, alpha=4, scale alpha/sqrt\(r\) in the file"):
        lora_edu.load_adapter(model, folder)
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_read_peft_config_accepts_dora(tmp_path):
    base, _, _ = toy()
    folder = _peft_folder(tmp_path, base, use_dora=True)
    (folder / "adapter_model.safetensors").unlink()
    assert read_peft_config(folder)["use_dora"] is True  # DoRA is lora_edu.variants.dora now


def test_save_refuses_mixed_scale_rules(tmp_path):
    base, _, _ = toy()
    model = lora_edu.add_lora(base, ["proj"], r=2, alpha=4)
    lora_edu.add_lora(model, ["emb"], r=2, alpha=4, rslora=True, adapter="default2")
    # a single adapter spread over layers with different scale rules cannot be one PEFT config
    layer = dict(lora_edu.lora_layers(model))["emb"]
    layer.delete_adapter("default2")
    layer.add_adapter("default", 2, 4, rslora=True)
    with pytest.raises(ValueError, match="mixes α/r and α/√r layers"):
        lora_edu.save_adapter(model, tmp_path / "x", format="peft", adapter="default")
    assert not (tmp_path / "x").exists()
