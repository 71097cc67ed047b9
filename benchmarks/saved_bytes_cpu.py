#!/usr/bin/env python
"""What autograd keeps for backward (activations, parameters excluded): floor vs lora_edu, on a CPU.

    python benchmarks/saved_bytes_cpu.py      # GPT-2-small shape, batch 1 x 1,024, bf16 CPU autocast; a few minutes

Counts the distinct storages handed to ``saved_tensors_hooks`` during one forward (the loss is the
mean log-sum-exp of the logits).  Deterministic: a prediction of the activation part of GPU peak
memory (× batch), not a GPU measurement.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_lora as bl  # noqa: E402

ROWS = (
    ("frozen floor", bl.setup_floor),
    ("lora_edu fuse()", lambda m: bl.setup_lora_edu(m, bl.ALL_LINEAR, 8, bl.FUSED)),
    ("lora_edu fuse(recompute_input=True)", lambda m: bl.setup_lora_edu(m, bl.ALL_LINEAR, 8, bl.RECOMPUTE)),
    ("plain LoRALinear", lambda m: bl.setup_lora_edu(m, bl.ALL_LINEAR, 8, None)),
)


def saved_mib(model, idx) -> float:
    """MiB of distinct non-parameter storages that autograd saves during one forward."""
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(idx).float().logsumexp(-1).mean()  # kept alive until counted: no storage is reused meanwhile
    total = sum(v for k, v in seen.items() if k not in params) / 2**20
    del loss
    return total


def main() -> None:
    torch.set_num_threads(1)
    size = dict(bl.SIZES["gpt2"], batch=1)
    idx = torch.randint(0, size["vocab_size"], (1, size["seq"]), generator=torch.Generator().manual_seed(0))
    floor = None
    for name, build in ROWS:
        model = bl.build_model(size, torch.device("cpu"))
        build(model)
        mib = saved_mib(model, idx)
        floor = floor or mib
        print(f"| {name} | {mib:.1f} | {mib / floor:.3f} |", flush=True)


if __name__ == "__main__":
    main()
