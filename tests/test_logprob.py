"""
Tests of kernels/logprob.py: the Triton kernels against float64 references, values and gradients.

    python -m pytest tests/test_logprob.py -q

On a CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py sets it), so the shapes stay
small. The one CUDA test (bf16 at a realistic shape) needs the interpreter off:

    TRITON_INTERPRET=0 python -m pytest tests/test_logprob.py -q -k cuda

One more needs no GPU: the kernels compiled for an H100/H200 by Triton ahead of time, their machine
code read with the NVIDIA tools that come with Triton (bench/bench_sass.py).
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import logprob
from kernels.logprob import IGNORE_INDEX

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# numpy warns of what a GPU does silently: the interpreter evaluates both sides of tl.where (the
# kernels' guarded 0 * -inf), and the first block's rescaling exp2((LOWEST - m) * log2(e))
# overflows to exp2(-inf) = 0
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")]

TOL = {  # (rtol, atol) by input dtype; outputs are float32, gradients are in the input dtype
    torch.float32: (1e-5, 1e-6),
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1e-2, 1e-4),
}


# float64 references, written independently of kernels/logprob.py; 0 * log 0 counts as 0

def logprobs64(logits, targets, temperature=1.0):
    logp = F.log_softmax(logits / temperature, dim=-1)
    ignored = targets == IGNORE_INDEX
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked.masked_fill(ignored, 0.0)


def entropy64(logits):
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp.masked_fill(logp == float("-inf"), 0.0)).sum(-1)


def kl64(logits_p, logits_q):
    logp, logq = F.log_softmax(logits_p, dim=-1), F.log_softmax(logits_q, dim=-1)
    return (logp.exp() * (logp - logq).masked_fill(logp == float("-inf"), 0.0)).sum(-1)


def kl64_q_finite(logits_p, logits_q):
    """kl64 with q's logits of -inf at 1e4 nats below instead, which float64 cannot tell apart: KL
    where p is negligible at every q of 0 (inf to kl64 wherever p is not exactly 0)."""
    return kl64(logits_p, logits_q.masked_fill(logits_q == float("-inf"), -1e4))


def check(op, ref, x, *args, grad_out=None, tol=None, grad_atol=None):
    """op(x, *args) against ref(x in float64, *args in float64): value and gradient wrt x.
    grad_atol: the gradient's absolute tolerance for each entry, where one number will not do."""
    rtol, atol = tol or TOL[x.dtype]
    x = x.detach().requires_grad_()  # not clone(): that would make a strided view contiguous
    out = op(x, *args)
    x64 = x.detach().double().requires_grad_()
    args64 = [a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
    out64 = ref(x64, *args64)
    g = torch.randn(out.shape) if grad_out is None else grad_out
    (out * g).sum().backward()
    (out64 * g.double()).sum().backward()
    assert out.dtype == torch.float32 and out.shape == out64.shape
    assert x.grad.dtype == x.dtype and x.grad.shape == x.shape
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    torch.testing.assert_close(out.double(), out64, rtol=rtol, atol=atol)
    if grad_atol is None:
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=rtol, atol=atol)
    else:
        excess = (x.grad.double() - x64.grad).abs() - rtol * x64.grad.abs() - grad_atol
        assert (excess <= 0).all(), f"gradient beyond its tolerance by up to {excess.max().item():.3g}"
    return x.grad


def random_targets(shape, V, n_ignored=3):
    targets = torch.randint(0, V, shape)
    targets.view(-1)[torch.randperm(targets.numel())[:n_ignored]] = IGNORE_INDEX
    return targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37,), (3, 7)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs(dtype, shape, temperature):
    torch.manual_seed(0)
    V = 1000
    logits = (torch.randn(*shape, V) * 3).to(dtype)
    targets = random_targets(shape, V)
    grad = check(logprob.token_logprobs, logprobs64, logits, targets, temperature)
    assert (grad[targets == IGNORE_INDEX] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37,), (3, 7)])
def test_entropy_and_kl(dtype, shape):
    torch.manual_seed(0)
    V = 1000
    logits_p = (torch.randn(*shape, V) * 3).to(dtype)
    logits_q = (logits_p.float() + torch.randn(*shape, V)).to(dtype)
    check(logprob.entropy, entropy64, logits_p)
    check(logprob.kl_div, kl64, logits_p, logits_q)


