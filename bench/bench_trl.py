"""
Benchmark against TRL: the same DPO and reward-model training steps through TRL's DPOTrainer and
RewardTrainer and through this project's own code, on the same model, weights, data and batches.

    OMP_NUM_THREADS=1 python -m pytest bench/bench_trl.py -s

Skipped, with the reason, unless `trl` and `transformers` are installed (neither is a requirement of
this project). The setup is issue #11's: a GPT-2 of n_embd 128, 4 layers, 4 heads and GPT-2's
vocabulary (50257), random weights; steps of 16 pairs whose sequences (prompt + response + EOS) are
about 128 tokens long; float32, on a CPU pinned to one thread (see conftest.py).
- Weights: a transformers.GPT2LMHeadModel is built from a GPT2Config and saved with save_pretrained;
  both sides load that directory (GPT.from_pretrained here, from_pretrained there), so both start
  from the very same tensors. The reward model is GPT2ForSequenceClassification (num_labels 1) there
  and reward.scalar_model here, with the same score vector copied into both.
- Data: random token ids (the built-in pairs are about 30 tokens long, in a vocabulary of 1139):
  prompts of 88 to 104 tokens, responses of 24 to 40 with the EOS, id 0 reserved for padding. TRL
  tokenizes text, so every id i is written as the word "t{i}" and a word-level tokenizer maps it back;
  the test checks that TRL's tokenized rows are exactly ours. Both sides take the pairs in the same
  order (TRL's train_sampling_strategy "sequential"), 16 per step.
- The steps: ours is dpo.batch_logps + dpo.dpo_loss (sigmoid, no label smoothing: TRL's sigmoid loss
  has none) and reward.rewards + reward.bradley_terry_loss, on all 16 pairs in one padded pass (dpo.py
  would cut a batch into length groups; these sequences differ little in length, 112 to 144 tokens), then
  backward, clip_grad_norm_ (1.0), AdamW (betas 0.9, 0.95) and zero_grad, as dpo.py runs them, except
  that the stages' AdamW is fused since commit 6f9d2a8 and both sides here keep the for-loop. TRL's
  is Trainer's step with the same optimizer (optim "adamw_torch" = torch.optim.AdamW), clipping and
  betas, and its own loss, metrics and lm head: DPOTrainer's chunked lm head computes, besides the
  log-probs, each response token's entropy, mean logit and top-1 hit for its metrics, in every step.
  Both lm heads run at the response tokens only.
- What TRL is told, so that it does no work we do not: report_to "none", no evaluation, no saving,
  no logging, dataloader_num_workers 0, max_steps fixed, float32 (bf16 False and
  gradient_checkpointing False: TRL's defaults are True for both), dropout off. DPO runs twice: with
  precompute_ref_log_probs=True, which is what dpo.py does (the reference log-probs computed once
  before training: the fair comparison), and with TRL's default False (a reference model's forward
  pass in every step).
- What is counted: only training steps, WARMUP untimed steps first. TRL's time is the sum over the
  timed steps of on_step_begin -> on_step_end (a TrainerCallback): forward, loss, backward, clipping,
  optimizer, scheduler and zero_grad; it excludes fetching and collating the batch, tokenization,
  the precomputed reference log-probs and all setup. Ours is timed the same way, per step, and
  includes collating the batch (a few ms); the reference log-probs are computed before (excluded).
- A TRL trainer that fails to train (an API difference) is reported in its row. Checks before
  timing, which fail the test: the DPO loss of one batch through TRL's
  compute_loss, with a reference model of other weights (so the loss is not log 2), against ours,
  within 1e-4; the same for the reward model's Bradley-Terry loss, and its rewards.
- PPO: TRL 1.16 has no PPOTrainer (trl.PPOTrainer is gone, and trl.experimental has none): the
  table says so.
About 4 minutes on one thread, most of it in TRL's DPO steps.
"""

import os
import random
import time

import pytest
import torch

import dpo
import reward
from model import GPT
from sft import example

