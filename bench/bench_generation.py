"""
Benchmark of batched sampling: GPT.generate with its KV cache against recomputing the whole sequence
at every step (generate(use_cache=False), the reference the tests compare it with), and against
Hugging Face's GPT2LMHeadModel.generate on the same weights when `transformers` is installed.

    OMP_NUM_THREADS=1 python -m pytest bench/bench_generation.py -s

The model is the default pipeline model: pretrain.py's Config (layers, heads, width) and the
built-in tokenizer's vocabulary, with random weights. Its context (block_size 128) has no room for a
prompt and 128 new tokens, so the position table is extended to PROMPT_MAX + NEW_TOKENS; nothing
else depends on it. Each row of the table is a batch of B left-padded prompts of 8 to 16 tokens
(ragged, as complete() makes them), continued by 128 tokens sampled at temperature 1 with no EOS,
so that every row runs all 128 steps. tokens/s counts new tokens: B * 128 / wall time, the prompt's
forward pass included. On a CPU it runs on one thread (see conftest.py); the recompute column takes
most of the run's 3 to 5 minutes.
"""

import time
import torch

from data.tokenizer import get_tokenizer
from model import GPT, GPTConfig, left_pad
from pretrain import NEW_MODEL_CONTEXT, Config as PretrainConfig

BATCHES = (1, 4, 16, 64)
NEW_TOKENS = 128
PROMPT_MIN, PROMPT_MAX = 8, 16
REPEAT = 3  # every figure is the best of 3 calls: a shared machine only ever slows a call down


def pipeline_config():
    """GPTConfig of the model pretrain.py trains by default, with room for PROMPT_MAX + NEW_TOKENS."""
    cfg = PretrainConfig()
    return GPTConfig(block_size=max(cfg.block_size or NEW_MODEL_CONTEXT, PROMPT_MAX + NEW_TOKENS), vocab_size=get_tokenizer("builtin").n_vocab,
                     n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd)


def prompts(B, vocab_size, device, seed=0):
    """B random prompts of PROMPT_MIN to PROMPT_MAX tokens, left-padded: (idx (B, T), start (B,))."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(PROMPT_MIN, PROMPT_MAX + 1, (B,), generator=g).tolist()
    return left_pad([torch.randint(1, vocab_size, (n,), generator=g).tolist() for n in lengths], 0, device)


def seconds(fn, device, repeat=1):
    """Best wall time of fn over `repeat` calls."""
    best = float("inf")
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def hf_twin(model):
    """GPT2LMHeadModel holding model's weights (GPT-2's Conv1D stores its matrices transposed).
    No EOS in its config: like the runs here, it samples all NEW_TOKENS."""
    from transformers import GPT2Config, GPT2LMHeadModel
    c = model.config
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                                    n_layer=c.n_layer, n_head=c.n_head, activation_function="gelu_new",
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                    bos_token_id=None, eos_token_id=None))
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    state = {k: (v.t() if k.endswith(conv1d) else v) for k, v in model.state_dict().items()}
    state["lm_head.weight"] = state["transformer.wte.weight"]
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith(("attn.bias", "attn.masked_bias")) for k in missing), (missing, unexpected)
    return hf.to(model.transformer.wte.weight.device).eval()


def test_generation_benchmark(device):
    torch.manual_seed(0)
    model = GPT(pipeline_config()).to(device).eval()
    c = model.config
    print(f"\n{device}, {torch.get_num_threads()} thread(s), torch {torch.__version__}; model: {c.n_layer} layers, "
          f"{c.n_head} heads, n_embd {c.n_embd}, vocab {c.vocab_size}, {model.num_params():,} parameters, random weights")

    hf = None
    try:
        hf = hf_twin(model)
    except ImportError:
        print("transformers is not installed: no comparison with GPT2LMHeadModel.generate")
    if hf is not None:  # the twin must compute the same function before its speed means anything
        idx = torch.randint(0, c.vocab_size, (2, 12), device=device)
        with torch.no_grad():
            torch.testing.assert_close(hf(idx).logits, model(idx)[0], rtol=1e-4, atol=1e-4)

    def ours(idx, start, use_cache):
        gen = torch.Generator(device=device).manual_seed(0)
        return lambda: model.generate(idx, NEW_TOKENS, start=start, temperature=1.0, generator=gen, use_cache=use_cache)

    def theirs(idx, start):
        mask = (torch.arange(idx.size(1), device=device)[None] >= start[:, None]).long()
        return lambda: hf.generate(input_ids=idx, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                                   do_sample=True, top_k=0, pad_token_id=0)

    seconds(ours(*prompts(2, c.vocab_size, device), True), device)  # warm-up
    print(f"\n{NEW_TOKENS} new tokens per row, tokens/s = batch * {NEW_TOKENS} / seconds")
    print(f"{'batch':>5} | {'kv-cache tok/s':>14} | {'recompute tok/s':>15} | {'x recompute':>11} | {'hf tok/s':>9} | {'x hf':>5}")
    t0 = time.time()
    for B in BATCHES:
        idx, start = prompts(B, c.vocab_size, device)
        cached = B * NEW_TOKENS / seconds(ours(idx, start, True), device, repeat=REPEAT)
        # on a GPU the first recompute call also autotunes attention for every new length bucket
        full = B * NEW_TOKENS / seconds(ours(idx, start, False), device, repeat=REPEAT)
        row = f"{B:>5} | {cached:>14.0f} | {full:>15.0f} | {cached / full:>11.1f}"
        if hf is not None:
            hf_rate = B * NEW_TOKENS / seconds(theirs(idx, start), device, repeat=REPEAT)
            row += f" | {hf_rate:>9.0f} | {cached / hf_rate:>5.1f}"
        print(row, flush=True)
    print(f"({time.time() - t0:.0f} s)")

