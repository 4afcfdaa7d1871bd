"""
Log-probabilities, KL and entropy over the vocabulary: PyTorch references and Triton kernels.

Every RLHF stage needs, per position, one number from a softmax over the whole vocabulary: the
log-prob of the target token (SFT loss, PPO ratios, DPO), the KL between policy and reference, the
entropy. The references below are written for clarity and accumulate in float32 whatever the input
dtype (float64 stays float64); they materialise float32 [N, V] tensors, which is exactly the memory
the kernels remove.

The memory-traffic story, per vocabulary entry, for bf16 logits [N, V] (2 bytes an entry):
- token_logprobs_ref reads the logits, writes a float32 copy, a float32 copy divided by the
  temperature (unless it is 1) and the float32 log-softmax (kept for the backward: 4*N*V bytes,
  3.3 GB at N=16k, V=50257), each read back at least once: about 30 bytes an entry forward, as
  many backward.
- The kernel streams each row once in blocks of BLOCK_V, keeping a running maximum m and a running
  sum s of exp(x - m) (the online log-sum-exp): it reads 2 bytes an entry and writes three floats a
  row. It keeps two of those floats for the backward, which reads the logits once more, recomputes
  the softmax and writes the gradient in the logits' dtype: 4 bytes an entry. Both are memory-bound,
  so they are measured in GB/s against the card's copy bandwidth (bench/bench_logprob.py).
- kl_div and entropy do the same with more running sums (below), one read of each logits tensor
  forward; their backward reads them again and writes one gradient.
- Those bytes move at full speed only in 16-byte accesses, which need 16-byte aligned addresses:
  rows of V = 50257 bf16 entries start anywhere, so each program walks its row in blocks aligned
  to 8 entries, starting up to 7 entries before the row; only the blocks that cross the row's
  ends are masked (see "Alignment" below).
- fused_linear_logprobs never holds the [N, V] logits at all: it computes them chunk of rows by
  chunk of rows with a matmul, and runs the kernels on each chunk. Its matmuls see the vocabulary
  padded with zero rows of the weight to a multiple of 128 (50257 -> 50304, as nanoGPT does),
  because cuBLAS is several times slower on a leading dimension of 50257 entries; the kernels
  take the row stride and V apart, and read only the first V columns of each chunk.

Numerics: every kernel accumulates in float32. The log-sum-exp is kept as two float32 numbers, the
row maximum m and log s, not as their sum: with logits near 1e4, m + log s rounds to a multiple of
about 1e-3, while x - m is exact for the entries that matter, so p = exp((x - m) - log s) keeps
float32 accuracy however large the logits.

Left out on purpose: targets outside [0, V) other than IGNORE_INDEX are not checked (the kernel
reads outside the row, where the reference raises); ignored rows are computed like the others and
then zeroed (a batch that is mostly padding still pays for its padding); a logits tensor whose
leading dims cannot be flattened without a copy (logits[:, :-1] of a [B, T, V] tensor) is copied
once by reshape: slice the hidden states before the lm_head, or set the last target to
IGNORE_INDEX.
"""

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

IGNORE_INDEX = -100  # a target equal to this gives log-prob 0 and no gradient


