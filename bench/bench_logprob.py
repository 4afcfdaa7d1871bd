"""
Benchmark of kernels/logprob.py on a GPU, in one call: correctness first (PASS/FAIL per case, the
kernels against the float32 references), then speed and memory.

    python -m pytest bench/bench_logprob.py -s

- every config the autotuner of token_logprobs, entropy and kl_div chooses from (block size,
  warps, STAGES, a cap on registers), pinned in turn: checked against the float32 reference on
  short rows (bf16 and float32), then on long ones and timed at N = 16384, bf16 (the autotuner
  times the configs but does not check them, and a pipelined loop is compiled code that no CPU
  test runs).
- the autotuned kernels in bf16, N in {4096, 16384, 32768} tokens, V in {50257, 128256}: time
  forward and forward+backward, the bandwidth they achieve, as a share of the card's copy
  bandwidth measured in the same run, and the peak memory of forward+backward, for the Triton
  kernel, the naive PyTorch reference and torch.compile of the reference.
  GB/s counts the bytes the ideal fused kernel must move, the same for every implementation:
  the forward reads the logits once (KL reads p and q), the backward reads them once more and
  writes the gradient.
- fused_linear_logprobs in bf16 with C in {768, 4096}, the same N and V: time, model TFLOP/s (2NVC
  forward, 6NVC forward+backward, whatever the implementation recomputes) and peak memory, against
  the naive matmul + log-softmax and torch.compile of it, and the peak memory the kernel saves.
The fused correctness check compares the kernel and PyTorch's own path, both in bf16, with a float32
reference: PASS when the kernel's error is at most twice PyTorch's (plus 1e-3 of the largest value).
Peak memory is what forward+backward allocates above its inputs, the gradient included. OOM marks a
case that did not fit on the card, n/a a torch.compile that failed. It ran in about 3 minutes on an
H200 before the fused table gained N = 32768 and torch.compile and the configs their own table
(not timed since: gpu_check.sh allows 8 minutes); on a CPU it is skipped.
"""

import contextlib
import math
import os

import pytest
import torch
import triton

from kernels import logprob as L

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="benchmarks need a CUDA GPU and compiled kernels (TRITON_INTERPRET unset)")

DEV = "cuda"
# BENCH_TOKENS=16384 BENCH_IMPLS=triton: a quick rerun of the memory-bound table, kernels only
TOKENS = [int(n) for n in os.environ.get("BENCH_TOKENS", "4096,16384,32768").split(",")]
IMPLS = os.environ.get("BENCH_IMPLS", "triton,naive,compile").split(",")
VOCABS = [50257, 128256]
WIDTHS = [768, 4096]  # fused_linear_logprobs' C: GPT-2 small's and a 7B model's
RESULTS = {}  # (op, impl, N, V[, C]) -> dict of measurements, for the summary lines


def bench_ms(fn, grad_to_none=None):
    return triton.testing.do_bench(fn, warmup=5, rep=30, grad_to_none=grad_to_none,
                                   return_mode="median")


