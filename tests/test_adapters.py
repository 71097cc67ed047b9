"""save_adapter / load_adapter: round trips, validation before change, corrupt files, atomic writes."""
import json
import os

import pytest
import safetensors.torch
import torch
import torch.nn as nn

import lora_edu as L
from lora_edu.atomic import atomic_write_bytes


class Net(nn.Module):
    def __init__(self, d=12, out=5, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(10, d)
        self.q_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.head = nn.Linear(d, out)

    def forward(self, ids):
        h = self.emb(ids)
        return self.head(torch.tanh(self.q_proj(h)) + self.v_proj(h))


IDS = torch.arange(10).reshape(2, 5)


def trained(seed=0, **kw):
    m = Net(seed=seed).double()
    L.add_lora(m, ["q_proj", "v_proj", "emb"], r=3, alpha=6, **kw)
    g = torch.Generator().manual_seed(seed + 10)
    with torch.no_grad():
        for p in L.lora_parameters(m):
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    return m


def test_roundtrip_into_plain_model(tmp_path):
    m = trained()
    y = m(IDS)
    path = L.save_adapter(m, tmp_path / "a.safetensors")
    cfg = L.read_adapter_config(path)
    assert cfg["r"] == 3 and cfg["alpha"] == 6 and cfg["scale_rule"] == "alpha/r" and cfg["dtype"] == "float64"
    assert set(cfg["targets"]) == {"emb", "q_proj", "v_proj"}
    # only LoRA tensors in the file
    keys = set(safetensors.torch.load_file(path))
    assert keys == {f"{n}.{k}" for n in ("emb", "q_proj", "v_proj") for k in ("lora_A", "lora_B")}
    fresh = Net(seed=0).double()
    L.load_adapter(fresh, path)
    torch.testing.assert_close(fresh(IDS), y, rtol=0, atol=0)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        n for n, p in m.named_parameters() if p.requires_grad
    }


def test_roundtrip_into_model_with_lora_and_rslora(tmp_path):
    m = trained(rslora=True)
    y = m(IDS)
    L.save_adapter(m, tmp_path / "a.safetensors")
    other = Net(seed=0).double()
    L.add_lora(other, ["q_proj", "v_proj", "emb"], r=3, alpha=6, rslora=True)
    L.load_adapter(other, tmp_path / "a.safetensors")
    torch.testing.assert_close(other(IDS), y, rtol=0, atol=0)


def test_trainable_head_is_saved(tmp_path):
    m = Net().double()
    L.add_lora(m, ["q_proj"], r=2, alpha=2, trainable_modules=["head"])
    with torch.no_grad():
        m.head.weight.add_(1.0)
        m.q_proj.B.normal_()
    y = m(IDS)
    L.save_adapter(m, tmp_path / "a.safetensors")
    fresh = Net().double()
    L.load_adapter(fresh, tmp_path / "a.safetensors")
    torch.testing.assert_close(fresh(IDS), y, rtol=0, atol=0)
    assert fresh.head.weight.requires_grad


def test_mismatched_rank_and_scale_rule(tmp_path):
    L.save_adapter(trained(), tmp_path / "a.safetensors")
    other = L.add_lora(Net().double(), ["q_proj", "v_proj", "emb"], r=4, alpha=6)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(L.AdapterFileError, match="with r=4, alpha=6, scale alpha/r in the model but r=3, alpha=6, scale alpha/r in the file"):
        L.load_adapter(other, tmp_path / "a.safetensors")
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())  # nothing half-loaded
    other = L.add_lora(Net().double(), ["q_proj", "v_proj", "emb"], r=3, alpha=8)
    with pytest.raises(L.AdapterFileError, match="r=3, alpha=8, scale alpha/r in the model but r=3, alpha=6, scale alpha/r in the file"):
        L.load_adapter(other, tmp_path / "a.safetensors")
    other = L.add_lora(Net().double(), ["q_proj", "v_proj", "emb"], r=3, alpha=6, rslora=True)
    with pytest.raises(L.AdapterFileError, match=r"scale alpha/sqrt\(r\) in the model but r=3, alpha=6, scale alpha/r in the file"):
        L.load_adapter(other, tmp_path / "a.safetensors")


