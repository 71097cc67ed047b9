"""Issue 11, hardening: one test per defect found by trying lora_edu as a hostile user would.

Each test reproduces the defect as the issue describes it and asserts the new behaviour:
an error of the documented type whose message says what to do, with the model left
exactly as it was (:func:`snapshot` compares every tensor, flag and adapter), or the
right numbers against a float64 oracle written here independently of the library.
The CLI and grading defects of the issue are tested with the CLI and the grader.
"""
from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import safetensors
import safetensors.torch
import torch
import torch.nn as nn

import lora_edu as L
from lora_edu import AdapterFileError
from lora_edu.adapters.peft import CONFIG_NAME, WEIGHTS_NAME

F64 = torch.float64


class Net(nn.Module):
    """Embedding -> Linear -> tanh -> Linear: one layer of each kind LoRA wraps."""

    def __init__(self, vocab=7, dim=4, hidden=5, out=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out)

    def forward(self, ids):
        return self.fc2(torch.tanh(self.fc1(self.emb(ids))))


IDS = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 0]])


def net(seed=0):
    return Net(seed=seed).to(F64)


def randomize(model, seed=1, std=0.3):
    """Nonzero A and B for every adapter (B = 0 at init would make every comparison trivially pass)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in L.lora_layers(model):
            for p in (*layer.lora_A.values(), *layer.lora_B.values()):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model


def adapted(targets=("emb", "fc1", "fc2"), seed=0, **kw):
    kw = {"r": 2, "alpha": 4, **kw}
    return randomize(L.add_lora(net(seed), list(targets), **kw), seed=seed + 1)


def snapshot(model):
    """Everything a failed call must leave as it was: tensors, requires_grad, module types, adapters, merge state."""
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "types": {n: type(m).__name__ for n, m in model.named_modules()},
        "layers": {n: (list(layer.adapters), layer.active_adapter, layer.merged_adapter) for n, layer in L.lora_layers(model)},
        "registry": copy.deepcopy(getattr(model, "lora_trainable_modules", None)),
    }


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after["types"] == before["types"]
    assert after["layers"] == before["layers"]
    assert after["grad"] == before["grad"]
    assert after["registry"] == before["registry"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for k, v in before["tensors"].items():
        assert torch.equal(after["tensors"][k], v), k


# ---- the float64 oracle: Net's forward written out with explicit W, b, A, B, s --------------------------


def base_params(model):
    """{layer: (W, b)} of the base model, whether or not a layer is wrapped."""
    out = {}
    for n in ("emb", "fc1", "fc2"):
        m = model.get_submodule(n)
        base = m.base if isinstance(m, L.LoRALayer) else m
        out[n] = (base.weight.detach().clone(), None if n == "emb" else base.bias.detach().clone())
    return out


def oracle(base, adapters, ids=IDS):
    """y of Net with ``adapters = {layer: (A, B, s)}`` active: E[ids] + s·Aᵀ[ids]Bᵀ, then x Wᵀ + b + s·x Aᵀ Bᵀ."""
    E, _ = base["emb"]
    h = E[ids]
    if "emb" in adapters:
        A, B, s = adapters["emb"]
        h = h + s * A.T[ids] @ B.T
    for n in ("fc1", "fc2"):
        W, b = base[n]
        y = h @ W.T + b
        if n in adapters:
            A, B, s = adapters[n]
            y = y + s * (h @ A.T @ B.T)
        h = torch.tanh(y) if n == "fc1" else y
    return h


def factors(model, name):
    """{layer: (A, B, s)} of adapter ``name``, as independent copies."""
    return {n: (layer.lora_A[name].detach().clone(), layer.lora_B[name].detach().clone(), layer.adapters[name].scale)
            for n, layer in L.lora_layers(model) if name in layer.adapters}


def close(a, b, tol=1e-10):
    assert (a - b).abs().max().item() <= tol * (1 + b.abs().max().item())


# ---- native-file surgery ------------------------------------------------------------------------------------


def rewrite_native(path, edit_config=None, extra_tensors=None):
    """Rewrite a native adapter file with its JSON config edited and/or tensors added (as a hostile user would)."""
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = safetensors.torch.load_file(path)
    cfg = json.loads(meta["config"])
    if edit_config:
        edit_config(cfg)
    tensors.update(extra_tensors or {})
    meta["config"] = json.dumps(cfg)
    safetensors.torch.save_file(tensors, path, metadata=meta)
    return path


# =========================================================================== Data loss


def test_peft_save_into_existing_folder_keeps_other_files(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "README.md").write_text("my notes")
    (folder / "sub").mkdir()
    (folder / "sub" / "trainer_state.json").write_text("{}")
    m = adapted()
    L.save_adapter(m, folder, format="peft")
    L.save_adapter(m, folder, format="peft")  # a second save too
    assert (folder / "README.md").read_text() == "my notes" and (folder / "sub" / "trainer_state.json").read_text() == "{}"
    assert sorted(p.name for p in folder.iterdir()) == sorted(["README.md", "sub", CONFIG_NAME, WEIGHTS_NAME])  # no temp files
    fresh = net()
    L.load_adapter(fresh, folder)
    close(fresh(IDS), m(IDS), 0)


def test_peft_save_into_symlinked_folder_works_twice(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "keep.txt").write_text("x")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    m = adapted()
    for seed in (1, 2):
        randomize(m, seed=seed)
        L.save_adapter(m, link, format="peft")
        assert link.is_symlink() and link.resolve() == real.resolve()  # the link is not replaced by a folder
        fresh = net()
        L.load_adapter(fresh, real)
        close(fresh(IDS), m(IDS), 0)
    assert (real / "keep.txt").read_text() == "x"


def test_crash_during_peft_save_leaves_previous_adapter_loadable(tmp_path, monkeypatch):
    folder = tmp_path / "adapter"
    old = adapted()
    L.save_adapter(old, folder, format="peft")
    y_old = old(IDS)
    new = randomize(copy.deepcopy(old), seed=7)

    def crash(*args, **kwargs):
        raise OSError("disk unplugged")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="unplugged"):
        L.save_adapter(new, folder, format="peft")
    monkeypatch.undo()
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])  # temp files cleaned up
    fresh = net()
    L.load_adapter(fresh, folder)
    close(fresh(IDS), y_old, 0)


def test_peft_save_torn_between_weights_and_config_is_refused_not_misread(tmp_path, monkeypatch):
    """An interruption between the two renames: new weights beside the old config, same shapes, another α."""
    folder = tmp_path / "adapter"
    L.save_adapter(adapted(alpha=4), folder, format="peft")
    new = adapted(alpha=8)  # same shapes: only the scale differs, which no shape check could notice
    real_replace, calls = os.replace, []

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("killed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_second)
    with pytest.raises(OSError, match="killed"):
        L.save_adapter(new, folder, format="peft")
    monkeypatch.undo()
    fresh = net()
    before = snapshot(fresh)
    with pytest.raises(AdapterFileError, match="interrupted save_adapter"):
        L.load_adapter(fresh, folder)
    assert_unchanged(fresh, before)
    L.save_adapter(new, folder, format="peft")  # saving again repairs it
    L.load_adapter(fresh, folder)
    close(fresh(IDS), new(IDS), 0)


def test_native_save_to_existing_folder_says_what_to_do(tmp_path):
    with pytest.raises(IsADirectoryError, match=r"pass a file path such as .*adapter\.safetensors.*format='peft'"):
        L.save_adapter(adapted(), tmp_path)
    assert list(tmp_path.iterdir()) == []


# =========================================================================== Half-applied changes


def test_native_load_into_model_with_merged_adapter_changes_nothing(tmp_path):
    path = L.save_adapter(adapted(targets=["fc1", "fc2"]), tmp_path / "a.safetensors", adapter="default")
    m = adapted(targets=["fc1"], adapter="other")  # fc2 is still a plain Linear: loading would wrap it
    L.merge_lora(m)
    before = snapshot(m)
    with pytest.raises(AdapterFileError, match=r"merged adapter; unmerge_lora\(model\) before loading"):
        L.load_adapter(m, path)
    assert_unchanged(m, before)


@pytest.mark.parametrize("field,value,message", [
    ("alpha", -1.0, "alpha must be > 0"),
    ("alpha", "16", "alpha must be a finite positive number"),
    ("r", 0, "r must be a positive int"),
    ("r", 2.0, "r must be an int"),
    ("dropout", 1.5, "dropout must be a probability"),
])
def test_native_load_with_bad_per_layer_setting_changes_nothing(tmp_path, field, value, message):
    path = L.save_adapter(adapted(), tmp_path / "a.safetensors")

    def spoil(cfg):  # only the last layer is bad: a loader that applies as it goes would have changed the others
        cfg["layers"]["fc2"][field] = value

    rewrite_native(path, spoil)
    m = net()
    before = snapshot(m)
    with pytest.raises(AdapterFileError, match=message):
        L.load_adapter(m, path)
    assert_unchanged(m, before)


def test_add_second_adapter_on_merged_model_changes_nothing():
    m = adapted(targets=["fc1"])
    L.merge_lora(m)
    before = snapshot(m)
    with pytest.raises(RuntimeError, match=r"unmerge_lora\(model\) before adding another adapter"):
        L.add_lora(m, ["fc1", "fc2"], r=2, alpha=4, adapter="second")  # fc2 would have been wrapped first
    assert_unchanged(m, before)


@pytest.mark.parametrize("name", ["training", "keys", "update", "_parameters", "not an identifier"])
def test_add_lora_with_reserved_adapter_name_raises_before_freezing(name):
    m = net()
    before = snapshot(m)
    assert all(before["grad"].values())
    with pytest.raises(ValueError, match="adapter name"):
        L.add_lora(m, ["fc1"], r=2, alpha=4, adapter=name)
    assert_unchanged(m, before)


# =========================================================================== Silent wrong answers


def test_undeclared_modules_tensor_in_native_file_is_refused(tmp_path):
    path = L.save_adapter(adapted(), tmp_path / "a.safetensors")
    rewrite_native(path, extra_tensors={"modules.fc2.weight": torch.zeros(3, 5, dtype=F64)})  # zero a frozen base W
    m = net()
    before = snapshot(m)
    with pytest.raises(AdapterFileError, match=r"'fc2.weight' belongs to no declared trainable module.*refusing to overwrite"):
        L.load_adapter(m, path)
    assert_unchanged(m, before)


def test_undeclared_tensor_outside_modules_prefix_is_refused(tmp_path):
    path = L.save_adapter(adapted(), tmp_path / "a.safetensors")
    rewrite_native(path, extra_tensors={"fc2.weight": torch.zeros(3, 5, dtype=F64)})
    with pytest.raises(AdapterFileError, match="not declared in the file's config"):
        L.load_adapter(net(), path)


@pytest.mark.parametrize("value", ["false", "true", 0, 1, None])
def test_rslora_that_is_not_a_boolean_is_refused_in_native_config(tmp_path, value):
    path = L.save_adapter(adapted(), tmp_path / "a.safetensors")

    def spoil(cfg):
        cfg["layers"]["fc1"]["rslora"] = value

    rewrite_native(path, spoil)
    m = net()
    before = snapshot(m)
    with pytest.raises(AdapterFileError, match="rslora must be true or false"):
        L.load_adapter(m, path)
    assert_unchanged(m, before)


@pytest.mark.parametrize("value", ["false", "true", 0, 1])
def test_use_rslora_that_is_not_a_boolean_is_refused_in_peft_config(tmp_path, value):
    folder = L.save_adapter(adapted(), tmp_path / "peft", format="peft")
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    cfg["use_rslora"] = value
    (folder / CONFIG_NAME).write_text(json.dumps(cfg))
    m = net()
    before = snapshot(m)
    with pytest.raises(AdapterFileError, match="use_rslora must be true or false"):
        L.load_adapter(m, folder)
    assert_unchanged(m, before)


@pytest.mark.parametrize("field,value", [("modules_to_save", 5), ("modules_to_save", [None]), ("exclude_modules", {"a": 1}),
                                         ("r", "8"), ("lora_alpha", True), ("lora_dropout", "0.1"), ("target_modules", 3)])
def test_peft_config_fields_of_the_wrong_type_are_refused(tmp_path, field, value):
    folder = L.save_adapter(adapted(), tmp_path / "peft", format="peft")
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    cfg[field] = value
    (folder / CONFIG_NAME).write_text(json.dumps(cfg))
    m = net()
    before = snapshot(m)
    with pytest.raises(AdapterFileError, match=field):
        L.load_adapter(m, folder)
    assert_unchanged(m, before)


def test_delete_active_adapter_that_covered_fewer_layers_activates_the_remaining_one():
    m = adapted(targets=["fc1", "fc2"], adapter="wide")
    L.add_lora(m, ["fc1"], r=2, alpha=4, adapter="narrow")  # active; fc2 has no 'narrow' so runs as its base
    randomize(m, seed=5)
    base, wide = base_params(m), factors(m, "wide")
    L.delete_adapter(m, "narrow")
    assert L.active_adapter(m) == "wide"
    assert {n: layer.active_adapter for n, layer in L.lora_layers(m)} == {"fc1": "wide", "fc2": "wide"}
    close(m(IDS), oracle(base, wide))
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {f"{n}.lora_{f}.wide" for n in ("fc1", "fc2") for f in "AB"}
    L.delete_adapter(m, "wide")  # none left: the model is the base model
    assert L.active_adapter(m) is None
    close(m(IDS), oracle(base, {}))


def test_merged_state_dict_into_fresh_lora_model_is_not_merged_twice():
    m = adapted()
    base, ad = base_params(m), factors(m, "default")
    L.merge_lora(m)
    sd = m.state_dict()
    fresh = L.add_lora(net(seed=3), ["emb", "fc1", "fc2"], r=2, alpha=4)  # other base weights, fresh adapter
    fresh.load_state_dict(sd)
    close(fresh(IDS), oracle(base, ad))
    assert all(layer.merged for _, layer in L.lora_layers(fresh))
    assert L.lora_parameters(fresh) == []  # merged adapters are frozen
    L.unmerge_lora(fresh)
    for n, (W, b) in base_params(fresh).items():
        close(W, base[n][0], 1e-15)
    close(fresh(IDS), oracle(base, ad))


def test_state_dict_restores_the_active_adapter():
    m = adapted(targets=["fc1", "fc2"], adapter="a")
    L.add_lora(m, ["fc1"], r=2, alpha=4, adapter="b")
    randomize(m, seed=2)
    L.set_adapter(m, "a")
    y = m(IDS)
    fresh = L.add_lora(net(), ["fc1", "fc2"], r=2, alpha=4, adapter="a")
    L.add_lora(fresh, ["fc1"], r=2, alpha=4, adapter="b")  # 'b' active after building
    fresh.load_state_dict(m.state_dict())
    assert L.active_adapter(fresh) == "a"
    close(fresh(IDS), y, 0)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {n for n, p in m.named_parameters() if p.requires_grad}


def test_backward_merge_step_unmerge_restores_W_exactly():
    m = adapted(targets=["fc1", "fc2"])
    W0 = {n: layer.base.weight.detach().clone() for n, layer in L.lora_layers(m)}
    ad = factors(m, "default")
    opt = torch.optim.SGD(L.lora_parameters(m), lr=0.5)
    m(IDS).pow(2).sum().backward()  # gradients computed unmerged ...
    L.merge_lora(m)  # ... are dropped by the merge (A and B frozen while merged) ...
    assert all(p.grad is None and not p.requires_grad for _, layer in L.lora_layers(m) for p in layer.lora_factors())
    opt.step()  # ... so this step changes nothing
    close(m(IDS), oracle(base_params(net()), ad))
    L.unmerge_lora(m)
    for n, layer in L.lora_layers(m):
        close(layer.base.weight, W0[n], 1e-15)
        assert layer.A.requires_grad and layer.B.requires_grad


def test_changing_A_in_place_while_merged_raises_and_unmerge_is_exact():
    m = adapted(targets=["fc1"])
    W0 = m.fc1.base.weight.detach().clone()
    L.merge_lora(m)
    with torch.no_grad():
        m.fc1.lora_A["default"].add_(1.0)
    with pytest.raises(RuntimeError, match="changed in place while merged"):
        m(IDS)
    with pytest.raises(RuntimeError, match="changed in place while merged"):
        m.state_dict()  # (W, A, B) would describe another model: a fresh model would record the wrong ΔW
    L.check_merge_equivalence(m, IDS)  # must not re-record the merge with the changed A
    L.unmerge_lora(m)
    close(m.fc1.base.weight, W0, 1e-15)
    m.state_dict()


def test_merged_model_copies_still_run():
    """deepcopy / pickle give A and B fresh version counters; that is not an in-place change."""
    m = adapted(targets=["fc1", "fc2"])
    opt = torch.optim.SGD(L.lora_parameters(m), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        m(IDS).pow(2).sum().backward()
        opt.step()  # version counters > 0
    L.merge_lora(m)
    y = m(IDS)
    twin = copy.deepcopy(m)
    close(twin(IDS), y, 0)
    L.unmerge_lora(twin)
    close(twin(IDS), y)


def test_tied_embedding_warns_at_injection_and_is_named_in_the_merge_report():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb = nn.Embedding(7, 4)
            self.lm_head = nn.Linear(4, 7, bias=False)
            self.lm_head.weight = self.emb.weight

        def forward(self, ids):
            return self.lm_head(self.emb(ids))

    m = Tied().to(F64)
    with pytest.warns(UserWarning, match=r"'emb' shares its weight with \['lm_head.weight'\]"):
        L.add_lora(m, ["emb"], r=2, alpha=4)
    randomize(m)
    report = L.check_merge_equivalence(m, IDS)
    assert report.tied == ("emb",) and not report.passed
    assert "tied weights" in str(report) and "without the scale" not in str(report)


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_layer_sees_a_weight_written_through_data(autocast):
    m = L.fuse(adapted(targets=["fc1", "fc2"]).float())
    x = torch.randn(3, 4)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.no_grad()
    with ctx:
        y_old = m.fc1(x)  # a first call (would fill a weight cache)
    m.fc1.base.weight.data.copy_(m.fc1.base.weight + 1.0)  # the source article's idiom: bypasses the version counter
    with ctx:
        y = m.fc1(x)
        expected = L.unfuse(copy.deepcopy(m)).fc1(x)
    tol = 2e-2 if autocast else 1e-6
    torch.testing.assert_close(y.float(), expected.float(), rtol=tol, atol=tol)
    assert (y.float() - y_old.float()).abs().max() > 0.5


def test_saving_while_other_parameters_are_trainable_warns(tmp_path):
    m = adapted(targets=["fc1"])
    m.fc2.requires_grad_(True)  # unfrozen by hand, trained, then the adapter is saved
    with pytest.warns(UserWarning, match=r"\['fc2.weight', 'fc2.bias'\] are trainable but not part of adapter 'default'"):
        L.save_adapter(m, tmp_path / "a.safetensors")
    with pytest.warns(UserWarning, match="trainable but not part of adapter"):
        L.save_adapter(m, tmp_path / "peft", format="peft")


def test_meta_device_init_then_to_empty_and_reset_parameters():
    with torch.device("meta"):
        m = Net().to(F64)
        L.add_lora(m, ["emb", "fc1", "fc2"], r=2, alpha=4)
    m.to_empty(device="cpu")
    with torch.no_grad():
        for _, layer in L.lora_layers(m):
            layer.B.fill_(float("nan"))  # what to_empty may leave: garbage
    for module in m.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    for n, layer in L.lora_layers(m):
        zero = layer.A if n == "emb" else layer.B  # embedding: A = 0, B ~ N(0, 1); linear: B = 0
        assert torch.equal(zero, torch.zeros_like(zero)) and torch.isfinite(layer.lora_factors()[0]).all()
    with torch.no_grad():
        y = m(IDS)
        with L.disable_lora(m):
            y_base = m(IDS)
    close(y, oracle(base_params(m), {}), 0)
    assert torch.equal(y, y_base)


# =========================================================================== Unhelpful crashes


@pytest.mark.parametrize("targets", [None, 3, [], ["fc1", None], [""]])
def test_bad_targets_say_what_to_pass(targets):
    m = net()
    before = snapshot(m)
    with pytest.raises((TypeError, ValueError), match=r"targets must be .*(list|string)"):
        L.add_lora(m, targets, r=2, alpha=4)
    assert_unchanged(m, before)


_INPUTS = {"1d": lambda: torch.randn(4), "empty": lambda: torch.randn(0, 4), "transposed": lambda: torch.randn(4, 3).T,
           "expanded": lambda: torch.randn(1, 4).expand(3, 4), "3d_strided": lambda: torch.randn(2, 2, 4).transpose(0, 1)}


@pytest.mark.parametrize("make,grad", [
    pytest.param(make, grad, id=f"{name}-{'grad' if grad else 'nograd'}")
    for name, make in _INPUTS.items() for grad in (False, True)
])
def test_fused_layer_accepts_what_the_plain_layer_accepts(make, grad):
    fused = L.fuse(adapted(targets=["fc1"]).float())
    plain = L.unfuse(copy.deepcopy(fused))
    x = make()
    xs = [x.clone().requires_grad_(grad), x.clone().requires_grad_(grad)]
    y, yp = fused.fc1(xs[0]), plain.fc1(xs[1])
    assert y.shape == yp.shape
    torch.testing.assert_close(y, yp)
    if grad:
        y.sum().backward()
        yp.sum().backward()
        torch.testing.assert_close(xs[0].grad, xs[1].grad)


def test_fused_layer_refuses_what_the_plain_layer_refuses_with_the_same_error():
    fused = L.fuse(adapted(targets=["fc1"]).float())
    plain = L.unfuse(copy.deepcopy(fused))
    for x in (torch.randn(2, 5), torch.randn(2, 4, dtype=F64), torch.ones(2, 4, dtype=torch.long)):
        with pytest.raises(Exception) as plain_error:
            plain.fc1(x)
        with pytest.raises(type(plain_error.value)):
            fused.fc1(x)


def test_trainable_module_that_is_or_contains_a_target_is_refused():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(4, 4)
            self.other = nn.Linear(4, 4)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()
            self.head = nn.Linear(4, 2)

    for trainable in (["block"], ["inner"]):
        m = Outer()
        before = snapshot(m)
        with pytest.raises(ValueError, match="is, contains or shares weights with the LoRA layer.*would unfreeze their base"):
            L.add_lora(m, ["inner"], r=2, alpha=4, trainable_modules=trainable)
        assert_unchanged(m, before)
    m = L.add_lora(Outer(), ["inner"], r=2, alpha=4, trainable_modules=["head"])
    assert not m.block.inner.base.weight.requires_grad and m.head.weight.requires_grad


def test_trainable_module_tied_to_a_target_is_refused():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4)
            self.lm_head = nn.Linear(4, 7, bias=False)
            self.lm_head.weight = self.emb.weight

    m = Tied()
    before = snapshot(m)
    with pytest.raises(ValueError, match=r"'lm_head' is, contains or shares weights with the LoRA layer\(s\) \['emb'\]"):
        L.add_lora(m, ["emb"], r=2, alpha=4, trainable_modules=["lm_head"])
    assert_unchanged(m, before)


def test_adapter_file_declaring_a_lora_layer_as_trainable_module_is_refused(tmp_path):
    path = L.save_adapter(adapted(), tmp_path / "a.safetensors")

    def spoil(cfg):
        cfg["trainable_modules"] = ["fc1"]

    rewrite_native(path, spoil)
    m = net()
    before = snapshot(m)
    with pytest.raises(AdapterFileError, match=r"trainable module 'fc1' is, contains or shares weights with the LoRA layer"):
        L.load_adapter(m, path)
    assert_unchanged(m, before)


# =========================================================================== Interop


def _falcon_linear():
    try:
        from transformers.models.falcon.modeling_falcon import FalconLinear
    except ImportError:  # the same class, as transformers defines it
        class FalconLinear(nn.Linear):
            def forward(self, input):
                hidden_states = input @ self.weight.T
                return hidden_states if self.bias is None else hidden_states + self.bias
    return FalconLinear


def test_falcon_linear_subclass_is_targetable_and_exact():
    FalconLinear = _falcon_linear()

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.query_key_value = FalconLinear(4, 12, bias=False)
            self.dense = FalconLinear(12, 4)

        def forward(self, x):
            return self.dense(self.query_key_value(x))

    m = Attn().to(F64)
    x = torch.randn(3, 4, dtype=F64)
    calls = []
    m.query_key_value.register_forward_hook(lambda *a: calls.append(1))
    L.add_lora(m, ["query_key_value", "dense"], r=2, alpha=4)
    assert calls == []  # the probe of the overridden forward runs no forward hook
    assert all(type(layer) is L.LoRALinear for _, layer in L.lora_layers(m))
    randomize(m)
    W1, W2 = m.query_key_value.base.weight, m.dense.base.weight
    (A1, B1), (A2, B2) = m.query_key_value.lora_factors(), m.dense.lora_factors()
    h = x @ W1.T + 2 * x @ A1.T @ B1.T
    expected = h @ W2.T + m.dense.base.bias + 2 * h @ A2.T @ B2.T
    close(m(x), expected)
    assert L.check_merge_equivalence(m, x).passed


def test_linear_subclass_with_other_maths_is_refused_with_a_helpful_message():
    class GeluLinear(nn.Linear):
        def forward(self, x):
            return torch.nn.functional.gelu(super().forward(x))

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(GeluLinear(4, 4), nn.Linear(4, 4))

    m = M()
    before = snapshot(m)
    with pytest.raises(TypeError) as e:
        L.add_lora(m, ["block.0"], r=2, alpha=4)
    msg = str(e.value)
    assert "subclasses nn.Linear but its forward() does not compute x Wᵀ + b" in msg
    assert "target the layers inside it" not in msg and "block.1" in msg  # what can be wrapped instead
    assert_unchanged(m, before)


def test_linear_subclass_on_the_meta_device_is_refused_saying_why():
    FalconLinear = _falcon_linear()
    with torch.device("meta"):
        m = nn.Sequential(FalconLinear(4, 4))
    with pytest.raises(TypeError, match=r"on the meta device there are no weights to check.*register_lora_layer\(FalconLinear"):
        L.add_lora(m, ["0"], r=2, alpha=4)


class TinyLM(nn.Module):
    """A transformers-like LM: get_input_embeddings / get_output_embeddings tell PEFT which layers are embeddings."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed_tokens = nn.Embedding(11, 8)
        self.proj = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 11)

    def forward(self, ids):
        return self.lm_head(torch.tanh(self.proj(self.embed_tokens(ids))))

    def get_input_embeddings(self):
        return self.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head