N_EMBD, N_LAYER, N_HEAD, VOCAB = 128, 4, 4, 50257
PAIRS = 16  # pairs per step
WARMUP, STEPS = 1, 3  # untimed, then timed steps
BETA, LR = 0.1, 1e-5
PAD, EOS = 0, VOCAB - 1


def synthetic_pairs(n, seed=0):
    """n (prompt ids, chosen ids, rejected ids); the responses end with EOS, no id is PAD or EOS
    elsewhere. A sequence (prompt + response) is 112 to 144 tokens, 128 on average."""
    rng = random.Random(seed)

    def ids(lo, hi):
        return [rng.randrange(1, EOS) for _ in range(rng.randint(lo, hi))]
    return [(ids(88, 104), ids(23, 39) + [EOS], ids(23, 39) + [EOS]) for _ in range(n)]


def word_tokenizer():
    """A transformers tokenizer that maps the word "t{i}" to id i: TRL takes text, this turns our ids
    into text and back exactly. PAD is "<pad>", EOS "<|endoftext|>" (GPT-2's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": PAD, **{f"t{i}": i for i in range(1, EOS)}, "<|endoftext|>": EOS}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>")


def as_text(ids):
    return "".join(f" t{i}" if i != EOS else " <|endoftext|>" for i in ids)


def hf_gpt2(path, seed):
    """A GPT2LMHeadModel with random weights (seed), no dropout, saved to path."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=N_EMBD, n_layer=N_LAYER, n_head=N_HEAD,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                    bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD))
    hf.save_pretrained(path)
    return path


def step_timer():
    """A TrainerCallback that records the seconds of every optimizer step."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.t)
    return StepTimer()


def trl_args(cls, out_dir, **kwargs):
    """TRL's config with everything we do not do turned off, float32, our optimizer and batch."""
    return cls(output_dir=out_dir, per_device_train_batch_size=PAIRS, max_steps=WARMUP + STEPS,
               learning_rate=LR, lr_scheduler_type="constant", optim="adamw_torch", adam_beta1=0.9,
               adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0, bf16=False, fp16=False,
               gradient_checkpointing=False, use_cpu=True, report_to="none", eval_strategy="no",
               save_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
               dataloader_pin_memory=False, train_sampling_strategy="sequential", seed=0, **kwargs)


