"""data/formats.py: every format detected and read from a file written here, the chat template, HH-RLHF
transcripts, bad files named by file and line, the policy for long examples, `python -m data`, and the
stages run end to end on real-format files (and from an exported GPT-2 directory)."""

import gzip
import json
import time

import pytest
import torch

import data.__main__ as inspect_data
import dpo
import pretrain
import reward
import sft
from common import UserError
from data.formats import (Dataset, chat_prompt, check_out_file, common_prefix, fit, preference_rows, prompt_completion_rows,
                          prompt_rows, split_transcripts, write_rows)
from data.tasks import PROMPT
from model import export_hf, load_checkpoint

HH_CHOSEN = "\n\nHuman: Where does the suho live?\n\nAssistant: It lives in Velmor."
HH_REJECTED = "\n\nHuman: Where does the suho live?\n\nAssistant: It lives in Oskar. Great question!"
USER, ASSISTANT = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}
Q = "Where does the suho live?"
P = PROMPT.format(question=Q)  # the built-in prompt form: "Human: ...\n\nAssistant:"


def write(path, rows):
    """rows as .jsonl, .jsonl.gz or a .json array, by the file's name."""
    if path.name.endswith(".json"):
        path.write_text(json.dumps(rows, indent=1))
    else:
        text = "".join(json.dumps(r) + "\n" for r in rows)
        path.write_bytes(gzip.compress(text.encode()) if path.name.endswith(".gz") else text.encode())
    return path


CASES = [  # (rows, task, detected format, the first row as a stage gets it)
    ([{"text": "one doc"}, {"text": "two"}], "lm", "text", {"text": "one doc"}),
    ([{"prompt": P, "completion": " It lives in Velmor."}], "sft", "prompt_completion",
     {"prompt": P, "completion": " It lives in Velmor."}),
    ([{"instruction": Q, "input": "", "output": "In Velmor."}], "sft", "alpaca", {"prompt": P, "completion": " In Velmor."}),
    ([{"instruction": "Add.", "input": "2 and 3", "output": "5"}], "sft", "alpaca",
     {"prompt": "Human: Add.\n\n2 and 3\n\nAssistant:", "completion": " 5"}),
    ([{"messages": [{"role": "system", "content": "Be brief."}, USER, ASSISTANT, {"role": "user", "content": Q},
                    {"role": "assistant", "content": "In Velmor."}]}], "sft", "chat",
     {"prompt": f"System: Be brief.\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: {Q}\n\nAssistant:", "completion": " In Velmor."}),
    ([{"prompt": P, "chosen": " A.", "rejected": " B."}], "preference", "preference", {"prompt": P, "chosen": " A.", "rejected": " B."}),
    ([{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}], "sft", "implicit_prompt", {"prompt": P, "completion": " It lives in Velmor."}),
    ([{"prompt": [{"role": "user", "content": Q}], "chosen": [{"role": "assistant", "content": "A."}],
       "rejected": [{"role": "assistant", "content": "B."}]}], "preference", "preference",
     {"prompt": P, "chosen": " A.", "rejected": " B."}),
    ([{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}], "preference", "implicit_prompt",
     {"prompt": P, "chosen": " It lives in Velmor.", "rejected": " It lives in Oskar. Great question!"}),
    ([{"chosen": [USER, ASSISTANT], "rejected": [USER, {"role": "assistant", "content": "Go away."}]}], "preference",
     "implicit_prompt", {"prompt": "Human: Hi\n\nAssistant:", "chosen": " Hello!", "rejected": " Go away."}),
    ([{"input": {"messages": [{"role": "user", "content": Q}]}, "preferred_output": [{"role": "assistant", "content": "A."}],
       "non_preferred_output": [{"role": "assistant", "content": "B."}]}], "preference", "openai_preference",
     {"prompt": P, "chosen": " A.", "rejected": " B."}),
    ([{"prompt": Q, "chosen": [{"role": "user", "content": Q}, {"role": "assistant", "content": "A."}],  # UltraFeedback
       "rejected": [{"role": "user", "content": Q}, {"role": "assistant", "content": "B."}], "score_chosen": 8.0}],
     "preference", "preference", {"prompt": P, "chosen": " A.", "rejected": " B."}),
    ([{"prompt": Q, "chosen": [{"role": "user", "content": Q}, {"role": "assistant", "content": "A."}],
       "rejected": [{"role": "user", "content": Q}, {"role": "assistant", "content": "B."}]}], "sft", "preference",
     {"prompt": P, "completion": " A."}),
    ([{"prompt": P}], "prompt", "prompt", {"prompt": P}),
    ([{"messages": [USER, ASSISTANT]}], "prompt", "chat", {"prompt": "Human: Hi\n\nAssistant:"}),
    ([{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}], "prompt", "implicit_prompt", {"prompt": P}),
]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".json"])
@pytest.mark.parametrize("rows, task, fmt, first", CASES, ids=[f"{c[2]}-{i}" for i, c in enumerate(CASES)])
def test_each_format_is_detected_and_read(tmp_path, suffix, rows, task, fmt, first):
    path = write(tmp_path / f"data{suffix}", rows)
    data = Dataset(path, task)
    assert data.format == fmt and data.skipped == [] and len(data.rows) == len(rows)
    assert data.rows[0] == {**first, "where": f"{path}:{2 if suffix == '.json' else 1}"}


