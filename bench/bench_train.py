"""
Benchmark of one training step of every stage: tokens/s and model FLOPs utilisation (MFU).

    OMP_NUM_THREADS=1 python -m pytest bench/bench_train.py -s

Each stage's step is built from the stage's own functions, on the default pipeline model (pretrain.py's
Config, built-in tokenizer) with random weights, at the stage's default batch size, on its built-in
data: forward, loss, backward, gradient clipping and the AdamW update, as its loop runs them.
- pretrain: 32 windows of 128 tokens, cross-entropy on every position;
- sft: 32 random demonstrations in length-sorted micro-batches, right-padded (sft.collate), sft.sft_loss
  (the lm head at the response tokens only);
- reward: a batch of pairs of similar length (reward.py's default size), chosen and rejected in one
  batch (reward.rewards), bradley_terry_loss plus the lm loss on the chosen responses (--lm_coef);
- dpo: 32 random pairs in length-sorted micro-batches, chosen and rejected of each in one forward pass
  (dpo.batch_logps, which applies the lm head at the response tokens only), dpo_loss; the reference log-probs, computed once before training, are not
  part of a step;
- ppo: a minibatch of 16 prompts + 24 sampled tokens: the policy's clipped loss and the value
  model's loss, two backward passes, two updates (the rollout is not part of a step).
Model FLOPs are counted as in the PaLM paper's MFU: 6 per parameter of a matrix multiply per position
(2 forward, 4 backward) over every position of the batch, padding included, plus the causal attention
scores (6 * n_layer * T * n_embd per position: half of the T x T square) and the lm head where a
stage applies it; embedding lookups, LayerNorms, softmaxes and the optimizer count nothing. The
utilisation is against two ceilings measured in the same run: a large square matmul (the machine's
peak) and the model's own widest matmul, (B*T, n_embd) @ (n_embd, 4 n_embd) (the ceiling at this
width). On a CPU it runs on one thread (see conftest.py), in under a minute.
sft and dpo draw random batches, as their loops do, and cut each into length-sorted micro-batches
(--length_groups, common.shard), each padded to its own longest: half the positions of one padded
pass were padding, about a fifth are now. Batches drawn by length (common.batch_indices, as reward.py
draws them) would remove more, but on the built-in task a demonstration's length goes with its
question kind and style, so such batches are lopsided: bucketed SFT ran 2.6x faster (71 s -> 28 s on
one thread) and ended at a validation loss of 1.38 instead of 0.39. Sorting inside a random batch
keeps its gradient. (Here the micro-batches of a step share one backward pass: the same FLOPs as the
stages' loops, which run one backward per micro-batch, with more memory held.)
"""

import random
import time

import torch

import dpo
import kernels
import ppo
import reward
import sft
from common import batch_indices, shard
from data.formats import encode_rows
from data.raters import Raters, preference_pairs
from data.tasks import demonstrations, training_questions
from data.tokenizer import get_tokenizer
from model import GPT, GPTConfig, left_pad
from pretrain import NEW_MODEL_CONTEXT, Config as PretrainConfig

STEPS = 6  # timed steps per stage, after WARMUP
WARMUP = 2


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_gflops(device, m, k, n, dtype, repeat=10):
    """Best GFLOP/s of an (m, k) @ (k, n) matmul."""
    a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best * 1e-9


def step_flops(cfg, shapes, head_positions):
    """Model FLOPs of forward + backward of one model over its (B, T) micro-batches, whose lm head is
    applied at head_positions positions in all (0 for a scalar head)."""
    C, L = cfg.n_embd, cfg.n_layer
    trunk = sum(6 * B * T * 12 * L * C * C + 6 * B * L * T * T * C for B, T in shapes)
    return trunk + 6 * head_positions * cfg.vocab_size * C


