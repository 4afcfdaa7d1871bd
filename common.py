"""
Plumbing shared by every stage, and nothing else: the command line from a config dataclass, device
and dtype, seeding, logging to stdout and metrics.jsonl, and atomic directory writes. No algorithm
code lives here; each stage's algorithm is in its own file.
"""

import ast
import contextlib
import dataclasses
import inspect
import json
import os
import random
import shutil
import sys
import textwrap
import time
import typing

import torch


class UserError(Exception):
    """Bad input from the user (an argument, a file, a checkpoint): reported as one line, exit 1."""

# -----------------------------------------------------------------------------
# command line: every field of a stage's config dataclass is a --flag


def field_docs(cls):
    """The docstring written under each field of a dataclass (and of its dataclass bases)."""
    docs = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def parse_value(text, typ, name):
    if typ is bool:
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise UserError(f"--{name}: expected true or false, got {text!r}")
    try:
        return typ(text)
    except ValueError:
        raise UserError(f"--{name}: expected {typ.__name__}, got {text!r}") from None


def parse_args(cls, argv=None):
    """Build cls from `--key value` / `--key=value` arguments (a bare `--flag` sets a bool to true).
    `--help` prints every field with its default and doc, then exits."""
    argv = sys.argv[1:] if argv is None else list(argv)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    types = typing.get_type_hints(cls)
    if "--help" in argv or "-h" in argv:
        docs = field_docs(cls)
        print((inspect.getdoc(sys.modules[cls.__module__]) or "").split("\n\n")[0] + "\n")
        for name, f in fields.items():
            print(f"  --{name} {types[name].__name__} (default {f.default!r})\n      {docs.get(name, '')}")
        sys.exit(0)
    values, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}: arguments are --key value or --key=value (see --help)")
        key, eq, text = arg[2:].partition("=")
        if key not in fields:
            raise UserError(f"unknown argument --{key} (see --help for the {len(fields)} known ones)")
        typ = types[key]
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if typ is bool and (nxt is None or nxt.startswith("--")):
                text = "true"
            elif nxt is None:
                raise UserError(f"--{key} needs a value")
            else:
                text, i = nxt, i + 1
        values[key] = parse_value(text, typ, key)
        i += 1
    return cls(**values)


def run(main, config_cls):
    """The entry point of every stage: parse the command line, run main(config), and turn a
    UserError into one line on stderr and exit status 1 (no traceback for bad input)."""
    try:
        main(parse_args(config_cls))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)

# -----------------------------------------------------------------------------
# device, dtype, seeding


def setup_device(device="auto", dtype="auto"):
    """Returns (device, autocast context). auto: CUDA if there is one, else CPU; on CUDA autocast
    to bfloat16 (float16 if the card lacks it), on CPU plain float32."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if dtype == "auto":
        dtype = ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if device.type == "cuda" else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"--dtype must be auto, float32, bfloat16 or float16, not {dtype!r}")
    if dtype == "float32":
        return device, contextlib.nullcontext()
    return device, torch.autocast(device.type, dtype=getattr(torch, dtype))


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)

def batch_indices(lengths, batch_size, rng, group=16):
    """Endless batches of indices into a dataset whose examples have these lengths. Each epoch is a
    fresh shuffle, cut into windows of `group` batches that are sorted by length, so that a batch
    holds examples of similar length and pads little; the batches are shuffled again."""
    while True:
        order = rng.sample(range(len(lengths)), len(lengths))
        batches = []
        for i in range(0, len(order), batch_size * group):
            window = sorted(order[i:i + batch_size * group], key=lengths.__getitem__)
            batches += [window[j:j + batch_size] for j in range(0, len(window), batch_size)]
        rng.shuffle(batches)
        yield from batches

# -----------------------------------------------------------------------------
# logging: one greppable line per logged step, the same numbers kept for metrics.jsonl


class Logger:
    def __init__(self):
        self.rows = []
        self.t0 = time.time()

    def log(self, **metrics):
        """Print `key value | key value ...` and keep the row (written into the checkpoint)."""
        row = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}
        row["elapsed"] = round(time.time() - self.t0, 2)
        self.rows.append(row)
        print(" | ".join(f"{k} {fmt(v)}" for k, v in row.items()), flush=True)


def fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)

# -----------------------------------------------------------------------------
# atomic directory writes


@contextlib.contextmanager
def atomic_directory(path):
    """Yield a fresh temporary directory beside path; when the block succeeds, it replaces path.
    If the block raises, path is left exactly as it was. The swap is two renames: path -> old,
    tmp -> path; a crash between them (microseconds) leaves the previous version at path + '.old'."""
    path = os.path.normpath(path)
    tmp, old = f"{path}.tmp{os.getpid()}", f"{path}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(path):
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