@pytest.mark.interop
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("targets", [["embed_tokens", "proj"], ["embed_tokens", "proj", "lm_head"]])
def test_peft_adapter_with_saved_embedding_weights(tmp_path, targets):
    peft = pytest.importorskip("peft")
    base = TinyLM()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets,
                                                                   init_lora_weights=False))
    pm.save_pretrained(tmp_path, save_embedding_layers=True)
    keys = set(safetensors.torch.load_file(tmp_path / WEIGHTS_NAME))
    assert "base_model.model.embed_tokens.base_layer.weight" in keys  # PEFT stored the base embedding too
    ids = torch.tensor([[1, 2, 3], [4, 5, 10]])
    with torch.no_grad():
        expected = pm(ids)

    fresh = copy.deepcopy(base)
    L.load_adapter(fresh, tmp_path)  # the stored weights equal the model's: accepted
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), expected, rtol=0, atol=1e-6)

    other = TinyLM(seed=1)  # another base model: its embedding differs from the stored one
    before = snapshot(other)
    with pytest.raises(AdapterFileError, match=r"carries the base parameter '(embed_tokens|lm_head)\.base_layer\.(weight|bias)'.*differs from this model"):
        L.load_adapter(other, tmp_path)
    assert_unchanged(other, before)


@pytest.mark.interop
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_peft_adapter_with_saved_untargeted_embeddings(tmp_path):
    """save_embedding_layers=True with embeddings not targeted stores the whole embedding modules (e.g. after a resize)."""
    peft = pytest.importorskip("peft")
    base = TinyLM()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["proj"],
                                                                   init_lora_weights=False))
    pm.save_pretrained(tmp_path, save_embedding_layers=True)
    assert "base_model.model.lm_head.bias" in set(safetensors.torch.load_file(tmp_path / WEIGHTS_NAME))
    fresh = copy.deepcopy(base)
    L.load_adapter(fresh, tmp_path)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), pm(ids), rtol=0, atol=1e-6)
    resized = copy.deepcopy(base)
    with torch.no_grad():
        resized.lm_head.bias.add_(1.0)
    with pytest.raises(AdapterFileError, match="'base_model.model.lm_head.bias'|'lm_head.bias'"):
        L.load_adapter(resized, tmp_path)


