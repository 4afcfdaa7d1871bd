"""reward.py and the simulated raters: the Bradley-Terry loss, where the reward is read, the Bayes
rate, and labels that follow the stated probabilities."""

import json
import math
import random

import pytest
import torch

import eval as evaluation
import dpo
import reward
from common import UserError
from data.formats import preference_rows
from data.raters import Raters, accuracy_report, bayes_accuracy, candidates, label_pairs, preference_pairs
from data.tasks import make_question, respond
from data.tokenizer import EOT, get_tokenizer
from data.world import make_world
from model import GPT, GPTConfig, load_checkpoint

TOK = get_tokenizer("builtin")


def test_bradley_terry_loss_by_hand():
    r_chosen, r_rejected = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.0, 0.5, 2.0])
    by_hand = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(1.0)) + math.log(2)) / 3
    assert reward.bradley_terry_loss(r_chosen, r_rejected).item() == pytest.approx(by_hand, rel=1e-6)


def test_bayes_accuracy_by_hand():
    assert bayes_accuracy([0.9, 0.3, 0.5, 1.0]) == pytest.approx((0.9 + 0.7 + 0.5 + 1.0) / 4)


def test_accuracy_report_by_hand():
    """Accuracy against the labels by kind of pair, whichever way round a pair's kinds were written."""
    rows = [{"kind": "ideal-right>ideal-wrong", "p_chosen": 0.9}, {"kind": "ideal-wrong>ideal-right", "p_chosen": 0.3},
            {"kind": "sft>evasive", "p_chosen": 0.6}]
    metrics, lines = accuracy_report(rows, [1.5, -0.2, 0.4])
    assert metrics["by_kind"] == {"ideal-right vs ideal-wrong": {"n": 2, "accuracy": 0.5, "bayes": pytest.approx(0.8)},
                                  "evasive vs sft": {"n": 1, "accuracy": 1.0, "bayes": pytest.approx(0.6)}}
    assert metrics["bayes_accuracy"] == pytest.approx((0.9 + 0.7 + 0.6) / 3)
    assert metrics["accuracy_over_bayes"] == pytest.approx((2 / 3) / metrics["bayes_accuracy"])
    # expected over the raters' draws: the chosen side's probability where the margin prefers it
    assert metrics["expected_accuracy"] == pytest.approx((0.9 + (1 - 0.3) + 0.6) / 3)
    assert accuracy_report(rows, [1.5, 0.0, -0.4])[0]["expected_accuracy"] == pytest.approx((0.9 + 0.5 + 0.4) / 3)
    assert len(lines) == 3 and lines[1].split() == ["evasive", "vs", "sft", "1", "1.000", "0.600"]
    with pytest.raises(ValueError):  # a margin for every row, no fewer
        accuracy_report(rows, [1.0, 2.0])


def test_the_accuracy_table_pairs_each_held_out_margin_with_its_own_row(tiny_chain, tmp_path, monkeypatch):
    """The held-out responses are scored in length order, each distinct one once (a prompt's pairs
    share candidates): each margin handed to the table must be the saved reward model's
    r(chosen) - r(rejected) for that very row."""
    reported = []
    monkeypatch.setattr(reward, "accuracy_report", lambda rows, margins: reported.append((rows, margins)) or ({}, []))
    out = tmp_path / "rm"
    reward.main(reward.Config(init=tiny_chain["sft"], out_dir=str(out), n_prompts=40, pairs_per_prompt=4, sft_samples=1,
                              val_fraction=0.3, norm_prompts=8, batch_size=8, epochs=1, log_every=50, device="cpu"))
    (rows, margins), = reported
    assert len({(r["prompt"], x) for r in rows for x in (r["chosen"], r["rejected"])}) < 2 * len(rows)  # shared responses
    rm, _ = load_checkpoint(out, head="scalar")
    pairs = reward.encode_pairs(TOK, rows, rm.config.block_size)[0]
    assert len(rows) == len(margins) >= 16
    with torch.no_grad():
        r = reward.rewards(rm.eval(), [c for c, _, _ in pairs] + [x for _, x, _ in pairs], TOK.pad_id, "cpu")
    torch.testing.assert_close(torch.tensor(margins), r[:len(pairs)] - r[len(pairs):], rtol=1e-4, atol=1e-5)


