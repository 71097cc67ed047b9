"""lora_edu.lab.train: loss goes down, bit-exact CPU reproducibility, trainable-only optimizer, LoRA+, schedules."""
import math

import pytest
import torch
import torch.nn as nn

import lora_edu
from lora_edu.lab import data
from lora_edu.lab.models import GPT, GPTConfig
from lora_edu.lab.train import TrainConfig, lr_factor, make_optimizer, resolve_device, resolve_precision, train

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def lm_task():
    return data.lm_tasks(block_size=16)[0]


def small_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, d_model=32, d_ff=64))


FAST = dict(batch_size=16, eval_batches=2, progress=False, device="cpu")


def test_resolve_device_and_precision():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    auto = resolve_device("auto")
    assert auto.type == ("cuda" if torch.cuda.is_available() else auto.type)
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    with pytest.raises(ValueError):
        resolve_precision("bf16", torch.device("cpu"))


def test_short_run_lowers_loss_and_reports(lm_task):
    model = small_gpt()
    res = train(model, lm_task, TrainConfig(steps=60, lr=3e-3, eval_every=30, **FAST))
    first, last = res.history[0], res.history[-1]
    assert first["step"] == 0 and last["step"] == 60 and len(res.history) == 3
    assert last["val_loss"] < first["val_loss"] - 0.8  # from ~ln(97) = 4.57 down
    assert res.final["loss"] == last["val_loss"] and "ppl" in res.final
    assert res.trainable_params == res.total_params == sum(p.numel() for p in model.parameters())
    assert res.wall_time_s > 0 and res.train_time_s <= res.wall_time_s
    assert res.peak_memory_bytes is None and res.device == "cpu" and res.precision == "fp32"
    assert res.to_dict()["config"]["steps"] == 60
    assert not math.isnan(res.final_train_loss)


def test_cpu_runs_are_bit_exact(lm_task):
    results = []
    for _ in range(2):
        model = small_gpt()
        res = train(model, lm_task, TrainConfig(steps=15, lr=3e-3, eval_every=5, seed=3, **FAST))
        results.append((res.history, [p.detach().clone() for p in model.parameters()]))
    assert results[0][0] == results[1][0]
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.equal(a, b)
    other = small_gpt()
    res = train(other, lm_task, TrainConfig(steps=15, lr=3e-3, eval_every=5, seed=4, **FAST))
    assert res.history[-1] != results[0][0][-1]  # another seed draws other batches


def test_optimizer_sees_only_trainable_params_and_frozen_stay_put(lm_task):
    model = small_gpt()
    for n, p in model.named_parameters():
        p.requires_grad = "q_proj" in n or "v_proj" in n
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = make_optimizer(model, TrainConfig())
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert ids == {id(p) for p in model.parameters() if p.requires_grad}
    res = train(model, lm_task, TrainConfig(steps=5, eval_every=0, eval_at_start=False, **FAST))
    assert res.trainable_params == 2 * 32 * 32 and res.total_params > res.trainable_params
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    for p in model.parameters():
        p.requires_grad = False
    with pytest.raises(ValueError, match="no trainable"):
        make_optimizer(model, TrainConfig())