def stage_steps(cfg, tok, device):
    """{stage: (models, make_batch, loss)}. make_batch() -> (inputs, the (rows, T) of each forward pass,
    real tokens, lm-head positions of each model); loss(*inputs) -> the step's loss, as the stage
    computes it."""
    rng = random.Random(0)
    lm = GPT(cfg).to(device)
    rm = reward.scalar_model(lm)

    def pretrain_batch():
        x = torch.randint(0, cfg.vocab_size, (32, cfg.block_size + 1), device=device)
        return (x[:, :-1], x[:, 1:]), [(32, cfg.block_size)], 32 * cfg.block_size, (32 * cfg.block_size,)

    rows = [dict(prompt=p, completion=c) for p, c in demonstrations(512, seed=0)]
    demos = [sft.example(p, c) for p, (c,) in encode_rows(tok, rows, ("completion",), cfg.block_size)[0]]

    def sft_batch(groups=sft.Config.length_groups):  # a random batch, as sft.py draws it and cuts it up by length
        parts = [sft.collate(items, tok.pad_id, device) for items, _ in
                 shard(rng.sample(demos, 32), 0, lambda e: len(e[0]), groups)]
        targets = sum(int((y != kernels.IGNORE_INDEX).sum()) for _, y in parts)
        return ((parts, targets), [tuple(x.shape) for x, _ in parts], sum(int((x != tok.pad_id).sum()) for x, _ in parts),
                (targets,))  # the lm head: responses only

    def sft_step_loss(parts, targets):
        return sum(sft.sft_loss(lm, x, y) * (y != kernels.IGNORE_INDEX).sum() / targets for x, y in parts)

    rows = preference_pairs(300, 4, Raters(), seed=0)
    rm_pairs = reward.encode_pairs(tok, rows, cfg.block_size)[0]
    rm_order = batch_indices([max(len(c), len(r)) for c, r, _ in rm_pairs], reward.Config.batch_size, rng)  # as reward.py batches

    def reward_batch():
        pairs = [rm_pairs[j] for j in next(rm_order)]
        seqs = [c for c, _, _ in pairs] + [r for _, r, _ in pairs]
        return (pairs,), [(len(seqs), max(map(len, seqs)))], sum(map(len, seqs)), (sum(len(c) - n for c, _, n in pairs),)

    def reward_loss(pairs):  # Bradley-Terry, and the lm loss on the chosen responses (--lm_coef 1, the default)
        seqs = [c for c, _, _ in pairs] + [r for _, r, _ in pairs]
        r, lm_loss = reward.rewards(rm, seqs, tok.pad_id, device, lm_prompts=[n for _, _, n in pairs])
        r = r.float()
        return reward.bradley_terry_loss(r[:len(pairs)], r[len(pairs):]) + reward.Config.lm_coef * lm_loss

    dpo_pairs = dpo.encode_pairs(tok, rows, cfg.block_size)[0]

    def dpo_batch(groups=dpo.Config.length_groups):  # a random batch, as dpo.py draws it and cuts it up by length
        parts = [items for items, _ in shard(rng.sample(dpo_pairs, 32), 0, dpo.pair_length, groups)]
        shapes = [(2 * len(items), max(len(x) for pair in items for x, _ in pair)) for items in parts]
        targets = sum(sum(t != kernels.IGNORE_INDEX for t in y) for items in parts for pair in items for _, y in pair)
        real = sum(len(x) for items in parts for pair in items for x, _ in pair)
        return (parts,), shapes, real, (targets,)  # the lm head: responses only

    def dpo_step_loss(parts):
        loss = 0.0
        for pairs in parts:
            chosen, rejected = dpo.batch_logps(lm, pairs, tok.pad_id, device, "sigmoid")
            ref = torch.zeros_like(chosen)
            loss = loss + dpo.dpo_loss(chosen, rejected, ref, ref, 0.5, "sigmoid", 0.1)[0].sum() / 32
        return loss

    questions = [q.prompt for q in training_questions(256, seed=0)]
    R = ppo.Config().max_new_tokens
    value_model = reward.scalar_model(lm)

    def ppo_batch():
        idx, start = left_pad([tok.encode(p) for p in rng.sample(questions, 16)], tok.pad_id, device)
        seqs = torch.cat([idx, torch.randint(0, cfg.vocab_size, (16, R), device=device)], dim=1)
        return (seqs, start, idx.size(1)), [tuple(seqs.shape)], int((seqs != tok.pad_id).sum()), (16 * R, 0)

    def ppo_loss(seqs, start, P):
        mask = torch.ones(seqs.size(0), R, device=device)
        logprobs = ppo.response_logprobs(lm, seqs, start, P, 1.0)
        pg_loss = ppo.policy_loss(logprobs, logprobs.detach() - 0.01, torch.randn_like(logprobs), mask, 0.2)[0]
        values = ppo.response_values(value_model, seqs, start, P).float()
        return pg_loss + ppo.value_loss(values, values.detach() + 0.1, torch.randn_like(values), mask, 0.2)

    return {
        "pretrain": ((lm,), pretrain_batch, lambda x, y: lm(x, y)[1]),
        "sft": ((lm,), sft_batch, sft_step_loss),
        "sft/1": ((lm,), lambda: sft_batch(1), sft_step_loss),  # one padded pass a batch: --length_groups 1
        "reward": ((rm,), reward_batch, reward_loss),
        "dpo": ((lm,), dpo_batch, dpo_step_loss),
        "dpo/1": ((lm,), lambda: dpo_batch(1), dpo_step_loss),
        "ppo": ((lm, value_model), ppo_batch, ppo_loss),
    }


