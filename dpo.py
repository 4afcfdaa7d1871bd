"""
Direct Preference Optimization (DPO): the policy learns from preference pairs directly, with no
reward model and no sampling during training.

    python dpo.py                            # out/sft + built-in rated pairs -> out/dpo (about 2.5 minutes on 2 CPU cores)
    python dpo.py --data prefs.jsonl         # your preference pairs instead (formats: data/formats.py)
    python dpo.py --loss_type ipo --beta 0.5 # a variant (see dpo_loss)

Rafailov et al. 2023 ("Direct Preference Optimization: Your Language Model is Secretly a Reward
Model") show that the policy maximising reward - beta * KL(policy || reference) defines its own
reward, r(x, y) = beta * log pi(y|x) / pi_ref(y|x) (up to a term in x alone, which cancels in a
pair). Putting that reward into the Bradley-Terry likelihood of the labels gives a loss on the
policy alone:
    loss = -log sigmoid(beta * ((log pi(chosen) - log pi(rejected)) - (log ref(chosen) - log ref(rejected))))
where a log-prob is summed over the response tokens. Variants, all in `dpo_loss`:
- conservative DPO (cDPO, Mitchell 2023, "A note on DPO with noisy preferences"): label_smoothing eps
  assumes that share of labels flipped; the loss is the expectation over the two labels;
- IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
  Preferences"): a squared loss that pulls the margin to 1/(2 beta) instead of pushing it without
  end. The paper's h uses whole-sequence log-probs; here they are averaged over the response
  tokens, as TRL does on its authors' advice, so beta is on a per-token scale;
- hinge (the calibration loss of SLiC, Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration
  with Human Feedback", on the margin against the reference, as RSO, Liu et al. 2023, uses it):
  relu(1 - beta * margin).

Details written out below: chosen and rejected responses of a batch go through the model in one
forward pass; the reference is the init model before its first update, so its log-probs are
computed once, before training, for each distinct response (a prompt's pairs share theirs), and no
second model is ever held; dropout is off.
By default the pairs are exactly reward.py's (same raters, prompts, SFT samples, seeds and held-out
split), so DPO's held-out reward accuracy compares with the reward model's, and eval.py compares
DPO with PPO on the same labels.

The defaults (beta 0.5, cDPO with eps 0.1, 2 epochs at lr 1e-4) were tuned on the built-in task,
whose raters are noisy (a label agrees with the raters' own preference about 83% of the time: the
Bayes rate) and like long answers. Plain DPO at beta 0.1 learned that taste on an earlier version
of the pairs: its answers grew padding until they no longer stopped, and the gold score fell by
half. A larger beta and label smoothing both bound how far one pair pushes (the cDPO loss of a pair
is smallest at beta * m = log((1 - eps) / eps), not at infinity). On the default pairs (14k, the
reward model's) it reaches held-out reward accuracy 0.76, 0.925 of the Bayes rate (the reward
model: 0.74, 0.89 of it), and gold 0.645 against SFT's 0.608 (KL 0.31; README). About 2.5 minutes
on a 2-core CPU: sampling the SFT model for the pairs (as reward.py does), the reference
log-probs, then 871 steps, each batch in length-sorted micro-batches (--length_groups).
Left out on purpose: an SFT loss term on the chosen responses (RPO), sampling fresh pairs from the
policy during training (online DPO), reference-free variants (SimPO, ORPO), and the many other loss
types of TRL's DPOTrainer.
"""

import random
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import common
from data.formats import encode_rows, preference_rows, split_by_prompt
from data.raters import Raters, accuracy_report, model_sampler, preference_pairs
from data.tasks import eval_questions
from data.tokenizer import tokenizer_for
from model import complete, load_checkpoint, save_checkpoint
from sft import collate, example, target_logprobs

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


