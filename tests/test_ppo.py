"""ppo.py: GAE, whitening, the per-token reward, the clipped losses, the KL controller, each against
a hand computation or a plain reference; and the on-policy check that the first ratio is 1."""

import json
import math
from pathlib import Path

import pytest
import torch

import common
import ppo
from model import GPT


def random_batch(B=5, R=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([9, 1, 4, 7, 3])[:B]
    mask = (torch.arange(R)[None] < lengths[:, None]).float()
    return torch.randn(B, R, generator=g), torch.randn(B, R, generator=g), mask, lengths


def test_gae_matches_the_discounted_sum_of_td_errors():
    rewards, values, mask, lengths = random_batch()
    gamma, lam = 0.9, 0.8
    adv, ret = ppo.gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lengths.tolist()):
        r, v = rewards[b, :n].tolist(), values[b, :n].tolist() + [0.0]  # terminal state after the last token
        delta = [r[t] + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            expected = sum((gamma * lam) ** k * delta[t + k] for k in range(n - t))
            assert adv[b, t].item() == pytest.approx(expected, abs=1e-5)
            assert ret[b, t].item() == pytest.approx(expected + v[t], abs=1e-5)
        assert (adv[b, n:] == 0).all() and (ret[b, n:] == 0).all()


def test_gae_with_lambda_one_and_gamma_one_is_reward_to_go_minus_value():
    rewards, values, mask, lengths = random_batch(seed=1)
    adv, ret = ppo.gae(rewards, values, mask, 1.0, 1.0)
    for b, n in enumerate(lengths.tolist()):
        to_go = rewards[b, :n].flip(0).cumsum(0).flip(0)
        torch.testing.assert_close(ret[b, :n], to_go)
        torch.testing.assert_close(adv[b, :n], to_go - values[b, :n])


def test_whiten_uses_only_masked_entries():
    x, _, mask, _ = random_batch(seed=2)
    x = x * 3 + 5
    w = ppo.whiten(x, mask)
    kept = w[mask.bool()]
    assert kept.mean().item() == pytest.approx(0, abs=1e-5)
    assert kept.var(unbiased=False).item() == pytest.approx(1, abs=1e-4)
    assert (w[~mask.bool()] == 0).all()
    x_kept = x[mask.bool()]
    keep_mean = ppo.whiten(x, mask, shift_mean=False)[mask.bool()]
    torch.testing.assert_close(keep_mean, (x_kept - x_kept.mean()) / x_kept.std(unbiased=False) + x_kept.mean())
    big = x.clone()
    big[~mask.bool()] = 1e6  # what lies outside the mask changes nothing
    torch.testing.assert_close(ppo.whiten(big, mask), w)


def test_per_token_rewards_put_the_score_on_the_last_token_only():
    _, _, mask, lengths = random_batch()
    kl = torch.full(mask.shape, 0.5)
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    r = ppo.per_token_rewards(kl * mask, scores, mask, kl_coef=0.1)
    for b, n in enumerate(lengths.tolist()):
        expected = [-0.05] * n
        expected[n - 1] += scores[b].item()
        assert r[b, :n].tolist() == pytest.approx(expected)
        assert (r[b, n:] == 0).all()


def test_kl_estimators():
    logp = torch.log(torch.tensor([0.5, 0.2]))
    ref = torch.log(torch.tensor([0.25, 0.4]))
    torch.testing.assert_close(ppo.kl_estimate(logp, ref, "k1"), torch.tensor([math.log(2), math.log(0.5)]))
    r = torch.tensor([0.5, 2.0])  # pi_ref / pi
    torch.testing.assert_close(ppo.kl_estimate(logp, ref, "k3"), (r - 1) - torch.log(r))
    assert (ppo.kl_estimate(logp, ref, "k3") >= 0).all()
    with pytest.raises(ValueError):
        ppo.kl_estimate(logp, ref, "k2")


def test_clipped_policy_loss_by_hand():
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.7]]))  # ratios 1.5, 0.5, 1.1, 0.7
    adv = torch.tensor([[1.0, 1.0, -2.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the last token is padding
    loss, ratio, clipfrac = ppo.policy_loss(new, old, adv, mask, clip_range=0.2)
    # token 0: A>0, r=1.5 -> clipped to 1.2: -1.2; token 1: A>0, r=0.5 -> min(0.5, 0.8)=0.5: -0.5;
    # token 2: A<0, r=1.1 (inside the clip): 2.2
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.2) / 3)
    assert clipfrac.item() == pytest.approx(2 / 3)
    torch.testing.assert_close(ratio, torch.tensor([[1.5, 0.5, 1.1, 0.7]]))


def test_a_ratio_exactly_at_the_clip_range_is_not_clipped():
    x = torch.randn(2, 5)
    _, ratio, clipfrac = ppo.policy_loss(x, x, torch.randn(2, 5), torch.ones(2, 5), clip_range=0.0)
    assert (ratio == 1).all() and clipfrac.item() == 0  # on-policy: |r - 1| = 0 is not above a range of 0


def test_the_reward_is_read_at_each_responses_last_token():
    P, R = 3, 4
    values = torch.arange(2 * (P + R), dtype=torch.float32).view(2, P + R)  # each entry its own flat index
    length = torch.tensor([1, 4])  # an EOS alone; a response cut at max_new_tokens
    assert ppo.last_token_values(values, P, length).tolist() == [P - 1 + 1, (P + R) + P - 1 + 4]


def test_score_rollouts_at_a_temperature_by_hand():
    """Every number score_rollouts returns, at T = 0.7, against the formulas: log-probs, KL and
    entropy of softmax(logits / T) at the positions that predict the response, values before each
    response token, the reward model's values everywhere."""
    from model import GPTConfig, left_pad
    lm, scalar = (GPTConfig(block_size=32, vocab_size=50, n_layer=1, n_head=2, n_embd=16, head=h) for h in ("lm", "scalar"))
    torch.manual_seed(0)
    policy, ref, value, rm = GPT(lm).eval(), GPT(lm).eval(), GPT(scalar).eval(), GPT(scalar).eval()
    idx, start = left_pad([[1, 2, 3], [4, 5]], 0)
    seqs = torch.cat([idx, torch.randint(1, 50, (2, 5))], 1)
    P, T = idx.size(1), 0.7
    with torch.no_grad():
        logprobs, ref_logprobs, kl, entropy, values, rm_values = ppo.score_rollouts(policy, ref, value, rm, seqs, start, P, T)
        logp = (policy(seqs, start=start)[0][:, P - 1:-1] / T).double().log_softmax(-1)
        logq = (ref(seqs, start=start)[0][:, P - 1:-1] / T).double().log_softmax(-1)
        want_values = value(seqs, start=start)[0][:, P - 1:-1]
        want_rm = rm(seqs, start=start)[0]
    target = seqs[:, P:, None]
    torch.testing.assert_close(logprobs.double(), logp.gather(-1, target).squeeze(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref_logprobs.double(), logq.gather(-1, target).squeeze(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl.double(), (logp.exp() * (logp - logq)).sum(-1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(entropy.double(), -(logp.exp() * logp).sum(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values, want_values)
    torch.testing.assert_close(rm_values, want_rm)
    with torch.no_grad():  # the value model on the reward's normalised scale
        scaled = ppo.score_rollouts(policy, ref, value, rm, seqs, start, P, T, {"gain": 2.0, "bias": -0.5})[4]
    torch.testing.assert_close(scaled, 2.0 * want_values - 0.5)


def test_ppo_at_a_temperature_is_on_policy(tiny_chain, tmp_path):
    """The learning phase recomputes the log-probs at the sampling temperature, as scoring does:
    at T = 0.7 the first minibatch's ratios are still exactly 1."""
    out = tmp_path / "ppo"
    ppo.main(ppo.Config(policy=tiny_chain["sft"], reward=tiny_chain["rm"], out_dir=str(out), iterations=1, rollout_batch=4,
                        minibatch_size=2, ppo_epochs=1, max_new_tokens=6, warmup_iterations=1, temperature=0.7, device="cpu"))
    row = json.loads((out / "metrics.jsonl").read_text())
    assert row["first_ratio"] == pytest.approx(1.0, abs=1e-6)


def test_grad_clip_zero_turns_clipping_off(tiny_chain, tmp_path):
    """--grad_clip 0 means off, as in every stage: clipping the norm to 0 zeroed every gradient, and
    the policy never moved."""
    from model import load_checkpoint
    out = tmp_path / "ppo"
    ppo.main(ppo.Config(policy=tiny_chain["sft"], reward=tiny_chain["rm"], out_dir=str(out), iterations=1, rollout_batch=4,
                        minibatch_size=2, ppo_epochs=1, max_new_tokens=6, warmup_iterations=1, grad_clip=0, device="cpu"))
    before, after = load_checkpoint(tiny_chain["sft"])[0].state_dict(), load_checkpoint(out)[0].state_dict()
    assert sum(not torch.equal(before[k], after[k]) for k in before) > len(before) // 2


def test_clipped_value_loss_by_hand():
    old = torch.tensor([[0.0, 0.0, 1.0]])
    new = torch.tensor([[0.5, 0.1, 1.0]])
    returns = torch.tensor([[1.0, -1.0, 3.0]])
    loss = ppo.value_loss(new, old, returns, torch.ones(1, 3), clip_range=0.2)
    # token 0: max((0.5-1)^2, (0.2-1)^2) = 0.64; token 1: max(1.21, 1.21) = 1.21; token 2: 4
    assert loss.item() == pytest.approx(0.5 * (0.64 + 1.21 + 4.0) / 3)


def test_first_ratio_is_the_token_ratio_farthest_from_one():
    """Not a mean: 1.2 and 0.8 average to 1, and the on-policy check would pass on a broken batch."""
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert ppo.farthest_from_one(torch.tensor([[1.2, 0.8, 5.0]]), mask) == pytest.approx(1.2)  # 5.0 is padding
    assert ppo.farthest_from_one(torch.tensor([[1.2, 0.7, 5.0]]), mask) == pytest.approx(0.7)
    assert ppo.farthest_from_one(torch.ones(2, 3), torch.ones(2, 3)) == 1.0


def test_adaptive_kl_controller():
    ctl = ppo.AdaptiveKLController(0.1, target=2.0, horizon=1000)
    ctl.update(kl=4.0, n_responses=100)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    ctl.update(kl=1.8, n_responses=100)  # error -0.1
    assert ctl.value == pytest.approx(0.1 * 1.02 * (1 - 0.1 * 0.1))


def test_response_mask_ends_each_response_at_its_first_eos():
    EOS = 7
    responses = torch.tensor([[3, 7, 0, 0],    # ends at its EOS: 2 tokens, the EOS counted
                              [7, 0, 0, 0],    # the EOS alone
                              [3, 4, 7, 7],    # a second EOS is padding (masked)
                              [3, 4, 5, 6]])   # no EOS: truncated at R = 4
    length, has_eos, mask = ppo.response_mask(responses, EOS)
    assert length.tolist() == [2, 1, 3, 4]
    assert has_eos.tolist() == [True, True, True, False]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]


def test_log_shows_the_kl_coefficient_its_rewards_used(tiny_chain, tmp_path):
    """With --adaptive_kl the coefficient changes after every iteration: each log line must pair the
    iteration's KL with the coefficient that shaped its rewards (the first: --kl_coef itself)."""
    out = tmp_path / "ppo"
    ppo.main(ppo.Config(policy=tiny_chain["sft"], reward=tiny_chain["rm"], out_dir=str(out), iterations=3, rollout_batch=4,
                        minibatch_size=4, ppo_epochs=1, max_new_tokens=6, warmup_iterations=1, adaptive_kl=True,
                        kl_coef=0.3, target_kl=0.01, kl_horizon=10, device="cpu"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["kl_coef"] == 0.3
    ctl = ppo.AdaptiveKLController(0.3, target=0.01, horizon=10)
    for row in rows:
        assert row["kl_coef"] == pytest.approx(ctl.value)
        assert row["non_score_reward"] == pytest.approx(-ctl.value * row["kl"], abs=1e-6)  # the log keeps 6 digits
        ctl.update(row["kl"], 4)
    assert rows[-1]["kl_coef"] != rows[0]["kl_coef"]


def test_empty_prompts_condition_on_the_eos(tiny_chain, tmp_path):
    """Unconditional samples, as GPT-2's: every prompt empty, each rollout starts from <|endoftext|>."""
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": ""}) + "\n" + json.dumps({"prompt": ""}) + "\n")
    out = tmp_path / "ppo"
    ppo.main(ppo.Config(policy=tiny_chain["sft"], reward=tiny_chain["rm"], out_dir=str(out), data=str(data), iterations=1,
                        rollout_batch=2, minibatch_size=2, ppo_epochs=1, max_new_tokens=4, warmup_iterations=1, device="cpu"))
    row = json.loads((out / "metrics.jsonl").read_text())
    assert all(math.isfinite(v) for v in row.values())


def test_rollouts_are_scored_a_minibatch_at_a_time(tiny_chain, tmp_path, monkeypatch):
    """--minibatch_size bounds the scoring's forward passes too (policy, reference, value and
    reward model took the whole rollout batch at once, with its (B, R, vocab) logits twice), and
    the scores, KL and entropy of the rollouts are the same."""
    sizes, hidden, forward = [], ppo.response_hidden, GPT.forward
    monkeypatch.setattr(ppo, "response_hidden", lambda model, seqs, *a: sizes.append(seqs.size(0)) or hidden(model, seqs, *a))
    monkeypatch.setattr(GPT, "forward", lambda self, idx, *a, **k: sizes.append(idx.size(0)) or forward(self, idx, *a, **k))
    args = dict(policy=tiny_chain["sft"], reward=tiny_chain["rm"], iterations=1, rollout_batch=8, ppo_epochs=1,
                max_new_tokens=6, warmup_iterations=1, device="cpu")
    logged = {}
    for minibatch in (2, 8):
        ppo.main(ppo.Config(out_dir=str(tmp_path / f"mb{minibatch}"), minibatch_size=minibatch, **args))
        logged[minibatch] = json.loads((tmp_path / f"mb{minibatch}" / "metrics.jsonl").read_text())
        if minibatch == 2:
            assert max(sizes) == 2
    for key in ("score", "kl", "kl_full", "entropy", "explained_variance", "length"):
        assert logged[2][key] == pytest.approx(logged[8][key], rel=1e-4, abs=1e-6), key
    assert logged[2]["first_ratio"] == pytest.approx(1.0, abs=1e-6)


def test_rollouts_in_generation_batches_equal_one_pass(tiny_chain):
    """--generation_batch samples the prompts a few at a time: greedy, the sequences are those of one
    pass, and a pass whose responses all ended early is padded on the right to the longest."""
    from data.tokenizer import get_tokenizer
    from model import left_pad, load_checkpoint
    policy, _ = load_checkpoint(tiny_chain["sft"], head="lm")
    tok = get_tokenizer("builtin")
    prompts = ["Human: What does the suho eat?\n\nAssistant:", "Human: What is 3 plus 4?\n\nAssistant:", "",
               "Human: Which is older, the diga or the zutuhu?\n\nAssistant:", "Human: Hi.\n\nAssistant:"]
    idx, start = left_pad([tok.encode_prompt(p) for p in prompts], tok.pad_id)
    whole = ppo.rollout(policy.eval(), idx, start, 12, 0.0, tok, None)
    for n in (1, 2, 3):
        assert torch.equal(ppo.rollout(policy, idx, start, 12, 0.0, tok, None, generation_batch=n), whole), n

    class Scripted:  # row b answers with b tokens and an EOS; generate stops when every row of its pass is done
        def generate(self, idx, max_new_tokens, start, temperature, eos_id, pad_id, generator):
            n = [int(r) for r in idx[:, -1]]
            width = max(n) + 1
            return torch.cat([idx, torch.tensor([[5] * k + [eos_id] + [pad_id] * (width - k - 1) for k in n])], 1)
    idx = torch.tensor([[9, 0], [9, 3], [9, 1], [9, 2]])
    start = torch.zeros(4, dtype=torch.long)
    whole = ppo.rollout(Scripted(), idx, start, 8, 1.0, tok, None)
    assert whole[:, 2:].tolist() == [[tok.eot_id] + [tok.pad_id] * 3, [5, 5, 5, tok.eot_id], [5, tok.eot_id] + [tok.pad_id] * 2,
                                     [5, 5, tok.eot_id, tok.pad_id]]
    for n in (1, 2, 3):  # passes of widths 1 to 4 and 2 to 4 tokens, padded alike
        assert torch.equal(ppo.rollout(Scripted(), idx, start, 8, 1.0, tok, None, n), whole), n


def test_scoring_by_minibatch_gives_each_rollout_its_own_numbers():
    """score_rollouts row by row equals one pass over the whole batch, with a reference other than
    the policy: the end-to-end test above compares one iteration, where the policy is the reference
    and every KL is 0 whatever rows the minibatches hold."""
    from model import GPTConfig, left_pad
    lm, scalar = (GPTConfig(block_size=32, vocab_size=50, n_layer=1, n_head=2, n_embd=16, head=h) for h in ("lm", "scalar"))
    torch.manual_seed(0)
    policy, ref, value, rm = GPT(lm).eval(), GPT(lm).eval(), GPT(scalar).eval(), GPT(scalar).eval()
    idx, start = left_pad([[1, 2, 3], [4], [5, 6, 7, 8, 9], [10, 11]], 0)  # prompts padded differently
    seqs = torch.cat([idx, torch.randint(1, 50, (4, 6))], 1)
    P = idx.size(1)
    with torch.no_grad():
        whole = ppo.score_rollouts(policy, ref, value, rm, seqs, start, P, 0.7)
        rows = [ppo.score_rollouts(policy, ref, value, rm, seqs[i:i + 1], start[i:i + 1], P, 0.7) for i in range(4)]
    assert whole[2].abs().min() > 0  # the KL at every position: two different models
    for w, parts in zip(whole, zip(*rows)):
        torch.testing.assert_close(torch.cat(parts), w, rtol=1e-5, atol=1e-6)


def test_every_flag_reaches_the_piece_it_configures(tiny_chain, tmp_path, monkeypatch):
    """ppo.main with non-default flags, each spied on where it acts: --whiten_rewards, --kl_estimator,
    --generation_batch, --grad_clip, the learning-rate schedule, the reward's normalisation, and
    the fixed KL coefficient (no --adaptive_kl)."""
    import shutil
    rm = tmp_path / "rm"  # the tiny reward model with a normalisation that makes every score 3
    shutil.copytree(tiny_chain["rm"], rm)
    info = json.loads((rm / "config.json").read_text())
    (rm / "config.json").write_text(json.dumps({**info, "reward_norm": {"gain": 0.0, "bias": 3.0}}))
    seen = {"whiten": [], "estimator": [], "generate": [], "clip": [], "lr": []}
    whiten, estimate, generate, clip, step = ppo.whiten, ppo.kl_estimate, GPT.generate, torch.nn.utils.clip_grad_norm_, torch.optim.AdamW.step
    monkeypatch.setattr(ppo, "whiten", lambda x, mask, shift_mean=True: seen["whiten"].append(shift_mean) or whiten(x, mask, shift_mean))
    monkeypatch.setattr(ppo, "kl_estimate", lambda a, b, est: seen["estimator"].append(est) or estimate(a, b, est))
    monkeypatch.setattr(GPT, "generate", lambda self, idx, *a, **k: seen["generate"].append(idx.size(0)) or generate(self, idx, *a, **k))
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm: seen["clip"].append(max_norm) or clip(params, max_norm))
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a: seen["lr"].append(self.param_groups[0]["lr"]) or step(self, *a))
    out = tmp_path / "ppo"
    ppo.main(ppo.Config(policy=tiny_chain["sft"], reward=str(rm), out_dir=str(out), iterations=4, rollout_batch=4,
                        minibatch_size=4, ppo_epochs=1, max_new_tokens=6, warmup_iterations=2, lr=1e-3, value_lr=1e-2,
                        whiten_rewards=True, kl_estimator="k3", generation_batch=1, grad_clip=0.5, missing_eos_penalty=0.0,
                        kl_coef=0.3, device="cpu"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert seen["whiten"].count(False) == 4  # the rewards, once an iteration, their mean kept
    assert set(seen["estimator"]) == {"k3"} and set(seen["generate"]) == {1} and set(seen["clip"]) == {0.5}
    policy_lr = [lr for lr in seen["lr"] if lr < 5e-3]  # the value model's are ten times larger
    assert policy_lr == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4])  # warm-up over 2 iterations, then down
    assert all(r["score"] == pytest.approx(3.0) for r in rows)  # gain 0, bias 3: the normalisation applied
    assert all(r["kl_coef"] == 0.3 for r in rows)  # no --adaptive_kl: the coefficient stays


def test_the_value_model_starts_on_the_normalised_rewards_scale(tiny_chain, tmp_path, monkeypatch):
    """The value model starts as a copy of the reward model, so before any update its estimates are the
    reward model's values through the same gain and bias as the scores: the returns it learns are
    normalised rewards, and raw values would start it off by the raw reward's mean."""
    seen, real = [], ppo.score_rollouts
    monkeypatch.setattr(ppo, "score_rollouts", lambda *a: seen.append((a[6], real(*a))) or seen[-1][1])
    learned, value_loss = [], ppo.value_loss  # and the learning phase reads them on the same scale
    monkeypatch.setattr(ppo, "value_loss", lambda v, old, *a: learned.append((v.detach(), old, a[1])) or value_loss(v, old, *a))
    ppo.main(ppo.Config(policy=tiny_chain["sft"], reward=tiny_chain["rm"], out_dir=str(tmp_path / "ppo"), iterations=1,
                        rollout_batch=4, minibatch_size=4, ppo_epochs=1, max_new_tokens=6, warmup_iterations=1, device="cpu"))
    norm = json.loads((Path(tiny_chain["rm"]) / "config.json").read_text())["reward_norm"]
    assert abs(norm["bias"]) > 0.1  # a case where raw and normalised values differ
    P, (_, _, _, _, values, rm_values) = seen[0]
    torch.testing.assert_close(values, norm["gain"] * rm_values[:, P - 1:-1] + norm["bias"], rtol=1e-5, atol=1e-5)
    v, old, mask = learned[0]  # the first minibatch, before any update: the very same estimates
    torch.testing.assert_close(v * mask, old, rtol=1e-5, atol=1e-5)


def test_a_reward_model_without_its_normalisation_is_refused(tiny_chain, tmp_path):
    import shutil
    rm = tmp_path / "rm"
    shutil.copytree(tiny_chain["rm"], rm)
    info = json.loads((rm / "config.json").read_text())
    del info["reward_norm"]
    (rm / "config.json").write_text(json.dumps(info))
    with pytest.raises(common.UserError, match=f"{rm} has no reward normalisation"):
        ppo.main(ppo.Config(policy=tiny_chain["sft"], reward=str(rm), out_dir=str(tmp_path / "ppo"), iterations=1,
                            rollout_batch=4, minibatch_size=4, max_new_tokens=6, device="cpu"))
