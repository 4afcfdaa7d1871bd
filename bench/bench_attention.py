"""
Benchmark of the Triton flash attention against torch SDPA (its flash backend) and naive attention.

    python -m pytest bench/bench_attention.py -s

Needs a CUDA GPU (skips without one). The shapes follow FlashAttention's own benchmarks: bf16, causal, a
hidden size of 2048 split into H = 2048 / D heads of dim D in {64, 128}, and B * T = 16k tokens for T
from 512 to 8192. One run validates, then times:
1. every shape is checked against a float32 reference, output and the three gradients: PASS when the
   kernel's bf16 error stays within twice that of PyTorch's own bf16 attention (plus 1e-3 of the
   largest reference value);
2. forward, backward and forward+backward are timed with triton.testing.do_bench (mean ms) for this
   kernel, SDPA forced to its flash backend, and naive attention (the [B, H, T, T] scores materialised;
   skipped where it would not fit in memory), with each one's speed relative to SDPA (x > 1: faster).
FLOPs are counted the standard way: 4 * B * H * T^2 * D for the forward (the two matmuls), halved by
the causal mask, and 2.5 times that for the backward (five matmuls; the two that this kernel recomputes
are not counted). The card's peak is measured in the same run, as a large bf16 torch.matmul.
"""

import math
import time

import pytest
import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels.attention import _attn_bwd_dkdv, _attn_bwd_dq, _attn_fwd, attention, attention_ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the attention benchmark needs a CUDA GPU")

HIDDEN = 2048  # H * D
TOKENS = 16384  # B * T
HEAD_DIMS = (64, 128)
SEQLENS = (512, 1024, 2048, 4096, 8192)
NAIVE_BYTES_PER_SCORE = 20  # bf16 and float32 copies of the scores, probabilities and their gradients


def sdpa_flash(q, k, v):
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def naive(q, k, v):
    """Textbook causal attention: materialises the [B, H, T, T] scores and probabilities."""
    T = q.size(-2)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


IMPLS = {"sdpa-flash": sdpa_flash, "triton": attention, "naive": naive}  # SDPA first: the others are compared to it


def make_inputs(B, H, T, D, dtype=torch.bfloat16):
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    return q, k, v, torch.randn(B, H, T, D, device="cuda", dtype=dtype)


def run(fn, q, k, v, do):
    """fn's output and the gradients of <output, do> with respect to q, k and v."""
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), do))


def check(B, H, T, D):
    """Compare the kernel and SDPA-flash, both in bf16, with a float32 reference. Returns (passed, line)."""
    torch.manual_seed(0)
    q, k, v, do = make_inputs(B, H, T, D)
    got = run(attention, q, k, v, do)
    torch_bf16 = run(sdpa_flash, q, k, v, do)
    want = run(lambda *x: attention_ref(*x, causal=True), *(x.detach().float().requires_grad_() for x in (q, k, v)),
               do.float())
    passed, parts = True, []
    for name, g, t, w in zip(("out", "dq", "dk", "dv"), got, torch_bf16, want):
        err, torch_err = (g.float() - w).abs().max().item(), (t.float() - w).abs().max().item()
        ok = math.isfinite(err) and err <= 2 * torch_err + 1e-3 * w.abs().max().item()
        passed &= ok
        parts.append(f"{name} {err:.1e} (sdpa {torch_err:.1e}){'' if ok else ' <-'}")
    return passed, f"{'PASS' if passed else 'FAIL'}  D={D:<4} T={T:<5} B={B:<3} H={H:<3} max abs err: " + ", ".join(parts)


def time_ms(fn, q, k, v, do):
    """Mean forward, backward and forward+backward times of fn, in ms."""
    fwd = triton.testing.do_bench(lambda: fn(q, k, v))
    out = fn(q, k, v)
    bwd = triton.testing.do_bench(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True))
    del out
    both = triton.testing.do_bench(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do))
    return fwd, bwd, both


def matmul_peak_tflops(n=8192):
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return 2 * n**3 / triton.testing.do_bench(lambda: a @ b) * 1e-9


def shapes():
    for D in HEAD_DIMS:
        for T in SEQLENS:
            yield TOKENS // T, HIDDEN // D, T, D


def test_attention_benchmark():
    start = time.time()
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"measured bf16 matmul peak: {matmul_peak_tflops():.0f} TFLOP/s\n")

    print("correctness, bf16 vs a float32 reference (first calls include autotuning):")
    results = [check(*shape) for shape in shapes()]
    for _, line in results:
        print(line)
    print(f"({time.time() - start:.0f} s so far)\n")

    header = f"{'D':>4} {'T':>5} {'B':>3} {'H':>3} {'impl':<10}"
    for phase in ("fwd", "bwd", "fwd+bwd"):
        header += f" | {phase + ' ms':>11} {'TFLOP/s':>7} {'x sdpa':>6}"
    print(header)
    for B, H, T, D in shapes():
        fwd_flops = 4 * B * H * T * T * D / 2  # causal
        flops = (fwd_flops, 2.5 * fwd_flops, 3.5 * fwd_flops)
        q, k, v, do = make_inputs(B, H, T, D)
        times = {}
        for name, fn in IMPLS.items():
            free, _ = torch.cuda.mem_get_info()
            if name == "naive" and B * H * T * T * NAIVE_BYTES_PER_SCORE > 0.9 * free:
                print(f"{D:>4} {T:>5} {B:>3} {H:>3} {name:<10} | skipped: the scores would not fit in memory")
                continue
            try:
                times[name] = time_ms(fn, q, k, v, do)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                print(f"{D:>4} {T:>5} {B:>3} {H:>3} {name:<10} | out of memory")
                continue
            row = f"{D:>4} {T:>5} {B:>3} {H:>3} {name:<10}"
            for ms, f, sdpa_ms in zip(times[name], flops, times.get("sdpa-flash", times[name])):
                row += f" | {ms:>11.3f} {f / ms * 1e-9:>7.0f} {sdpa_ms / ms:>6.2f}"
            print(row)
        del q, k, v, do
        torch.cuda.empty_cache()

    print("\nautotuned configs (key: Tq bucket, Tk bucket, D, causal, dtypes):")
    for kernel in (_attn_fwd, _attn_bwd_dkdv, _attn_bwd_dq):
        for key, config in kernel.cache.items():
            print(f"  {kernel.base_fn.__name__:<15} {key[:4]} -> {config}")
    print(f"\nbenchmark done in {time.time() - start:.0f} s")
    assert all(passed for passed, _ in results), "some shapes FAILED the correctness check"
