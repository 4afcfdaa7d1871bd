"""sample.py: the samples of several checkpoints, side by side, against each model's own decoding."""

import json
from dataclasses import asdict

import pytest
import torch

import common
import sample
from data.tokenizer import get_tokenizer
from model import GPT, GPTConfig, complete, load_checkpoint, save_checkpoint


def test_greedy_samples_side_by_side_with_reward_scores(tiny_chain, tmp_path):
    out = tmp_path / "samples.jsonl"
    sample.main(sample.Config(checkpoints=f"{tiny_chain['base']},{tiny_chain['sft']}", chat="What does the suho eat?",
                              max_new_tokens=10, reward=tiny_chain["rm"], out=str(out), device="cpu"))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    prompt = "Human: What does the suho eat?\n\nAssistant:"  # the chat template of every stage
    assert [r["checkpoint"] for r in rows] == [tiny_chain["base"], tiny_chain["sft"]] and {r["prompt"] for r in rows} == {prompt}
    tok = get_tokenizer("builtin")
    rm, info = load_checkpoint(tiny_chain["rm"], head="scalar")
    for r in rows:
        model, _ = load_checkpoint(r["checkpoint"], head="lm")
        want = complete(model.eval(), tok, [prompt], 10, temperature=0)[0]
        assert r["response"] + ("<|endoftext|>" if r["stopped"] else "") == want
        # the reward model read at the response's last token, normalised as in PPO
        ids = tok.encode_prompt(prompt) + tok.encode(r["response"]) + ([tok.eot_id] if r["stopped"] else [])
        with torch.no_grad():
            raw = rm(torch.tensor([ids]))[0][0, -1].item()
        assert r["reward"] == pytest.approx(info["reward_norm"]["gain"] * raw + info["reward_norm"]["bias"], abs=1e-4)


def test_an_out_that_cannot_be_written_is_refused_before_sampling(tiny_chain, tmp_path, monkeypatch):
    sampled = []
    monkeypatch.setattr(sample, "complete_ids", lambda *a, **k: sampled.append(1))  # must never be reached
    (tmp_path / "afile").write_text("x")
    for out, message in ((tmp_path, "is a directory"), (tmp_path / "afile" / "s.jsonl", "afile is a file, not a directory")):
        with pytest.raises(common.UserError, match=f"--out {out}.*{message}"):
            sample.main(sample.Config(checkpoints=tiny_chain["sft"], chat="Hi?", out=str(out), device="cpu"))
    prompts = tmp_path / "prompts.jsonl"  # the user's prompts, which the samples overwrote
    prompts.write_text(json.dumps({"prompt": "Human: Hi?\n\nAssistant:"}) + "\n")
    with pytest.raises(common.UserError, match=f"--out {prompts} is also --data: it would overwrite the file it reads"):
        sample.main(sample.Config(checkpoints=tiny_chain["sft"], data=str(prompts), out=str(prompts), device="cpu"))
    with pytest.raises(common.UserError, match=f"{tiny_chain['rm']} has a scalar head"):  # before sampling the first
        sample.main(sample.Config(checkpoints=f"{tiny_chain['sft']},{tiny_chain['rm']}", chat="Hi?", device="cpu"))
    assert not sampled and not (tmp_path / "afile.tmp").exists()


def test_several_samples_per_prompt_are_seeded(tiny_chain, tmp_path):
    runs = []
    for seed in (0, 0, 1):
        out = tmp_path / f"s{len(runs)}.jsonl"
        sample.main(sample.Config(checkpoints=tiny_chain["sft"], n_prompts=2, n_samples=3, temperature=1.0,
                                  max_new_tokens=8, seed=seed, out=str(out), device="cpu"))
        runs.append([json.loads(line) for line in out.read_text().splitlines()])
    assert len(runs[0]) == 6 and [r["prompt"] for r in runs[0]][::3] == [r["prompt"] for r in runs[0]][1::3]
    assert runs[0] == runs[1] and runs[0] != runs[2]  # the same seed, the same samples