@pytest.mark.parametrize("op", [logprob.kl_div, logprob.kl_div_ref])
def test_kl_no_gradient_into_q(op):
    """q is a constant for the kernel and for the CPU reference alike (PPO's reference model)."""
    logits_p = torch.randn(5, 300, requires_grad=True)
    logits_q = torch.randn(5, 300, requires_grad=True)
    op(logits_p, logits_q).sum().backward()
    assert logits_p.grad is not None and logits_q.grad is None


def test_gpt2_vocabulary():
    """V = 50257: not a power of two, 13 blocks of the interpreter's 4096, a partial last one."""
    torch.manual_seed(0)
    V = 50257
    logits_p = torch.randn(2, V) * 4
    logits_q = logits_p + torch.randn(2, V)
    targets = torch.tensor([V - 1, 17])
    check(logprob.token_logprobs, logprobs64, logits_p, targets, 0.9)
    check(logprob.entropy, entropy64, logits_p)
    check(logprob.kl_div, kl64, logits_p, logits_q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_misaligned_rows(dtype):
    """V = 1003 (odd): row r starts at entry 1003 r, so the kernels' blocks start up to 7 entries
    before the row (at a multiple of 8) and must ignore those entries, and must not write them."""
    torch.manual_seed(0)
    N, V = 37, 1003
    logits_p = (torch.randn(N, V) * 3).to(dtype)
    logits_q = (logits_p.float() + torch.randn(N, V)).to(dtype)
    targets = random_targets((N,), V)
    targets[:3] = torch.tensor([0, V - 1, 1])  # the first and last entries of a row
    check(logprob.token_logprobs, logprobs64, logits_p, targets, 0.7)
    check(logprob.entropy, entropy64, logits_p)
    check(logprob.kl_div, kl64, logits_p, logits_q)


def test_misaligned_views():
    """A view that starts 3 entries into its storage with an odd row stride (1010), and a q whose
    row stride differs from p's (the kernels take one stride: the launcher copies)."""
    torch.manual_seed(0)
    N, V = 37, 1003
    storage = torch.randn(N, V + 7) * 3
    view = storage[:, 3:3 + V]
    targets = random_targets((N,), V)
    check(logprob.token_logprobs, logprobs64, view, targets, 1.3)
    check(logprob.entropy, entropy64, view)
    check(logprob.kl_div, kl64, view, torch.randn(N, V) * 3)
    check(logprob.kl_div, kl64, torch.randn(N, V) * 3, view)


def gapped_rows(V, gap, N=8, dtype=torch.float32):
    """(storage, rows): N rows of V random logits in a storage of row stride = 1 mod 8, so that row r
    starts r entries (mod 8) past an aligned one, with `gap` in the 8 to 15 entries between rows."""
    stride = V + 8 + (1 - V) % 8
    storage = torch.full((N, stride), gap, dtype=dtype)
    storage[:, :V] = torch.randn(N, V) * 3
    return storage, storage[:, :V]


@pytest.mark.parametrize("blocks", [1 - 1 / 4096, 1, 1 + 1 / 4096, 2, 2.5])
def test_rows_of_whole_blocks(blocks):
    """Rows one entry short of a block (the interpreter's BLOCK_V), of one, of one and an entry, of
    two and of two and a half, that start at every offset from an aligned entry (row stride = 1 mod
    8: row r starts r entries past one), with a large value in the gaps between them. The kernels
    walk a row's inside blocks and its end blocks in two passes: each block must be read once, and
    the first block's entries before the row (the previous row's gap) must count for nothing."""
    torch.manual_seed(0)
    V = round(blocks * logprob.CONFIGS[0].kwargs["BLOCK_V"])
    (_, p), (_, q) = gapped_rows(V, 60.0), gapped_rows(V, 60.0)
    assert sorted(p.stride(0) * r % 8 for r in range(8)) == list(range(8))
    targets = torch.tensor([0, V - 1, V // 2, 1, V - 2, 7, V - 8, V // 3])
    check(logprob.token_logprobs, logprobs64, p, targets, 0.8)
    check(logprob.entropy, entropy64, p)
    check(logprob.kl_div, kl64, p, q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # groups of 4 entries, of 8
@pytest.mark.parametrize("blocks", [1 - 1 / 4096, 1, 2 + 3 / 4096])
def test_backward_kernels_write_only_their_rows(blocks, dtype):
    """The backward kernels write their gradient into a tensor whose rows have gaps between them (row stride
    = 1 mod 8, so rows start at every offset from an aligned entry), filled beforehand: the gaps stay as
    they were. A block written whole one entry past its row's end would be a race between two rows on a
    GPU, and past the tensor's end on the last row; under the interpreter the next row would hide it."""
    torch.manual_seed(0)
    V, N = round(blocks * logprob.CONFIGS[0].kwargs["BLOCK_V"]), 8
    (_, p), (_, q) = gapped_rows(V, 60.0, dtype=dtype), gapped_rows(V, 60.0, dtype=dtype)
    stride = p.stride(0)
    targets, g = torch.randint(0, V, (N,)), torch.randn(N)
    fwd = logprob._row_floats(p, 5)
    grads = {}
    for name in ("token_logprobs", "entropy", "kl_div"):
        storage, grad = gapped_rows(V, 123.0, dtype=dtype)
        if name == "token_logprobs":
            logprob._logprob_fwd(p, targets, 1.0, *fwd[:3])
            logprob._logprob_bwd(p, targets, *fwd[1:3], g, 1.0, grad)
        elif name == "entropy":
            logprob._entropy_fwd_kernel[(N,)](p, stride, *fwd[:3], V)
            logprob._entropy_bwd_kernel[(N,)](p, grad, stride, *fwd[:3], g, V)
        else:
            logprob._kl_fwd_kernel[(N,)](p, q, stride, *fwd, V)
            logprob._kl_bwd_kernel[(N,)](p, q, grad, stride, *fwd, g, V)
        assert (storage[:, V:] == 123.0).all(), name
        grads[name] = grad
    x = p.detach().double().requires_grad_()
    for name, ref in [("token_logprobs", lambda x: logprobs64(x, targets)), ("entropy", entropy64),
                      ("kl_div", lambda x: kl64(x, q.double()))]:
        x.grad = None
        (ref(x) * g.double()).sum().backward()
        torch.testing.assert_close(grads[name].double(), x.grad, rtol=TOL[dtype][0], atol=TOL[dtype][1])


def test_maximum_in_a_later_block():
    """The running maximum grows block after block; a first block of -inf (masked vocabulary)."""
    torch.manual_seed(0)
    V = 10000
    logits = torch.randn(4, V) + torch.linspace(0, 30, V)
    logits[1, :5000] = float("-inf")
    targets = torch.tensor([V - 1, 7000, 0, IGNORE_INDEX])
    check(logprob.token_logprobs, logprobs64, logits, targets)
    check(logprob.entropy, entropy64, logits)
    check(logprob.kl_div, kl64, logits, logits + torch.randn(4, V))  # q is -inf where p is


def test_kl_where_q_is_zero_only_where_p_is_negligible():
    """q = 0 (logit -inf) only at entries where p is 200 nats below its maximum, as are the other
    entries of their groups: they count as p = 0 (a GPU's kernels flush p below 87 nats, the
    interpreter's and float32 below 103), in either order of the maxima. p's maximum is entry 0,
    in the row's first block, which the kernels take in after the blocks inside the row; so in a
    row of three blocks a group first sums an inf (e_p = 1 at its own maximum, log q = -inf) that
    only the later maximum makes negligible. 0 * inf there made KL nan. Where p is not negligible,
    q = 0 makes KL inf, in the kernels and the CPU reference alike."""
    torch.manual_seed(0)
    for V in (100, 2 * logprob.CONFIGS[0].kwargs["BLOCK_V"] + 8):
        logits_p = torch.randn(4, V) - 200.0
        logits_p[:, 0] = 0.0
        logits_q = torch.randn(4, V).masked_fill(torch.rand(4, V) < 0.3, float("-inf"))
        logits_q[:, 0] = 0.0
        check(logprob.kl_div, kl64_q_finite, logits_p, logits_q)
        logits_p[:, V // 2], logits_q[:, V // 2] = -20.0, float("-inf")  # inside the row's blocks
        for op in (logprob.kl_div, logprob.kl_div_ref):
            assert (op(logits_p, logits_q) == float("inf")).all(), (op.__name__, V)


def test_the_cpu_references_on_masked_vocabulary():
    """kernels.entropy and kernels.kl_div on a CPU (or under RLHF_KERNELS=torch) count an entry
    where p = 0 as adding nothing (0 log 0 = 0), as the Triton kernels do: a logit of -inf (a
    masked token), with q -inf there too, and a q of -inf where p underflows. 0 * -inf made the
    value and every entry of the gradient nan."""
    torch.manual_seed(0)
    V = 300
    logits_p = torch.randn(4, V) * 3
    logits_p[0, :100] = float("-inf")
    logits_p[1, ::2] = float("-inf")
    logits_p[2, 1:] -= 200.0  # p underflows to 0 in float32 beyond entry 0
    logits_q = logits_p + torch.randn(4, V)
    logits_q[2, 1::3] = float("-inf")
    check(logprob.entropy_ref, entropy64, logits_p)
    check(logprob.kl_div_ref, kl64_q_finite, logits_p, logits_q)


def test_huge_logits():
    """|x| ~ 1e4: nothing overflows, and the log-sum-exp kept as (max, log-sum) stays accurate."""
    torch.manual_seed(0)
    V = 1000
    logits = torch.randn(8, V) * 1e4
    targets = logits.argsort(-1)[:, -2]  # the runner-up: log-prob far from 0, gradient not 0
    check(logprob.token_logprobs, logprobs64, logits, targets)
    check(logprob.entropy, entropy64, logits)
    # p is one-hot here, and at its 1 the gradient g (log p - log q - KL) = g (-log q - KL) is 0
    # as the difference of two numbers of KL's size (2e4-6e4): float32 keeps it to about an ulp of
    # KL, as the online sums round where they move a running maximum (in a row of several blocks,
    # or here of several groups). Elsewhere the usual tolerance.
    q = logits.roll(1, 0)
    g = torch.randn(8)
    ulps = 4 * 2.0**-23 * (g.abs() * kl64(logits.double(), q.double()))
    at_the_one = F.one_hot(logits.argmax(-1), V).bool()
    grad_atol = torch.where(at_the_one, ulps[:, None], TOL[torch.float32][1])
    check(logprob.kl_div, kl64, logits, q, grad_out=g, grad_atol=grad_atol)
    # the same distribution under different huge offsets: KL ~ 0, not the rounding of 1e4
    x = torch.randn(8, V) * 3
    check(logprob.token_logprobs, logprobs64, x + 1e4, targets)
    check(logprob.entropy, entropy64, x + 1e4)
    check(logprob.kl_div, kl64, x + 1e4, x - 2e4)


def test_strided_rows():
    """A row stride larger than V (a view), leading dims that need a copy (a slice), and strided
    targets."""
    torch.manual_seed(0)
    V = 1000
    wide = torch.randn(37, V + 24) * 3
    targets = random_targets((37, 2), V)[:, 1]
    check(logprob.token_logprobs, logprobs64, wide[:, :V], targets)
    check(logprob.kl_div, kl64, wide[:, :V], wide[:, 24:])
    logits = torch.randn(3, 8, V)[:, :-1]
    check(logprob.token_logprobs, logprobs64, logits, random_targets((3, 7), V))
    check(logprob.entropy, entropy64, logits)
    # a vocabulary that is not contiguous (a transpose: stride 5 from one entry to the next): copied
    transposed = (torch.randn(V, 5) * 3).t()
    assert transposed.stride() == (1, 5)
    check(logprob.token_logprobs, logprobs64, transposed, targets[:5], 0.7)
    check(logprob.entropy, entropy64, transposed)
    check(logprob.kl_div, kl64, transposed, wide[:5, :V])
    check(logprob.kl_div, kl64, wide[:5, :V], transposed)


def test_empty_batch_and_single_position():
    """N = 0 rows, and logits [V] with a 0-d target."""
    check(logprob.token_logprobs, logprobs64, torch.randn(0, 7, 100), torch.zeros(0, 7).long())
    check(logprob.kl_div, kl64, torch.randn(0, 100), torch.randn(0, 100))
    check(logprob.token_logprobs, logprobs64, torch.randn(100), torch.tensor(3))
    check(logprob.entropy, entropy64, torch.randn(100))


def test_upstream_gradient_from_sum():
    """Autograd hands .sum()'s gradient over as an expanded tensor with stride 0."""
    logits = torch.randn(6, 300)
    targets = random_targets((6,), 300, n_ignored=1)
    check(logprob.token_logprobs, logprobs64, logits, targets, grad_out=torch.ones(6))
    x = logits.clone().requires_grad_()
    logprob.token_logprobs(x, targets).sum().backward()
    x64 = logits.double().requires_grad_()
    logprobs64(x64, targets).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 1.3])
@pytest.mark.parametrize("V", [300, 256])
def test_fused_linear_logprobs(monkeypatch, dtype, temperature, V):
    """V = 300 is padded to 384 for the matmuls (the kernels must read only the first 300 columns
    of each [rows, 384] logits chunk); V = 256 is a multiple of PAD_V, used as it is."""
    torch.manual_seed(0)
    B, T, C = 2, 37, 24
    assert logprob.PAD_V == 128
    # chunks of 16 (float32) or 32 (float16) rows at V = 300: 5 or 3 chunks
    monkeypatch.setattr(logprob, "CHUNK_BYTES", 16 * 384 * 4)
    hidden = torch.randn(B, T, C).to(dtype).requires_grad_()
    weight = (torch.randn(V, C) * 0.5).to(dtype).requires_grad_()
    targets = random_targets((B, T), V)
    targets[0, :2] = torch.tensor([V - 1, 0])  # the last and first columns
    g = torch.randn(B, T)  # a different upstream gradient for every row
    out = logprob.fused_linear_logprobs(hidden, weight, targets, temperature)
    (out * g).sum().backward()
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    out64 = logprobs64(h64 @ w64.t(), targets, temperature)
    (out64 * g.double()).sum().backward()
    # fp16: the log-probs within 1e-3 of float64. The gradients come back in fp16 after fp16 matmuls,
    # within 3e-3: PyTorch's own fp16 path (matmul, then log_softmax in float32) is as far off here
    # (up to 1.9e-3 for both gradients, measured on these inputs).
    tol, grad_tol = (1e-5, 1e-5) if dtype == torch.float32 else (1e-3, 3e-3)
    assert out.dtype == torch.float32 and hidden.grad.dtype == dtype and weight.grad.dtype == dtype
    torch.testing.assert_close(out.double(), out64, rtol=tol, atol=tol)
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=grad_tol, atol=grad_tol)
    torch.testing.assert_close(weight.grad.double(), w64.grad, rtol=grad_tol, atol=grad_tol)
    assert (hidden.grad[targets == IGNORE_INDEX] == 0).all()


def test_fused_linear_frozen_weight(monkeypatch):
    """Only the gradients asked for are computed: here hidden's, with the lm_head frozen."""
    monkeypatch.setattr(logprob, "CHUNK_BYTES", 8 * 100 * 4)
    hidden = torch.randn(20, 16, requires_grad=True)
    weight = torch.randn(100, 16)
    targets = random_targets((20,), 100)
    logprob.fused_linear_logprobs(hidden, weight, targets).sum().backward()
    h64 = hidden.detach().double().requires_grad_()
    logprobs64(h64 @ weight.double().t(), targets).sum().backward()
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=1e-5, atol=1e-5)


def test_fused_linear_under_autocast_recomputes_the_forwards_logits():
    """Under autocast the forward's logits are bf16; the backward runs outside autocast, so the
    op casts hidden and weight itself: its backward must recompute those very bf16 logits, not
    float32 ones (whose softmax disagrees with the saved bf16 log-sum-exp by up to
    |logit| * 2^-9, percents at logits ~30). So it matches, value and gradients, the unfused
    path under the same autocast: the autocast matmul, then the log-prob kernel on its logits."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    weight = (torch.randn(40, 16) * 2).requires_grad_()  # logits up to ~30
    targets = random_targets((2, 9), 40)
    g = torch.randn(2, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = logprob.fused_linear_logprobs(hidden, weight, targets)
    (out * g).sum().backward()
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = h @ w.t()
        assert logits.dtype == torch.bfloat16
        want = logprob.token_logprobs(logits, targets)
    (want * g).sum().backward()
    assert out.dtype == torch.float32 and hidden.grad.dtype == weight.grad.dtype == torch.float32
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    for got, ref in ((hidden.grad, h.grad), (weight.grad, w.grad)):
        # the same bf16 products (equal on a CPU); a gradient from float32 logits is 6% off here
        assert (got - ref).abs().max() <= 2**-8 * ref.abs().max()


@pytest.mark.parametrize("op", ["token_logprobs", "fused_linear_logprobs", "kl_div", "entropy"])
def test_dispatch_switch(monkeypatch, op):
    """RLHF_KERNELS=triton runs the kernel, =torch the reference; auto on a CPU tensor: torch."""
    calls = []

    def spy(name):
        fn = getattr(logprob, name)

        def recorded(*args):
            calls.append(name)
            return fn(*args)
        return recorded

    for name in (op, op + "_ref"):
        monkeypatch.setattr(logprob, name, spy(name))
    logits, targets = torch.randn(4, 50), torch.randint(0, 50, (4,))
    args = {"token_logprobs": (logits, targets),
            "fused_linear_logprobs": (logits, torch.randn(30, 50), torch.randint(0, 30, (4,))),
            "kl_div": (logits, logits.flip(0)),
            "entropy": (logits,)}[op]
    results = {}
    for mode in ("triton", "torch", "auto"):
        monkeypatch.setenv("RLHF_KERNELS", mode)
        results[mode] = getattr(kernels, op)(*args)
    assert calls == [op, op + "_ref", op + "_ref"]
    torch.testing.assert_close(results["triton"], results["torch"], rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("RLHF_KERNELS", "cuda")
    with pytest.raises(ValueError):
        getattr(kernels, op)(*args)


@pytest.mark.parametrize("mode", ["triton", "torch"])
def test_dispatch_passes_the_temperature(monkeypatch, mode):
    """kernels.token_logprobs and kernels.fused_linear_logprobs hand the temperature on to either path."""
    monkeypatch.setenv("RLHF_KERNELS", mode)
    torch.manual_seed(0)
    logits, targets = torch.randn(4, 50) * 3, random_targets((4,), 50, n_ignored=1)
    hidden, weight = torch.randn(4, 16), torch.randn(50, 16)
    torch.testing.assert_close(kernels.token_logprobs(logits, targets, 0.7).double(),
                               logprobs64(logits.double(), targets, 0.7), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kernels.fused_linear_logprobs(hidden, weight, targets, 0.7).double(),
                               logprobs64(hidden.double() @ weight.double().t(), targets, 0.7), rtol=1e-5, atol=1e-5)


def test_the_short_rows_of_the_gpu_bench():
    """bench/bench_logprob.py checks every GPU config on short rows, the pipelined loops' only check
    (the interpreter ignores num_stages): for each pipelined block size, its rows must give the loop
    over the blocks inside a row 0, 1, 2 and 3 iterations (as _blocks counts them) at each of the 8
    offsets a row can start at from an aligned entry, and some must be shorter than any block.
    With 8 rows or more (it takes 64), an odd stride starts them at every offset."""
    from bench import bench_logprob
    rows = bench_logprob.short_rows()
    piped = {c.kwargs["BLOCK_V"] for c in logprob.GPU_CONFIGS if c.kwargs["STAGES"] > 1}
    for V, stride in rows:
        assert stride >= V and {r * stride % 8 for r in range(8)} == set(range(8)), (V, stride)
    for block in piped:
        for head in range(8):
            trips = {len(range(block, head + V - block + 1, block)) for V, _ in rows}
            assert {0, 1, 2, 3} <= trips, (block, head, trips)
    assert min(V for V, _ in rows) < min(c.kwargs["BLOCK_V"] for c in logprob.GPU_CONFIGS)


def test_sm90_code_of_a_block_inside_a_row():
    """Compiled ahead of time for an H100/H200 (no GPU needed: bench/bench_sass.py prints the whole
    table), at the smallest and the largest block the autotuner tries, at a pipelined config and at
    a capped one, every kernel's loop over the blocks inside a row has no branch but its own and
    reads and writes 16 bytes at a time, at V = 50257, whose rows start anywhere; it has no shuffle
    between threads (each thread sums its own groups), and no barrier unless pipelined, for bf16
    logits and (at the smallest block) float32 ones; a pipelined loop loads by asynchronous copies
    to shared memory (STAGES reaches the compiler), and a config's cap on registers holds (KL's
    forward takes more without it); and its exponentials are the flushing ex2.approx.ftz (one
    instruction each). A mask in that loop turns each access into 2-byte ones (64-75% of the copy
    bandwidth on an H200, where 16-byte ones gave 81-98%). The non-flushing ex2 cost the KL forward
    102 of its 590 instructions a pass, the masks computed on every pass about 54, and its five
    reductions across the block 104 of the 434 left (15 of them barriers)."""
    from bench import bench_sass
    if not bench_sass.HAVE_TOOLS:
        pytest.skip(f"needs the NVIDIA tools of Triton's wheel in {bench_sass.BIN}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    plain = [i for i, c in enumerate(logprob.GPU_CONFIGS) if c.kwargs["STAGES"] == 1 and not c.maxnreg]
    piped = [i for i, c in enumerate(logprob.GPU_CONFIGS) if c.kwargs["STAGES"] > 1]
    capped = [i for i, c in enumerate(logprob.GPU_CONFIGS) if c.maxnreg]
    picks = (plain[0], plain[-1], piped[0], capped[0])  # smallest and largest blocks, pipelined, capped
    code = ("import json; from bench import bench_sass; "
            f"print(json.dumps([bench_sass.checks({picks}), bench_sass.checks(({plain[0]},), 'fp32')]))")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    bf16, fp32 = json.loads(out.splitlines()[-1])  # float32 logits at the smallest block alone
    assert len(bf16["_kl_fwd_kernel"]) == 4
    for seen in (bf16, fp32):
        assert set(seen) == set(bench_sass.KERNELS)
        for name, by_config in seen.items():
            for config, c in by_config.items():
                loop, exp2, regs, cap = c["loop"], c["exp2"], c["regs"], c["cap"]
                assert [op for op in loop if op.startswith("BRA")] == ["BRA"], (name, config)  # the jump back
                accesses = [op for op in loop if op.split(".")[0] in bench_sass.ACCESSES]
                assert accesses and all(op.endswith(".128") for op in accesses), (name, config, accesses)
                assert not [op for op in loop if op.startswith("SHFL")], (name, config)
                if c["stages"] == 1:  # each thread on its own: no barrier
                    assert not [op for op in loop if op.startswith("BAR")], (name, config)
                else:  # loads run ahead as asynchronous copies to shared memory, read back 16 bytes at a time
                    assert not [op for op in loop if op.split(".")[0] == "LDG"], (name, config)
                    assert any(op.startswith("LDGSTS") for op in loop), (name, config)
                    assert any(op.startswith("LDS") for op in loop), (name, config)
                assert exp2 == ["ex2.approx.ftz.f32"], (name, config, exp2)
                assert c["ptx_cap"] == ([cap] if cap else []) and regs <= (cap or 255), (name, config, regs)


@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs a GPU and TRITON_INTERPRET=0")
def test_cuda_bf16_realistic():
    """bf16 at a GPT-2 shape on the GPU: the compiled kernels, not the interpreter."""
    torch.manual_seed(0)
    N, C, V = 2048, 768, 50257
    dev = "cuda"
    logits_p = (torch.randn(N, V, device=dev) * 4).bfloat16()
    logits_q = (logits_p.float() + torch.randn(N, V, device=dev)).bfloat16()
    targets = random_targets((N,), V, n_ignored=100).to(dev)
    g = torch.randn(N, device=dev)
    for op, ref, args in [(logprob.token_logprobs, logprobs64, (logits_p, targets, 0.8)),
                          (logprob.entropy, entropy64, (logits_p,)),
                          (logprob.kl_div, kl64, (logits_p, logits_q))]:
        check(op, ref, *args, grad_out=g, tol=(2e-2, 1e-3))
    hidden = (torch.randn(N, C, device=dev) * 0.5).bfloat16().requires_grad_()
    weight = (torch.randn(V, C, device=dev) * 0.05).bfloat16().requires_grad_()
    out = logprob.fused_linear_logprobs(hidden, weight, targets)
    (out * g).sum().backward()
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    out32 = logprobs64((h32 @ w32.t()).bfloat16().float(), targets)  # the bf16 logits, in fp32
    (out32 * g).sum().backward()
    torch.testing.assert_close(out, out32, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(hidden.grad.float(), h32.grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(weight.grad.float(), w32.grad, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_the_cpu_references_divide_by_the_temperature(temperature):
    """The PyTorch references are what every CPU run uses (PPO's log-probs at its temperature among
    them): checked on their own against float64, not only through the kernels' dispatch."""
    torch.manual_seed(0)
    logits, targets = torch.randn(5, 7, 300) * 3, random_targets((5, 7), 300)
    torch.testing.assert_close(logprob.token_logprobs_ref(logits, targets, temperature).double(),
                               logprobs64(logits.double(), targets, temperature), rtol=1e-5, atol=1e-5)
    hidden, weight = torch.randn(5, 7, 16), torch.randn(300, 16) * 0.5
    torch.testing.assert_close(logprob.fused_linear_logprobs_ref(hidden, weight, targets, temperature).double(),
                               logprobs64(hidden.double() @ weight.double().t(), targets, temperature), rtol=1e-5, atol=1e-5)
