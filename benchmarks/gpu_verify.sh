#!/usr/bin/env bash
# GPU verification run (issues 2 and 3): the library test suite with the CUDA tests enabled,
# the guided tour on the GPU with bf16 autocast, and LoRA (fused and plain) vs full fine-tuning of the wide GPT.
# Usage on a CUDA machine, from the repo root:  bash benchmarks/gpu_verify.sh OUTDIR
# Python packages missing on the machine may be provided as wheels in .gpuwheels/ (installed to /tmp/site).
set -uo pipefail
OUT="${1:-gpu_verify_out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .gpuwheels/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpuwheels/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name(0))"
} 2>&1 | tee "$OUT/machine.txt"

echo "== library tests on the GPU machine (CUDA tests included)" | tee "$OUT/tests.txt"
python3 -m pytest tests -q -p no:cacheprovider -rs --ignore=tests/test_grading_cli.py --ignore=tests/test_notebooks_collected.py 2>&1 | tail -n 40 | tee -a "$OUT/tests.txt"
echo "== CUDA-marked tests only, verbose" | tee -a "$OUT/tests.txt"
python3 -m pytest tests -q -p no:cacheprovider -m cuda -v 2>&1 | grep -E "PASSED|FAILED|SKIPPED|ERROR|passed|failed" | tee -a "$OUT/tests.txt"

echo "== tour on cuda (bf16 autocast)" | tee "$OUT/tour.txt"
python3 -m lora_edu.cli tour --device cuda --quiet --out "$OUT/tour" 2>&1 | tee -a "$OUT/tour.txt"

echo "== training paths on cuda: gpt-wide, LoRA r=8 (all linear; fused and plain LoRALinear) vs full fine-tuning, bf16" | tee "$OUT/train.txt"
python3 - <<'PY' 2>&1 | tee -a "$OUT/train.txt"
import copy, torch
from lora_edu import add_lora
from lora_edu.lab import data
from lora_edu.lab.experiments import ALL_LINEAR_TARGETS, format_table
from lora_edu.lab.pretrain import load_pretrained
from lora_edu.lab.train import train
src, tgt = data.lm_tasks()
base = load_pretrained("gpt-wide")
rows = []
# "lora": train() runs LoRALinear through lora_edu.fuse (its default); "lora plain": fused=False
for name, lr, fused in (("lora", 3e-3, True), ("lora plain", 3e-3, False), ("full", 1e-3, True)):
    m = copy.deepcopy(base)
    if name.startswith("lora"):
        add_lora(m, list(ALL_LINEAR_TARGETS), r=8, alpha=16)
    else:
        m.requires_grad_(True)
    res = train(m, tgt, steps=300, batch_size=64, lr=lr, device="cuda", precision="bf16", progress=False,
                eval_every=100, eval_batches=20, schedule="cosine", warmup_steps=20, fused=fused)
    rows.append({"method": name, "trainable": res.trainable_params, "total": res.total_params,
                 "target val loss": res.final["loss"], "train s": res.train_time_s, "wall s": res.wall_time_s,
                 "peak MiB": res.peak_memory_bytes / 2**20, "precision": res.precision})
print(format_table(rows, list(rows[0])))
PY
echo "done"
