"""The command line from a config dataclass, atomic directory writes, and the automatic dtype."""

import os
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
    assert parse_args(Args, []) == Args()


@pytest.mark.parametrize("argv, message", [
    (["--lr", "abc"], "--lr: expected float, got 'abc'"),
    (["--steps", "2.5"], "--steps: expected int, got '2.5'"),
    (["--fast", "maybe"], "--fast: expected true or false, got 'maybe'"),
    (["--epochs", "3"], "unknown argument --epochs"),
    (["--lr"], "--lr needs a value"),
    (["lr=3"], "unexpected argument 'lr=3'"),
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
    with pytest.raises(RuntimeError):
        with atomic_directory(path) as tmp:
            open(os.path.join(tmp, a), "w").write("second")
            raise RuntimeError("crash")
    assert (path / a).read_text() == "first"
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


def test_auto_dtype_is_bfloat16_only_where_the_card_computes_in_it(monkeypatch):
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert common.auto_dtype(cpu) == "float32" and common.auto_dtype(cpu, training=False) == "float32"
    for capability, training, inference in [((9, 0), "bfloat16", "bfloat16"), ((8, 0), "bfloat16", "bfloat16"),
                                            ((7, 5), "float32", "float16"), ((7, 0), "float32", "float16")]:  # T4, V100
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        assert (common.auto_dtype(cuda), common.auto_dtype(cuda, training=False)) == (training, inference), capability


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