@pytest.mark.interop
def test_peft_folder_written_by_lora_edu_still_loads_in_peft_after_fingerprint(tmp_path):
    """The config fingerprint lives in the weights file's metadata, which PEFT ignores."""
    peft = pytest.importorskip("peft")
    m = adapted(targets=["fc1", "fc2"])
    L.save_adapter(m, tmp_path, format="peft")
    with safetensors.safe_open(str(tmp_path / WEIGHTS_NAME), framework="pt") as f:
        assert f.metadata()["format"] == "pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(net(), str(tmp_path))
    with torch.no_grad():
        close(pm(IDS), m(IDS), 1e-12)


# =========================================================================== Review of the core (hyper-parameters travel and are checked)


@pytest.mark.parametrize("other", [{"alpha": 8}, {"r": 3}, {"rslora": True}])
@pytest.mark.parametrize("merged", [True, False])
def test_state_dict_into_adapter_with_other_r_alpha_or_rslora_is_refused(other, merged):
    m = adapted(targets=["fc1", "fc2"])  # r=2, alpha=4
    if merged:
        L.merge_lora(m)
    sd = m.state_dict()
    fresh = L.add_lora(net(), ["fc1", "fc2"], **{"r": 2, "alpha": 4, **other})
    if "r" in other:  # another r also changes the shapes: drop the factors, the extra state alone must refuse
        sd = {k: v for k, v in sd.items() if "lora_" not in k}
    with pytest.raises(RuntimeError, match=r"adapter 'default' has r=2, alpha=4.0, rslora=False but this layer's has"):
        fresh.load_state_dict(sd, strict=False)


