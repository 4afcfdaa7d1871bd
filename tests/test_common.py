"""The command line from a config dataclass, atomic directory writes, the automatic dtype, the resume
state's checks and the logger."""

import contextlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

import common
from common import UserError, atomic_directory, parse_args


@dataclass
class Args:
    lr: float = 0.1
    """the learning rate"""
    steps: int = 10
    """how many steps"""
    name: str = "run"
    """a name"""
    fast: bool = False
    """go fast"""


def test_both_spellings_and_types():
    args = parse_args(Args, ["--lr", "0.5", "--steps=3", "--name", "x=y", "--fast"])
    assert args == Args(lr=0.5, steps=3, name="x=y", fast=True)
    assert parse_args(Args, ["--fast", "false", "--lr=1e-3"]) == Args(lr=1e-3, fast=False)
    assert parse_args(Args, ["--fast", "--lr", "1"]) == Args(lr=1.0, fast=True)  # a bare flag before another
    assert parse_args(Args, []) == Args()
    for text, value in [("True", True), ("YES", True), ("1", True), ("False", False), ("no", False), ("0", False)]:
        assert parse_args(Args, ["--fast", text]).fast is value, text  # as Python and shells spell them


@pytest.mark.parametrize("argv, message", [
    (["--lr", "abc"], "--lr: expected float, got 'abc'"),
    (["--steps", "2.5"], "--steps: expected int, got '2.5'"),
    (["--fast", "maybe"], "--fast: expected true or false, got 'maybe'"),
    (["--epochs", "3"], "unknown argument --epochs"),
    (["--lr"], "--lr needs a value"),
    (["lr=3"], "unexpected argument 'lr=3'"),
    (["--lr", "nan"], "--lr: expected a finite number, got 'nan'"),  # float() takes both; JSON has neither
    (["--lr", "-inf"], "--lr: expected a finite number, got '-inf'"),
])
def test_bad_arguments_name_the_argument(argv, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.").replace("-", r"\-")):
        parse_args(Args, argv)


def test_help_lists_every_field_with_its_doc(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(Args, ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for line in ["--lr float (default 0.1)", "the learning rate", "--steps int", "how many steps",
                 "--fast bool (default False)", "go fast"]:
        assert line in out


def test_atomic_directory_replaces_only_on_success(tmp_path):
    path = tmp_path / "out"  # a checkpoint's files: a, b
    a, b = "config.json", "metrics.jsonl"
    with atomic_directory(path) as tmp:
        open(os.path.join(tmp, a), "w").write("first")
    assert (path / a).read_text() == "first"
    for crash in (RuntimeError, KeyboardInterrupt):  # an error, or Ctrl-C (not an Exception)
        with pytest.raises(crash):
            with atomic_directory(path) as tmp:
                open(os.path.join(tmp, a), "w").write("second")
                raise crash("crash")
        assert (path / a).read_text() == "first"
        assert os.listdir(tmp_path) == ["out"]  # the temporary directory went with the failure
    with atomic_directory(path) as tmp:
        open(os.path.join(tmp, b), "w").write("third")
    assert os.listdir(path) == [b]
    assert os.listdir(tmp_path) == ["out"]  # no temporary or old directory left behind
    (path / "notes.txt").write_text("mine")  # not a checkpoint's (it came during a run): kept, not deleted
    with atomic_directory(path) as tmp:
        open(os.path.join(tmp, a), "w").write("fourth")
    assert sorted(os.listdir(path)) == [a, "notes.txt"] and (path / "notes.txt").read_text() == "mine"
    assert os.listdir(tmp_path) == ["out"]
    with pytest.raises(common.UserError, match="holds 1 entry that is not a checkpoint's \\('notes.txt'\\)"):
        common.check_out_dir(path)  # which a stage refuses before any work
    link = tmp_path / "link"  # a symbolic link the user made: its target is written, the link stays
    (path / "notes.txt").unlink()
    link.symlink_to(path)
    common.check_out_dir(link)
    with atomic_directory(link) as tmp:
        open(os.path.join(tmp, b), "w").write("fifth")
    assert link.is_symlink() and (path / b).read_text() == "fifth" and sorted(os.listdir(tmp_path)) == ["link", "out"]


def test_a_save_removes_what_killed_saves_left(tmp_path):
    """A save killed before its renames leaves path.tmp<PID>.<tag>, gigabytes for a large model; the next
    save removes those of processes that are gone, made on this machine and in this container, and
    nothing else."""
    path = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a process that ran and is gone
    tag = common._HOST_TAG
    elsewhere = "0" * 8 if tag != "0" * 8 else "1" * 8  # a save of another machine or container: its PIDs are not ours
    others = [f"out.tmp{os.getppid()}.{tag}", f"out.tmp{dead.pid}.{elsewhere}", f"out.tmp{dead.pid}", "out.tmpx",
              f"out.tmp00{dead.pid}.{tag}", f"out.tmp{10 ** 20}.{tag}", "out.tmp\u00b2", f"outer.tmp{dead.pid}.{tag}",
              f"other.tmp{dead.pid}.{tag}"]
    for name in [f"out.tmp{dead.pid}.{tag}"] + others:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_text("half")
    with atomic_directory(path) as tmp:
        assert os.path.basename(tmp) == f"out.tmp{os.getpid()}.{tag}"
        open(os.path.join(tmp, "config.json"), "w").write("{}")
    assert sorted(os.listdir(tmp_path)) == sorted(["out"] + others)
    with atomic_directory(tmp_path / "new" / "parents" / "out") as tmp:  # whose parent does not exist yet
        open(os.path.join(tmp, "config.json"), "w").write("{}")
    assert os.listdir(tmp_path / "new" / "parents" / "out") == ["config.json"]


def test_auto_dtype_is_bfloat16_only_where_the_card_computes_in_it(monkeypatch):
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert common.auto_dtype(cpu) == "float32" and common.auto_dtype(cpu, training=False) == "float32"
    for capability, training, inference in [((9, 0), "bfloat16", "bfloat16"), ((8, 0), "bfloat16", "bfloat16"),
                                            ((7, 5), "float32", "float16"), ((7, 0), "float32", "float16")]:  # T4, V100
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        assert (common.auto_dtype(cuda), common.auto_dtype(cuda, training=False)) == (training, inference), capability
    # and setup_device's --dtype auto asks for the same (a pretend V100: inference autocasts to float16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert isinstance(common.setup_device("cuda", "auto")[1], contextlib.nullcontext)
    assert common.setup_device("cuda", "auto", training=False)[1].fast_dtype == torch.float16


def test_shard_sorts_by_length_into_groups_and_keeps_every_item():
    lengths = [9, 3, 7, 1, 8, 2, 6, 5, 4, 10]
    parts = common.shard(list(range(10)), 0, lambda i: lengths[i], groups=4)
    assert [len(items) for items, _ in parts] == [2, 3, 2, 3]  # 4 micro-batches, as even as 10 allows
    assert all(w == 1.0 for _, w in parts)
    flat = [i for items, _ in parts for i in items]
    assert sorted(flat) == list(range(10))
    assert [lengths[i] for i in flat] == sorted(lengths)
    assert [len(items) for items, _ in common.shard(list(range(10)), 2, lambda i: lengths[i], groups=4)] == [2] * 5
    assert [len(items) for items, _ in common.shard(list(range(3)), 0, lambda i: lengths[i], groups=4)] == [1] * 3
    assert common.shard(list(range(10)), 0, lambda i: lengths[i], groups=1) == [(list(range(10)), 1.0)]


def test_shard_shares_and_micro_batches(monkeypatch):
    parts = common.shard(list(range(10)), 3, lambda i: i, groups=2)  # at least 2 groups, at most 3 items each
    assert [len(items) for items, _ in parts] == [2, 3, 2, 3] and all(len(items) <= 3 for items, _ in parts)
    monkeypatch.setattr(common, "world_size", lambda: 4)
    monkeypatch.setattr(common, "rank", lambda: 0)
    assert common.shard(["a", "b"], 0) == [(["a"], 0.0)]  # an empty share (2 items, 4 processes): one item, weight 0
    monkeypatch.setattr(common, "rank", lambda: 1)
    assert common.shard(list(range(8)), 0) == [([2, 3], 1.0)]  # contiguous, as even as the batch allows
    monkeypatch.setattr(common, "world_size", lambda: 2)
    with pytest.raises(UserError, match="--batch_size 6 is not a multiple of --micro_batch_size 2 x 2 processes"):
        common.check_batch(6, 2)
    common.check_batch(8, 2)
    monkeypatch.setattr(common, "world_size", lambda: 3)  # no --micro_batch_size: the flag is not the cause
    with pytest.raises(UserError, match=r"^--batch_size 32 is not a multiple of the 3 processes$"):
        common.check_batch(32, 0)


def test_batch_indices_sort_each_window_of_batches_by_length():
    import random
    lengths = list(range(64))
    rng = random.Random(0)
    gen = common.batch_indices(lengths, 4, rng, group=2)
    epoch = [next(gen) for _ in range(16)]
    assert sorted(i for b in epoch for i in b) == lengths  # one epoch: every index once
    rng2 = random.Random(0)
    order = rng2.sample(range(64), 64)  # the shuffle batch_indices draws first
    windows = [sorted(order[i:i + 8]) for i in range(0, 64, 8)]
    for b in epoch:  # each batch: 4 consecutive items of one window sorted by length
        w = next(w for w in windows if b[0] in w)
        assert b == w[w.index(b[0]):w.index(b[0]) + 4]


def test_distinct_finds_each_item_once_and_where_it_is():
    items = [[3, 1], [2], [3, 1], [5, 6, 7], [2]]
    unique, where = common.distinct(items)
    assert unique == [[3, 1], [2], [5, 6, 7]] and where.tolist() == [0, 1, 0, 2, 1]
    unique, where = common.distinct(items, key=len)  # shortest first
    assert unique == [[2], [3, 1], [5, 6, 7]] and [unique[i] for i in where] == items
    examples = [([1], [0]), ([1], [9]), ([1], [0])]  # the same inputs, other targets: not the same
    unique, where = common.distinct(examples, hashable=lambda e: (tuple(e[0]), tuple(e[1])))
    assert unique == [([1], [0]), ([1], [9])] and where.tolist() == [0, 1, 0]


def test_data_summary_counts_nested_token_lists():
    nested = common.data_summary([(([1, 2], [3]), ([4], [5, 6, 7]))])
    assert {k: nested[k] for k in ("examples", "tokens")} == {"examples": 1, "tokens": 7}
    pair = common.data_summary([([1, 2, 3], [4], 2)])
    assert {k: pair[k] for k in ("examples", "tokens")} == {"examples": 1, "tokens": 4}  # the int is not counted


def test_data_summary_tells_apart_training_sets_with_the_same_counts():
    """The hash sees what the counts cannot: chosen and rejected swapped, another prompt length,
    the same tokens cut into examples differently, the same examples in another order."""
    base = common.data_summary([([1, 2, 3], [4], 2), ([5], [6, 7], 1)])
    assert common.data_summary([([1, 2, 3], [4], 2), ([5], [6, 7], 1)]) == base  # the same data, the same summary
    for other in ([([4], [1, 2, 3], 2), ([5], [6, 7], 1)],
                  [([1, 2, 3], [4], 1), ([5], [6, 7], 1)],
                  [([1, 2], [3, 4], 2), ([5], [6, 7], 1)],
                  [([5], [6, 7], 1), ([1, 2, 3], [4], 2)]):
        summary = common.data_summary(other)
        assert (summary["examples"], summary["tokens"]) == (base["examples"], base["tokens"])
        assert summary["sha256"] != base["sha256"], other
    stream = torch.tensor([5, 1, 2, 0, 3, 4, 0])  # pretraining's token stream: its documents reordered
    assert common.data_summary(stream) == common.data_summary(stream.clone())
    reordered = common.data_summary(torch.tensor([3, 4, 0, 5, 1, 2, 0]))
    assert reordered["tokens"] == 7 and reordered["sha256"] != common.data_summary(stream)["sha256"]


def test_resume_restores_the_random_number_generators(tmp_path):
    import random
    from dataclasses import dataclass as dc

    @dc
    class Cfg:
        out_dir: str = str(tmp_path / "ckpt")
        save_every: int = 1
        resume: bool = False
    from model import GPT, GPTConfig, save_checkpoint
    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4, dtype=torch.long))[0].sum().backward()
    opt.step()
    state = common.TrainState(Cfg(), "test", optimizers={"adamw": opt})
    torch.manual_seed(1)
    random.seed(2)
    save_checkpoint(tmp_path / "ckpt", model, {"stage": "test"}, [], resume=state.capture(1))
    want = torch.rand(3), random.random(), opt.state_dict()["state"][0]["exp_avg"].clone()
    torch.rand(5), random.random()  # move both generators on
    for v in opt.state.values():
        v["exp_avg"].zero_()
    state.restore(model, common.Logger())
    assert torch.equal(torch.rand(3), want[0]) and random.random() == want[1]
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], want[2])
    # the checks before anything is loaded: the stage, the number of processes, the data where the run
    # recorded its summary; and of the arguments, --save_every and --resume may change
    with pytest.raises(UserError, match=r"resume.json is the state of a test run, not of other"):
        common.TrainState(Cfg(), "other").restore(model, common.Logger())
    assert common.TrainState(Cfg(save_every=5, resume=True), "test").restore(model, common.Logger())[0] == 1
    path = tmp_path / "ckpt" / "resume.json"
    info = json.loads(path.read_text())
    path.write_text(json.dumps({**info, "world_size": 2}))
    with pytest.raises(UserError, match="written by 2 processes; resume with as many, not 1"):
        state.restore(model, common.Logger())
    path.write_text(json.dumps({**info, "data": {"examples": 3, "sha256": "ab"}}))
    data = common.TrainState(Cfg(), "test", data={"examples": 3, "tokens": 9, "sha256": "cd"})
    with pytest.raises(UserError, match="the training data is .* the data file changed since"):
        data.restore(model, common.Logger())


