"""
PPO against the reward model, with a per-token KL penalty to the frozen SFT model: step 3 of RLHF.

    python ppo.py                            # out/sft + out/rm -> out/ppo (about 3 minutes on 2 CPU cores)
    python ppo.py --kl_coef 0 --out_dir out/ppo_nokl     # no leash: watch the reward get hacked
    python ppo.py --adaptive_kl --target_kl 2            # Ziegler et al.'s adaptive KL controller

Each iteration:
1. rollout: sample a response to each prompt of a batch from the policy (KV cache, plain
   temperature sampling so the samples follow the policy's own distribution), cut at the EOS;
2. score: the reward model's (normalised) score of each prompt + response, minus a fixed penalty
   when the response never emitted an EOS;
3. per-token reward: -kl_coef * KL estimate (by default log pi - log pi_ref; --kl_estimator) on
   every response token, plus the score on the last one;
4. advantages: GAE over the response tokens with the value model's estimates (a separate network,
   a copy of the reward model at the start, read through the same gain and bias), then whitened;
5. learn: several epochs of minibatches on the clipped surrogate policy loss and the clipped value loss.
The algorithm is Schulman et al. 2017 as used for language models by Ziegler et al. 2019, Stiennon
et al. 2020 and Ouyang et al. 2022; every detail of "The N Implementation Details of RLHF with PPO"
(Huang et al. 2024) that matters here is written out below, with a comment saying why.
Under torchrun each process samples its share of the rollout batch (its sampler seeded by its
rank), advantages are whitened and diagnostics averaged over every process's responses, and each
gradient step averages the processes' minibatch gradients (DDP): a minibatch's mean is over its
own tokens on each process, so with N > 1 the tokens weigh slightly differently than alone.
A minibatch whose importance ratio exceeds --max_ratio (or is not finite) takes no step: it is
counted in the log (skipped) instead of pulling the policy off a cliff, and its losses stay out of
the iteration's means (null where every minibatch was skipped, as is a ratio that is not finite).
The log's first_ratio is the token ratio farthest from 1 in the iteration's first minibatch: the
policy has not moved yet, so it must be 1 (a recomputation that differs from the rollout's, a
temperature or mask mistake, shows).
`--reward gold --value out/rm` scores the rollouts with the built-in task's judge (eval.py's gold
score) instead of the reward model: an oracle with no errors to exploit, which separates what PPO
does from what the reward model lets it do. The gold score's spread on SFT's samples is about 0.42,
against 1 for the normalised reward, so --kl_coef 0.08 keeps about the default's balance between
score and KL. (--missing_eos_penalty is not rescaled; the judge itself already docks a response
that does not stop.) The judge is otherwise for evaluation only: no default stage trains on it.
Left out on purpose: an entropy bonus, a shared policy/value trunk, the pre-training loss mix
(PPO-ptx), and generation and training in separate processes.
"""

import math
import random
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import common
import kernels
from data.formats import prompt_rows
from data.judge import gold_score
from data.tasks import training_questions
from data.tokenizer import tokenizer_for
from model import fit_prompt, left_pad, load_checkpoint, save_checkpoint