def test_state_dict_with_the_same_hyperparameters_and_older_extra_state_formats_still_load():
    m = adapted(targets=["fc1"])
    L.merge_lora(m)
    fresh = L.add_lora(net(), ["fc1"], r=2, alpha=4)
    fresh.load_state_dict(m.state_dict())
    L.unmerge_lora(fresh)
    assert torch.equal(fresh.fc1.base.weight, net().fc1.weight)
    for old in ('{"active": "default", "merged": "default"}', "default"):  # the JSON without "adapters", and the first format
        sd = m.state_dict()
        sd["fc1._extra_state"] = torch.tensor(list(old.encode()), dtype=torch.uint8)
        fresh = L.add_lora(net(), ["fc1"], r=2, alpha=4)
        fresh.load_state_dict(sd)
        assert fresh.fc1.merged_adapter == "default"


@pytest.mark.parametrize("damage", [
    torch.tensor([0xff, 0xfe], dtype=torch.uint8),  # not UTF-8
    torch.tensor(list(b'{"active": '), dtype=torch.uint8),  # truncated JSON
    torch.tensor([1.0, 2.0]),  # not uint8
])
def test_damaged_extra_state_is_a_clear_error(damage):
    m = adapted(targets=["fc1"])
    sd = m.state_dict()
    sd["fc1._extra_state"] = damage
    with pytest.raises(RuntimeError, match="_extra_state in the state dict .*damaged"):
        L.add_lora(net(), ["fc1"], r=2, alpha=4).load_state_dict(sd)


