"""Random sequences of public calls against a float64 oracle (hypothesis ``RuleBasedStateMachine``).

The machine drives a small float64 model (Embedding -> Linear -> tanh -> Linear) through
add_lora, delete_adapter, set_adapter, merge_lora / unmerge_lora, disable_lora around a
forward, an SGD step on the active adapter, save_adapter + load_adapter in both formats
(into a fresh copy of the base model and into the live model), a state_dict round trip
into a freshly built model, fuse / unfuse, check_merge_equivalence and unload_lora.

The :class:`Oracle` is written independently of the library: per adapter its scale and,
per layer, A and B; which adapter is active; whether it is merged; the true base W and b.
It predicts the output ``x Wᵀ + b + s·x Aᵀ Bᵀ`` (``E[ids] + s·Aᵀ[ids] Bᵀ`` for the
embedding), the SGD step (with its own autograd over that formula), and which calls
must fail.  After every step the model must equal the oracle to 1e-10 — merged or not —
or the call must have raised the documented error and changed nothing (every tensor of
the state dict, every requires_grad flag, every adapter and merge flag compared).  A
merged adapter changed in place must make the forward raise until ``unmerge_lora``,
which still restores W exactly.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import hypothesis.strategies as st
import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import lora_edu as L
from lora_edu import AdapterFileError

F64 = torch.float64
LAYERS = ("emb", "fc1", "fc2")
NAMES = ("a", "b", "c")
TOL = 1e-10


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(6, 4)
        self.fc1 = nn.Linear(4, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, ids):
        return self.fc2(torch.tanh(self.fc1(self.emb(ids))))


def plain_net(base: dict) -> Net:
    """A plain Net holding the oracle's base weights."""
    m = Net().to(F64)
    with torch.no_grad():
        for n, (W, b) in base.items():
            m.get_submodule(n).weight.copy_(W)
            if b is not None:
                m.get_submodule(n).bias.copy_(b)
    return m


def snapshot(model):
    return {
        # parameters and buffers rather than state_dict(), which refuses a merged adapter changed in place
        "tensors": {k: v.detach().clone() for k, v in [*model.named_parameters(), *model.named_buffers()]},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "types": {n: type(m).__name__ for n, m in model.named_modules()},
        "layers": {n: (list(layer.adapters), layer.active_adapter, layer.merged_adapter) for n, layer in L.lora_layers(model)},
    }


def assert_same(before, after):
    for key in ("grad", "types", "layers"):
        assert after[key] == before[key], key
    assert after["tensors"].keys() == before["tensors"].keys()
    for k, v in before["tensors"].items():
        assert torch.equal(after["tensors"][k], v), k


class Oracle:
    """What the model must be, kept without the library: base W/b, adapters' A, B, s per layer, active, merged."""

    def __init__(self, base):
        self.base = base  # layer -> (W, b): the true, unmerged base
        self.adapters: dict[str, dict] = {}  # name -> {"cfg": (r, alpha, rslora), "s": scale, "f": {layer: (A, B)}}; creation order
        self.wrapped: set[str] = set()
        self.active: str | None = None
        self.merged = False
        self.merged_with: dict = {}  # the active factors at merge time: what W holds
        self.frozen = False  # add_lora / load_adapter froze the base model
        self.stale = False  # the merged adapter's A was changed in place since the merge

    def names(self) -> list[str]:
        """adapter_names(model): module order, then each layer's order of creation."""
        out = []
        for layer in LAYERS:
            for n, ad in self.adapters.items():
                if layer in ad["f"] and n not in out:
                    out.append(n)
        return out

    def active_factors(self) -> dict:
        if self.active is None:
            return {}
        ad = self.adapters[self.active]
        return {layer: (A, B, ad["s"]) for layer, (A, B) in ad["f"].items()}

    def forward(self, ids, factors: dict):
        E, _ = self.base["emb"]
        h = E[ids]
        if "emb" in factors:
            A, B, s = factors["emb"]
            h = h + s * A.T[ids] @ B.T
        for n in ("fc1", "fc2"):
            W, b = self.base[n]
            y = h @ W.T + b
            if n in factors:
                A, B, s = factors[n]
                y = y + s * (h @ A.T @ B.T)
            h = torch.tanh(y) if n == "fc1" else y
        return h

    def weight(self, layer):
        """The W the model must hold: W + s·(B A) in the layer's layout when the active adapter is merged there."""
        W, _ = self.base[layer]
        f = self.merged_with
        if self.merged and layer in f:
            A, B, s = f[layer]
            delta = s * (B @ A)
            W = W + (delta.T if layer == "emb" else delta)
        return W


