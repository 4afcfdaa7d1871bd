"""
Causal attention for the GPT: the PyTorch reference, and the Triton flash-attention kernels, forward
and backward, that replace it on a GPU.

    from kernels.attention import attention
    out = attention(q, k, v, causal=True)   # q [B, H, Tq, D], k, v [B, H, Tk, D] -> [B, H, Tq, D]

    python -m pytest tests/test_attention.py        # the kernels on CPU, under TRITON_INTERPRET=1
    python -m pytest bench/bench_attention.py -s    # on a GPU: correctness, then ms and TFLOP/s vs SDPA

Plain attention writes the B*H*Tq*Tk scores to memory, reads them back for the softmax, reads the
probabilities again for the product with V and keeps them for the backward: its memory traffic and
storage grow as T^2, while all its FLOPs sit in two matmuls. The kernels follow FlashAttention-2
(Tri Dao, 2023, https://arxiv.org/abs/2307.08691) and never write the scores: the forward walks the
keys block by block with an online softmax (a running max and sum per query, the output kept
unnormalised in float32 until the end) and saves one log-sum-exp per query; the backward recomputes
the probabilities of each tile from that log-sum-exp.

Masking rules, shared by the reference and the kernels:
- causal with Tq <= Tk is aligned to the end: query i sees keys j <= Tk - Tq + i (decoding with a
  KV cache appends Tq new queries after Tk - Tq cached keys);
- kv_start[b] hides the first kv_start[b] keys of row b (a left-padded batch);
- a query that sees no key at all gets zeros (and passes no gradient), never NaN.

The kernels, in the order below:
- _attn_fwd: a program per (block of BLOCK_M queries, batch * head); the last query blocks, which
  have the most keys to walk under a causal mask, start first.
- _attn_bwd_preprocess: delta = rowsum(dO * O) per query, the row term of the softmax gradient.
- _attn_bwd_dkdv: a program per block of BLOCK_N keys; it walks the query blocks that see them and
  accumulates dV = P^T dO and dK = dS^T Q.
- _attn_bwd_dq: a program per block of BLOCK_M queries; it walks their keys like the forward and
  accumulates dQ = dS K.
Splitting dK/dV from dQ recomputes S and dP twice (7 matmuls where FlashAttention-2 does 5 by
adding into dQ with atomics) and buys a backward without atomics, deterministic, with no float32 dQ
buffer. Every walk is split in three ranges: the blocks that a mask cuts partly (the kv_start edge,
the causal diagonal, the ragged end of the sequence) pay for the mask, the blocks between them run
without one, and the blocks that no query of the program sees are never visited.

Scores are kept in base 2: qk_scale = sm_scale * log2(e) folds the change of base into the scale, so
the softmax uses exp2, and the saved log-sum-exp is a log2-sum-exp2.

Left out on purpose: dropout, attention bias (ALiBi), grouped-query attention (k and v with fewer
heads than q), sliding windows, packed variable-length batches (cu_seqlens), FP8, a split-K kernel
for decoding, and what FlashAttention-3 adds on Hopper (TMA, warp specialisation, ping-pong
scheduling). Head dims that are not a power of two (80, 96) run padded to the next one, so they pay
for the padding.
"""

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


def visible_keys(Tq, Tk, causal, kv_start, device):
    """Boolean mask [B or 1, 1, Tq, Tk]: True where a query may attend to a key."""
    kj = torch.arange(Tk, device=device)
    mask = torch.ones(1, 1, Tq, Tk, dtype=torch.bool, device=device)
    if causal:
        qi = torch.arange(Tq, device=device) + (Tk - Tq)
        mask = mask & (kj[None, :] <= qi[:, None])
    if kv_start is not None:
        mask = mask & (kj >= kv_start.to(device).view(-1, 1, 1, 1))
    return mask


