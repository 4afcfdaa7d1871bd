"""
Tests of the Triton flash attention (kernels/attention.py) against the reference computed in float64.

    python -m pytest tests/test_attention.py -q

Without a GPU (tests/conftest.py sets TRITON_INTERPRET=1) the kernels run in Triton's interpreter on CPU
tensors, with blocks of 16 and 32 rows, on shapes small enough for two shared cores; the lengths are
chosen so that blocks are cut by the causal diagonal, by kv_start and by the ends of the sequences.
With a GPU the same tests run compiled on CUDA tensors, and test_bf16_on_gpu adds bf16 at larger shapes.
Errors are measured as max |kernel - reference| / max |reference|, per tensor: fp32 within 1e-4, fp16
within 1e-2. (bf16 is left to the GPU: the interpreter's bf16 matmul is wrong.)
"""

import math

import pytest
import torch
import triton

import kernels
from kernels.attention import attention, attention_ref

INTERPRET = triton.knobs.runtime.interpret  # TRITON_INTERPRET, as Triton reads it
DEVICE = "cpu" if INTERPRET else "cuda"
TOL = {torch.float32: 1e-4, torch.float16: 1e-2}


def make_inputs(B, H, Tq, Tk, D, dtype, seed=0):
    """q, k, v leaf tensors and an upstream gradient dO that is not all ones."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=gen) for T in (Tq, Tk, Tk))
    do = torch.randn(B, H, Tq, D, generator=gen)
    leaves = [x.to(DEVICE, dtype).requires_grad_() for x in (q, k, v)]
    return (*leaves, do.to(DEVICE, dtype))


def run(fn, q, k, v, do, **kw):
    """fn's output and the gradients of <output, do> with respect to q, k and v."""
    out = fn(q, k, v, **kw)
    return (out, *torch.autograd.grad(out, (q, k, v), do))


def reference64(q, k, v, do, **kw):
    """The reference in float64, from the same (rounded) inputs."""
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    return run(attention_ref, *leaves, do.double(), **kw)


def assert_close(got, want, tol):
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.shape == w.shape and g.dtype != torch.float64, name
        assert torch.isfinite(g).all(), f"{name} has NaN or inf"
        err = ((g.double() - w).abs().max() / w.abs().max().clamp_min(1e-6)).item()
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize(
    "B, H, Tq, Tk, D, causal, dtype",
    [
        (2, 2, 37, 37, 32, True, torch.float32),  # odd length: partial blocks on the diagonal and the end
        (1, 2, 64, 64, 64, True, torch.float32),  # block-aligned, so the unmasked path runs whole
        (2, 1, 37, 37, 16, True, torch.float16),
        (1, 2, 48, 48, 64, True, torch.float16),
        (1, 1, 37, 37, 48, True, torch.float32),  # head dim padded up to 64
        (2, 2, 5, 37, 32, True, torch.float32),  # Tq < Tk: a prefill chunk after a KV cache
        (1, 2, 36, 37, 32, True, torch.float32),  # Tk - Tq = 1: a query block sees one key past itself
        (2, 2, 1, 37, 32, True, torch.float16),  # one decoding step
        (2, 1, 37, 50, 32, False, torch.float32),  # no mask, Tq != Tk
        (1, 2, 50, 37, 16, False, torch.float16),  # no mask, Tq > Tk
    ],
)
def test_matches_reference(B, H, Tq, Tk, D, causal, dtype):
    q, k, v, do = make_inputs(B, H, Tq, Tk, D, dtype)
    assert_close(run(attention, q, k, v, do, causal=causal), reference64(q, k, v, do, causal=causal), TOL[dtype])


@pytest.mark.parametrize("shift", range(32))
def test_every_diagonal_offset(shift):
    """Tk - Tq from 0 to 31: the causal diagonal crosses the blocks (16 and 32 rows in the interpreter) at
    every offset, so each off-by-one in the block ranges shows."""
    q, k, v, do = make_inputs(1, 1, 33, 33 + shift, 16, torch.float32, seed=shift)
    assert_close(run(attention, q, k, v, do), reference64(q, k, v, do), TOL[torch.float32])