@pytest.mark.parametrize("args, message", [
    (dict(chat="hi", prompt="hi"), "give one of --chat, --prompt and --data"),
    (dict(n_samples=2), "--n_samples 2 needs --temperature above 0"),
    (dict(temperature=-1.0), "--temperature must be 0 (greedy) or more"),
    (dict(max_new_tokens=0), "--max_new_tokens must be at least 1"),
])
def test_bad_arguments_are_refused(tiny_chain, args, message):
    with pytest.raises(common.UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sample.main(sample.Config(checkpoints=tiny_chain["sft"], device="cpu", **args))


def test_a_reward_model_that_cannot_read_a_whole_sample_is_refused(tiny_chain, tmp_path):
    rm, info = load_checkpoint(tiny_chain["rm"], head="scalar")
    meta = {k: v for k, v in info.items() if k != "model"}  # the config is the new model's
    save_checkpoint(tmp_path / "short", GPT(GPTConfig(**{**asdict(rm.config), "block_size": 32})), meta)
    with pytest.raises(common.UserError, match="has a context of 32 tokens, shorter than"):
        sample.main(sample.Config(checkpoints=tiny_chain["sft"], reward=str(tmp_path / "short"), device="cpu"))


def test_a_hugging_face_directory_samples_as_its_checkpoint(tiny_chain, tmp_path):
    """--checkpoints takes a GPT-2 directory as written by `python -m model export`: the same answers."""
    from model import export_hf
    model, info = load_checkpoint(tiny_chain["sft"], head="lm")
    export_hf(model, tmp_path / "hf", {k: info[k] for k in ("tokenizer", "tokenizer_fingerprint")})
    out = tmp_path / "samples.jsonl"
    sample.main(sample.Config(checkpoints=f"{tiny_chain['sft']},{tmp_path / 'hf'}", n_prompts=3, max_new_tokens=8,
                              out=str(out), device="cpu"))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["response"] for r in rows[:3]] == [r["response"] for r in rows[3:]]


def test_a_long_prompt_is_cut_to_leave_room_for_the_response(tiny_chain, tmp_path):
    """As ppo.py cuts its prompts: one prompt near the end of the context does not shorten the other
    prompts' responses (they are sampled in one batch), and a prompt longer than the context is
    scored by the reward model as the policy read it (it used to end in a ValueError's traceback)."""
    short, near, long = ("Human: What does the suho eat?\n\nAssistant:", "Human: " + "x y " * 12 + "?\n\nAssistant:",
                         "Human: " + "the suho eats " * 40 + "?\n\nAssistant:")
    tok = get_tokenizer("builtin")
    assert len(tok.encode_prompt(short)) + 20 <= 64 < len(tok.encode_prompt(near)) + 20 and len(tok.encode_prompt(long)) > 64
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in (short, near, long)))
    out = tmp_path / "samples.jsonl"
    sample.main(sample.Config(checkpoints=tiny_chain["sft"], data=str(data), max_new_tokens=20, reward=tiny_chain["rm"],
                              out=str(out), device="cpu"))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    model, _ = load_checkpoint(tiny_chain["sft"], head="lm")
    alone = complete(model.eval(), tok, [short], 20, temperature=0)[0]  # the short prompt sampled on its own
    assert rows[0]["response"] + ("<|endoftext|>" if rows[0]["stopped"] else "") == alone
    assert all(r["reward"] is not None for r in rows) and [r["prompt"] for r in rows] == [short, near, long]


@pytest.mark.parametrize("args, message", [
    (dict(temperature=1.0, top_p=0.0), "--top_p must be in (0, 1], got 0.0"),
    (dict(temperature=1.0, top_k=-1), "--top_k must be 0 (all) or more, got -1"),
])
def test_bad_sampling_filters_are_refused(tiny_chain, args, message):
    with pytest.raises(common.UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        sample.main(sample.Config(checkpoints=tiny_chain["sft"], device="cpu", **args))


def test_an_empty_checkpoint_list_is_refused():
    with pytest.raises(common.UserError, match="--checkpoints names no checkpoint: ','"):
        sample.main(sample.Config(checkpoints=",", device="cpu"))


@pytest.mark.parametrize("flag", [dict(top_k=1), dict(top_p=1e-6)])
def test_top_k_and_top_p_reach_the_sampler(tiny_chain, tmp_path, flag):
    """At temperature 1, keeping only the most likely token is greedy decoding."""
    runs = []
    for args in (dict(temperature=0.0), dict(temperature=1.0, **flag)):
        out = tmp_path / "s.jsonl"
        sample.main(sample.Config(checkpoints=tiny_chain["sft"], n_prompts=3, max_new_tokens=8, out=str(out), device="cpu", **args))
        runs.append([json.loads(line)["response"] for line in out.read_text().splitlines()])
    assert runs[0] == runs[1]
