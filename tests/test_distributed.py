"""DDP with LoRA on two CPU processes (gloo): only the adapters' gradients are all-reduced.

Checks, after one training step with different data on each rank: the LoRA gradients
are identical on both ranks (DDP averaged them), the frozen weights got no gradient,
and the bytes the counting comm hook saw equal the LoRA parameters' gradient bytes
(and, for full fine-tuning, all parameters' bytes).
"""
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def _worker(rank: int, world: int, init_file: str, result_dir: str) -> None:
    import lora_edu
    from lora_edu.lab.models import GPT, GPTConfig
    from lora_edu.speed.distributed import max_grad_difference_across_ranks, trainable_bytes, wrap_ddp

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out = {}
        for mode in ("lora", "full"):
            torch.manual_seed(0)  # same weights on every rank
            model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, d_model=32, d_ff=64, bias=True))
            if mode == "lora":
                lora_edu.add_lora(model, ALL_LINEAR, r=4, alpha=8)
                with torch.no_grad():
                    for _, layer in lora_edu.lora_layers(model):
                        layer.B.normal_(std=0.1)
            ddp, counter = wrap_ddp(model)
            g = torch.Generator().manual_seed(100 + rank)  # different data on each rank
            idx = torch.randint(0, 50, (3, 16), generator=g)
            loss = F.cross_entropy(ddp(idx).view(-1, 50), idx.view(-1))
            loss.backward()
            diff = max_grad_difference_across_ranks(model)
            frozen_with_grad = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
            out[mode] = dict(bytes=counter.bytes, expected=trainable_bytes(model), diff=diff, frozen_with_grad=frozen_with_grad,
                             n_trainable=sum(p.numel() for p in model.parameters() if p.requires_grad))
            # the gradients really were averaged: local-only gradients differ between ranks
            local = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])
            out[mode]["grad_norm"] = local.norm().item()
        torch.save(out, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed with gloo")
def test_ddp_two_processes_gloo(tmp_path):
    world = 2
    init_file = str(tmp_path / "init")
    mp.spawn(_worker, args=(world, init_file, str(tmp_path)), nprocs=world, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for r in res:
        lora, full = r["lora"], r["full"]
        assert lora["diff"] == 0.0 and full["diff"] == 0.0  # identical gradients on every rank
        assert lora["frozen_with_grad"] == []
        assert lora["bytes"] == lora["expected"] == lora["n_trainable"] * 4  # only the adapters travel
        assert full["bytes"] == full["expected"]
        assert full["bytes"] > 5 * lora["bytes"]
    assert res[0]["lora"]["grad_norm"] == res[1]["lora"]["grad_norm"]
