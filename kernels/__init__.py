"""
The public kernel API, and the one switch between Triton and PyTorch.

Every model and stage calls these functions and nothing below them (one exception: GPT.decode_step,
one query per row against the KV cache, calls PyTorch's SDPA with a mask it builds once per step):

    attention(q, k, v, causal=True, sm_scale=None, kv_start=None)   # [B, H, Tq, D]
    token_logprobs(logits, targets, temperature=1.0)                 # [...]
    fused_linear_logprobs(hidden, weight, targets, temperature=1.0)  # [...]
    kl_div(logits_p, logits_q)                                       # [...]
    entropy(logits)                                                  # [...]

Dispatch: tensors on a CUDA device run the Triton kernels, anything else runs the PyTorch
reference that sits beside each kernel (and that the kernels are tested against). The environment
variable RLHF_KERNELS forces a path: RLHF_KERNELS=torch always runs the reference, RLHF_KERNELS=triton
always runs Triton (on CPU tensors that needs TRITON_INTERPRET=1, which is how the tests run the
kernels without a GPU). It is read at every call, so a test can flip it. It does not reach
GPT.decode_step's attention, which is PyTorch's SDPA whatever the setting.

The log-prob ops return float32 whatever the input dtype, except that the references keep a
float64 input in float64, so that a float64 model stays exact in the tests.
"""

import os

from kernels import attention as _attention
from kernels import logprob as _logprob

IGNORE_INDEX = _logprob.IGNORE_INDEX


def use_triton(x):
    """True when the op on tensor x should run the Triton kernel."""
    mode = os.environ.get("RLHF_KERNELS", "auto")
    if mode not in ("auto", "triton", "torch"):
        raise ValueError(f"RLHF_KERNELS must be auto, triton or torch, not {mode!r}")
    if mode == "auto":
        return x.is_cuda
    return mode == "triton"


def attention(q, k, v, causal=True, sm_scale=None, kv_start=None):
    """Scaled dot-product attention, q [B, H, Tq, D], k and v [B, H, Tk, D] -> [B, H, Tq, D].

    causal: with Tq < Tk (decoding with a KV cache) the mask is aligned to the end, so query i
        sees keys up to Tk - Tq + i.
    sm_scale: defaults to 1/sqrt(D).
    kv_start: optional int tensor [B]; row b ignores its first kv_start[b] keys (left padding).
        A query that sees no key at all (a padding position) gets an output of zeros.
    """
    impl = _attention.attention if use_triton(q) else _attention.attention_ref
    return impl(q, k, v, causal=causal, sm_scale=sm_scale, kv_start=kv_start)


def token_logprobs(logits, targets, temperature=1.0):
    """log softmax(logits / temperature) at targets: logits [..., V], targets [...] -> float32 [...].
    Targets equal to IGNORE_INDEX (-100) give 0 and no gradient."""
    op = _logprob.token_logprobs if use_triton(logits) else _logprob.token_logprobs_ref
    return op(logits, targets, temperature)


def fused_linear_logprobs(hidden, weight, targets, temperature=1.0):
    """token_logprobs(hidden @ weight.T, targets, temperature) without the full logits:
    hidden [..., C], weight [V, C] (the lm_head), targets [...] -> float32 [...]."""
    op = _logprob.fused_linear_logprobs if use_triton(hidden) else _logprob.fused_linear_logprobs_ref
    return op(hidden, weight, targets, temperature)


def kl_div(logits_p, logits_q):
    """Full-vocabulary KL(softmax(logits_p) || softmax(logits_q)) per position: [..., V] -> float32 [...].
    Differentiable with respect to logits_p only; logits_q is treated as a constant."""
    op = _logprob.kl_div if use_triton(logits_p) else _logprob.kl_div_ref
    return op(logits_p, logits_q)


def entropy(logits):
    """Entropy of softmax(logits) per position: [..., V] -> float32 [...]."""
    op = _logprob.entropy if use_triton(logits) else _logprob.entropy_ref
    return op(logits)
