#!/usr/bin/env python
"""lora_edu's NF4 (lora_edu.variants.nf4) against bitsandbytes, plus LoRA on an NF4 base.

    python benchmarks/nf4_vs_bitsandbytes.py --device cpu  --out benchmarks/results/nf4_vs_bitsandbytes_cpu.txt
    python benchmarks/nf4_vs_bitsandbytes.py --device cuda --out benchmarks/results/nf4_h200.txt
    python benchmarks/nf4_vs_bitsandbytes.py --device cpu --tiny     # seconds; what tests/test_nf4.py runs

Sections (each says when it is skipped and why):

1. our NF4 levels vs QLoRA Appendix E; storage in bits/param, formula vs measured nbytes;
2. bitsandbytes (if importable and working on --device): its NF4 and 8-bit dynamic code tables,
   ``quantize_4bit``/``dequantize_4bit`` (nf4, blocksize 64, compress_statistics on and off) against
   ours on the same weights, element by element; and our dequantiser applied to bitsandbytes'
   stored state (does the same arithmetic give the same bits?);
3. the error of merging ΔW into an NF4 base (re-quantise) vs into float copies of the dequantised weight;
4. LoRA on an NF4 base vs the same LoRA on a float base (bf16 on CUDA, fp32 on CPU): the same
   residual stack of frozen d×d layers, the same data and init, a few Adam steps on a planted
   low-rank target; losses, ms/step and, on CUDA, weight and peak memory (torch.cuda.max_memory_allocated).
   The LoRA branch is written inline (x → base(x) + s·(x Aᵀ) Bᵀ) so this script depends only on nf4.py.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lora_edu.variants import nf4  # noqa: E402


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- 1. our format


def section_levels_and_bits(out: list[str], device: torch.device, shape: tuple[int, int]) -> None:
    out.append("## 1. NF4 levels and storage (lora_edu)")
    pub = torch.tensor(nf4.NF4_PUBLISHED, dtype=torch.float64)
    d32 = nf4.nf4_levels(dtype=torch.float32)
    d64 = nf4.nf4_levels(dtype=torch.float64)
    out.append(f"levels derived in float32 == QLoRA Appendix E table, bitwise: {d32.tolist() == list(nf4.NF4_PUBLISHED)}")
    out.append(f"levels derived in float64, max |Δ| to the table: {float((d64 - pub).abs().max()):.3e}")
    w = torch.randn(*shape, device=device, generator=torch.Generator(device).manual_seed(0))
    for dq in (False, True):
        q = nf4.quantize_nf4(w, double_quant=dq)
        exact = nf4.nf4_bits_per_parameter(double_quant=dq, numel=w.numel())
        out.append(f"{'double' if dq else 'single'} quantisation, {shape[0]}x{shape[1]}: bits/param measured "
                   f"{q.bits_per_parameter:.6f} (from nbytes), exact formula {exact:.6f}, "
                   f"paper {nf4.nf4_bits_per_parameter(double_quant=dq):.6f}; relative Frobenius error "
                   f"{nf4.quantization_error(w, double_quant=dq).relative_frobenius:.5f}")
    out.append("")


# ----------------------------------------------------------------------------- 2. bitsandbytes


def _bnb_state_as_ours(packed: torch.Tensor, state, shape, dtype, block_size: int) -> nf4.NF4Quantized:
    """Wrap bitsandbytes' stored tensors in our NF4Quantized, to run our dequantiser on them."""
    common = dict(codes=packed.reshape(-1), shape=torch.Size(shape), dtype=dtype, block_size=block_size)
    if state.nested:
        return nf4.NF4Quantized(absmax_codes=state.absmax, absmax_scale=state.state2.absmax, absmax_mean=state.offset,
                                absmax_block_size=state.state2.blocksize, **common)
    return nf4.NF4Quantized(absmax=state.absmax, **common)


