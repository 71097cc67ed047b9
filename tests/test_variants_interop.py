"""DoRA and PiSSA against the real PEFT (0.21): same weights in, same outputs and factors out.

* DoRA: PEFT ``use_dora=True`` folders load into lora_edu and lora_edu's load into PEFT, outputs
  equal to float32 rounding; merged weights equal ``merge_and_unload``'s; m initialised alike;
  GPT-2's transposed ``Conv1D`` too.
* PiSSA: ``init_lora_weights="pissa"`` gives the same A, B (up to the sign of each singular pair)
  and the same residual base; PEFT's conversion (``path_initial_model_for_weight_conversion``)
  and lora_edu's give the same plain LoRA adapter on the original base.
"""
import copy

import pytest
import torch
import torch.nn as nn

import lora_edu
from lora_edu.variants import DoRALinear, add_dora, add_pissa, apply_converted, pissa_to_lora

peft = pytest.importorskip("peft")

TOL32 = 1e-6  # relative, float32: a few ulps of different summation orders (measured: 1.6e-7 and 2.3e-7 relative, 3.6e-7 and 1.2e-6 absolute)


def rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(16, 12)
        self.v = nn.Linear(12, 16, bias=False)

    def forward(self, x):
        return self.v(torch.relu(self.q(x)))


def toy():
    torch.manual_seed(0)
    return Toy(), torch.randn(5, 16)


def peft_dora(base, **cfg):
    cfg = {"r": 4, "lora_alpha": 8, "target_modules": ["q", "v"], "use_dora": True, "init_lora_weights": False, **cfg}
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    with torch.no_grad():  # m away from its init, so the test sees it
        for n, p in pm.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.5 * torch.rand_like(p))
    return pm


def test_dora_m_is_initialised_like_peft():
    base, x = toy()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], use_dora=True))
    ours = add_dora(copy.deepcopy(base), ["q", "v"], r=4, alpha=8)
    sd = pm.state_dict()
    for n in ("q", "v"):
        assert torch.equal(ours.get_submodule(n).m, sd[f"base_model.model.{n}.lora_magnitude_vector.default.weight"])


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_dora_folder_loads_and_our_save_loads_in_peft(tmp_path, rslora):
    base, x = toy()
    pm = peft_dora(base, use_rslora=rslora)
    pm.save_pretrained(tmp_path / "peft")
    ours = lora_edu.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert isinstance(ours.q, DoRALinear) and isinstance(ours.v, DoRALinear)
    with torch.no_grad():
        assert rel(ours(x), pm(x)) < TOL32
    lora_edu.save_adapter(ours, tmp_path / "ours", format="peft")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    with torch.no_grad():
        assert rel(back(x), ours(x)) < TOL32
    # merged: W' written into W, as PEFT's merge_and_unload
    merged = back.merge_and_unload()
    lora_edu.merge_lora(ours)
    for n in ("q", "v"):
        assert (merged.get_submodule(n).weight - ours.get_submodule(n).base.weight).abs().max() < TOL32


def test_peft_in_memory_state_dict_keys_are_understood(tmp_path):
    """A PeftModel.state_dict() (…lora_magnitude_vector.default.weight) written as a folder loads too."""
    import json

    import safetensors.torch

    base, x = toy()
    pm = peft_dora(base)
    pm.save_pretrained(tmp_path / "p")
    sd = {k: v for k, v in pm.state_dict().items() if "lora_" in k}
    safetensors.torch.save_file(sd, tmp_path / "p" / "adapter_model.safetensors")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True
    ours = lora_edu.load_adapter(copy.deepcopy(base), tmp_path / "p")
    with torch.no_grad():
        assert rel(ours(x), pm(x)) < TOL32