def peak_gb(fn):
    """Memory fn allocates above what is allocated before it, at its peak, in GB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 1e9


def fmt(value, spec):
    return value if isinstance(value, str) else format(value, spec)


def free():
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


# -----------------------------------------------------------------------------------------------
# Correctness on the GPU

def close(out, ref, rtol, atol):
    """(ok, max abs error) of out against ref."""
    out, ref = out.double(), ref.double()
    err = (out - ref).abs()
    ok = bool(torch.isfinite(out).all()) and bool((err <= atol + rtol * ref.abs()).all())
    return ok, err.max().item()


def check(label, op, ref, x, args, tol_value, tol_grad):
    """op against ref on the same inputs: value and gradient wrt x, upstream gradient random."""
    g = torch.randn(x.shape[:-1], device=DEV)
    xk, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, out_ref = op(xk, *args), ref(xr, *args)
    (out * g).sum().backward()
    (out_ref * g).sum().backward()
    ok_v, err_v = close(out, out_ref, *tol_value)
    ok_g, err_g = close(xk.grad, xr.grad, *tol_grad)
    ok = ok_v and ok_g and out.dtype == torch.float32 and xk.grad.dtype == x.dtype
    print(f"{'PASS' if ok else 'FAIL'}  {label:<52} value err {err_v:.2e}  grad err {err_g:.2e}")
    return ok


FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-3}  # of the largest reference value


def check_fused(label, dtype, N, C, V, chunk_bytes):
    """fused_linear_logprobs and PyTorch's matmul + log-softmax, both in dtype, against a float32
    reference on the same (upcast) inputs: the value and both gradients, temperature 0.8, a random
    upstream gradient per row. PASS when the kernel's largest error is at most twice PyTorch's
    plus FLOOR[dtype] of the largest reference value. In bf16 both round the logits, their gradient
    and the results to bf16, so comparing the two directly measures bf16 rounding, not a bug.
    In float32, PyTorch's path is the reference: the floor alone bounds the kernel's error."""
    torch.manual_seed(0)
    hidden = (torch.randn(N, C, device=DEV) / C**0.5).to(dtype)
    weight = torch.randn(V, C, device=DEV).to(dtype)
    targets = torch.randint(0, V, (N,), device=DEV)
    targets[::7] = L.IGNORE_INDEX
    g = torch.randn(N, device=DEV)
    runs = []
    saved, L.CHUNK_BYTES = L.CHUNK_BYTES, chunk_bytes
    try:
        for op, run_dtype in [(L.fused_linear_logprobs, dtype),
                              (L.fused_linear_logprobs_ref, dtype),
                              (L.fused_linear_logprobs_ref, torch.float32)]:
            h = hidden.to(run_dtype, copy=True).requires_grad_()
            w = weight.to(run_dtype, copy=True).requires_grad_()
            out = op(h, w, targets, 0.8)
            (out * g).sum().backward()
            runs.append([x.detach().float() for x in (out, h.grad, w.grad)])
            del h, w, out
    finally:
        L.CHUNK_BYTES = saved
    V_pad = -(-V // L.PAD_V) * L.PAD_V  # the fused path's matmuls pad the vocabulary
    chunks = -(-N // max(1, chunk_bytes // (V_pad * hidden.element_size())))
    ok, parts = True, []
    for name, got, torch_path, want in zip(("value", "hidden", "weight"), *runs):
        err = (got - want).abs().max().item()
        torch_err = (torch_path - want).abs().max().item()
        floor = FLOOR[dtype] * want.abs().max().item()
        passed = math.isfinite(err) and err <= 2 * torch_err + floor
        ok &= passed
        parts.append(f"{name} {err:.2e} (torch {torch_err:.2e}){'' if passed else ' <-'}")
    print(f"{'PASS' if ok else 'FAIL'}  {label + f' ({chunks} chunks)':<52} " + "  ".join(parts))
    return ok


TOLS = {torch.float32: ((1e-5, 1e-5), (1e-5, 1e-5)),  # (rtol, atol) of values, of gradients
        torch.bfloat16: ((1e-4, 1e-4), (2e-2, 1e-4))}  # gradients are rounded to bf16


def test_correctness():
    print(f"\n{torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"triton {triton.__version__}")
    print("correctness: Triton kernels against the float32 PyTorch references")
    ok = True
    for dtype, N, vocabs in [(torch.float32, 1024, [1000, 50257]),
                             (torch.bfloat16, 4096, VOCABS)]:  # the bench's keys: tunes at N=4096
        for V in vocabs:
            torch.manual_seed(0)
            p = (torch.randn(N, V, device=DEV) * 4).to(dtype)
            q = (p.float() + torch.randn(N, V, device=DEV)).to(dtype)
            targets = torch.randint(0, V, (N,), device=DEV)
            targets[::5] = L.IGNORE_INDEX
            name = f"{str(dtype)[6:]} N={N} V={V}"
            for label, op, ref, x, args in [
                    ("token_logprobs T=0.7", L.token_logprobs, L.token_logprobs_ref, p,
                     (targets, 0.7)),
                    ("entropy", L.entropy, L.entropy_ref, p, ()),
                    ("kl_div", L.kl_div, L.kl_div_ref, p, (q,))]:
                ok &= check(f"{label} {name}", op, ref, x, args, *TOLS[dtype])
            free()
    huge = torch.randn(256, 50257, device=DEV) * 1e4
    targets = huge.argsort(-1)[:, -2].contiguous()
    ok &= check("token_logprobs |x|~1e4 float32 N=256 V=50257", L.token_logprobs,
                L.token_logprobs_ref, huge, (targets,), *TOLS[torch.float32])
    ok &= check("entropy |x|~1e4 float32 N=256 V=50257", L.entropy, L.entropy_ref, huge, (),
                *TOLS[torch.float32])
    print("fused_linear_logprobs: max abs error against a float32 reference, the kernel and "
          "(torch) PyTorch's path in the same dtype")
    ok &= check_fused("fused_linear float32 N=1024 C=256 V=50257", torch.float32, 1024, 256, 50257,
                      chunk_bytes=64 * 2**20)
    ok &= check_fused("fused_linear bf16 N=4096 C=768 V=50257", torch.bfloat16, 4096, 768, 50257,
                      chunk_bytes=L.CHUNK_BYTES)
    free()
    assert ok, "some kernels disagree with their reference: see the FAIL lines above"


# -----------------------------------------------------------------------------------------------
# Memory-bound kernels: token_logprobs, entropy, kl_div

def copy_bandwidth():
    """GB/s of a large device-to-device copy, counting the bytes read and written."""
    src = torch.empty(2**31, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    del src, dst
    free()
    return 2 * 2**31 / ms / 1e6


def ideal_bytes(op, N, V):
    """(forward, forward+backward) bytes of bf16 logits [N, V] read and written by a fused op."""
    reads = 2 if op == "kl_div" else 1  # logits tensors read by the forward
    return reads * N * V * 2, (2 * reads + 1) * N * V * 2


def measure(fn, x, g):
    """(fwd ms, fwd+bwd ms, peak GB) of fn(x), or 'OOM' for what did not fit."""
    def step():
        fn(x).backward(g)

    out = []
    try:
        step()  # compiles, autotunes, and warms the allocator
        x.grad = None
        peak = peak_gb(step)
        x.grad = None
        out = [bench_ms(lambda: fn(x)), bench_ms(step, grad_to_none=[x]), peak]
    except torch.cuda.OutOfMemoryError:
        out = ["OOM"] * 3
    x.grad = None
    free()
    return out


# -----------------------------------------------------------------------------------------------
# Every config of the memory-bound kernels, pinned in turn: the autotuner times them, never checks

# op -> (kernel, reference, its forward and backward Triton kernels)
OPS = {"token_logprobs": (L.token_logprobs, L.token_logprobs_ref, L._logprob_fwd_kernel,
                          L._logprob_bwd_kernel),
       "entropy": (L.entropy, L.entropy_ref, L._entropy_fwd_kernel, L._entropy_bwd_kernel),
       "kl_div": (L.kl_div, L.kl_div_ref, L._kl_fwd_kernel, L._kl_bwd_kernel)}
TRITON_KERNELS = [k for _, _, *pair in OPS.values() for k in pair]  # the six autotuned kernels


@contextlib.contextmanager
def pinned(config):
    """The memory-bound kernels run at config: an autotuner with one config runs it untimed."""
    saved = [k.configs for k in TRITON_KERNELS]
    for k in TRITON_KERNELS:
        k.configs = [config]
    try:
        yield
    finally:
        for k, configs in zip(TRITON_KERNELS, saved):
            k.configs = configs


def inputs(op, N, V, dtype, stride=None):
    """(x [N, V] requiring grad, the op's other arguments, an upstream gradient [N]); rows `stride`
    entries apart when given (a view of wider rows)."""
    logits = torch.randn(N, stride or V, device=DEV) * 4
    x = logits.to(dtype)[:, :V].requires_grad_()
    args = {"token_logprobs": (torch.randint(0, V, (N,), device=DEV),), "entropy": (),
            "kl_div": ((logits + torch.randn_like(logits)).to(dtype)[:, :V],)}[op]  # q: x's strides
    if op == "token_logprobs":
        args[0][::5] = L.IGNORE_INDEX
    return x, args, torch.randn(N, device=DEV)


def pinned_run(op, config, x, args, g):
    """(value, gradient of x) of op at config, checking that config is what ran."""
    fn, _, fwd, bwd = OPS[op]
    with pinned(config):
        x.grad = None
        out = fn(x, *args)
        (out * g).sum().backward()
        assert fwd.best_config is config and bwd.best_config is config, (op, str(config))
    grad, x.grad = x.grad, None
    return out, grad


def reference(op, x, args, g, rows=None):
    """(value, gradient of x) of the float32 reference, on the first `rows` rows."""
    x_ref = x.detach()[:rows].clone().requires_grad_()
    want = OPS[op][1](x_ref, *(a[:rows] for a in args))
    (want * g[:rows]).sum().backward()
    return want, x_ref.grad


def short_rows():
    """[(V, row stride)] for test_every_config_on_short_rows: for each pipelined block size, rows
    with 0 to 3 blocks inside them, and rows shorter than any block; odd strides, so that the rows
    of a tensor start at every offset from an aligned entry (tests/test_logprob.py checks both)."""
    blocks = sorted({c.kwargs["BLOCK_V"] for c in L.GPU_CONFIGS if c.kwargs["STAGES"] > 1})
    vocabs = sorted({1000} | {k * b + 5 for b in blocks for k in range(1, 5)})
    return [(V, V // 2 * 2 + 3) for V in vocabs]


def test_every_config_on_short_rows(N=64):
    """Each config on rows of 0 to 3 blocks inside them, for each pipelined block size, and rows
    shorter than a block (short_rows): a pipelined loop's first copies are issued before it knows
    whether it has that many blocks, and test_every_config's rows have 5 or more. The rows are views
    of wider ones, at every offset from an aligned entry, bf16 and float32, against the float32
    reference."""
    failed = []
    for dtype in (torch.bfloat16, torch.float32):
        for op in OPS:
            for V, stride in short_rows():
                torch.manual_seed(V)
                x, args, g = inputs(op, N, V, dtype, stride)
                want, want_grad = reference(op, x, args, g)
                for config in L.GPU_CONFIGS:
                    out, grad = pinned_run(op, config, x, args, g)
                    (ok_v, err_v), (ok_g, err_g) = (close(out, want, *TOLS[dtype][0]),
                                                    close(grad, want_grad, *TOLS[dtype][1]))
                    if not (ok_v and ok_g):
                        failed.append(f"{op} {str(dtype)[6:]} V={V} {config}: value err {err_v:.1e}, "
                                      f"grad err {err_g:.1e}")
    print(f"\nevery config on short rows ({len(short_rows())} vocabulary sizes, 2 dtypes, 3 ops): "
          f"{len(failed)} failed" + "".join(f"\nFAIL  {f}" for f in failed))
    assert not failed


def test_every_config(N=16384, rows=2048):
    """Each config the autotuner chooses from, pinned in turn for forward and backward: checked
    against the float32 reference on the first 2048 rows (the autotuner times configs, it does not
    check them), then timed at N = 16384, bf16. Shows what the block size, pipelining (STAGES > 1)
    and a cap on registers (regs) do to each kernel."""
    copy = copy_bandwidth()
    print(f"\nevery config, bf16, N={N} (copy bandwidth {copy:.0f} GB/s); PASS/FAIL: the first "
          f"{rows} rows against the float32 reference")
    head = (f"{'op':<15}{'V':>7} {'BLOCK_V':>7}{'warps':>6}{'stages':>7}{'regs':>5} | {'fwd ms':>8}"
            f"{'%copy':>6} | {'f+b ms':>8}{'%copy':>6} | check")
    print(head)
    print("-" * len(head))
    ok, best = True, {}
    for op in OPS:
        fn = OPS[op][0]
        for V in VOCABS:
            torch.manual_seed(0)
            x, args, g = inputs(op, N, V, torch.bfloat16)
            want, want_grad = reference(op, x, args, g, rows)
            fwd_bytes, both_bytes = ideal_bytes(op, N, V)
            for config in L.GPU_CONFIGS:
                out, grad = pinned_run(op, config, x, args, g)
                ok_v, err_v = close(out[:rows], want, *TOLS[torch.bfloat16][0])
                ok_g, err_g = close(grad[:rows], want_grad, *TOLS[torch.bfloat16][1])
                del out, grad
                with pinned(config):
                    fwd = bench_ms(lambda: fn(x, *args))
                    both = bench_ms(lambda: fn(x, *args).backward(g), grad_to_none=[x])
                ok &= ok_v and ok_g
                pct = (100 * fwd_bytes / fwd / 1e6 / copy, 100 * both_bytes / both / 1e6 / copy)
                block, stages, warps = config.kwargs["BLOCK_V"], config.kwargs["STAGES"], config.num_warps
                cap = config.maxnreg or "-"  # the config's cap on registers a thread
                if ok_v and ok_g:
                    name = f"BLOCK_V {block}, {warps} warps, STAGES {stages}" + (
                        f", at most {cap} registers" if config.maxnreg else "")
                    best[op, V] = max(best.get((op, V), (0, 0, "")), (*pct, name))
                verdict = "PASS" if ok_v and ok_g else "FAIL"
                print(f"{op:<15}{V:>7} {block:>7}{warps:>6}{stages:>7}{cap:>5} | {fwd:>8.3f}"
                      f"{pct[0]:>6.0f} | {both:>8.3f}{pct[1]:>6.0f} | {verdict} "
                      f"(value err {err_v:.1e}, grad err {err_g:.1e})")
            del x, args, g, want, want_grad
            free()
    print("the fastest forward of each op that passed: % of copy, forward / forward+backward, "
          "at its config")
    for (op, V), (fwd_pct, both_pct, name) in best.items():
        print(f"  {op:<15} V={V:<7} {fwd_pct:3.0f}% / {both_pct:3.0f}%  {name}")
    assert ok, "a config disagrees with the reference: see the FAIL lines above"


# -----------------------------------------------------------------------------------------------
# The autotuned kernels against PyTorch and torch.compile, at every N and V

def test_memory_bound():
    copy = copy_bandwidth()
    print(f"\ncopy bandwidth (device to device, read + write): {copy:.0f} GB/s")
    naive = {"token_logprobs": L.token_logprobs_ref, "entropy": L.entropy_ref,
             "kl_div": L.kl_div_ref}
    kernel = {"token_logprobs": L.token_logprobs, "entropy": L.entropy, "kl_div": L.kl_div}
    compiled = {op: torch.compile(fn, dynamic=True) for op, fn in naive.items()}
    head = (f"{'op':<15}{'impl':<9}{'N':>6}{'V':>7} | {'fwd ms':>8}{'GB/s':>7}{'%copy':>6} | "
            f"{'f+b ms':>8}{'GB/s':>7}{'%copy':>6} | {'peak GB':>8}")
    print(head)
    print("-" * len(head))
    for op in naive:
        for V in VOCABS:
            for N in TOKENS:
                torch.manual_seed(0)
                x = torch.randn(N, V, device=DEV, dtype=torch.bfloat16).requires_grad_()
                targets = torch.randint(0, V, (N,), device=DEV)
                g = torch.randn(N, device=DEV)
                args = {"token_logprobs": (targets,), "entropy": (),
                        "kl_div": (torch.randn(N, V, device=DEV, dtype=torch.bfloat16),)}[op]
                fwd_bytes, both_bytes = ideal_bytes(op, N, V)
                for impl, fn in [("triton", kernel[op]), ("naive", naive[op]),
                                 ("compile", compiled[op])]:
                    if impl not in IMPLS:
                        continue
                    try:
                        fwd, both, peak = measure(lambda x_: fn(x_, *args), x, g)
                    except Exception as e:  # torch.compile could not build it
                        if impl != "compile":
                            raise
                        print(f"    (compile failed: {type(e).__name__}: {str(e)[:100]})")
                        fwd = both = peak = "n/a"
                    RESULTS[op, impl, N, V] = dict(fwd=fwd, both=both, peak=peak)
                    cols = []
                    for ms, nb in ((fwd, fwd_bytes), (both, both_bytes)):
                        gbs = nb / ms / 1e6 if not isinstance(ms, str) else ms
                        pct = 100 * gbs / copy if not isinstance(gbs, str) else ""
                        cols.append(f"{fmt(ms, '8.3f'):>8}{fmt(gbs, '7.0f'):>7}"
                                    f"{fmt(pct, '5.0f'):>6}")
                    print(f"{op:<15}{impl:<9}{N:>6}{V:>7} | {cols[0]} | {cols[1]} | "
                          f"{fmt(peak, '8.2f'):>8}")
                del x, targets, g, args
                free()
    print("\ngoal: token_logprobs and kl_div at >= 85% of the copy bandwidth (N=16384, bf16)")
    for op in ("token_logprobs", "kl_div", "entropy"):
        for V in VOCABS:
            r = RESULTS.get((op, "triton", 16384, V))
            if r is None or isinstance(r["fwd"], str):
                continue
            fwd_bytes, both_bytes = ideal_bytes(op, 16384, V)
            fwd_pct = 100 * fwd_bytes / r["fwd"] / 1e6 / copy
            both_pct = 100 * both_bytes / r["both"] / 1e6 / copy
            print(f"  {op:<15} V={V:<7} fwd {fwd_pct:.0f}%  fwd+bwd {both_pct:.0f}%")
    print("autotuned configs (bf16), by V:")
    for kernel_fn in TRITON_KERNELS:
        tuned = {key[0]: str(cfg) for key, cfg in kernel_fn.cache.items()
                 if any("bfloat16" in str(k) for k in key)}
        print(f"  {kernel_fn.base_fn.__name__}: {tuned}")


# -----------------------------------------------------------------------------------------------
# fused_linear_logprobs against matmul + log-softmax

def test_fused_linear():
    head = (f"{'impl':<8}{'N':>6}{'C':>6}{'V':>7} | {'fwd ms':>8}{'TFLOP/s':>8} | "
            f"{'f+b ms':>8}{'TFLOP/s':>8} | {'peak GB':>8}{'saved GB':>9}")
    print("\nfused_linear_logprobs, bf16 (model FLOPs: 2NVC forward, 6NVC forward+backward; saved: the "
          "naive path's peak minus the kernel's)")
    print(head)
    print("-" * len(head))
    compiled = torch.compile(L.fused_linear_logprobs_ref, dynamic=True)
    for V in VOCABS:
        for C in WIDTHS:
            for N in TOKENS:
                torch.manual_seed(0)
                hidden = (torch.randn(N, C, device=DEV) / C**0.5).bfloat16().requires_grad_()
                weight = (torch.randn(V, C, device=DEV) * 0.02).bfloat16().requires_grad_()
                targets = torch.randint(0, V, (N,), device=DEV)
                g = torch.randn(N, device=DEV)
                flops = 2 * N * V * C
                for impl, fn in [("naive", L.fused_linear_logprobs_ref), ("compile", compiled),
                                 ("fused", L.fused_linear_logprobs)]:
                    def step():
                        fn(hidden, weight, targets).backward(g)

                    try:
                        step()
                        hidden.grad = weight.grad = None
                        peak = peak_gb(step)
                        hidden.grad = weight.grad = None
                        fwd = bench_ms(lambda: fn(hidden, weight, targets))
                        both = bench_ms(step, grad_to_none=[hidden, weight])
                    except torch.cuda.OutOfMemoryError:
                        fwd = both = peak = "OOM"
                    except Exception as e:  # torch.compile could not build it
                        if impl != "compile":
                            raise
                        fwd = both = peak = "n/a"
                        print(f"    (compile failed: {type(e).__name__}: {str(e)[:100]})")
                    hidden.grad = weight.grad = None
                    free()
                    RESULTS["fused", impl, N, V, C] = dict(fwd=fwd, both=both, peak=peak)
                    tf_fwd = flops / fwd / 1e9 if not isinstance(fwd, str) else fwd
                    tf_both = 3 * flops / both / 1e9 if not isinstance(both, str) else both
                    naive_peak = RESULTS["fused", "naive", N, V, C]["peak"]
                    saved = naive_peak - peak if impl == "fused" and not isinstance(naive_peak, str) \
                        and not isinstance(peak, str) else "-"
                    print(f"{impl:<8}{N:>6}{C:>6}{V:>7} | {fmt(fwd, '8.2f'):>8}"
                          f"{fmt(tf_fwd, '8.0f'):>8} | {fmt(both, '8.2f'):>8}"
                          f"{fmt(tf_both, '8.0f'):>8} | {fmt(peak, '8.2f'):>8}{fmt(saved, '9.2f'):>9}")
                del hidden, weight, targets, g
                free()
    print("\ngoal: fused at least as fast as naive at C=768, at most 1/8 of its peak memory at "
          "N=16384, V=50257")
    fused = RESULTS.get(("fused", "fused", 16384, 50257, 768))
    naive = RESULTS.get(("fused", "naive", 16384, 50257, 768))
    if fused and naive and not any(isinstance(v, str) for v in (*fused.values(), *naive.values())):
        print(f"  fwd+bwd speed-up {naive['both'] / fused['both']:.2f}x, "
              f"peak memory {fused['peak']:.2f} GB vs {naive['peak']:.2f} GB "
              f"(1/{naive['peak'] / fused['peak']:.0f})")