@dataclass
class Config(common.Resumable):  # and --save_every, --resume (common.py): here a step is an iteration
    policy: str = "out/sft"
    """the policy's starting point, also the frozen reference of the KL penalty (or a Hugging Face GPT-2 directory)"""
    reward: str = "out/rm"
    """the reward model (also the value model's starting point); gold: the built-in task's judge itself, an oracle (needs --value)"""
    value: str = ""
    """the value model's starting point, a scalar-head checkpoint (empty: --reward)"""
    out_dir: str = "out/ppo"
    """where the trained policy is written"""
    data: str = ""
    """prompts: {"prompt"} or chat rows, or the prompts of any SFT or preference file (formats: data/formats.py); empty: the built-in training prompts"""
    iterations: int = 100
    """rollout-and-learn iterations"""
    rollout_batch: int = 64
    """prompts (one response each) per iteration"""
    generation_batch: int = 0
    """prompts sampled at once, each with its KV cache (0: the process's whole share of --rollout_batch); lower it if sampling runs out of memory (other draws, the same distribution)"""
    max_new_tokens: int = 24
    """the longest response; a response cut here has no EOS"""
    temperature: float = 1.0
    """sampling temperature; log-probs are computed at the same temperature"""
    kl_coef: float = 0.2
    """weight of the KL penalty in the per-token reward"""
    kl_estimator: str = "k1"
    """k1: log pi - log pi_ref (unbiased); k3: (r - 1) - log r with r = pi_ref / pi (unbiased, never negative)"""
    adaptive_kl: bool = False
    """adapt kl_coef to keep the KL near target_kl (Ziegler et al. 2019)"""
    target_kl: float = 2.0
    """the adaptive controller's target KL per response"""
    kl_horizon: int = 10_000
    """the adaptive controller's horizon in responses"""
    missing_eos_penalty: float = 1.0
    """subtracted from the score of a response without an EOS"""
    whiten_rewards: bool = False
    """scale the per-token rewards to unit variance per batch"""
    ppo_epochs: int = 4
    """passes over each rollout batch"""
    minibatch_size: int = 16
    """responses per gradient step, and per forward pass when the rollouts are scored (lower it if those run out of memory)"""
    clip_range: float = 0.2
    """PPO's clip of the probability ratio"""
    max_ratio: float = 100.0
    """skip (and count) a minibatch step whose largest token probability ratio pi / pi_old exceeds this (1e9: only an infinite or NaN one)"""
    vf_clip_range: float = 0.2
    """clip of the value prediction around its rollout value"""
    gamma: float = 1.0
    """discount"""
    lam: float = 0.95
    """GAE lambda"""
    lr: float = 1e-5
    """policy learning rate (peak)"""
    value_lr: float = 1e-4
    """value model learning rate (peak)"""
    warmup_iterations: int = 5
    """iterations of linear warm-up (0: none), then linear decay to zero"""
    grad_clip: float = 1.0
    """clip each model's gradient norm to this (0: off)"""
    seed: int = 0
    """seed of prompts, sampling and minibatches"""
    device: str = "auto"
    """auto, cpu, cuda, ..."""
    dtype: str = "auto"
    """auto (bfloat16 on a CUDA card that has it, else float32), float32, bfloat16 (float16 is refused: no loss scaling)"""

# -----------------------------------------------------------------------------
# the pieces of PPO, each a small function that the tests check against a hand computation


def response_mask(responses, eos_id):
    """(length, has_eos, mask) of sampled responses (B, R): each ends at its first EOS, which it keeps,
    or at R when it has none (truncated at max_new_tokens). mask (B, R) is 1.0 on its tokens."""
    is_eos = responses == eos_id
    has_eos = is_eos.any(1)
    R = responses.size(1)
    length = torch.where(has_eos, is_eos.int().argmax(1) + 1, R)
    return length, has_eos, (torch.arange(R, device=responses.device)[None] < length[:, None]).float()


def last_token_values(values, P, length):
    """values (B, P + R) read at each response's last token, position P - 1 + length: its EOS, or the
    last token of a response cut at max_new_tokens. It is where the reward model scores the text."""
    return values.gather(1, (P - 1 + length)[:, None]).squeeze(1)


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def global_masked_mean(x, mask):
    """masked_mean over the entries of every process (under torchrun): the batch as one."""
    return common.all_reduce((x * mask).sum()) / common.all_reduce(mask.sum()).clamp(min=1)


