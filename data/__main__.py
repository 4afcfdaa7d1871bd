"""
What a stage will read from a dataset file, before you train on it:

    python -m data PATH [--tokenizer builtin|gpt2] [--block_size 1024] [--task sft]

prints the detected format, the rows used and the rows skipped (why, and on which line), the token
lengths of prompts and responses, how many prompts the context cuts and how many rows it drops
(data/formats.py, "Long examples"), and the first example exactly as the stage sees it: the text of
its tokens after the chat template and the cut, prompt and response apart, the EOS included.
"""

import sys
from dataclasses import dataclass

import common
from data.formats import FORMATS, TASKS, Dataset, encode_rows, is_json_file, read_records
from data.tokenizer import get_tokenizer

RESPONSES = {"sft": ("completion",), "preference": ("chosen", "rejected"), "prompt": (), "lm": ()}


@dataclass
class Config:
    task: str = ""
    """lm (pretrain), sft, preference (reward, dpo) or prompt (ppo); empty: what the file's format is for"""
    tokenizer: str = "builtin"
    """builtin or gpt2: the tokenizer of the model you will train"""
    block_size: int = 128
    """the model's context (1024 for GPT-2)"""


def stats(lengths):
    s = sorted(lengths)
    return (f"min {s[0]}, median {s[len(s) // 2]}, mean {sum(s) / len(s):.1f}, p95 {s[int(0.95 * (len(s) - 1))]}, "
            f"max {s[-1]}")


def guess_task(path):
    """The kind of stage the first row's format serves."""
    if not is_json_file(path):
        return "lm"
    keys = set(read_records(path)[0][1])
    return next((task for fields, _, task in FORMATS.values() if fields <= keys), "sft")


def main(path, cfg):
    tok = get_tokenizer(cfg.tokenizer)
    task = cfg.task or guess_task(path)
    if task not in TASKS:
        raise common.UserError(f"--task must be one of {', '.join(TASKS)}, not {cfg.task!r}")
    data = Dataset(path, task)
    print(f"{data.summary()}, for {TASKS[task]}")
    for where, reason in data.skipped[:10]:
        print(f"  skipped {where}: {reason}")
    if len(data.skipped) > 10:
        print(f"  ... and {len(data.skipped) - 10} more")
    if task == "lm":
        ids = [tok.encode(r["text"]) for r in data.rows]
        print(f"{sum(map(len, ids)):,} tokens in {len(ids)} documents ({cfg.tokenizer}); document tokens: {stats(list(map(len, ids)))}")
        print(f"first {cfg.block_size} tokens as the model sees them:\n{tok.decode(ids[0][:cfg.block_size])!r}")
        return
    keys = RESPONSES[task]
    print(f"prompt tokens ({cfg.tokenizer}): {stats([len(tok.encode_prompt(r['prompt'])) for r in data.rows])}")
    for k in keys:
        print(f"{k} tokens, with the EOS: {stats([len(tok.encode(r[k])) + 1 for r in data.rows])}")
    if task == "prompt":
        print(f"first prompt, {len(tok.encode_prompt(data.rows[0]['prompt']))} tokens:\n  {data.rows[0]['prompt']!r}")
        return
    encoded, kept, report = encode_rows(tok, data.rows, keys, cfg.block_size)
    print(report)
    prompt, responses = encoded[0]
    print(f"first example as the stage sees it ({kept[0]['where']}):\n  prompt, {len(prompt)} tokens: {tok.decode(prompt)!r}")
    for k, r in zip(keys, responses):
        print(f"  {k}, {len(r)} tokens: {tok.decode(r)!r}")


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        sys.exit("usage: python -m data PATH [--task lm|sft|preference|prompt] [--tokenizer builtin|gpt2] [--block_size N]")
    try:
        main(sys.argv[1], common.parse_args(Config, sys.argv[2:]))
    except common.UserError as e:
        sys.exit(f"error: {e}")
