"""dpo.py: every loss type against its formula, its limits and gradient signs; log-probs gathered in
one pass and precomputed for the reference; bad data named by file and line; a tiny run end to end."""

import json
import math

import pytest
import torch

import dpo
import kernels
import reward
from common import UserError
from data.formats import preference_rows, split_by_prompt
from data.tokenizer import get_tokenizer
from model import GPT, GPTConfig, load_checkpoint, save_checkpoint

TOK = get_tokenizer("builtin")
LOSS_TYPES = ["sigmoid", "ipo", "hinge"]

# three pairs: policy chosen/rejected, reference chosen/rejected; margins m = 1, -0.5, -2
PC, PR = [-5.0, -3.0, -10.0], [-6.0, -2.0, -10.0]
RC, RR = [-5.5, -3.0, -9.0], [-5.5, -2.5, -11.0]
M = [1.0, -0.5, -2.0]


def loss(pc, pr, rc, rr, beta, loss_type="sigmoid", label_smoothing=0.0):
    t = [torch.tensor(v, dtype=torch.float64) for v in (pc, pr, rc, rr)]
    return dpo.dpo_loss(*t, beta, loss_type, label_smoothing)


def softplus(x):  # -log sigmoid(-x)
    return math.log1p(math.exp(x))


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_sigmoid_loss_and_rewards_by_hand(beta):
    losses, chosen, rejected = loss(PC, PR, RC, RR, beta)
    assert losses.tolist() == pytest.approx([softplus(-beta * m) for m in M], rel=1e-12)
    assert chosen.tolist() == pytest.approx([beta * (p - r) for p, r in zip(PC, RC)])
    assert rejected.tolist() == pytest.approx([beta * (p - r) for p, r in zip(PR, RR)])
    assert (chosen - rejected).tolist() == pytest.approx([beta * m for m in M])  # the reward margin is beta * m


def test_a_pair_is_as_long_as_its_longer_response():
    short, long = ([1, 2], [-100, 2]), ([1, 2, 3, 4], [-100, 2, 3, 4])
    assert dpo.pair_length((short, long)) == dpo.pair_length((long, short)) == 4


def test_cdpo_loss_by_hand():
    beta, eps = 0.5, 0.2
    losses, _, _ = loss(PC, PR, RC, RR, beta, "sigmoid", eps)
    assert losses.tolist() == pytest.approx([(1 - eps) * softplus(-beta * m) + eps * softplus(beta * m) for m in M])


def test_ipo_loss_by_hand():
    beta = 0.5  # the target margin 1 / (2 beta) is 1: the first pair sits on it
    losses, _, _ = loss(PC, PR, RC, RR, beta, "ipo")
    assert losses.tolist() == pytest.approx([(m - 1) ** 2 for m in M]) == [0.0, 2.25, 9.0]
    losses, _, _ = loss(PC, PR, RC, RR, 0.1, "ipo")
    assert losses.tolist() == pytest.approx([(m - 5) ** 2 for m in M])


def test_hinge_loss_by_hand():
    losses, _, _ = loss(PC, PR, RC, RR, 0.5, "hinge")
    assert losses.tolist() == pytest.approx([0.5, 1.25, 2.0])
    losses, _, _ = loss(PC, PR, RC, RR, 2.0, "hinge")
    assert losses.tolist() == pytest.approx([0.0, 2.0, 5.0])  # beta m = 2 > 1: no loss, no gradient


def test_equal_log_probs_give_log_2_and_zero_rewards():
    same = [-4.0, -7.5]
    for beta in (1e-3, 0.1, 10.0):
        losses, chosen, rejected = loss(same, same, [-3.0, -9.0], [-3.0, -9.0], beta)
        assert losses.tolist() == pytest.approx([math.log(2)] * 2)
    losses, chosen, rejected = loss(same, [-1.0, -2.0], same, [-1.0, -2.0], 0.1)  # policy == reference
    assert losses.tolist() == pytest.approx([math.log(2)] * 2) and chosen.tolist() == rejected.tolist() == [0.0, 0.0]


def test_beta_to_zero():
    beta = 1e-6  # sigmoid: log 2 - beta m / 2 to first order; hinge: 1 - beta m
    losses, chosen, rejected = loss(PC, PR, RC, RR, beta)
    assert losses.tolist() == pytest.approx([math.log(2) - beta * m / 2 for m in M], rel=1e-12)
    assert chosen.abs().max() < 1e-5 and rejected.abs().max() < 1e-5
    losses, _, _ = loss(PC, PR, RC, RR, beta, "hinge")
    assert losses.tolist() == pytest.approx([1 - beta * m for m in M], rel=1e-12)


