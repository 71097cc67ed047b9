"""lora_edu.lab.data: determinism, no network, shapes, the tokenizer, and the planted-rank oracle."""
import socket

import pytest
import torch

from lora_edu.lab import data


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("lora_edu.lab.data must not touch the network")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(scope="module")
def lm():
    return data.lm_tasks(seed=0, block_size=32)


@pytest.fixture(scope="module")
def images():
    return data.image_tasks(seed=0, n_train=512, n_val=256)


def test_everything_builds_without_network(no_network):
    data._documents.cache_clear()
    data.corpus_splits.cache_clear()
    src, tgt = data.lm_tasks(block_size=16)
    data.image_tasks(n_train=64, n_val=64)
    data.planted_regression(d_in=8, d_out=8, k_star=2)
    assert len(src.data["train"]) > 100_000 and len(tgt.data["train"]) > 100_000


def test_tokenizer_fixed_vocab_roundtrip():
    tok = data.CharTokenizer()
    assert tok.vocab_size == 97 and tok.unk_id == 96
    text = "def f(x):\n    return x + 1  # ok ~"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("é") == [96] and tok.encode("\n") == [0] and tok.encode(" ") == [1]
    assert tok.encode("\t") == tok.encode("    ")


def test_corpora_sizes_origin_and_real_shift(lm):
    src, tgt = lm
    info = data.corpus_info()
    for which in ("source", "target"):
        assert 150_000 < info[which]["train_chars"] + info[which]["val_chars"] <= 250_000
        assert len(info[which]["sha256"]) == 64 and info[which]["origin"]
    src_text = src.tokenizer.decode(src.data["train"][:20000])
    tgt_text = tgt.tokenizer.decode(tgt.data["train"][:20000])
    # code has far more indentation and assignments than prose
    assert tgt_text.count("    ") > 5 * max(1, src_text.count("    "))
    assert tgt_text.count(" = ") > 3 * src_text.count(" = ")
    assert "def " in tgt_text and " the " in src_text
    # unknown characters are rare in both
    assert (src.data["train"] == 96).float().mean() < 0.01 and (tgt.data["train"] == 96).float().mean() < 0.01


def test_train_and_val_are_disjoint_and_non_empty(lm):
    for task in lm:
        assert len(task.data["val"]) > 10_000
        assert len(task.data["train"]) > 5 * len(task.data["val"])


def test_lm_batches_shapes_shift_and_determinism(lm):
    src, _ = lm
    x, y = src.get_batch("train", 4, torch.Generator().manual_seed(1))
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    x2, y2 = src.get_batch("train", 4, torch.Generator().manual_seed(1))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    with pytest.raises(ValueError):
        src.get_batch("test", 4)


def test_corpus_is_deterministic_across_calls():
    a = data.lm_tasks(block_size=16)
    data._documents.cache_clear()
    data.corpus_splits.cache_clear()
    b = data.lm_tasks(block_size=16)
    for ta, tb in zip(a, b):
        assert torch.equal(ta.data["train"], tb.data["train"]) and torch.equal(ta.data["val"], tb.data["val"])


def test_fallback_prose_source_exists():
    docs = data._prose_from_docstrings()
    assert sum(map(len, docs)) > 50_000


def test_lm_evaluate_uniform_model_is_log_vocab(lm):
    src, _ = lm

    class Uniform(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, idx):
            return torch.zeros(*idx.shape, 97) + self.w

    out = src.evaluate(Uniform(), "val", max_batches=3)
    assert out["loss"] == pytest.approx(torch.log(torch.tensor(97.0)).item(), rel=1e-6)
    assert out["ppl"] == pytest.approx(97.0, rel=1e-5)


def test_images_deterministic_balanced_and_shifted(images):
    src, tgt = images
    again, _ = data.image_tasks(seed=0, n_train=512, n_val=256)
    assert torch.equal(src.data["train"][0], again.data["train"][0])
    x, y = src.get_batch("train", 8, torch.Generator().manual_seed(0))
    assert x.shape == (8, 3, 16, 16) and y.shape == (8,) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1
    counts = torch.bincount(src.data["train"][1], minlength=6)
    assert counts.max() - counts.min() <= 1  # balanced
    # source: bright shapes on dark ground; target: dark on bright -> mean brightness differs
    assert tgt.data["val"][0].mean() > src.data["val"][0].mean() + 0.1
    assert not torch.equal(data.image_tasks(seed=1, n_train=64, n_val=64)[0].data["val"][0], src.data["val"][0][:64])


def test_image_evaluate_and_make_model(images):
    src, _ = images
    model = src.make_model("tiny")
    out = src.evaluate(model, "val")
    assert set(out) == {"loss", "acc"} and 0 <= out["acc"] <= 1
    loss = src.loss(model, src.get_batch("train", 4))
    assert loss.ndim == 0 and loss.requires_grad


def test_planted_rank_is_exact_and_oracle_values():
    task = data.planted_regression(d_in=16, d_out=12, k_star=3, seed=0)
    s = torch.linalg.svdvals(task.delta_W_star)
    assert (s[:3] > 0.4).all() and (s[3:] < 1e-12).all()  # rank exactly k* = 3
    torch.testing.assert_close(s[:3], torch.tensor([1.0, 0.75, 0.5], dtype=torch.float64))
    # the teacher's own student has excess = ||dW*||_F^2 / d_out, the rank-0 optimum
    student = task.make_model(dtype=torch.float64)
    out = task.evaluate(student)
    assert out["excess"] == pytest.approx(task.min_excess(0), rel=1e-12)
    assert out["delta_rel_err"] == pytest.approx(1.0, rel=1e-12)
    assert task.min_excess(3) == 0.0 and task.min_excess(2) == pytest.approx(0.25 / 12)
    # the best rank-r update (truncated SVD of dW*) reaches min_excess(r) exactly (Eckart-Young)
    U, S, Vh = torch.linalg.svd(task.delta_W_star)
    for r in range(4):
        with torch.no_grad():
            student.W.weight.copy_(task.W0 + U[:, :r] @ torch.diag(S[:r]) @ Vh[:r])
        assert task.evaluate(student)["excess"] == pytest.approx(task.min_excess(r), abs=1e-12)
    assert task.evaluate(student)["loss"] < 1e-20  # noise-free: the val loss is exactly zero at W*


def test_regression_batches_and_noise_floor():
    task = data.planted_regression(d_in=8, d_out=8, k_star=2, noise_std=0.1)
    x, y = task.get_batch("train", 4096, torch.Generator().manual_seed(0))
    assert x.shape == (4096, 8) and y.shape == (4096, 8)
    resid = y - x @ task.W_star.float().T
    assert resid.pow(2).mean().item() == pytest.approx(0.01, rel=0.1)
    model = task.make_model()
    model.W.weight.data.copy_(task.W_star)
    assert task.evaluate(model)["loss"] == pytest.approx(0.01, rel=0.15)
    with pytest.raises(ValueError):
        data.planted_regression(d_in=4, d_out=4, k_star=5)


def test_effective_weight_of_composed_model():
    lin1, lin2 = torch.nn.Linear(5, 4, bias=False).double(), torch.nn.Linear(4, 3, bias=False).double()
    model = torch.nn.Sequential(lin1, lin2)
    torch.testing.assert_close(data.effective_weight(model, 5), lin2.weight @ lin1.weight)
