"""The GPT: GPT-2's forward math, the loss, the scalar head, left padding and KV-cache generation."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data.tokenizer import get_tokenizer
from model import GPT, GPTConfig, KVCache, complete_ids, left_pad, sample

CFG = GPTConfig(block_size=48, vocab_size=67, n_layer=2, n_head=2, n_embd=32)


def make_model(dtype=torch.float32, head="lm", seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**CFG.__dict__, "head": head}))
    with torch.no_grad():  # larger weights than the init, so greedy outputs vary from step to step
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.to(dtype).eval()


def gpt2_reference_logits(model, idx):
    """GPT-2's forward written out from the weights, independently of model.py."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    C, nh = model.config.n_embd, model.config.n_head
    T = idx.size(1)

    def layer_norm(x, p):
        mu, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True, unbiased=False)
        return (x - mu) / torch.sqrt(var + 1e-5) * sd[p + ".weight"] + sd[p + ".bias"]

    def gelu(x):  # the tanh approximation GPT-2 uses
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][:T]
    for i in range(model.config.n_layer):
        p = f"transformer.h.{i}."
        h = layer_norm(x, p + "ln_1") @ sd[p + "attn.c_attn.weight"].T + sd[p + "attn.c_attn.bias"]
        q, k, v = (t.view(-1, T, nh, C // nh).transpose(1, 2) for t in h.split(C, dim=-1))
        att = q @ k.transpose(-1, -2) / math.sqrt(C // nh)
        att = att.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(-1, T, C)
        x = x + y @ sd[p + "attn.c_proj.weight"].T + sd[p + "attn.c_proj.bias"]
        h = gelu(layer_norm(x, p + "ln_2") @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"])
        x = x + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]
    return layer_norm(x, "transformer.ln_f") @ sd["transformer.wte.weight"].T  # tied head


def test_forward_matches_gpt2_math():
    model = make_model(torch.float64)
    idx = torch.randint(0, CFG.vocab_size, (3, 17))
    logits, loss = model(idx)
    assert logits.shape == (3, 17, CFG.vocab_size) and loss is None
    torch.testing.assert_close(logits, gpt2_reference_logits(model, idx), rtol=1e-10, atol=1e-10)


def test_loss_is_mean_cross_entropy_over_kept_targets():
    model = make_model(torch.float64)
    idx = torch.randint(0, CFG.vocab_size, (2, 9))
    targets = torch.randint(0, CFG.vocab_size, (2, 9))
    targets[0, :4] = -100
    logits, _ = model(idx)
    logp = logits.log_softmax(-1)
    kept = [(b, t) for b in range(2) for t in range(9) if targets[b, t] != -100]
    expected = -sum(logp[b, t, targets[b, t]] for b, t in kept) / len(kept)
    none, loss = model(idx, targets)  # the fused path: no logits with targets
    assert none is None
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    # and the gradients of every weight are those of the full logits' cross-entropy
    grads = torch.autograd.grad(loss, list(model.parameters()))
    expected_grads = torch.autograd.grad(F.cross_entropy(model(idx)[0].flatten(0, 1), targets.flatten(), ignore_index=-100),
                                         list(model.parameters()))
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_loss_is_zero_without_kept_targets():
    model = make_model(torch.float64)
    _, loss = model(torch.randint(0, CFG.vocab_size, (2, 5)), torch.full((2, 5), -100))
    assert loss.item() == 0.0


def test_fresh_model_predicts_near_uniform():
    torch.manual_seed(0)
    model = GPT(CFG)
    idx, targets = torch.randint(0, CFG.vocab_size, (2, 4, 32))
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(CFG.vocab_size)) < 0.1


def test_scalar_head_gives_one_number_per_position():
    model = make_model(head="scalar")
    values, loss = model(torch.randint(0, CFG.vocab_size, (3, 11)))
    assert values.shape == (3, 11) and loss is None
    assert "score.weight" in model.state_dict()
    assert not any("score" in k for k in make_model().state_dict())


def test_scalar_head_keeps_float32_under_autocast():
    """A reward is known only up to an offset (Bradley-Terry sees differences), and the offset can
    dwarf the differences: at 300, bf16 rounds to steps of 2, so under a GPU's autocast every margin
    between responses was 0 or 2. The head runs in float32 (the trunk's last LayerNorm already does)."""
    model = make_model(head="scalar")
    with torch.no_grad():
        model.transformer.ln_f.bias.fill_(300.0 / CFG.n_embd)
        model.score.weight.fill_(1.0)
    idx = torch.randint(0, CFG.vocab_size, (3, 11))
    with torch.no_grad():
        exact, _ = model(idx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            values, _ = model(idx)
    assert values.dtype == torch.float32
    assert exact.std() > 0.1 and exact.mean().item() == pytest.approx(300, abs=20)
    assert (values - exact).abs().max() < 0.25  # the trunk's bf16 matmuls only (the head in bf16: 1.1)
    model.double()  # and a float64 model's values stay float64, as its tests need
    with torch.no_grad():
        values, _ = model(idx)
        by_hand = model.hidden_states(idx) @ model.score.weight[0]
    assert values.dtype == torch.float64 and (values - by_hand).abs().max() < 1e-9  # float32 rounds 300 to 3e-5


def test_left_padding_does_not_change_a_row():
    model = make_model(torch.float64)
    seqs = [[5, 6, 7, 8, 9, 10, 11], [1, 2, 3], [4]]
    idx, start = left_pad(seqs, pad_id=0)
    assert start.tolist() == [0, 4, 6]
    logits, _ = model(idx, start=start)
    for b, s in enumerate(seqs):
        alone, _ = model(torch.tensor([s]))
        torch.testing.assert_close(logits[b, start[b]:], alone[0], rtol=1e-9, atol=1e-9)
    assert torch.isfinite(logits).all()  # padding positions see no key, yet nothing is NaN


def test_kv_cache_forward_matches_full_forward():
    model = make_model(torch.float64)
    idx, start = left_pad([[3, 4, 5, 6, 7, 8], [9, 10, 11]], pad_id=0)
    full, _ = model(idx, start=start)
    cache = KVCache(model.config, 2, idx.size(1))
    first, _ = model(idx[:, :4], start=start, cache=cache)  # a prefill, then one token at a time
    rest = [model(idx[:, t:t + 1], start=start, cache=cache)[0] for t in range(4, idx.size(1))]
    torch.testing.assert_close(torch.cat([first] + rest, dim=1), full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("padded, autocast", [(True, False), (False, False), (True, True)])
def test_decode_step_is_the_module_path_bit_for_bit(padded, autocast):
    """generate's one-token step computes what hidden_states computes for one token, in the same ops:
    the same hidden states and the same cache to the last bit (in float32, where another order of
    operations would show; and under bf16 autocast, whose casts must fall in the same places)."""
    model = make_model(torch.float32)
    idx, start = left_pad([[3, 4, 5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15]] if padded else [[3, 4], [5, 6], [7, 8]], pad_id=0)
    start = start if padded else None
    caches = [KVCache(model.config, 3, idx.size(1) + 6) for _ in range(2)]
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for cache in caches:
            model.hidden_states(idx, start, cache)
        for _ in range(6):
            tok = torch.randint(1, CFG.vocab_size, (3,), generator=gen)
            slow = model.hidden_states(tok[:, None], start, caches[0])[:, 0]
            fast = model.decode_step(tok, caches[1], start)
            assert torch.equal(fast, slow)
    assert caches[0].pos == caches[1].pos == idx.size(1) + 6
    assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v, caches[1].v)


def test_generate_with_dropout_active_takes_the_module_path(monkeypatch):
    """decode_step has no dropout: a model in training mode with dropout samples every token through
    the modules, as it did before the fast step existed; in eval mode every token after the prompt
    takes the fast step."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**CFG.__dict__, "dropout": 0.5}))
    calls = []
    step = GPT.decode_step
    monkeypatch.setattr(GPT, "decode_step", lambda self, *a: calls.append(1) or step(self, *a))
    idx = torch.tensor([[1, 2, 3]])
    model.train().generate(idx, 5)
    assert calls == []
    model.eval().generate(idx, 5)
    assert len(calls) == 4  # the first new token comes from the prompt's pass


def test_generate_refuses_a_row_without_a_prompt_token():
    model, idx = make_model(), torch.tensor([[1, 2, 3], [0, 0, 0]])
    with pytest.raises(ValueError, match=r"start\[1\] = 3: every row needs a prompt token in \[0, 3\)"):
        model.generate(idx, 4, start=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"start\[0\] = -1"):
        model.generate(idx, 4, start=torch.tensor([-1, 0]))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generate_with_cache_equals_recompute(temperature):
    model = make_model(torch.float64)
    idx, start = left_pad([[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11, 12]], pad_id=0)
    outs = []
    for use_cache in (True, False):
        gen = torch.Generator().manual_seed(123)
        outs.append(model.generate(idx, 20, start=start, temperature=temperature, generator=gen, use_cache=use_cache))
    assert outs[0].shape == (3, 6 + 20)
    assert torch.equal(outs[0], outs[1])
    assert len(set(outs[0][0, 6:].tolist())) > 3  # a non-trivial sequence, not one token repeated


def test_generate_ragged_batch_equals_each_row_alone():
    model = make_model(torch.float64)
    seqs = [[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11, 12]]
    idx, start = left_pad(seqs, pad_id=0)
    batch = model.generate(idx, 15, start=start, temperature=0)
    for b, s in enumerate(seqs):
        alone = model.generate(torch.tensor([s]), 15, temperature=0)
        assert batch[b, idx.size(1):].tolist() == alone[0, len(s):].tolist()


def test_generate_stops_each_row_at_eos():
    model = make_model(torch.float64)
    idx, start = left_pad([[1, 2, 3], [4, 5], [6, 7, 8]], pad_id=0)
    free = model.generate(idx, 12, start=start, temperature=0)[:, 3:]
    eos = free[0, 2].item()  # pick as EOS a token that row 0 emits by its third step
    pad = (eos + 1) % CFG.vocab_size  # not the EOS: a done row must stay done after its first pad
    out = model.generate(idx, 12, start=start, temperature=0, eos_id=eos, pad_id=pad)[:, 3:]
    for b in range(3):
        row, ref = out[b].tolist(), free[b].tolist()
        n = ref.index(eos) + 1 if eos in ref[:out.size(1)] else out.size(1)
        assert row[:n] == ref[:n] and all(t == pad for t in row[n:])
    if all(eos in r for r in free.tolist()):  # every row finished: generation stopped early
        assert out.size(1) == max(r.index(eos) + 1 for r in free.tolist())
    else:  # a row never finished: all 12 steps ran, whichever rows were done before
        assert out.size(1) == 12
    # a batch whose every row is done stops there: row 0 alone ends with its first EOS
    alone = model.generate(idx[:1], 12, start=start[:1], temperature=0, eos_id=eos, pad_id=pad)
    first = free[0].tolist()
    assert alone[0, 3:].tolist() == first[:first.index(eos) + 1]


def test_generate_refuses_sequences_longer_than_block_size():
    with pytest.raises(ValueError, match="block_size"):
        make_model().generate(torch.zeros(1, 40, dtype=torch.long), 9)
    model, cache = make_model(), KVCache(CFG, 1, CFG.block_size + 1)  # a cache with room past the positions
    model.hidden_states(torch.zeros(1, CFG.block_size, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match=f"sequence of {CFG.block_size + 1} tokens is longer than block_size"):
        model.decode_step(torch.zeros(1, dtype=torch.long), cache)


def test_complete_ids_conditions_an_empty_prompt_on_the_eos():
    tok = get_tokenizer("builtin")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=tok.n_vocab, n_layer=1, n_head=2, n_embd=16)).eval()
    empty, other = complete_ids(model, tok, ["", "Human: Hi"], 6, temperature=0)
    alone = model.generate(torch.tensor([[tok.eot_id]]), 6, temperature=0, eos_id=tok.eot_id, pad_id=tok.pad_id)
    assert empty == alone[0, 1:].tolist() and len(other) > 0


def test_complete_ids_cuts_a_prompt_too_long_for_the_context_from_the_left():
    tok = get_tokenizer("builtin")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=tok.n_vocab, n_layer=1, n_head=2, n_embd=16)).eval()
    long, short = "Human: " + "Tell me more. " * 10 + "\n\nAssistant:", "Human: Hi"
    assert len(tok.encode(long)) > 16
    response, = complete_ids(model, tok, [long], 8, temperature=0)
    alone = model.generate(torch.tensor([tok.encode(long)[-8:]]), 8, temperature=0, eos_id=tok.eot_id, pad_id=tok.pad_id)
    assert response == alone[0, 8:].tolist()[:len(response)]  # its last 8 tokens, room left for 8 new ones
    assert len(response) == 8 or response[-1] == tok.eot_id
    # a prompt that fits is left as it is, even beside one that is cut
    _, fits = complete_ids(model, tok, [long, short], 4, temperature=0)
    assert fits == complete_ids(model, tok, [short], 4, temperature=0)[0]
    # a prompt that fits but leaves less than max_new_tokens is kept whole, and its batch gets the room
    # it leaves (4 tokens here); with leave_room it is cut instead, and a short prompt beside it keeps all 8
    near = "Human: Tell me more. Tell me"
    assert len(tok.encode(near)) + 8 > 16 > len(tok.encode(near))
    whole, squeezed = complete_ids(model, tok, [near, short], 8, temperature=0)
    assert len(whole) <= 4 and squeezed == complete_ids(model, tok, [short], 8, temperature=0)[0][:len(squeezed)]
    _, kept = complete_ids(model, tok, [near, short], 8, temperature=0, leave_room=True)
    assert kept == complete_ids(model, tok, [short], 8, temperature=0)[0]
    assert len(kept) == 8 or kept[-1] == tok.eot_id


def test_sample_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, 4)
    gen = torch.Generator().manual_seed(0)
    assert (sample(logits, temperature=0) == 0).all()
    assert set(sample(logits, top_k=2, generator=gen).tolist()) == {0, 1}
    assert set(sample(logits, top_p=0.8, generator=gen).tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.8
    assert set(sample(logits, top_p=0.81, generator=gen).tolist()) == {0, 1, 2}
    exact = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]])).expand(4000, 4)  # 0.5 + 0.25 is 0.75 exactly
    assert set(sample(exact, top_p=0.75, generator=gen).tolist()) == {0, 1}  # reaching top_p is enough
    freq = torch.bincount(sample(logits, generator=gen), minlength=4) / 4000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03, rtol=0)
    hot = torch.bincount(sample(logits, temperature=2.0, generator=gen), minlength=4) / 4000
    expected = torch.tensor([0.5, 0.3, 0.15, 0.05]).sqrt()
    torch.testing.assert_close(hot, expected / expected.sum(), atol=0.03, rtol=0)


def test_sample_never_draws_a_filtered_token_at_the_top_of_the_cdf(monkeypatch):
    """sample() locates one uniform number u per row in the CDF. With u at its largest value below 1
    (and u * total rounding up to total), it must still land on the last token that has mass, not on
    the filtered tokens after it."""
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]]).expand(3, 5)
    def largest_below_one(shape, dtype, **kw):
        return torch.ones(shape, dtype=dtype).nextafter(torch.zeros(shape, dtype=dtype))
    monkeypatch.setattr(torch, "rand", largest_below_one)
    assert sample(logits, top_k=3).tolist() == [2, 2, 2]
    assert sample(logits, top_p=0.5).tolist() == [0, 0, 0]
    assert sample(logits).tolist() == [4, 4, 4]


def test_sample_draws_the_inverse_cdf_of_the_softmax_in_float64(monkeypatch):
    """One token of probability 1 - 3e-5, then 1000 of 3e-8 each: near 1 the steps of float32 are
    6e-8, so in a float32 CDF half of those tokens had no interval at all (never drawn) and the
    other half twice theirs, and a float32 u takes only 500 values there. With u in the middle of
    each small token's interval, each must be drawn."""
    n, p = 1000, 3e-8
    logits = torch.full((n, 1 + n), math.log(p)).index_fill_(1, torch.tensor([0]), math.log(1 - n * p))
    u = 1 - n * p + (np.arange(n) + 0.5) * p
    monkeypatch.setattr(torch, "rand", lambda shape, **kw: torch.tensor(u, dtype=kw.get("dtype")).view(shape))
    assert sample(logits).tolist() == list(range(1, 1 + n))


def test_top_p_keeps_the_smallest_set_that_reaches_it_at_exact_boundaries():
    for V, top_p, kept in ((3, 2 / 3, 2), (10, 6 / 10, 6), (10, 0.3, 3), (4, 1 / 4, 1)):
        logits = torch.zeros(2000, V)  # V equally likely tokens: the first `kept` reach top_p exactly
        drawn = set(sample(logits, top_p=top_p, generator=torch.Generator().manual_seed(0)).tolist())
        assert len(drawn) == kept, (V, top_p, sorted(drawn))


def test_generate_under_autocast_caches_the_dtype_attention_sees():
    """Under bf16 autocast the layers produce bf16 keys while the weights stay float32: the cache
    must hold bf16 (a float32 cache handed attention bf16 q with float32 k and v, which broke
    ppo.py and eval.py on a GPU). The cached path then matches recomputing under the same autocast."""
    model = make_model(torch.float32)
    idx, start = left_pad([[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11, 12]], pad_id=0)
    cache = KVCache(model.config, 3, idx.size(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(idx, start=start, cache=cache)
        assert cache.k.dtype == cache.v.dtype == torch.bfloat16
        greedy = [model.generate(idx, 8, start=start, temperature=0.0, use_cache=c) for c in (True, False)]
    assert greedy[0].shape == (3, 6 + 8)
    assert (greedy[0] == greedy[1]).float().mean() > 0.9  # bf16 rounding may flip a near-tie
    # a cache filled under autocast refuses float32 keys (autocast turned off midway), and the reverse
    cache = KVCache(model.config, 3, idx.size(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(idx[:, :-1], start=start, cache=cache)
    with pytest.raises(ValueError, match="KVCache holds torch.bfloat16, got torch.float32 keys"):
        model(idx[:, -1:], start=start, cache=cache)
    cache = KVCache(model.config, 3, idx.size(1))
    model(idx[:, :-1], start=start, cache=cache)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(ValueError, match="KVCache holds torch.float32, got torch.bfloat16 keys"):
            model(idx[:, -1:], start=start, cache=cache)


def test_fit_prompt_keeps_the_last_token_and_a_full_prompt_gets_room():
    from model import fit_prompt
    assert fit_prompt(list(range(20)), 16, 10) == list(range(14, 20))  # leaves 10 of 16
    assert fit_prompt(list(range(20)), 16, 16) == [19]  # no room at all: the last token stays
    assert fit_prompt([1, 2], 16, 4) == [1, 2]
    tok = get_tokenizer("builtin")
    prompt = "Human: Where does the suho live?\n\nAssistant:"
    torch.manual_seed(0)  # a context exactly as long as the prompt: it fills it, so it is cut to leave room
    model = GPT(GPTConfig(block_size=len(tok.encode_prompt(prompt)), vocab_size=tok.n_vocab, n_layer=1, n_head=1, n_embd=8))
    out = complete_ids(model.eval(), tok, [prompt, "Human: " + "suho " * 40], 4, temperature=0)
    assert all(1 <= len(o) <= 4 for o in out)  # continuations, not empty ones