def section_bitsandbytes(out: list[str], device: torch.device, shapes: list[tuple[int, int]]) -> None:
    out.append("## 2. bitsandbytes comparison")
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
    except Exception as exc:  # noqa: BLE001 — any import failure means: skip this section, say why
        out += [f"SKIPPED: bitsandbytes is not importable here ({type(exc).__name__}: {exc}).", ""]
        return
    out.append(f"bitsandbytes {bnb.__version__}")
    try:
        code_bnb = bnbf.get_4bit_type("nf4", device=device).cpu()
        ours = nf4.nf4_levels(dtype=torch.float32)
        out.append(f"NF4 code table: get_4bit_type('nf4') == ours bitwise: {torch.equal(code_bnb, ours)} "
                   f"(max |Δ| {float((code_bnb - ours).abs().max()):.1e})")
        dyn = bnbf.create_dynamic_map().cpu()
        out.append(f"8-bit dynamic code: create_dynamic_map() == ours bitwise: {torch.equal(dyn, nf4.dynamic_8bit_code())}")
        for shape in shapes:
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                gen = torch.Generator(device).manual_seed(1)
                w = (0.02 * torch.randn(*shape, device=device, generator=gen)).to(dtype)
                for dq in (False, True):
                    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type="nf4")
                    w_bnb = bnbf.dequantize_4bit(packed, state)
                    q = nf4.quantize_nf4(w, block_size=64, double_quant=dq)
                    w_ours = nf4.dequantize_nf4(q)
                    n = w.numel()
                    idx_ours = nf4.unpack_4bit(q.codes)[:n]
                    idx_bnb = nf4.unpack_4bit(packed.reshape(-1))[:n]
                    line = (f"{shape[0]}x{shape[1]} {str(dtype).replace('torch.', '')} "
                            f"{'double' if dq else 'single'}: NF4 indices differing {int((idx_ours != idx_bnb).sum())}/{n}")
                    if dq:
                        diff8 = int((q.absmax_codes != state.absmax).sum())
                        # ours takes the nearest 8-bit code by construction; is bitsandbytes' choice ever nearer?
                        code8 = nf4.dynamic_8bit_code().to(device)
                        exact = w.float().reshape(-1)
                        exact = F.pad(exact, (0, q.n_blocks * 64 - n)).view(q.n_blocks, 64).abs().amax(1) - q.absmax_mean
                        c1 = q.absmax_scale.repeat_interleave(256)[: q.n_blocks]
                        err_ours = (code8[q.absmax_codes.long()] * c1 - exact).abs()
                        err_bnb = (code8[state.absmax.long()] * c1 - exact).abs()
                        line += (f"; 8-bit absmax codes differing {diff8}/{q.n_blocks} (nearer to the exact value: ours "
                                 f"{int((err_ours < err_bnb).sum())}, bnb {int((err_bnb < err_ours).sum())}); "
                                 f"mean equal {bool(q.absmax_mean == state.offset)}; "
                                 f"c1 equal {torch.equal(q.absmax_scale, state.state2.absmax)}")
                    else:
                        line += f"; absmax equal {torch.equal(q.absmax, state.absmax)}"
                    same = w_ours == w_bnb
                    line += (f"; dequantised equal {int(same.sum())}/{n}, max |Δ| "
                             f"{float((w_ours.float() - w_bnb.float()).abs().max()):.3e}")
                    cross = nf4.dequantize_nf4(_bnb_state_as_ours(packed, state, shape, dtype, 64))
                    line += f"; ours(bnb state) == bnb dequantize bitwise: {torch.equal(cross, w_bnb)}"
                    bnb_bytes = packed.nbytes + state.absmax.nbytes + (
                        state.state2.absmax.nbytes + state.offset.nbytes if dq else 0)
                    line += f"; bits/param bnb {8 * bnb_bytes / n:.4f} ours {q.bits_per_parameter:.4f}"
                    out.append(line)
    except Exception as exc:  # noqa: BLE001 — report, do not crash the rest of the run
        out.append(f"bitsandbytes FAILED on {device}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    out.append("")


# ----------------------------------------------------------------------------- 3. merge errors


def section_merge(out: list[str], device: torch.device, dim: int) -> None:
    out.append("## 3. Merging ΔW into an NF4 base (errors relative to ‖ΔW‖_F, against W_deq + ΔW exact)")
    gen = torch.Generator(device).manual_seed(2)
    w = 0.02 * torch.randn(dim, dim, device=device, generator=gen)
    q = nf4.quantize_nf4(w)
    out.append("‖ΔW‖/‖W‖ | re-quantised NF4 | codes changed | bf16 copy | fp16 copy | fp32 copy")
    for ratio in (1e-3, 1e-2, 1e-1):
        r = 8  # a rank-8 update, as LoRA makes
        a = torch.randn(r, dim, device=device, generator=gen)
        b = torch.randn(dim, r, device=device, generator=gen)
        delta = b @ a
        delta *= ratio * w.norm() / delta.norm()
        m = nf4.requantize_merge_error(q, delta)
        out.append(f"{ratio:g} | {m.requantized:.3f} | {m.codes_changed:.4f} | {m.bf16:.3f} | {m.fp16:.4f} | {m.fp32:.2e}")
    out.append("")


# ----------------------------------------------------------------------------- 4. LoRA on an NF4 base


class LoRAStack(nn.Module):
    """h ← h + base_l(n(h)) + s·(n(h) A_lᵀ) B_lᵀ for l = 1..L, n = RMS norm; only A_l, B_l train (fp32)."""

    def __init__(self, bases: list[nn.Module], dim: int, r: int, alpha: float, device: torch.device):
        super().__init__()
        self.bases = nn.ModuleList(bases)
        gen = torch.Generator(device).manual_seed(3)
        bound = 1 / dim**0.5  # kaiming_uniform(a=√5) on an (r, in) A
        self.A = nn.ParameterList([nn.Parameter((torch.rand(r, dim, device=device, generator=gen) * 2 - 1) * bound)
                                   for _ in bases])
        self.B = nn.ParameterList([nn.Parameter(torch.zeros(dim, r, device=device)) for _ in bases])
        self.scale = alpha / r

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for base, A, B in zip(self.bases, self.A, self.B):
            x = F.rms_norm(h, (h.shape[-1],))
            dtype = getattr(base, "compute_dtype", None) or next(base.parameters()).dtype
            h = h + base(x.to(dtype)).float() + self.scale * (x @ A.T) @ B.T
        return h


def _base_weights(dim: int, layers: int, device: torch.device) -> list[torch.Tensor]:
    gen = torch.Generator(device).manual_seed(4)
    return [torch.randn(dim, dim, device=device, generator=gen) / dim**0.5 for _ in range(layers)]


def _planted_deltas(weights: list[torch.Tensor], dim: int, device: torch.device) -> list[torch.Tensor]:
    """A rank-4 ΔW per layer with ‖ΔW‖ = 30 % of ‖W‖: what the LoRA branches have to learn."""
    gen = torch.Generator(device).manual_seed(5)
    deltas = []
    for w in weights:
        d = torch.randn(dim, 4, device=device, generator=gen) @ torch.randn(4, dim, device=device, generator=gen)
        deltas.append(0.3 * d * w.norm() / d.norm())
    return deltas


def _teacher(weights: list[torch.Tensor], deltas: list[torch.Tensor], dim: int):
    """The target function: the same residual stack in fp32 with W + ΔW in every layer."""
    targets = [w + d for w, d in zip(weights, deltas)]

    def f(h):
        for w in targets:
            h = h + F.rms_norm(h, (dim,)) @ w.T
        return h
    return f


def _train(model: LoRAStack, teacher, dim: int, tokens: int, steps: int, device: torch.device) -> dict:
    opt = torch.optim.Adam(list(model.A) + list(model.B), lr=3e-3)
    gen = torch.Generator(device).manual_seed(6)
    losses, times = [], []
    if device.type == "cuda":  # everything allocated now (model, teacher, data) is the baseline of the peak
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):
        x = torch.randn(tokens, dim, device=device, generator=gen)
        with torch.no_grad():
            y = teacher(x)
        _sync(device)
        t0 = time.perf_counter()
        loss = F.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    res = dict(losses=losses, ms=1e3 * statistics.median(times[1:] or times))  # the first step warms up
    if device.type == "cuda":  # activations, gradients, Adam state and dequantisation temporaries on top of the baseline
        res["training_extra_mb"] = (torch.cuda.max_memory_allocated(device) - baseline) / 2**20
    return res