@pytest.mark.parametrize(
    "Tq, Tk, kv_start",
    [
        (37, 37, [0, 20]),  # row 1: queries 0..19 see no key at all
        (37, 37, [16, 32]),  # kv_start on block edges: whole key blocks hidden
        (64, 64, [5, 31]),  # key blocks cut by kv_start (one visible key), seen by whole query blocks
        (5, 37, [3, 35]),  # decoding after left padding: row 1 queries 0..2 see nothing
        (1, 37, [37, 0]),  # row 0 is all padding
    ],
)
def test_ragged_kv_start(Tq, Tk, kv_start):
    q, k, v, do = make_inputs(2, 2, Tq, Tk, 32, torch.float32, seed=1)
    kv_start = torch.tensor(kv_start)
    got = run(attention, q, k, v, do, kv_start=kv_start)
    assert_close(got, reference64(q, k, v, do, kv_start=kv_start), TOL[torch.float32])
    # a query that sees no key outputs exactly zero and passes no gradient to itself
    sees_nothing = (torch.arange(Tq) + Tk - Tq)[None, :] < kv_start[:, None]  # [B, Tq]
    assert sees_nothing.any()
    for x in got[:2]:  # out and dq, [B, H, Tq, D]
        assert (x.transpose(1, 2)[sees_nothing.to(DEVICE)] == 0).all()