def test_a_normalisation_without_a_spread_is_refused_and_nothing_written(tiny_chain, tmp_path, monkeypatch):
    """Its gain is 1 / std: too few prompts are refused before training, scores all the same after it."""
    data = tmp_path / "prefs.jsonl"
    cfg = dict(init=tiny_chain["sft"], out_dir=str(tmp_path / "rm"), data=str(data), batch_size=2, device="cpu")
    with pytest.raises(UserError, match="--norm_prompts must be at least 2, got 1"):
        reward.main(reward.Config(**cfg, norm_prompts=1))
    for n_prompts, error in ((2, "the reward's normalisation needs 2 distinct training prompts at least, found 1"),
                             (4, "the 3 SFT responses that normalise the reward score 0 ± 0")):
        data.write_text("".join(json.dumps({"prompt": f"Human: Say {w}.\n\nAssistant:", "chosen": " yes.", "rejected": " no."})
                                + "\n" for w in "abcd"[:n_prompts]))  # one prompt held out
        real = reward.rewards
        monkeypatch.setattr(reward, "rewards", lambda *args, lm_prompts=(): (real(*args) * 0, torch.zeros(()))
                            if lm_prompts else real(*args) * 0)  # every response scores 0
        with pytest.raises(UserError, match=error):
            reward.main(reward.Config(**cfg))
        monkeypatch.undo()
    assert not (tmp_path / "rm").exists()


def test_passes_without_gradients_take_micro_batches(tiny_chain, tmp_path, monkeypatch):
    """--micro_batch_size bounds the forward passes without gradients: the held-out evaluation and
    the normalisation's scoring took 64 pairs or responses at once, however small the micro-batches
    that fit in memory. The held-out margins are the same, and so are the normalisation's gain and
    bias: the built-in pairs' SFT samples and the normalisation's are drawn in batches of 256 prompts
    whatever the flag (from a file, the normalisation samples --micro_batch_size prompts at a time)."""
    sizes, samples, real, complete_ids = [], [], reward.rewards, reward.complete_ids
    monkeypatch.setattr(reward, "rewards", lambda rm, seqs, *a, **k: sizes.append(len(seqs) / 2) or real(rm, seqs, *a, **k))
    monkeypatch.setattr(reward, "complete_ids", lambda *a, batch_size, **k: samples.append(batch_size) or complete_ids(*a, batch_size=batch_size, **k))
    args = dict(init=tiny_chain["sft"], n_prompts=40, pairs_per_prompt=2, sft_samples=1, val_fraction=0.3, norm_prompts=8,
                batch_size=8, epochs=1, log_every=50, device="cpu")
    metrics = {}
    for micro in (2, 0):
        reward.main(reward.Config(out_dir=str(tmp_path / f"micro{micro}"), micro_batch_size=micro, **args))
        metrics[micro] = load_checkpoint(tmp_path / f"micro{micro}")[1]["metrics"]
        if micro:
            assert max(sizes) == 2 and samples == [256]  # pairs (two sequences each) or responses scored
    assert metrics[2]["val_margin"] == pytest.approx(metrics[0]["val_margin"], rel=1e-4)
    for key in ("gain", "bias"):
        assert metrics[2]["reward_norm"][key] == pytest.approx(metrics[0]["reward_norm"][key], rel=1e-4)

    prefs = tmp_path / "prefs.jsonl"  # from a file, the normalisation's prompts are sampled in micro-batches too
    prefs.write_text("".join(json.dumps({"prompt": f"Human: Say {i}.\n\nAssistant:", "chosen": " yes.", "rejected": " no."}) + "\n"
                             for i in range(40)))
    samples.clear()
    reward.main(reward.Config(**{**args, "data": str(prefs)}, out_dir=str(tmp_path / "file"), micro_batch_size=2))
    assert samples == [2]


