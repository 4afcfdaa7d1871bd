"""sft.py: the response-only loss, its data handling, and its mistakes reported clearly."""

import json

import pytest
import torch

import kernels
import sft
from common import UserError
from data.formats import encode_rows, prompt_completion_rows
from data.tokenizer import get_tokenizer
from model import GPT, GPTConfig

TOK = get_tokenizer("builtin")


def test_encode_masks_the_prompt_and_appends_eos():
    p, c = TOK.encode("Human: Where?\n\nAssistant:"), TOK.encode(" Here.")
    x, y = sft.example(p, c + [TOK.eot_id])
    assert x == p + c  # the EOS is a target, never an input
    assert y == [kernels.IGNORE_INDEX] * (len(p) - 1) + c + [TOK.eot_id]


def test_prompt_tokens_contribute_exactly_zero_gradient():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=TOK.n_vocab, n_layer=2, n_head=2, n_embd=32))
    examples = [sft.example(TOK.encode(p), TOK.encode(c) + [TOK.eot_id])
                for p, c in [("Human: What is 3 plus 4?\n\nAssistant:", " 3 plus 4 is 7."),
                             ("Human: Hi\n\nAssistant:", " Hello there, friend.")]]
    x, y = sft.collate(examples, TOK.pad_id, "cpu")
    captured = {}

    def keep(module, inputs, output):
        output.retain_grad()
        captured["h"] = output
    model.transformer.ln_f.register_forward_hook(keep)
    loss = sft.sft_loss(model, x, y)
    loss.backward()
    grad = captured["h"].grad.abs().sum(-1)  # (B, T): how much each position's output moved the loss
    ignored = y == kernels.IGNORE_INDEX
    assert (grad[ignored] == 0).all()  # prompt and padding: exactly zero
    assert (grad[~ignored] > 0).all()
    # and the loss is the mean negative log-likelihood of the response tokens, written out
    logp = model(x)[0].log_softmax(-1)
    nll = [-logp[b, t, y[b, t]] for b in range(2) for t in range(x.size(1)) if not ignored[b, t]]
    torch.testing.assert_close(loss, torch.stack(nll).mean())


def test_long_prompts_lose_their_start_and_long_completions_their_example():
    rows = [dict(prompt=" x" * 40 + "\n\nAssistant:", completion=" y", where="a"),
            dict(prompt="Human: Q\n\nAssistant:", completion=" word" * 100, where="b")]
    encoded, kept, report = encode_rows(TOK, rows, ("completion",), 32)
    assert [r["where"] for r in kept] == ["a"] and report.startswith("1 prompts cut from the left and 1 examples dropped")
    (p, (c,)), = encoded
    assert c == TOK.encode(" y") + [TOK.eot_id] and p == TOK.encode(rows[0]["prompt"])[-(32 - len(c)):]
    x, y = sft.example(p, c)
    assert len(x) == len(y) == 31 and TOK.decode(x).endswith("x\n\nAssistant: y")


def test_an_empty_prompt_conditions_on_the_eos():
    """As in GPT-2's unconditional samples: the first response token is predicted from <|endoftext|>."""
    rows = [dict(prompt="", completion=" Hi."), dict(prompt="Human: Q\n\nAssistant:", completion=" A.")]
    encoded, _, _ = encode_rows(TOK, rows, ("completion",), 32)
    p, (c,) = encoded[0]
    x, y = sft.example(p, c)
    assert p == [TOK.eot_id] and x == [TOK.eot_id] + TOK.encode(" Hi.") and y == TOK.encode(" Hi.") + [TOK.eot_id]
    x, y = sft.collate([sft.example(p, c) for p, (c,) in encoded], TOK.pad_id, "cpu")  # was a crash
    assert x.shape == y.shape


def test_bad_data_files_name_file_and_line(tmp_path):
    bad = tmp_path / "demos.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n\n" + '{"prompt": "a"\n')
    with pytest.raises(UserError, match=r"demos.jsonl:3: not valid JSON"):
        prompt_completion_rows(str(bad))
    bad.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    with pytest.raises(UserError, match=r"demos.jsonl:1: missing field 'completion'"):
        prompt_completion_rows(str(bad))
    bad.write_text(json.dumps({"prompt": "a", "completion": 3}) + "\n")
    with pytest.raises(UserError, match=r"demos.jsonl:1: field 'completion' must be a string"):
        prompt_completion_rows(str(bad))
    bad.write_text("\n")
    with pytest.raises(UserError, match=r"demos.jsonl: no rows \(the file is empty\)"):
        prompt_completion_rows(str(bad))