@dataclass
class Config(Raters, common.Padded):  # the raters' biases are flags too, with reward.py's defaults: the same pairs
    init: str = "out/sft"
    """the policy to fine-tune, and the frozen reference (a language model, or a Hugging Face GPT-2 directory)"""
    out_dir: str = "out/dpo"
    """where the fine-tuned checkpoint is written"""
    data: str = ""
    """preference pairs: prompt/chosen/rejected, HH-RLHF transcripts or OpenAI rows (.jsonl, .jsonl.gz, .json); empty: the built-in rated pairs"""
    n_prompts: int = 3000
    """built-in training prompts to rate pairs for (as in reward.py)"""
    pairs_per_prompt: int = 6
    """rated pairs per prompt (as in reward.py)"""
    sft_samples: int = 2
    """samples from the init model per prompt, added to the scripted candidates (as in reward.py)"""
    val_fraction: float = 0.1
    """share of the prompts whose pairs are held out for reward accuracy (as in reward.py: the same held-out pairs)"""
    beta: float = 0.5
    """strength of the implicit KL penalty: the implicit reward is beta * log pi / pi_ref"""
    loss_type: str = "sigmoid"
    """sigmoid (DPO, cDPO with label_smoothing), ipo, or hinge (SLiC)"""
    label_smoothing: float = 0.1
    """cDPO: the assumed share of flipped labels, in [0, 0.5); the sigmoid loss only (ipo and hinge ignore it)"""
    epochs: float = 2.0
    """passes over the training pairs"""
    batch_size: int = 32
    """pairs per step (2 * batch_size sequences in the forward pass)"""
    lr: float = 1e-4
    """peak learning rate (linear warm-up, linear decay)"""
    warmup_steps: int = 10
    """steps of linear warm-up (0: none)"""
    grad_clip: float = 1.0
    """clip the gradient norm to this (0: off)"""
    log_every: int = 10
    """steps between printed log lines (metrics.jsonl has every step's)"""
    eval_every: int = 100
    """steps between evaluations of the held-out pairs (each logged with its step, as are the first and the last)"""
    n_samples: int = 4
    """held-out prompts answered before and after training"""
    seed: int = 0
    """seed of pairs, labels, split and order (as in reward.py)"""
    device: str = "auto"
    """auto, cpu, cuda, ..."""
    dtype: str = "auto"
    """auto (bfloat16 on a CUDA card that has it, else float32), float32, bfloat16 (float16 is refused: no loss scaling)"""

# -----------------------------------------------------------------------------
# the loss


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
             loss_type="sigmoid", label_smoothing=0.0):
    """Per-pair losses and implicit rewards. Every argument is a tensor [B] of response log-probs:
    summed over the response tokens for sigmoid and hinge, AVERAGED over them for ipo (the caller's
    job: see batch_logps). With the log-ratio margin
        m = (pi_chosen - pi_rejected) - (ref_chosen - ref_rejected):
    sigmoid: -(1 - eps) log sigmoid(beta m) - eps log sigmoid(-beta m)   (DPO; cDPO for eps > 0)
    ipo:     (m - 1 / (2 beta))^2                                          (IPO, Azar et al. eq. 17)
    hinge:   relu(1 - beta m)                                              (SLiC)
    label_smoothing (eps) is read by the sigmoid loss only.
    Returns (losses [B], chosen_rewards [B], rejected_rewards [B]), where a reward is
    beta * (policy - reference) log-prob, detached: DPO's implicit reward, for logging."""
    margin = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)
    elif loss_type == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * margin)
    else:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, not {loss_type!r}")
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards

# -----------------------------------------------------------------------------
# data and log-probs


def built_in_pairs(cfg, model, tok, device):
    """reward.py's built-in pairs: scripted candidates plus the init model's samples, rated by the
    raters, with the same seeds (raters, sampler) and so the very same rows."""
    raters = Raters(cfg.quality, cfg.length, cfg.flattery, cfg.confidence)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    return preference_pairs(cfg.n_prompts, cfg.pairs_per_prompt, raters, cfg.seed,
                            model_sampler(model, tok, cfg.sft_samples, gen))


def encode_pairs(tok, rows, block_size):
    """Each pair as two sft.example (ids, targets): prompt + response + EOS, the targets
    IGNORE_INDEX on the prompt, so only the response tokens count. Fit to the context as every
    stage does (formats.fit): returns (pairs, the rows kept, a line with the counts)."""
    encoded, kept, report = encode_rows(tok, rows, ("chosen", "rejected"), block_size)
    return [tuple(example(p, r) for r in responses) for p, responses in encoded], kept, report


def sequence_logps(model, x, y):
    """log pi(response | prompt) of each row: the sum of the target tokens' log-probs, and the
    number of response tokens. x, y: (B, T) right-padded, y = IGNORE_INDEX on prompt and padding."""
    logps, mask = target_logprobs(model, x, y)  # (N,): the lm head at the response tokens only
    return logps.new_zeros(mask.shape).masked_scatter(mask, logps).sum(-1), mask.sum(-1)


def example_logps(model, examples, pad_id, device, loss_type):
    """The log-prob of each (x, y) example's response, in one forward pass, right-padded: summed over
    the response tokens, or averaged over them for IPO."""
    logps, n_tokens = sequence_logps(model, *collate(examples, pad_id, device))
    return (logps / n_tokens if loss_type == "ipo" else logps).float()


def batch_logps(model, pairs, pad_id, device, loss_type):
    """(chosen [B], rejected [B]) log-probs of a batch of encoded pairs, in one forward pass: the
    chosen rows and then the rejected rows, right-padded together into one (2B, T) batch."""
    logps = example_logps(model, [c for c, _ in pairs] + [r for _, r in pairs], pad_id, device, loss_type)
    return logps[:len(pairs)], logps[len(pairs):]