def test_check_merge_equivalence_with_a_list_says_pass_a_tuple():
    m = adapted()
    before = snapshot(m)
    with pytest.raises(TypeError, match=r"tuple of its positional arguments, got a list"):
        L.check_merge_equivalence(m, [IDS])
    assert_unchanged(m, before)


def test_register_lora_layer_checks_its_arguments():
    with pytest.raises(TypeError, match="base_type must be an nn.Module subclass"):
        L.register_lora_layer("x", 3)
    with pytest.raises(TypeError, match="lora_type must be a LoRALayer subclass or a callable"):
        L.register_lora_layer(nn.Linear, 3)
    from lora_edu.core.kinds import USER_LAYER_TYPES
    assert "x" not in USER_LAYER_TYPES and nn.Linear not in USER_LAYER_TYPES


def test_peft_modules_to_save_without_their_tensors_is_refused(tmp_path):
    m = adapted(targets=["fc1"], trainable_modules=["fc2"])
    folder = L.save_adapter(m, tmp_path / "p", format="peft")
    tensors = safetensors.torch.load_file(folder / WEIGHTS_NAME)
    safetensors.torch.save_file({k: v for k, v in tensors.items() if ".fc2." not in f".{k}"}, folder / WEIGHTS_NAME)
    target = net()
    before = snapshot(target)
    with pytest.raises(AdapterFileError, match=r"modules_to_save=\['fc2'\] selects \['fc2'\] .* has no tensors"):
        L.load_adapter(target, folder)
    assert_unchanged(target, before)


