"""Experiments on small configurations: records are tidy, lr sweeps pick the best, the planted rank shows."""
import torch

from lora_edu.lab import data
from lora_edu.lab.experiments import budget_split, fine_tune, format_table, learn_forget, rank_sweep

FAST = dict(steps=60, batch_size=64, progress=False, eval_every=0, eval_batches=2, device="cpu")


def test_fine_tune_does_not_touch_base():
    task = data.planted_regression(d_in=16, d_out=16, k_star=2, seed=0)
    base = task.make_model()
    W0 = base.W.weight.clone()
    model, rec = fine_tune(base, task, "lora", r=2, targets=["W"], lr=1e-2, **FAST)
    assert torch.equal(base.W.weight, W0)
    assert rec["trainable"] == 2 * (16 + 16) and rec["method"] == "lora"


def test_rank_sweep_planted_elbow():
    """Below k* the excess loss is stuck at the Eckart–Young floor; at r ≥ k* it goes far below it."""
    task = data.planted_regression(d_in=16, d_out=16, k_star=3, seed=1)
    base = task.make_model()
    records, models = rank_sweep(base, task, ranks=(1, 2, 3, 4), lrs=(1e-2, 3e-2), full_lrs=(1e-2,),
                                 targets=["W"], keep_models=True, **{**FAST, "steps": 150})
    excess = {r["r"]: r[f"{task.name}_excess"] for r in records if r["method"] == "lora"}
    for r in (1, 2):
        assert excess[r] >= 0.99 * task.min_excess(r), (r, excess[r], task.min_excess(r))
    assert excess[3] < 0.1 * task.min_excess(2)
    assert set(models) == {1, 2, 3, 4, "full"}
    assert all(len(r["lr_sweep"]) == (1 if r["method"] == "full" else 2) for r in records)
    for r in records:  # the reported lr is the best one in the sweep
        assert r[f"{task.name}_loss"] == min(r["lr_sweep"].values())
    text = format_table(records, ["method", "r", "lr", f"{task.name}_excess"])
    assert "full" in text and "lora" in text


def test_budget_split_same_trainable_count():
    task = data.planted_regression(d_in=8, d_out=8, k_star=2, seed=0)

    class TwoLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.v_proj = torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False)

        def forward(self, x):
            return self.q_proj(x) + self.v_proj(x)

    recs = budget_split(TwoLinear(), task, splits=((("q_proj",), 4), (("q_proj", "v_proj"), 2)), lrs=(1e-2,), **FAST)
    assert recs[0]["trainable"] == recs[1]["trainable"] == 4 * 16


def test_learn_forget_records():
    src = data.planted_regression(d_in=8, d_out=8, k_star=2, seed=0)
    tgt = data.planted_regression(d_in=8, d_out=8, k_star=2, seed=0)
    recs = learn_forget(src.make_model(), src, tgt, ranks=(1,), lrs=(1e-2,), full_lrs=(1e-2,), targets=["W"], **FAST)
    assert [r["method"] for r in recs] == ["base", "lora", "full"]
    assert recs[1]["target_loss"] <= recs[0]["target_loss"]