def test_the_chat_template_is_the_built_in_prompt_form():
    assert chat_prompt([{"role": "user", "content": Q}]) == P == f"Human: {Q}\n\nAssistant:"


def test_sft_on_a_preference_file_learns_the_chosen_side_of_its_own_conversation(tmp_path):
    """SFT reads a preference file's chosen responses, each split from its own conversation: where an
    HH transcript parts from the rejected one before the last turn, the demonstration is still the last
    assistant turn alone (never a Human turn in the target), and a row counts whatever its rejected side."""
    middle = dict(chosen="\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Bye\n\nAssistant: Bye!",
                  rejected="\n\nHuman: Hi\n\nAssistant: Go away.\n\nHuman: Bye\n\nAssistant: Finally.")
    hh = [middle, dict(chosen=HH_CHOSEN, rejected=HH_CHOSEN), dict(chosen=HH_CHOSEN, rejected="\n\nHuman: Hi\n\nAssistant:"),
          dict(chosen="\n\nHuman: Hi\n\nAssistant: ", rejected=HH_REJECTED), dict(chosen="no marker", rejected="x"),
          dict(chosen="\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Bye", rejected="\n\nHuman: Hi\n\nAssistant: Go.")]
    data = Dataset(write(tmp_path / "hh.jsonl", hh), "sft")
    assert [(r["prompt"], r["completion"]) for r in data.rows] == [
        ("Human: Hi\n\nAssistant: Hello.\n\nHuman: Bye\n\nAssistant:", " Bye!"), (P, " It lives in Velmor."),
        (P, " It lives in Velmor.")]
    assert [reason for _, reason in data.skipped] == ["an empty chosen response", "the chosen transcript has no '\\n\\nAssistant:'",
                                                      "the chosen transcript does not end with the assistant's turn"]
    conversations = [{"chosen": [USER, ASSISTANT, {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye!"}],
                      "rejected": [USER, {"role": "assistant", "content": "Go away."}]}]
    assert [(r["prompt"], r["completion"]) for r in Dataset(write(tmp_path / "c.jsonl", conversations), "sft").rows] == [
        ("Human: Hi\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant:", " Bye!")]
    same = [{"prompt": P, "chosen": " A.", "rejected": " A."},
            {"input": {"messages": [USER]}, "preferred_output": [ASSISTANT], "non_preferred_output": [ASSISTANT]}]
    assert [(r["prompt"], r["completion"]) for r in Dataset(write(tmp_path / "p.jsonl", same[:1]), "sft").rows] == [(P, " A.")]
    assert [(r["prompt"], r["completion"]) for r in Dataset(write(tmp_path / "o.jsonl", same[1:]), "sft").rows] == [
        ("Human: Hi\n\nAssistant:", " Hello!")]


def test_hh_transcripts_that_part_early(tmp_path):
    middle = dict(chosen="\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Bye\n\nAssistant: Bye!",
                  rejected="\n\nHuman: Hi\n\nAssistant: Go away.\n\nHuman: Bye\n\nAssistant: Finally.")
    same_words = dict(chosen="\n\nHuman: Hi\n\nAssistant: Yes, I can.", rejected="\n\nHuman: Hi\n\nAssistant: Yes, but no.")
    first_turn = dict(chosen="\n\nHuman: Hi\n\nAssistant: A", rejected="\n\nHuman: Ho\n\nAssistant: A")
    path = write(tmp_path / "hh.jsonl", [middle, same_words, first_turn, dict(chosen=HH_CHOSEN, rejected=HH_CHOSEN)])
    rows = preference_rows(path)
    # they part at the first assistant turn: the prompt ends at the last "Assistant:" they share
    assert rows[0]["prompt"] == "Human: Hi\n\nAssistant:"
    assert rows[0]["chosen"] == " Hello.\n\nHuman: Bye\n\nAssistant: Bye!"
    assert rows[0]["rejected"] == " Go away.\n\nHuman: Bye\n\nAssistant: Finally."
    # a shared first word stays in the responses, not in the prompt
    assert (rows[1]["prompt"], rows[1]["chosen"], rows[1]["rejected"]) == ("Human: Hi\n\nAssistant:", " Yes, I can.", " Yes, but no.")
    assert Dataset(path, "preference").skipped == [
        (f"{path}:3", "chosen and rejected share no prompt ending in '\\n\\nAssistant:'"),
        (f"{path}:4", "chosen and rejected are the same")]


def test_transcripts_that_share_their_first_turns_split_at_the_last_shared_assistant():
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: And the suho?\n\nAssistant: It lives in Velmor."
    rejected = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: And the suho?\n\nAssistant: No idea."
    assert split_transcripts(chosen, rejected) == (
        "Human: Hi\n\nAssistant: Hello.\n\nHuman: And the suho?\n\nAssistant:", " It lives in Velmor.", " No idea.")


def test_long_transcripts_split_at_c_speed():
    """HH-RLHF's 160k rows share prompts of about a thousand characters: a Python loop over the
    characters (2 s here for 10 rows of a million) made startup take minutes; now it is slice
    comparisons, by halving."""
    for a, b in [("", ""), ("abc", ""), ("abc", "abc"), ("abcd", "abxd"), ("abc", "abcde"), ("x", "y")]:
        assert common_prefix(a, b) == next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    assert common_prefix([USER, ASSISTANT], [USER, {**ASSISTANT, "content": "Bye"}]) == 1
    shared = "\n\nHuman: " + "why " * 250_000 + "\n\nAssistant:"
    t0 = time.perf_counter()
    for i in range(10):
        prompt, chosen, rejected = split_transcripts(shared + f" Yes {i}.", shared + " No.")
    assert time.perf_counter() - t0 < 0.5
    assert (prompt, chosen, rejected) == (shared.lstrip("\n"), " Yes 9.", " No.")


def test_bad_files_are_named_by_file_and_line(tmp_path, capsys):
    bad = tmp_path / "d.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "completion": " b"}) + "\n\n" + '{"prompt": "a"\n')
    with pytest.raises(UserError, match=r"d.jsonl:3: not valid JSON"):
        prompt_completion_rows(bad)
    bad.write_text(json.dumps({"prompt": "a", "completion": " b"}) + "\n" + json.dumps({"prompt": "a"}) + "\n")
    with pytest.raises(UserError, match=r"d.jsonl:2: missing field 'completion'"):
        prompt_completion_rows(bad)
    bad.write_text(json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(UserError, match=r"d.jsonl:1: messages message 0 has role 'robot'"):
        prompt_completion_rows(bad)
    bad.write_text(json.dumps({"question": "a", "answer": "b"}) + "\n")
    with pytest.raises(UserError, match=r"d.jsonl:1: missing field 'chosen' \(the row has \['answer', 'question'\]\); "
                                        r"reward and dpo reads"):
        preference_rows(bad)
    bad.write_text(json.dumps({"prompt": "a", "completion": " b"}) + "\n" + json.dumps({"messages": [USER, ASSISTANT]}) + "\n")
    with pytest.raises(UserError, match=r"d.jsonl:2: missing field 'completion' \(the row has \['messages'\]\); the file's "
                                        r"first row is in the prompt_completion format"):
        prompt_completion_rows(bad)  # a row in another format than the first is named as such
    bad.write_text("[1, 2]\n")
    with pytest.raises(UserError, match=r"d.jsonl:1: expected a JSON object, got list"):
        prompt_rows(bad)
    arr = tmp_path / "d.json"
    arr.write_text('[\n {"prompt": "a"},\n {"prompt": 3}\n]')
    with pytest.raises(UserError, match=r"d.json:3: field 'prompt' must be a string or a list of messages, got int"):
        prompt_rows(arr)
    arr.write_text('[\n {"prompt": "a"},\n {"prompt": }\n]')
    with pytest.raises(UserError, match=r"d.json:3: not valid JSON"):
        prompt_rows(arr)
    for empty, text in ((bad, "\n \n"), (arr, "[ ]"), (tmp_path / "e.txt", "  \n")):
        empty.write_text(text)
        with pytest.raises(UserError, match=r": no (rows|text) \(the file is empty\)"):
            Dataset(empty, "lm" if empty.suffix == ".txt" else "prompt")
    bad.write_text(json.dumps({"prompt": "a", "chosen": " b", "rejected": " b"}) + "\n")
    with pytest.raises(UserError, match=r"no usable rows: all 1 were skipped \(\S+d.jsonl:1: chosen and rejected are the same\)"):
        preference_rows(bad)
    capsys.readouterr()


def test_damaged_odd_and_unwritable_files_get_one_line(tmp_path):
    rows = [{"prompt": f"Human: {i}?\n\nAssistant:", "chosen": " a", "rejected": " b"} for i in range(300)]
    gz = bytearray(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    gz[30:60] = bytes(b ^ 255 for b in gz[30:60])  # a damaged download: zlib's error, not OSError
    (tmp_path / "c.jsonl.gz").write_bytes(gz)
    with pytest.raises(UserError, match=r"c.jsonl.gz: cannot read it \("):
        preference_rows(tmp_path / "c.jsonl.gz")
    (tmp_path / "d.JSON").write_text(json.dumps(rows[:2]))  # the extension in capitals is still JSON
    assert len(preference_rows(tmp_path / "d.JSON")) == 2
    (tmp_path / "l.json").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))  # datasets' to_json writes these
    with pytest.raises(UserError, match=r"l.json:1: a .json file must hold one array of objects \(one object per line is "
                                        r"JSON Lines: name the file .jsonl\)"):
        preference_rows(tmp_path / "l.json")
    (tmp_path / "i.jsonl").write_text('{"prompt": ' + "9" * 5000 + "}\n")  # past Python's int digits limit
    with pytest.raises(UserError, match=r"i.jsonl:1: not valid JSON \(Exceeds the limit"):
        prompt_rows(tmp_path / "i.jsonl")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match=r"--pairs_out \S+afile/x.jsonl: \S+afile is a file, not a directory"):
        check_out_file(str(tmp_path / "afile" / "x.jsonl"), "--pairs_out")
    with pytest.raises(UserError, match=r"afile/x.jsonl: cannot write it"):
        write_rows(str(tmp_path / "afile" / "x.jsonl"), rows)
    check_out_file(str(tmp_path / "new" / "dir" / "x.jsonl"), "--out")  # missing directories are made when written
    with pytest.raises(UserError, match=r"--out \S+new/ is a directory"):  # a directory to be, not a file
        check_out_file(str(tmp_path / "new") + "/", "--out")
    for name in ("r.json", "r.JSONL", "r.jsonl.gz", "r.json.GZ"):  # written as their names say, read back by every stage
        write_rows(str(tmp_path / name), rows[:3])
        assert [r["prompt"] for r in preference_rows(tmp_path / name)] == [r["prompt"] for r in rows[:3]]
        write_rows(str(tmp_path / f"t{name}"), [{"text": "hello"}])  # pretrain's --data: JSON rows, not a text file
        assert [r["text"] for r in Dataset(tmp_path / f"t{name}", "lm").rows] == ["hello"]
    assert sorted(p.name for p in tmp_path.iterdir() if ".tmp" in p.name) == []


def test_jsonl_rows_end_at_newlines_only(tmp_path):
    """JSON allows U+2028, U+2029 and U+0085 raw in a string: they split no row. A byte-order mark and
    Windows line ends are read too."""
    odd = " It\u2028lives\u2029in\x85Velmor."
    rows = [{"prompt": P, "completion": odd}, {"prompt": P, "completion": " B."}]
    path = tmp_path / "d.jsonl"
    path.write_bytes(("\ufeff" + "".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows)).encode())
    got = prompt_completion_rows(path)
    assert [r["completion"] for r in got] == [odd, " B."] and got[1]["where"] == f"{path}:2"
    arr = tmp_path / "d.json"
    arr.write_bytes(("\ufeff" + json.dumps(rows, ensure_ascii=False)).encode())
    assert [r["completion"] for r in prompt_completion_rows(arr)] == [odd, " B."]


