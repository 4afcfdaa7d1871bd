"""
Reward model: the GPT with a scalar head, trained on pairwise preferences (Bradley-Terry).

    python reward.py                         # out/sft + built-in rated pairs -> out/rm (about 2 minutes on 2 CPU cores)
    python reward.py --data prefs.jsonl      # your preference pairs instead (formats: data/formats.py)
    python reward.py --flattery 3            # raters who love flattery (see data/raters.py)

The reward model reads prompt + response + <|endoftext|> and gives one number, read at the last
token (the EOS). Trained so that the chosen response of each pair scores higher:
    loss = -log sigmoid(r(chosen) - r(rejected))
the Bradley-Terry likelihood of the raters' choices (InstructGPT, Ouyang et al. 2022; Stiennon et
al. 2020). Details written out below: the trunk starts from the SFT model, the head from a small
normal (std 1/sqrt(n_embd + 1)), dropout is off, the learning rate stays constant after its warm-up,
the model kept is the moving average of the trained weights (its held-out accuracy is what is logged),
and at the end the reward is normalised (a gain and a bias in config.json) so that the SFT model's own
responses score mean 0 and std 1: PPO's KL coefficient then means the same whatever the RM.

On the built-in task the pairs come from simulated raters whose taste is known, so the report
compares the held-out accuracy with the Bayes rate, the best any reward model could reach.
Beside the Bradley-Terry loss, a language-model loss on the chosen responses (--lm_coef, weight 1;
Yang et al. 2024, "Regularizing Hidden States Enables Learning Generalizable Reward Model for LLMs"):
the trunk keeps predicting good answers, which is what tells a right answer from a wrong one here.
Without it, the reward model learns the raters' taste in style but loses the facts it started from:
on the README's SFT model (the chain of commit 1830281) it held out 0.742 and 0.755 of the Bayes
rate (seeds 0, 1), with it 0.874 and 0.845, in the same time (RESULTS.md).
Left out on purpose: ensembles, margins in the loss (Llama 2), multiple heads.
"""

import copy
import itertools
import math
import random
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import common
import kernels
from data.formats import check_out_file, encode_rows, preference_rows, split_by_prompt, write_rows
from data.raters import Raters, accuracy_report, model_sampler, preference_pairs
from data.tasks import training_questions
from data.tokenizer import tokenizer_for
from model import GPT, GPTConfig, complete_ids, fit_prompt, load_checkpoint, load_state, save_checkpoint


@dataclass
class Config(Raters, common.Batched):  # the raters' biases (quality, length, flattery, confidence) are flags too
    init: str = "out/sft"
    """the language model whose trunk the reward model starts from (or a Hugging Face GPT-2 directory)"""
    out_dir: str = "out/rm"
    """where the reward model is written"""
    data: str = ""
    """preference pairs: prompt/chosen/rejected, HH-RLHF transcripts or OpenAI rows (.jsonl, .jsonl.gz, .json); empty: the built-in rated pairs"""
    n_prompts: int = 3000
    """built-in training prompts to rate pairs for"""
    pairs_per_prompt: int = 6
    """rated pairs per prompt"""
    sft_samples: int = 2
    """samples from the init model per prompt, added to the scripted candidates (as InstructGPT did)"""
    pairs_out: str = ""
    """write the pairs as JSONL here ({"prompt", "chosen", "rejected"}, and the raters' p_chosen and kind), for --data of any stage"""
    val_fraction: float = 0.1
    """share of the prompts whose pairs are held out for accuracy"""
    epochs: float = 2.0
    """passes over the training pairs"""
    batch_size: int = 16
    """pairs per step (16: twice the updates of 32; held-out accuracy +0.03 / +0.05 on one SFT model, -0.02 on another, with --lm_coef 0: RESULTS.md)"""
    lr: float = 3e-4
    """learning rate (after a linear warm-up, constant)"""
    warmup_steps: int = 10
    """steps of linear warm-up (0: none)"""
    lm_coef: float = 1.0
    """weight of a language-model loss on the chosen responses beside the Bradley-Terry loss (0: none; GRM, Yang et al. 2024)"""
    ema: float = 0.99
    """the reward model is the moving average of the trained weights, this much of it kept per step (0: the last weights)"""
    grad_clip: float = 1.0
    """clip the gradient norm to this (0: off)"""
    norm_prompts: int = 256
    """prompts whose SFT responses set the reward's normalisation"""
    log_every: int = 20
    """steps between log lines"""
    eval_every: int = 100
    """steps between evaluations of the held-out pairs (each logged with its step, as are the first and the last)"""
    seed: int = 0
    """seed of pairs, labels, order and head"""
    device: str = "auto"
    """auto, cpu, cuda, ..."""
    dtype: str = "auto"
    """auto (bfloat16 on a CUDA card that has it, else float32), float32, bfloat16 (float16 is refused: no loss scaling)"""


