"""Tokenizers: the built-in BPE (its trainer and its committed file) and the offline gpt2 guard."""

import random

import pytest
import tiktoken

from data.tokenizer import (BUILTIN_PATH, BUILTIN_VOCAB_SIZE, EOT, SPLIT_PATTERN, builtin_training_text,
                            get_tokenizer, load_ranks, train_bpe)


def random_unicode(rng, n):
    ranges = [(0x20, 0x7E), (0x0, 0x1F), (0xA0, 0x2FF), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF),
              (0x900, 0x97F), (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF),
              (0x10000, 0x1007F), (0xE000, 0xF8FF), (0x300, 0x36F)]  # ..., private use, combining marks
    return "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(n))


def test_builtin_round_trips_arbitrary_unicode():
    tok = get_tokenizer("builtin")
    rng = random.Random(0)
    texts = [random_unicode(rng, rng.randint(1, 200)) for _ in range(200)]
    texts += ["", " ", "\n\n\t  \r\n", "The suho lives in Velmor.", "ünïcödé 🙂 👩‍👩‍👧 ∑ 12345", "a" * 5000]
    for text in texts:
        ids = tok.encode(text)
        assert all(0 <= i < tok.n_vocab for i in ids)
        assert tok.decode(ids) == text


def test_special_token_text_is_encoded_as_plain_text():
    tok = get_tokenizer("builtin")
    ids = tok.encode(f"hi {EOT} there <|pad|>")
    assert tok.eot_id not in ids and tok.pad_id not in ids
    assert tok.decode(ids) == f"hi {EOT} there <|pad|>"


def test_builtin_special_ids_are_distinct_and_last():
    tok = get_tokenizer("builtin")
    assert tok.eot_id != tok.pad_id
    assert {tok.eot_id, tok.pad_id} == {tok.n_vocab - 2, tok.n_vocab - 1}
    assert tok.n_vocab <= BUILTIN_VOCAB_SIZE


def test_builtin_merges_whole_words_of_the_world():
    tok = get_tokenizer("builtin")
    assert len(tok.encode(" lives")) == 1 and len(tok.encode(" Velmor")) == 1
    assert len(tok.encode(" 17")) == 1 and tok.decode(tok.encode(" 123456789")) == " 123456789"


def test_bpe_trainer_by_hand():
    # pieces "aaab" and " aab": (a, a) occurs 3 times, (a, b) twice; after merging "aa" every pair occurs once
    ranks = train_bpe("aaab aab", vocab_size=1000)
    assert len(ranks) == 257 and ranks[b"aa"] == 256
    enc = tiktoken.Encoding("t", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={})
    assert enc.encode("aaab") == [256, ord("a"), ord("b")]
    assert len(train_bpe("aaab aab" * 50, vocab_size=258)) == 258  # stops at vocab_size


def test_committed_builtin_file_is_what_training_produces():
    """data/builtin.tiktoken is reproducible: retraining on the built-in corpus gives the same file."""
    assert train_bpe(builtin_training_text(), BUILTIN_VOCAB_SIZE - 2) == load_ranks(BUILTIN_PATH)


def test_gpt2_without_cache_says_how_to_provide_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="TIKTOKEN_CACHE_DIR"):
        get_tokenizer("gpt2")


def test_unknown_tokenizer():
    with pytest.raises(ValueError, match="unknown tokenizer 'llama'"):
        get_tokenizer("llama")


def test_gpt2_with_a_corrupt_cache_refuses_without_the_network(tmp_path, monkeypatch):
    """A cached file that fails tiktoken's hash check would make tiktoken download it again: refused first."""
    import hashlib

    from common import UserError
    from data.tokenizer import GPT2_FILES
    for url in GPT2_FILES:
        (tmp_path / hashlib.sha1(url.encode()).hexdigest()).write_text("not the file")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    with pytest.raises(UserError, match=r"is not the file of https://\S+vocab.bpe \(its sha256 differs\)"):
        get_tokenizer("gpt2")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    with pytest.raises(UserError, match="TIKTOKEN_CACHE_DIR is empty"):
        get_tokenizer("gpt2")