def test_mismatched_architecture(tmp_path):
    L.save_adapter(trained(), tmp_path / "a.safetensors")

    class Wider(Net):
        def __init__(self):
            super().__init__(d=16)

    with pytest.raises(L.AdapterFileError, match=r"'emb' has A \(3, 10\) and B \(12, 3\); with r=3 this (LoRA)?Embedding"):
        L.load_adapter(Wider().double(), tmp_path / "a.safetensors")
    bare = nn.Sequential(nn.Linear(12, 12))
    with pytest.raises(L.AdapterFileError, match="the model has no module 'emb'"):
        L.load_adapter(bare, tmp_path / "a.safetensors")


def test_mismatched_layers_and_dtype(tmp_path):
    L.save_adapter(trained(), tmp_path / "a.safetensors")
    only_q = L.add_lora(Net().double(), ["q_proj"], r=3, alpha=6)
    with pytest.raises(L.AdapterFileError, match="covers other layers than the file"):
        L.load_adapter(only_q, tmp_path / "a.safetensors")
    f32 = Net()
    with pytest.raises(L.AdapterFileError, match="is float64 but the model's adapter dtype is float32; pass cast=True"):
        L.load_adapter(f32, tmp_path / "a.safetensors")
    L.load_adapter(f32, tmp_path / "a.safetensors", cast=True)
    assert f32.q_proj.A.dtype == torch.float32


def test_truncated_and_corrupt_files(tmp_path):
    path = L.save_adapter(trained(), tmp_path / "a.safetensors")
    data = path.read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) // 2])
    m = Net().double()
    with pytest.raises(L.AdapterFileError, match="corrupt or truncated"):
        L.load_adapter(m, tmp_path / "t.safetensors")
    (tmp_path / "g.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(L.AdapterFileError, match="not a readable safetensors file"):
        L.load_adapter(m, tmp_path / "g.safetensors")
    with pytest.raises(L.AdapterFileError, match="no adapter file at"):
        L.load_adapter(m, tmp_path / "missing.safetensors")
    safetensors.torch.save_file({"x": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(L.AdapterFileError, match="not a lora_edu adapter"):
        L.load_adapter(m, tmp_path / "other.safetensors")
    assert not list(L.lora_layers(m))


def test_nan_tensor_refused(tmp_path):
    m = trained()
    with torch.no_grad():
        m.q_proj.B[0, 0] = float("nan")
    L.save_adapter(m, tmp_path / "a.safetensors")
    with pytest.raises(L.AdapterFileError, match="NaN or inf"):
        L.load_adapter(Net().double(), tmp_path / "a.safetensors")


def test_tampered_config(tmp_path):
    m = trained()
    path = L.save_adapter(m, tmp_path / "a.safetensors")
    tensors = safetensors.torch.load_file(path)
    cfg = L.read_adapter_config(path)
    cfg["layers"]["q_proj"]["r"] = 5
    safetensors.torch.save_file(
        tensors, tmp_path / "b.safetensors", metadata={"format": "lora_edu.adapter", "format_version": "1", "config": json.dumps(cfg)}
    )
    with pytest.raises(L.AdapterFileError, match=r"'q_proj' has A \(3, 12\) and B \(12, 3\); with r=5 this Linear"):
        L.load_adapter(Net().double(), tmp_path / "b.safetensors")


def test_save_refuses_empty():
    with pytest.raises(ValueError, match="no LoRA adapters to save"):
        L.save_adapter(Net(), "/nonexistent/x.safetensors")


def test_atomic_write_keeps_old_file_on_crash(tmp_path, monkeypatch):
    path = L.save_adapter(trained(seed=0), tmp_path / "a.safetensors")
    good = path.read_bytes()

    def crash(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        L.save_adapter(trained(seed=1), path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # temp file cleaned up


def test_atomic_write_bytes(tmp_path):
    p = atomic_write_bytes(tmp_path / "sub" / "f.bin", b"abc")
    assert p.read_bytes() == b"abc"
    mask = os.umask(0)
    os.umask(mask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600