def test_label_smoothing_zero_is_plain_dpo():
    plain = -torch.nn.functional.logsigmoid(0.3 * torch.tensor(M, dtype=torch.float64))
    torch.testing.assert_close(loss(PC, PR, RC, RR, 0.3, "sigmoid", 0.0)[0], plain)


def test_cdpo_at_one_half_is_symmetric():
    losses, _, _ = loss(PC, PR, RC, RR, 0.5, "sigmoid", 0.5)
    flipped, _, _ = loss(PR, PC, RR, RC, 0.5, "sigmoid", 0.5)  # chosen and rejected swapped: m -> -m
    torch.testing.assert_close(losses, flipped)
    pc = torch.tensor([-2.0], requires_grad=True)
    dpo.dpo_loss(pc, torch.tensor([-2.0]), torch.tensor([-1.0]), torch.tensor([-1.0]), 0.5, "sigmoid", 0.5)[0].sum().backward()
    assert pc.grad.item() == 0  # half the labels flipped: no preference to learn, the loss is flat at m = 0


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradient_signs(loss_type):
    """Raising the chosen log-prob lowers the loss, raising the rejected one raises it: for margins
    below the IPO target and hinge's 1 / beta."""
    pc = torch.tensor(PC, dtype=torch.float64, requires_grad=True)
    pr = torch.tensor(PR, dtype=torch.float64, requires_grad=True)
    ref = [torch.tensor(v, dtype=torch.float64) for v in (RC, RR)]
    losses, chosen, rejected = dpo.dpo_loss(pc, pr, *ref, 0.1, loss_type)
    losses.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()
    assert not chosen.requires_grad and not rejected.requires_grad  # the rewards are for logging only


def test_ipo_pulls_the_margin_back_past_its_target():
    pc = torch.tensor([0.0], requires_grad=True)  # m = 10 > 1 / (2 * 0.5) = 1
    dpo.dpo_loss(pc, torch.tensor([-10.0]), torch.tensor([0.0]), torch.tensor([0.0]), 0.5, "ipo")[0].sum().backward()
    assert pc.grad.item() > 0  # unlike DPO, IPO does not push the margin without end


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="loss_type"):
        loss(PC, PR, RC, RR, 0.1, "kto")

# -----------------------------------------------------------------------------
# log-probs


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=64, vocab_size=TOK.n_vocab, n_layer=1, n_head=2, n_embd=32)).eval()


ROWS = [dict(prompt="Human: What is 3 plus 4?\n\nAssistant:", chosen=" 3 plus 4 is 7.", rejected=" Maybe 8."),
        dict(prompt="Human: Hi\n\nAssistant:", chosen=" Hello.", rejected=" What a wonderful question! Hello there, friend."),
        dict(prompt="Human: Where does the suho live?\n\nAssistant:", chosen=" It lives in Velmor.", rejected=" No.")]


def pairs():
    return dpo.encode_pairs(TOK, ROWS, 64)[0]


def by_hand(model, prompt, response):
    """Sum and count of log p(response + EOS | prompt), one unpadded sequence, from the full logits."""
    p, r = TOK.encode(prompt), TOK.encode(response) + [TOK.eot_id]
    ids = torch.tensor([p + r])
    logp = model(ids)[0][0].log_softmax(-1)  # (T, V)
    return sum(logp[len(p) - 1 + i, t].item() for i, t in enumerate(r)), len(r)


def test_one_forward_pass_equals_each_sequence_alone():
    model = tiny_model()
    with torch.no_grad():
        chosen, rejected = dpo.batch_logps(model, pairs(), TOK.pad_id, "cpu", "sigmoid")
    for i, r in enumerate(ROWS):  # lengths differ, so most rows are padded: the padding must not leak
        assert chosen[i].item() == pytest.approx(by_hand(model, r["prompt"], r["chosen"])[0], abs=1e-4)
        assert rejected[i].item() == pytest.approx(by_hand(model, r["prompt"], r["rejected"])[0], abs=1e-4)


def test_ipo_gets_log_probs_averaged_over_the_response():
    model = tiny_model()
    with torch.no_grad():
        chosen, rejected = dpo.batch_logps(model, pairs(), TOK.pad_id, "cpu", "ipo")
    for i, r in enumerate(ROWS):
        for got, response in ((chosen[i], r["chosen"]), (rejected[i], r["rejected"])):
            total, n = by_hand(model, r["prompt"], response)
            assert n > 1 and got.item() == pytest.approx(total / n, abs=1e-5)
    # and so the IPO loss of the responses, which differ in length, is the one on averages, not on sums
    ref = [c - 0.1 for c in (chosen, rejected)]
    losses, _, _ = dpo.dpo_loss(chosen, rejected, *ref, 0.5, "ipo")
    assert losses.tolist() == pytest.approx([(0 - 1) ** 2] * 3)