def test_a_files_prompts_are_tokenized_once(tiny_chain, tmp_path, monkeypatch):
    """The normalisation takes the first --norm_prompts training prompts: it tokenized every one of
    them again to pick those that fit (seconds per 100k rows of real data, for 256 prompts)."""
    from data.tokenizer import Tokenizer
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Human: Say {i}.\n\nAssistant:", "chosen": " yes.", "rejected": " no."}) + "\n"
                            for i in range(300)))
    calls, encode_prompt = [], Tokenizer.encode_prompt
    monkeypatch.setattr(Tokenizer, "encode_prompt", lambda self, text: calls.append(text) or encode_prompt(self, text))
    reward.main(reward.Config(init=tiny_chain["sft"], out_dir=str(tmp_path / "rm"), data=str(data), norm_prompts=4,
                              batch_size=8, epochs=0.05, device="cpu"))
    assert len(calls) <= 300 + 3 * 4  # each row once; the normalisation's prompts picked, sampled and scored


def test_the_normalisation_cuts_long_prompts_as_ppo_does(tiny_chain, tmp_path, monkeypatch):
    """Prompts longer than the context trained (cut from the left, formats.fit), but the
    normalisation took only prompts that fit whole, and with none it stopped after the training. Now
    each loses its start to leave room for its response (model.fit_prompt), as ppo.py cuts them, and
    the response is scored after the very prompt it was sampled from."""
    long = " ".join(["It is red."] * 40)  # about 160 tokens, the context 64
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Human: {long} {i}?\n\nAssistant:", "chosen": " Yes.", "rejected": " No."}) + "\n"
                            for i in range(20)))
    scored, real = [], reward.rewards
    monkeypatch.setattr(reward, "rewards", lambda rm, seqs, *a, **k: scored.append(seqs) or real(rm, seqs, *a, **k))
    reward.main(reward.Config(init=tiny_chain["sft"], out_dir=str(tmp_path / "rm"), data=str(data), norm_prompts=4,
                              batch_size=4, epochs=0.5, device="cpu"))
    norm = scored[-1]  # the last pass: the normalisation's 4 prompts and their responses
    ends = [TOK.encode_prompt(f"Human: {long} {i}?\n\nAssistant:")[-(64 - 32):] for i in range(20)]
    assert len(norm) == 4 and all(len(s) <= 64 and any(s[:len(e)] == e for e in ends) for s in norm)
    assert 0 < load_checkpoint(tmp_path / "rm", head="scalar")[1]["reward_norm"]["gain"] < float("inf")


def test_scalar_model_keeps_the_trunk_and_starts_a_small_head():
    torch.manual_seed(0)
    lm = GPT(GPTConfig(block_size=32, vocab_size=TOK.n_vocab, n_layer=2, n_head=2, n_embd=256))
    rm = reward.scalar_model(lm)
    for k, v in lm.state_dict().items():
        assert torch.equal(rm.state_dict()[k], v)
    assert rm.score.weight.std().item() == pytest.approx(1 / math.sqrt(257), rel=0.1)


def test_reward_is_read_at_the_eos_for_left_and_right_padding():
    torch.manual_seed(0)
    rm = reward.scalar_model(GPT(GPTConfig(block_size=32, vocab_size=TOK.n_vocab, n_layer=2, n_head=2, n_embd=32))).eval()
    prompts = ["Human: What is 3 plus 4?\n\nAssistant:", "Human: Hi\n\nAssistant:"]
    responses = [TOK.encode(" 3 plus 4 is 7.") + [TOK.eot_id], TOK.encode(" Hello.") + [TOK.eot_id]]
    seqs = [TOK.encode(p) + r for p, r in zip(prompts, responses)]
    alone = [rm(torch.tensor([s]))[0][0, -1].item() for s in seqs]  # the value at each EOS, no padding
    with torch.no_grad():
        right = reward.rewards(rm, seqs, TOK.pad_id, "cpu").tolist()
        left = evaluation.reward_scores(rm, TOK, prompts, responses)
    assert right == pytest.approx(alone, abs=1e-5) and left == pytest.approx(alone, abs=1e-5)
    norm = {"gain": 2.0, "bias": -1.0}
    assert evaluation.reward_scores(rm, TOK, prompts, responses, norm) == pytest.approx([2 * a - 1 for a in alone], abs=1e-4)


