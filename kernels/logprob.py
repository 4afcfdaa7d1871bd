"""
Log-probabilities, KL and entropy over the vocabulary: the PyTorch references (the Triton kernels
join them here).

Every RLHF stage needs, per position, one number from a softmax over the whole vocabulary: the
log-prob of the target token (SFT loss, PPO ratios, DPO), the KL between policy and reference, the
entropy. The references below are written for clarity and accumulate in float32 whatever the input
dtype; they materialise float32 [N, V] tensors, which is exactly the memory the kernels remove.
"""

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # a target equal to this gives log-prob 0 and no gradient


def token_logprobs_ref(logits, targets, temperature=1.0):
    """log softmax(logits / temperature)[targets]: logits [..., V], targets [...] -> float32 [...]."""
    V = logits.size(-1)
    x = logits.float().reshape(-1, V) / temperature
    nll = F.cross_entropy(x, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    return -nll.view(targets.shape)


def fused_linear_logprobs_ref(hidden, weight, targets, temperature=1.0):
    """token_logprobs_ref of the logits hidden @ weight.T: hidden [..., C], weight [V, C]."""
    return token_logprobs_ref(hidden @ weight.t(), targets, temperature)


def kl_div_ref(logits_p, logits_q):
    """KL(p || q) = sum_v p_v (log p_v - log q_v) per position, [..., V] -> float32 [...].
    q is a constant: no gradient flows into logits_q."""
    logp = F.log_softmax(logits_p.float(), dim=-1)
    logq = F.log_softmax(logits_q.detach().float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def entropy_ref(logits):
    """H(p) = -sum_v p_v log p_v per position, [..., V] -> float32 [...]."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)