def pair_length(pair):
    """The padded length a pair (two sft.example) needs: chosen and rejected share one batch."""
    return max(len(pair[0][0]), len(pair[1][0]))


def distinct_responses(pairs):
    """Every pair's chosen and rejected example, each distinct one once (a prompt's pairs share their
    candidates: half the sequences of the built-in pairs), shortest first; and where: pair i's chosen
    is responses[where[2 i]], its rejected responses[where[2 i + 1]]."""
    return common.distinct([e for pair in pairs for e in pair], hashable=lambda e: tuple(map(tuple, e)),
                           key=lambda e: len(e[0]))


@torch.no_grad()
def response_logps(model, responses, pad_id, device, loss_type, autocast, batch_size=128):
    """example_logps of every (x, y) example, without gradients, batch_size at a time (responses in
    order of length pad little): the reference's, once before training, and the held-out pairs' at
    each evaluation. Under torchrun each process computes every N-th batch, and the processes add up
    their shares (each entry is one process's, the rest 0), so that N processes take 1/N of the time."""
    logps = torch.zeros(len(responses), device=device)
    for i in range(common.rank() * batch_size, len(responses), common.world_size() * batch_size):
        with autocast:
            logps[i:i + batch_size] = example_logps(model, responses[i:i + batch_size], pad_id, device, loss_type)
    return common.all_reduce(logps)