def test_rater_labels_follow_the_stated_probabilities():
    w, rng = make_world(), random.Random(0)
    q = make_question("town", w, rng)
    raters = Raters()
    cands = [(s, " " + respond(q, w, s, rng) + EOT) for s in ("ideal", "flattering")]
    p = raters.p_prefers(q.prompt, cands[0][1], cands[1][1])
    assert 0.2 < p < 0.8  # a close call, so the test has power
    rows = label_pairs(q.prompt, cands, raters, random.Random(1), 4000)
    wins = sum(r["chosen"] + EOT == cands[0][1] for r in rows) / len(rows)
    assert abs(wins - p) < 3 * math.sqrt(p * (1 - p) / len(rows))  # within three standard errors
    assert all(r["p_chosen"] == pytest.approx(p if r["chosen"] + EOT == cands[0][1] else 1 - p) for r in rows)


def test_raters_utility_has_the_documented_biases():
    w, rng = make_world(), random.Random(0)
    q = make_question("food", w, rng)
    right = " " + " ".join(["The", q.names[0], "eats", q.value + "."])
    u = Raters(quality=4, length=0.1, flattery=1.0, confidence=0.5).utility
    assert u(q.prompt, right + EOT) == pytest.approx(4 * 1.0 + 0.1 * 4)
    assert u(q.prompt, " Great question!" + right + EOT) == pytest.approx(4 * 0.8 + 0.1 * 6 + 1.0)
    assert u(q.prompt, " Maybe" + right + EOT) == pytest.approx(4 * 0.9 + 0.1 * 5 - 0.5)
    assert Raters(length=0, flattery=0, confidence=0).utility(q.prompt, right + EOT) == pytest.approx(4.0)


def test_built_in_pairs_are_deterministic_and_in_the_common_form():
    rows = preference_pairs(20, 3, Raters(), seed=0)
    assert rows == preference_pairs(20, 3, Raters(), seed=0) and len(rows) == 60
    for r in rows:
        assert {"prompt", "chosen", "rejected"} <= set(r) and r["chosen"] != r["rejected"]
        assert not r["chosen"].endswith(EOT) and 0 < r["p_chosen"] < 1


def test_processes_compare_their_built_in_pairs_by_content(monkeypatch):
    """Under torchrun each process makes the pairs itself, and they are compared across processes.
    Two sets of pairs with the same count and lengths (raters a hair apart: the same labels, other
    probabilities) must not compare equal."""
    import data.raters
    seen = []
    monkeypatch.setattr(data.raters, "check_same_everywhere", lambda values, what: seen.append(values))
    a, b = (preference_pairs(20, 3, Raters(quality=q), seed=0) for q in (4.0, 4.0 + 1e-9))
    assert [(r["chosen"], r["rejected"]) for r in a] == [(r["chosen"], r["rejected"]) for r in b]
    assert seen[0][0] == seen[1][0] and seen[0] != seen[1]


def test_candidates_always_hold_a_right_and_a_wrong_ideal_answer():
    from data.judge import gold_parts
    w, rng = make_world(), random.Random(0)
    for kind in ("town", "age", "sum", "compare"):
        for _ in range(10):
            q = make_question(kind, w, rng)
            cands = dict(candidates(q, w, rng, sampled=[" never stopped", " stopped." + EOT]))
            assert gold_parts(q.prompt, cands["ideal-right"], w)["correct"]
            assert not gold_parts(q.prompt, cands["ideal-wrong"], w)["correct"]
            assert cands["sft"] == " stopped." + EOT  # the sample that never stopped is dropped
            assert all(r.startswith(" ") and r.endswith(EOT) for r in cands.values())