def scale(r, alpha, rslora):
    return alpha / r**0.5 if rslora else alpha / r


class LoRAMachine(RuleBasedStateMachine):
    @initialize(seed=st.integers(0, 2**16))
    def setup(self, seed):
        torch.manual_seed(seed)
        self.model = Net().to(F64)
        self.oracle = Oracle({n: (m.weight.detach().clone(), None if n == "emb" else m.bias.detach().clone())
                              for n, m in ((n, self.model.get_submodule(n)) for n in LAYERS)})
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 6, (3, 4), generator=g)
        self.dir = Path(tempfile.mkdtemp(prefix="lora_sm_"))
        self.files = 0

    def teardown(self):
        if hasattr(self, "dir"):
            shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------------ helpers
    def expect(self, error, call):
        """Run ``call``: it must raise ``error`` and change nothing (error None: it must succeed; returns its result)."""
        if error is None:
            return call()
        before = snapshot(self.model)
        with pytest.raises(error):
            call()
        assert_same(before, snapshot(self.model))
        return None

    def no_lora(self):
        return not self.oracle.wrapped

    def path(self, suffix):
        self.files += 1
        return self.dir / f"{self.files}{suffix}"

    def randn(self, shape, seed):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(shape, generator=g, dtype=F64) * 0.4

    # ------------------------------------------------------------------ rules
    @rule(name=st.sampled_from((*NAMES, "training")), layers=st.sets(st.sampled_from(LAYERS), min_size=1),
          r=st.integers(1, 3), alpha=st.sampled_from((0.5, 1.0, 2.0, 4.0)), rslora=st.booleans())
    def add_lora(self, name, layers, r, alpha, rslora):
        o = self.oracle
        targets = [t for t in LAYERS if t in layers]
        error = ValueError if name == "training" or name in o.adapters else RuntimeError if o.merged else None
        self.expect(error, lambda: L.add_lora(self.model, targets, r=r, alpha=alpha, rslora=rslora, adapter=name))
        if error is not None:
            return
        f = {}
        for t in targets:
            A, B = self.model.get_submodule(t).lora_factors(name)
            zero = A if t == "emb" else B  # ΔW = 0 at creation
            assert torch.equal(zero, torch.zeros_like(zero)) and A.dtype == F64
            f[t] = (A.detach().clone(), B.detach().clone())
        o.adapters[name] = {"cfg": (r, float(alpha), rslora), "s": scale(r, alpha, rslora), "f": f}
        o.wrapped |= set(targets)
        o.active = name
        o.frozen = True

    @precondition(lambda self: not self.oracle.wrapped)
    @rule()
    def calls_without_lora(self):
        """Every call that needs LoRA layers raises ValueError on a plain model and changes nothing."""
        for call in (lambda: L.delete_adapter(self.model, "a"), lambda: L.set_adapter(self.model, "a"),
                     lambda: L.merge_lora(self.model), lambda: L.unmerge_lora(self.model), lambda: L.lora_parameters(self.model),
                     lambda: L.disable_lora(self.model).__enter__(), lambda: L.save_adapter(self.model, self.path(".st")),
                     lambda: L.check_merge_equivalence(self.model, self.ids)):
            self.expect(ValueError, call)

    @precondition(lambda self: bool(self.oracle.adapters))
    @rule(name=st.sampled_from(NAMES), seed=st.integers(0, 2**16))
    def perturb(self, name, seed):
        """Give an unmerged adapter random A and B (in place, as a user or an initialiser would)."""
        o = self.oracle
        if name not in o.adapters or (o.merged and name == o.active):
            return
        f = o.adapters[name]["f"]
        with torch.no_grad():
            for i, (t, (A, B)) in enumerate(f.items()):
                A2, B2 = self.randn(A.shape, seed + 2 * i), self.randn(B.shape, seed + 2 * i + 1)
                a, b = self.model.get_submodule(t).lora_factors(name)
                a.copy_(A2)
                b.copy_(B2)
                f[t] = (A2, B2)

    @precondition(lambda self: self.oracle.merged)
    @rule(seed=st.integers(0, 2**16))
    def change_merged_adapter_in_place(self, seed):
        """A user writes into A of the merged adapter: forward must raise until unmerge, which is still exact."""
        o = self.oracle
        if not o.merged:
            return
        t = next(iter(o.merged_with))
        A, B = o.adapters[o.active]["f"][t]
        A2 = A + self.randn(A.shape, seed)
        with torch.no_grad():
            self.model.get_submodule(t).lora_A[o.active].copy_(A2)
        o.adapters[o.active]["f"][t] = (A2, B)
        o.stale = True

    @precondition(lambda self: self.oracle.active is not None and not self.oracle.merged)
    @rule(lr=st.sampled_from((0.05, 0.3)))
    def backward_merge_step_unmerge(self, lr):
        """Gradients computed unmerged, then merge, optimizer step, unmerge: the step must change nothing."""
        o = self.oracle
        if self.no_lora() or o.merged or o.active is None:
            return
        opt = torch.optim.SGD(L.lora_parameters(self.model), lr=lr)
        self.model(self.ids).pow(2).sum().backward()
        L.merge_lora(self.model)
        opt.step()
        L.unmerge_lora(self.model)

    @precondition(lambda self: bool(self.oracle.wrapped))
    @rule(name=st.sampled_from(NAMES))
    def delete_adapter(self, name):
        o = self.oracle
        error = (ValueError if self.no_lora() else KeyError if name not in o.adapters
                 else RuntimeError if o.merged and name == o.active else None)
        if error is not None:
            return self.expect(error, lambda: L.delete_adapter(self.model, name))
        L.delete_adapter(self.model, name)
        del o.adapters[name]
        if o.active == name:
            remaining = o.names()
            o.active = remaining[0] if remaining else None

    @precondition(lambda self: bool(self.oracle.wrapped))
    @rule(name=st.sampled_from((*NAMES, None)))
    def set_adapter(self, name):
        o = self.oracle
        error = (ValueError if self.no_lora() else KeyError if name is not None and name not in o.adapters
                 else RuntimeError if o.merged and name != o.active else None)
        self.expect(error, lambda: L.set_adapter(self.model, name))
        if error is None:
            o.active = name

    @precondition(lambda self: bool(self.oracle.wrapped))
    @rule()
    def merge(self):
        o = self.oracle
        error = ValueError if self.no_lora() else RuntimeError if o.active is None or o.merged else None
        self.expect(error, lambda: L.merge_lora(self.model))
        if error is None:
            o.merged, o.merged_with = True, o.active_factors()

    @precondition(lambda self: bool(self.oracle.wrapped))
    @rule()
    def unmerge(self):
        o = self.oracle
        error = ValueError if self.no_lora() else RuntimeError if not o.merged else None
        self.expect(error, lambda: L.unmerge_lora(self.model))
        if error is None:
            o.merged, o.merged_with, o.stale = False, {}, False

    @precondition(lambda self: bool(self.oracle.wrapped))
    @rule()
    def disabled_forward(self):
        o = self.oracle
        error = ValueError if self.no_lora() else RuntimeError if o.merged else None

        def run():
            with torch.no_grad(), L.disable_lora(self.model):
                if o.active is not None:
                    self.expect(RuntimeError, lambda: L.merge_lora(self.model))  # no merge inside disable_lora()
                return self.model(self.ids)

        y = self.expect(error, run)
        if error is None:
            self.assert_close(y, o.forward(self.ids, {}))

    @precondition(lambda self: bool(self.oracle.wrapped))
    @rule(seed=st.integers(0, 2**16), lr=st.sampled_from((0.05, 0.3)))
    def sgd_step(self, seed, lr):
        o = self.oracle
        if self.no_lora():
            return self.expect(ValueError, lambda: L.lora_parameters(self.model))
        params = L.lora_parameters(self.model)
        f = {} if o.merged else o.active_factors()
        expected = [self.model.get_submodule(t).lora_factors(o.active)[i] for t in LAYERS if t in f for i in (0, 1)]
        assert {id(p) for p in params} == {id(p) for p in expected}
        if not params:
            return
        target = self.randn((3, 4, 3), seed)
        # the oracle's step: its own autograd over its own formula
        leaves = {t: (A.clone().requires_grad_(), B.clone().requires_grad_(), s) for t, (A, B, s) in f.items()}
        loss = (o.forward(self.ids, leaves) * target).sum()
        grads = torch.autograd.grad(loss, [x for A, B, _ in leaves.values() for x in (A, B)])
        new = {}
        for i, (t, (A, B, _)) in enumerate(leaves.items()):
            new[t] = ((A - lr * grads[2 * i]).detach(), (B - lr * grads[2 * i + 1]).detach())
        # the model's step
        opt = torch.optim.SGD(params, lr=lr)
        opt.zero_grad()
        (self.model(self.ids) * target).sum().backward()
        opt.step()
        o.adapters[o.active]["f"].update(new)

    @precondition(lambda self: bool(self.oracle.adapters))
    @rule(fmt=st.sampled_from(("lora_edu", "peft")), name=st.sampled_from(NAMES))
    def save_and_load_into_fresh_base(self, fmt, name):
        o = self.oracle
        path = self.path(".safetensors" if fmt == "lora_edu" else "_peft")
        error = ValueError if not o.adapters else KeyError if name not in o.adapters else None
        self.expect(error, lambda: L.save_adapter(self.model, path, adapter=name, format=fmt))
        if error is not None:
            return
        fresh = plain_net(o.base)
        L.load_adapter(fresh, path, adapter=name)
        assert L.active_adapter(fresh) == name
        ad = o.adapters[name]
        with torch.no_grad():
            self.assert_close(fresh(self.ids), o.forward(self.ids, {t: (A, B, ad["s"]) for t, (A, B) in ad["f"].items()}))

    @precondition(lambda self: bool(self.oracle.adapters))
    @rule(fmt=st.sampled_from(("lora_edu", "peft")), name=st.sampled_from(NAMES), new=st.sampled_from(NAMES))
    def save_and_load_into_live_model(self, fmt, name, new):
        o = self.oracle
        if name not in o.adapters:
            return
        path = L.save_adapter(self.model, self.path(".safetensors" if fmt == "lora_edu" else "_peft"), adapter=name, format=fmt)
        src = o.adapters[name]
        clash = new in o.adapters and (set(o.adapters[new]["f"]) != set(src["f"]) or o.adapters[new]["cfg"] != src["cfg"])
        error = AdapterFileError if o.merged or clash else None
        self.expect(error, lambda: L.load_adapter(self.model, path, adapter=new))
        if error is not None:
            return
        factors = {t: (A.clone(), B.clone()) for t, (A, B) in src["f"].items()}
        if new in o.adapters:
            o.adapters[new]["f"] = factors  # overwritten in place: keeps its place in the order of creation
        else:
            o.adapters[new] = {"cfg": src["cfg"], "s": src["s"], "f": factors}
        o.wrapped |= set(factors)
        o.active = new
        o.frozen = True

    @precondition(lambda self: bool(self.oracle.wrapped))
    @rule(seed=st.integers(0, 2**16))
    def state_dict_round_trip(self, seed):
        """Build a fresh model with the same adapters (other random weights), load the state dict, continue with it."""
        o = self.oracle
        if o.stale:
            return self.expect(RuntimeError, self.model.state_dict)
        torch.manual_seed(seed)
        fresh = Net().to(F64)
        bare = sorted(o.wrapped - {t for ad in o.adapters.values() for t in ad["f"]})
        if bare:  # wrapped layers whose adapters were all deleted
            L.add_lora(fresh, bare, r=1, alpha=1, adapter="scaffold")
        for n, ad in o.adapters.items():
            r, alpha, rslora = ad["cfg"]
            L.add_lora(fresh, [t for t in LAYERS if t in ad["f"]], r=r, alpha=alpha, rslora=rslora, adapter=n)
        if bare:
            L.delete_adapter(fresh, "scaffold")
        if o.adapters:  # another active adapter than the model's: the state dict must restore it
            L.set_adapter(fresh, None if o.active is not None else next(iter(o.adapters)))
        fresh.load_state_dict(self.model.state_dict())
        self.model = fresh

    @precondition(lambda self: bool(self.oracle.wrapped))
    @rule(merge=st.booleans())
    def unload(self, merge):
        """unload_lora: plain layers again, computing the adapted model (merge=True) or the base model."""
        o = self.oracle
        error = RuntimeError if merge and o.stale else None
        self.expect(error, lambda: L.unload_lora(self.model, merge=merge))
        if error is not None:
            return
        if merge:
            folded = o.merged_with if o.merged else o.active_factors()
            for t, (A, B, s) in folded.items():
                delta = s * (B @ A)
                W, b = o.base[t]
                o.base[t] = (W + (delta.T if t == "emb" else delta), b)
        o.adapters, o.wrapped, o.active = {}, set(), None
        o.merged, o.merged_with, o.stale = False, {}, False

    @precondition(lambda self: bool(self.oracle.wrapped))
    @rule(cache=st.booleans())
    def fuse(self, cache):
        L.fuse(self.model, cache_weights=cache)

    @precondition(lambda self: bool(self.oracle.wrapped))
    @rule()
    def unfuse(self):
        L.unfuse(self.model)

    @precondition(lambda self: bool(self.oracle.wrapped))
    @rule()
    def check_merge_equivalence(self):
        o = self.oracle
        error = ValueError if self.no_lora() or o.active is None else None
        if error is not None:
            return self.expect(error, lambda: L.check_merge_equivalence(self.model, self.ids))
        before = snapshot(self.model)
        report = L.check_merge_equivalence(self.model, self.ids)
        assert report.passed, str(report)
        assert_same(before, snapshot(self.model))

    # ------------------------------------------------------------------ invariants
    def assert_close(self, y, expected):
        err = (y - expected).abs().max().item()
        assert err <= TOL * (1 + expected.abs().max().item()), err

    @invariant()
    def matches_oracle(self):
        if not hasattr(self, "oracle"):
            return
        o, m = self.oracle, self.model
        with torch.no_grad():
            if o.stale:
                with pytest.raises(RuntimeError, match="changed in place while merged"):
                    m(self.ids)
            else:
                self.assert_close(m(self.ids), o.forward(self.ids, o.active_factors()))
        assert L.adapter_names(m) == o.names()
        assert L.active_adapter(m) == o.active
        layers = dict(L.lora_layers(m))
        assert set(layers) == o.wrapped
        for t in LAYERS:
            layer = m.get_submodule(t)
            W = layer.base.weight if t in layers else layer.weight
            self.assert_close(W, o.weight(t))
            if t in layers:
                assert layer.merged == (o.merged and o.active in layer.adapters)
                for n, ad in o.adapters.items():
                    if t in ad["f"]:
                        A, B = ad["f"][t]
                        self.assert_close(layer.lora_A[n].detach(), A)
                        self.assert_close(layer.lora_B[n].detach(), B)
        trainable = {n for n, p in m.named_parameters() if p.requires_grad}
        if not o.wrapped:  # no LoRA (yet, or unloaded): frozen only if add_lora or a loader froze it
            expected = set() if o.frozen else {n for n, _ in m.named_parameters()}
        elif o.merged or o.active is None:
            expected = set()
        else:
            expected = {f"{t}.lora_{x}.{o.active}" for t in o.adapters[o.active]["f"] for x in "AB"}
        assert trainable == expected


LoRAMachine.TestCase.settings = settings(
    max_examples=25, stateful_step_count=15, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLoRAStateMachine = LoRAMachine.TestCase