def scalar_model(lm):
    """A reward/value model: lm's trunk with a fresh scalar head in place of the lm head."""
    rm = GPT(GPTConfig(**{**asdict(lm.config), "head": "scalar", "dropout": 0.0}))
    state = {**lm.state_dict(), "score.weight": rm.score.weight.detach().clone()}
    load_state(rm, state, "the trunk of the init model")
    return rm.to(lm.transformer.wte.weight.device)


def encode_pairs(tok, rows, block_size):
    """[(chosen ids, rejected ids, prompt length)]: prompt + response + EOS, fit to the context as
    every stage does (formats.fit). Returns (pairs, the rows kept, a line with the counts)."""
    encoded, kept, report = encode_rows(tok, rows, ("chosen", "rejected"), block_size)
    return [(p + c, p + r, len(p)) for p, (c, r) in encoded], kept, report


def rewards(rm, seqs, pad_id, device, lm_prompts=()):
    """The reward of each sequence (a list of ids), read at its last token. lm_prompts: the prompt
    lengths of the first len(lm_prompts) sequences; then it returns (rewards, the mean
    language-model loss of those sequences' response tokens, through the tied embedding)."""
    T = max(len(s) for s in seqs)
    idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    targets = torch.full((len(seqs), T), kernels.IGNORE_INDEX, dtype=torch.long)
    for i, s in enumerate(seqs):
        idx[i, :len(s)] = torch.tensor(s)
    for i, n in enumerate(lm_prompts):  # position t predicts token t + 1: from the prompt's last token on
        targets[i, n - 1:len(seqs[i]) - 1] = idx[i, n:len(seqs[i])]
    values, lm_loss = rm(idx.to(device), targets.to(device) if lm_prompts else None)  # (B, T), right padded
    last = torch.tensor([len(s) - 1 for s in seqs], device=device)
    r = values.gather(1, last[:, None]).squeeze(1)
    return (r, lm_loss) if lm_prompts else r


def normalisation(scores):
    """{"gain", "bias"} that take these rewards (of the SFT model's own responses) to mean 0 and std 1:
    PPO reads gain * r + bias, so that its KL coefficient keeps one meaning whatever the scale."""
    mean, std = scores.mean().item(), scores.std().item()
    if not 0 < std < math.inf:  # before anything is written: PPO would take a NaN or infinite gain from config.json
        raise common.UserError(f"the {len(scores)} SFT responses that normalise the reward score {mean:.4g} ± {std:.4g}: "
                               f"the reward cannot be scaled to std 1 (a reward model that scores everything alike: more --norm_prompts?)")
    return {"gain": 1 / std, "bias": -mean / std}


