"""QLoRA (lora_edu.variants.qlora): LoRA on a frozen NF4 base, against float64 oracles.

Oracles: Ŵ = dequantize_nf4(q, float64) and the QLoRA eq. 5 forward x Ŵᵀ + b + s·x Aᵀ Bᵀ in
float64; requantize_merge_error (lora_edu.variants.nf4) for what merging would cost.
"""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lora_edu
from lora_edu.lab.models import GPT, GPTConfig
from lora_edu.variants import (
    MERGE_REFUSAL,
    NF4Linear,
    QLoRALinear,
    add_qlora,
    dequantize_nf4,
    merge_error,
    merge_into_dequantized,
    quantize_linears,
    stored_bytes,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def tiny_gpt(dtype=torch.float32):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=23, block_size=8, n_layer=2, n_head=2, d_model=64, d_ff=128)).to(dtype)


def randomize(model, std=0.05):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lora_edu.lora_layers(model):
            layer.B.copy_(torch.randn(layer.B.shape, generator=g) * std)


def test_forward_and_input_gradient_match_eq5_in_float64():
    torch.manual_seed(0)
    linear = nn.Linear(128, 32).double()
    layer = QLoRALinear(NF4Linear.from_linear(linear), r=4, alpha=8)
    with torch.no_grad():
        layer.B.normal_()
    W_hat = dequantize_nf4(layer.base.quantized(), torch.float64)  # (out, in)
    x = torch.randn(3, 128, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    expected = x @ W_hat.T + linear.bias + layer.scale * (x @ layer.A.T @ layer.B.T)
    assert (y - expected).abs().max() < 1e-12
    (gx,) = torch.autograd.grad(y.sum(), x)
    (gx_oracle,) = torch.autograd.grad(expected.sum(), x)
    assert (gx - gx_oracle).abs().max() < 1e-12


def test_quantize_then_add_lora_trains_only_the_adapter():
    model = tiny_gpt()
    quantize_linears(model, TARGETS)
    assert all(isinstance(model.get_submodule(f"blocks.{i}.attn.{t}"), NF4Linear) for i in range(2) for t in TARGETS)
    add_qlora(model, TARGETS, r=4, alpha=8)  # the NF4 layers are already quantised: only wrapped
    layers = dict(lora_edu.lora_layers(model))
    assert len(layers) == 8 and all(isinstance(layer, QLoRALinear) for layer in layers.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{f}.default" for n in layers for f in "AB"}
    assert {p.dtype for p in lora_edu.lora_parameters(model)} == {torch.float32}
    idx = torch.randint(0, 23, (2, 8))
    loss = F.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
    loss.backward()
    assert all(p.grad is not None for p in lora_edu.lora_parameters(model))
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


def test_lora_edu_add_lora_wraps_nf4_layers():
    model = quantize_linears(tiny_gpt(), TARGETS)
    lora_edu.add_lora(model, TARGETS, r=4, alpha=8)
    assert all(isinstance(layer, QLoRALinear) for _, layer in lora_edu.lora_layers(model))
    counts = lora_edu.count_parameters(model)
    assert counts.layers and all(c.shape == (64, 64) for c in counts.layers)


def test_adapter_dtype_follows_the_policy_on_a_bf16_base():
    model = add_qlora(tiny_gpt(torch.bfloat16), TARGETS, r=4, alpha=8)
    layer = model.blocks[0].attn.q_proj
    assert layer.A.dtype == torch.float32 and layer.base.compute_dtype == torch.bfloat16
    assert model(torch.randint(0, 23, (2, 8))).dtype == torch.bfloat16


def test_stored_bytes_shrink_to_about_4_bits_per_quantised_weight():
    model = tiny_gpt()
    before = stored_bytes(model)
    add_qlora(model, TARGETS, r=4, alpha=8)
    n_quantised = 8 * 64 * 64
    saved = before - stored_bytes(model)
    adapters = sum(p.nbytes for p in lora_edu.lora_parameters(model))
    # 32 bits -> 4.127 bits per quantised weight (QLoRA §3), plus the adapters
    assert saved == pytest.approx(n_quantised * (4 - (4.127 / 8)) - adapters, rel=0.02)


def test_merge_is_refused_with_what_to_do_and_nothing_changes():
    model = add_qlora(tiny_gpt(), TARGETS, r=4, alpha=8)
    randomize(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="cannot merge into a 4-bit NF4 base"):
        lora_edu.merge_lora(model)
    with pytest.raises(RuntimeError, match="merge_into_dequantized"):
        model.blocks[0].attn.q_proj.merge()
    assert "keep the adapter separate" in MERGE_REFUSAL.lower()
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_requantising_adds_an_error_of_the_order_of_delta_W_while_a_bf16_copy_keeps_it():
    model = add_qlora(tiny_gpt(), TARGETS, r=4, alpha=8)
    randomize(model, std=0.02)
    err = merge_error(model.blocks[0].attn.q_proj)
    assert err.requantized > 0.3  # a large share of ‖ΔW‖ is lost by re-quantising
    assert err.bf16 < 0.1 * err.requantized and err.fp32 < 1e-5


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_merge_into_dequantized_computes_the_adapted_model(dtype, tol):
    model = add_qlora(tiny_gpt(), TARGETS, r=4, alpha=8)
    randomize(model)
    idx = torch.randint(0, 23, (2, 8))
    with torch.no_grad():
        y = model(idx)
        merged = merge_into_dequantized(copy.deepcopy(model), dtype=dtype)
        assert not list(lora_edu.lora_layers(merged))
        assert type(merged.blocks[0].attn.q_proj) is nn.Linear and merged.blocks[0].attn.q_proj.weight.dtype == dtype
        # the rest of the model stays fp32; x is cast by a hook-free wrapper
        for i in range(2):
            for t in TARGETS:
                lin = merged.get_submodule(f"blocks.{i}.attn.{t}")
                merged.get_submodule(f"blocks.{i}.attn").__setattr__(t, _Cast(lin))
        y_merged = merged(idx)
    assert ((y_merged - y).abs().max() / y.abs().max()) < tol


class _Cast(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.to(self.inner.weight.dtype)).to(x.dtype)


def test_quantize_linears_validates_before_replacing():
    model = tiny_gpt()
    model.blocks[1].attn.o_proj = nn.Sequential(nn.Linear(64, 64))  # a container, not a Linear
    with pytest.raises(TypeError):
        quantize_linears(model, ["q_proj", "o_proj"])
    assert type(model.blocks[0].attn.q_proj) is nn.Linear  # nothing replaced
    tied = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10, bias=False))
    tied[1].weight = tied[0].weight
    with pytest.raises(ValueError, match="quantising would untie them"):
        quantize_linears(tied, ["1"])