@pytest.mark.parametrize("causal", [True, False])
def test_reference_decoding_step_equals_general_path(causal):
    """attention_ref builds the mask of one query (a decoding step, Tq = 1) in fewer ops: its output must
    be the last row of the general path's, a row of padding alone (kv_start = Tk) included."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(3, 2, 9, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    kv_start = torch.tensor([0, 4, 9])
    full = attention_ref(q, k, v, causal=causal, kv_start=kv_start)  # the general masked path
    step = attention_ref(q[:, :, -1:], k, v, causal=causal, kv_start=kv_start)
    torch.testing.assert_close(step, full[:, :, -1:], rtol=1e-12, atol=1e-12)
    assert (step[2] == 0).all()


def test_custom_scale_and_strided_inputs():
    """q, k, v as the model makes them (views of [B, T, H, D] buffers), a head dim that is not contiguous
    (copied by the wrapper), a strided upstream gradient, and an explicit sm_scale."""
    B, H, T, D = 2, 2, 37, 32
    gen = torch.Generator().manual_seed(2)
    qkv = torch.randn(B, T, 3, H, D, generator=gen).to(DEVICE).requires_grad_()
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # [B, H, T, D], time stride 3 * H * D
    v = torch.randn(B, H, T, 2 * D, generator=gen).to(DEVICE)[..., ::2].requires_grad_()  # head-dim stride 2
    do = torch.randn(B, T, H, D, generator=gen).to(DEVICE).transpose(1, 2)
    assert not q.is_contiguous() and v.stride(-1) == 2 and not do.is_contiguous()
    kw = dict(causal=True, sm_scale=0.3)
    out = attention(q, k, v, **kw)
    got = (out, *torch.autograd.grad(out, (q, k, v), do, retain_graph=True))
    assert_close(got, reference64(q, k, v, do, **kw), TOL[torch.float32])
    # an upstream gradient whose head dim is not contiguous either (the backward copies it)
    do_strided = torch.randn(B, H, T, 2 * D, generator=gen).to(DEVICE)[..., ::2]
    assert do_strided.stride(-1) == 2
    got = (out, *torch.autograd.grad(out, (q, k, v), do_strided))
    assert_close(got, reference64(q, k, v, do_strided, **kw), TOL[torch.float32])


def test_every_element_written(monkeypatch):
    """Fresh float buffers come back full of NaN: every element of the output, the saved log-sum-exp and the
    gradients must be written by a kernel (partial blocks, hidden key blocks and empty rows included)."""
    q, k, v, do = make_inputs(2, 2, 37, 45, 48, torch.float32, seed=3)
    kv_start = torch.tensor([0, 25])
    want = reference64(q, k, v, do, kv_start=kv_start)
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(alloc):
        def alloc_nan(*args, **kwargs):
            x = alloc(*args, **kwargs)
            return x.fill_(math.nan) if x.is_floating_point() else x
        return alloc_nan

    monkeypatch.setattr(torch, "empty", poisoned(empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(empty_like))
    assert torch.isnan(torch.empty(1)).all()
    assert_close(run(attention, q, k, v, do, kv_start=kv_start), want, TOL[torch.float32])


@pytest.mark.parametrize("mode, expect", [("torch", "attention_ref"), ("triton", "attention"), ("auto", None)])
def test_dispatch(monkeypatch, mode, expect):
    """RLHF_KERNELS picks the path of kernels.attention at every call; auto picks Triton for CUDA tensors."""
    calls = []
    for name in ("attention", "attention_ref"):
        real = getattr(kernels._attention, name)
        monkeypatch.setattr(kernels._attention, name, lambda *a, _n=name, _f=real, **kw: calls.append(_n) or _f(*a, **kw))
    monkeypatch.setenv("RLHF_KERNELS", mode)
    q, k, v, do = make_inputs(1, 2, 37, 37, 16, torch.float32, seed=4)
    assert_close(run(kernels.attention, q, k, v, do), reference64(q, k, v, do), TOL[torch.float32])
    assert calls == [expect or ("attention" if q.is_cuda else "attention_ref")]


@pytest.mark.parametrize("mode", ["torch", "triton"])
def test_dispatch_passes_every_argument(monkeypatch, mode):
    """kernels.attention hands causal, sm_scale and kv_start on to either path (the model passes only
    causal=True and kv_start): here no causal mask, Tq != Tk, a scale of 0.3 and a left-padded row."""
    monkeypatch.setenv("RLHF_KERNELS", mode)
    q, k, v, do = make_inputs(2, 2, 5, 37, 16, torch.float32, seed=6)
    kw = dict(causal=False, sm_scale=0.3, kv_start=torch.tensor([0, 9]))
    assert_close(run(kernels.attention, q, k, v, do, **kw), reference64(q, k, v, do, **kw), TOL[torch.float32])


@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs CUDA (compiled Triton)")
@pytest.mark.parametrize(
    "B, H, Tq, Tk, D, causal, kv_start",
    [
        (2, 4, 1000, 1000, 64, True, None),  # (D = 128 causal is checked by bench/bench_attention.py)
        (2, 4, 777, 1024, 128, True, [0, 300]),
        (2, 4, 1, 1030, 64, True, [5, 700]),
        (2, 4, 513, 700, 80, False, None),
    ],
)
def test_bf16_on_gpu(B, H, Tq, Tk, D, causal, kv_start):
    """bf16 against a float32 reference: the kernel's error must stay within twice that of PyTorch's own bf16
    attention (plus a small floor), for the output and every gradient."""
    q, k, v, do = make_inputs(B, H, Tq, Tk, D, torch.bfloat16, seed=5)
    kw = dict(causal=causal, kv_start=None if kv_start is None else torch.tensor(kv_start, device=DEVICE))
    got = run(attention, q, k, v, do, **kw)
    torch_bf16 = run(attention_ref, q, k, v, do, **kw)
    leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
    want = run(attention_ref, *leaves, do.float(), **kw)
    for name, g, t, w in zip(("out", "dq", "dk", "dv"), got, torch_bf16, want):
        assert torch.isfinite(g).all(), f"{name} has NaN or inf"
        err, torch_err = ((g.float() - w).abs().max().item(), (t.float() - w).abs().max().item())
        assert err <= 2 * torch_err + 1e-3 * w.abs().max().item(), f"{name}: error {err:.2e}, torch bf16 {torch_err:.2e}"