def test_dora_on_gpt2_conv1d_matches_peft(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16)
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(cfg).eval()
    pm = peft_dora(base, target_modules=["c_attn"], fan_in_fan_out=True)
    pm.save_pretrained(tmp_path / "g")
    ours = lora_edu.load_adapter(copy.deepcopy(base), tmp_path / "g")
    assert ours.transformer.h[0].attn.c_attn.fan_in_fan_out
    ids = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        assert (ours(ids).logits - pm(ids).logits).abs().max() < 1e-5


def test_a_dora_folder_into_a_plain_lora_layer_is_refused(tmp_path):
    base, _ = toy()
    peft_dora(base).save_pretrained(tmp_path / "p")
    model = lora_edu.add_lora(copy.deepcopy(base), ["q", "v"], r=4, alpha=8)
    with pytest.raises(lora_edu.AdapterFileError, match="carries plain LoRA adapters but the file stores a DoRA adapter"):
        lora_edu.load_adapter(model, tmp_path / "p")


# ------------------------------------------------------------------------------------------------ PiSSA


def sign_align(ours, theirs, dim):
    """Flip the singular pairs of ``theirs`` to ``ours``' signs (an SVD fixes each pair only up to ±1)."""
    s = torch.sign((ours * theirs).sum(dim=dim))
    return theirs * (s[:, None] if dim == 1 else s[None, :])


def test_pissa_init_matches_peft_up_to_signs():
    base, x = toy()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"],
                                                                    init_lora_weights="pissa"))
    ours = add_pissa(copy.deepcopy(base), ["q", "v"], r=4, alpha=8)
    sd = pm.state_dict()
    for n in ("q", "v"):
        layer = ours.get_submodule(n)
        A, B = sd[f"base_model.model.{n}.lora_A.default.weight"], sd[f"base_model.model.{n}.lora_B.default.weight"]
        assert (layer.A - sign_align(layer.A, A, 1)).abs().max() < 1e-5
        assert (layer.B - sign_align(layer.B.T, B.T, 1).T).abs().max() < 1e-5
        assert (layer.base.weight - sd[f"base_model.model.{n}.base_layer.weight"]).abs().max() < 1e-5
    with torch.no_grad():
        assert rel(ours(x), pm(x)) < TOL32


def test_pissa_conversion_matches_peft(tmp_path):
    base, x = toy()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"],
                                                                    init_lora_weights="pissa"))
    ours = add_pissa(copy.deepcopy(base), ["q", "v"], r=4, alpha=8)
    with torch.no_grad():  # same A, B in both (PEFT's), then the same "training" step
        sd = pm.state_dict()
        for n in ("q", "v"):
            layer = ours.get_submodule(n)
            layer.A.copy_(sd[f"base_model.model.{n}.lora_A.default.weight"])
            layer.B.copy_(sd[f"base_model.model.{n}.lora_B.default.weight"])
            layer.pissa_initial["default"] = (layer.A.detach().clone(), layer.B.detach().clone())
            layer.base.weight.copy_(sd[f"base_model.model.{n}.base_layer.weight"])
    pm.peft_config["default"].init_lora_weights = True  # PEFT's documented recipe: save the initial adapter first
    pm.save_pretrained(tmp_path / "init")
    pm.peft_config["default"].init_lora_weights = "pissa"
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for (n, p), (_, q) in zip(
            [(n, p) for n, p in pm.named_parameters() if "lora_" in n],
            [(n, p) for n, p in ours.named_parameters() if "lora_" in n],
        ):
            step = 0.05 * torch.randn(p.shape, generator=g)
            p.add_(step)
            q.add_(step)
    pm.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    theirs = lora_edu.load_adapter(copy.deepcopy(base), tmp_path / "converted")
    mine = apply_converted(copy.deepcopy(base), pissa_to_lora(ours))
    with torch.no_grad():
        assert rel(mine(x), theirs(x)) < TOL32
        assert rel(mine(x), pm(x)) < TOL32  # and both equal the trained PiSSA model
    for n in ("q", "v"):
        assert mine.get_submodule(n).r == theirs.get_submodule(n).r == 8
        assert (mine.get_submodule(n).A - theirs.get_submodule(n).A).abs().max() == 0