def test_an_adapter_trained_on_nf4_loads_onto_the_float_base(tmp_path):
    fp = tiny_gpt()
    q = add_qlora(copy.deepcopy(fp), TARGETS, r=4, alpha=8)
    randomize(q)
    path = lora_edu.save_adapter(q, tmp_path / "a.safetensors")
    on_fp = lora_edu.load_adapter(copy.deepcopy(fp), path)
    on_nf4 = lora_edu.load_adapter(quantize_linears(copy.deepcopy(fp), TARGETS), path)
    assert isinstance(on_nf4.blocks[0].attn.q_proj, QLoRALinear)
    idx = torch.randint(0, 23, (2, 8))
    with torch.no_grad():
        assert torch.equal(on_nf4(idx), q(idx))
        # same ΔW on W instead of Ŵ: differs only by the quantisation error of the base
        assert (on_fp(idx) - q(idx)).abs().max() < 0.5


def test_training_on_nf4_reduces_the_loss():
    from lora_edu.lab.train import train

    class Task:  # copy a fixed random sequence: a task the base has not learned
        g = torch.Generator().manual_seed(0)
        data = torch.randint(0, 23, (64, 9), generator=g)

        def get_batch(self, split, batch_size, generator=None, device="cpu"):
            return self.data[:batch_size, :-1], self.data[:batch_size, 1:]

        def loss(self, model, batch):
            x, y = batch
            return F.cross_entropy(model(x).flatten(0, 1), y.flatten())

        def evaluate(self, model, split="val", max_batches=None):
            with torch.no_grad():
                return {"loss": self.loss(model, self.get_batch(split, 64)).item()}

    model = add_qlora(tiny_gpt(), TARGETS, r=4, alpha=8)
    result = train(model, Task(), steps=20, lr=1e-2, batch_size=64, progress=False, device="cpu")
    assert result.final["loss"] < result.history[0]["val_loss"] - 0.05
    assert result.trainable_params == 8 * 4 * (64 + 64)


def test_variants_gpu_benchmark_runs_tiny_on_cpu(tmp_path):
    """benchmarks/variants_gpu.py end to end at a tiny size, with bf16 weights and autocast as on CUDA."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import variants_gpu

    res = variants_gpu.main(["--tiny", "--device", "cpu", "--cpu-bf16", "--steps", "1", "--warmup", "0", "--out-dir", str(tmp_path)])
    rows = {r["name"]: r for r in res["rows"]}
    assert set(rows) == set(variants_gpu.ROWS) and all(r["ms_per_step"] > 0 and math.isfinite(r["loss"]) for r in rows.values())
    assert rows["QLoRA, NF4 base"]["weights_MiB"] < rows["LoRA, bf16 base"]["weights_MiB"] < rows["LoRA, fp32 base"]["weights_MiB"]
    assert rows["DoRA, bf16 base"]["trainable"] > rows["LoRA, bf16 base"]["trainable"]  # + m, one per output unit
    assert json.loads((tmp_path / "variants_gpu_tiny.json").read_text())["meta"]["bf16"] is True
    assert "| QLoRA, NF4 base |" in (tmp_path / "variants_gpu_tiny.md").read_text()


def test_merge_check_and_erased_fraction_refuse_like_merge_lora_naming_merge_into_dequantized():
    model = add_qlora(tiny_gpt(), TARGETS, r=4, alpha=8)
    randomize(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 23, (2, 8))
    for call in (lambda: lora_edu.check_merge_equivalence(model, ids), lambda: lora_edu.erased_fraction(model),
                 lambda: lora_edu.unload_lora(model)):
        with pytest.raises(RuntimeError, match="cannot merge into a 4-bit NF4 base.*merge_into_dequantized"):
            call()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert all(isinstance(layer, QLoRALinear) for _, layer in lora_edu.lora_layers(model))