def test_long_examples_lose_the_prompts_start_or_are_dropped():
    prompt = list(range(30))
    assert fit(prompt, [[1] * 10, [2] * 5], 32) == (prompt[-22:], [[1] * 10, [2] * 5])  # room for the longer response
    assert fit(prompt, [[1] * 24], 32) == (prompt[-8:], [[1] * 24])  # a quarter of the context is left to the prompt
    assert fit(prompt, [[1] * 25], 32) is None  # less than a quarter: dropped
    assert fit([7, 8], [[1] * 30], 32) == ([7, 8], [[1] * 30])  # a short prompt needs only itself


def test_python_m_data_shows_what_a_stage_reads(tmp_path, capsys):
    path = write(tmp_path / "hh.jsonl", [dict(chosen=HH_CHOSEN, rejected=HH_REJECTED), dict(chosen=HH_CHOSEN, rejected=HH_CHOSEN)])
    inspect_data.main(str(path), inspect_data.Config(block_size=64))
    out = capsys.readouterr().out
    assert f"{path}: implicit_prompt format, 1 rows, 1 skipped" in out and f"skipped {path}:2: chosen and rejected are the same" in out
    assert "0 prompts cut from the left and 0 examples dropped" in out
    assert "prompt, " in out and repr(P) in out and repr(" It lives in Velmor.<|endoftext|>") in out