def test_train_benchmark(device):
    tok = get_tokenizer("builtin")
    p = PretrainConfig()
    cfg = GPTConfig(block_size=p.block_size or NEW_MODEL_CONTEXT, vocab_size=tok.n_vocab, n_layer=p.n_layer, n_head=p.n_head, n_embd=p.n_embd)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    autocast = torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda")
    peak = max(matmul_gflops(device, 2048, 2048, 2048, dtype) for _ in range(2))
    narrow = matmul_gflops(device, 32 * cfg.block_size, cfg.n_embd, 4 * cfg.n_embd, dtype)
    print(f"\n{device}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, {dtype}; model: {cfg.n_layer} layers, "
          f"{cfg.n_head} heads, n_embd {cfg.n_embd}, vocab {cfg.vocab_size}, random weights")
    print(f"matmul peak (2048^3): {peak:.1f} GFLOP/s; the model's widest matmul ({32 * cfg.block_size}x{cfg.n_embd} @ "
          f"{cfg.n_embd}x{4 * cfg.n_embd}): {narrow:.1f} GFLOP/s ({narrow / peak:.0%} of peak)\n")
    print(f"{'stage':<8} | {'rows x T':>8} | {'padding':>7} | {'ms/step':>7} | {'tokens/s':>8} | {'GFLOP/s':>7} | "
          f"{'MFU':>5} | {'of narrow':>9} | {'useful MFU':>10}")
    t0 = time.time()
    for name, (models, make_batch, loss_fn) in stage_steps(cfg, tok, device).items():
        opt = torch.optim.AdamW([p for m in models for p in m.parameters()], lr=1e-4, fused=True)  # as the stages
        timed = [make_batch() for _ in range(STEPS)]
        # the warm-up steps run the timed batches themselves: on a GPU every new length bucket
        # autotunes the attention kernels, which must not fall inside the timing
        batches = [make_batch() for _ in range(WARMUP)] + timed + timed
        for i, (inputs, *_) in enumerate(batches):
            if i == WARMUP + STEPS:
                sync(device)
                t = time.perf_counter()
            with autocast:
                loss = loss_fn(*inputs)
            loss.backward()
            for m in models:
                torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync(device)
        dt = (time.perf_counter() - t) / STEPS
        positions = sum(B * T for _, shapes, _, _ in timed for B, T in shapes)
        real = sum(n for _, _, n, _ in timed)
        flops = sum(step_flops(cfg, shapes, head) for _, shapes, _, heads in timed for head in heads)
        gflops = flops / STEPS / dt * 1e-9
        rows, T = sum(B for B, _ in timed[0][1]), max(T for _, shapes, _, _ in timed for _, T in shapes)
        print(f"{name:<8} | {f'{rows}x{T}':>8} | {1 - real / positions:>7.0%} | {dt * 1e3:>7.0f} | {real / STEPS / dt:>8.0f} | "
              f"{gflops:>7.1f} | {gflops / peak:>5.0%} | {gflops / narrow:>9.0%} | {gflops / peak * real / positions:>10.0%}",
              flush=True)
    print(f"rows x T: all rows of a step, by the longest; padding: share of positions that are padding; tokens/s: real "
          f"tokens only; useful MFU: MFU without the padding's FLOPs; sft/1, dpo/1: one padded pass a batch (--length_groups 1) ({time.time() - t0:.0f} s)")


def test_gpt2_step(device):
    """On a GPU: one SFT step (sft.sft_loss, every position a target) of GPT-2 small (124M,
    T = 1024, vocabulary 50257, random weights, bf16 autocast) with the Triton kernels and with the
    PyTorch path (RLHF_KERNELS=torch), in the same run: what the fused attention and log-probs buy
    a real-size model, in time and in memory."""
    if device.type != "cuda":
        import pytest
        pytest.skip("GPT-2 small takes minutes a step on one CPU thread")
    import os
    cfg = GPTConfig(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768)
    B, T = 16, cfg.block_size
    peak = max(matmul_gflops(device, 8192, 8192, 8192, torch.bfloat16) for _ in range(2))
    print(f"\nGPT-2 small SFT step, B={B} T={T}, bf16 autocast; matmul peak (8192^3) {peak / 1e3:.0f} TFLOP/s")
    print(f"{'kernels':<8} | {'ms/step':>7} | {'tokens/s':>9} | {'TFLOP/s':>7} | {'MFU':>5} | {'peak GB':>7}")
    model = GPT(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, cfg.vocab_size, (B, T + 1), device=device)
    saved = os.environ.get("RLHF_KERNELS")
    try:
        for mode in ("triton", "torch"):
            os.environ["RLHF_KERNELS"] = mode
            for i in range(WARMUP + STEPS):
                if i == WARMUP:
                    sync(device)
                    torch.cuda.reset_peak_memory_stats()
                    t = time.perf_counter()
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = sft.sft_loss(model, x[:, :-1], x[:, 1:])
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
            sync(device)
            dt = (time.perf_counter() - t) / STEPS
            tflops = step_flops(cfg, [(B, T)], B * T) / dt * 1e-12
            print(f"{mode:<8} | {dt * 1e3:>7.1f} | {B * T / dt:>9.0f} | {tflops:>7.0f} | {tflops * 1e3 / peak:>5.0%} | "
                  f"{torch.cuda.max_memory_allocated() / 1e9:>7.2f}", flush=True)
    finally:
        if saved is None:
            os.environ.pop("RLHF_KERNELS", None)
        else:
            os.environ["RLHF_KERNELS"] = saved