def test_precomputed_reference_equals_a_fresh_forward(tmp_path, monkeypatch):
    """The reference log-probs, computed once before training: each pair's equal a fresh model's,
    and each distinct response goes through the model once (a prompt's pairs share their
    candidates; here the first pair's rejected response is chosen again, and every pair is there
    three times)."""
    model = tiny_model(seed=1)
    save_checkpoint(tmp_path / "ref", model, {"tokenizer": "builtin", "stage": "sft"})
    rows = (ROWS + [dict(prompt=ROWS[0]["prompt"], chosen=ROWS[0]["rejected"], rejected=" 7.")]) * 3
    many = dpo.encode_pairs(TOK, rows, 64)[0]  # 12 pairs, 7 distinct responses, in batches of 4: each padded differently
    sizes, logps = [], dpo.example_logps
    monkeypatch.setattr(dpo, "example_logps", lambda model, part, *a: sizes.append(len(part)) or logps(model, part, *a))
    responses, where = dpo.distinct_responses(many)
    ref = dpo.response_logps(model, responses, TOK.pad_id, "cpu", "sigmoid", torch.no_grad(), batch_size=4)
    assert sizes == [4, 3] and [len(x) for x, _ in responses] == sorted(len(x) for x, _ in responses)
    ref_chosen, ref_rejected = ref[where[0::2]], ref[where[1::2]]
    fresh, _ = load_checkpoint(tmp_path / "ref")
    for i, r in enumerate(rows):
        assert ref_chosen[i].item() == pytest.approx(by_hand(fresh, r["prompt"], r["chosen"])[0], abs=1e-4)
        assert ref_rejected[i].item() == pytest.approx(by_hand(fresh, r["prompt"], r["rejected"])[0], abs=1e-4)
    assert not ref_chosen.requires_grad


def test_each_process_computes_its_share_of_the_reference(monkeypatch):
    """Under torchrun every process computed the reference log-probs of every pair (on HH-RLHF's
    160k, the whole pass on each GPU); now each takes every N-th batch, and their sum is the whole."""
    import common
    model = tiny_model(seed=1).eval()
    rows = [dict(r, chosen=r["chosen"] + f" {i}", rejected=r["rejected"] + f" {i}") for i in range(3) for r in ROWS]
    responses, _ = dpo.distinct_responses(dpo.encode_pairs(TOK, rows, 64)[0])  # 18, all distinct
    whole = dpo.response_logps(model, responses, TOK.pad_id, "cpu", "sigmoid", torch.no_grad(), batch_size=4)
    sizes, logps = [], dpo.example_logps
    monkeypatch.setattr(dpo, "example_logps", lambda model, part, *a: sizes.append(len(part)) or logps(model, part, *a))
    monkeypatch.setattr(common, "world_size", lambda: 2)
    shares = []
    for r in (0, 1):
        monkeypatch.setattr(common, "rank", lambda: r)
        shares.append(dpo.response_logps(model, responses, TOK.pad_id, "cpu", "sigmoid", torch.no_grad(), batch_size=4))
    assert sizes == [4, 4, 2, 4, 4]  # alone (all_reduce is a no-op): each process its share (batches 0, 2, 4 and 1, 3), no more
    torch.testing.assert_close(shares[0] + shares[1], whole, rtol=1e-5, atol=1e-5)


def test_only_response_tokens_are_targets():
    (c, cy), _ = pairs()[0]
    p, r = TOK.encode(ROWS[0]["prompt"]), TOK.encode(ROWS[0]["chosen"]) + [TOK.eot_id]
    assert c == p + r[:-1] and cy == [kernels.IGNORE_INDEX] * (len(p) - 1) + r

# -----------------------------------------------------------------------------
# configuration, bad input, and the whole stage


def test_built_in_pairs_are_reward_pys():
    """The same raters, prompts, samples, seed and split as reward.py: DPO and the RM learn from the same labels."""
    for name in ("quality", "length", "flattery", "confidence", "n_prompts", "pairs_per_prompt", "sft_samples",
                 "val_fraction", "seed", "data", "init"):
        assert getattr(dpo.Config(), name) == getattr(reward.Config(), name), name


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    """A tiny random language model standing in for out/sft: the run's mechanics, not its quality."""
    path = tmp_path_factory.mktemp("dpo") / "sft"
    save_checkpoint(path, tiny_model(), {"tokenizer": "builtin", "stage": "sft", "parent": None, "args": {}, "metrics": {}})
    return path


