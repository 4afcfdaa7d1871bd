"""
Reading datasets from files, for every stage's --data. The format is detected from the rows; every
error names the file and the line. `python -m data PATH` shows what a stage will read (data/__main__.py).

Files, in UTF-8 (a byte-order mark is skipped): `.jsonl` (one JSON object per line, blank lines
skipped), `.jsonl.gz`, `.json` (one array of objects), and `.txt` (plain text, for pre-training only).

Formats, told apart by the fields of the first row (a later row must have the same ones):
| format              | fields                                                       | stages       |
| ------------------- | ------------------------------------------------------------ | ------------ |
| `text`              | `{"text"}` (or a `.txt` file)                                | pretrain     |
| `prompt_completion` | `{"prompt", "completion"}`                                   | sft          |
| `alpaca`            | `{"instruction", "input" (may be empty or absent), "output"}`| sft          |
| `chat`              | `{"messages": [{"role", "content"}, ...]}`                   | sft, ppo     |
| `preference`        | `{"prompt", "chosen", "rejected"}`                           | reward, dpo  |
| `implicit_prompt`   | `{"chosen", "rejected"}`: whole transcripts (HH-RLHF)        | reward, dpo  |
| `openai_preference` | `{"input": {"messages"}, "preferred_output", "non_preferred_output"}` | reward, dpo |
| `prompt`            | `{"prompt"}`                                                 | ppo          |
PPO takes the prompts of any format that has them (an SFT or a preference file too), and SFT
takes a preference file too, learning its chosen responses (as is usual with HH-RLHF). A prompt,
completion, chosen or rejected field is a string, used as it is, or a list of messages.

The chat template turns messages into the text the model sees, the built-in task's form
(data/tasks.py): each message on its own paragraph, "Human: " before a user's, "Assistant: " before
an assistant's, "System: " before a system's, and the prompt ends with "\\n\\nAssistant:":
    Human: Hi\\n\\nAssistant: Hello!\\n\\nHuman: What is 2 plus 2?\\n\\nAssistant:
The response is " " + the assistant's content (it follows "Assistant:"); the stage adds the EOS.
Alpaca's user message is the instruction, then a blank line and the input if there is one.
An implicit-prompt transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") is split where chosen and
rejected part: the prompt is their longest common prefix, cut after its last "\\n\\nAssistant:"
(leading blank lines dropped, so it reads as the template does); the responses are the rest.
Message lists split the same way, message by message, and so do the chosen and rejected of a
`preference` row when they are whole conversations (UltraFeedback's form).

Rows that are well formed but unusable are skipped, and counted with the reason and the line:
chosen equal to rejected (for reward and DPO; SFT reads the chosen side alone), an empty response,
transcripts that share no prompt, a conversation that does not end with the assistant's message. Anything malformed (bad JSON, a missing field, a wrong
type, an unknown role) stops the run with one line naming file and line.

Long examples (`fit`): a response is never cut, so the model never learns a response that stops
where the context did. The prompt is cut from the left (its start goes, its end "Assistant:" stays)
to leave room for the longest response of the row and its EOS; a row whose longest response leaves
the prompt less than a quarter of the context (or less than the whole prompt, if that is shorter)
is dropped. Stages print both counts.
"""

import functools
import gzip
import json
import os
import random
import re
import zlib
from collections import Counter

from common import UserError, same_path
from data.tokenizer import EOT

ROLES = {"system": "System", "user": "Human", "assistant": "Assistant"}
MARK = "\n\nAssistant:"
WHITESPACE = re.compile(r"[ \t\n\r]*")  # JSON's whitespace
MIN_PROMPT_SHARE = 4  # a dropped row leaves the prompt less than 1/MIN_PROMPT_SHARE of the context

# -----------------------------------------------------------------------------
# files -> rows


def is_json_file(path):
    """Whether read_records reads path (.json, .jsonl, either gzipped; any case) rather than as text."""
    return str(path).lower().endswith((".json", ".jsonl", ".json.gz", ".jsonl.gz"))