def attention_ref(q, k, v, causal=True, sm_scale=None, kv_start=None):
    """Reference attention. q [B, H, Tq, D], k, v [B, H, Tk, D] -> [B, H, Tq, D] in q's dtype.

    It materialises nothing itself: it hands the mask to PyTorch's scaled_dot_product_attention, which
    picks its own fused backend."""
    Tq, Tk = q.size(-2), k.size(-2)
    assert Tq <= Tk or not causal, f"causal attention needs Tq <= Tk, got Tq={Tq}, Tk={Tk}"
    sm_scale = 1.0 / math.sqrt(q.size(-1)) if sm_scale is None else sm_scale
    if kv_start is None and (Tq == Tk or Tq == 1 or not causal):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal and Tq > 1, scale=sm_scale)
    if Tq == 1:  # one decoding step: the mask below in fewer ops (the causal mask hides nothing)
        start = kv_start.to(q.device).view(-1, 1, 1, 1)
        empty = start >= Tk  # [B, 1, 1, 1]: a row of padding alone sees no key
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=(torch.arange(Tk, device=q.device) >= start) | empty,
                                             scale=sm_scale)
        return out.masked_fill(empty, 0.0)
    mask = visible_keys(Tq, Tk, causal, kv_start, q.device)
    sees_nothing = ~mask.any(-1, keepdim=True)  # [B, 1, Tq, 1]
    # let empty rows attend everywhere (no NaN in any backend), then zero their output
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | sees_nothing, scale=sm_scale)
    return out.masked_fill(sees_nothing, 0.0)


# ----------------------------------------------------------------------------------------------------
# Triton kernels

LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2E)
# How tl.dot multiplies float32 inputs: three TF32 tensor-core products, about as accurate as float32
# (plain TF32 is not; "ieee" falls back to slow FMA loops). fp16 and bf16 inputs ignore it.
F32_DOT = tl.constexpr("tf32x3")

# On a GPU each kernel autotunes over a few tile shapes (BLOCK_M queries x BLOCK_N keys, warps, software
# pipeline stages). The interpreter (TRITON_INTERPRET=1, how the CPU tests run) cannot autotune: it runs
# one small config, whose unequal blocks make the tests cross every kind of partial block.
_ON_GPU = torch.cuda.is_available() and not triton.knobs.runtime.interpret


def _configs(gpu, interpreter):
    """triton.Configs from (BLOCK_M, BLOCK_N, num_warps, num_stages) tuples."""
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m, n, w, s in (gpu if _ON_GPU else interpreter)
    ]


# The autotune key: head dim, mask, and the lengths rounded up to a power of two (the key passes the
# rounded lengths so that decoding, one key longer at each step, does not retune at every step).
# cache_results keeps the timings in Triton's cache directory: every stage is a new process, and only
# the first one on a machine pays for tuning (about 20 s of an H200's first training step).
_TUNE_KEY = ["Tq_bucket", "Tk_bucket", "HEAD_DIM", "CAUSAL"]


def _untuned_when_short(configs, named_args, **kwargs):
    """Autotuning prune: up to 64 queries (decoding, short prompts) the work is too small to be worth
    tuning, so it runs the last config of the list, the smallest."""
    return configs[-1:] if named_args["Tq"] <= 64 else configs


@triton.jit
def _batch_and_head(H, KV_START):
    """The (batch * head) row of this program (grid axis 1), its batch and head (int64, to multiply the
    strides without overflow), and the first key its batch row may see (0 without KV_START)."""
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    kv_lo = 0
    if KV_START is not None:
        kv_lo = tl.load(KV_START + off_b)
    return off_bh, off_b, off_h, kv_lo


