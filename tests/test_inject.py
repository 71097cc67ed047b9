"""add_lora by name, freezing, named adapters, disable, delete, merge/unload, counting."""
import copy

import pytest
import torch
import torch.nn as nn

import lora_edu as L


class Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        a = torch.softmax(self.q_proj(x) @ self.k_proj(x).transpose(-1, -2) / x.shape[-1] ** 0.5, -1)
        return self.o_proj(a @ self.v_proj(x))


class Toy(nn.Module):
    def __init__(self, vocab=20, d=8, n=2):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Attn(d) for _ in range(n))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)

    def forward(self, ids):
        x = self.tok_emb(ids)
        for b in self.blocks:
            x = x + b(x)
        return self.head(self.norm(x))


def toy(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return Toy().to(dtype)


def ids(seed=0):
    return torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(seed))


def perturb(model, adapter=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, l in L.lora_layers(model):
            name = adapter or l.active_adapter
            if name in l.adapters:
                B, A = l.lora_B[name], l.lora_A[name]
                B.copy_(torch.randn(B.shape, generator=g, dtype=B.dtype) * 0.1)
                A.copy_(torch.randn(A.shape, generator=g, dtype=A.dtype) * 0.1)


def test_targets_by_short_name_suffix_and_regex():
    m = L.add_lora(toy(), ["q_proj", "v_proj"], r=2, alpha=4)
    assert [n for n, _ in L.lora_layers(m)] == [f"blocks.{i}.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    m = L.add_lora(toy(), "blocks.1.k_proj", r=2, alpha=4)
    assert [n for n, _ in L.lora_layers(m)] == ["blocks.1.k_proj"]
    m = L.add_lora(toy(), r"blocks\.0\.[qo]_proj", r=2, alpha=4)
    assert [n for n, _ in L.lora_layers(m)] == ["blocks.0.q_proj", "blocks.0.o_proj"]
    m = L.add_lora(toy(), ["tok_emb"], r=2, alpha=4)
    assert isinstance(m.tok_emb, L.LoRAEmbedding)


def test_everything_else_frozen_and_identity_at_init():
    m = toy()
    y0 = m(ids())
    L.add_lora(m, ["q_proj", "v_proj"], r=2, alpha=4)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert torch.equal(m(ids()), y0)
    c = L.count_parameters(m)
    assert c.trainable == 2 * 2 * 2 * (8 + 8)  # layers × (q, v) × r·(in+out)
    assert c.trainable == sum(p.numel() for p in L.lora_parameters(m))
    base_total = sum(p.numel() for p in toy().parameters())
    assert c.total == base_total + c.trainable
    text = str(c)
    assert "blocks.0.q_proj" in text and "8×8" in text and "r·(in+out)" in text and "trainable 128 of" in text


def test_unknown_target_lists_available_layers():
    with pytest.raises(ValueError, match=r"target 'query' matches no module.*q_proj.*v_proj"):
        L.add_lora(toy(), ["query"], r=2, alpha=2)
    with pytest.raises(ValueError, match="target 'x_proj' matches no module"):
        L.add_lora(toy(), ["q_proj", "x_proj"], r=2, alpha=2)  # every target must match


def test_wrong_layer_type_refused():
    with pytest.raises(TypeError, match=r"matched 'norm', a LayerNorm: LoRA wraps single linear or embedding layers"):
        L.add_lora(toy(), ["norm"], r=2, alpha=2)
    with pytest.raises(TypeError, match=r"matched 'blocks.0', a Attn: it is a container; target the layers inside it"):
        L.add_lora(toy(), ["blocks.0"], r=2, alpha=2)


def test_validation_happens_before_changes():
    m = toy()
    with pytest.raises(ValueError):
        L.add_lora(m, ["q_proj", "nope"], r=2, alpha=2)
    assert not list(L.lora_layers(m))
    assert all(p.requires_grad for p in m.parameters())
    with pytest.raises(ValueError, match="r must be"):
        L.add_lora(m, ["q_proj"], r=0, alpha=2)
    assert not list(L.lora_layers(m))


def test_double_injection_refused():
    m = L.add_lora(toy(), ["q_proj"], r=2, alpha=2)
    with pytest.raises(ValueError, match=r"already has an adapter named 'default' \(double injection\)"):
        L.add_lora(m, ["q_proj"], r=2, alpha=2)


def test_two_adapters_switch_disable_delete():
    m = toy()
    x = ids()
    y_base = m(x)
    L.add_lora(m, ["q_proj", "v_proj"], r=2, alpha=2, adapter="task_a")
    perturb(m, "task_a", seed=1)
    y_a = m(x)
    L.add_lora(m, ["q_proj", "k_proj"], r=3, alpha=6, adapter="task_b")
    assert L.active_adapter(m) == "task_b"
    perturb(m, "task_b", seed=2)
    y_b = m(x)
    assert not torch.allclose(y_a, y_b)
    # only the active adapter is trainable
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(".task_b" in n for n in trainable)
    L.set_adapter(m, "task_a")
    torch.testing.assert_close(m(x), y_a, rtol=0, atol=1e-12)
    assert all(".task_a" in n for n, p in m.named_parameters() if p.requires_grad)
    with L.disable_lora(m):
        torch.testing.assert_close(m(x), y_base, rtol=0, atol=1e-12)
    torch.testing.assert_close(m(x), y_a, rtol=0, atol=1e-12)
    L.delete_adapter(m, "task_a")
    assert L.adapter_names(m) == ["task_b"]
    with pytest.raises(KeyError, match="no adapter 'task_a'"):
        L.set_adapter(m, "task_a")
    L.set_adapter(m, "task_b")
    torch.testing.assert_close(m(x), y_b, rtol=0, atol=1e-12)


def test_merge_lora_model_and_double_merge():
    m = L.add_lora(toy(), ["q_proj", "v_proj", "tok_emb"], r=2, alpha=3)
    perturb(m)
    x = ids()
    y = m(x)
    L.merge_lora(m)
    torch.testing.assert_close(m(x), y, rtol=0, atol=1e-12)
    with pytest.raises(RuntimeError, match="already merged.*add ΔW twice"):
        L.merge_lora(m)
    with pytest.raises(RuntimeError, match="cannot disable LoRA while adapters are merged"):
        with L.disable_lora(m):
            pass
    L.unmerge_lora(m)
    torch.testing.assert_close(m(x), y, rtol=0, atol=1e-12)


def test_unload_merge_true_and_false():
    m0 = toy()
    x = ids()
    y_base = m0(x)
    m = L.add_lora(copy.deepcopy(m0), ["q_proj", "o_proj"], r=2, alpha=2)
    perturb(m)
    y = m(x)
    merged = L.unload_lora(copy.deepcopy(m), merge=True)
    assert not list(L.lora_layers(merged))
    assert all(type(mod) is not L.LoRALinear for mod in merged.modules())
    torch.testing.assert_close(merged(x), y, rtol=0, atol=1e-12)
    plain = L.unload_lora(m, merge=False)
    torch.testing.assert_close(plain(x), y_base, rtol=0, atol=1e-12)
    assert set(plain.state_dict()) == set(m0.state_dict())


def test_frozen_weights_bit_identical_after_training():
    m = L.add_lora(toy(torch.float32), ["q_proj", "v_proj"], r=2, alpha=2)
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW(L.lora_parameters(m), lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        loss = m(ids()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, p in m.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(torch.count_nonzero(l.B) > 0 for _, l in L.lora_layers(m))


def test_trainable_modules_for_new_head():
    m = L.add_lora(toy(), ["q_proj"], r=2, alpha=2, trainable_modules=["head"])
    assert m.head.weight.requires_grad
    with pytest.raises(ValueError, match="trainable module 'nohead' not found"):
        L.add_lora(toy(), ["q_proj"], r=2, alpha=2, trainable_modules=["nohead"])


def test_no_lora_errors():
    with pytest.raises(ValueError, match="no LoRA layers"):
        L.merge_lora(toy())
    with pytest.raises(RuntimeError, match="nothing to unmerge"):
        L.unmerge_lora(L.add_lora(toy(), ["q_proj"], r=1, alpha=1))


def test_freeze():
    m = L.freeze(toy())
    assert not any(p.requires_grad for p in m.parameters())
