"""
Plumbing shared by every stage, and nothing else: the command line from a config dataclass, device
and dtype, seeding, data-parallel setup (torchrun), logging to stdout and metrics.jsonl from rank 0,
atomic directory writes, and the resume state of a run. No algorithm code lives here; each stage's
algorithm is in its own file.
"""

import ast
import contextlib
import dataclasses
import errno
import hashlib
import inspect
import json
import math
import os
import random
import re
import shutil
import socket
import sys
import textwrap
import time
import typing

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class UserError(Exception):
    """Bad input from the user (an argument, a file, a checkpoint): reported as one line, exit 1."""


class NumericalError(UserError):
    """Training diverged (a loss that is NaN or infinite): reported as one line with the step, exit 1.
    Nothing is written after it, so out_dir keeps the last good checkpoint."""


@dataclasses.dataclass
class Resumable:
    """Flags of every stage: periodic resume checkpoints (a stage's Config inherits them)."""
    save_every: int = 0
    """steps between checkpoints with resume state written to out_dir (0: only the final checkpoint)"""
    resume: bool = False
    """continue the interrupted run whose resume state is in out_dir (same arguments but those that bound memory or saves, same number of processes)"""

    def __post_init__(self):
        # counts that a stage divides by, and the length of a run (a run of no steps has no model to write)
        for name in ("log_every", "eval_every", "length_groups", "max_steps", "iterations", "ppo_epochs"):
            if getattr(self, name, 1) < 1:
                raise UserError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if not getattr(self, "epochs", 1) > 0:  # NaN too; and 0 would still train one step (steps >= 1)
            raise UserError(f"--epochs must be positive, got {self.epochs}")
        for name in ("warmup_steps", "warmup_iterations"):  # 0: no warm-up
            if getattr(self, name, 0) < 0:
                raise UserError(f"--{name} must be at least 0, got {getattr(self, name)}")
        if not 0 <= getattr(self, "val_fraction", 0) < 1:  # something must be left to train on
            raise UserError(f"--val_fraction must be in [0, 1), got {self.val_fraction}")


@dataclasses.dataclass
class Batched(Resumable):
    """Flags of every stage that trains on batches of examples: gradient accumulation as well."""
    micro_batch_size: int = 0
    """examples per forward pass on each process (0: batch_size / processes); the batch_size stays the global one. Set, it also bounds the passes without gradients (validation, held-out evaluation, reference log-probs, the reward's normalisation), which otherwise take the stage's fixed batches (64 examples, a batch_size in sft and pretrain); the built-in task's samples (the pairs', the normalisation's) keep their batches of 256 short prompts, so that they do not depend on it"""


@dataclasses.dataclass
class Padded(Batched):
    """Flags of the stages whose random batches mix lengths (sft, dpo): each batch is drawn
    as before, then sorted by length and cut into micro-batches, each padded only to its own longest
    example. The gradient is the batch's either way, up to float rounding; the padding is not."""
    length_groups: int = 4
    """micro-batches of similar length per batch and process, at least (as many as there are examples at most; 1: one pass, padded to the batch's longest)"""

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
        value = typ(text)
    except ValueError:
        raise UserError(f"--{name}: expected {typ.__name__}, got {text!r}") from None
    if typ is float and not math.isfinite(value):  # nan and inf pass float(); no flag means them, and JSON has neither
        raise UserError(f"--{name}: expected a finite number, got {text!r}")
    return value