def whiten(x, mask, shift_mean=True):
    """Normalise x to zero mean and unit variance over the masked entries (0 elsewhere), of every
    process's rollouts. shift_mean=False keeps the mean (used for rewards: their sign matters)."""
    mean = global_masked_mean(x, mask)
    var = global_masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_estimate(logprobs, ref_logprobs, estimator):
    """Per-token estimate of KL(pi || pi_ref) from the sampled tokens (Schulman's k1 and k3)."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio  # (r - 1) - log r, r = pi_ref / pi
    raise ValueError(f"kl_estimator must be k1 or k3, not {estimator!r}")


def per_token_rewards(kl, scores, mask, kl_coef):
    """-kl_coef * KL on every response token, plus the score on the last one; 0 after it.
    kl, mask: (B, R); scores: (B,)."""
    rewards = -kl_coef * kl * mask
    last = mask.sum(1).long() - 1  # index of the last response token (the EOS, if there is one)
    return rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))


def gae(rewards, values, mask, gamma, lam):
    """Generalized advantage estimation (Schulman et al. 2016) over the response tokens.
    rewards, values, mask: (B, R); the state after the last token is terminal (value 0).
    Returns (advantages, returns), 0 where mask is 0."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    next_advantage, next_value = 0.0, 0.0
    for t in reversed(range(rewards.size(1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_range):
    """PPO's clipped surrogate: mean over tokens of max(-A r, -A clip(r, 1 - eps, 1 + eps))."""
    ratio = torch.exp(logprobs - old_logprobs)
    losses = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range))
    clipfrac = masked_mean(((ratio - 1).abs() > clip_range).float(), mask)
    return masked_mean(losses, mask), ratio, clipfrac


def value_loss(values, old_values, returns, mask, clip_range):
    """Clipped value loss: 0.5 * max((V - R)^2, (V_clipped - R)^2), V clipped around its rollout value."""
    clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


def farthest_from_one(ratio, mask):
    """The importance ratio farthest from 1 among the masked tokens of every process: on the first
    minibatch of an iteration it must be exactly 1. (A mean would let errors of both signs cancel.)"""
    ratio = torch.where(mask > 0, ratio.detach().float(), 1.0)
    hi, lo = common.all_reduce(ratio.max(), "max"), -common.all_reduce(-ratio.min(), "max")
    return (hi if hi - 1 >= 1 - lo else lo).item()


class AdaptiveKLController:
    """Ziegler et al. 2019: nudge the coefficient so that the KL tracks a target."""

    def __init__(self, kl_coef, target, horizon):
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, kl, n_responses):
        error = max(-0.2, min(0.2, kl / self.target - 1))
        self.value *= 1 + error * n_responses / self.horizon

# -----------------------------------------------------------------------------
# the models' views of a batch of prompt + response sequences


def rollout(policy, idx, start, max_new_tokens, temperature, tok, generator, generation_batch=0):
    """Sample a response to each left-padded prompt of idx (B, P): (B, P + R) prompts then responses,
    pad_id after a response's EOS. In passes of generation_batch prompts (0: all at once), each
    padded on the right to the longest, since a pass stops early when all its responses ended."""
    n = generation_batch or idx.size(0)
    parts = [policy.generate(idx[i:i + n], max_new_tokens, start=start[i:i + n], temperature=temperature,
                             eos_id=tok.eot_id, pad_id=tok.pad_id, generator=generator) for i in range(0, idx.size(0), n)]
    width = max(p.size(1) for p in parts)
    return torch.cat([F.pad(p, (0, width - p.size(1)), value=tok.pad_id) for p in parts])


def response_hidden(model, seqs, start, P):
    """Final hidden states at the positions that predict the response tokens: (B, R, C).
    seqs: (B, P + R) left-padded prompts then responses; position P - 1 + i predicts token P + i."""
    return model.hidden_states(seqs, start=start)[:, P - 1:-1]


def response_logprobs(model, seqs, start, P, temperature):
    """log pi(response token) for every response position, at the sampling temperature: (B, R).
    Through the fused kernel: on a GPU the (B, R, vocab) logits are never materialised."""
    h = response_hidden(model, seqs, start, P)
    return kernels.fused_linear_logprobs(h, model.transformer.wte.weight, seqs[:, P:], temperature)


IDENTITY = {"gain": 1.0, "bias": 0.0}


def response_values(value_model, seqs, start, P, norm=IDENTITY):
    """The value model's estimate of each state before a response token: (B, R). norm: the gain and
    bias of the reward model it started from, so that it starts on the scale of the normalised
    rewards whose returns it learns (Ziegler et al. 2019 start it from the reward model, its
    normalisation included); without them its first estimates would be off by the raw reward's
    mean, and GAE would hand that error to the last tokens of every response."""
    values, _ = value_model(seqs, start=start)
    return norm["gain"] * values[:, P - 1:-1] + norm["bias"]


