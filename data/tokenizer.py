"""
Tokenizers, all of them `tiktoken` encodings behind one small class.

- "builtin": a byte-level BPE trained by `train_bpe` below on the built-in corpus and stored in
  data/builtin.tiktoken (tiktoken's own format: one "base64(token bytes) rank" line per token).
  Every byte is a token, so any Unicode text round-trips. Rebuild it with
      python -m data.tokenizer
- "gpt2": GPT-2's BPE through tiktoken. It is never downloaded here: tiktoken must find its files in
  its cache (TIKTOKEN_CACHE_DIR), or the error says how to put them there.

Special tokens: <|endoftext|> ends every document and every response, and is the whole of an empty
prompt (Tokenizer.encode_prompt); <|pad|> (builtin only) fills padding. GPT-2 has no padding token,
so it pads with <|endoftext|>; the code never relies on the pad id to tell padding apart (it keeps
lengths and masks).

BPE training (Sennrich et al. 2016, on bytes as in GPT-2): split the text into pieces with the
regex below (never merging across them), start from the 256 bytes, and repeatedly merge the most
frequent adjacent pair into a new token. tiktoken encodes by applying merges in rank order, which
reproduces the segmentation of training.
"""

import base64
import hashlib
import os
from collections import Counter, defaultdict
from pathlib import Path

import regex
import tiktoken

from common import UserError