def section_lora(out: list[str], device: torch.device, dim: int, layers: int, r: int, tokens: int, steps: int) -> None:
    float_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    fname = str(float_dtype).replace("torch.", "")
    out.append(f"## 4. LoRA on an NF4 base vs on a {fname} base ({layers} frozen {dim}x{dim} layers, r={r}, α={2 * r}, "
               f"Adam lr 3e-3, {tokens} tokens/step, {steps} steps, LoRA factors fp32)")
    out.append("target: the fp32 stack with a planted rank-4 ΔW per layer (‖ΔW‖ = 0.3‖W‖); with 'W_deq' the target is built "
               "on the dequantised NF4 weights instead, which isolates training through the NF4 base from its quantisation error")
    weights = _base_weights(dim, layers, device)
    deltas = _planted_deltas(weights, dim, device)
    runs = [(fname, "W"), ("nf4", "W"), ("nf4", "W_deq")]
    results = {}
    for kind, target in runs:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated(device)
        if kind == "nf4":
            bases = [nf4.NF4Linear(w, compute_dtype=float_dtype) for w in weights]
        else:
            bases = []
            for w in weights:
                lin = nn.Linear(dim, dim, bias=False, device=device, dtype=float_dtype).requires_grad_(False)
                lin.weight.copy_(w)
                bases.append(lin)
        model = LoRAStack(bases, dim, r, 2 * r, device)
        res = {}
        if device.type == "cuda":
            _sync(device)
            res["model_mb"] = (torch.cuda.memory_allocated(device) - before) / 2**20
            res["lora_mb"] = sum(p.nbytes for p in model.parameters() if p.requires_grad) / 2**20
        target_weights = weights if target == "W" else [b.dequantize(torch.float32) for b in bases]
        res.update(_train(model, _teacher(target_weights, deltas, dim), dim, tokens, steps, device))
        results[(kind, target)] = res
        del model, bases, target_weights
    header = "base | target | loss step 1 (= base alone) | loss last | last/first | ms/step (median)"
    if device.type == "cuda":
        header += " | frozen weights MB | LoRA MB | peak extra in training MB | model + peak extra MB"
    out.append(header)
    for (kind, target), res in results.items():
        first, last = res["losses"][0], res["losses"][-1]
        line = f"{kind} | {target} | {first:.5f} | {last:.5f} | {last / first:.4f} | {res['ms']:.2f}"
        if device.type == "cuda":
            line += (f" | {res['model_mb'] - res['lora_mb']:.1f} | {res['lora_mb']:.1f} | {res['training_extra_mb']:.1f}"
                     f" | {res['model_mb'] + res['training_extra_mb']:.1f}")
        out.append(line)
    ref = results[(fname, "W")]["losses"]
    for key in ((("nf4", "W")), ("nf4", "W_deq")):
        curve = results[key]["losses"]
        out.append(f"nf4 base, target on {key[1]}: max over steps of |loss − loss_{fname}| / loss_{fname} = "
                   f"{max(abs(x - y) / y for x, y in zip(curve, ref)):.4f}")
    out.append("LoRA on an NF4 base, loss at every step:")
    for (kind, target), res in results.items():
        out.append(f"  {kind} base, target on {target}: {[round(x, 5) for x in res['losses']]}")
    if device.type == "cuda":
        frozen = {k: results[k]["model_mb"] - results[k]["lora_mb"] for k in ((fname, "W"), ("nf4", "W"))}
        out.append(f"frozen weight memory nf4/{fname}: {frozen[('nf4', 'W')] / frozen[(fname, 'W')]:.4f} measured "
                   f"(torch.cuda.memory_allocated), {nf4.nf4_bits_per_parameter(numel=dim * dim) / 16:.4f} from the format "
                   f"(4.127 bits vs 16); the NF4 code tables and allocator rounding make up the difference")
    out.append("")


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=None, help="write the report here as well (atomically)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes: runs in seconds (tests)")
    p.add_argument("--dim", type=int, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch.cuda.is_available() is False")
    cuda = device.type == "cuda"
    if args.tiny:
        shapes, dim, layers, tokens, steps, merge_dim = [(64, 256), (10, 7)], 64, 2, 16, 3, 64
    else:
        shapes = [(4096, 4096), (1000, 333)]
        dim, layers, tokens, steps = (4096, 16, 256, 30) if cuda else (512, 4, 64, 30)
        merge_dim = 1024
    dim, layers = args.dim or dim, args.layers or layers
    tokens, steps = args.tokens or tokens, args.steps or steps
    out = ["# lora_edu NF4 vs bitsandbytes",
           f"date {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}; python {platform.python_version()}; "
           f"torch {torch.__version__}; {platform.platform()}; cpu threads {torch.get_num_threads()}",
           f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if cuda else f" ({platform.processor() or 'cpu'})"),
           f"command: python benchmarks/nf4_vs_bitsandbytes.py {' '.join(sys.argv[1:] if argv is None else argv)}", ""]
    section_levels_and_bits(out, device, shapes[0])
    section_bitsandbytes(out, device, shapes)
    section_merge(out, device, merge_dim)
    section_lora(out, device, dim, layers, args.rank, tokens, steps)
    text = "\n".join(out)
    print(text)
    if args.out is not None:
        _write_atomically(args.out, text)
    return text


if __name__ == "__main__":
    main()