def score_rollouts(policy, ref, value_model, rm, seqs, start, P, temperature, value_norm=IDENTITY):
    """What the rollouts seqs (B, P + R) look like to the four models, without gradients: the
    sampled tokens' log-probs under the policy and the reference (B, R), the full-vocabulary KL
    and entropy at each position (B, R), the value estimates (B, R; see response_values), and the
    reward model's raw values (B, P + R), None without one (the gold oracle)."""
    responses = seqs[:, P:]
    h, h_ref = response_hidden(policy, seqs, start, P), response_hidden(ref, seqs, start, P)
    # the same function as in the learning phase, so that the first ratio is exactly 1
    logprobs = kernels.fused_linear_logprobs(h, policy.transformer.wte.weight, responses, temperature)
    ref_logprobs = kernels.fused_linear_logprobs(h_ref, ref.transformer.wte.weight, responses, temperature)
    # the full-vocabulary KL and entropy, for the log (the KL estimate sees one token per position)
    logits = h @ policy.transformer.wte.weight.t() / temperature  # (B, R, V)
    ref_logits = h_ref @ ref.transformer.wte.weight.t() / temperature
    values = response_values(value_model, seqs, start, P, value_norm).float()
    rm_values = None if rm is None else rm(seqs, start=start)[0].float()
    return logprobs, ref_logprobs, kernels.kl_div(logits, ref_logits), kernels.entropy(logits), values, rm_values

# -----------------------------------------------------------------------------