# GPT-2's split: words, numbers, punctuation runs, whitespace (never merged across).
SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = "<|endoftext|>"
PAD = "<|pad|>"
BUILTIN_PATH = Path(__file__).parent / "builtin.tiktoken"
BUILTIN_VOCAB_SIZE = 2048  # an upper bound: training stops early when no pair occurs twice
GPT2_FILES = {  # what tiktoken reads for "gpt2", and the sha256 it expects of each
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe":
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json":
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


class TokenizerFilesMissing(UserError, FileNotFoundError):
    """tiktoken's files for a tokenizer are not in its cache (a UserError: one line, no traceback)."""


class Tokenizer:
    """A tiktoken encoding plus the ids this project needs. encode() treats special-token strings
    in user text as plain text, so no text can inject an <|endoftext|>."""

    def __init__(self, name, encoding, pad_token, ranks):
        self.name = name
        self.encoding = encoding
        self.eot_id = encoding.encode_single_token(EOT)
        self.pad_id = encoding.encode_single_token(pad_token)
        self.n_vocab = encoding.n_vocab
        # a digest of the vocabulary: two tokenizers with the same name but different merges differ here
        h = hashlib.sha256()
        for token, rank in sorted(ranks.items(), key=lambda x: x[1]):
            h.update(token + rank.to_bytes(4, "little"))
        self.fingerprint = h.hexdigest()[:16]

    @property
    def identity(self):
        """What a checkpoint records of its tokenizer (see tokenizer_for)."""
        return {"tokenizer": self.name, "tokenizer_fingerprint": self.fingerprint}

    def encode(self, text):
        return self.encoding.encode_ordinary(text)

    def encode_prompt(self, text):
        """The ids a response is conditioned on. An empty prompt is <|endoftext|> alone, as in GPT-2's
        unconditional samples: the first response token needs a position to be predicted from."""
        return self.encode(text) or [self.eot_id]

    def decode(self, ids):
        return self.encoding.decode(list(ids))


def get_tokenizer(name):
    if name == "builtin":
        if not BUILTIN_PATH.exists():
            raise FileNotFoundError(f"{BUILTIN_PATH} is missing: rebuild it with `python -m data.tokenizer`")
        ranks = load_ranks(BUILTIN_PATH)
        enc = tiktoken.Encoding("builtin", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks,
                                special_tokens={EOT: len(ranks), PAD: len(ranks) + 1})
        return Tokenizer("builtin", enc, PAD, ranks)
    if name == "gpt2":
        check_tiktoken_cache(GPT2_FILES, name)
        try:
            enc = tiktoken.get_encoding("gpt2")
        except (OSError, ValueError) as e:  # should not happen after the check: tiktoken went for the network
            raise TokenizerFilesMissing(f"tiktoken could not load the gpt2 tokenizer from its cache ({e})") from None
        return Tokenizer("gpt2", enc, EOT, enc._mergeable_ranks)
    raise ValueError(f"unknown tokenizer {name!r}: use 'builtin' or 'gpt2'")


def tokenizer_for(info, path):
    """The tokenizer the checkpoint at path (config dict info) was trained with, refusing one that
    has changed since it was trained (same name, other vocabulary)."""
    tok = get_tokenizer(info["tokenizer"])
    want = info.get("tokenizer_fingerprint", tok.fingerprint)
    if want != tok.fingerprint or info["model"]["vocab_size"] != tok.n_vocab:
        raise UserError(f"{path} was trained with another {tok.name} tokenizer than the one here "
                        f"(fingerprint {want}, vocabulary {info['model']['vocab_size']}; here {tok.fingerprint}, "
                        f"{tok.n_vocab}): retrain it, or restore the tokenizer file it was trained with")
    return tok


def check_tiktoken_cache(files, name):
    """tiktoken downloads a missing (or corrupt) file on first use; we refuse instead of touching the
    network. files: {url: sha256}. tiktoken keeps the file of url at CACHE/sha1(url)."""
    cache = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR"))
    if cache is None:
        import tempfile
        cache = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    how = (f"nothing is downloaded at run time: on a machine with network run `TIKTOKEN_CACHE_DIR=DIR python -c "
           f"\"import tiktoken; tiktoken.get_encoding('{name}')\"`, copy DIR here and set TIKTOKEN_CACHE_DIR=DIR")
    if cache == "":
        raise TokenizerFilesMissing(f"TIKTOKEN_CACHE_DIR is empty, which turns tiktoken's cache off; {how}")
    for url, sha256 in files.items():
        path = os.path.join(cache, hashlib.sha1(url.encode()).hexdigest())
        if not os.path.exists(path):
            raise TokenizerFilesMissing(f"the {name} tokenizer is not in tiktoken's cache ({path}, the file of {url} "
                                        f"is missing); {how}")
        with open(path, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != sha256:
                raise TokenizerFilesMissing(f"{path} in tiktoken's cache is not the file of {url} (its sha256 "
                                            f"differs); {how}")


def load_ranks(path):
    ranks = {}
    for line in Path(path).read_text().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


def save_ranks(ranks, path):
    lines = [f"{base64.b64encode(token).decode()} {rank}" for token, rank in sorted(ranks.items(), key=lambda x: x[1])]
    Path(path).write_text("\n".join(lines) + "\n")

# -----------------------------------------------------------------------------
# byte-level BPE training


def train_bpe(text, vocab_size):
    """Mergeable ranks {token bytes: rank} of at most vocab_size tokens, the 256 bytes first."""
    ranks = {bytes([b]): b for b in range(256)}
    # each distinct piece of the text, as a list of token byte strings, with its count
    counts = Counter(regex.findall(SPLIT_PATTERN, text))
    words = [[bytes([b]) for b in piece.encode("utf-8")] for piece in counts]
    freqs = list(counts.values())
    pair_counts = Counter()  # pair -> occurrences in the text
    where = defaultdict(set)  # pair -> indices of the words that contain it
    for i, w in enumerate(words):
        for pair in zip(w, w[1:]):
            pair_counts[pair] += freqs[i]
            where[pair].add(i)

    while len(ranks) < vocab_size and pair_counts:
        best = max(pair_counts, key=lambda p: (pair_counts[p], p))  # ties broken by bytes: deterministic
        if pair_counts[best] < 2:
            break
        merged = best[0] + best[1]
        if merged not in ranks:  # the same bytes can arise from two different pairs
            ranks[merged] = len(ranks)
        for i in where.pop(best):
            w, f = words[i], freqs[i]
            for pair in zip(w, w[1:]):  # forget this word's pairs, merge, count them again
                pair_counts[pair] -= f
                if pair_counts[pair] == 0:
                    del pair_counts[pair]
            j, new = 0, []
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == best:
                    new.append(merged)
                    j += 2
                else:
                    new.append(w[j])
                    j += 1
            words[i] = new
            for pair in zip(new, new[1:]):
                pair_counts[pair] += f
                where[pair].add(i)
    return ranks


def builtin_training_text():
    from data.world import make_corpus, make_world
    return "\n\n".join(make_corpus(make_world(), n_docs=20_000, seed=0))


if __name__ == "__main__":
    ranks = train_bpe(builtin_training_text(), BUILTIN_VOCAB_SIZE - 2)  # two ids for the special tokens
    save_ranks(ranks, BUILTIN_PATH)
    print(f"wrote {BUILTIN_PATH}: {len(ranks)} tokens + 2 special")