@triton.jit
def _tile_mask(rows, n_rows, cols, n_cols: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """In-bounds mask of a [len(rows), len(cols)] tile: rows < n_rows (if CHECK_ROWS) and cols < n_cols.
    Where neither check applies it is a constant True, which the compiler drops from the load."""
    if CHECK_ROWS:
        mask = rows[:, None] < n_rows
    else:
        mask = tl.full([rows.shape[0], 1], 1, tl.int1)
    if cols.shape[0] != n_cols:  # the head dim is padded up to a power of two
        mask = mask & (cols[None, :] < n_cols)
    return mask


@triton.jit
def _visible(q_idx, k_idx, Tq, Tk, kv_lo, CAUSAL: tl.constexpr):
    """True where query q_idx may attend to key k_idx (the rules of visible_keys). The indices broadcast
    together: [M, 1] queries and [1, N] keys give a [M, N] tile, [1, M] and [N, 1] its transpose."""
    visible = (q_idx < Tq) & (k_idx < Tk) & (k_idx >= kv_lo)
    if CAUSAL:
        visible = visible & (k_idx <= q_idx + (Tk - Tq))
    return visible


@triton.jit
def _key_ranges(start_m, Tq, Tk, kv_lo, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """The key blocks that the queries [start_m, start_m + BLOCK_M) see, as three ranges of block starts:
    [lo, mid_lo) cut by kv_start, [mid_lo, mid_hi) seen whole by every query, [mid_hi, hi) cut by the
    causal diagonal or by the end of the keys. The caller clips the first and last to stay disjoint."""
    lo = kv_lo // BLOCK_N * BLOCK_N  # the block holding the first visible key
    mid_lo = tl.cdiv(kv_lo, BLOCK_N) * BLOCK_N
    if CAUSAL:  # query i sees keys j <= i + Tk - Tq: the last query sets the end, the first the whole blocks
        hi = tl.minimum(start_m + BLOCK_M + Tk - Tq, Tk)
        mid_hi = tl.minimum(start_m + 1 + Tk - Tq, Tk) // BLOCK_N * BLOCK_N
    else:
        hi = Tk
        mid_hi = Tk // BLOCK_N * BLOCK_N
    return lo, mid_lo, mid_hi, hi


@triton.jit
def _query_ranges(start_n, Tq, Tk, kv_lo, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """The query blocks that see the keys [start_n, start_n + BLOCK_N), as three ranges of block starts:
    [lo, mid_lo) cut by the causal diagonal, [mid_lo, mid_hi) that see every key of the block, [mid_hi,
    hi) cut by the end of the queries. A key block cut by kv_start is partly hidden from every query: then
    [lo, hi) is all masked. A key block that kv_start hides whole is seen by no query: then lo = hi.
    (Keys past Tk need no mask here: they only make rows of dK and dV that are never stored.)"""
    hi = Tq
    if CAUSAL:  # key j is seen by queries i >= j - (Tk - Tq)
        lo = tl.maximum(start_n - (Tk - Tq), 0) // BLOCK_M * BLOCK_M
        mid_lo = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - (Tk - Tq), 0), BLOCK_M) * BLOCK_M
    else:
        lo = 0
        mid_lo = 0
    mid_hi = Tq // BLOCK_M * BLOCK_M
    mid_lo = tl.where(start_n < kv_lo, hi, mid_lo)
    lo = tl.where(start_n + BLOCK_N <= kv_lo, hi, lo)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def _attn_fwd_inner(
    acc, m_i, l_i,  # [BLOCK_M, BLOCK_D], [BLOCK_M], [BLOCK_M] float32: the online softmax so far
    q,  # [BLOCK_M, BLOCK_D]: the program's queries
    k_ptrs, v_ptrs,  # [BLOCK_N, BLOCK_D] pointers to the keys and values [0, BLOCK_N) of this (batch, head)
    stride_kt, stride_vt,  # time strides of K and V
    offs_m, offs_n, offs_d,  # the program's query indices; arange(BLOCK_N); arange(BLOCK_D)
    lo, hi,  # walk the key blocks that start in [lo, hi)
    qk_scale, Tq, Tk, kv_lo,  # sm_scale * log2(e); lengths; this row's first visible key
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    MASKED: tl.constexpr,  # the blocks are partly visible: apply the mask (else every key is visible)
):
    for start_n in range(lo, hi, BLOCK_N):
        offs_k = start_n + offs_n
        kv_mask = _tile_mask(offs_k, Tk, offs_d, HEAD_DIM, MASKED)
        k = tl.load(k_ptrs + start_n * stride_kt, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=F32_DOT) * qk_scale  # [BLOCK_M, BLOCK_N], base 2
        if MASKED:
            s = tl.where(_visible(offs_m[:, None], offs_k[None, :], Tq, Tk, kv_lo, CAUSAL), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = m_new
        if MASKED:  # a row that has seen no key yet has m_new = -inf: subtract 0, so exp2 gives 0, not NaN
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)  # rescales what was summed under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs + start_n * stride_vt, mask=kv_mask, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=F32_DOT)
        m_i = m_new
    return acc, m_i, l_i


@triton.autotune(
    configs=_configs(
        gpu=[(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)],
        interpreter=[(32, 16, 4, 1)],
    ),
    key=_TUNE_KEY,
    cache_results=True,
    prune_configs_by={"early_config_prune": _untuned_when_short},
)
@triton.jit
def _attn_fwd(
    Q, K, V,  # [B, H, Tq, D], [B, H, Tk, D], [B, H, Tk, D]: the inputs, head dim contiguous
    O,  # [B, H, Tq, D]: the output, written here
    LSE,  # [B, H, Tq] float32, contiguous: each query's log2-sum-exp2 of its scores, written here
    KV_START,  # [B] int32, or None: row b hides its first KV_START[b] keys
    qk_scale,  # sm_scale * log2(e)
    stride_qb, stride_qh, stride_qt,  # strides of Q (batch, head, time), in elements
    stride_kb, stride_kh, stride_kt,  # strides of K
    stride_vb, stride_vh, stride_vt,  # strides of V
    stride_ob, stride_oh, stride_ot,  # strides of O
    H, Tq, Tk,  # heads, queries, keys
    Tq_bucket, Tk_bucket,  # autotune key only: Tq and Tk rounded up to a power of two
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # D rounded up to a power of two (at least 16); the padding is masked
    CAUSAL: tl.constexpr,  # end-aligned causal mask
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per step
):
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M  # the longest walks first
    off_bh, off_b, off_h, kv_lo = _batch_and_head(H, KV_START)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    k_ptrs = K + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :]
    q_mask = _tile_mask(offs_m, Tq, offs_d, HEAD_DIM, True)
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of each query's scores
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # running sum of exp2(score - m_i) * v
    lo, mid_lo, mid_hi, hi = _key_ranges(start_m, Tq, Tk, kv_lo, BLOCK_M, BLOCK_N, CAUSAL)
    if KV_START is not None:
        acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt,
                                        offs_m, offs_n, offs_d, lo, tl.minimum(mid_lo, hi),
                                        qk_scale, Tq, Tk, kv_lo, HEAD_DIM, BLOCK_N, CAUSAL, MASKED=True)
    acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt,
                                    offs_m, offs_n, offs_d, mid_lo, mid_hi,
                                    qk_scale, Tq, Tk, kv_lo, HEAD_DIM, BLOCK_N, CAUSAL, MASKED=False)
    acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt,
                                    offs_m, offs_n, offs_d, tl.maximum(mid_lo, mid_hi), hi,
                                    qk_scale, Tq, Tk, kv_lo, HEAD_DIM, BLOCK_N, CAUSAL, MASKED=True)

    # a query that saw no key has l_i = 0: it writes zeros, and an lse of +inf that makes the
    # backward's exp2(score - lse) zero
    seen = l_i > 0.0
    l_i = tl.where(seen, l_i, 1.0)
    o = acc / l_i[:, None]
    lse = tl.where(seen, m_i + tl.math.log2(l_i), float("inf"))
    o_ptrs = O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=q_mask)
    tl.store(LSE + off_bh * Tq + offs_m, lse, mask=offs_m < Tq)


