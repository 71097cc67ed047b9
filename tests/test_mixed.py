"""``lora_edu.adapter_batch``: row i of a batch uses adapter names_per_row[i]; each row equals its adapter alone.

Reference: the same model run on that row alone with ``set_adapter(model, name)``
(``disable_lora`` for None).  Tolerances: float64 on CPU 1e-12 absolute on O(1) logits
(measured ≈ 1e-15); float32 2e-6 relative; CUDA bf16 autocast, against the same rows run
alone under the same autocast: 2e-2 relative Frobenius (bf16 unit roundoff 3.9e-3; the
batched product rounds each row's branch once, in another order than the plain chain).
"""
import copy

import pytest
import torch
import torch.nn as nn

import lora_edu
from lora_edu.core.layers import LoRAEmbedding
from lora_edu.lab.models import GPT, GPTConfig
from lora_edu.speed.mixed import _LayerPlan

TOL64 = 1e-12
CUDA = torch.cuda.is_available()
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def _gpt(names=("a", "b", "c"), ranks=(4, 2, 8), targets=None, dtype=torch.float64, vocab=31, seed=0, device="cpu"):
    """A small GPT with one adapter per name (B ≠ 0: B = 0 would make every adapter the base model)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=16, n_layer=2, n_head=2, d_model=16, d_ff=32, bias=True)).to(device, dtype)
    targets = targets or [ALL_LINEAR] * len(names)
    for name, r, t in zip(names, ranks, targets):
        lora_edu.add_lora(model, t, r=r, alpha=2.0 * r + 1, adapter=name)
    with torch.no_grad():
        for _, layer in lora_edu.lora_layers(model):
            for n in layer.adapters:
                layer.lora_B[n].normal_(std=0.2)
    return model.eval()


def _alone(model, x, names):
    """Each row run alone with its own adapter: the reference."""
    rows = []
    for i, name in enumerate(names):
        with torch.no_grad():
            if name is None:
                with lora_edu.disable_lora(model):
                    rows.append(model(x[i:i + 1]))
            else:
                lora_edu.set_adapter(model, name)
                rows.append(model(x[i:i + 1]))
    return torch.cat(rows)


def _mixed(model, x, names):
    with torch.no_grad(), lora_edu.adapter_batch(model, names):
        return model(x)


NAMES = [
    ["a", "b", None, "c", "a", "b"],  # three adapters with different ranks, a base row, repeats
    ["b"] * 6,  # one adapter for every row (the two-product path)
    [None] * 6,  # the base model for every row
    ["c", None, None, None, None, "a"],
]


@pytest.mark.parametrize("names", NAMES)
@pytest.mark.parametrize("fused", [False, True])
def test_each_row_equals_its_adapter_alone_float64(names, fused):
    model = _gpt()
    if fused:
        lora_edu.fuse(model)
    x = torch.randint(0, 31, (6, 12), generator=torch.Generator().manual_seed(1))
    ref = _alone(model, x, names)
    active = lora_edu.active_adapter(model)
    out = _mixed(model, x, names)
    assert (out - ref).abs().max().item() < TOL64
    assert lora_edu.active_adapter(model) == active  # the model is as before
    assert not any(layer.disabled for _, layer in lora_edu.lora_layers(model))
    assert not any(layer._forward_hooks for _, layer in lora_edu.lora_layers(model))


def test_rows_differ_so_the_test_can_fail():
    model = _gpt()
    x = torch.randint(0, 31, (1, 12), generator=torch.Generator().manual_seed(1)).expand(4, 12)
    out = _mixed(model, x, ["a", "b", "c", None])
    for i in range(4):
        for j in range(i + 1, 4):
            assert (out[i] - out[j]).abs().max() > 1e-3


def test_float32_within_tolerance():
    model = _gpt(dtype=torch.float32)
    names = ["a", "b", None, "c"]
    x = torch.randint(0, 31, (4, 12), generator=torch.Generator().manual_seed(2))
    ref, out = _alone(model, x, names), _mixed(model, x, names)
    assert ((out - ref).norm() / ref.norm()).item() < 2e-6


def test_adapter_missing_on_a_layer_is_the_base_for_that_layer():
    """'b' lives only on q/v: its rows get the base on the other layers, exactly as set_adapter(model, 'b') does."""
    model = _gpt(targets=[ALL_LINEAR, ["q_proj", "v_proj"], ["up_proj"]])
    names = ["b", "a", "c", None, "b"]
    x = torch.randint(0, 31, (5, 10), generator=torch.Generator().manual_seed(3))
    ref, out = _alone(model, x, names), _mixed(model, x, names)
    assert (out - ref).abs().max().item() < TOL64


def test_plain_linear_outside_a_model_and_any_leading_shape():
    torch.manual_seed(0)
    layer = lora_edu.LoRALinear(nn.Linear(7, 5).double(), r=3, alpha=6, adapter="a")
    layer.add_adapter("b", r=1, alpha=2)
    with torch.no_grad():
        layer.lora_B["a"].normal_()
        layer.lora_B["b"].normal_()
    x = torch.randn(3, 2, 4, 7, dtype=torch.float64)
    names = ["b", None, "a"]
    with torch.no_grad(), lora_edu.adapter_batch(layer, names):
        y = layer(x)
    for i, n in enumerate(names):
        layer.set_adapter(n)
        with torch.no_grad():
            ref = layer(x[i]) if n is not None else layer.base(x[i])
        assert (y[i] - ref).abs().max().item() < TOL64


def test_embedding_rows_grouped():
    torch.manual_seed(0)
    emb = LoRAEmbedding(nn.Embedding(11, 6).double(), r=2, alpha=4, adapter="a")
    emb.add_adapter("b", r=3, alpha=3)
    with torch.no_grad():
        for n in ("a", "b"):
            emb.lora_A[n].normal_()
    model = nn.Sequential(emb, lora_edu.LoRALinear(nn.Linear(6, 4).double(), r=2, alpha=2, adapter="a"))
    model[1].add_adapter("b", r=2, alpha=2)
    with torch.no_grad():
        for n in ("a", "b"):
            model[1].lora_B[n].normal_()
    ids = torch.randint(0, 11, (4, 5))
    names = ["a", "b", None, "a"]
    assert (_mixed(model, ids, names) - _alone(model, ids, names)).abs().max().item() < TOL64


def test_gradients_reach_each_rows_adapter_float64():
    """Training through a mixed batch: ∂L/∂(A, B) of each adapter equals the sum over its rows run alone."""
    model = _gpt(names=("a", "b"), ranks=(4, 2)).train()
    for _, layer in lora_edu.lora_layers(model):  # both adapters trainable for this test
        for n in layer.adapters:
            layer.lora_A[n].requires_grad_(True)
            layer.lora_B[n].requires_grad_(True)
    params = [p for _, layer in lora_edu.lora_layers(model) for n in ("a", "b") for p in layer.lora_factors(n)]
    x = torch.randint(0, 31, (3, 8), generator=torch.Generator().manual_seed(4))
    names = ["a", "b", "a"]
    with lora_edu.adapter_batch(model, names):
        g_mixed = torch.autograd.grad(model(x).square().sum(), params)
    total = None
    for i, n in enumerate(names):
        for _, layer in lora_edu.lora_layers(model):
            layer.active_adapter = n  # keep both trainable (set_adapter would freeze the other)
        g = torch.autograd.grad(model(x[i:i + 1]).square().sum(), params, allow_unused=True)
        g = [torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, params)]
        total = g if total is None else [a + b for a, b in zip(total, g)]
    assert max((a - b).abs().max().item() for a, b in zip(g_mixed, total)) < 1e-10


def test_stack_cached_under_no_grad_and_refreshed_after_in_place_change():
    model = _gpt()
    names = ["a", "b", "c"]
    x = torch.randint(0, 31, (3, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), lora_edu.adapter_batch(model, names):
        model(x)
        layer = model.blocks[0].attn.q_proj
        plan = next(h.__self__ for h in layer._forward_hooks.values())
        assert isinstance(plan, _LayerPlan) and len(plan._stack) == 1
        assert plan._rows  # a small batch keeps its gathered rows too
        stack_id = id(next(iter(plan._stack.values()))[1])
        model(x)
        assert id(next(iter(plan._stack.values()))[1]) == stack_id  # reused
        layer.lora_B["b"].mul_(2.0)  # in place: the version counter moves, the stack and the gathered rows are rebuilt
        y = model(x)
        assert id(next(iter(plan._stack.values()))[1]) != stack_id
    assert (y - _alone(model, x, names)).abs().max().item() < TOL64


def test_no_python_loop_over_rows():
    """The BGMV path launches the same operations for 2 rows or 64 rows (per layer: 2 gathers, 2 bmm)."""
    from torch.overrides import TorchFunctionMode

    class Count(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.n += getattr(func, "__name__", "") != "__get__"  # attribute reads (x.device, …) are not launches
            return func(*args, **(kwargs or {}))

    model = _gpt()
    counts = []
    for rows in (2, 64):
        names = (["a", "b", None, "c"] * 16)[:rows]
        x = torch.randint(0, 31, (rows, 4))
        with torch.no_grad(), lora_edu.adapter_batch(model, names):
            model(x)  # stacks built
            with Count() as c:
                model(x)
        counts.append(c.n)
    assert counts[0] == counts[1]


# ------------------------------------------------------------------ refusals
def test_refusals_change_nothing():
    model = _gpt()
    x = torch.randint(0, 31, (3, 8))
    with pytest.raises(ValueError, match="3 names for a batch of 2"):
        with lora_edu.adapter_batch(model, ["a", "b", None]):
            model(x[:2])
    assert not any(layer.disabled or layer._forward_hooks for _, layer in lora_edu.lora_layers(model))
    with pytest.raises(KeyError, match="no adapter 'zz'"):
        with lora_edu.adapter_batch(model, ["a", "zz", None]):
            pass
    with pytest.raises(TypeError):
        with lora_edu.adapter_batch(model, "a"):
            pass
    with pytest.raises(TypeError):
        with lora_edu.adapter_batch(model, ["a", 3]):
            pass
    with pytest.raises(ValueError, match="empty"):
        with lora_edu.adapter_batch(model, []):
            pass
    lora_edu.set_adapter(model, "a")
    lora_edu.merge_lora(model)
    with pytest.raises(RuntimeError, match="merged"):
        with lora_edu.adapter_batch(model, ["a", "b", None]):
            pass
    lora_edu.unmerge_lora(model)
    with lora_edu.disable_lora(model):
        with pytest.raises(RuntimeError, match="disable_lora"):
            with lora_edu.adapter_batch(model, ["a", "b", None]):
                pass
    with pytest.raises(ValueError, match="no LoRA layers"):
        with lora_edu.adapter_batch(nn.Linear(2, 2), ["a"]):
            pass
    assert not any(layer.disabled or layer._forward_hooks for _, layer in lora_edu.lora_layers(model))


def test_dropout_in_training_refused_eval_fine():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=31, block_size=16, n_layer=1, n_head=2, d_model=16, d_ff=32)).double()
    lora_edu.add_lora(model, ALL_LINEAR, r=2, alpha=4, dropout=0.1, adapter="a")
    lora_edu.add_lora(model, ALL_LINEAR, r=2, alpha=4, adapter="b")
    x = torch.randint(0, 31, (2, 8))
    model.train()
    with pytest.raises(RuntimeError, match="dropout"):
        with lora_edu.adapter_batch(model, ["a", "b"]):
            model(x)
    model.eval()
    assert (_mixed(model, x, ["a", "b"]) - _alone(model, x, ["a", "b"])).abs().max().item() < TOL64


def test_layer_whose_forward_is_not_base_plus_branch_refused():
    class Odd(lora_edu.LoRALinear):
        def forward(self, x):
            return super().forward(x) * 2

    torch.manual_seed(0)
    model = nn.Sequential(Odd(nn.Linear(4, 4), r=2, alpha=2, adapter="a"))
    with pytest.raises(TypeError, match="not base \\+ lora_forward"):
        with lora_edu.adapter_batch(model, ["a"]):
            pass
    with lora_edu.adapter_batch(model, [None]):  # no row asks for its adapter: fine (the layer runs its base)
        model(torch.randn(1, 4))


def test_deepcopy_inside_context_is_a_plain_model():
    model = _gpt()
    with lora_edu.adapter_batch(model, ["a", "b"]):
        pass
    twin = copy.deepcopy(model)
    assert not any(layer._forward_hooks for _, layer in lora_edu.lora_layers(twin))


# ------------------------------------------------------------------ CUDA (run on the lent GPU)
@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("fused", [False, True])
def test_cuda_bf16_autocast_rows_match_alone(fused):
    model = _gpt(dtype=torch.float32, device="cuda", vocab=64)
    if fused:
        lora_edu.fuse(model)
    names = ["a", "b", None, "c", "a", "c", "b", None]
    x = torch.randint(0, 64, (8, 16), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref, out = _alone(model, x, names).float(), _mixed(model, x, names).float()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 2e-2, rel
    with torch.no_grad():  # and in float32 without autocast (TF32 off): tight
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            ref32, out32 = _alone(model, x, names), _mixed(model, x, names)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
    assert ((out32 - ref32).norm() / ref32.norm()).item() < 1e-5


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_mixed_batch_in_a_cuda_graph():
    """No host synchronisation or allocation from the host inside the forward once warmed up: it captures."""
    model = lora_edu.fuse(_gpt(dtype=torch.float32, device="cuda", vocab=64))
    names = ["a", "b", None, "c"]
    x = torch.randint(0, 64, (4, 16), device="cuda")
    with torch.no_grad(), lora_edu.adapter_batch(model, names), torch.autocast("cuda", dtype=torch.bfloat16):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                ref = model(x)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = model(x)
        g.replay()
        torch.cuda.synchronize()
    assert torch.equal(out, ref)