def test_bad_data_names_file_and_line(init, tmp_path):
    data = tmp_path / "prefs.jsonl"
    good = json.dumps(ROWS[0]) + "\n"
    data.write_text(good + json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
    cfg = dict(init=str(init), out_dir=str(tmp_path / "dpo"), data=str(data), device="cpu")
    with pytest.raises(UserError, match=r"prefs.jsonl:2: missing field 'rejected'"):
        dpo.main(dpo.Config(**cfg))
    long = {**ROWS[0], "chosen": " 7" * 70}  # a response longer than the context, for two prompts
    data.write_text(json.dumps(long) + "\n" + json.dumps({**long, "prompt": long["prompt"] + " Now."}) + "\n")
    with pytest.raises(UserError, match="every one of 1 examples has a response too long for the context of 64"):
        dpo.main(dpo.Config(**cfg))
    with pytest.raises(UserError, match="--loss_type"):
        dpo.main(dpo.Config(**cfg, loss_type="kto"))
    with pytest.raises(UserError, match="--label_smoothing"):
        dpo.main(dpo.Config(**cfg, label_smoothing=0.5))
    assert not (tmp_path / "dpo").exists()


def test_dpo_on_built_in_pairs_end_to_end(init, tmp_path, monkeypatch):
    out = tmp_path / "dpo"
    reported = []  # (rows, margins) handed to the accuracy table: a margin must belong to its own row
    monkeypatch.setattr(dpo, "accuracy_report", lambda rows, margins: reported.append((rows, margins)) or ({}, []))
    dpo.main(dpo.Config(init=str(init), out_dir=str(out), n_prompts=8, pairs_per_prompt=4, sft_samples=1, val_fraction=0.5,
                        batch_size=8, epochs=2, log_every=1, n_samples=2, device="cpu"))
    model, info = load_checkpoint(out, head="lm", tokenizer="builtin")
    assert info["stage"] == "dpo" and info["parent"] == str(init) and info["args"]["beta"] == 0.5
    m = info["metrics"]
    assert 8 <= m["val_pairs"] <= 16 and m["train_pairs"] + m["val_pairs"] >= 30 and m["steps"] == round(2 * m["train_pairs"] / 8)
    # the held-out responses were scored once each, in length order: each reported margin is its own row's
    # implicit reward margin, beta * ((policy - reference) chosen - (policy - reference) rejected)
    (rows, margins), = reported
    assert len(rows) == m["val_pairs"] and sum(r > 0 for r in margins) / len(margins) == pytest.approx(m["val_accuracy"])
    pairs = dpo.encode_pairs(TOK, rows, model.config.block_size)[0]
    with torch.no_grad():
        (pc, pr), (rc, rr) = (dpo.batch_logps(mdl.eval(), pairs, TOK.pad_id, "cpu", "sigmoid") for mdl in (model, load_checkpoint(init)[0]))
    torch.testing.assert_close(torch.tensor(margins), 0.5 * ((pc - rc) - (pr - rr)), rtol=1e-4, atol=1e-5)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(m["steps"]))
    for key in ("loss", "accuracy", "margin", "chosen_reward", "rejected_reward", "logp_chosen", "logp_rejected", "lr"):
        assert all(isinstance(r[key], float) for r in rows), key
    assert "val_accuracy" in rows[0] and "val_accuracy" in rows[-1]
    # at step 0 the policy is the reference: the precomputed reference log-probs must match its own
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5) and abs(rows[0]["margin"]) < 1e-5
    before, _ = load_checkpoint(init)
    assert any(not torch.equal(a, b) for a, b in zip(before.state_dict().values(), model.state_dict().values()))