def parse_args(cls, argv=None):
    """Build cls from `--key value` / `--key=value` arguments (a bare `--flag` sets a bool to true).
    `--help` prints every field with its default and doc, then exits."""
    argv = sys.argv[1:] if argv is None else list(argv)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    types = typing.get_type_hints(cls)
    if "--help" in argv or "-h" in argv:
        docs = field_docs(cls)
        print((inspect.getdoc(sys.modules[cls.__module__]) or "").split("\n\n")[0] + "\n")
        shared = {f.name for f in dataclasses.fields(Batched)}  # every stage's flags, listed last
        for name, f in sorted(fields.items(), key=lambda item: item[0] in shared):
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
    UserError into one line on stderr (from rank 0 only, under torchrun) and exit status 1 (no
    traceback for bad input). Leaves the process group, if main joined one."""
    try:
        main(parse_args(config_cls))
    except UserError as e:
        if rank() == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

# -----------------------------------------------------------------------------
# device, dtype, seeding


def setup_device(device="auto", dtype="auto", training=True):
    """Returns (device, autocast context). auto: CUDA if there is one, else CPU; on CUDA autocast
    to bfloat16, on CPU plain float32. A card without bfloat16 (before Ampere) trains in float32:
    float16 gradients underflow without loss scaling, which the stages do not do (a CPU check of
    an SFT step: 88% of the embedding's gradient entries became 0), so `training` refuses float16
    and only inference (eval, sample) takes it. Under torchrun it also joins the process group
    (see setup_distributed), and each process takes the GPU of its local rank."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise UserError(f"--device {device!r} is not a device: auto, cpu, cuda, cuda:1, ... ({e})") from None
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) that torch can use")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # Triton launches on the current device: it must be this one (cuda:1 alone)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = setup_distributed(device)
    if dtype == "auto":
        dtype = auto_dtype(device, training)
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"--dtype must be auto, float32, bfloat16 or float16, not {dtype!r}")
    if dtype == "float16" and training:
        raise UserError("--dtype float16: training in float16 needs loss scaling, which these stages do not do "
                        "(its small gradients round to 0); use bfloat16, or float32 on a card without it")
    if dtype == "float32":
        return device, contextlib.nullcontext()
    return device, torch.autocast(device.type, dtype=getattr(torch, dtype))


def auto_dtype(device, training=True):
    """--dtype auto: bfloat16 on a CUDA card that computes in it (compute capability 8.0, Ampere, or
    later; torch.cuda.is_bf16_supported() also says yes where it is only emulated, as on a V100 or a
    T4); on older cards float32 for training and float16 for inference; float32 on a CPU."""
    if device.type != "cuda":
        return "float32"
    if torch.cuda.get_device_capability(device) >= (8, 0):
        return "bfloat16"
    return "float32" if training else "float16"


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)

# -----------------------------------------------------------------------------
# data parallel: one process per GPU (or CPU share) under torchrun; every helper is a no-op alone


