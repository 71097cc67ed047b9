"""Parameter counts from published shapes: the LoRA paper's numbers, exactly."""
import math

import pytest

from lora_edu.lab import architectures as arc
from lora_edu.lab.architectures import (
    GPT2_CONVENTIONS,
    GPT2_SMALL,
    GPT3_175B,
    LLAMA_7B,
    VIT_B16,
    checkpoint_bytes,
    format_bytes,
    lora_params,
    lora_params_breakdown,
    with_classifier,
)

# ----------------------------------------------------------------------------- LoRA paper, GPT-3 175B


def test_gpt3_r4_q_v_is_18_874_368():
    assert lora_params(GPT3_175B, 4, ["W_q", "W_v"]) == 18_874_368 == 96 * 2 * 4 * (12288 + 12288)
    assert lora_params("gpt3-175b", 4, ("q_proj", "v_proj")) == 18_874_368


def test_gpt3_reduction_about_9300x():
    x = arc.reduction_factor(GPT3_175B, 4, ("q", "v"))
    assert x == pytest.approx(175e9 / 18_874_368)
    assert round(x, -2) == 9_300  # the paper's "10,000x" is this, rounded up
    assert round(arc.reduction_factor(GPT3_175B, 4, ("q", "v"), published=False), -2) == 9_300


def test_gpt3_checkpoint_35MB_accounting():
    n = lora_params(GPT3_175B, 4, ("q", "v"))
    fp16 = checkpoint_bytes(n, "fp16")
    assert fp16 == 37_748_736 == 36 * 2**20  # exactly 36 MiB
    assert format_bytes(fp16) == "37.7 MB" and format_bytes(fp16, "MiB") == "36.0 MiB"
    # the paper's 350 GB is 175e9 fp16 parameters in decimal GB; its 35 MB is 350 GB / 10,000
    assert checkpoint_bytes(175e9, "fp16") == 350e9
    assert 350e9 / 10_000 / 1e6 == arc.PAPER_CHECKPOINT_MB
    # no storage width gives 35 MB or 35 MiB exactly
    assert not any(math.isclose(n * b, 35e6, rel_tol=0.01) or math.isclose(n * b, 35 * 2**20, rel_tol=0.01)
                   for b in set(arc.BYTES_PER_PARAM.values()))


# ----------------------------------------------------------------------------- GPT-2 small, 2,666,528


def test_gpt2_small_classifier_2_666_528():
    gpt2_cls = with_classifier(GPT2_SMALL, 2)
    # LLMs-from-scratch appendix E: its "Total trainable parameters before" for this model
    assert gpt2_cls.total_params() == 124_441_346
    per_layer = 4 * 16 * (768 + 768) + 16 * (768 + 3072) + 16 * (3072 + 768)
    assert per_layer == 221_184
    head = 16 * (768 + 2)
    assert lora_params(gpt2_cls, 16, "every_linear") == 12 * per_layer + head == 2_666_528
    assert lora_params_breakdown(gpt2_cls, 16, "every_linear")["head"] == 12_320


def test_gpt2_other_conventions_differ():
    gpt2_cls = with_classifier(GPT2_SMALL, 2)
    got = [lora_params(gpt2_cls, 16, t, train_head=h) for _, t, h in GPT2_CONVENTIONS]
    assert got == [2_666_528, 2_655_746, 2_371_616, 2_360_834]
    # fused c_attn 768 -> 2304: r (768 + 2304) per layer
    assert lora_params_breakdown(GPT2_SMALL, 16, "c_attn") == {"qkv_fused": 12 * 16 * (768 + 2304)}


# ----------------------------------------------------------------------------- totals vs published


@pytest.mark.parametrize(
    "arch, exact, rel",
    [
        (GPT2_SMALL, 124_439_808, 0.01),  # HF gpt2
        (LLAMA_7B, 6_738_415_616, 0.01),  # HF llama-7b
        (GPT3_175B, 174_604_259_328, 0.01),  # 12 d^2 + 13 d per layer, tied embeddings
        (VIT_B16, 86_567_656, 0.01),  # timm vit_base_patch16_224
    ],
)
def test_total_params(arch, exact, rel):
    assert arch.total_params() == exact
    assert arch.total_params() == pytest.approx(arch.published_total, rel=rel)
    assert sum(arch.breakdown().values()) == exact


def test_gpt3_block_is_12d2_plus_13d():
    d = 12288
    per_block = sum(lin.n_params for lin in GPT3_175B.block) + GPT3_175B.block_other
    assert per_block == 12 * d * d + 13 * d


# ----------------------------------------------------------------------------- targets


def test_targets_and_aliases():
    assert arc.resolve_targets(LLAMA_7B, "mlp") == ("gate", "up", "down")
    assert arc.resolve_targets(GPT2_SMALL, "mlp") == ("up", "down")  # no gate in GPT-2
    assert arc.resolve_targets(VIT_B16, ["W_q", "query", "v_proj"]) == ("q", "v")
    assert arc.resolve_targets(LLAMA_7B, "all_linear") == ("q", "k", "v", "o", "gate", "up", "down")
    assert arc.resolve_targets(LLAMA_7B, "every_linear")[-1] == "head"
    with pytest.raises(ValueError):
        arc.resolve_targets(GPT2_SMALL, ["c_attn", "q"])
    with pytest.raises(ValueError):
        arc.resolve_targets(GPT2_SMALL, "gate")


def test_lora_params_is_r_times_in_plus_out_and_linear_in_r():
    assert lora_params(LLAMA_7B, 8, "all_linear") == 32 * 8 * (4 * 8192 + 3 * (4096 + 11008))
    for a in arc.ARCHITECTURES.values():
        assert lora_params(a, 12, "attn") == 12 * lora_params(a, 1, "attn")
    assert lora_params(VIT_B16, 4, "head") == 4 * (768 + 1000)
    assert lora_params(VIT_B16, 4, "head", train_head=True) == 4 * (768 + 1000) + 769_000


# ----------------------------------------------------------------------------- memory and storage


def test_adam_memory_model():
    assert arc.full_finetune_memory(7e9).total == 112e9  # Biderman et al.: 7B -> 112 GB
    n_lora = lora_params(LLAMA_7B, 16, "all_linear")
    m = arc.lora_memory(LLAMA_7B.total_params(), n_lora, "bf16")
    assert m.total == 2 * LLAMA_7B.total_params() + 16 * n_lora
    assert 13e9 < m.total < 15e9  # "≈ 15 GB" before activations
    # LoRA's frozen fp16 GPT-3: 350 GB, the paper's LoRA training VRAM
    assert arc.lora_memory(175e9, 0, "fp16").total == 350e9


def test_many_tasks_storage():
    s = arc.many_tasks_storage(100, 350e9, 35e6)
    assert s["shared_base"] == 350e9 + 3.5e9 and s["full_copies"] == 35e12


def test_table_helpers():
    rows = arc.lora_table(ranks=(4,))
    gpt3 = next(r for r in rows if r["arch"] == "GPT-3 175B" and r["targets"] == "q+v")
    assert gpt3["trainable"] == 18_874_368 and gpt3["adapter_bytes"] == 37_748_736
    text = arc.format_table(rows)
    assert "18,874,368" in text and len(text.splitlines()) == 2 + len(rows)
