"""LoRA on Hugging Face transformers models built from a config (no download): GPT-2, LLaMA, ViT.

GPT-2 exercises the transposed ``Conv1D`` (``LoRALinear(fan_in_fan_out=True)``), LLaMA the
``q_proj``/``v_proj`` Linear layers, ViT a vision model with a new classifier head
(``modules_to_save`` in PEFT, ``trainable_modules`` in lora_edu).  Each family:
``add_lora`` with the default targets, a few training steps, merge, the equivalence
check, and agreement with PEFT in both directions (``MAXDIFF`` lines with ``pytest -s``).
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn as nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from transformers.pytorch_utils import Conv1D  # noqa: E402

import lora_edu  # noqa: E402
from lora_edu.adapters.hf import DEFAULT_TARGETS, default_targets  # noqa: E402

pytestmark = [pytest.mark.interop, pytest.mark.filterwarnings("ignore::UserWarning")]

TOL = 1e-5


def build(family: str):
    """(model, example input, loss function, extra trainable modules) for a tiny model of ``family``."""
    torch.manual_seed(0)
    T = transformers
    if family == "gpt2":
        cfg = T.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model, x = T.GPT2LMHeadModel(cfg), torch.randint(0, 64, (2, 12))
    elif family == "llama":
        cfg = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=64, max_position_embeddings=32, bos_token_id=0,
                            eos_token_id=0, pad_token_id=0)
        model, x = T.LlamaForCausalLM(cfg), torch.randint(0, 64, (2, 12))
    elif family == "vit":
        cfg = T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
                          patch_size=4, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        model, x = T.ViTForImageClassification(cfg), torch.randn(2, 3, 16, 16)
    else:
        raise ValueError(family)
    model.eval()
    if family == "vit":
        labels = torch.tensor([0, 2])
        return model, x, (lambda m: m(pixel_values=x, labels=labels).loss), ["classifier"]
    return model, x, (lambda m: m(input_ids=x, labels=x).loss), []


FAMILIES = ["gpt2", "llama", "vit"]


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def report(case: str, value: float) -> None:
    print(f"MAXDIFF {case} {value:.3e}")


def train(model, loss_fn, steps=3, lr=1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    for _ in range(steps):
        loss = loss_fn(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


# ---------------------------------------------------------------------------------------- Conv1D


def test_lora_conv1d_is_lora_linear_on_the_transposed_weight():
    torch.manual_seed(0)
    conv = Conv1D(nf=12, nx=8)  # weight (in=8, out=12)
    lin = nn.Linear(8, 12)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.T)
        lin.bias.copy_(conv.bias)
    a, b = lora_edu.LoRALinear(conv, r=3, alpha=6, fan_in_fan_out=True), lora_edu.LoRALinear(lin, r=3, alpha=6)
    with torch.no_grad():
        b.A.copy_(a.A)
        a.B.normal_()
        b.B.copy_(a.B)
    x = torch.randn(5, 8)
    assert a.A.shape == (3, 8) and a.B.shape == (12, 3)  # same orientation as LoRALinear / PEFT
    assert a.delta_weight().shape == conv.weight.shape == (8, 12)  # ΔW laid out like W_conv: (in, out)
    assert torch.allclose(a.delta_weight(), b.delta_weight().T)
    assert torch.allclose(a(x), b(x), atol=1e-6)
    y = a(x)
    a.merge()
    assert torch.allclose(a(x), y, atol=1e-6)
    a.unmerge()
    # and the kaiming bound uses fan_in = in (not r)
    assert a.A.abs().max() <= 1 / 8**0.5


def test_default_targets():
    gpt2, _, _, _ = build("gpt2")
    assert default_targets(gpt2) == ["c_attn"] == default_targets("gpt2")
    assert DEFAULT_TARGETS["llama"] == ["q_proj", "v_proj"]
    with pytest.raises(KeyError, match="no default LoRA targets for model_type 'nope'"):
        default_targets("nope")
    with pytest.raises(ValueError, match="has no config.model_type"):
        default_targets(nn.Linear(2, 2))


def test_default_targets_equal_peft_table():
    """Every model type PEFT maps gets PEFT's own choice (its table is the oracle)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_table

    for model_type, targets in peft_table.items():
        expected = [targets] if isinstance(targets, str) else list(targets)
        assert default_targets(model_type) == expected, model_type