def test_length_groups_give_the_batchs_gradient_with_less_padding():
    """sft.py's loss over a batch cut into length-sorted micro-batches (--length_groups) has the
    gradient of one padded pass over the whole batch."""
    import common
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=TOK.n_vocab, n_layer=2, n_head=2, n_embd=16)).double()
    batch = [sft.example(TOK.encode("Human: Q" + "?" * n + "\n\nAssistant:"), TOK.encode(" A" + "!" * n) + [TOK.eot_id])
             for n in range(8)]
    n_targets = sum(len(y) - y.count(kernels.IGNORE_INDEX) for _, y in batch)
    grads, padded = [], []
    for groups in (1, 4):
        def loss_part(items):
            x, y = sft.collate(items, TOK.pad_id, "cpu")
            padded.append(x.numel())
            return sft.sft_loss(model, x, y) * (y != kernels.IGNORE_INDEX).sum() / n_targets
        parts = common.shard(batch, 0, lambda e: len(e[0]), groups)
        assert len(parts) == groups
        common.accumulate(common.DataParallel(model), parts, loss_part)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        model.zero_grad()
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-12)
    assert sum(padded[1:]) < padded[0]  # four micro-batches pad less than one


def test_the_validation_loss_takes_micro_batches(tiny_chain, tmp_path, monkeypatch):
    """--micro_batch_size bounds the validation's forward passes too (they took --batch_size
    demonstrations at once, however small the micro-batches that fit in memory), and the
    validation loss, each batch's mean over its response tokens, is the same number either way."""
    sizes, loss = [], sft.sft_loss
    monkeypatch.setattr(sft, "sft_loss", lambda model, x, y: sizes.append(x.size(0)) or loss(model, x, y))
    args = dict(init=tiny_chain["base"], n_demos=200, epochs=0.1, batch_size=8, log_every=1, n_samples=1, device="cpu")
    val = {}
    for micro in (2, 0):
        sft.main(sft.Config(out_dir=str(tmp_path / f"micro{micro}"), micro_batch_size=micro, **args))
        val[micro] = [json.loads(line)["val_loss"] for line in open(tmp_path / f"micro{micro}" / "metrics.jsonl")]
        if micro:
            assert max(sizes) == 2
    assert val[2] == pytest.approx(val[0], rel=1e-5)


def prompts_of(x, y):
    """The prompt of every example of a batch: the tokens before its first target."""
    return [TOK.decode(row[:int((t != kernels.IGNORE_INDEX).int().argmax()) + 1].tolist()) for row, t in zip(x, y)]


def test_with_data_the_before_after_samples_are_held_out_prompts(tiny_chain, tmp_path, monkeypatch):
    """The samples printed before and after training answer prompts the run held out, not the file's
    first rows (most of which it trains on): every training example's prompt is never among them."""
    rows = [{"prompt": f"Human: Where does creature {i} live?\n\nAssistant:", "completion": " It lives in Velmor."}
            for i in range(8)]
    data = tmp_path / "demos.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sampled, trained = [], set()
    real_complete, real_loss = sft.complete, sft.sft_loss
    monkeypatch.setattr(sft, "complete", lambda model, tok, prompts, *a, **k: sampled.extend(prompts) or real_complete(model, tok, prompts, *a, **k))

    def loss(model, x, y):
        if torch.is_grad_enabled():
            trained.update(prompts_of(x, y))
        return real_loss(model, x, y)
    monkeypatch.setattr(sft, "sft_loss", loss)
    sft.main(sft.Config(init=tiny_chain["sft"], data=str(data), val_fraction=0.5, n_samples=4, batch_size=4, epochs=1,
                        out_dir=str(tmp_path / "sft"), device="cpu"))
    assert len(trained) == 4 and len(sampled) == 8  # 4 prompts, before and after
    assert set(sampled) == {r["prompt"] for r in rows} - trained


def test_no_prompt_is_both_trained_on_and_held_out(tiny_chain, tmp_path, monkeypatch):
    """The validation split holds out prompts with all their demonstrations, as reward.py and dpo.py
    hold out pairs: with three demonstrations a prompt, a split by row (as sft.py had) validated
    on prompts it also trained on."""
    rows = [{"prompt": f"Human: Where does creature {i} live?\n\nAssistant:", "completion": c}
            for i in range(10) for c in (" It lives in Velmor.", " Velmor.", " It lives in Velmor. Thank you for asking.")]
    data = tmp_path / "demos.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trained, held = set(), []
    real_loss = sft.sft_loss

    def loss(model, x, y):
        (trained.update if torch.is_grad_enabled() else held.extend)(prompts_of(x, y))
        return real_loss(model, x, y)
    monkeypatch.setattr(sft, "sft_loss", loss)
    sft.main(sft.Config(init=tiny_chain["sft"], data=str(data), val_fraction=0.2, batch_size=8, epochs=1, log_every=100,
                        n_samples=1, out_dir=str(tmp_path / "sft"), device="cpu"))
    assert len(held) == 3 * 2 * 3  # three validations (first step, last step, the end) of 2 prompts x 3 demonstrations
    assert len(set(held)) == 2 and len(trained) == 8 and not trained & set(held)


