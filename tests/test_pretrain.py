"""pretrain.py end to end on a minute-sized config, from Python and from the command line."""

import json
import math
import subprocess
import sys

import pytest

import pretrain
import torch
from model import GPT, load_checkpoint

TINY = dict(n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=8, n_docs=200,
            warmup_steps=5, log_every=10, eval_every=20, eval_batches=2, device="cpu")


def test_pretrain_learns_and_writes_a_checkpoint(tmp_path, capsys):
    cfg = pretrain.Config(out_dir=str(tmp_path / "base"), max_steps=60, **{**TINY, "eval_every": 25})
    pretrain.main(cfg)
    model, info = load_checkpoint(tmp_path / "base", head="lm", tokenizer="builtin")
    assert info["stage"] == "pretrain" and info["parent"] is None and info["args"]["max_steps"] == 60
    m = info["metrics"]
    assert m["val_loss"] < math.log(model.config.vocab_size) - 2  # far below uniform guessing
    assert 0 <= m["fact_completion"] <= 1 and 0 <= m["question_continuation"] <= 1
    rows = [json.loads(line) for line in (tmp_path / "base" / "metrics.jsonl").read_text().splitlines()]
    # a line every 10 steps, and one at each validation (every 25 steps, and the last)
    assert [r["step"] for r in rows] == [0, 10, 20, 25, 30, 40, 50, 59]
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 25, 50, 59]
    assert {"loss", "tok_per_s", "eta_s", "elapsed"} <= rows[1].keys()
    assert "fact completion" in capsys.readouterr().out


def test_the_final_probe_runs_without_dropout(tmp_path, monkeypatch):
    """With --dropout, the facts probed and the samples printed at the end come from the model in
    eval mode: the validation pass just before it used to switch training mode back on."""
    modes, probe = [], pretrain.probe_world
    monkeypatch.setattr(pretrain, "probe_world", lambda model, tok: modes.append(model.training) or probe(model, tok))
    pretrain.main(pretrain.Config(out_dir=str(tmp_path / "base"), max_steps=4, dropout=0.1, **TINY))
    assert modes == [False]


def test_pretrain_on_a_text_file(tmp_path):
    text = tmp_path / "shakespeare.txt"
    text.write_text("To be, or not to be, that is the question. " * 300 + "Ünïcode is fine. ")
    pretrain.main(pretrain.Config(out_dir=str(tmp_path / "base"), data=str(text), max_steps=30, **TINY))
    _, info = load_checkpoint(tmp_path / "base")
    first = json.loads((tmp_path / "base" / "metrics.jsonl").read_text().splitlines()[0])
    assert info["args"]["data"] == str(text) and info["metrics"]["val_loss"] < first["val_loss"] - 2
    assert "fact_completion" not in info["metrics"]


