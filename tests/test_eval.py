import torch

import eval as evaluation
from data.tokenizer import get_tokenizer
from model import GPT, GPTConfig


def test_response_kl_sums_each_responses_own_positions():
    """eval's KL, batched and left-padded, against each row alone (no padding) in float64:
    sum over the response tokens of sum_v p log(p / q), p and q the two models' next-token softmax."""
    torch.manual_seed(0)
    tok = get_tokenizer("builtin")
    cfg = GPTConfig(block_size=48, vocab_size=tok.n_vocab, n_layer=1, n_head=2, n_embd=16)
    model, ref = GPT(cfg).eval(), GPT(cfg).eval()
    prompts = ["Human: What does the suho eat?\n\nAssistant:", "", "Human: Hi.\n\nAssistant:"]
    responses = [[5, 9, tok.eot_id], [7], [3, 4, 5, 6, 8, 2]]  # ragged, so that rows pad differently
    got = evaluation.response_kl(model, ref, tok, prompts, responses)
    for p, r, kl in zip(prompts, responses, got):
        ids = torch.tensor([tok.encode_prompt(p) + r])
        with torch.no_grad():
            logp, logq = (m(ids)[0][0, -len(r) - 1:-1].double().log_softmax(-1) for m in (model, ref))
        want = (logp.exp() * (logp - logq)).sum().item()
        assert abs(kl - want) < 1e-5 * max(1.0, want), (kl, want)
    assert min(got) > 0  # two different random models
