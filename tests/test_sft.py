"""sft.py: the response-only loss, its data handling, and its mistakes reported clearly."""

import json

import pytest
import torch

import kernels
import sft
from common import UserError
from data.formats import prompt_completion_rows
from data.tokenizer import get_tokenizer
from model import GPT, GPTConfig

TOK = get_tokenizer("builtin")


def test_encode_masks_the_prompt_and_appends_eos():
    p, c = TOK.encode("Human: Where?\n\nAssistant:"), TOK.encode(" Here.")
    x, y = sft.encode(TOK, "Human: Where?\n\nAssistant:", " Here.", 64, "row 1")
    assert x == p + c  # the EOS is a target, never an input
    assert y == [kernels.IGNORE_INDEX] * (len(p) - 1) + c + [TOK.eot_id]


def test_prompt_tokens_contribute_exactly_zero_gradient():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=TOK.n_vocab, n_layer=2, n_head=2, n_embd=32))
    examples = [sft.encode(TOK, "Human: What is 3 plus 4?\n\nAssistant:", " 3 plus 4 is 7.", 32, "a"),
                sft.encode(TOK, "Human: Hi\n\nAssistant:", " Hello there, friend.", 32, "b")]
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


def test_a_prompt_longer_than_the_context_is_refused_by_name():
    n = len(TOK.encode(" x" * 40))
    with pytest.raises(UserError, match=f"demos.jsonl:3: the prompt is {n} tokens, the model's context is 32"):
        sft.encode(TOK, " x" * 40, " y", 32, "demos.jsonl:3")


def test_long_completions_are_truncated_to_the_context():
    x, y = sft.encode(TOK, "Human: Q\n\nAssistant:", " word" * 100, 32, "a")
    assert len(x) == len(y) == 32


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
    with pytest.raises(UserError, match=r"demos.jsonl: no rows"):
        prompt_completion_rows(str(bad))