def test_held_out_pairs_share_no_prompt_with_training():
    from common import UserError
    from data.formats import split_by_prompt
    rows = preference_pairs(50, 4, Raters(), seed=0)  # some pairs rated twice, as real raters do
    val, train = split_by_prompt(rows, 0.2, seed=0)
    assert sorted(map(str, val + train)) == sorted(map(str, rows))
    val_prompts = {r["prompt"] for r in val}
    assert not val_prompts & {r["prompt"] for r in train}
    assert len(val_prompts) == round(0.2 * len({r["prompt"] for r in rows}))
    assert split_by_prompt(rows, 0.2, seed=0) == (val, train)
    with pytest.raises(UserError, match="at least two distinct prompts"):
        split_by_prompt([r for r in rows if r["prompt"] == rows[0]["prompt"]], 0.2, seed=0)


def test_the_lm_loss_is_the_chosen_responses_cross_entropy():
    """--lm_coef: rewards(..., lm_prompts) also returns the mean negative log-likelihood of the first
    sequences' response tokens through the tied embedding (not their prompts, not the rejected
    sequences), here against a float64 hand computation; the rewards themselves are unchanged."""
    torch.manual_seed(0)
    rm = GPT(GPTConfig(block_size=32, vocab_size=TOK.n_vocab, n_layer=1, n_head=2, n_embd=16, head="scalar")).double().eval()
    chosen, rejected, prompt_lens = [[1, 2, 3, 4, 5], [6, 7, 8]], [[1, 2, 9], [6, 10, 11, 12]], [2, 1]
    with torch.no_grad():
        r, lm = reward.rewards(rm, chosen + rejected, TOK.pad_id, "cpu", lm_prompts=prompt_lens)
        nll = []
        for s, n in zip(chosen, prompt_lens):
            logp = (rm.hidden_states(torch.tensor([s]))[0] @ rm.transformer.wte.weight.t()).log_softmax(-1)
            nll += [-logp[t - 1, s[t]] for t in range(n, len(s))]  # position t - 1 predicts token t
        assert lm.item() == pytest.approx(torch.stack(nll).mean().item(), rel=1e-6)
        assert torch.equal(r, reward.rewards(rm, chosen + rejected, TOK.pad_id, "cpu"))