@pytest.mark.parametrize("field,value", [("layers_to_transform", [0]), ("layers_to_transform", 0), ("layers_pattern", "layers")])
def test_peft_layers_to_transform_and_layers_pattern_are_refused(tmp_path, field, value):
    folder = L.save_adapter(adapted(targets=["fc1"]), tmp_path / "p", format="peft")
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    cfg[field] = value
    (folder / CONFIG_NAME).write_text(json.dumps(cfg))
    target = net()
    before = snapshot(target)
    with pytest.raises(AdapterFileError, match=f"{field}=.* is not supported"):
        L.load_adapter(target, folder)
    assert_unchanged(target, before)


def test_numpy_scalars_are_accepted_and_stored_as_python_numbers():
    np = pytest.importorskip("numpy")
    m = L.add_lora(net(), ["fc1"], r=np.int64(2), alpha=np.float32(16), dropout=np.float64(0.1))
    cfg = m.fc1.config
    assert (type(cfg.r), type(cfg.alpha), type(cfg.dropout)) == (int, float, float)
    assert (cfg.r, cfg.alpha, cfg.scale) == (2, 16.0, 8.0)
    json.dumps([cfg.r, cfg.alpha])  # plain Python numbers: they go into adapter files
    for bad in (True, np.bool_(True)):
        with pytest.raises(TypeError, match="r must be a positive int"):
            L.add_lora(net(), ["fc1"], r=bad, alpha=4)
        with pytest.raises(TypeError, match="alpha must be a finite positive number"):
            L.add_lora(net(), ["fc1"], r=2, alpha=bad)