def setup_distributed(device):
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU) and return this process's device:
    cuda:LOCAL_RANK on CUDA. Every process runs the whole stage; only rank 0 prints to stdout (the
    others' stdout goes to /dev/null) and writes checkpoints (model.save_checkpoint asks is_main)."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if rank() != 0:
        sys.stdout = open(os.devnull, "w")
    return device


def rank():
    """This process's rank: torchrun's RANK, also before the process group is joined."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main():
    return rank() == 0


def all_reduce(x, op="sum"):
    """x (a number or a tensor) summed, or maxed (op="max"), over every process. Returns a tensor
    for a tensor, a float for a number; alone, x itself."""
    if not dist.is_initialized():
        return x
    t = x.detach().clone() if torch.is_tensor(x) else torch.tensor(float(x), dtype=torch.float64)
    on = "cuda" if dist.get_backend() == "nccl" else "cpu"
    out = t.to(on)
    dist.all_reduce(out, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return out.to(t.device) if torch.is_tensor(x) else out.item()


def all_gather(t):
    """[t of rank 0, t of rank 1, ...]: a tensor of the same shape from every process."""
    if not dist.is_initialized():
        return [t]
    on = "cuda" if dist.get_backend() == "nccl" else "cpu"
    out = [torch.empty_like(t, device=on) for _ in range(world_size())]
    dist.all_gather(out, t.to(on))
    return [o.to(t.device) for o in out]


def check_same_everywhere(values, what):
    """Raise on every process at once if these numbers differ between processes: data that each
    process makes for itself (the built-in pairs, sampled on each GPU) must come out the same, or a
    later collective would wait forever for a process with fewer steps."""
    everyone = all_gather(torch.tensor([float(v) for v in values], dtype=torch.float64))
    if any(not torch.equal(t, everyone[0]) for t in everyone):
        raise UserError(f"{what} differ between processes ({', '.join(str(t.tolist()) for t in everyone)}): their sampling "
                        f"is not deterministic on this machine; pass the pairs as a file (reward.py --pairs_out, then --data)")


def check_batch(batch_size, micro_batch_size, what="--batch_size"):
    """Refuse a global batch that the processes and micro-batches do not divide evenly.
    micro_batch_size None: the stage has no --micro_batch_size (PPO), each process takes its share in one pass."""
    n = world_size()
    if batch_size < 1:
        raise UserError(f"{what} must be at least 1, got {batch_size}")
    micro = micro_batch_size or batch_size // max(1, n)
    if micro < 1 or batch_size % (n * micro):
        if not micro_batch_size:  # each process takes its share in one pass (or as length groups)
            raise UserError(f"{what} {batch_size} is not a multiple of the {n} processes")
        raise UserError(f"{what} {batch_size} is not a multiple of --micro_batch_size {micro_batch_size} "
                        f"x {n} processes")


def shard(batch, micro_batch_size, length=None, groups=1):
    """This process's share of a global batch (a list), cut into micro-batches: a list of
    (items, weight). The shares are contiguous slices, as even as the batch allows. A process whose
    share is empty (a short last batch) gets one item with weight 0, so that it still joins the
    gradient all-reduce while adding nothing to it. With length (item -> its length in tokens), the
    share is sorted by length and cut into near-equal micro-batches, at least `groups` of them (and
    no more than micro_batch_size items each), so that each pads to a length close to its own
    items' (Padded.length_groups)."""
    n, r = world_size(), rank()
    mine = batch[r * len(batch) // n:(r + 1) * len(batch) // n]
    if not mine:
        return [(batch[:1], 0.0)]
    micro = micro_batch_size or len(mine)
    if length is not None and groups > 1:
        mine = sorted(mine, key=length)
        k = min(len(mine), max(groups, -(-len(mine) // micro)))  # the number of micro-batches
        return [(mine[i * len(mine) // k:(i + 1) * len(mine) // k], 1.0) for i in range(k)]
    return [(mine[i:i + micro], 1.0) for i in range(0, len(mine), micro)]


class _Call(torch.nn.Module):
    """Makes any method of model a forward pass that DistributedDataParallel can see."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, method, *args, **kwargs):
        return getattr(self.model, method)(*args, **kwargs)


class DataParallel:
    """The model as a training loop sees it. Alone, calls go straight to the model. Under torchrun,
    its forward passes (model(...) and model.hidden_states(...)) go through DistributedDataParallel,
    whose backward averages the gradients over processes; every other attribute (the tied
    transformer.wte.weight, config, ...) is the model's own. Use `sync(last)` around each
    micro-batch: the all-reduce runs on the last one only (gradient accumulation)."""

    def __init__(self, model):
        self.module = model
        self.ddp = None
        if world_size() > 1:
            device = next(model.parameters()).device
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                _Call(model), device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False)

    def __call__(self, *args, **kwargs):
        return self.ddp("forward", *args, **kwargs) if self.ddp else self.module(*args, **kwargs)

    def hidden_states(self, *args, **kwargs):
        return self.ddp("hidden_states", *args, **kwargs) if self.ddp else self.module.hidden_states(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.module, name)

    def sync(self, last):
        return self.ddp.no_sync() if self.ddp and not last else contextlib.nullcontext()


def accumulate(model, micro_batches, loss_fn):
    """Forward and backward over this process's micro-batches (from shard). loss_fn(items) returns
    the micro-batch's part of the global batch's loss: its sum over the items divided by the global
    normaliser (the number of examples, or of target tokens, in the whole batch), so that the parts
    of every micro-batch on every process add up to the loss of the batch. DDP averages gradients
    over processes, so each part is scaled by the number of processes before backward.
    Returns the batch's loss (summed over processes), the same on every process. loss_fn may also
    return (loss part, {name: a sum over the items}): then returns (loss, {name: the sum over the
    whole batch}), for the stage's diagnostics."""
    total, sums = 0.0, {}
    for i, (items, weight) in enumerate(micro_batches):
        with model.sync(i == len(micro_batches) - 1):
            out = loss_fn(items)
            loss, stats = out if isinstance(out, tuple) else (out, {})
            (loss * weight * world_size()).backward()
        total += loss.detach().float() * weight
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v) * weight
    if not isinstance(out, tuple):
        return all_reduce(total)
    return all_reduce(total), {k: all_reduce(v) for k, v in sums.items()}


def check_finite(loss, step, out_dir, what="the loss"):
    """Stop the stage, naming the step, if the loss (or `what`) is NaN or infinite. Raised before the
    optimizer step, so the weights never take the bad update, and nothing more is written: out_dir
    keeps its last good checkpoint."""
    value = float(loss)
    if not math.isfinite(value):
        raise NumericalError(f"step {step}: {what} is {value}; stopped before the update. {out_dir} keeps its "
                             f"last good checkpoint (see its config.json), if this run wrote one (--save_every)")


def clip_gradients(model, max_norm, step, out_dir):
    """Clip the gradient norm of model's parameters to max_norm (0: no clipping), then check_finite
    that norm: a finite loss can still have an overflowing gradient, which one optimizer step would
    write into every weight, and the next save onto the disk."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else math.inf)
    check_finite(norm, step, out_dir, "the gradient norm")


def distinct(items, hashable=tuple, key=None):
    """The distinct items, in order of first appearance (or sorted by key), and a LongTensor `where`
    with items[i] == distinct[where[i]]; hashable(item) tells two apart. The responses of preference
    pairs repeat (the built-in pairs of a prompt share its 6 or so candidates), and a pass without
    gradients need only score each once."""
    first = {}  # hashable(item) -> the index of its first appearance among the distinct ones
    ids = [first.setdefault(hashable(item), len(first)) for item in items]
    unique = [None] * len(first)
    for item, i in zip(items, ids):
        unique[i] = item
    order = sorted(range(len(unique)), key=lambda i: key(unique[i])) if key else range(len(unique))
    rank = torch.empty(len(unique), dtype=torch.long)
    rank[list(order)] = torch.arange(len(unique))  # where each first-appearance index went in the order
    return [unique[i] for i in order], rank[ids]


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

    def log(self, echo=True, **metrics):
        """Keep the row (written into the checkpoint's metrics.jsonl) and, if echo, print it as
        `key value | key value ...` (rank 0's stdout only, under torchrun)."""
        # 6 significant digits, not decimals: a learning rate of 1e-7 (or a KL of 4e-7) is not 0
        row = {k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in metrics.items()}
        row["elapsed"] = round(time.time() - self.t0, 2)
        self.rows.append(row)
        if echo:
            print(" | ".join(f"{k} {fmt(v)}" for k, v in row.items()), flush=True)


def fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)

# -----------------------------------------------------------------------------
# atomic directory writes


CHECKPOINT_FILES = {"config.json", "model.safetensors", "metrics.jsonl", "resume.json", "resume.safetensors"}


def check_out_dir(path, flag="--out_dir", reads=None):
    """Refuse, before any work, a path that is no place for a checkpoint: a file, the working
    directory or one above it, a directory holding more than a checkpoint's files (`--out_dir out`
    would mix the new checkpoint with out/base, out/sft, ...), or a checkpoint the run reads (reads:
    {flag: path}; `ppo.py --policy out/x --out_dir out/x` would replace its own frozen reference).
    A symbolic link counts as its target."""
    path = os.path.realpath(path)
    for other, source in (reads or {}).items():
        if same_path(source, path):
            raise UserError(f"{flag} {path} is also {other}: the run would overwrite a checkpoint it reads; "
                            f"name another directory")
    if not os.path.exists(path):
        return
    if not os.path.isdir(path):
        raise UserError(f"{flag} {path} exists and is not a directory: name a new directory for the checkpoint")
    if os.path.commonpath([path, os.getcwd()]) == path:
        raise UserError(f"{flag} {path} holds the working directory: name a new directory inside it")
    others = sorted(set(os.listdir(path)) - CHECKPOINT_FILES)
    if others:
        raise UserError(f"{flag} {path} holds {len(others)} {'entry' if len(others) == 1 else 'entries'} that "
                        f"{'is' if len(others) == 1 else 'are'} not a checkpoint's ({', '.join(map(repr, others[:3]))}): "
                        f"name a new directory, or an existing checkpoint")


@contextlib.contextmanager
def atomic_directory(path):
    """Yield a fresh temporary directory beside path; when the block succeeds, it replaces path.
    If the block raises, path is left exactly as it was. The swap is two renames: path -> old,
    tmp -> path; a crash between them (microseconds) leaves the previous version at path + '.old'.
    Entries of path that a checkpoint does not write (one that came during the run: the stages
    check_out_dir first) move into the new directory: nothing is deleted but the old checkpoint."""
    path = os.path.realpath(path)  # a symbolic link: its target is replaced, the link stays
    tmp, old = f"{path}.tmp{os.getpid()}.{_HOST_TAG}", f"{path}.old"
    if not os.path.exists(path) and os.path.isdir(old):  # a save killed between its renames: the last good one is back
        os.rename(old, path)
    for stale in killed_saves(path):  # half-written checkpoints of saves killed before their renames
        shutil.rmtree(stale, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        # the new files on disk before the old ones go: else a power cut after the renames could
        # leave the names pointing at empty files, and nothing of either version
        for name in os.listdir(tmp):
            fsync(os.path.join(tmp, name))
        fsync(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(path):
        for name in set(os.listdir(path)) - CHECKPOINT_FILES - set(os.listdir(tmp)):
            os.rename(os.path.join(path, name), os.path.join(tmp, name))
        os.rename(path, old)
    os.rename(tmp, path)
    fsync(os.path.dirname(path))  # the renames themselves
    shutil.rmtree(old, ignore_errors=True)


def _host_tag():
    """8 hex digits naming this machine and its process-ID namespace (a container has its own): a PID
    means something only there, on a disk that other machines or containers may share."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:  # not Linux
        namespace = ""
    return hashlib.sha1(f"{socket.gethostname()} {namespace}".encode()).hexdigest()[:8]


_HOST_TAG = _host_tag()


def killed_saves(path):
    """The temporary directories path.tmp<PID>.<tag> that atomic_directory left when its process was
    killed (SIGKILL, out of memory) before the renames: those of this machine and namespace whose
    process no longer runs. A GPT-2 XL checkpoint is gigabytes of disk, and every killed save would
    keep its own. Nothing is removed on Windows, nor where the PID now belongs to another process."""
    parent, name = os.path.split(path)
    stale = []
    for entry in os.listdir(parent) if os.path.isdir(parent) else []:  # a new parent: made by the save
        m = re.fullmatch(re.escape(name) + r"\.tmp([1-9][0-9]{0,9})\." + _HOST_TAG, entry)
        if m and int(m[1]) != os.getpid() and not process_exists(int(m[1])):
            stale.append(os.path.join(parent, entry))
    return stale


def process_exists(pid):
    if os.name == "nt":  # os.kill(pid, 0) would send Ctrl-C there: assume it runs, and delete nothing
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process; a number no PID reaches
        return True
    return True


def fsync(path):
    """Flush a file's (or a directory's entries') writes to the disk. A directory is flushed where
    the system can: some network and FUSE mounts refuse (EINVAL), Windows cannot open one."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if os.path.isdir(path):
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if not (os.path.isdir(path) and e.errno in (errno.EINVAL, errno.ENOTSUP, errno.EBADF)):
            raise
    finally:
        os.close(fd)


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")

# -----------------------------------------------------------------------------
# resume state: safetensors for tensors, JSON for the rest, no pickle. It is written into the
# checkpoint directory by model.save_checkpoint, inside the same atomic write as the weights.


def save_state(directory, tensors, info, name="resume"):
    """Write a dict of tensors to directory/name.safetensors and a JSON-able dict to name.json."""
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, os.path.join(directory, f"{name}.safetensors"))
    write_json(os.path.join(directory, f"{name}.json"), info)


def read_safetensors(file, error=UserError, what=""):
    """The tensors of a .safetensors file, or `error` naming it (truncated, not safetensors at all,
    missing), after the prefix `what`."""
    try:
        return load_file(file)
    except (SafetensorError, OSError) as e:
        raise error(f"{what}{file} cannot be read: {e}") from None


def same_path(a, b):
    """Whether two flags' values name the same file or directory (work/x, ./work/x, /abs/work/x, a link to it)."""
    return isinstance(a, str) and isinstance(b, str) and a != "" != b and os.path.realpath(a) == os.path.realpath(b)


def load_state(directory, name="resume"):
    """(tensors, info) written by save_state, or a UserError naming the file that is missing or broken."""
    paths = [os.path.join(directory, f"{name}.{ext}") for ext in ("safetensors", "json")]
    real = os.path.realpath(directory)  # as atomic_directory names its .old
    if not os.path.exists(real) and os.path.isfile(os.path.join(f"{real}.old", os.path.basename(paths[0]))):
        raise UserError(f"--resume: a save killed between its two renames left the last state at {real}.old: "
                        f"move it back (mv {real}.old {real}) and resume")
    for path in paths:
        if not os.path.isfile(path):
            raise UserError(f"--resume: {path} does not exist: {directory} holds no resume state "
                            f"(its run finished, or never saved one: see --save_every)")
    try:
        tensors = load_file(paths[0])
        with open(paths[1]) as f:
            info = json.load(f)
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise UserError(f"--resume: {directory}: cannot read the resume state ({e})") from None
    return tensors, info


def optimizer_state(optimizer, prefix):
    """An optimizer's state_dict as named tensors ({prefix}.{param index}.{key}) and JSON (its
    param groups, and any non-tensor state)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for i, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.{i}.{key}"] = value
            else:
                scalars[f"{i}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer, prefix, tensors, info):
    """The inverse of optimizer_state."""
    state = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            i, key = name[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(i), {})[key] = value
    for name, value in info["scalars"].items():
        i, key = name.split(".", 1)
        state.setdefault(int(i), {})[key] = value
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in info["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def python_rng_state(rng):
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def set_python_rng_state(rng, state):
    rng.setstate((state[0], tuple(state[1]), state[2]))


def data_summary(examples):
    """{"examples", "tokens", "sha256"} of a training set whose examples are token lists, or tuples
    holding them (an int beside them, such as a prompt length, is hashed but not counted); of a
    1-D tensor of tokens (pretraining's stream), {"tokens", "sha256"}. TrainState keeps it, so that
    --resume refuses to go on over a data file that changed since the run began, counts and all the
    same (a pair's chosen and rejected swapped, documents reordered)."""
    digest = hashlib.sha256()
    if isinstance(examples, torch.Tensor):
        digest.update(examples.cpu().contiguous().numpy())  # the buffer itself: no copy of a corpus's tokens
        return {"tokens": examples.numel(), "sha256": digest.hexdigest()[:16]}

    def tokens(x):
        return len(x) if isinstance(x, list) else sum(tokens(y) for y in x if isinstance(y, (list, tuple)))
    for x in examples:
        digest.update(repr(x).encode())  # brackets and all: the examples' boundaries count too
    return {"examples": len(examples), "tokens": sum(tokens(x) for x in examples), "sha256": digest.hexdigest()[:16]}


# Flags a resumed run may change. --micro_batch_size and PPO's --generation_batch bound the memory
# of a pass, so a run that ran out of it can go on in smaller pieces. The run then no longer ends
# bit for bit where the uninterrupted one would: the gradients are the same sums added in another
# order; rollouts, dropout masks (at --dropout > 0) and reward.py's normalisation samples on --data
# (drawn --micro_batch_size prompts at a time) are other draws of the same distribution.
MAY_CHANGE_ON_RESUME = {"resume", "out_dir", "save_every", "micro_batch_size", "generation_batch"}


class TrainState:
    """What a killed run needs to go on as if it had never stopped, beside the weights of the
    checkpoint itself: the optimizers, every random number generator (Python's and torch's global
    ones, CUDA's, and the torch.Generator and random.Random objects the stage keeps), extra models
    (PPO's value model), and the stage's own JSON (a data position, a KL coefficient). torch's
    generators differ by process under torchrun (a stage seeds its samplers by rank), so each
    process's is kept; a resumed run must use as many processes as the interrupted one."""

    def __init__(self, cfg, stage, optimizers=None, generators=None, rngs=None, models=None, data=None):
        self.cfg, self.stage = cfg, stage
        self.optimizers, self.generators = optimizers or {}, generators or {}
        self.rngs, self.models = rngs or {}, models or {}
        self.data = data  # data_summary of the training set: a resumed run must go on over the same data

    def due(self, step, steps):
        """Whether the end of step (0-based) is a time to save: every save_every steps, but not
        after the last one (the final checkpoint follows)."""
        every = self.cfg.save_every
        return every > 0 and (step + 1) % every == 0 and step + 1 < steps

    def capture(self, step, **extra):
        """(tensors, info) to pass to save_checkpoint(..., resume=...). Every process must call it
        (it gathers their generators); only rank 0's result is written. step: steps done."""
        tensors, info = {}, {"stage": self.stage, "step": step, "world_size": world_size(),
                             "args": dataclasses.asdict(self.cfg), "data": self.data, "extra": extra, "optimizers": {}}
        for name, opt in self.optimizers.items():
            t, info["optimizers"][name] = optimizer_state(opt, f"optimizer.{name}")
            tensors.update(t)
        for name, model in self.models.items():
            tensors.update({f"model.{name}.{k}": v for k, v in model.state_dict().items()})
        per_process = {"torch": torch.get_rng_state(), **{f"generator.{n}": g.get_state() for n, g in self.generators.items()}}
        if torch.cuda.is_initialized():  # a run on CUDA (a --device cpu run on a GPU machine makes no CUDA context)
            per_process.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        for name, state in per_process.items():
            for r, s in enumerate(all_gather(state)):
                tensors[f"rng.{r}.{name}"] = s
        info["python_random"] = python_rng_state(random)
        info["rngs"] = {name: python_rng_state(rng) for name, rng in self.rngs.items()}
        info["device"] = next((p.device.type for opt in self.optimizers.values() for group in opt.param_groups
                               for p in group["params"]), None)  # what --device auto chose
        return tensors, info

    def restore(self, model, logger):
        """Load the resume state of cfg.out_dir into model, the optimizers, generators and extra
        models, and logger's rows; returns (steps done, the stage's extra JSON). Refuses state
        from another stage, other arguments or another number of processes."""
        out_dir = self.cfg.out_dir
        tensors, info = load_state(out_dir)
        where = os.path.join(out_dir, "resume.json")
        if info.get("stage") != self.stage:
            raise UserError(f"--resume: {where} is the state of a {info.get('stage')} run, not of {self.stage}")
        if info["world_size"] != world_size():
            raise UserError(f"--resume: {where} was written by {info['world_size']} processes; resume with as many, "
                            f"not {world_size()}")
        now = dataclasses.asdict(self.cfg)
        free = sorted((MAY_CHANGE_ON_RESUME - {"out_dir", "resume"}) & now.keys())
        for key, value in info["args"].items():  # out_dir: the state was just found there, however it is spelled
            if key not in MAY_CHANGE_ON_RESUME and now.get(key) != value and not same_path(now.get(key), value):
                raise UserError(f"--resume: --{key} is {now.get(key)!r}, but the interrupted run ({where}) used {value!r} "
                                f"(of this stage's flags only --{', --'.join(free)} may change)")
        # --device auto may choose otherwise on another machine: its generators' states (a CUDA generator's is not
        # a CPU one's) and its precision (bf16 autocast on CUDA) belong to the device the run began on
        then, here = info.get("device"), next(model.parameters()).device.type
        if then is not None and then != here:
            how = "hide the GPUs (CUDA_VISIBLE_DEVICES=) to go on on the CPU" if then == "cpu" else f"go on where there is {then}"
            raise UserError(f"--resume: {where} was written by a run on {then}, and this one runs on {here} "
                            f"(--device {self.cfg.device}): {how}")
        # the arguments are the same; is the data? (The state of an older version holds fewer keys: those are compared.)
        if any((self.data or {}).get(key) != value for key, value in (info.get("data") or {}).items()):
            raise UserError(f"--resume: the training data is {self.data}, but the interrupted run ({where}) had "
                            f"{info['data']}: the data file changed since, or the way this version of the stage "
                            f"reads or splits it (start again without --resume)")
        model.load_state_dict(read_safetensors(os.path.join(out_dir, "model.safetensors"), what="--resume: "))
        for name, m in self.models.items():
            prefix = f"model.{name}."
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if not state:
                raise UserError(f"--resume: {where} holds no {name} model (written by an older version of this "
                                f"stage?); start the run again without --resume")
            m.load_state_dict(state)
        for name, opt in self.optimizers.items():
            load_optimizer_state(opt, f"optimizer.{name}", tensors, info["optimizers"][name])
        r = rank()
        torch.set_rng_state(tensors[f"rng.{r}.torch"])
        for name, g in self.generators.items():
            g.set_state(tensors[f"rng.{r}.generator.{name}"])
        for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
            if f"rng.{r}.cuda.{i}" in tensors:  # a device the interrupted run did not have starts afresh
                torch.cuda.set_rng_state(tensors[f"rng.{r}.cuda.{i}"], i)
        set_python_rng_state(random, info["python_random"])
        for name, rng in self.rngs.items():
            set_python_rng_state(rng, info["rngs"][name])
        with open(os.path.join(out_dir, "metrics.jsonl")) as f:
            logger.rows = [json.loads(line) for line in f]
        changed = [f"--{k} {info['args'][k]} -> {now[k]}" for k in free if k in info["args"] and info["args"][k] != now[k]]
        print(f"resumed {out_dir} after step {info['step']}" + (f" ({', '.join(changed)})" if changed else ""))
        return info["step"], info["extra"]