def test_continued_pretraining_trains_on_the_checkpoints_context(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("The suho lives in Velmor. The gomi eats honey. " * 300)
    pretrain.main(pretrain.Config(out_dir=str(tmp_path / "base"), data=str(text), max_steps=2, **TINY))
    tiny = {k: v for k, v in TINY.items() if k != "block_size"}  # the shape comes from --init
    pretrain.main(pretrain.Config(init=str(tmp_path / "base"), out_dir=str(tmp_path / "more"), data=str(text),
                                  max_steps=2, **tiny))
    _, info = load_checkpoint(tmp_path / "more")
    assert info["args"]["block_size"] == TINY["block_size"]  # the whole context by default, as GPT-2's 1024 would be
    assert info["metrics"]["tokens_seen"] == 2 * TINY["batch_size"] * TINY["block_size"]
    pretrain.main(pretrain.Config(init=str(tmp_path / "base"), out_dir=str(tmp_path / "short"), data=str(text),
                                  max_steps=2, **{**tiny, "block_size": 16}))
    model, info = load_checkpoint(tmp_path / "short")
    assert model.config.block_size == TINY["block_size"] and info["metrics"]["tokens_seen"] == 2 * TINY["batch_size"] * 16


def test_validation_takes_micro_batches_in_the_training_dtype(tmp_path, monkeypatch):
    """--micro_batch_size bounds every forward pass, the validation's too (it took the whole batch,
    in float32 on a GPU: 32 windows of GPT-2's 1024 tokens, where the training took 4 at a time),
    and the validation loss is the same number either way."""
    text = tmp_path / "corpus.txt"
    text.write_text("The suho lives in Velmor. The gomi eats honey. " * 300)
    calls, forward = [], GPT.forward

    def spy(self, idx, *args, **kwargs):
        calls.append((idx.size(0), torch.is_autocast_enabled("cpu")))
        return forward(self, idx, *args, **kwargs)
    monkeypatch.setattr(GPT, "forward", spy)
    args = dict(data=str(text), max_steps=1, **TINY)
    pretrain.main(pretrain.Config(out_dir=str(tmp_path / "bf16"), micro_batch_size=2, dtype="bfloat16", **args))
    assert len(calls) == 4 + 2 * 2 * 4 and all(n == 2 and autocast for n, autocast in calls)  # training, then 2 validations
    val = {}
    for micro in (0, 2):
        pretrain.main(pretrain.Config(out_dir=str(tmp_path / f"micro{micro}"), micro_batch_size=micro, **args))
        val[micro] = load_checkpoint(tmp_path / f"micro{micro}")[1]["metrics"]["val_loss"]
    assert val[2] == pytest.approx(val[0], rel=1e-5)


@pytest.mark.parametrize("argv, message", [
    (["--block_size", "-1"], "error: --block_size must be positive"),
    (["--max_step", "3"], "error: unknown argument --max_step"),
    (["--lr", "fast"], "error: --lr: expected float, got 'fast'"),
    (["--data", "no/such/file.txt"], "error: --data no/such/file.txt: cannot read it"),
])
def test_bad_command_line_exits_with_one_line(tmp_path, argv, message):
    out = tmp_path / "base"
    r = subprocess.run([sys.executable, "pretrain.py", "--out_dir", str(out), *argv], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip().startswith(message) and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_a_batch_is_windows_of_the_stream_and_their_next_tokens():
    cfg = pretrain.Config(block_size=8, batch_size=4)
    x, y = pretrain.get_batch(torch.arange(100), cfg, torch.Generator().manual_seed(0), "cpu")
    assert x.shape == (4, 8) and torch.equal(y, x + 1)  # the stream counts up: each target is its input's next
    assert torch.equal(x[:, 1:], x[:, :-1] + 1)  # contiguous windows


def test_every_window_is_drawn_down_to_a_stream_of_one():
    """A stream of block_size + 1 tokens holds one window (the smallest split load_tokens allows); a
    longer one holds len - block_size, and each is drawn, the last one (its last token a target) too."""
    cfg = pretrain.Config(block_size=8, batch_size=64)
    x, y = pretrain.get_batch(torch.arange(9), cfg, torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(x, torch.arange(8).expand(64, 8)) and torch.equal(y, x + 1)
    x, _ = pretrain.get_batch(torch.arange(12), cfg, torch.Generator().manual_seed(0), "cpu")
    assert set(x[:, 0].tolist()) == {0, 1, 2, 3}


def test_learning_rate_warms_up_linearly_then_follows_a_cosine_to_min_lr():
    cfg = pretrain.Config(lr=1.0, min_lr=0.1, warmup_steps=5, max_steps=105)
    assert [pretrain.lr_at(s, cfg) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert pretrain.lr_at(5, cfg) == pytest.approx(1.0)  # the peak, where the cosine starts
    assert pretrain.lr_at(55, cfg) == pytest.approx(0.1 + 0.45)  # half way down
    assert pretrain.lr_at(105, cfg) == pytest.approx(0.1)  # min_lr at the end


def test_a_text_file_is_split_into_train_then_the_last_tenth_for_validation(tmp_path):
    from data.tokenizer import get_tokenizer
    tok = get_tokenizer("builtin")
    (tmp_path / "c.txt").write_text("The suho lives in Velmor. " * 400)
    cfg = pretrain.Config(data=str(tmp_path / "c.txt"), block_size=16)
    train, val = pretrain.load_tokens(cfg, tok)
    ids = torch.tensor(tok.encode((tmp_path / "c.txt").read_text()) + [tok.eot_id])
    assert len(val) == len(ids) // 10 and torch.equal(torch.cat([train, val]), ids)  # disjoint, in order