@triton.jit
def _attn_bwd_preprocess(
    O, DO,  # [B, H, Tq, D]: the forward's output and its gradient, head dim contiguous
    DELTA,  # [B, H, Tq] float32, contiguous: rowsum(dO * O), written here
    stride_ob, stride_oh, stride_ot,  # strides of O (batch, head, time)
    stride_dob, stride_doh, stride_dot,  # strides of DO
    H, Tq,  # heads, queries
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # D rounded up to a power of two (at least 16)
    BLOCK_M: tl.constexpr,  # queries per program
):
    off_bh, off_b, off_h, _ = _batch_and_head(H, None)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = _tile_mask(offs_m, Tq, offs_d, HEAD_DIM, True)
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
                mask=mask, other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + off_bh * Tq + offs_m, delta, mask=offs_m < Tq)


@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv,  # [BLOCK_N, BLOCK_D] float32: the program's gradients so far
    k, v,  # [BLOCK_N, BLOCK_D]: the program's keys and values
    q_ptrs, do_ptrs,  # [BLOCK_M, BLOCK_D] pointers to the queries and dO [0, BLOCK_M) of this (batch, head)
    lse_ptr, delta_ptr,  # LSE and DELTA of this (batch, head)
    stride_qt, stride_dot,  # time strides of Q and DO
    offs_m, offs_k, offs_d,  # arange(BLOCK_M); the program's key indices; arange(BLOCK_D)
    lo, hi,  # walk the query blocks that start in [lo, hi)
    qk_scale, Tq, Tk, kv_lo,  # sm_scale * log2(e); lengths; this row's first visible key
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr,
    MASKED: tl.constexpr,  # the tiles are partly visible: apply the mask (else every pair is visible)
):
    # The tiles are [keys, queries], P transposed, so that dV = P^T dO and dK = dS^T Q are plain matmuls.
    for start_m in range(lo, hi, BLOCK_M):
        offs_q = start_m + offs_m
        q_mask = _tile_mask(offs_q, Tq, offs_d, HEAD_DIM, MASKED)
        q = tl.load(q_ptrs + start_m * stride_qt, mask=q_mask, other=0.0)
        lse = tl.load(lse_ptr + offs_q, mask=offs_q < Tq, other=float("inf"))
        p_t = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=F32_DOT) * qk_scale - lse[None, :])
        if MASKED:
            p_t = tl.where(_visible(offs_q[None, :], offs_k[:, None], Tq, Tk, kv_lo, CAUSAL), p_t, 0.0)
        do = tl.load(do_ptrs + start_m * stride_dot, mask=q_mask, other=0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=F32_DOT)
        dp_t = tl.dot(v, tl.trans(do), input_precision=F32_DOT)
        delta = tl.load(delta_ptr + offs_q, mask=offs_q < Tq, other=0.0)
        ds_t = p_t * (dp_t - delta[None, :])  # the softmax gradient, without sm_scale
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=F32_DOT)
    return dk, dv