@pytest.mark.parametrize("field,value", [("r", 999), ("alpha", -3), ("scale_rule", "alpha/sqrt(r)"), ("r", True)])
def test_native_top_level_settings_must_agree_with_the_layers(tmp_path, field, value):
    path = L.save_adapter(adapted(), tmp_path / "a.safetensors")
    rewrite_native(path, lambda cfg: cfg.update({field: value}))
    target = net()
    before = snapshot(target)
    with pytest.raises(AdapterFileError, match=f"top-level {field}=.* contradicts its layers"):
        L.load_adapter(target, path)
    assert_unchanged(target, before)


def test_native_base_shape_must_match_the_models_layer(tmp_path):
    path = L.save_adapter(adapted(), tmp_path / "a.safetensors")
    assert read_layers(path)["fc1"]["base_shape"] == [5, 4]  # (out, in)
    rewrite_native(path, lambda cfg: cfg["layers"]["fc1"].update(base_shape=[5, 40]))
    target = net()
    before = snapshot(target)
    with pytest.raises(AdapterFileError, match=r"base layer of shape \(out, in\) = \(5, 40\) but this model's Linear is \(5, 4\)"):
        L.load_adapter(target, path)
    assert_unchanged(target, before)


def read_layers(path):
    with safetensors.safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["config"])["layers"]