def test_out_dir_above_the_working_directory_is_refused(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    with pytest.raises(UserError, match="holds the working directory"):
        common.check_out_dir(str(tmp_path))
    (tmp_path / "link").symlink_to(tmp_path)  # a link to it is the directory itself
    with pytest.raises(UserError, match="holds the working directory"):
        common.check_out_dir(str(tmp_path / "link"))


def test_logger_keeps_every_row_and_prints_the_echoed_ones(capsys):
    """Rows go to metrics.jsonl whether echoed or not, floats to 6 significant digits (a learning
    rate of 1e-7 was logged as 0 when they kept 6 decimals); the printed line gives 4 significant
    digits, and whole numbers from 1e4 on (negative ones too)."""
    logger = common.Logger()
    logger.log(echo=False, step=1, loss=0.1234567891)
    assert capsys.readouterr().out == ""
    logger.log(step=2, loss=0.1234567, reward=-12345.6, note="x")
    assert [{k: v for k, v in r.items() if k != "elapsed"} for r in logger.rows] == [
        {"step": 1, "loss": 0.123457}, {"step": 2, "loss": 0.123457, "reward": -12345.6, "note": "x"}]
    assert all(isinstance(r["elapsed"], float) for r in logger.rows)
    assert capsys.readouterr().out.startswith("step 2 | loss 0.1235 | reward -12346 | note x | elapsed ")
    logger.log(lr=1.2345678e-7)
    assert logger.rows[-1]["lr"] == 1.23457e-7 and capsys.readouterr().out.startswith("lr 1.235e-07 | ")