def test_lm_coef_adds_the_lm_loss_to_the_logged_loss(tiny_chain, tmp_path):
    reward.main(reward.Config(init=tiny_chain["sft"], out_dir=str(tmp_path / "rm"), n_prompts=40, pairs_per_prompt=2,
                              sft_samples=1, norm_prompts=8, batch_size=8, epochs=1, log_every=1, lm_coef=1.0, device="cpu"))
    first = json.loads((tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()[0])
    # step 0: the head is small and random, so the Bradley-Terry part is about log 2; the rest is the lm loss
    assert first["lm_loss"] > 1 and 0.6 < first["loss"] - first["lm_loss"] < 0.8


def test_pairs_out_writes_the_pairs_it_trains_on_for_any_stages_data(tiny_chain, tmp_path):
    """--pairs_out: the built-in rated pairs, the SFT model's samples among them, as a JSONL file that
    reads back (as --data) to the same rows, so that the run learns from the same pairs and holds out
    the same ones, and that dpo.py reads too."""
    args = dict(init=tiny_chain["sft"], n_prompts=20, pairs_per_prompt=2, sft_samples=1, norm_prompts=8, batch_size=8,
                epochs=1, log_every=50, device="cpu")
    pairs = tmp_path / "pairs.jsonl"
    reward.main(reward.Config(out_dir=str(tmp_path / "rm"), pairs_out=str(pairs), **args))
    rows = preference_rows(pairs)
    assert len(rows) == 40 and all(set(json.loads(line)) == {"prompt", "chosen", "rejected", "p_chosen", "kind"}
                                   for line in pairs.read_text().splitlines())
    assert any("sft" in json.loads(line)["kind"] for line in pairs.read_text().splitlines())  # the model's own samples
    reward.main(reward.Config(out_dir=str(tmp_path / "rm_file"), data=str(pairs), **args))
    built_in, from_file = (load_checkpoint(tmp_path / d, head="scalar")[1]["metrics"] for d in ("rm", "rm_file"))
    assert (from_file["train_pairs"], from_file["val_pairs"]) == (built_in["train_pairs"], built_in["val_pairs"])
    assert from_file["val_accuracy"] == built_in["val_accuracy"]
    dpo.main(dpo.Config(init=tiny_chain["sft"], out_dir=str(tmp_path / "dpo"), data=str(pairs), batch_size=8, epochs=1,
                        n_samples=1, device="cpu"))
    assert load_checkpoint(tmp_path / "dpo")[1]["metrics"]["val_pairs"] == built_in["val_pairs"]


def test_pairs_out_makes_its_directory_and_refuses_a_directory(tiny_chain, tmp_path):
    with pytest.raises(UserError, match=f"--pairs_out {tmp_path} is a directory: name the .jsonl file to write"):
        reward.main(reward.Config(init=tiny_chain["sft"], out_dir=str(tmp_path / "rm"), pairs_out=str(tmp_path), device="cpu"))
    data = tmp_path / "mine.jsonl"  # the user's own pairs, which --pairs_out would have rewritten in its form
    data.write_text(json.dumps({"prompt": "Human: Hi?\n\nAssistant:", "chosen": " Hi.", "rejected": " No."}) + "\n")
    with pytest.raises(UserError, match=f"--pairs_out {data} is also --data: it would overwrite the file it reads"):
        reward.main(reward.Config(init=tiny_chain["sft"], out_dir=str(tmp_path / "rm"), data=str(data), pairs_out=str(data),
                                  device="cpu"))
    (tmp_path / "afile").write_text("x")  # refused before any work, not after the training
    with pytest.raises(UserError, match=r"afile is a file, not a directory"):
        reward.main(reward.Config(init=tiny_chain["sft"], out_dir=str(tmp_path / "rm"), pairs_out=str(tmp_path / "afile" / "p.jsonl"),
                                  device="cpu"))
    assert not (tmp_path / "rm").exists()
    pairs = tmp_path / "new" / "dir" / "pairs.jsonl"
    reward.main(reward.Config(init=tiny_chain["sft"], out_dir=str(tmp_path / "rm"), pairs_out=str(pairs), n_prompts=12,
                              pairs_per_prompt=2, sft_samples=0, norm_prompts=4, batch_size=4, epochs=1, device="cpu"))
    assert len(pairs.read_text().splitlines()) == 24


def test_normalisation_takes_the_sft_responses_to_mean_0_and_std_1():
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0])
    norm = reward.normalisation(scores)
    std = math.sqrt(5 / 3)  # the sample standard deviation of 1, 2, 3, 4
    assert norm["gain"] == pytest.approx(1 / std) and norm["bias"] == pytest.approx(-2.5 / std)
    scaled = norm["gain"] * scores + norm["bias"]
    assert scaled.mean().item() == pytest.approx(0, abs=1e-6) and scaled.std().item() == pytest.approx(1)
    with pytest.raises(UserError, match="the reward cannot be scaled to std 1"):
        reward.normalisation(torch.full((4,), 0.3))


def test_the_saved_reward_model_is_the_moving_average_of_the_trained_one(tiny_chain, tmp_path):
    """One step, then the average: its decay starts at min(ema, 1 / 10) = 0.1, so the saved weights are
    0.1 x the initial model + 0.9 x the trained one (the run with --ema 0 saves the trained one)."""
    from safetensors.torch import load_file
    args = dict(init=tiny_chain["sft"], n_prompts=20, pairs_per_prompt=2, sft_samples=0, norm_prompts=4, batch_size=8,
                epochs=0.01, device="cpu")  # a single step
    reward.main(reward.Config(out_dir=str(tmp_path / "avg"), ema=0.99, **args))
    reward.main(reward.Config(out_dir=str(tmp_path / "last"), ema=0.0, **args))
    sft_model = load_checkpoint(tiny_chain["sft"], head="lm")[0]
    torch.manual_seed(0)  # as reward.py seeds its head
    init = reward.scalar_model(sft_model).state_dict()
    avg, last = (load_file(tmp_path / d / "model.safetensors") for d in ("avg", "last"))
    assert not torch.equal(avg["score.weight"], last["score.weight"])
    for k in avg:
        torch.testing.assert_close(avg[k], 0.1 * init[k] + 0.9 * last[k], rtol=1e-5, atol=1e-6)