def time_ours(model, step, batches):
    """Seconds of each step(batch) + backward + clip + AdamW + zero_grad, as dpo.py and reward.py run them."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.0)
    seconds = []
    for batch in batches:
        t = time.perf_counter()
        loss = step(*batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - t)
    return seconds


def failure(e):
    """One line about an exception, for the table."""
    return f"failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"


def batches_of(items):
    return [items[i:i + PAIRS] for i in range(0, len(items), PAIRS)]


def test_trl_benchmark(device, tmp_path):
    if device.type != "cpu":
        pytest.skip("written for the CPU (float32, one thread); TRL's trainers pick their own device")
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    trl = pytest.importorskip("trl", reason="trl is not installed")
    import datasets
    from datasets import Dataset
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel, PrinterCallback
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer
    os.environ.setdefault("TQDM_DISABLE", "1")  # TRL's reference log-probs loop
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    tmp = str(tmp_path)
    policy_dir = hf_gpt2(os.path.join(tmp, "policy"), seed=0)
    other_dir = hf_gpt2(os.path.join(tmp, "other"), seed=1)  # a reference of other weights, for the loss check
    tok = word_tokenizer()
    pairs = synthetic_pairs(PAIRS * (WARMUP + STEPS))
    lengths = [len(p) + len(r) for p, c, rj in pairs for r in (c, rj)]
    print(f"\n{device}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, transformers "
          f"{transformers.__version__}, trl {trl.__version__}, float32")
    print(f"model: GPT-2 config, {N_LAYER} layers, {N_HEAD} heads, n_embd {N_EMBD}, vocab {VOCAB}, "
          f"{sum(p.numel() for p in GPT.from_pretrained(policy_dir)[0].parameters()):,} parameters, random weights; "
          f"{PAIRS} pairs per step, sequences of {min(lengths)} to {max(lengths)} tokens "
          f"(mean {sum(lengths) / len(lengths):.0f}); {WARMUP} warm-up + {STEPS} timed steps per row")
    rows = []  # (stage, impl, seconds per step, note)

    # ------------------------------------------------------------------ DPO
    encoded = [(example(p, c), example(p, r)) for p, c, r in pairs]  # as dpo.encode_pairs makes them
    dataset = Dataset.from_list([dict(prompt=as_text(p), chosen=as_text(c), rejected=as_text(r)) for p, c, r in pairs])

    def dpo_trainer(precompute, ref_model=None, callbacks=()):
        args = trl_args(DPOConfig, os.path.join(tmp, "dpo"), beta=BETA, loss_type=["sigmoid"], max_length=None,
                        precompute_ref_log_probs=precompute, precompute_ref_batch_size=PAIRS)
        trainer = DPOTrainer(model=GPT2LMHeadModel.from_pretrained(policy_dir), ref_model=ref_model, args=args,
                             train_dataset=dataset, processing_class=tok, callbacks=list(callbacks))
        trainer.remove_callback(PrinterCallback)  # it prints the run's summary at the end
        return trainer

    # check: the same rows, and the same loss on one batch with a reference of other weights
    check = dpo_trainer(False, GPT2LMHeadModel.from_pretrained(other_dir))
    trl_rows = [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in check.train_dataset]
    assert trl_rows == [tuple(x) for x in pairs], "TRL tokenized the pairs differently"
    batch = check.data_collator([check.train_dataset[i] for i in range(PAIRS)])
    with torch.no_grad():
        trl_loss = check.compute_loss(check.model, batch).item()
        policy, other = GPT.from_pretrained(policy_dir)[0], GPT.from_pretrained(other_dir)[0]
        chosen, rejected = dpo.batch_logps(policy, encoded[:PAIRS], PAD, device, "sigmoid")
        ref_chosen, ref_rejected = dpo.batch_logps(other, encoded[:PAIRS], PAD, device, "sigmoid")
        our_loss = dpo.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, BETA, "sigmoid", 0.0)[0].mean().item()
    print(f"check, DPO loss of one batch with a reference of other weights: TRL {trl_loss:.6f}, ours {our_loss:.6f}")
    assert abs(trl_loss - our_loss) < 1e-4, (trl_loss, our_loss)

    # ours: the reference is the policy before its first update, its log-probs computed once (not timed)
    policy = GPT.from_pretrained(policy_dir)[0].to(device).eval()  # eval: dropout off (it is 0 anyway)
    responses, where = dpo.distinct_responses(encoded)  # as dpo.py scores its reference: each response once
    logps = dpo.response_logps(policy, responses, PAD, device, "sigmoid", torch.autocast("cpu", enabled=False), 2 * PAIRS)
    ref = logps[where].view(-1, 2).T  # (chosen [N], rejected [N])

    def dpo_step(batch, ref_chosen, ref_rejected):
        chosen, rejected = dpo.batch_logps(policy, batch, PAD, device, "sigmoid")
        return dpo.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, BETA, "sigmoid", 0.0)[0].mean()
    seconds = time_ours(policy, dpo_step, list(zip(batches_of(encoded), batches_of(ref[0]), batches_of(ref[1]))))
    rows.append(("dpo", "ours: dpo.py step (ref log-probs precomputed)", sum(seconds[WARMUP:]) / STEPS, ""))

    for precompute, name in ((True, "TRL DPOTrainer, precompute_ref_log_probs=True"),
                             (False, "TRL DPOTrainer, precompute_ref_log_probs=False (ref forward per step)")):
        timer = step_timer()
        try:
            trainer = dpo_trainer(precompute, callbacks=[timer])
            trainer.train()
            rows.append(("dpo", name, sum(timer.seconds[WARMUP:]) / STEPS, ""))
        except Exception as e:  # an API difference: say so, and go on with the rest
            rows.append(("dpo", name, None, failure(e)))

    # ------------------------------------------------------------------ reward model
    rm_pairs = [(p + c, p + r) for p, c, r in pairs]  # as reward.encode_pairs makes them
    rm_dataset = Dataset.from_list([dict(chosen_ids=c, rejected_ids=r) for c, r in rm_pairs])  # TRL takes ids here
    rm = reward.scalar_model(GPT.from_pretrained(policy_dir)[0]).to(device).eval()

    def hf_rm():
        m = GPT2ForSequenceClassification.from_pretrained(policy_dir, num_labels=1, pad_token_id=PAD)
        with torch.no_grad():
            m.score.weight.copy_(rm.score.weight)  # the same head as ours
        return m

    def rm_step(batch):
        r = reward.rewards(rm, [s for pair in batch for s in pair], PAD, device).float()  # chosen, rejected, ...
        return reward.bradley_terry_loss(r[0::2], r[1::2])

    def rm_trainer(callbacks=()):
        trainer = RewardTrainer(model=hf_rm(), args=trl_args(RewardConfig, os.path.join(tmp, "rm"), max_length=None),
                                train_dataset=rm_dataset, processing_class=tok, callbacks=list(callbacks))
        trainer.remove_callback(PrinterCallback)
        return trainer

    check = rm_trainer()
    batch = check.data_collator([check.train_dataset[i] for i in range(PAIRS)])
    with torch.no_grad():
        trl_loss = check.compute_loss(check.model, batch).item()
        trl_rewards = check.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
        ours = reward.rewards(rm, [c for c, _ in rm_pairs[:PAIRS]] + [r for _, r in rm_pairs[:PAIRS]], PAD, device)
        our_loss = rm_step(rm_pairs[:PAIRS]).item()
    print(f"check, reward-model loss of one batch: TRL {trl_loss:.6f}, ours {our_loss:.6f}; largest reward "
          f"difference {(trl_rewards - ours).abs().max().item():.1e}")
    assert abs(trl_loss - our_loss) < 1e-4, (trl_loss, our_loss)
    torch.testing.assert_close(trl_rewards, ours, rtol=1e-4, atol=1e-4)

    seconds = time_ours(rm, rm_step, [(b,) for b in batches_of(rm_pairs)])
    rows.append(("reward", "ours: reward.py step", sum(seconds[WARMUP:]) / STEPS, ""))
    timer = step_timer()
    try:
        rm_trainer(callbacks=[timer]).train()
        rows.append(("reward", "TRL RewardTrainer", sum(timer.seconds[WARMUP:]) / STEPS, ""))
    except Exception as e:
        rows.append(("reward", "TRL RewardTrainer", None, failure(e)))

    # ------------------------------------------------------------------ PPO
    if hasattr(trl, "PPOTrainer"):
        rows.append(("ppo", "TRL PPOTrainer", None, "exists in this trl, but is not benchmarked here yet"))
    else:
        rows.append(("ppo", "TRL PPOTrainer", None, f"skipped: trl {trl.__version__} has no PPOTrainer"))

    # ------------------------------------------------------------------ the table
    print(f"\nthreads after training: {torch.get_num_threads()}")
    print(f"{'stage':<6} | {'impl':<68} | {'pairs/s':>7} | {'ms/step':>7} | {'ratio (ours / TRL)':>18}")
    ours_rate = {}
    for stage, impl, dt, note in rows:
        if dt is None:
            print(f"{stage:<6} | {impl:<68} | {note}")
            continue
        rate = PAIRS / dt
        if impl.startswith("ours"):
            ours_rate[stage] = rate
            ratio = ""
        else:
            ratio = f"{ours_rate[stage] / rate:.1f}x"
        print(f"{stage:<6} | {impl:<68} | {rate:>7.2f} | {dt * 1e3:>7.0f} | {ratio:>18}", flush=True)