def read_records(path):
    """[(where, row dict)] of a .jsonl, .jsonl.gz or .json file; where is "file:line"."""
    path = str(path)
    gz = path.lower().endswith(".gz")
    try:
        # utf-8-sig: a byte-order mark, if any, is dropped; text mode reads "\r\n" as "\n"
        with (gzip.open(path, "rt", encoding="utf-8-sig") if gz else open(path, encoding="utf-8-sig")) as f:
            text = f.read()
    except (OSError, UnicodeDecodeError, EOFError, zlib.error) as e:  # zlib: a damaged .gz
        raise UserError(f"{path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    if (path[:-3] if gz else path).lower().endswith(".json"):
        rows = json_array(path, text)
    else:
        rows = []
        # "\n" only: splitlines() would also split at U+2028, U+2029 and U+0085, which JSON allows raw in strings
        for n, line in enumerate(text.split("\n"), start=1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except (ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, or an int of 4300+ digits
                    raise UserError(f"{path}:{n}: not valid JSON ({getattr(e, 'msg', None) or e})") from None
    for n, row in rows:
        if not isinstance(row, dict):
            raise UserError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
    if not rows:
        raise UserError(f"{path}: no rows (the file is empty)")
    return [(f"{path}:{n}", row) for n, row in rows]


def json_array(path, text):
    """[(line, item)] of a JSON array, each item with the line it starts on. One pass over the text:
    a file of a few hundred MB is never copied or recounted per item."""
    decoder, rows = json.JSONDecoder(), []
    line, counted = 1, 0  # the line of position `counted`, advanced as i moves on

    def skip_space(i):
        return WHITESPACE.match(text, i).end()

    def line_at(i):
        nonlocal line, counted
        line, counted = line + text.count("\n", counted, i), i
        return line

    i = skip_space(0)
    if i == len(text):
        return rows
    if text[i] != "[":
        hint = " (one object per line is JSON Lines: name the file .jsonl)" if text[i] == "{" else ""
        raise UserError(f"{path}:{line_at(i)}: a .json file must hold one array of objects{hint}")
    i = skip_space(i + 1)
    if i < len(text) and text[i] == "]":
        return rows
    while True:
        try:
            item, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        except (ValueError, RecursionError) as e:  # an int of 4300+ digits, arrays nested too deep
            raise UserError(f"{path}:{line_at(i)}: not valid JSON ({e})") from None
        rows.append((line_at(i), item))
        i = skip_space(end)
        if i < len(text) and text[i] == "]":
            return rows
        if i >= len(text) or text[i] != ",":
            raise UserError(f"{path}:{line_at(i)}: not valid JSON (expected ',' or ']')")
        i = skip_space(i + 1)


# -----------------------------------------------------------------------------
# the chat template and the formats


class Skip(Exception):
    """A well-formed row that cannot be used: skipped, counted, reported with this reason."""


def string(row, name, where):
    if name not in row:
        raise UserError(f"{where}: missing field {name!r} (the row has {sorted(row)})")
    if not isinstance(row[name], str):
        raise UserError(f"{where}: field {name!r} must be a string, got {type(row[name]).__name__}")
    return row[name]


def messages(value, where, name):
    """A validated list of {"role", "content"} messages."""
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise UserError(f"{where}: field {name!r} must be a string or a list of messages, got {type(value).__name__}")
    for i, m in enumerate(value):
        if m.get("role") not in ROLES:
            raise UserError(f"{where}: {name} message {i} has role {m.get('role')!r}, not one of {sorted(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise UserError(f"{where}: {name} message {i} has no string content")
    return value


def render(msgs):
    """The chat template: "Human: ...\\n\\nAssistant: ..." paragraphs."""
    return "\n\n".join(f"{ROLES[m['role']]}: {m['content']}" for m in msgs)


def chat_prompt(msgs):
    """The prompt text of a conversation so far: ends with "\\n\\nAssistant:" (no space)."""
    return (render(msgs) + MARK).lstrip("\n")


def prompt_field(row, name, where):
    value = row.get(name)
    if isinstance(value, str) or name not in row:
        return string(row, name, where)
    return chat_prompt(messages(value, where, name))


def response_field(row, name, where):
    """A response: a string as it is, or one assistant message as " " + content."""
    value = row.get(name)
    if isinstance(value, str) or name not in row:
        text = string(row, name, where)
    else:
        msgs = messages(value, where, name)
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise Skip(f"{name} is not one assistant message")
        text = " " + msgs[0]["content"]
    if not text.strip():
        raise Skip(f"empty {name}")
    return text


def split_conversation(msgs, where):
    """(prompt text, response text) of a conversation ending with the assistant's message."""
    if len(msgs) < 2 or msgs[-1]["role"] != "assistant":
        raise Skip("the conversation does not end with an assistant message after a prompt")
    if not msgs[-1]["content"].strip():
        raise Skip("empty assistant message")
    return chat_prompt(msgs[:-1]), " " + msgs[-1]["content"]


def common_prefix(a, b):
    """The length of the longest common prefix of two strings (or lists), found by halving with
    slice comparisons, which run in C: a Python loop over the characters took 19 s to split 100k
    HH-RLHF-sized transcripts, this takes well under one."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:  # a[:lo] == b[:lo], and the prefix is no longer than hi
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def split_transcripts(chosen, rejected):
    """(prompt, chosen response, rejected response) of two transcripts that share their prompt."""
    n = common_prefix(chosen, rejected)
    if isinstance(chosen, str):
        cut = chosen.rfind(MARK, 0, n)  # the last marker wholly inside the shared prefix
        if cut < 0:
            raise Skip("chosen and rejected share no prompt ending in '\\n\\nAssistant:'")
        end = cut + len(MARK)
        return chosen[:end].lstrip("\n"), chosen[end:], rejected[end:]
    if n == 0 or chosen[n - 1]["role"] == "assistant" or len(chosen) != n + 1 or len(rejected) != n + 1:
        raise Skip("chosen and rejected are not one shared prompt and one assistant message each")
    return chat_prompt(chosen[:n]), " " + chosen[n]["content"], " " + rejected[n]["content"]


def pair(prompt, chosen, rejected):
    if not chosen.strip() or not rejected.strip():
        raise Skip("an empty response")
    if chosen == rejected:
        raise Skip("chosen and rejected are the same")
    return dict(prompt=prompt, chosen=chosen, rejected=rejected)


def parse_implicit(row, where):
    chosen, rejected = (row.get(k) if isinstance(row.get(k), list) else string(row, k, where) for k in ("chosen", "rejected"))
    if isinstance(chosen, list) != isinstance(rejected, list):
        raise UserError(f"{where}: chosen and rejected must both be strings or both be message lists")
    if isinstance(chosen, list):
        chosen, rejected = messages(chosen, where, "chosen"), messages(rejected, where, "rejected")
    return pair(*split_transcripts(chosen, rejected))


def parse_preference(row, where):
    """{"prompt", "chosen", "rejected"}: responses that are strings or one assistant message each; or,
    as UltraFeedback writes them, two whole conversations that share the prompt's messages, split as
    transcripts are (the prompt field, the first user message alone, is then not needed)."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if isinstance(chosen, list) and isinstance(rejected, list) and (len(chosen) > 1 or len(rejected) > 1):
        return pair(*split_transcripts(messages(chosen, where, "chosen"), messages(rejected, where, "rejected")))
    return pair(prompt_field(row, "prompt", where), response_field(row, "chosen", where), response_field(row, "rejected", where))


def parse_openai(row, where):
    return pair(openai_prompt(row, where), response_field(row, "preferred_output", where),
                response_field(row, "non_preferred_output", where))


def openai_prompt(row, where):
    inp = row.get("input")
    if not isinstance(inp, dict) or "messages" not in inp:
        raise UserError(f"{where}: field 'input' must be an object with 'messages'")
    return chat_prompt(messages(inp["messages"], where, "input.messages"))


def parse_chosen(fmt, row, where):
    """SFT on a preference file: the chosen response as a demonstration, split from its own
    conversation. Not from the pair's split: where chosen and rejected part before the last turn
    (HH-RLHF has such rows), that split's response holds the later Human turns too, which SFT would
    teach the model to write. And the row counts whatever its rejected response is (empty, or the
    same as the chosen one)."""
    if fmt == "openai_preference":
        return dict(prompt=openai_prompt(row, where), completion=response_field(row, "preferred_output", where))
    chosen = row.get("chosen")
    if isinstance(chosen, list) and (fmt == "implicit_prompt" or len(chosen) > 1):  # a whole conversation
        prompt, completion = split_conversation(messages(chosen, where, "chosen"), where)
    elif fmt == "implicit_prompt":  # a transcript: the prompt ends at its last "\n\nAssistant:"
        chosen = string(row, "chosen", where)
        end = chosen.rfind(MARK) + len(MARK)
        if end < len(MARK):
            raise Skip("the chosen transcript has no '\\n\\nAssistant:'")
        prompt, completion = chosen[:end].lstrip("\n"), chosen[end:]
        if "\n\nHuman:" in completion:
            raise Skip("the chosen transcript does not end with the assistant's turn")
    else:
        prompt, completion = prompt_field(row, "prompt", where), response_field(row, "chosen", where)
    if not completion.strip():
        raise Skip("an empty chosen response")
    return dict(prompt=prompt, completion=completion)


def parse_chat(row, where):
    prompt, completion = split_conversation(messages(row.get("messages"), where, "messages"), where)
    return dict(prompt=prompt, completion=completion)


def parse_chat_prompt(row, where):
    msgs = messages(row.get("messages"), where, "messages")
    if msgs and msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    if not msgs:
        raise Skip("no messages before the assistant's")
    return dict(prompt=chat_prompt(msgs))


def parse_alpaca(row, where):
    instruction, output = string(row, "instruction", where), string(row, "output", where)
    inp = string(row, "input", where) if "input" in row else ""
    if not output.strip():
        raise Skip("empty output")
    user = instruction + ("\n\n" + inp if inp.strip() else "")
    return dict(prompt=chat_prompt([{"role": "user", "content": user}]), completion=" " + output)


# format -> (the fields that identify it, the parser of one row, what it gives: "lm", "sft", "preference", "prompt")
FORMATS = {
    "openai_preference": ({"input", "preferred_output", "non_preferred_output"}, parse_openai, "preference"),
    "preference": ({"prompt", "chosen", "rejected"}, parse_preference, "preference"),
    "implicit_prompt": ({"chosen", "rejected"}, parse_implicit, "preference"),
    "alpaca": ({"instruction", "output"}, parse_alpaca, "sft"),
    "prompt_completion": ({"prompt", "completion"},
                          lambda r, w: dict(prompt=prompt_field(r, "prompt", w),
                                            completion=response_field(r, "completion", w)), "sft"),
    "chat": ({"messages"}, parse_chat, "sft"),
    "text": ({"text"}, lambda r, w: dict(text=string(r, "text", w)), "lm"),
    "prompt": ({"prompt"}, lambda r, w: dict(prompt=prompt_field(r, "prompt", w)), "prompt"),
}
TASKS = {"lm": "pretrain", "sft": "sft", "preference": "reward and dpo", "prompt": "ppo"}


def detect(where, row, task):
    """The name of the format of row that serves task, or a UserError naming the closest one's
    missing field. Any format with prompts serves "prompt"."""
    usable = [name for name, (_, _, gives) in FORMATS.items()
              if gives == task or (task == "prompt" and gives in ("sft", "preference"))
              or (task == "sft" and gives == "preference")]
    for name in usable:
        if FORMATS[name][0] <= set(row):
            return name
    closest = max(usable, key=lambda name: (len(FORMATS[name][0] & set(row)), -len(FORMATS[name][0])))
    missing = sorted(FORMATS[closest][0] - set(row))[0]
    raise UserError(f"{where}: missing field {missing!r} (the row has {sorted(row)}); {TASKS[task]} reads "
                    f"{' or '.join('{' + ', '.join(sorted(FORMATS[n][0])) + '}' for n in usable)}")


class Dataset:
    """The usable rows of a file for one kind of stage (task: lm, sft, preference or prompt), each
    a dict with "where" (file:line), and the rows skipped as [(where, reason)]."""

    def __init__(self, path, task):
        self.path, self.task = str(path), task
        if task == "lm" and not is_json_file(self.path):
            self.format, self.skipped = "text", []
            self.rows = text_file_documents(self.path)
            return
        records = read_records(self.path)
        self.format = detect(*records[0], task)
        parse = FORMATS[self.format][1]
        if (task, self.format) == ("prompt", "chat"):
            parse = parse_chat_prompt
        elif task == "sft" and FORMATS[self.format][2] == "preference":
            parse = functools.partial(parse_chosen, self.format)
        self.rows, self.skipped = [], []
        fields = FORMATS[self.format][0]
        for where, row in records:
            if not fields <= set(row):  # every row in the first row's format
                raise UserError(f"{where}: missing field {sorted(fields - set(row))[0]!r} (the row has {sorted(row)}); "
                                f"the file's first row is in the {self.format} format, {{{', '.join(sorted(fields))}}}")
            try:
                out = parse(row, where)
            except Skip as e:
                self.skipped.append((where, str(e)))
                continue
            if task == "prompt":
                out = dict(prompt=out["prompt"])
            self.rows.append({**out, "where": where})
        if not self.rows:
            raise UserError(f"{self.path}: no usable rows: all {len(self.skipped)} were skipped "
                            f"({self.skipped[0][0]}: {self.skipped[0][1]})")

    def summary(self):
        """One line: format, rows used, rows skipped and why."""
        line = f"{self.path}: {self.format} format, {len(self.rows)} rows"
        if self.skipped:
            reasons = Counter(reason for _, reason in self.skipped)
            line += f", {len(self.skipped)} skipped (" + "; ".join(f"{n} {r}" for r, n in reasons.most_common()) + \
                f"; first at {self.skipped[0][0]})"
        return line


def check_out_file(path, flag, reads=None):
    """Refuse, before any work, a path where the file cannot be written: a directory, a path through
    a file, or a file the run reads (reads: {flag: path}). Its missing directories are made when it
    is written."""
    for other, source in (reads or {}).items():
        if same_path(source, path):
            raise UserError(f"{flag} {path} is also {other}: it would overwrite the file it reads")
    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        raise UserError(f"{flag} {path} is a directory: name the .jsonl file to write")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"{flag} {path}: {parent} is a file, not a directory")


def write_rows(path, rows):
    """rows (dicts) as a file that any stage's --data reads, in the form its name says as read_records
    reads it: JSON Lines (.jsonl), or one array (.json), either gzipped (.gz). Whole or not at all."""
    gz = path.lower().endswith(".gz")
    rows = [{k: v for k, v in r.items() if k != "where"} for r in rows]
    if (path[:-3] if gz else path).lower().endswith(".json"):
        text = "[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n"
    else:
        text = "".join(json.dumps(r) + "\n" for r in rows)
    tmp = f"{path}.tmp{os.getpid()}"  # one per process: two writing the same path must not take each other's
    data = gzip.compress(text.encode(), mtime=0) if gz else text.encode()  # mtime 0: the same rows, the same bytes
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:  # a directory at path, a file where a directory of the path should be, a full disk
        if os.path.isfile(tmp):
            os.remove(tmp)
        raise UserError(f"{path}: cannot write it ({e.strerror or e})") from None


def text_file_documents(path):
    """The documents of a .txt corpus: the whole file, or the parts between the literal <|endoftext|>
    that separates GPT-2's training documents (the stages join them with the real token, which no
    text encodes to). Each is a row {"text", "where": file:line of its first character that is not blank}."""
    text, rows, start, line, counted = read_text(path), [], 0, 1, 0  # line: the line of character `counted`
    for part in text.split(EOT):
        if part.strip():
            first = start + len(part) - len(part.lstrip())  # the document's first character that is not blank
            line, counted = line + text.count("\n", counted, first), first
            rows.append(dict(text=part, where=f"{path}:{line}"))
        start += len(part) + len(EOT)
    if not rows:
        raise UserError(f"{path}: no text between its {text.count(EOT)} <|endoftext|> separators")
    return rows


def read_text(path):
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read it as UTF-8 text ({getattr(e, 'strerror', None) or e})") from None
    if not text.strip():
        raise UserError(f"{path}: no text (the file is empty)")
    return text


def load(path, task):
    """Dataset(path, task), its summary line printed: what a stage reads is never a surprise."""
    data = Dataset(path, task)
    print(data.summary())
    return data

# -----------------------------------------------------------------------------
# what the stages call


def text_documents(path):
    """Pre-training documents: a .txt file's (text_file_documents), or the "text" of each row."""
    return [r["text"] for r in load(path, "lm").rows]


def prompt_completion_rows(path):
    """SFT rows: [{"prompt", "completion", "where"}]."""
    return load(path, "sft").rows


def prompt_rows(path):
    """PPO prompts: [prompt text]."""
    return [r["prompt"] for r in load(path, "prompt").rows]


def preference_rows(path):
    """Reward and DPO rows: [{"prompt", "chosen", "rejected", "where"}]."""
    return load(path, "preference").rows


def split_by_prompt(rows, fraction, seed):
    """(held-out rows, training rows), shuffled: the rows (pairs, or sft.py's demonstrations) of
    about `fraction` of the distinct prompts are held out, so no prompt is in both. Held-out accuracy
    then measures what carries over to new prompts, not the memory of a pair seen in training (the
    built-in raters, like real ones, rate some pairs more than once)."""
    rng = random.Random(seed)
    prompts = sorted({r["prompt"] for r in rows})
    if len(prompts) < 2:
        raise UserError(f"{rows[0].get('where', 'the data') if rows else 'the data'}: the pairs need at least two "
                        f"distinct prompts, one to train on and one to hold out")
    rng.shuffle(prompts)
    held = set(prompts[:min(len(prompts) - 1, max(1, round(fraction * len(prompts))))])
    rows = rng.sample(rows, len(rows))
    return [r for r in rows if r["prompt"] in held], [r for r in rows if r["prompt"] not in held]

# -----------------------------------------------------------------------------
# long examples


def fit(prompt, responses, block_size):
    """(prompt, responses) of token lists cut to fit block_size tokens as prompt + any one response,
    or None if the row is dropped: see "Long examples" above. Responses are never cut."""
    room = block_size - max(len(r) for r in responses)
    if room < min(len(prompt), max(1, block_size // MIN_PROMPT_SHARE)):
        return None
    return prompt[max(0, len(prompt) - room):], responses


def encode_rows(tok, rows, keys, block_size):
    """Each row's prompt (an empty one is the EOS: Tokenizer.encode_prompt) and its responses
    (row[k] for k in keys, each + EOS) as token ids, fit to the context. Returns ([(prompt ids,
    [response ids])], the rows kept, a line with the counts)."""
    encoded, kept, cut = [], [], 0
    for row in rows:
        prompt = tok.encode_prompt(row["prompt"])
        out = fit(prompt, [tok.encode(row[k]) + [tok.eot_id] for k in keys], block_size)
        if out is not None:
            cut += len(out[0]) < len(prompt)
            encoded.append(out)
            kept.append(row)
    dropped = len(rows) - len(kept)
    if not kept:
        raise UserError(f"every one of {len(rows)} examples has a response too long for the context of {block_size} "
                        f"tokens (e.g. {rows[0].get('where', 'the first')})")
    return encoded, kept, (f"{cut} prompts cut from the left and {dropped} examples dropped (a response too long) "
                           f"to fit the context of {block_size} tokens")