@triton.autotune(
    configs=_configs(
        gpu=[(32, 128, 8, 3), (64, 128, 8, 2), (64, 64, 8, 3), (32, 64, 4, 3), (32, 64, 8, 4), (32, 32, 4, 2)],
        interpreter=[(16, 32, 4, 1)],
    ),
    key=_TUNE_KEY,
    cache_results=True,
    prune_configs_by={"early_config_prune": _untuned_when_short},
)
@triton.jit
def _attn_bwd_dkdv(
    Q, K, V,  # [B, H, Tq, D], [B, H, Tk, D], [B, H, Tk, D]: the forward's inputs, head dim contiguous
    DO,  # [B, H, Tq, D]: the gradient of the output, head dim contiguous
    DK, DV,  # [B, H, Tk, D]: the gradients of K and V, written here
    LSE, DELTA,  # [B, H, Tq] float32, contiguous: the forward's log2-sum-exp2 and rowsum(dO * O)
    KV_START,  # [B] int32, or None: row b hides its first KV_START[b] keys
    sm_scale,  # the softmax scale
    qk_scale,  # sm_scale * log2(e)
    stride_qb, stride_qh, stride_qt,  # strides of Q (batch, head, time), in elements
    stride_kb, stride_kh, stride_kt,  # strides of K
    stride_vb, stride_vh, stride_vt,  # strides of V
    stride_dob, stride_doh, stride_dot,  # strides of DO
    stride_dkb, stride_dkh, stride_dkt,  # strides of DK
    stride_dvb, stride_dvh, stride_dvt,  # strides of DV
    H, Tq, Tk,  # heads, queries, keys
    Tq_bucket, Tk_bucket,  # autotune key only: Tq and Tk rounded up to a power of two
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # D rounded up to a power of two (at least 16); the padding is masked
    CAUSAL: tl.constexpr,  # end-aligned causal mask
    BLOCK_M: tl.constexpr,  # queries per step
    BLOCK_N: tl.constexpr,  # keys per program
):
    start_n = tl.program_id(0) * BLOCK_N  # the first key blocks, seen by the most queries, start first
    off_bh, off_b, off_h, kv_lo = _batch_and_head(H, KV_START)

    offs_m = tl.arange(0, BLOCK_M)
    offs_k = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = _tile_mask(offs_k, Tk, offs_d, HEAD_DIM, True)
    k = tl.load(K + off_b * stride_kb + off_h * stride_kh + offs_k[:, None] * stride_kt + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(V + off_b * stride_vb + off_h * stride_vh + offs_k[:, None] * stride_vt + offs_d[None, :],
                mask=kv_mask, other=0.0)
    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    do_ptrs = DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :]
    lse_ptr = LSE + off_bh * Tq
    delta_ptr = DELTA + off_bh * Tq

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo, mid_lo, mid_hi, hi = _query_ranges(start_n, Tq, Tk, kv_lo, BLOCK_M, BLOCK_N, CAUSAL)
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qt, stride_dot,
                                  offs_m, offs_k, offs_d, lo, tl.minimum(mid_lo, hi),
                                  qk_scale, Tq, Tk, kv_lo, HEAD_DIM, BLOCK_M, CAUSAL, MASKED=True)
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qt, stride_dot,
                                  offs_m, offs_k, offs_d, mid_lo, mid_hi,
                                  qk_scale, Tq, Tk, kv_lo, HEAD_DIM, BLOCK_M, CAUSAL, MASKED=False)
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qt, stride_dot,
                                  offs_m, offs_k, offs_d, tl.maximum(mid_lo, mid_hi), hi,
                                  qk_scale, Tq, Tk, kv_lo, HEAD_DIM, BLOCK_M, CAUSAL, MASKED=True)

    dk = dk * sm_scale  # the scores were q.k * sm_scale
    tl.store(DK + off_b * stride_dkb + off_h * stride_dkh + offs_k[:, None] * stride_dkt + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + off_b * stride_dvb + off_h * stride_dvh + offs_k[:, None] * stride_dvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_inner(
    dq,  # [BLOCK_M, BLOCK_D] float32: the program's gradient so far
    q, do,  # [BLOCK_M, BLOCK_D]: the program's queries and dO
    lse, delta,  # [BLOCK_M] float32: the program's log2-sum-exp2 and rowsum(dO * O)
    k_ptrs, v_ptrs,  # [BLOCK_N, BLOCK_D] pointers to the keys and values [0, BLOCK_N) of this (batch, head)
    stride_kt, stride_vt,  # time strides of K and V
    offs_m, offs_n, offs_d,  # the program's query indices; arange(BLOCK_N); arange(BLOCK_D)
    lo, hi,  # walk the key blocks that start in [lo, hi)
    qk_scale, Tq, Tk, kv_lo,  # sm_scale * log2(e); lengths; this row's first visible key
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    MASKED: tl.constexpr,  # the blocks are partly visible: apply the mask (else every key is visible)
):
    for start_n in range(lo, hi, BLOCK_N):
        offs_k = start_n + offs_n
        kv_mask = _tile_mask(offs_k, Tk, offs_d, HEAD_DIM, MASKED)
        k = tl.load(k_ptrs + start_n * stride_kt, mask=kv_mask, other=0.0)
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=F32_DOT) * qk_scale - lse[:, None])
        if MASKED:
            p = tl.where(_visible(offs_m[:, None], offs_k[None, :], Tq, Tk, kv_lo, CAUSAL), p, 0.0)
        v = tl.load(v_ptrs + start_n * stride_vt, mask=kv_mask, other=0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=F32_DOT)
        ds = p * (dp - delta[:, None])  # the softmax gradient, without sm_scale
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=F32_DOT)
    return dq