def wide(x):
    """x in float32, or wider: the references keep a float64 input float64 (the tests' references)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def token_logprobs_ref(logits, targets, temperature=1.0):
    """log softmax(logits / temperature)[targets]: logits [..., V], targets [...] -> float32 [...]
    (float64 for float64 logits)."""
    V = logits.size(-1)
    x = wide(logits).reshape(-1, V)
    if temperature != 1.0:  # x / 1.0 is x again, at the cost of a copy of the logits (and its backward)
        x = x / temperature
    nll = F.cross_entropy(x, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    return -nll.view(targets.shape)


def fused_linear_logprobs_ref(hidden, weight, targets, temperature=1.0):
    """token_logprobs_ref of the logits hidden @ weight.T: hidden [..., C], weight [V, C]."""
    return token_logprobs_ref(hidden @ weight.t(), targets, temperature)


def kl_div_ref(logits_p, logits_q):
    """KL(p || q) = sum_v p_v (log p_v - log q_v) per position, [..., V] -> float32 [...] (float64 for
    float64 logits). q is a constant: no gradient flows into logits_q."""
    logp = F.log_softmax(wide(logits_p), dim=-1)
    logq = F.log_softmax(wide(logits_q.detach()), dim=-1)
    p = logp.exp()
    # 0 log(0 / q) = 0: an entry where p is 0 (a logit of -inf, a masked token, or one that
    # underflows) adds nothing, whatever q is there; masked before the product, so no 0 * inf = nan
    # in the value or the gradient
    return (p * (logp - logq).masked_fill(p == 0, 0.0)).sum(-1)


def entropy_ref(logits):
    """H(p) = -sum_v p_v log p_v per position, [..., V] -> float32 [...] (float64 for float64 logits)."""
    logp = F.log_softmax(wide(logits), dim=-1)
    p = logp.exp()
    return -(p * logp.masked_fill(p == 0, 0.0)).sum(-1)  # 0 log 0 = 0, as in kl_div_ref


# -----------------------------------------------------------------------------------------------
# Triton kernels. One program per row; it walks the row in blocks of BLOCK_V entries.
# The running maximum starts at the lowest float32 rather than -inf, so that m - m_new is never
# -inf - (-inf) = nan, even when a whole block is padding or masked with -inf.
# On a GPU each kernel is autotuned over a few block sizes and warp counts, with and without
# pipelining ("Loads that run ahead" below) and a cap on registers (GPU_CONFIGS), keyed on V
# (Triton adds the dtypes to the key).
# Anywhere else (TRITON_INTERPRET=1 on a CPU) one fixed config runs, with a large block: the
# interpreter's cost is per block step.
#
# Alignment. A GPU streams memory fastest in 16-byte loads and stores (8 bf16 entries), and Triton
# emits them only where it can prove that each thread's 16 bytes start at a multiple of 16 and that
# no mask cuts through them. A row of V = 50257 bf16 entries starts anywhere, and a mask `col < V`
# with V odd defeats that proof: every access was 2 bytes wide (64-75% of the copy bandwidth on an
# H200 at V = 50257, against 81-98% at V = 128256). So each program moves its pointers to its row's
# first entry rounded down to a multiple of ALIGN entries (16 bytes of bf16, 32 of float32), and
# walks blocks from there: the row is entries [head, head + V) of the blocks, head < ALIGN. All the
# [N, V] tensors of one call share their row stride, so one row offset serves them all.
#
# Two passes over the blocks. These kernels do so little per byte that the instructions they
# issue may bound them as much as the bytes do: compiled for an H100/H200, KL's forward issued
# about 38 an entry, near all an SM can issue at 85% of the copy bandwidth (bench/bench_sass.py
# counts them, and BENCHMARKS.md compares with what was measured). So every kernel walks its row
# twice, over disjoint blocks: first the blocks that lie wholly inside the row, read and written
# with no mask and no branch, then the (at most two) blocks across the row's ends, the first and
# the last. An end block that ends inside the row is read whole (the up to ALIGN - 1 entries
# before the row belong to the same tensor: the end of the previous row, or the gap of a strided
# view), and the entries outside the row are replaced by `other`; the last is read with a mask.
# Both are written with one, unless the row starts on the first block's first entry. The loop
# body is written once, in a tl.static_range over the two passes. The order of the blocks does
# not matter to the online log-sum-exp.
#
# Running sums per group. The forwards keep their online log-sum-exp (a running maximum and a
# sum relative to it) not for the row but for each group of 16 bytes of a block (GROUP = 8 entries
# of bf16 or fp16, 4 of float32): state i takes in entries [i GROUP, (i + 1) GROUP) of every block.
# One thread reads a group with one 16-byte access and folds it into its own state, with no word
# to the other threads; the states are merged once, at the end of the row (_merge). A reduction
# across the block costs shuffles, shared memory and a barrier, which holds every warp of the
# program until the slowest has its data: KL's forward did five such reductions a block, 104 of
# its 434 instructions a block (15 of them barriers; bench/bench_sass.py, Triton 3.6, bf16,
# 2048-entry blocks of 4 warps). The price is an exponential a group for each log-sum-exp (KL's
# forward has two: 2 per 8 entries of bf16) and the registers of the states.
#
# Loads that run ahead. Memory streams at full speed only with enough bytes in flight: its
# bandwidth times its latency, about 32 KB for each of an H200's 132 SMs (4.2 TB/s, a
# microsecond). A program that loads a block and then computes on it has nothing in flight while
# it computes, and KL's forward (95 registers a thread under Triton 3.6, the GPU image's: 5
# programs of 4 warps an SM) holds at most 40 KB of blocks an SM. With STAGES > 1, Triton's
# pipeliner (tl.range's num_stages) turns the loads of the loop over the blocks inside a row into
# asynchronous copies to shared memory, issued one or two blocks ahead of the one being summed.
# The price: 19-49 more instructions a block (bench/bench_sass.py), two of them barriers between
# the program's warps, which Triton puts around the buffers though each thread reads back only
# what it copied. The autotuner times configs with and without it; one whose buffers do not fit in
# shared memory (float64 KL at 8192 x 16) fails to compile, and the autotuner passes it over. The
# edges' loop, at most two blocks, is not pipelined.
#
# Exponentials are exp2(x * log2(e)): tl.exp2 is one MUFU.EX2 instruction (ex2.approx.ftz), where
# tl.exp compiles to ex2.approx.f32, which keeps results below 2^-126 at the cost of three more
# instructions. So an entry more than 87 nats below its row's maximum has p = 0 here (103 nats
# without the flush, as in PyTorch's float32): nothing a sum can see. Where q is -inf, KL(p || q)
# is inf wherever p is not 0, as it should be; at an entry whose p is that far below its row's
# maximum it may be either: finite if p is also that far below the largest entry of its group
# read so far (so in a group of such entries, in any order of the blocks), inf if not.

LOWEST = tl.constexpr(-3.4028234663852886e38)  # the lowest finite float32
ALIGN = tl.constexpr(8)  # blocks start at multiples of 8 entries: 16 bytes of bf16, 32 of float32
LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E)

# (BLOCK_V, warps, STAGES, registers a thread at most): six plain configs, three pipelined ones, and
# two that cap the registers at 64: KL's forward takes 95 at 2048 x 4 under Triton 3.6, which fits
# 5 programs of 4 warps an SM, where 64 (without spilling, in bf16) fit 8, with as many more bytes
# in flight (a cap above what a kernel takes changes little; float32 KL spills at 64, in its loop)
GPU_CONFIGS = [triton.Config({"BLOCK_V": block, "STAGES": stages}, num_warps=warps, maxnreg=regs)
               for block, warps, stages, regs in [
                   (2048, 4, 1, None), (4096, 4, 1, None), (4096, 8, 1, None), (8192, 8, 1, None),
                   (8192, 16, 1, None), (16384, 16, 1, None),
                   (2048, 4, 3, None), (4096, 8, 3, None), (8192, 16, 3, None),
                   (2048, 4, 1, 64), (2048, 4, 3, 64)]]
if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1":
    CONFIGS = GPU_CONFIGS
else:
    CONFIGS = [triton.Config({"BLOCK_V": 4096, "STAGES": 1}, num_warps=4)]
# The timings are kept on disk (cache_results), so each new process reuses the first one's tuning.


@triton.jit
def _row_start(ptr, lo):
    """Move ptr to entry lo of its flat tensor, rounded down to a multiple of ALIGN entries.
    Returns the new pointer and head = the offset of entry lo from it, 0 <= head < ALIGN."""
    first = tl.multiple_of(lo // ALIGN * ALIGN, ALIGN)
    return ptr + first, (lo - first).to(tl.int32)


@triton.jit
def _blocks(end, BLOCK_V: tl.constexpr, EDGES: tl.constexpr):
    """range(lo, hi, step) over the block starts of one pass: the blocks wholly inside the row,
    BLOCK_V <= start <= end - BLOCK_V (the first block starts before the row unless head = 0, and
    is left to the edges); or the edges: 0 and, if the row does not end on a block boundary, the
    last block, max(1, end // BLOCK_V) * BLOCK_V (twice that is at least end: the step stops).
    Every block inside the row starts at BLOCK_V or later, past the first ALIGN - 1 entries."""
    tl.static_assert(BLOCK_V >= ALIGN)
    if EDGES:
        return 0, end, tl.maximum(end // BLOCK_V, 1) * BLOCK_V
    else:
        return BLOCK_V, end - BLOCK_V + 1, BLOCK_V


@triton.jit
def _exp(x):
    return tl.exp2(x * LOG2E)


@triton.constexpr_function
def _group(dtype):
    """Entries of dtype in 16 bytes, one thread's access: 8 of bf16 or fp16, 4 of float32."""
    return 128 // dtype.primitive_bitwidth


@triton.jit
def _offsets(start, BLOCK_V: tl.constexpr, GROUP: tl.constexpr):
    """The offsets of block `start` as [BLOCK_V // GROUP, GROUP]: a group of GROUP entries a row,
    which one thread reads and writes with one 16-byte access and reduces on its own."""
    groups = tl.arange(0, BLOCK_V // GROUP)[:, None] * GROUP
    return tl.multiple_of(start, BLOCK_V) + (groups + tl.arange(0, GROUP)[None, :])


@triton.jit
def _merge(m, s):
    """The row's log-sum-exp from the groups' running ones (maxima m, sums s relative to them):
    M = max m and S = sum_i s_i exp(m_i - M); and each group's factor exp(m_i - M)."""
    M = tl.max(m, axis=0)
    alpha = _exp(m - M)
    return M, tl.sum(alpha * s, axis=0), alpha


@triton.jit
def _scaled(alpha, x):
    """alpha * x, and 0 where alpha = 0: a sum whose terms all became negligible is dropped, even
    if one of them was inf (KL's u at an entry where q is -inf and p underflows)."""
    return tl.where(alpha > 0, alpha * x, 0.0)


@triton.jit
def _load_block(ptr, start, head, end, other, BLOCK_V: tl.constexpr, GROUP: tl.constexpr,
                EDGES: tl.constexpr):
    """ptr[start : start + BLOCK_V] as float32 [BLOCK_V // GROUP, GROUP], with `other` outside the
    row ptr[head:end]."""
    offs = _offsets(start, BLOCK_V, GROUP)
    if not EDGES:
        x = tl.load(ptr + offs)  # 16 bytes at a time: no mask, aligned, inside the row
    else:
        if start + BLOCK_V <= end:
            x = tl.load(ptr + offs)  # the first block, when the row is longer than a block
        else:
            x = tl.load(ptr + offs, mask=offs < end, other=other)  # the last block
        if start < head:  # the first block begins before the row
            x = tl.where(offs >= head, x, other)
    return x.to(tl.float32)


@triton.jit
def _store_block(ptr, start, head, end, value, BLOCK_V: tl.constexpr, GROUP: tl.constexpr,
                 EDGES: tl.constexpr):
    """ptr[start : start + BLOCK_V] = value, in ptr's dtype, only inside the row ptr[head:end]."""
    offs = _offsets(start, BLOCK_V, GROUP)
    value = value.to(ptr.dtype.element_ty)
    if not EDGES:
        tl.store(ptr + offs, value)  # 16 bytes at a time
    else:
        if (start >= head) & (start + BLOCK_V <= end):
            tl.store(ptr + offs, value)  # the first block, when the row starts on it (head = 0)
        else:
            tl.store(ptr + offs, value, mask=(offs >= head) & (offs < end))


@triton.autotune(configs=CONFIGS, key=["V"], cache_results=True)
@triton.jit
def _logprob_fwd_kernel(
    logits_ptr,  # [N, *] logits, any float dtype; the V entries of a row contiguous
    stride,  # entries from one row of logits to the next (>= V)
    targets_ptr,  # [N] int: target token of each row, or IGNORE_INDEX
    logprob_ptr,  # [N] fp32 out: log softmax(logits / T)[target], 0 where ignored
    row_max_ptr,  # [N] fp32 out: m = max_v logits / T, for the backward
    log_sum_ptr,  # [N] fp32 out: log s, s = sum_v exp(logits / T - m); the LSE is m + log s
    V,  # vocabulary size, any positive int: the first V entries of each row are read
    inv_temperature,  # 1 / T
    IGNORE_INDEX: tl.constexpr,  # target value that marks a row to skip
    BLOCK_V: tl.constexpr,  # vocabulary entries per step
    STAGES: tl.constexpr,  # blocks in flight in the loop over the blocks inside a row (1: no pipelining)
):
    row = tl.program_id(0).to(tl.int64)
    logits_ptr, head = _row_start(logits_ptr, row * stride)
    end = head + V
    GROUP: tl.constexpr = _group(logits_ptr.dtype.element_ty)
    target = tl.load(targets_ptr + row)

    # online log-sum-exp per group: rescale a running sum whenever its running max grows
    m = tl.full([BLOCK_V // GROUP], LOWEST, tl.float32)
    s = tl.zeros([BLOCK_V // GROUP], tl.float32)
    for EDGES in tl.static_range(2):
        lo, hi, step = _blocks(end, BLOCK_V, EDGES)
        for start in tl.range(lo, hi, step, num_stages=1 if EDGES else STAGES):
            x = _load_block(logits_ptr, start, head, end, float("-inf"), BLOCK_V, GROUP, EDGES)
            x = x * inv_temperature
            m_new = tl.maximum(m, tl.max(x, axis=1))
            s = s * _exp(m - m_new) + tl.sum(_exp(x - m_new[:, None]), axis=1)
            m = m_new
    m, s, _ = _merge(m, s)
    log_s = tl.log(s)

    ignore = target == IGNORE_INDEX
    x_target = tl.load(logits_ptr + head + tl.where(ignore, 0, target)).to(tl.float32)
    tl.store(logprob_ptr + row, tl.where(ignore, 0.0, (x_target * inv_temperature - m) - log_s))
    tl.store(row_max_ptr + row, m)
    tl.store(log_sum_ptr + row, log_s)


# restore_value: fused_linear_logprobs writes the gradient over the logits it reads, so each
# config tried by the autotuner must start from the same logits
@triton.autotune(configs=CONFIGS, key=["V"], cache_results=True, restore_value=["grad_logits_ptr"])
@triton.jit
def _logprob_bwd_kernel(
    logits_ptr,  # [N, *] logits, as in the forward
    grad_logits_ptr,  # [N, *] out, dtype of the logits: d loss / d logits (may be logits_ptr)
    stride,  # entries from one row to the next, in logits and grad_logits alike
    targets_ptr,  # [N] int: target token of each row, or IGNORE_INDEX
    row_max_ptr,  # [N] fp32: m from the forward
    log_sum_ptr,  # [N] fp32: log s from the forward
    grad_out_ptr,  # [N] fp32: d loss / d logprob, the upstream gradient
    V,  # vocabulary size: the first V entries of each row are read and written
    inv_temperature,  # 1 / T
    IGNORE_INDEX: tl.constexpr,  # target value that marks a row to skip
    BLOCK_V: tl.constexpr,  # vocabulary entries per step
    STAGES: tl.constexpr,  # blocks in flight in the loop over the blocks inside a row (1: no pipelining)
):
    row = tl.program_id(0).to(tl.int64)
    logits_ptr, head = _row_start(logits_ptr, row * stride)
    grad_logits_ptr, _ = _row_start(grad_logits_ptr, row * stride)
    end = head + V
    GROUP: tl.constexpr = _group(logits_ptr.dtype.element_ty)
    target = tl.load(targets_ptr + row)
    m = tl.load(row_max_ptr + row)
    log_s = tl.load(log_sum_ptr + row)
    # d logprob / d logits = (onehot(target) - softmax(logits / T)) / T; an ignored row gets 0
    g = tl.where(target == IGNORE_INDEX, 0.0, tl.load(grad_out_ptr + row) * inv_temperature)
    target_offset = (head + target).to(tl.int32)  # never matched when ignored: head - 100 < 0

    for EDGES in tl.static_range(2):
        lo, hi, step = _blocks(end, BLOCK_V, EDGES)
        for start in tl.range(lo, hi, step, num_stages=1 if EDGES else STAGES):
            x = _load_block(logits_ptr, start, head, end, 0.0, BLOCK_V, GROUP, EDGES) * inv_temperature
            p = _exp((x - m) - log_s)
            onehot = tl.where(_offsets(start, BLOCK_V, GROUP) == target_offset, 1.0, 0.0)
            _store_block(grad_logits_ptr, start, head, end, (onehot - p) * g, BLOCK_V, GROUP, EDGES)


@triton.autotune(configs=CONFIGS, key=["V"], cache_results=True)
@triton.jit
def _entropy_fwd_kernel(
    logits_ptr,  # [N, *] logits, any float dtype; the V entries of a row contiguous
    stride,  # entries from one row of logits to the next (>= V)
    entropy_ptr,  # [N] fp32 out: H = -sum_v p_v log p_v
    row_max_ptr,  # [N] fp32 out: m = max_v logits, for the backward
    log_sum_ptr,  # [N] fp32 out: log s, s = sum_v exp(logits - m)
    V,  # vocabulary size
    BLOCK_V: tl.constexpr,  # vocabulary entries per step
    STAGES: tl.constexpr,  # blocks in flight in the loop over the blocks inside a row (1: no pipelining)
):
    row = tl.program_id(0).to(tl.int64)
    logits_ptr, head = _row_start(logits_ptr, row * stride)
    end = head + V
    GROUP: tl.constexpr = _group(logits_ptr.dtype.element_ty)

    # with log p = (x - m) - log s: H = log s - t / s, where t = sum_v exp(x - m) (x - m).
    # t is kept relative to the running max (each term is bounded), so large logits do not cancel.
    m = tl.full([BLOCK_V // GROUP], LOWEST, tl.float32)
    s = tl.zeros([BLOCK_V // GROUP], tl.float32)
    t = tl.zeros([BLOCK_V // GROUP], tl.float32)
    for EDGES in tl.static_range(2):
        lo, hi, step = _blocks(end, BLOCK_V, EDGES)
        for start in tl.range(lo, hi, step, num_stages=1 if EDGES else STAGES):
            x = _load_block(logits_ptr, start, head, end, float("-inf"), BLOCK_V, GROUP, EDGES)
            m_new = tl.maximum(m, tl.max(x, axis=1))
            alpha = _exp(m - m_new)
            e = _exp(x - m_new[:, None])
            # moving t from m to m_new adds (m - m_new) to every (x - m); 0 * -inf is skipped
            terms = tl.where(e > 0, e * (x - m_new[:, None]), 0.0)
            t = alpha * (t + (m - m_new) * s) + tl.sum(terms, axis=1)
            s = alpha * s + tl.sum(e, axis=1)
            m = m_new
    m_row, s_row, alpha = _merge(m, s)
    t = tl.sum(alpha * (t + (m - m_row) * s), axis=0)  # as a block's rescale above
    log_s = tl.log(s_row)

    tl.store(entropy_ptr + row, log_s - t / s_row)
    tl.store(row_max_ptr + row, m_row)
    tl.store(log_sum_ptr + row, log_s)


@triton.autotune(configs=CONFIGS, key=["V"], cache_results=True)
@triton.jit
def _entropy_bwd_kernel(
    logits_ptr,  # [N, *] logits, as in the forward
    grad_logits_ptr,  # [N, *] out, dtype of the logits: d loss / d logits
    stride,  # entries from one row to the next, in logits and grad_logits alike
    entropy_ptr,  # [N] fp32: H from the forward
    row_max_ptr,  # [N] fp32: m from the forward
    log_sum_ptr,  # [N] fp32: log s from the forward
    grad_out_ptr,  # [N] fp32: d loss / d H
    V,  # vocabulary size
    BLOCK_V: tl.constexpr,  # vocabulary entries per step
    STAGES: tl.constexpr,  # blocks in flight in the loop over the blocks inside a row (1: no pipelining)
):
    row = tl.program_id(0).to(tl.int64)
    logits_ptr, head = _row_start(logits_ptr, row * stride)
    grad_logits_ptr, _ = _row_start(grad_logits_ptr, row * stride)
    end = head + V
    GROUP: tl.constexpr = _group(logits_ptr.dtype.element_ty)
    H = tl.load(entropy_ptr + row)
    m = tl.load(row_max_ptr + row)
    log_s = tl.load(log_sum_ptr + row)
    g = tl.load(grad_out_ptr + row)

    # dH / dx_v = -p_v (log p_v + H)
    for EDGES in tl.static_range(2):
        lo, hi, step = _blocks(end, BLOCK_V, EDGES)
        for start in tl.range(lo, hi, step, num_stages=1 if EDGES else STAGES):
            x = _load_block(logits_ptr, start, head, end, 0.0, BLOCK_V, GROUP, EDGES)
            logp = (x - m) - log_s
            p = _exp(logp)
            grad = tl.where(p > 0, -p * (logp + H) * g, 0.0)
            _store_block(grad_logits_ptr, start, head, end, grad, BLOCK_V, GROUP, EDGES)


@triton.autotune(configs=CONFIGS, key=["V"], cache_results=True)
@triton.jit
def _kl_fwd_kernel(
    p_ptr,  # [N, *] logits of p (the policy), any float dtype; the V entries of a row contiguous
    q_ptr,  # [N, *] logits of q (the reference)
    stride,  # entries from one row to the next, in p and q alike (>= V)
    kl_ptr,  # [N] fp32 out: KL(p || q) = sum_v p_v (log p_v - log q_v)
    p_max_ptr,  # [N] fp32 out: m_p = max_v logits_p, for the backward
    p_log_sum_ptr,  # [N] fp32 out: log s_p, s_p = sum_v exp(logits_p - m_p)
    q_max_ptr,  # [N] fp32 out: m_q
    q_log_sum_ptr,  # [N] fp32 out: log s_q
    V,  # vocabulary size
    BLOCK_V: tl.constexpr,  # vocabulary entries per step
    STAGES: tl.constexpr,  # blocks in flight in the loop over the blocks inside a row (1: no pipelining)
):
    row = tl.program_id(0).to(tl.int64)
    p_ptr, head = _row_start(p_ptr, row * stride)
    q_ptr, _ = _row_start(q_ptr, row * stride)
    end = head + V
    GROUP: tl.constexpr = _group(p_ptr.dtype.element_ty)

    # both log-sum-exps online, and u = sum_v exp(xp - m_p) ((xp - m_p) - (xq - m_q)), so that
    # KL = u / s_p - log s_p + log s_q, every term relative to its running max
    m_p = tl.full([BLOCK_V // GROUP], LOWEST, tl.float32)
    s_p = tl.zeros([BLOCK_V // GROUP], tl.float32)
    m_q = tl.full([BLOCK_V // GROUP], LOWEST, tl.float32)
    s_q = tl.zeros([BLOCK_V // GROUP], tl.float32)
    u = tl.zeros([BLOCK_V // GROUP], tl.float32)
    for EDGES in tl.static_range(2):
        lo, hi, step = _blocks(end, BLOCK_V, EDGES)
        for start in tl.range(lo, hi, step, num_stages=1 if EDGES else STAGES):
            xp = _load_block(p_ptr, start, head, end, float("-inf"), BLOCK_V, GROUP, EDGES)
            xq = _load_block(q_ptr, start, head, end, float("-inf"), BLOCK_V, GROUP, EDGES)
            m_p_new = tl.maximum(m_p, tl.max(xp, axis=1))
            m_q_new = tl.maximum(m_q, tl.max(xq, axis=1))
            alpha_p = _exp(m_p - m_p_new)
            e_p = _exp(xp - m_p_new[:, None])
            d = (xp - m_p_new[:, None]) - (xq - m_q_new[:, None])
            shift = (m_p - m_p_new) - (m_q - m_q_new)
            u = _scaled(alpha_p, u + shift * s_p) + tl.sum(tl.where(e_p > 0, e_p * d, 0.0), axis=1)
            s_p = alpha_p * s_p + tl.sum(e_p, axis=1)
            s_q = s_q * _exp(m_q - m_q_new) + tl.sum(_exp(xq - m_q_new[:, None]), axis=1)
            m_p = m_p_new
            m_q = m_q_new
    m_p_row, s_p_row, alpha_p = _merge(m_p, s_p)
    m_q_row, s_q_row, _ = _merge(m_q, s_q)
    shift = (m_p - m_p_row) - (m_q - m_q_row)
    u = tl.sum(_scaled(alpha_p, u + shift * s_p), axis=0)
    log_s_p = tl.log(s_p_row)
    log_s_q = tl.log(s_q_row)

    tl.store(kl_ptr + row, u / s_p_row - log_s_p + log_s_q)
    tl.store(p_max_ptr + row, m_p_row)
    tl.store(p_log_sum_ptr + row, log_s_p)
    tl.store(q_max_ptr + row, m_q_row)
    tl.store(q_log_sum_ptr + row, log_s_q)


@triton.autotune(configs=CONFIGS, key=["V"], cache_results=True)
@triton.jit
def _kl_bwd_kernel(
    p_ptr,  # [N, *] logits of p, as in the forward
    q_ptr,  # [N, *] logits of q
    grad_p_ptr,  # [N, *] out, dtype of logits_p: d loss / d logits_p
    stride,  # entries from one row to the next, in p, q and grad_p alike
    kl_ptr,  # [N] fp32: KL from the forward
    p_max_ptr,  # [N] fp32: m_p from the forward
    p_log_sum_ptr,  # [N] fp32: log s_p
    q_max_ptr,  # [N] fp32: m_q
    q_log_sum_ptr,  # [N] fp32: log s_q
    grad_out_ptr,  # [N] fp32: d loss / d KL
    V,  # vocabulary size
    BLOCK_V: tl.constexpr,  # vocabulary entries per step
    STAGES: tl.constexpr,  # blocks in flight in the loop over the blocks inside a row (1: no pipelining)
):
    row = tl.program_id(0).to(tl.int64)
    p_ptr, head = _row_start(p_ptr, row * stride)
    q_ptr, _ = _row_start(q_ptr, row * stride)
    grad_p_ptr, _ = _row_start(grad_p_ptr, row * stride)
    end = head + V
    GROUP: tl.constexpr = _group(p_ptr.dtype.element_ty)
    kl = tl.load(kl_ptr + row)
    m_p = tl.load(p_max_ptr + row)
    log_s_p = tl.load(p_log_sum_ptr + row)
    m_q = tl.load(q_max_ptr + row)
    log_s_q = tl.load(q_log_sum_ptr + row)
    g = tl.load(grad_out_ptr + row)

    # dKL / dxp_v = p_v (log p_v - log q_v - KL)
    for EDGES in tl.static_range(2):
        lo, hi, step = _blocks(end, BLOCK_V, EDGES)
        for start in tl.range(lo, hi, step, num_stages=1 if EDGES else STAGES):
            xp = _load_block(p_ptr, start, head, end, 0.0, BLOCK_V, GROUP, EDGES)
            xq = _load_block(q_ptr, start, head, end, 0.0, BLOCK_V, GROUP, EDGES)
            logp = (xp - m_p) - log_s_p
            logq = (xq - m_q) - log_s_q
            p = _exp(logp)
            grad = tl.where(p > 0, p * (logp - logq - kl) * g, 0.0)
            _store_block(grad_p_ptr, start, head, end, grad, BLOCK_V, GROUP, EDGES)


# -----------------------------------------------------------------------------------------------
# Launchers: flatten [..., V] to [N, V] rows, allocate the outputs, one program per row.

def _rows(x):
    """x [..., V] as an [N, V] matrix with contiguous rows: a view when the leading dims allow it,
    else a copy (one extra read and write of x)."""
    x = x.reshape(-1, x.size(-1))
    return x if x.stride(-1) == 1 else x.contiguous()


def _empty_like_rows(x):
    """A fresh tensor with x's shape, dtype and row stride: the kernels address all the [N, V]
    tensors of a call with one row stride."""
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)


def _row_floats(x, count):
    """count fresh float32 [N] tensors, one number per row of x."""
    return [torch.empty(x.size(0), dtype=torch.float32, device=x.device) for _ in range(count)]


def _logprob_fwd(x, targets, temperature, logprob, row_max, log_sum, V=None):
    """x [N, >= V] (the first V columns are the logits, V = all by default), targets [N]; write
    logprob, row_max and log_sum, each float32 [N]."""
    _logprob_fwd_kernel[(x.size(0),)](
        x, x.stride(0), targets, logprob, row_max, log_sum, V or x.size(1), 1.0 / temperature,
        IGNORE_INDEX=IGNORE_INDEX)


def _logprob_bwd(x, targets, row_max, log_sum, grad_out, temperature, grad, V=None):
    """Write d loss / d x[:, :V] into grad[:, :V]; grad has x's row stride and may be x itself."""
    assert grad.stride() == x.stride()
    _logprob_bwd_kernel[(x.size(0),)](
        x, grad, x.stride(0), targets, row_max, log_sum, grad_out, V or x.size(1),
        1.0 / temperature, IGNORE_INDEX=IGNORE_INDEX)


def _upstream(grad_out):
    """The upstream gradient [...] as a contiguous float32 [N] (autograd may hand over an
    expanded tensor with stride 0)."""
    return grad_out.reshape(-1).float().contiguous()


# -----------------------------------------------------------------------------------------------
# Autograd functions

class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature):
        x, t = _rows(logits), targets.reshape(-1).contiguous()
        logprob, row_max, log_sum = _row_floats(x, 3)
        _logprob_fwd(x, t, temperature, logprob, row_max, log_sum)
        ctx.save_for_backward(x, t, row_max, log_sum)
        ctx.temperature = temperature
        return logprob.view(targets.shape)

    @staticmethod
    def backward(ctx, grad_out):
        x, t, row_max, log_sum = ctx.saved_tensors
        grad = _empty_like_rows(x)
        _logprob_bwd(x, t, row_max, log_sum, _upstream(grad_out), ctx.temperature, grad)
        return grad.view(*grad_out.shape, x.size(1)), None, None


class _Entropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits):
        x = _rows(logits)
        H, row_max, log_sum = _row_floats(x, 3)
        _entropy_fwd_kernel[(x.size(0),)](x, x.stride(0), H, row_max, log_sum, x.size(1))
        ctx.save_for_backward(x, H, row_max, log_sum)
        return H.view(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out):
        x, H, row_max, log_sum = ctx.saved_tensors
        grad = _empty_like_rows(x)
        _entropy_bwd_kernel[(x.size(0),)](
            x, grad, x.stride(0), H, row_max, log_sum, _upstream(grad_out),
            x.size(1))
        return grad.view(*grad_out.shape, x.size(1))


class _KLDiv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_p, logits_q):
        p, q = _rows(logits_p), _rows(logits_q)
        if p.stride(0) != q.stride(0):  # the kernels take one row stride for both
            p, q = p.contiguous(), q.contiguous()
        kl, p_max, p_log_sum, q_max, q_log_sum = _row_floats(p, 5)
        _kl_fwd_kernel[(p.size(0),)](
            p, q, p.stride(0), kl, p_max, p_log_sum, q_max, q_log_sum, p.size(1))
        ctx.save_for_backward(p, q, kl, p_max, p_log_sum, q_max, q_log_sum)
        return kl.view(logits_p.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out):
        p, q, kl, p_max, p_log_sum, q_max, q_log_sum = ctx.saved_tensors
        grad = _empty_like_rows(p)
        _kl_bwd_kernel[(p.size(0),)](
            p, q, grad, p.stride(0), kl, p_max, p_log_sum, q_max,
            q_log_sum, _upstream(grad_out), p.size(1))
        return grad.view(*grad_out.shape, p.size(1)), None


# fused_linear_logprobs computes the logits of CHUNK_BYTES worth of rows at a time
CHUNK_BYTES = 256 * 2**20
# and pads the vocabulary of its matmuls to a multiple of this (V = 50257 -> 50304)
PAD_V = 128


def _mm_float32_sum(a, b):
    """a @ b, summed in float32 (on a GPU, returned in float32 when a and b are bf16 or fp16).
    grad_hidden = grad_logits @ weight sums over the whole vocabulary for few rows and C columns,
    a shape for which cuBLAS may split the sum into pieces and, as PyTorch allows by default
    (torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction), add the pieces in bf16.
    On an H200 the fused path's grad_hidden came out 0.19 away from PyTorch's on the same bf16
    inputs (N = 4096, C = 768, V = 50257, chunks of 2670 and 1426 rows); a CPU emulation of both
    gives errors of at most 0.06 when each sum is kept in float32 and the result rounded to bf16
    once, 0.18 to 0.26 when 8 to 16 pieces are added in bf16. A float32 result keeps the sum in
    float32; CPU matmuls sum in float32 anyway."""
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16):
        return torch.mm(a, b, out_dtype=torch.float32)
    return a @ b


class _FusedLinearLogprobs(torch.autograd.Function):
    """Forward: per chunk of rows, logits = hidden @ weight.T (cuBLAS), then the log-prob kernel;
    only the per-row m and log s are kept. Backward: per chunk, the same matmul again, the backward
    kernel overwrites those logits with their gradient (scaled row by row by grad_out, so any
    upstream gradient is exact), then grad_hidden = grad_logits @ weight and
    grad_weight += grad_logits.T @ hidden.

    Padding: cuBLAS is fast only when the leading dimension of every operand is a multiple of 16
    bytes; with V = 50257 the [chunk, V] logits are not, and the matmuls ran at 80-90 TFLOP/s on an
    H200 against 400-600 at V = 128256 (why nanoGPT pads its vocabulary to 50304). So the matmuls
    see the weight padded with zero rows to V_pad, a multiple of PAD_V: one copy of the weight per
    call, [V_pad, C], a read and a write of V C entries against the 8 N V C FLOPs of the matmuls
    (and none when V is a multiple of PAD_V already). The logits chunks are [chunk, V_pad]; the
    kernels read and write only their first V columns, so the padded columns (h . 0 = 0) never
    enter the log-sum-exp and stay 0 in the gradient; with the weight's zero rows, grad_hidden
    = grad_logits @ weight_pad is exact either way. grad_weight is computed for the V_pad rows and
    sliced to V.

    Memory: one [chunk, V_pad] logits buffer in the compute dtype, the padded weight and
    grad_weight [V_pad, C]; nothing of size N * V. Cost: 8 N V C FLOPs against the naive 6 (the
    backward recomputes the logits). Computing the gradient during the forward instead (Liger's
    trick) saves that matmul, but is exact only when every row's upstream gradient is the same
    number, as for a mean loss; PPO and DPO weight each token differently, and a forward under
    no_grad would pay for a gradient no one uses. grad_weight accumulates in weight's dtype: each
    chunk's product is summed in float32 by cuBLAS and rounded once when added (exact for float32
    weights, one bf16 rounding per chunk otherwise)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature):
        h, t = hidden.reshape(-1, hidden.size(-1)), targets.reshape(-1).contiguous()
        N, V = h.size(0), weight.size(0)
        w = weight if V % PAD_V == 0 else F.pad(weight, (0, 0, 0, -V % PAD_V))  # [V_pad, C]
        chunk = max(1, CHUNK_BYTES // (w.size(0) * h.element_size()))
        logprob, row_max, log_sum = _row_floats(h, 3)
        for start in range(0, N, chunk):
            rows = slice(start, start + chunk)
            logits = h[rows] @ w.t()  # [chunk, V_pad]: the only vocabulary-sized tensor
            _logprob_fwd(logits, t[rows], temperature, logprob[rows], row_max[rows], log_sum[rows],
                         V=V)
        ctx.save_for_backward(h, w, t, row_max, log_sum)
        ctx.temperature, ctx.chunk, ctx.V = temperature, chunk, V
        return logprob.view(targets.shape)

    @staticmethod
    def backward(ctx, grad_out):
        h, w, t, row_max, log_sum = ctx.saved_tensors
        g = _upstream(grad_out)
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty(h.shape, dtype=h.dtype, device=h.device) if need_hidden else None
        grad_weight = torch.zeros_like(w) if need_weight else None
        for start in range(0, h.size(0), ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            logits = h[rows] @ w.t()
            _logprob_bwd(logits, t[rows], row_max[rows], log_sum[rows], g[rows], ctx.temperature,
                         grad=logits, V=ctx.V)
            if grad_hidden is not None:
                grad_hidden[rows] = _mm_float32_sum(logits, w)
            if grad_weight is not None:
                grad_weight.addmm_(logits.t(), h[rows])
        if grad_hidden is not None:
            grad_hidden = grad_hidden.view(*grad_out.shape, h.size(1))
        if grad_weight is not None:
            grad_weight = grad_weight[:ctx.V]
        return grad_hidden, grad_weight, None, None


# -----------------------------------------------------------------------------------------------
# Public functions: the references' signatures and semantics

def token_logprobs(logits, targets, temperature=1.0):
    """log softmax(logits / temperature) at targets: logits [..., V], targets [...] -> float32
    [...]. Targets equal to IGNORE_INDEX give 0 and no gradient."""
    assert logits.shape[:-1] == targets.shape, f"{tuple(logits.shape)} vs {tuple(targets.shape)}"
    return _TokenLogprobs.apply(logits, targets, temperature)


def fused_linear_logprobs(hidden, weight, targets, temperature=1.0):
    """token_logprobs(hidden @ weight.T, targets, temperature) without the [N, V] logits:
    hidden [..., C], weight [V, C] (the lm_head), targets [...] -> float32 [...]."""
    assert hidden.shape[:-1] == targets.shape, f"{tuple(hidden.shape)} vs {tuple(targets.shape)}"
    if torch.is_autocast_enabled(hidden.device.type):
        # the cast autocast gives the reference's matmul, made here so that the backward (which
        # runs outside autocast) recomputes the very logits of the forward
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    return _FusedLinearLogprobs.apply(hidden, weight, targets, temperature)


def kl_div(logits_p, logits_q):
    """Full-vocabulary KL(softmax(logits_p) || softmax(logits_q)) per position: [..., V] -> float32
    [...]. Differentiable with respect to logits_p only; logits_q is treated as a constant."""
    assert logits_p.shape == logits_q.shape, f"{tuple(logits_p.shape)} vs {tuple(logits_q.shape)}"
    return _KLDiv.apply(logits_p, logits_q)


def entropy(logits):
    """Entropy of softmax(logits) per position: [..., V] -> float32 [...]."""
    return _Entropy.apply(logits)
