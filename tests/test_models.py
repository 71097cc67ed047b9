"""lora_edu.lab.models: shapes, forward/backward, causal masking, naming, dtypes, devices."""
import pytest
import torch
import torch.nn as nn

from lora_edu.lab.models import GPT, GPTConfig, ViT, ViTConfig, build_model, num_params

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def tiny_gpt(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=97, block_size=16, n_layer=2, n_head=2, d_model=16, d_ff=32, **kw))


def tiny_vit(**kw):
    torch.manual_seed(0)
    return ViT(ViTConfig(image_size=8, patch_size=4, num_classes=5, n_layer=2, n_head=2, d_model=16, d_ff=32, **kw))


def test_gpt_shapes_and_backward():
    model = tiny_gpt()
    idx = torch.randint(0, 97, (3, 16))
    logits = model(idx)
    assert logits.shape == (3, 16, 97)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_vit_shapes_patchify_and_backward():
    model = tiny_vit()
    x = torch.rand(4, 3, 8, 8)
    assert model.patchify(x).shape == (4, 4, 48)
    # patch 1 (row 0, col 1) of image 0, channel 0, is x[0, 0, 0:4, 4:8] flattened row-major
    assert torch.equal(model.patchify(x)[0, 1, :16], x[0, 0, 0:4, 4:8].reshape(-1))
    logits = model(x)
    assert logits.shape == (4, 5)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_causal_mask_future_does_not_change_past():
    model = tiny_gpt().double()
    idx = torch.randint(0, 97, (2, 16))
    t = 9
    changed = idx.clone()
    changed[:, t:] = torch.randint(0, 97, (2, 16 - t))
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-12)
    assert not torch.allclose(a[:, t:], b[:, t:])


def test_vit_is_not_causal():
    model = tiny_vit().double()
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    y = x.clone()
    y[..., 4:, 4:] += 1.0  # change only the last patch; the [CLS] output must move
    assert not torch.allclose(model(x), model(y))


@pytest.mark.parametrize("make", [tiny_gpt, tiny_vit])
def test_same_lora_target_names_on_both(make):
    model = make()
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"} <= names
    for n, m in model.named_modules():
        if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj")):
            assert isinstance(m, nn.Linear) and m.weight.shape == (16, 16)
    assert sum(n.endswith("q_proj") for n, _ in model.named_modules()) == 2  # one per layer


def test_gpt_named_parts_and_untied_head():
    model = tiny_gpt()
    assert isinstance(model.tok_emb, nn.Embedding) and isinstance(model.lm_head, nn.Linear)
    assert model.lm_head.weight.data_ptr() != model.tok_emb.weight.data_ptr()
    vit = tiny_vit()
    assert isinstance(vit.patch_proj, nn.Linear) and isinstance(vit.head, nn.Linear)


def test_float64_matches_float32():
    model = tiny_gpt()
    idx = torch.randint(0, 97, (2, 16))
    out32 = model(idx)
    out64 = model.double()(idx)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), out32, rtol=1e-4, atol=1e-5)
    vit = tiny_vit().double()
    assert vit(torch.rand(2, 3, 8, 8, dtype=torch.float64)).dtype == torch.float64


def test_presets_and_sizes():
    tiny, wide = GPTConfig.preset("tiny"), GPTConfig.preset("wide")
    assert wide.d_model >= 256
    assert 4 * num_params(GPT(tiny)) < 1_000_000  # float32 bytes << 1 MB
    assert 4 * num_params(GPT(wide)) < 5_000_000  # <= ~5 MB
    assert 4 * num_params(ViT(ViTConfig.preset("tiny"))) < 1_000_000
    assert GPTConfig.preset("tiny", d_model=32).d_model == 32
    with pytest.raises(ValueError, match="unknown"):
        GPTConfig.preset("huge")
    assert isinstance(build_model("vit", "tiny"), ViT)
    assert GPT(tiny).num_params() == num_params(GPT(tiny))


def test_init_is_seeded():
    a, b = tiny_gpt(), tiny_gpt()
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


def test_generate_greedy_is_deterministic():
    model = tiny_gpt()
    start = torch.zeros(1, 1, dtype=torch.long)
    a = model.generate(start, 20, temperature=0)
    assert a.shape == (1, 21) and torch.equal(a, model.generate(start, 20, temperature=0))
    s = model.generate(start, 5, generator=torch.Generator().manual_seed(0))
    assert s.shape == (1, 6)


def test_lora_injection_reads_the_same_on_both():
    lora_edu = pytest.importorskip("lora_edu")
    if not hasattr(lora_edu, "add_lora"):
        pytest.skip("core library (lora_edu.add_lora) not available yet")
    for model, x in ((tiny_gpt(), torch.randint(0, 97, (2, 16))), (tiny_vit(), torch.rand(2, 3, 8, 8))):
        before = model(x).detach()
        lora_edu.add_lora(model, targets=["q_proj", "v_proj"], r=2, alpha=4)
        torch.testing.assert_close(model(x), before)  # B = 0: a no-op at init
        adapted = sorted(n for n, m in model.named_modules() if isinstance(m, lora_edu.LoRALinear))
        assert adapted == [f"blocks.{i}.attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]


@cuda
@pytest.mark.cuda
def test_models_on_cuda_bf16_autocast():
    model = tiny_gpt().cuda()
    idx = torch.randint(0, 97, (2, 16), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(idx)
    assert logits.shape == (2, 16, 97) and torch.isfinite(logits.float()).all()
    vit = tiny_vit().cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert vit(torch.rand(2, 3, 8, 8, device="cuda")).shape == (2, 5)