@triton.autotune(
    configs=_configs(
        gpu=[(128, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (32, 32, 4, 2)],
        interpreter=[(32, 16, 4, 1)],
    ),
    key=_TUNE_KEY,
    cache_results=True,
    prune_configs_by={"early_config_prune": _untuned_when_short},
)
@triton.jit
def _attn_bwd_dq(
    Q, K, V,  # [B, H, Tq, D], [B, H, Tk, D], [B, H, Tk, D]: the forward's inputs, head dim contiguous
    DO,  # [B, H, Tq, D]: the gradient of the output, head dim contiguous
    DQ,  # [B, H, Tq, D]: the gradient of Q, written here
    LSE, DELTA,  # [B, H, Tq] float32, contiguous: the forward's log2-sum-exp2 and rowsum(dO * O)
    KV_START,  # [B] int32, or None: row b hides its first KV_START[b] keys
    sm_scale,  # the softmax scale
    qk_scale,  # sm_scale * log2(e)
    stride_qb, stride_qh, stride_qt,  # strides of Q (batch, head, time), in elements
    stride_kb, stride_kh, stride_kt,  # strides of K
    stride_vb, stride_vh, stride_vt,  # strides of V
    stride_dob, stride_doh, stride_dot,  # strides of DO
    stride_dqb, stride_dqh, stride_dqt,  # strides of DQ
    H, Tq, Tk,  # heads, queries, keys
    Tq_bucket, Tk_bucket,  # autotune key only: Tq and Tk rounded up to a power of two
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # D rounded up to a power of two (at least 16); the padding is masked
    CAUSAL: tl.constexpr,  # end-aligned causal mask
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per step
):
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M  # the longest walks first
    off_bh, off_b, off_h, kv_lo = _batch_and_head(H, KV_START)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = _tile_mask(offs_m, Tq, offs_d, HEAD_DIM, True)
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=q_mask, other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=q_mask, other=0.0)
    lse = tl.load(LSE + off_bh * Tq + offs_m, mask=offs_m < Tq, other=float("inf"))
    delta = tl.load(DELTA + off_bh * Tq + offs_m, mask=offs_m < Tq, other=0.0)
    k_ptrs = K + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :]

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, mid_lo, mid_hi, hi = _key_ranges(start_m, Tq, Tk, kv_lo, BLOCK_M, BLOCK_N, CAUSAL)
    if KV_START is not None:
        dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, stride_vt,
                                offs_m, offs_n, offs_d, lo, tl.minimum(mid_lo, hi),
                                qk_scale, Tq, Tk, kv_lo, HEAD_DIM, BLOCK_N, CAUSAL, MASKED=True)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, stride_vt,
                            offs_m, offs_n, offs_d, mid_lo, mid_hi,
                            qk_scale, Tq, Tk, kv_lo, HEAD_DIM, BLOCK_N, CAUSAL, MASKED=False)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, stride_vt,
                            offs_m, offs_n, offs_d, tl.maximum(mid_lo, mid_hi), hi,
                            qk_scale, Tq, Tk, kv_lo, HEAD_DIM, BLOCK_N, CAUSAL, MASKED=True)

    dq = dq * sm_scale  # the scores were q.k * sm_scale
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=q_mask)