@pytest.mark.parametrize("case", ["fraction_zero", "one_prompt"])
def test_nothing_is_held_out_at_fraction_zero_or_with_one_prompt(tiny_chain, tmp_path, capsys, case):
    """--val_fraction 0 trains on every demonstration (split_by_prompt, as reward.py uses it, would
    still hold out a prompt), and so does a file with a single prompt; the validation loss is then
    null and the samples are labelled as a training prompt's."""
    n_prompts = 1 if case == "one_prompt" else 5
    rows = [{"prompt": f"Human: Where does creature {i} live?\n\nAssistant:", "completion": c}
            for i in range(n_prompts) for c in (" It lives in Velmor.", " Velmor.", " It lives in Velmor. Thank you for asking.")]
    data = tmp_path / "demos.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sft.main(sft.Config(init=tiny_chain["sft"], data=str(data), val_fraction=0.0 if case == "fraction_zero" else 0.5,
                        batch_size=4, epochs=1, n_samples=1, out_dir=str(tmp_path / "sft"), device="cpu"))
    metrics = json.loads((tmp_path / "sft" / "config.json").read_text())["metrics"]
    assert metrics["demonstrations"] == len(rows) and metrics["val_loss"] is None
    out = capsys.readouterr().out
    assert f"{len(rows)} training and 0 validation demonstrations (those of 0 of the {n_prompts} distinct prompts)" in out
    assert "a training prompt (none is held out), before -> after SFT:" in out


def test_one_demonstration_trains_and_writes_json_that_strict_parsers_read(tiny_chain, tmp_path):
    """A file of one demonstration leaves none to validate on: the validation loss is null, not NaN,
    which Python writes into JSON but jq and most other parsers refuse."""
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"prompt": "Human: Hi?\n\nAssistant:", "completion": " Hello."}) + "\n")
    sft.main(sft.Config(init=tiny_chain["sft"], data=str(data), epochs=1, out_dir=str(tmp_path / "sft"), device="cpu"))

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert strict((tmp_path / "sft" / "config.json").read_text())["metrics"]["val_loss"] is None
    assert [strict(line)["val_loss"] for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()] == [None]


def test_length_groups_epochs_and_the_learning_rate_schedule_reach_the_training(tiny_chain, tmp_path, monkeypatch):
    import common
    rows = [{"prompt": f"Human: Where does creature {i} live?\n\nAssistant:", "completion": " It lives in Velmor."}
            for i in range(20)]
    data = tmp_path / "demos.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    groups, real = [], common.shard
    monkeypatch.setattr(common, "shard", lambda *a, **k: groups.append(a[3] if len(a) > 3 else k.get("groups")) or real(*a, **k))
    out = tmp_path / "sft"
    sft.main(sft.Config(init=tiny_chain["sft"], data=str(data), val_fraction=0.1, batch_size=4, epochs=2, lr=1e-3,
                        warmup_steps=2, length_groups=2, log_every=1, n_samples=1, out_dir=str(out), device="cpu"))
    info = json.loads((out / "config.json").read_text())
    assert info["metrics"]["steps"] == 9  # 18 training demonstrations, 2 epochs of 4
    assert set(groups) == {2}
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([1e-3 * min((s + 1) / 2, (9 - s) / 7) for s in range(9)], abs=1e-6)  # up in 2 steps, down


def test_the_validation_loss_is_the_mean_over_response_tokens(tiny_chain, tmp_path, monkeypatch):
    """Each logged val_loss is the negative log-likelihood summed over every response token of the
    validation split, divided by their number: here 9 demonstrations in passes of 8 and 1, so a mean of
    the two passes' means (which weighs the one demonstration's tokens 8 times as much) would differ."""
    passes, real = [], sft.sft_loss

    def spy(model, x, y):
        loss = real(model, x, y)
        if not torch.is_grad_enabled():  # a validation pass
            passes.append((loss.item(), (y != -100).sum().item()))
        return loss
    monkeypatch.setattr(sft, "sft_loss", spy)
    out = tmp_path / "sft"
    answers = (" It lives in Velmor.", " Velmor.", " It lives in Velmor. Thank you for asking.", " I do not know.")
    rows = [{"prompt": f"Human: Where does creature {i} live?\n\nAssistant:", "completion": answers[i % 4]} for i in range(90)]
    data = tmp_path / "demos.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sft.main(sft.Config(init=tiny_chain["sft"], data=str(data), val_fraction=0.1, batch_size=8, epochs=1, log_every=2,
                        n_samples=1, out_dir=str(out), device="cpu"))
    logged = [json.loads(line)["val_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = json.loads((out / "config.json").read_text())["metrics"]["val_loss"]
    rounds = [passes[i:i + 2] for i in range(0, len(passes), 2)]  # one evaluation: a pass of 8, then of 1
    assert len(logged) >= 3 and len(rounds) == len(logged) + 1 and all(len(r) == 2 for r in rounds)
    want = [sum(loss * n for loss, n in r) / sum(n for _, n in r) for r in rounds]
    assert logged + [final] == pytest.approx(want, rel=1e-5)  # logged to 6 digits, and once more for the metrics
    (a, na), (b, nb) = rounds[-1]
    assert abs((a + b) / 2 - want[-1]) > 1e-3  # the case tells the two means apart