@pytest.mark.parametrize(
    "model_type, make",
    [
        ("mistral", lambda T: T.MistralConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                                    intermediate_size=64, vocab_size=64)),
        ("qwen2", lambda T: T.Qwen2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                                intermediate_size=64, vocab_size=64)),
        ("gpt_neox", lambda T: T.GPTNeoXConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=64)),
        ("bert", lambda T: T.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=64)),
        ("t5", lambda T: T.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, vocab_size=64)),
        ("distilbert", lambda T: T.DistilBertConfig(dim=32, n_layers=1, n_heads=4, hidden_dim=64, vocab_size=64)),
    ],
)
def test_default_targets_name_real_layers(model_type, make):
    """The names in DEFAULT_TARGETS exist in transformers' current module trees (they get renamed: ViT did in 5.x)."""
    model = transformers.AutoModel.from_config(make(transformers))
    assert model.config.model_type == model_type
    assert lora_edu.find_targets(model, default_targets(model))


# ------------------------------------------------------------------------------- lora_edu alone


@pytest.mark.parametrize("family", FAMILIES)
def test_add_lora_train_merge(family):
    model, x, loss_fn, extra = build(family)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    before = logits(model, x)
    lora_edu.add_lora(model, default_targets(model), r=4, alpha=8, trainable_modules=extra)
    assert torch.equal(logits(model, x), before)  # B = 0: no-op at init
    n_layers = len(list(lora_edu.lora_layers(model)))
    assert n_layers == {"gpt2": 2, "llama": 4, "vit": 4}[family]
    loss0 = loss_fn(model).item()
    train(model, loss_fn, steps=5)
    assert loss_fn(model).item() < loss0
    # only A, B (and the new head) moved
    for k, v in model.state_dict().items():
        base_key = k.replace(".base.", ".")
        if "lora_" not in k and not k.endswith("._extra_state") and not any(k.startswith(m + ".") for m in extra):
            assert torch.equal(v, base_state[base_key]), k
    report_ = lora_edu.check_merge_equivalence(model, x)
    report(f"merge equivalence {family} (rel)", report_.rel_error)
    assert report_.passed, str(report_)


# --------------------------------------------------------------------------------------- vs PEFT


# rsLoRA's scale is model-independent (both rules on every case of tests/test_peft_interop.py);
# here each family gets one rule and GPT-2's Conv1D both, to keep the CI budget.
@pytest.mark.parametrize(
    "family, rslora", [("gpt2", False), ("gpt2", True), ("llama", True), ("vit", False)], ids=lambda v: str(v)
)
def test_against_peft_both_ways(tmp_path, family, rslora):
    peft = pytest.importorskip("peft")
    base, x, loss_fn, extra = build(family)
    targets = default_targets(base)

    # lora_edu (trained a few steps) -> PEFT
    ours = lora_edu.add_lora(copy.deepcopy(base), targets, r=4, alpha=8, rslora=rslora, trainable_modules=extra)
    train(ours, loss_fn, steps=3)
    lora_edu.save_adapter(ours, tmp_path / "ours", format="peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    d1 = (logits(ours, x) - logits(theirs, x)).abs().max().item()
    report(f"lora_edu->peft {family} rslora={rslora}", d1)
    assert (logits(ours, x) - logits(base, x)).abs().max() > 1e-4
    assert d1 <= TOL

    # PEFT (random init) -> lora_edu
    torch.manual_seed(1)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_rslora=rslora, init_lora_weights=False,
                          modules_to_save=extra or None)
    peft_model = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    peft_model.save_pretrained(tmp_path / "theirs")
    loaded = lora_edu.load_adapter(copy.deepcopy(base), tmp_path / "theirs").eval()
    d2 = (logits(peft_model, x) - logits(loaded, x)).abs().max().item()
    report(f"peft->lora_edu {family} rslora={rslora}", d2)
    assert (logits(peft_model, x) - logits(base, x)).abs().max() > 1e-4
    assert d2 <= TOL

    # merged weights: PEFT's merge_and_unload vs lora_edu's merge + unload
    merged_peft = peft_model.merge_and_unload().state_dict()
    merged_ours = lora_edu.unload_lora(loaded, merge=True).state_dict()
    assert merged_peft.keys() == merged_ours.keys()
    d3 = max((merged_peft[k] - merged_ours[k]).abs().max().item() for k in merged_peft)
    report(f"merged weights {family} rslora={rslora}", d3)
    assert d3 <= TOL
    assert max((merged_ours[k] - base.state_dict()[k]).abs().max().item() for k in merged_ours) > 1e-4