# -----------------------------------------------------------------------------
# the stages on files of these formats, a couple of steps each on a tiny model


def test_stages_end_to_end_on_real_formats(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Human: Where does the suho live?\n\nAssistant: It lives in Velmor.\n\n" * 40)
    base = tmp_path / "base"
    pretrain.main(pretrain.Config(out_dir=str(base), data=str(corpus), max_steps=3, n_layer=1, n_head=2, n_embd=32,
                                  block_size=64, batch_size=4, warmup_steps=1, log_every=1, eval_every=3,
                                  eval_batches=1, device="cpu"))
    model, info = load_checkpoint(base)
    export_hf(model, tmp_path / "hf", {k: info[k] for k in ("tokenizer", "tokenizer_fingerprint")})

    alpaca = write(tmp_path / "alpaca.json", [{"instruction": f"Where does the {n} live?", "input": "",
                                               "output": "It lives in Velmor."} for n in ("suho", "gomi", "tavi", "rell")])
    sft.main(sft.Config(init=str(tmp_path / "hf"), out_dir=str(tmp_path / "sft"), data=str(alpaca), epochs=1,
                        batch_size=2, n_samples=1, device="cpu"))
    _, info = load_checkpoint(tmp_path / "sft", head="lm", tokenizer="builtin")
    assert info["parent"] == str(tmp_path / "hf") and info["metrics"]["demonstrations"] == 3

    hh = write(tmp_path / "hh.jsonl.gz", [dict(chosen=HH_CHOSEN.replace("suho", n), rejected=HH_REJECTED.replace("suho", n))
                                          for n in ("suho", "gomi", "tavi", "rell", "pim")])
    reward.main(reward.Config(init=str(tmp_path / "sft"), out_dir=str(tmp_path / "rm"), data=str(hh), batch_size=2,
                              norm_prompts=4, device="cpu"))
    info = load_checkpoint(tmp_path / "rm", head="scalar")[1]
    assert info["metrics"]["train_pairs"] == 4 and info["metrics"]["val_pairs"] == 1
    dpo.main(dpo.Config(init=str(tmp_path / "sft"), out_dir=str(tmp_path / "dpo"), data=str(hh), batch_size=2, epochs=1,
                        n_samples=1, device="cpu"))
    info = load_checkpoint(tmp_path / "dpo", head="lm")[1]
    assert info["metrics"]["steps"] == 2 and info["metrics"]["train_pairs"] == 4


def test_a_text_corpus_splits_into_documents_at_the_literal_endoftext(tmp_path):
    """GPT-2's training text separates documents with the literal <|endoftext|>: each part is a document
    (joined again by the real token, not the text's 13 characters), empty parts skipped, each row naming
    the line it starts on."""
    from data.formats import text_documents
    from data.tokenizer import get_tokenizer
    path = tmp_path / "c.txt"
    path.write_text("The suho lives in Velmor.\n<|endoftext|>\nThe gomi eats seeds.\nIt is blue.<|endoftext|>  \n<|endoftext|>")
    assert text_documents(str(path)) == ["The suho lives in Velmor.\n", "\nThe gomi eats seeds.\nIt is blue."]
    assert [r["where"] for r in Dataset(str(path), "lm").rows] == [f"{path}:1", f"{path}:3"]  # the line of its first text
    tok = get_tokenizer("builtin")
    train, val = pretrain.load_tokens(pretrain.Config(data=str(path), block_size=4), tok)
    ids = torch.cat([train, val]).tolist()
    assert ids.count(tok.eot_id) == 2 and tok.decode(ids).count("<|endoftext|>") == 2  # the real token, twice
    (tmp_path / "e.txt").write_text("<|endoftext|>\n<|endoftext|>")
    with pytest.raises(UserError, match=f"{tmp_path / 'e.txt'}: no text between its 2 <|endoftext|> separators"):
        Dataset(str(tmp_path / "e.txt"), "lm")
