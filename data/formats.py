"""
Reading datasets from files. Every error names the file and the line.

- `read_jsonl(path)`: the rows of a JSONL file (one JSON object per line; blank lines skipped).
- `prompt_completion_rows(path)`: SFT rows {"prompt", "completion"} -> [(prompt, completion)].
- `prompt_rows(path)`: PPO rows {"prompt"} -> [prompt].
- `preference_rows(path)`: rows {"prompt", "chosen", "rejected"} -> [dict], each with "where" (file:line).
"""

import json

from common import UserError


def read_jsonl(path):
    """[(line number, row dict)] of a JSONL file, refusing malformed lines and empty files."""
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise UserError(f"{path}: cannot open it ({e.strerror})") from None
    rows = []
    with f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            rows.append((n, row))
    if not rows:
        raise UserError(f"{path}: no rows")
    return rows


def fields(path, n, row, names):
    """The string values of the named fields of one row."""
    for name in names:
        if name not in row:
            raise UserError(f"{path}:{n}: missing field {name!r} (the row has {sorted(row)})")
        if not isinstance(row[name], str):
            raise UserError(f"{path}:{n}: field {name!r} must be a string, got {type(row[name]).__name__}")
    return tuple(row[name] for name in names)


def prompt_completion_rows(path):
    return [fields(path, n, row, ("prompt", "completion")) for n, row in read_jsonl(path)]


def prompt_rows(path):
    return [fields(path, n, row, ("prompt",))[0] for n, row in read_jsonl(path)]


def preference_rows(path):
    rows = []
    for n, row in read_jsonl(path):
        prompt, chosen, rejected = fields(path, n, row, ("prompt", "chosen", "rejected"))
        rows.append(dict(prompt=prompt, chosen=chosen, rejected=rejected, where=f"{path}:{n}"))
    return rows