def main(cfg):
    if cfg.loss_type not in LOSS_TYPES:
        raise common.UserError(f"--loss_type must be one of {', '.join(LOSS_TYPES)}, not {cfg.loss_type!r}")
    if cfg.beta <= 0:
        raise common.UserError(f"--beta must be positive, got {cfg.beta}")
    if not 0 <= cfg.label_smoothing < 0.5:
        raise common.UserError(f"--label_smoothing must be in [0, 0.5), got {cfg.label_smoothing}")
    t_start = time.time()
    # before any work: a directory that is not a checkpoint, or one this run reads, would be lost
    common.check_out_dir(cfg.out_dir, reads={"--init": cfg.init})
    common.seed_everything(cfg.seed)
    device, autocast = common.setup_device(cfg.device, cfg.dtype)
    common.check_batch(cfg.batch_size, cfg.micro_batch_size)
    model, info = load_checkpoint(cfg.init, head="lm", device=device)
    tok = tokenizer_for(info, cfg.init)
    # dropout off throughout: policy and reference log-probs must differ by the weights alone.
    # (eval() switches nothing else in this GPT; gradients flow as usual.)
    model.eval()

    t0 = time.time()
    if cfg.data:
        rows = preference_rows(cfg.data)
    else:
        with autocast:
            rows = built_in_pairs(cfg, model, tok, device)
    val_rows, train_rows = split_by_prompt(rows, cfg.val_fraction, cfg.seed)  # as reward.py: the same held-out pairs
    val_prompts = list(dict.fromkeys(r["prompt"] for r in val_rows))  # in their shuffled order, each once
    train, _, report = encode_pairs(tok, train_rows, model.config.block_size)
    print(f"training pairs: {report}")
    val, val_rows, report = encode_pairs(tok, val_rows, model.config.block_size)
    print(f"held-out pairs: {report}")
    steps = max(1, round(cfg.epochs * len(train) / cfg.batch_size))
    print(f"{len(train)} training and {len(val)} held-out pairs ({time.time() - t0:.1f}s to make), {steps} steps")

    # the reference: the init model before its first update. Its log-probs never change, so they
    # are computed here, once, and the training below changes the same weights in place.
    t0 = time.time()
    seqs_per_pass = 2 * (cfg.micro_batch_size or 64)  # without gradients: a micro-batch's chosen and rejected

    def pair_logps(responses, where):  # (chosen [N], rejected [N]) log-probs of every pair, without gradients
        logps = response_logps(model, responses, tok.pad_id, device, cfg.loss_type, autocast, seqs_per_pass)
        return logps[where.to(device)].view(-1, 2).T

    val_responses = distinct_responses(val)  # scored again at each evaluation
    ref_train, ref_val = pair_logps(*distinct_responses(train)), pair_logps(*val_responses)
    print(f"reference log-probs of {len(train) + len(val)} pairs in {time.time() - t0:.1f}s")

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0, fused=True)

    def lr_at(step):
        return cfg.lr * min((step + 1) / max(1, cfg.warmup_steps), (steps - step) / max(1, steps - cfg.warmup_steps))

    @torch.no_grad()
    def evaluate():
        """Loss, reward accuracy and margin on the held-out pairs, and each pair's margin."""
        chosen, rejected = pair_logps(*val_responses)
        losses, r_chosen, r_rejected = dpo_loss(chosen, rejected, *ref_val, cfg.beta, cfg.loss_type, cfg.label_smoothing)
        losses, margins = losses.tolist(), (r_chosen - r_rejected).tolist()
        return {"val_loss": sum(losses) / len(val), "val_accuracy": sum(m > 0 for m in margins) / len(val),
                "val_margin": sum(margins) / len(val)}, margins

    sample_prompts = [q.prompt for q in eval_questions()[:cfg.n_samples]] if not cfg.data else val_prompts[:cfg.n_samples]
    before = complete(model, tok, sample_prompts, 32, temperature=0)

    def meta(metrics):
        return {**tok.identity, "stage": "dpo", "parent": cfg.init, "args": asdict(cfg), "metrics": metrics}

    def loss_part(items):  # a micro-batch's share of the batch's mean loss, and its diagnostics summed
        with autocast:
            chosen, rejected = batch_logps(train_model, [train[i] for i in items], tok.pad_id, device, cfg.loss_type)
        losses, r_chosen, r_rejected = dpo_loss(chosen, rejected, ref_train[0][items], ref_train[1][items], cfg.beta,
                                                cfg.loss_type, cfg.label_smoothing)
        margins = r_chosen - r_rejected
        stats = dict(accuracy=(margins > 0).sum(), margin=margins.sum(), chosen_reward=r_chosen.sum(),
                     rejected_reward=r_rejected.sum(), logp_chosen=chosen.detach().sum(), logp_rejected=rejected.detach().sum())
        return losses.mean() * len(items) / len(idx), stats

    logger = common.Logger()
    rng = random.Random(cfg.seed)
    train_model = common.DataParallel(model)  # under torchrun: gradients averaged over processes
    state = common.TrainState(cfg, "dpo", optimizers={"adamw": optimizer}, rngs={"order": rng},
                              data=common.data_summary(train) if cfg.data else None)  # built in: sampled again (README)
    first, extra = state.restore(model, logger) if cfg.resume else (0, {"order": []})
    order = extra["order"]  # the rest of this epoch's shuffle
    t_last, tokens = time.time(), 0
    for step in range(first, steps):
        if len(order) < cfg.batch_size:  # a fresh shuffle of the training pairs for each epoch
            order += rng.sample(range(len(train)), len(train))
        idx, order = order[:cfg.batch_size], order[cfg.batch_size:]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss, sums = common.accumulate(train_model, common.shard(idx, cfg.micro_batch_size, lambda i: pair_length(train[i]), cfg.length_groups), loss_part)
        stats = {k: v / len(idx) for k, v in sums.items()}
        common.check_finite(loss, step, cfg.out_dir)
        common.clip_gradients(model, cfg.grad_clip, step, cfg.out_dir)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += sum(len(c[0]) + len(r[0]) for c, r in (train[i] for i in idx))

        # every step's numbers go to metrics.jsonl (the fall of the chosen log-prob is a trend over
        # steps); one line in log_every is printed, and every step that evaluates the held-out pairs
        evaluating = step % cfg.eval_every == 0 or step == steps - 1
        row = dict(step=step, loss=loss.item(), **stats, lr=lr_at(step), tok_per_s=round(tokens / (time.time() - t_last)))
        if evaluating:
            held_out = evaluate()  # (scores, margins); the last step's is the trained model's
            row.update(held_out[0])
        logger.log(echo=step % cfg.log_every == 0 or evaluating, **row)
        if state.due(step, steps):
            save_checkpoint(cfg.out_dir, model, meta({"steps_done": step + 1}), logger.rows,
                            resume=state.capture(step + 1, order=order))
        t_last, tokens = time.time(), 0  # tok_per_s: the training step alone, without evaluation or saving

    after = complete(model, tok, sample_prompts, 32, temperature=0)
    print("held-out prompts, before -> after DPO:")
    for p, b, a in zip(sample_prompts, before, after):
        print(f"  {p!r}\n    init: {b!r}\n    dpo:  {a!r}")
    scores, margins = held_out  # evaluated after the last step: these very weights
    metrics = {**scores, "train_loss": loss.item(), "steps": steps, "train_pairs": len(train), "val_pairs": len(val)}
    if all("p_chosen" in r for r in val_rows):  # the built-in raters: DPO's implicit reward against the Bayes rate
        report, lines = accuracy_report(val_rows, margins)
        metrics.update(report)
        print("held-out pairs, the implicit reward beta * log pi / pi_ref:\n" + "\n".join(lines))
    metrics["wall_s"] = round(time.time() - t_start, 1)
    save_checkpoint(cfg.out_dir, model, meta(metrics), logger.rows)
    summary = {k: v for k, v in metrics.items() if k != "by_kind"}  # the table by kind is printed above
    print(f"wrote {cfg.out_dir}: {summary}")


if __name__ == "__main__":
    common.run(main, Config)