def main(cfg):
    # --reward gold scores each rollout with the judge that eval.py reports, instead of a model of
    # the raters: an oracle without a reward model's errors, to tell PPO's limits from the RM's
    oracle = cfg.reward == "gold"
    if oracle and cfg.data:
        raise common.UserError("--reward gold judges the built-in prompts only: drop --data")
    if oracle and not cfg.value:
        raise common.UserError("--reward gold has no reward model to start the value model from: pass --value (e.g. out/rm)")
    if not cfg.temperature > 0:  # PPO samples its policy and divides the logits by it: no greedy decoding here
        raise common.UserError(f"--temperature must be positive, got {cfg.temperature}")
    if cfg.max_new_tokens < 1:
        raise common.UserError(f"--max_new_tokens must be at least 1, got {cfg.max_new_tokens}")
    if cfg.kl_estimator not in ("k1", "k3"):
        raise common.UserError(f"--kl_estimator must be k1 or k3, not {cfg.kl_estimator!r}")
    if cfg.adaptive_kl and not (cfg.target_kl > 0 and cfg.kl_horizon > 0):  # the controller divides by both
        raise common.UserError(f"--adaptive_kl needs --target_kl and --kl_horizon above 0, got {cfg.target_kl} and {cfg.kl_horizon}")
    # before any work: a directory that is not a checkpoint, or one this run reads, would be lost
    common.check_out_dir(cfg.out_dir, reads={"--policy": cfg.policy, "--reward": None if oracle else cfg.reward, "--value": cfg.value})
    common.seed_everything(cfg.seed)
    device, autocast = common.setup_device(cfg.device, cfg.dtype)
    common.check_batch(cfg.rollout_batch, None, "--rollout_batch")
    common.check_batch(cfg.minibatch_size, None, "--minibatch_size")
    if cfg.generation_batch < 0:
        raise common.UserError(f"--generation_batch must be 0 (all at once) or more, got {cfg.generation_batch}")
    if cfg.rollout_batch % cfg.minibatch_size:  # every gradient step averages over as many responses
        raise common.UserError(f"--rollout_batch {cfg.rollout_batch} is not a multiple of --minibatch_size {cfg.minibatch_size}")
    policy, info = load_checkpoint(cfg.policy, head="lm", device=device)
    tok = tokenizer_for(info, cfg.policy)
    ref, _ = load_checkpoint(cfg.policy, head="lm", tokenizer=tok.name, device=device)
    rm, rm_info = (None, {}) if oracle else load_checkpoint(cfg.reward, head="scalar", tokenizer=tok.name, device=device)
    # a separate network, started from the RM (or --value)
    value_model, value_info = load_checkpoint(cfg.value or cfg.reward, head="scalar", tokenizer=tok.name, device=device)
    for name, m in ((cfg.reward, rm), (cfg.value or cfg.reward, value_model)):  # each reads the policy's whole sequences
        if m is not None and m.config.block_size < policy.config.block_size:
            raise common.UserError(f"{name} has a context of {m.config.block_size} tokens, shorter than the policy "
                                   f"{cfg.policy}'s {policy.config.block_size}: it could not read every prompt + response")
    if not oracle and "reward_norm" not in rm_info:  # raw scores would upset the balance with the KL penalty
        raise common.UserError(f"{cfg.reward} has no reward normalisation (reward_norm in its config.json): a reward.py "
                               f"run that did not finish? Resume it with --resume")
    norm = IDENTITY if oracle else rm_info["reward_norm"]
    value_norm = value_info.get("reward_norm", IDENTITY)  # the value model's scale, from the reward model it starts as
    frozen = [ref] if oracle else [ref, rm]
    for m in (policy, value_model, *frozen):
        m.eval()  # dropout off everywhere: PPO's ratio must compare the same function
    for m in frozen:
        m.requires_grad_(False)
    if policy.config.block_size < cfg.max_new_tokens + 2:
        raise common.UserError(f"--max_new_tokens {cfg.max_new_tokens} leaves no room for a prompt in "
                               f"{cfg.policy}'s context of {policy.config.block_size}")

    if cfg.data:
        prompts = prompt_rows(cfg.data)
    else:  # training prompts of every kind, none from the evaluation set
        prompts = [q.prompt for q in training_questions(4000, seed=cfg.seed + 7)]
    if len(prompts) < cfg.rollout_batch:  # each iteration answers rollout_batch different prompts
        raise common.UserError(f"{cfg.data or 'the built-in training prompts'}: {len(prompts)} prompts, fewer than --rollout_batch {cfg.rollout_batch}")
    # a long prompt loses its start, as in every stage (data/formats.py, "Long examples")
    max_prompt = policy.config.block_size - cfg.max_new_tokens
    prompt_ids = [tok.encode_prompt(p) for p in prompts]
    print(f"{sum(len(p) > max_prompt for p in prompt_ids)} of {len(prompts)} prompts cut from the left to "
          f"{max_prompt} tokens: the context {policy.config.block_size} minus --max_new_tokens {cfg.max_new_tokens}")
    prompt_ids = [fit_prompt(p, policy.config.block_size, cfg.max_new_tokens) for p in prompt_ids]

    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    value_optimizer = torch.optim.AdamW(value_model.parameters(), lr=cfg.value_lr, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1000 * common.rank())  # each process its own samples
    rng = random.Random(cfg.seed)  # the same on every process: the same prompts, cut in shares
    minibatch = cfg.minibatch_size // common.world_size()  # this process's share of a minibatch
    logger = common.Logger()
    train_policy, train_value = common.DataParallel(policy), common.DataParallel(value_model)
    state = common.TrainState(cfg, "ppo", optimizers={"policy": optimizer, "value": value_optimizer},
                              generators={"sampler": gen}, rngs={"prompts": rng}, models={"value": value_model},
                              data=common.data_summary(prompt_ids))
    first = 0
    if cfg.resume:
        first, extra = state.restore(policy, logger)
        kl_ctl.value = extra["kl_coef"]

    for it in range(first, cfg.iterations):
        lr_scale = min((it + 1) / max(1, cfg.warmup_iterations), (cfg.iterations - it) / max(1, cfg.iterations - cfg.warmup_iterations))
        for opt, lr in ((optimizer, cfg.lr), (value_optimizer, cfg.value_lr)):
            for group in opt.param_groups:
                group["lr"] = lr * lr_scale

        # 1. rollout ----------------------------------------------------------------------------
        batch = rng.sample(range(len(prompts)), cfg.rollout_batch)
        batch = common.shard(batch, 0)[0][0]  # this process's share of the prompts
        batch_prompts = [prompts[i] for i in batch]
        idx, start = left_pad([prompt_ids[i] for i in batch], tok.pad_id, device)
        P = idx.size(1)
        with torch.no_grad(), autocast:
            seqs = rollout(policy, idx, start, cfg.max_new_tokens, cfg.temperature, tok, gen, cfg.generation_batch)
        responses = seqs[:, P:]  # (B, R); after an EOS: padding
        length, has_eos, mask = response_mask(responses, tok.eot_id)  # a response ends at its first EOS
        texts = [tok.decode(r[:n]) for r, n in zip(responses.tolist(), length.tolist())]
        gold = None if cfg.data else [gold_score(p, t) for p, t in zip(batch_prompts, texts)]  # the built-in judge

        # 2. score and 3. per-token reward -------------------------------------------------------
        with torch.no_grad(), autocast:
            # a minibatch at a time, as the learning phase takes them: the whole batch at once through
            # four models, with its (B, R, vocab) logits twice over, needs far more memory than a step
            parts = [score_rollouts(policy, ref, value_model, rm, seqs[i:i + minibatch], start[i:i + minibatch], P,
                                    cfg.temperature, value_norm) for i in range(0, seqs.size(0), minibatch)]
            old_logprobs, ref_logprobs, token_kl, token_entropy, old_values, rm_values = (
                None if x[0] is None else torch.cat(x) for x in zip(*parts))
            full_kl = (token_kl * mask).sum(1)
            entropy = masked_mean(token_entropy, mask)
            old_values = old_values * mask
            if oracle:
                raw_scores = torch.tensor(gold, device=device)
            else:
                raw_scores = last_token_values(rm_values, P, length)
            scores = norm["gain"] * raw_scores + norm["bias"]
            scores = scores - cfg.missing_eos_penalty * (~has_eos).float()  # a response must end
            kl = kl_estimate(old_logprobs, ref_logprobs, cfg.kl_estimator) * mask
            rewards = per_token_rewards(kl, scores, mask, kl_ctl.value)
            if cfg.whiten_rewards:
                rewards = whiten(rewards, mask, shift_mean=False)

            # 4. advantages ---------------------------------------------------------------------
            advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
            advantages = whiten(advantages, mask)  # one scale for every batch: stable step sizes

        # 5. learn: several epochs of minibatches over this batch ---------------------------------
        stats = {k: [] for k in ("pg_loss", "vf_loss", "approx_kl", "clipfrac", "ratio_mean", "ratio_max")}
        B, skipped = seqs.size(0), 0
        for epoch in range(cfg.ppo_epochs):
            order = torch.randperm(B, generator=torch.Generator().manual_seed(rng.randrange(2**31)))
            for i in range(0, B, minibatch):
                mb = order[i:i + minibatch].to(device)
                mb_mask = mask[mb]
                with autocast:
                    new_logprobs = response_logprobs(train_policy, seqs[mb], start[mb], P, cfg.temperature)
                    pg_loss, ratio, clipfrac = policy_loss(new_logprobs, old_logprobs[mb], advantages[mb], mb_mask, cfg.clip_range)
                    values = response_values(train_value, seqs[mb], start[mb], P, value_norm).float()
                    vf_loss = value_loss(values, old_values[mb], returns[mb], mb_mask, cfg.vf_clip_range)
                pg_loss.backward()  # on every process even when skipped below: DDP's all-reduce needs them all
                vf_loss.backward()
                # an exploding ratio (the policy moved far from the rollout's) would take a huge step: skip it
                ratio_max = torch.where(mb_mask > 0, ratio.detach(), 0).max().float()
                ratio_max = common.all_reduce(ratio_max.nan_to_num(nan=float("inf"), posinf=float("inf")), "max")  # NCCL may drop a NaN
                skip = not ratio_max.isfinite() or ratio_max > cfg.max_ratio
                if skip:
                    skipped += 1
                    print(f"iteration {it}: skipped a minibatch step, its importance ratio reached {ratio_max.item():.4g} "
                          f"(--max_ratio {cfg.max_ratio})")
                else:
                    common.check_finite(common.all_reduce(pg_loss.detach() + vf_loss.detach()), it, cfg.out_dir)
                for model, opt in ((policy, optimizer), (value_model, value_optimizer)):
                    if not skip:
                        common.clip_gradients(model, cfg.grad_clip, it, cfg.out_dir)
                        opt.step()
                    opt.zero_grad(set_to_none=True)
                if epoch == 0 and i == 0:  # the policy has not moved yet: every token's ratio is 1
                    first_ratio = farthest_from_one(ratio.detach(), mb_mask)
                stats["ratio_max"].append(ratio_max.item())  # already the largest over processes; skipped ones too
                if skip:  # its other numbers (a loss at an infinite ratio, say) stay out of the iteration's means
                    continue
                with torch.no_grad():
                    log_ratio = new_logprobs - old_logprobs[mb]
                    stats["pg_loss"].append(pg_loss.item())
                    stats["vf_loss"].append(vf_loss.item())
                    stats["approx_kl"].append(masked_mean(0.5 * log_ratio ** 2, mb_mask).item())
                    stats["clipfrac"].append(clipfrac.item())
                    stats["ratio_mean"].append(masked_mean(ratio, mb_mask).item())

        # diagnostics -----------------------------------------------------------------------------
        var_returns = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
        explained_variance = 1 - masked_mean((returns - old_values) ** 2, mask) / var_returns.clamp(min=1e-8)
        # over the minibatches that updated the policy (None where every one was skipped: null in the
        # JSON, which has no NaN or infinity)
        avg = {k: sum(v) / len(v) if v else None for k, v in stats.items()}
        ratio_max = max(stats["ratio_max"])  # of every minibatch, the skipped ones' too (None if not finite)
        row = dict(
            iteration=it, score=scores.mean().item(), non_score_reward=(-kl_ctl.value * kl).sum(1).mean().item(),
            kl=kl.sum(1).mean().item(), kl_full=full_kl.mean().item(), entropy=entropy.item(),
            approx_kl=avg["approx_kl"], clipfrac=avg["clipfrac"], pg_loss=avg["pg_loss"], vf_loss=avg["vf_loss"],
            explained_variance=explained_variance.item(), ratio_mean=avg["ratio_mean"],
            ratio_max=ratio_max if math.isfinite(ratio_max) else None,
            length=length.float().mean().item(), eos_rate=has_eos.float().mean().item(),
            kl_coef=kl_ctl.value, first_ratio=first_ratio if math.isfinite(first_ratio) else None, skipped=skipped)
        if gold is not None:  # monitoring only: the judge enters the loss only as the --reward gold oracle
            row["gold"] = sum(gold) / len(gold)
        for k, v in row.items():  # every process's share counts the same: the mean of their means
            if v is None:  # every minibatch skipped, or an infinite ratio: the same on every process
                continue
            if k == "ratio_max":
                row[k] = common.all_reduce(v, "max")  # already the largest over processes
            elif not isinstance(v, int) and k not in ("kl_coef", "first_ratio"):  # those two: already global
                row[k] = common.all_reduce(v) / common.world_size()
        logger.log(**row)
        if cfg.adaptive_kl:  # after the log line, which shows the coefficient these rewards were shaped with
            kl_ctl.update(common.all_reduce(kl.sum(1).mean().item()) / common.world_size(), cfg.rollout_batch)
        if state.due(it, cfg.iterations):
            save_checkpoint(cfg.out_dir, policy, {**tok.identity, "stage": "ppo", "parent": cfg.policy, "reward": cfg.reward,
                                                  "args": asdict(cfg), "metrics": {"steps_done": it + 1}}, logger.rows,
                            resume=state.capture(it + 1, kl_coef=kl_ctl.value))

    print("samples from the last rollout:")
    for p, t in list(zip(batch_prompts, texts))[:4]:
        print(f"  {p!r} -> {t!r}")
    metrics = {k: v for k, v in logger.rows[-1].items() if k != "iteration"}
    save_checkpoint(cfg.out_dir, policy, {**tok.identity, "stage": "ppo", "parent": cfg.policy, "reward": cfg.reward,
                                          "args": asdict(cfg), "metrics": metrics}, logger.rows)
    print(f"wrote {cfg.out_dir}")


if __name__ == "__main__":
    common.run(main, Config)
