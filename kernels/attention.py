"""
Causal attention for the GPT: the PyTorch reference (the Triton kernel joins it here).

The reference materialises nothing itself: it hands the mask to PyTorch's scaled_dot_product_attention,
which picks its own fused backend. Masking rules, shared with the kernel:
- causal with Tq <= Tk is aligned to the end: query i sees keys j <= Tk - Tq + i (decoding with a
  KV cache appends Tq new queries after Tk - Tq cached keys);
- kv_start[b] hides the first kv_start[b] keys of row b (a left-padded batch);
- a query that sees no key at all gets zeros (and passes no gradient), never NaN.
"""

import math

import torch
import torch.nn.functional as F


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
    """Reference attention. q [B, H, Tq, D], k, v [B, H, Tk, D] -> [B, H, Tq, D] in q's dtype."""
    Tq, Tk = q.size(-2), k.size(-2)
    assert Tq <= Tk or not causal, f"causal attention needs Tq <= Tk, got Tq={Tq}, Tk={Tk}"
    sm_scale = 1.0 / math.sqrt(q.size(-1)) if sm_scale is None else sm_scale
    if kv_start is None and (Tq == Tk or not causal):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=sm_scale)
    mask = visible_keys(Tq, Tk, causal, kv_start, q.device)
    sees_nothing = ~mask.any(-1, keepdim=True)  # [B, 1, Tq, 1]
    # let empty rows attend everywhere (no NaN in any backend), then zero their output
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | sees_nothing, scale=sm_scale)
    return out.masked_fill(sees_nothing, 0.0)