def bradley_terry_loss(r_chosen, r_rejected):
    """-log P(chosen > rejected) under Bradley-Terry: the negative log-likelihood of the labels."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def main(cfg):
    if cfg.lm_coef < 0:
        raise common.UserError(f"--lm_coef must be 0 (off) or more, got {cfg.lm_coef}")
    if not 0 <= cfg.ema < 1:
        raise common.UserError(f"--ema must be in [0, 1), got {cfg.ema}")
    if cfg.norm_prompts < 2:  # the normalisation divides by the spread of their responses' scores
        raise common.UserError(f"--norm_prompts must be at least 2, got {cfg.norm_prompts}")
    if cfg.pairs_out:
        check_out_file(cfg.pairs_out, "--pairs_out", reads={"--data": cfg.data})
    # before any work: a directory that is not a checkpoint, or one this run reads, would be lost
    common.check_out_dir(cfg.out_dir, reads={"--init": cfg.init})
    common.seed_everything(cfg.seed)
    device, autocast = common.setup_device(cfg.device, cfg.dtype)
    common.check_batch(cfg.batch_size, cfg.micro_batch_size)
    sft, info = load_checkpoint(cfg.init, head="lm", device=device)
    sft.eval()
    tok = tokenizer_for(info, cfg.init)
    raters = Raters(cfg.quality, cfg.length, cfg.flattery, cfg.confidence)

    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    # the passes without gradients are no larger than a training micro-batch: the evaluation scores
    # --micro_batch_size pairs' worth of sequences at a time, the normalisation that many responses
    eval_batch = cfg.micro_batch_size or 64

    t0 = time.time()
    if cfg.data:
        rows = preference_rows(cfg.data)
    else:  # candidates: the scripted styles plus the SFT model's own answers
        with autocast:
            rows = preference_pairs(cfg.n_prompts, cfg.pairs_per_prompt, raters, cfg.seed,
                                    model_sampler(sft, tok, cfg.sft_samples, gen))
    if cfg.pairs_out and common.is_main():  # the very pairs trained on and held out, in the file format every stage reads
        write_rows(cfg.pairs_out, rows)
        print(f"wrote the {len(rows)} pairs to {cfg.pairs_out}")
    val_rows, train_rows = split_by_prompt(rows, cfg.val_fraction, cfg.seed)
    train, train_rows, report = encode_pairs(tok, train_rows, sft.config.block_size)
    print(f"training pairs: {report}")
    val, val_rows, report = encode_pairs(tok, val_rows, sft.config.block_size)
    print(f"held-out pairs: {report}")
    # each distinct held-out response scored once (a prompt's candidates meet in several pairs), in batches of similar length
    val_seqs, val_where = common.distinct([s for c, r, _ in val for s in (c, r)], key=len)
    val_where = val_where.to(device)
    # the prompts whose SFT responses normalise the reward at the end, each cut from the left if need
    # be to leave room for its response (model.fit_prompt), as ppo.py cuts the prompts it samples from
    room = min(48, sft.config.block_size // 2)
    if cfg.data:  # the first distinct training prompts
        norm_prompts = list(itertools.islice(dict.fromkeys(r["prompt"] for r in train_rows), cfg.norm_prompts))
    else:
        norm_prompts = [q.prompt for q in training_questions(cfg.norm_prompts, seed=cfg.seed + 1)]
    if len(norm_prompts) < 2:
        raise common.UserError(f"{cfg.data}: the reward's normalisation needs 2 distinct training prompts at least, "
                               f"found {len(norm_prompts)}")
    steps = max(1, round(cfg.epochs * len(train) / cfg.batch_size))
    print(f"{len(train)} training and {len(val)} held-out pairs ({time.time() - t0:.1f}s to make), {steps} steps")

    torch.manual_seed(cfg.seed)
    rm = scalar_model(sft)
    rm.train()
    # Adam's beta2 0.999, not the other stages' 0.95: 0.95 did no better here (RESULTS.md)
    optimizer = torch.optim.AdamW(rm.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.0, fused=True)
    # The learning rate does not decay (see lr_at), so the last weights wander: held-out accuracy
    # moved by 0.02-0.03 from one evaluation to the next. Their exponential moving average (Polyak
    # averaging) is the model evaluated and written; it lags the training by about 1 / (1 - ema) steps.
    # Its decay grows from 0.1 to cfg.ema over the first steps (min(ema, (1 + t) / (10 + t)), as
    # TensorFlow's ExponentialMovingAverage does), so that a short run does not keep its random head.
    ema = copy.deepcopy(rm).eval().requires_grad_(False) if cfg.ema > 0 else rm

    def lr_at(step):  # no decay: on the built-in pairs it stopped the learning of right from wrong halfway
        return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))

    @torch.no_grad()
    def evaluate():
        """Each held-out pair's margin r(chosen) - r(rejected). Under torchrun each process scores
        every N-th batch, and the shares are added up (each entry is one process's, the rest 0)."""
        training = ema.training
        ema.eval()
        scores = torch.zeros(len(val_seqs), dtype=torch.float64, device=device)  # float32 values exactly, a float64 model's too
        seqs_per_pass = 2 * eval_batch  # a micro-batch's chosen and rejected
        for i in range(common.rank() * seqs_per_pass, len(val_seqs), common.world_size() * seqs_per_pass):
            with autocast:
                scores[i:i + seqs_per_pass] = rewards(ema, val_seqs[i:i + seqs_per_pass], tok.pad_id, device)
        ema.train(training)
        scores = common.all_reduce(scores)
        return (scores[val_where[0::2]] - scores[val_where[1::2]]).tolist()

    def response_tokens(items):  # the chosen responses' tokens (with their EOS): the lm loss's targets
        return sum(len(c) - n for c, _, n in items)

    def loss_part(items):  # a micro-batch's share of the batch's mean loss, and its diagnostics summed
        with autocast:  # chosen and rejected in one forward pass
            seqs = [c for c, _, _ in items] + [r for _, r, _ in items]
            if cfg.lm_coef > 0:  # the chosen responses' lm loss too (GRM): it keeps what the trunk knows
                r, lm_loss = rewards(train_model, seqs, tok.pad_id, device, lm_prompts=[n for _, _, n in items])
            else:
                r, lm_loss = rewards(train_model, seqs, tok.pad_id, device), torch.zeros(())
            r = r.float()
            r_chosen, r_rejected = r[:len(items)], r[len(items):]
            # Bradley-Terry is a mean over the batch's pairs, the lm loss over its chosen responses' tokens
            lm_share = response_tokens(items) / response_tokens(batch)
            loss = bradley_terry_loss(r_chosen, r_rejected) * len(items) / len(batch) + cfg.lm_coef * lm_loss * lm_share
        return loss, {"correct": (r_chosen > r_rejected).sum(), "margin": (r_chosen - r_rejected).sum(),
                      "lm_loss": lm_loss.detach() * lm_share}

    logger = common.Logger()
    batches = common.batch_indices([max(len(c), len(r)) for c, r, _ in train], cfg.batch_size, random.Random(cfg.seed))
    train_model = common.DataParallel(rm)  # under torchrun: gradients averaged over processes
    state = common.TrainState(cfg, "reward", optimizers={"adamw": optimizer}, generators={"sampler": gen},
                              models={"ema": ema} if ema is not rm else {},
                              data=common.data_summary(train) if cfg.data else None)  # built in: sampled again (README)
    first = 0
    if cfg.resume:
        first, _ = state.restore(rm, logger)
        for _ in range(first):  # the data position: batch_indices replayed from its seed
            next(batches)
    for step in range(first, steps):
        batch = [train[i] for i in next(batches)]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss, sums = common.accumulate(train_model, common.shard(batch, cfg.micro_batch_size), loss_part)
        common.check_finite(loss, step, cfg.out_dir)
        common.clip_gradients(rm, cfg.grad_clip, step, cfg.out_dir)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not rm:
            with torch.no_grad():
                decay = min(cfg.ema, (1 + step) / (10 + step))
                torch._foreach_lerp_(list(ema.parameters()), list(rm.parameters()), 1 - decay)
        evaluating = step % cfg.eval_every == 0 or step == steps - 1
        if step % cfg.log_every == 0 or evaluating:
            row = dict(step=step, loss=loss.item(), accuracy=sums["correct"] / len(batch), margin=sums["margin"] / len(batch),
                       lr=lr_at(step))
            if cfg.lm_coef > 0:
                row["lm_loss"] = sums["lm_loss"]
            if evaluating:
                margins = evaluate()
                row.update(val_accuracy=sum(m > 0 for m in margins) / len(margins), val_margin=sum(margins) / len(margins))
            logger.log(**row)
        if state.due(step, steps):
            save_checkpoint(cfg.out_dir, rm, {**tok.identity, "stage": "reward", "parent": cfg.init, "args": asdict(cfg),
                                              "metrics": {"steps_done": step + 1}}, logger.rows, resume=state.capture(step + 1))

    # held-out accuracy, overall and by kind of pair, against the Bayes rate of the raters
    rm = ema.eval()  # from here on, the reward model is the average
    # margins: the held-out evaluation of the last step, after its update (the last step always evaluates)
    metrics = {"val_accuracy": sum(m > 0 for m in margins) / len(margins), "val_margin": sum(margins) / len(margins),
               "val_pairs": len(val), "train_pairs": len(train)}
    if all("p_chosen" in r for r in val_rows):  # the built-in raters: the Bayes rate is known
        report, lines = accuracy_report(val_rows, margins)
        metrics.update(report)
        print("\n".join(lines))

    # normalise: the SFT model's own responses score mean 0, std 1. Sampled 256 prompts at a time; from
    # a file, --micro_batch_size at a time if set (256 prompts of 1024 tokens fill 80 GB of GPT-2 XL's
    # cache), which draws other samples of the same distribution. The built-in prompts are short:
    # their samples, and so the gain and bias, never depend on that flag.
    sample_batch = cfg.micro_batch_size if cfg.data and cfg.micro_batch_size else 256
    with autocast:
        responses = complete_ids(sft, tok, norm_prompts, room, batch_size=sample_batch, leave_room=True, temperature=1.0,
                                 generator=gen)
    with torch.no_grad(), autocast:
        seqs = [fit_prompt(tok.encode_prompt(p), sft.config.block_size, room) + r for p, r in zip(norm_prompts, responses)]
        scores = torch.cat([rewards(rm, seqs[i:i + eval_batch], tok.pad_id, device).float() for i in range(0, len(seqs), eval_batch)])
    metrics["reward_norm"] = normalisation(scores)
    metrics["wall_s"] = round(time.time() - logger.t0, 1)
    print(f"held-out accuracy {metrics['val_accuracy']:.3f}" + (
        f" (Bayes rate {metrics['bayes_accuracy']:.3f}, ratio {metrics['accuracy_over_bayes']:.3f}; expected over the raters' "
        f"draws {metrics['expected_accuracy']:.3f}, ratio {metrics['expected_over_bayes']:.3f})" if "bayes_accuracy" in metrics else "")
        + f"; SFT responses score {scores.mean():.3f} ± {scores.std():.3f} before normalisation")
    save_checkpoint(cfg.out_dir, rm, {**tok.identity, "stage": "reward", "parent": cfg.init, "args": asdict(cfg),
                                      "metrics": metrics, "reward_norm": metrics["reward_norm"]}, logger.rows)
    print(f"wrote {cfg.out_dir}")


if __name__ == "__main__":
    common.run(main, Config)