def test_native_file_of_an_older_version_with_LoRAConv1D_still_loads_but_errors_do_not_advertise_it(tmp_path):
    path = L.save_adapter(adapted(targets=["fc1"]), tmp_path / "a.safetensors")
    rewrite_native(path, lambda cfg: cfg["layers"]["fc1"].update(type="LoRAConv1D"))
    assert isinstance(L.load_adapter(net(), path).fc1, L.LoRALinear)
    rewrite_native(path, lambda cfg: cfg["layers"]["fc1"].update(type="Bogus"))
    with pytest.raises(AdapterFileError, match="unknown layer type 'Bogus'") as err:
        L.load_adapter(net(), path)
    assert "LoRAConv1D" not in str(err.value)


@pytest.mark.parametrize("fmt", ["lora_edu", "peft"])
def test_loading_over_a_same_name_adapter_with_another_dropout_is_refused(tmp_path, fmt):
    path = L.save_adapter(adapted(targets=["fc1", "fc2"], dropout=0.3), tmp_path / "a", format=fmt)
    target = adapted(targets=["fc1", "fc2"], dropout=0.0)
    before = snapshot(target)
    with pytest.raises(AdapterFileError, match=r"dropout=0 in the model but dropout=0.3 in the file"):
        L.load_adapter(target, path)
    assert_unchanged(target, before)
    L.delete_adapter(target, "default")
    L.load_adapter(target, path)  # as the message says: the file's dropout is then used
    assert target.fc1.adapters["default"].dropout == 0.3


@pytest.mark.parametrize("alpha,rslora", [(1e308, False), (1e39, True)])
def test_alpha_whose_scale_overflows_is_refused_before_anything_changes(alpha, rslora):
    m = net()
    before = snapshot(m)
    with pytest.raises(ValueError, match="overflows float32"):
        L.add_lora(m, ["fc1"], r=2, alpha=alpha, rslora=rslora)
    assert_unchanged(m, before)


def test_rank_larger_than_the_layer_warns_that_it_is_legal_but_wasteful():
    with pytest.warns(UserWarning, match=r"r=4 is larger than min\(in, out\) = min\(5, 3\) = 3 .*legal, but wasteful"):
        m = L.add_lora(net(), ["fc2"], r=4, alpha=4)
    assert m.fc2.r == 4  # not an error
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        L.add_lora(net(), ["fc2"], r=3, alpha=4)


def test_unload_lora_leaves_no_lora_bookkeeping_on_the_plain_model():
    for merge in (True, False):
        m = L.unload_lora(adapted(trainable_modules=[]), merge=merge)
        assert not hasattr(m, "lora_trainable_modules")
        assert not any(isinstance(x, L.LoRALayer) for x in m.modules())


# ----------------------------------------------------------------------------- QLoRA and PiSSA injectors: refused calls change nothing
def _gpt_with_default_adapter():
    from lora_edu.lab.models import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, block_size=8, n_layer=1, n_head=2, d_model=32, d_ff=64))
    return L.add_lora(model, ["q_proj"], r=2, alpha=4)


@pytest.mark.parametrize("case", ["merged", "same name twice", "name already on one target"])
def test_add_qlora_refuses_before_quantising_anything(case):
    from lora_edu.variants import add_qlora

    model = _gpt_with_default_adapter()
    if case == "merged":
        L.merge_lora(model)
        call, err = dict(targets=["k_proj"], adapter="x"), (RuntimeError, "merged adapter")
    elif case == "same name twice":
        add_qlora(model, ["k_proj"], r=2, alpha=4, adapter="x")
        call, err = dict(targets=["k_proj"], adapter="x"), (ValueError, "already has an adapter named 'x'")
    else:
        call, err = dict(targets=["v_proj", "q_proj"], adapter="default"), (ValueError, "already has an adapter named 'default'")
    before = snapshot(model)
    with pytest.raises(err[0], match=err[1]):
        add_qlora(model, r=2, alpha=4, **call)
    assert_unchanged(model, before)


@pytest.mark.parametrize("case", ["embedding target", "fused layer"])
def test_add_pissa_refuses_before_adding_anything(case):
    from lora_edu.variants import add_pissa

    model = _gpt_with_default_adapter()
    if case == "fused layer":
        L.fuse(model)
        targets = ["q_proj"]
    else:
        targets = ["k_proj", "tok_emb"]
    before = snapshot(model)
    with pytest.raises(TypeError, match="PiSSA initialises plain linear layers only"):
        add_pissa(model, targets, r=2, alpha=2, adapter="p")
    assert_unchanged(model, before)