def test_every_step_is_logged_and_evaluations_are_printed_on_their_own_grid(init, tmp_path, capsys):
    """The issue: loss, accuracy, margin, rewards and log-probs logged every step (metrics.jsonl);
    --log_every thins the printed lines only, and --eval_every need not be a multiple of it: an
    evaluation step is printed too."""
    out = tmp_path / "dpo"
    dpo.main(dpo.Config(init=str(init), out_dir=str(out), n_prompts=8, pairs_per_prompt=4, sft_samples=0, batch_size=8,
                        epochs=2, log_every=3, eval_every=4, n_samples=1, device="cpu"))
    steps = load_checkpoint(out)[1]["metrics"]["steps"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps > 4 and [r["step"] for r in rows] == list(range(steps))
    keys = {"loss", "accuracy", "margin", "chosen_reward", "rejected_reward", "logp_chosen", "logp_rejected"}
    assert all(keys <= set(r) for r in rows)
    printed = [int(line.split()[1]) for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert printed == sorted({s for s in range(steps) if s % 3 == 0 or s % 4 == 0} | {steps - 1})
    assert [r["step"] for r in rows if "val_accuracy" in r] == sorted({s for s in range(0, steps, 4)} | {steps - 1})


def test_ipo_learns_a_simple_preference_from_a_file(init, tmp_path):
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Human: Say {w}.\n\nAssistant:", "chosen": " yes.", "rejected": " no."})
                            + "\n" for w in ["a", "b", "c", "d", "e", "f"] * 4))
    out = tmp_path / "dpo"
    dpo.main(dpo.Config(init=str(init), out_dir=str(out), data=str(data), loss_type="ipo", beta=0.5, val_fraction=0.25,
                        epochs=3, batch_size=6, lr=3e-3, warmup_steps=2, log_every=5, device="cpu"))
    info = load_checkpoint(out)[1]
    assert info["args"]["data"] == str(data) and info["metrics"]["val_pairs"] == 8  # 2 of the 6 prompts, 4 pairs each
    assert info["metrics"]["val_accuracy"] == 1.0 and info["metrics"]["val_margin"] > 0


def test_with_data_the_before_after_samples_are_held_out_prompts(init, tmp_path, monkeypatch):
    rows = [{"prompt": f"Human: Say {w}.\n\nAssistant:", "chosen": " yes.", "rejected": " no."} for w in "abcdefgh"]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sampled, real = [], dpo.complete
    monkeypatch.setattr(dpo, "complete", lambda model, tok, prompts, *a, **k: sampled.extend(prompts) or real(model, tok, prompts, *a, **k))
    dpo.main(dpo.Config(init=str(init), out_dir=str(tmp_path / "dpo"), data=str(data), val_fraction=0.5, n_samples=4,
                        epochs=1, batch_size=4, device="cpu"))
    held_out = {r["prompt"] for r in split_by_prompt(preference_rows(data), 0.5, 0)[0]}  # the split dpo.py makes
    assert len(held_out) == 4 and sorted(sampled) == sorted(list(held_out) * 2)  # before and after


def test_passes_without_gradients_take_micro_batches(init, tmp_path, monkeypatch):
    """--micro_batch_size bounds the forward passes without gradients: the reference log-probs and
    the held-out evaluation took 64 pairs at once however small the micro-batches that fit in
    memory. Now they take as many sequences as a micro-batch of pairs, and the results are the same."""
    sizes, logps = [], dpo.example_logps
    monkeypatch.setattr(dpo, "example_logps", lambda model, seqs, *a: sizes.append(len(seqs)) or logps(model, seqs, *a))
    args = dict(init=str(init), n_prompts=8, pairs_per_prompt=4, sft_samples=1, val_fraction=0.5, batch_size=4,
                epochs=1, log_every=1, n_samples=1, device="cpu")
    logged = {}
    for micro in (2, 0):
        dpo.main(dpo.Config(out_dir=str(tmp_path / f"micro{micro}"), micro_batch_size=micro, **args))
        logged[micro] = [json.loads(line) for line in (tmp_path / f"micro{micro}" / "metrics.jsonl").read_text().splitlines()]
        if micro:
            assert max(sizes) == 4  # 2 pairs' chosen and rejected
    for a, b in zip(logged[0], logged[2], strict=True):
        assert "val_loss" not in a or b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5) and b["val_margin"] == pytest.approx(a["val_margin"], abs=1e-5)


def test_label_smoothing_and_the_learning_rate_schedule_reach_the_training(init, tmp_path, monkeypatch):
    rows = [{"prompt": f"Human: Say {w}.\n\nAssistant:", "chosen": " yes.", "rejected": " no."} for w in "abcdefghij"]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    smoothing, real = [], dpo.dpo_loss
    monkeypatch.setattr(dpo, "dpo_loss", lambda *a, **k: smoothing.append(a[6] if len(a) > 6 else k.get("label_smoothing")) or real(*a, **k))
    out = tmp_path / "dpo"
    dpo.main(dpo.Config(init=str(init), out_dir=str(out), data=str(data), val_fraction=0.2, batch_size=4, epochs=2,
                        lr=1e-3, warmup_steps=2, label_smoothing=0.2, n_samples=1, device="cpu"))
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert set(smoothing) == {0.2}
    assert [r["lr"] for r in logged] == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4])  # 8 pairs, 2 epochs of 4: 4 steps