# ----------------------------------------------------------------------------------------------------
# Launchers, autograd, public function

_PREPROCESS_BLOCK_M = 64  # queries per program of the memory-bound _attn_bwd_preprocess


def _block_d(D):
    """The head-dim tile: D rounded up to a power of two, at least 16 (tl.dot's smallest inner size)."""
    return max(16, triton.next_power_of_2(D))


def _forward(q, k, v, causal, sm_scale, kv_start):
    """Launch _attn_fwd. Returns the output [B, H, Tq, D] and the log2-sum-exp2 [B, H, Tq] float32."""
    B, H, Tq, D = q.shape
    Tk = k.size(2)
    # the output is laid out [B, Tq, H, D] under its [B, H, Tq, D] shape, so that the model's usual
    # transpose back to [B, Tq, H * D] is a view, not a copy
    o = torch.empty((B, Tq, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    grid = lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]), B * H)  # noqa: E731
    _attn_fwd[grid](
        q, k, v, o, lse, kv_start, sm_scale * LOG2E,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
        H, Tq, Tk, triton.next_power_of_2(Tq), triton.next_power_of_2(Tk),
        HEAD_DIM=D, BLOCK_D=_block_d(D), CAUSAL=causal,
    )
    return o, lse


def _backward(do, q, k, v, o, lse, causal, sm_scale, kv_start):
    """Launch the three backward kernels. Returns dq, dk, dv."""
    B, H, Tq, D = q.shape
    Tk = k.size(2)
    delta = torch.empty_like(lse)
    _attn_bwd_preprocess[(triton.cdiv(Tq, _PREPROCESS_BLOCK_M), B * H)](
        o, do, delta, *o.stride()[:3], *do.stride()[:3], H, Tq,
        HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_M=_PREPROCESS_BLOCK_M,
    )
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    common = dict(HEAD_DIM=D, BLOCK_D=_block_d(D), CAUSAL=causal)
    buckets = (triton.next_power_of_2(Tq), triton.next_power_of_2(Tk))
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])
    _attn_bwd_dkdv[lambda meta: (triton.cdiv(Tk, meta["BLOCK_N"]), B * H)](
        q, k, v, do, dk, dv, lse, delta, kv_start, sm_scale, sm_scale * LOG2E,
        *strides, *dk.stride()[:3], *dv.stride()[:3], H, Tq, Tk, *buckets, **common,
    )
    _attn_bwd_dq[lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]), B * H)](
        q, k, v, do, dq, lse, delta, kv_start, sm_scale, sm_scale * LOG2E,
        *strides, *dq.stride()[:3], H, Tq, Tk, *buckets, **common,
    )
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, sm_scale, kv_start):
        o, lse = _forward(q, k, v, causal, sm_scale, kv_start)
        ctx.save_for_backward(q, k, v, o, lse, kv_start)
        ctx.causal, ctx.sm_scale = causal, sm_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, kv_start = ctx.saved_tensors
        do = do if do.stride(-1) == 1 else do.contiguous()
        dq, dk, dv = _backward(do, q, k, v, o, lse, ctx.causal, ctx.sm_scale, kv_start)
        return dq, dk, dv, None, None, None


def attention(q, k, v, causal=True, sm_scale=None, kv_start=None):
    """Flash attention with the semantics of attention_ref: q [B, H, Tq, D], k, v [B, H, Tk, D] ->
    [B, H, Tq, D] in q's dtype (float32, float16 or bfloat16; float32 accumulation; see F32_DOT for
    float32 inputs). Differentiable in q, k and v. Any strides are taken as they are as long as the
    head dim is contiguous; a tensor whose head dim is not gets copied. Head dims up to 128."""
    B, H, Tq, D = q.shape
    Tk = k.size(2)
    assert k.shape == v.shape == (B, H, Tk, D), f"q {q.shape}: k and v must be [B, H, Tk, D], got {k.shape}, {v.shape}"
    assert q.dtype == k.dtype == v.dtype, f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}"
    assert Tq <= Tk or not causal, f"causal attention needs Tq <= Tk, got Tq={Tq}, Tk={Tk}"
    assert D <= 128, f"head dims up to 128, got {D}"
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if kv_start is not None:
        kv_start = kv_start.to(device=q.device, dtype=torch.int32)
    return _FlashAttention.apply(q, k, v, causal, sm_scale, kv_start)