def test_loraplus_param_groups_have_the_right_lrs():
    model = lora_edu.add_lora(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), ["0", "2"], r=2, alpha=2)
    opt = make_optimizer(model, TrainConfig(lr=1e-3, loraplus_ratio=16))
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["default"]["lr"] == pytest.approx(1e-3) and by_name["lora_B"]["lr"] == pytest.approx(16e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(".lora_B." in names[id(p)] for p in by_name["lora_B"]["params"])
    assert all(".lora_A." in names[id(p)] for p in by_name["default"]["params"])
    assert len(by_name["lora_B"]["params"]) == 2
    # the ratio survives warmup and the schedule: every recorded lr is the A lr; B's is 16x at each step
    task = data.planted_regression(d_in=8, d_out=8, k_star=2)
    res = train(model, task, TrainConfig(steps=10, lr=1e-3, loraplus_ratio=16, schedule="cosine", warmup_steps=2,
                                         eval_every=0, batch_size=8, progress=False, device="cpu"))  # fmt: skip
    assert res.trainable_params == 2 * (2 * 8 + 8 * 2)
    assert res.history[-1]["lr"] == pytest.approx(1e-3 * lr_factor(9, TrainConfig(**res.config)))
    with pytest.raises(ValueError, match="no trainable LoRA B factors"):
        make_optimizer(small_gpt(), TrainConfig(loraplus_ratio=16))


def test_lr_schedules():
    c = TrainConfig(steps=100, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, c) == pytest.approx(0.1) and lr_factor(9, c) == pytest.approx(1.0)
    assert lr_factor(10, c) == pytest.approx(1.0) and lr_factor(100, c) == pytest.approx(0.1)
    assert lr_factor(55, c) == pytest.approx(0.55)  # halfway: (1 + 0.1) / 2
    lin = TrainConfig(steps=10, schedule="linear", min_lr_ratio=0.0)
    assert [round(lr_factor(s, lin), 6) for s in (0, 5)] == [1.0, 0.5]
    assert lr_factor(7, TrainConfig()) == 1.0
    with pytest.raises(ValueError):
        lr_factor(0, TrainConfig(schedule="step"))


def test_planted_regression_full_finetuning_reaches_the_floor():
    """Full fine-tuning of a linear student reaches the floor; the loop works on non-LM tasks."""
    task = data.planted_regression(d_in=8, d_out=8, k_star=2, seed=0)
    model = task.make_model()
    res = train(model, task, TrainConfig(steps=300, lr=3e-2, batch_size=64, eval_every=0, progress=False, device="cpu"))
    assert res.history[0]["val_excess"] == pytest.approx(task.min_excess(0), rel=1e-5)
    assert res.final["excess"] < 1e-3 * task.min_excess(0)


def test_planted_regression_lora_reaches_floor_iff_rank_reaches_k_star():
    """The rank sweep with a known answer: rank r < k* stalls at the Eckart-Young excess, r >= k* reaches 0."""
    lora_edu = pytest.importorskip("lora_edu")
    if not hasattr(lora_edu, "add_lora"):
        pytest.skip("core library (lora_edu.add_lora) not available yet")
    task = data.planted_regression(d_in=16, d_out=16, k_star=2, seed=0)
    for r in (1, 2, 3):
        torch.manual_seed(0)
        model = lora_edu.add_lora(task.make_model(), targets=["W"], r=r, alpha=r)
        res = train(model, task, TrainConfig(steps=400, lr=2e-2, batch_size=64, eval_every=0, schedule="cosine",
                                             progress=False, device="cpu"))  # fmt: skip
        floor = task.min_excess(r)
        assert res.final["excess"] == pytest.approx(floor, abs=0.02 * task.min_excess(0)), (r, res.final)


def test_image_task_and_kwargs_shorthand():
    src, _ = data.image_tasks(n_train=256, n_val=128)
    torch.manual_seed(0)
    model = src.make_model("tiny")
    res = train(model, src, steps=30, lr=3e-3, eval_every=0, batch_size=32, progress=False, device="cpu")
    assert res.config["steps"] == 30 and "acc" in res.final
    assert res.history[-1]["val_loss"] < res.history[0]["val_loss"]


def test_zero_steps_still_reports(lm_task):
    res = train(small_gpt(), lm_task, TrainConfig(steps=0, eval_at_start=False, **FAST))
    assert len(res.history) == 1 and "loss" in res.final


def test_lora_end_to_end_with_core(lm_task):
    lora_edu = pytest.importorskip("lora_edu")
    if not hasattr(lora_edu, "add_lora"):
        pytest.skip("core library (lora_edu.add_lora) not available yet")
    model = small_gpt()
    lora_edu.add_lora(model, targets=["q_proj", "v_proj"], r=4, alpha=8)
    if hasattr(lora_edu, "freeze"):
        lora_edu.freeze(model)
    for n, p in model.named_parameters():  # make sure only LoRA factors train, whatever freeze() does
        p.requires_grad = ".lora_A." in n or ".lora_B." in n
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    res = train(model, lm_task, TrainConfig(steps=30, lr=1e-2, loraplus_ratio=4, eval_every=0, **FAST))
    assert res.trainable_params == 2 * 4 * (32 + 32)
    assert res.history[-1]["val_loss"] < res.history[0]["val_loss"]
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_cuda_training_reports_memory(lm_task, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this card")
    model = small_gpt()
    res = train(model, lm_task, TrainConfig(steps=20, lr=3e-3, batch_size=16, eval_batches=2, device="cuda",
                                            precision=precision, progress=False))  # fmt: skip
    assert res.device.startswith("cuda") and res.precision == precision
    assert res.peak_memory_bytes is not None and res.peak_memory_bytes > 0
    assert res.history[-1]["val_loss"] < res.history[0]["val_loss"]
    assert next(model.parameters()).device.type == "cuda"


def test_keep_best_ends_with_the_best_evaluation(lm_task):
    """Early stopping: ``final`` is the lowest validation loss of the history and the model is back at those weights."""
    model = small_gpt()
    res = train(model, lm_task, TrainConfig(steps=40, lr=3e-3, eval_every=10, keep_best=True, **FAST))
    losses = {h["step"]: h["val_loss"] for h in res.history}
    assert res.best_step == min(losses, key=losses.get) and res.final["loss"] == min(losses.values())
    assert abs(lm_task.evaluate(model, max_batches=2)["loss"] - res.final["loss"]) < 1e-6
    # a learning rate that wrecks the model: the best evaluation is the one before the first step, and so are the weights
    model = small_gpt()
    init = [p.detach().clone() for p in model.parameters()]
    res = train(model, lm_task, TrainConfig(steps=20, lr=1.0, grad_clip=None, eval_every=5, keep_best=True, **FAST))
    assert res.best_step == 0 and res.history[-1]["val_loss"] > res.final["loss"]
    assert all(torch.equal(a, b) for a, b in zip(init, model.parameters()))
    assert train(small_gpt(), lm_task, TrainConfig(steps=2, **FAST)).best_step is None


def test_keep_best_restores_buffers_and_needs_a_loss(lm_task):
    """The kept model is the one that was scored: buffers (e.g. BatchNorm statistics) come back too."""
    model = small_gpt()
    model.register_buffer("running", torch.zeros(3))  # a buffer that training changes, as BatchNorm's statistics do
    hook = model.register_forward_pre_hook(lambda m, args: (m.running.add_(1.0) if m.training else None, None)[1])
    res = train(model, lm_task, TrainConfig(steps=20, lr=1.0, grad_clip=None, eval_every=5, keep_best=True, **FAST))
    hook.remove()
    assert res.best_step == 0 and torch.equal(model.running, torch.zeros(3))

    class NoLoss:  # a task whose evaluate() has no "loss": fine without keep_best, a clear error with it
        def __getattr__(self, name):
            return getattr(lm_task, name)

        def evaluate(self, model, **kw):
            return {"acc": 0.5}

    assert train(small_gpt(), NoLoss(), TrainConfig(steps=2, **FAST)).final == {"acc": 0.5}
    with pytest.raises(ValueError, match="keep_best needs the task's evaluate\\(\\) to return a numeric 'loss'"):
        train(small_gpt(), NoLoss(), TrainConfig(steps=2, keep_best=True, **FAST))


@pytest.mark.parametrize("bad", [dict(lr=-1e-3), dict(lr=float("nan")), dict(steps=-3), dict(batch_size=0), dict(grad_clip=0.0),
                                 dict(eval_every=-1), dict(keep_best="no"), dict(steps=True), dict(schedule="cosin"), dict(seed=1.5)])
def test_train_config_refuses_settings_that_train_silently_wrong(bad):
    with pytest.raises((ValueError, TypeError), match="TrainConfig"):
        TrainConfig(**bad)


def test_train_config_accepts_numpy_numbers():
    np = pytest.importorskip("numpy")
    cfg = TrainConfig(steps=np.int64(3), seed=np.int64(2), lr=np.float64(1e-3), batch_size=np.int32(4))
    assert (cfg.steps, cfg.seed, cfg.batch_size) == (3, 2, 4) and type(cfg.seed) is int and type(cfg.lr) is float
